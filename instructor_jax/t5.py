"""The T5 encoder (v1.0 ReLU and v1.1 gated-GELU) in Flax linen, with t5x parameter names.

Shape key: B batch, L length, D d_model, H heads, K head dim (d_kv), F d_ff, V vocab,
N relative-position buckets.

Parameter tree (kernels are [in, out], as in t5x):
  token_embedder/embedding                          [V, D]
  encoder/relpos_bias/rel_embedding                 [H, N]
  encoder/layers_{i}/pre_attention_layer_norm/scale [D]
  encoder/layers_{i}/attention/{query,key,value}/kernel [D, H*K]
  encoder/layers_{i}/attention/out/kernel           [H*K, D]
  encoder/layers_{i}/pre_mlp_layer_norm/scale       [D]
  encoder/layers_{i}/mlp/wi/kernel                  [D, F]   (v1.1: wi_0, wi_1)
  encoder/layers_{i}/mlp/wo/kernel                  [F, D]
  encoder/encoder_norm/scale                        [D]
"""

from __future__ import annotations

import functools
import math
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from instructor_jax import tpu_attention
from instructor_jax.config import T5Config

# Logical axis names, shared with the sharding rules table (the names t5x/flaxformer use).
BATCH, LENGTH, EMBED, JOINED_KV, HEADS, KV, MLP_AXIS, VOCAB, RELPOS = (
    "batch", "length", "embed", "joined_kv", "heads", "kv", "mlp", "vocab", "relpos_buckets")


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
  """Bidirectional T5 bucket index of (key - query) for every query/key pair, as int32 [L, L].

  Computed in NumPy at trace time (L is static). The logarithm is taken in float32 with the same
  order of operations as the PyTorch reference, because float64 would move pairs that sit exactly
  on a bucket boundary (e.g. distance 16 -> 10 or 9) into a different bucket.
  """
  context = np.arange(length, dtype=np.int64)[:, None]
  memory = np.arange(length, dtype=np.int64)[None, :]
  relative = memory - context
  half = num_buckets // 2
  buckets = (relative > 0).astype(np.int64) * half
  distance = np.abs(relative)
  max_exact = half // 2
  with np.errstate(divide="ignore"):
    log_ratio = np.log(distance.astype(np.float32) / np.float32(max_exact))
  scaled = log_ratio / np.float32(math.log(max_distance / max_exact)) * np.float32(half - max_exact)
  large = max_exact + np.where(distance < max_exact, 0, scaled).astype(np.int64)
  large = np.minimum(large, half - 1)
  buckets += np.where(distance < max_exact, distance, large)
  return buckets.astype(np.int32)


def _dense_init(fan_in: int):
  return nn.initializers.normal(stddev=fan_in ** -0.5)


class RMSNorm(nn.Module):
  """T5 layer norm: no mean subtraction, no bias; statistics in float32."""

  epsilon: float
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x_BLD: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (EMBED,)),
                       (x_BLD.shape[-1],), jnp.float32)
    x = x_BLD.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.epsilon)
    return (x * scale).astype(self.dtype)


def residual_dtype(dtype: jnp.dtype) -> jnp.dtype:
  """The residual stream's dtype: float32 under float16 compute, else the compute dtype.

  float16 tops out at 65504 and T5's residual stream can outgrow it (HF clamps float16 hidden
  states for that reason, and loads `wo` in float32 for float16 models, which turns its residual
  stream float32 from the first feed-forward on). Here the two projections that feed the stream
  (`attention/out`, `mlp/wo`) return float32 and the stream stays float32; every matmul still
  takes float16 operands. bfloat16 has float32's range and keeps a bfloat16 stream.
  """
  return jnp.dtype(jnp.float32) if jnp.dtype(dtype) == jnp.float16 else jnp.dtype(dtype)


@functools.cache
def cpu_has_bf16_dot(cpuinfo_path: str = "/proc/cpuinfo") -> bool:
  """Whether this host's CPU has bf16 dot-product instructions, from the kernel's CPU flags.

  x86 lists `avx512_bf16` / `amx_bf16` under "flags", Arm64 `bf16` under "Features". Where the flags
  cannot be read (not Linux), the answer is True, which keeps the form measured fastest on CPUs that
  have them."""
  try:
    with open(cpuinfo_path, encoding="utf-8", errors="replace") as f:
      text = f.read()
  except OSError:
    return True
  flags: set[str] = set()
  for line in text.splitlines():
    key, _, value = line.partition(":")
    if key.strip() in ("flags", "Features"):
      flags.update(value.split())
  if not flags:
    return True
  return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def matmul(spec: str, x: jax.Array, y: jax.Array, dtype: jnp.dtype, result_dtype: jnp.dtype | None = None) -> jax.Array:
  """`einsum(spec, x, y)` with operands in the compute `dtype`, float32 accumulation, `result_dtype` out.

  `result_dtype` defaults to `dtype`. Two XLA:CPU forms (decided by the default backend at trace
  time; GPU/TPU get the plain dot, whose float32 accumulator never leaves the kernel):
  - bfloat16, on a CPU with bf16 dot instructions (AVX512-BF16, AMX-BF16, Arm BF16): XLA:CPU (JAX
    0.10) runs a bf16 x bf16 dot with a bf16 result on a kernel slower than float32, and the same
    dot with a float32 result on its AVX512-BF16 kernel, 1.6x float32 (BENCHMARKS.md). The float32
    result is rounded at once, as a bf16 dot does after accumulating. In a bf16 train step on CPU
    the backward matmuls see float32 cotangents and run in float32.
  - bfloat16, on a CPU without them: both bf16 forms run slower than float32 (0.72x and 0.9x on an
    AVX2 Zen 3), so the operands are widened to float32, exactly (bf16 is float32's upper half),
    and the GEMM runs at float32's speed with a float32-accumulated bf16 GEMM's result.
  - float16: XLA:CPU compiles no float16 dot with a float32 result, so the float16 operands are
    widened to float32 first. That is exact (a product of two 11-bit significands fits float32's
    24), so the result is a float32-accumulated float16 GEMM's, up to summation order.
  """
  dtype = jnp.dtype(dtype)
  result = jnp.dtype(result_dtype or dtype)
  x, y = x.astype(dtype), y.astype(dtype)
  preferred = None if result == dtype else result
  if jax.default_backend() == "cpu":
    if dtype == jnp.float16:
      x, y, preferred = x.astype(jnp.float32), y.astype(jnp.float32), None
    elif dtype == jnp.bfloat16 and cpu_has_bf16_dot():
      preferred = jnp.float32
    elif dtype == jnp.bfloat16:
      x, y, preferred = x.astype(jnp.float32), y.astype(jnp.float32), None
  return jnp.einsum(spec, x, y, preferred_element_type=preferred).astype(result)


class Dense(nn.Module):
  """Bias-free projection; float32 kernel cast to the compute dtype at use, result in `result_dtype`."""

  features: int
  axes: tuple[str, str]
  dtype: jnp.dtype
  init_fan_in: int | None = None
  result_dtype: jnp.dtype | None = None  # default: the compute dtype

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    fan_in = self.init_fan_in or x.shape[-1]
    kernel = self.param("kernel", nn.with_logical_partitioning(_dense_init(fan_in), self.axes),
                        (x.shape[-1], self.features), jnp.float32)
    return matmul("...i,io->...o", x, kernel, self.dtype, self.result_dtype)


def dropout_draws(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Uniform 16-bit draws (uint32 values below 65536) for `shape`: four per Threefry-2x32 block.

  jax.random.bits hashes one counter per 32-bit word it returns and XORs the block's two output words
  into one (partitionable Threefry, JAX's default), so 64 bits are computed for every 32 kept. Here
  each block's counter is (flat index of the leading axes, position along the last axis / 4) and all
  64 output bits are kept: four draws per block, half the Threefry work of two 16-bit draws per
  word. The counters are global positions, so any mesh gives the same draws. A key of another
  PRNG implementation (jax_default_prng_impl) draws through jax.random.bits, two per word.
  """
  *lead, last = shape
  blocks = -(-last // 4)
  typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
  impl = str(jax.random.key_impl(key)) if typed else jax.config.jax_default_prng_impl
  if impl == "threefry2x32" and math.prod(lead) < 2 ** 32 and blocks < 2 ** 32:
    from jax.extend.random import threefry2x32_p
    k = jax.random.key_data(key)
    grid = (*lead, blocks)
    row = jnp.zeros(grid, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(lead))):
      row = row + jax.lax.broadcasted_iota(jnp.uint32, grid, axis) * np.uint32(stride)
      stride *= lead[axis]
    column = jax.lax.broadcasted_iota(jnp.uint32, grid, len(lead))
    high, low = threefry2x32_p.bind(k[0], k[1], row, column)
    quarters = [high & 0xFFFF, high >> 16, low & 0xFFFF, low >> 16]
  else:
    words = jax.random.bits(key, (*lead, (last + 1) // 2), jnp.uint32)
    quarters = [words & 0xFFFF, words >> 16]
  return jnp.stack(quarters, axis=-1).reshape(*lead, -1)[..., :last]


class Dropout(nn.Module):
  """Inverted dropout whose keep/drop draws are 16 bits, four per Threefry block (`dropout_draws`).

  Flax's dropout draws a 32-bit word per element, and those Threefry rounds were a third of the
  CPU train step (BENCHMARKS.md); 16 bits resolve the rate to 1/65536, and the kept values are
  scaled by the exact keep probability of that threshold. The draws depend on each element's global
  position alone, so the mask is the same on any mesh.
  """

  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    if deterministic or self.rate == 0.0:
      return x
    if self.rate >= 1.0:
      return jnp.zeros_like(x)
    drop = round(self.rate * 65536)  # a draw below this drops its element
    draws = dropout_draws(self.make_rng("dropout"), x.shape)
    # Scaled in float32: 1/0.9 rounded to bf16 would be 0.2% off.
    kept = (x.astype(jnp.float32) * np.float32(65536 / (65536 - drop))).astype(x.dtype)
    return jnp.where(draws >= drop, kept, jnp.zeros((), x.dtype))


def attention_kernel(impl: str, dtype: jnp.dtype, device: jax.Device | None = None) -> str:
  """What `T5Config.attention_impl` runs at inference on `device` (default: JAX's first): "auto" resolved.

  "auto" is cuDNN's fused attention on an NVIDIA GPU of compute capability 8.0 or more (Ampere and
  later: cuDNN's flash attention needs it) in bfloat16/float16 (one H200, instructor-large: 740k
  tokens/s against 416k for XLA's kernel on 512-token documents; BENCHMARKS.md), and XLA's
  `dot_product_attention` elsewhere (cuDNN has no float32 kernel; TPUs, CPUs and ROCm have no cuDNN).
  """
  if impl != "auto":
    return impl
  device = device or _default_device()
  half = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
  cudnn = half and device.platform == "gpu" and _compute_capability(device) >= 8.0
  return "cudnn" if cudnn else "dot_product_attention"


def fused_attention_compiles(dtype: jnp.dtype, platform: str) -> bool:
  """False where the fused kernels cannot run: XLA:CPU cannot compile jax.nn.dot_product_attention's
  float16 logits (a float32-result dot), so float16 on a CPU keeps the einsums."""
  return not (jnp.dtype(dtype) == jnp.float16 and platform == "cpu")


def _default_device() -> jax.Device:
  """The device "auto" is resolved for while tracing: the default backend's first."""
  return jax.devices()[0]


def _compute_capability(device: jax.Device) -> float:
  """The CUDA compute capability ("9.0" on Hopper); 0 where the device has none (ROCm, CPU)."""
  try:
    return float(getattr(device, "compute_capability", 0) or 0)
  except (TypeError, ValueError):  # e.g. a ROCm "gfx90a"
    return 0.0


def _fused_attention(q_BLHK: jax.Array, k_BLHK: jax.Array, v_BLHK: jax.Array, bias_1HLL: jax.Array,
                     mask_B1QL: jax.Array, kernel: str, fall_back: bool) -> jax.Array:
  """`jax.nn.dot_product_attention`, through cuDNN where `kernel` says so, else XLA's implementation.

  The [1, H, L, L] position bias and the boolean mask ([B, 1, 1, L] keys, or [B, 1, L, L] for packed
  rows) stay separate: broadcasting them inside the fused softmax avoids materialising (and
  re-reading in every layer) a [B, H, L, L] bias. With `fall_back` ("auto"), a call cuDNN refuses
  while tracing (no cuDNN, too old a version, a shape it lacks a kernel for) runs on XLA's kernel
  instead of failing; an explicit "cudnn" raises.
  """
  if kernel == "cudnn":
    try:
      if mask_B1QL.shape[2] == 1:
        # Padding as key lengths: cuDNN masks it inside the kernel, whereas a boolean mask would be
        # folded into a materialised [B, H, L, L] bias. Filler rows (length 0) attend to one key.
        lengths_B = jnp.maximum(jnp.sum(mask_B1QL[:, 0, 0, :], axis=-1, dtype=jnp.int32), 1)
        return jax.nn.dot_product_attention(q_BLHK, k_BLHK, v_BLHK, bias=bias_1HLL, scale=1.0,
                                            key_value_seq_lengths=lengths_B, implementation="cudnn")
      return jax.nn.dot_product_attention(q_BLHK, k_BLHK, v_BLHK, bias=bias_1HLL, mask=mask_B1QL, scale=1.0,
                                          implementation="cudnn")
    except (RuntimeError, ValueError, NotImplementedError) as e:
      if not fall_back:
        raise
      warnings.warn(f"attention_impl='auto': cuDNN's fused attention refused q {q_BLHK.shape} {q_BLHK.dtype} "
                    f"({type(e).__name__}: {e}); using XLA's dot_product_attention for it. Set "
                    "attention_impl='dot_product_attention' to choose it without this warning.", stacklevel=2)
  return jax.nn.dot_product_attention(q_BLHK, k_BLHK, v_BLHK, bias=bias_1HLL, mask=mask_B1QL, scale=1.0)


class Attention(nn.Module):
  """Multi-head self-attention without 1/sqrt(K) logit scaling (T5 folds it into the init)."""

  config: T5Config

  @nn.compact
  def __call__(self, x_BLD: jax.Array, position_bias_HLL: jax.Array, mask_B1QL: jax.Array,
               segments_BL: jax.Array, deterministic: bool) -> jax.Array:
    """`mask_B1QL` is what each query may see; `segments_BL` the same as ids (0 padding), for kernels."""
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    B, L, _ = x_BLD.shape
    H, K = cfg.num_heads, cfg.d_kv
    # Query init carries the 1/sqrt(K) that T5 never applies to the logits.
    q = Dense(cfg.inner_dim, (EMBED, JOINED_KV), dtype, init_fan_in=cfg.d_model * K, name="query")(x_BLD)
    k = Dense(cfg.inner_dim, (EMBED, JOINED_KV), dtype, name="key")(x_BLD)
    v = Dense(cfg.inner_dim, (EMBED, JOINED_KV), dtype, name="value")(x_BLD)
    q_BLHK, k_BLHK, v_BLHK = (t.reshape(B, L, H, K) for t in (q, k, v))
    # The fused kernels have no attention dropout: they serve inference, and training without it.
    fused = (deterministic or cfg.attention_dropout == 0.0) and fused_attention_compiles(dtype, jax.default_backend())
    if cfg.attention_impl == "tpu_flash" and tpu_attention.applies(L, deterministic, cfg.attention_dropout):
      out_BLHK = tpu_attention.flash_attention_BLHK(q_BLHK, k_BLHK, v_BLHK, position_bias_HLL, segments_BL)
    elif cfg.attention_impl != "xla" and fused:
      # "auto" picks cuDNN at inference only: its fallback covers what cuDNN refuses while tracing the
      # forward pass, not the backward pass, which is traced later. Training asks for "cudnn" by name.
      kernel = (attention_kernel(cfg.attention_impl, dtype) if deterministic
                else "dot_product_attention" if cfg.attention_impl == "auto" else cfg.attention_impl)
      out_BLHK = _fused_attention(q_BLHK, k_BLHK, v_BLHK, position_bias_HLL[None].astype(dtype), mask_B1QL,
                                  kernel, cfg.attention_impl == "auto")
    else:
      logits_BHLL = matmul("bqhk,bmhk->bhqm", q_BLHK, k_BLHK, dtype, jnp.float32)
      # Padding keys get the most negative float32, like the reference, so that fully padded
      # (batch-filler) rows still give finite, uniform weights.
      mask_bias_B1QL = jnp.where(mask_B1QL, 0.0, jnp.finfo(jnp.float32).min)
      weights_BHLL = jax.nn.softmax(logits_BHLL + position_bias_HLL[None] + mask_bias_B1QL, axis=-1)
      weights_BHLL = Dropout(cfg.attention_dropout)(weights_BHLL, deterministic=deterministic)
      out_BLHK = matmul("bhqm,bmhk->bqhk", weights_BHLL, v_BLHK, dtype)
    out_BLI = out_BLHK.reshape(B, L, H * K)
    return Dense(cfg.d_model, (JOINED_KV, EMBED), dtype, result_dtype=residual_dtype(dtype), name="out")(out_BLI)


class MLP(nn.Module):
  """T5 v1.0 ReLU feed-forward (`wi`) or v1.1 gated-GELU (`wi_0` * `wi_1`)."""

  config: T5Config

  @nn.compact
  def __call__(self, x_BLD: jax.Array, deterministic: bool) -> jax.Array:
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    if cfg.feed_forward == "relu":
      h_BLF = jax.nn.relu(Dense(cfg.d_ff, (EMBED, MLP_AXIS), dtype, name="wi")(x_BLD))
    else:
      # tanh-approximated GELU, as HF's "gelu_new" and t5x's gated-gelu.
      gate = jax.nn.gelu(Dense(cfg.d_ff, (EMBED, MLP_AXIS), dtype, name="wi_0")(x_BLD), approximate=True)
      h_BLF = gate * Dense(cfg.d_ff, (EMBED, MLP_AXIS), dtype, name="wi_1")(x_BLD)
    h_BLF = nn.with_logical_constraint(h_BLF, (BATCH, LENGTH, MLP_AXIS))
    h_BLF = Dropout(cfg.dropout_rate)(h_BLF, deterministic=deterministic)
    return Dense(cfg.d_model, (MLP_AXIS, EMBED), dtype, result_dtype=residual_dtype(dtype), name="wo")(h_BLF)


class EncoderLayer(nn.Module):
  config: T5Config

  @nn.compact
  def __call__(self, x_BLD: jax.Array, position_bias_HLL: jax.Array, mask_B1QL: jax.Array,
               segments_BL: jax.Array, deterministic: bool) -> jax.Array:
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    dropout = Dropout(cfg.dropout_rate)
    h = RMSNorm(cfg.layer_norm_epsilon, dtype, name="pre_attention_layer_norm")(x_BLD)
    h = Attention(cfg, name="attention")(h, position_bias_HLL, mask_B1QL, segments_BL, deterministic)
    x_BLD = x_BLD + dropout(h, deterministic=deterministic)
    h = RMSNorm(cfg.layer_norm_epsilon, dtype, name="pre_mlp_layer_norm")(x_BLD)
    h = MLP(cfg, name="mlp")(h, deterministic)
    x_BLD = x_BLD + dropout(h, deterministic=deterministic)
    return nn.with_logical_constraint(x_BLD, (BATCH, LENGTH, EMBED))


_REMAT_POLICIES = {
    "full": None,
    "save_dots": jax.checkpoint_policies.checkpoint_dots,
    "save_dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class RelativePositionBias(nn.Module):
  """Learned per-head bias over bidirectional relative-position buckets."""

  config: T5Config

  @nn.compact
  def __call__(self, length: int) -> jax.Array:
    cfg = self.config
    rel_embedding_HN = self.param(
        "rel_embedding", nn.with_logical_partitioning(nn.initializers.normal(1.0), (HEADS, RELPOS)),
        (cfg.num_heads, cfg.relative_attention_num_buckets), jnp.float32)
    buckets_LL = relative_position_buckets(
        length, cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance)
    return jnp.take(rel_embedding_HN, jnp.asarray(buckets_LL), axis=1)


class Encoder(nn.Module):
  """Encoder stack: one relative-position bias table, computed once and shared by all layers."""

  config: T5Config

  @nn.compact
  def __call__(self, embedded_BLD: jax.Array, mask_BL: jax.Array, deterministic: bool,
               segments_BL: jax.Array | None = None) -> jax.Array:
    """`segments_BL` (packed rows: 1, 2, ... per text, 0 for padding) restricts attention to each text.

    Texts in a packed row are contiguous, so the key-minus-query offsets inside a text, and hence
    its relative-position buckets, are exactly those of the text alone: packing changes nothing
    but the padding.
    """
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    position_bias_HLL = RelativePositionBias(cfg, name="relpos_bias")(embedded_BLD.shape[1])
    if segments_BL is None:
      mask_B1QL = mask_BL.astype(bool)[:, None, None, :]
      segments_BL = mask_BL.astype(jnp.int32)  # one segment per row, padding 0
    else:
      mask_B1QL = ((segments_BL[:, :, None] == segments_BL[:, None, :]) & (segments_BL[:, None, :] > 0))[:, None]
    x = Dropout(cfg.dropout_rate)(embedded_BLD, deterministic=deterministic)
    if cfg.scan_layers and not self.is_initializing():
      x = self._scanned_layers(x, position_bias_HLL, mask_B1QL, segments_BL, deterministic)
    else:
      layer_cls = EncoderLayer
      if cfg.remat_policy != "none":
        # static_argnums counts `self` as 0: (self, x, position_bias, mask, segments, deterministic).
        layer_cls = nn.remat(EncoderLayer, policy=_REMAT_POLICIES[cfg.remat_policy], static_argnums=(5,))
      for i in range(cfg.num_layers):
        x = layer_cls(cfg, name=f"layers_{i}")(x, position_bias_HLL, mask_B1QL, segments_BL, deterministic)
    x = RMSNorm(cfg.layer_norm_epsilon, dtype, name="encoder_norm")(x)
    return Dropout(cfg.dropout_rate)(x, deterministic=deterministic)


  def _scanned_layers(self, x_BLD: jax.Array, position_bias_HLL: jax.Array, mask_B1QL: jax.Array,
                      segments_BL: jax.Array, deterministic: bool) -> jax.Array:
    """The layers as one `lax.scan` over their parameters, stacked here from the per-layer
    `layers_i` trees (the checkpoint layout stays per layer; the stack is a copy of the layers'
    float32 weights per step).

    Unrolled, XLA may schedule several layers' rematerialisation at once, or hoist it altogether
    (XLA:CPU does: its full-remat step keeps what the plain step keeps); in a scan the backward pass
    recomputes one layer per iteration. The program is also one layer long, so it compiles in a
    fraction of the time. Layer i's dropout key is the encoder's folded with i, so the masks differ
    from the unrolled layers' (same rate, other draws); without dropout the two agree to float rounding.
    """
    cfg = self.config
    params = nn.unbox(self.variables["params"])
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[params[f"layers_{i}"] for i in range(cfg.num_layers)])
    layer = EncoderLayer(cfg, parent=None)  # a free module, applied to each layer's parameters
    dropout_key = (None if deterministic or max(cfg.dropout_rate, cfg.attention_dropout) == 0.0
                   else self.make_rng("dropout"))

    def body(x, xs):
      p, i = xs
      rngs = {} if dropout_key is None else {"dropout": jax.random.fold_in(dropout_key, i)}
      return layer.apply({"params": p}, x, position_bias_HLL, mask_B1QL, segments_BL, deterministic, rngs=rngs), None

    if cfg.remat_policy != "none":
      body = jax.checkpoint(body, policy=_REMAT_POLICIES[cfg.remat_policy], prevent_cse=False)
    x_BLD, _ = jax.lax.scan(body, x_BLD, (stacked, jnp.arange(cfg.num_layers)))
    return x_BLD


class Embedder(nn.Module):
  """Token embedding table; no sqrt(D) scaling of embeddings in T5."""

  config: T5Config

  @nn.compact
  def __call__(self, ids_BL: jax.Array) -> jax.Array:
    cfg = self.config
    embedding_VD = self.param(
        "embedding", nn.with_logical_partitioning(nn.initializers.normal(1.0), (VOCAB, EMBED)),
        (cfg.vocab_size, cfg.d_model), jnp.float32)
    # Rounded to the compute dtype first (as a float16/bf16 checkpoint stores it), then widened to
    # the residual stream's dtype (float32 under float16).
    return jnp.take(embedding_VD, ids_BL, axis=0).astype(jnp.dtype(cfg.dtype)).astype(residual_dtype(cfg.dtype))


class T5Encoder(nn.Module):
  """Token ids [B, L] + attention mask [B, L] -> final hidden states [B, L, D] (compute dtype)."""

  config: T5Config

  @nn.compact
  def __call__(self, ids_BL: jax.Array, mask_BL: jax.Array, deterministic: bool = True) -> jax.Array:
    x_BLD = Embedder(self.config, name="token_embedder")(ids_BL)
    x_BLD = nn.with_logical_constraint(x_BLD, (BATCH, LENGTH, EMBED))
    return Encoder(self.config, name="encoder")(x_BLD, mask_BL, deterministic)
