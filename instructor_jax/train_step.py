"""The train state, its sharded creation, and the jitted contrastive train step (plain or GradCache).

Shape key: B global batch, L length, E embedding dim, C GradCache chunks, R roles per pass; packed
batches: N rows, S text slots per row, K batch shards (blocks), M slots and T texts per block.

The step is one pure function `(state, batch) -> (state, metrics)`, jitted once with explicit
in/out shardings and the state donated. The loss is computed on *global* embeddings: XLA
all-gathers them, so every query sees the hard negatives of every device.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from instructor_jax import sharding as shd
from instructor_jax.config import InstructorConfig
from instructor_jax.losses import get_loss
from instructor_jax.medi_packing import PACKED_KEYS
from instructor_jax.model import InstructorModel

ROLES = ("query", "pos", "neg")
FIELDS = ("ids", "mask", "n_instr")
BATCH_KEYS = tuple(f"{r}_{f}" for r in ROLES for f in FIELDS)

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: the number of updates applied
  params: Any
  opt_state: Any


def _init_params_fn(config: InstructorConfig) -> Callable[[jax.Array], Any]:
  """rng -> boxed (logically partitioned) parameter tree; shapes do not depend on the dummy input."""
  def init(rng):
    ids = jnp.ones((1, 4), jnp.int32)
    return InstructorModel(config).init(rng, ids, ids, jnp.zeros((1,), jnp.int32))["params"]
  return init


def state_shardings(config: InstructorConfig, tx: optax.GradientTransformation, mesh: Mesh) -> TrainState:
  """NamedShardings of every state leaf, from the parameters' logical axis names (no allocation)."""
  boxed = jax.eval_shape(_init_params_fn(config), jax.random.key(0))
  param_sh = shd.boxed_shardings(boxed, mesh)
  abstract_params = nn.unbox(boxed)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  rep = shd.replicated(mesh)
  # Moments shaped like their parameter share its sharding; factored (Adafactor) statistics are
  # small vectors and stay replicated.
  opt_sh = optax.tree_map_params(
      tx, lambda s, p, sh: sh if getattr(s, "shape", None) == p.shape else rep,
      abstract_opt, abstract_params, param_sh, transform_non_params=lambda _: rep)
  return TrainState(step=rep, params=param_sh, opt_state=opt_sh)


def sharding_warning(config: InstructorConfig, mesh: Mesh, min_bytes: int = 1 << 20) -> str | None:
  """A warning naming the parameters the mesh cannot split as the rules ask (None when all fit).

  The run still works, but those parameters and their optimizer moments are replicated along the
  axis that does not divide them, which can take many times the memory the mesh was chosen for.
  """
  boxed = jax.eval_shape(_init_params_fn(config), jax.random.key(0))
  fallbacks = [f for f in shd.sharding_fallbacks(boxed, mesh) if f[2] / f[3] >= min_bytes]
  if not fallbacks:
    return None
  got = sum(nbytes / n for _, _, nbytes, n, _ in fallbacks)
  wanted = sum(nbytes / n for _, _, nbytes, _, n in fallbacks)
  listed = "; ".join(f"{name} {list(shape)} over {n} device(s), not {w}" for name, shape, _, n, w in fallbacks[:4])
  enc = config.encoder
  data, fsdp, tensor = (mesh.shape[a] for a in shd.MESH_AXES)
  advice = (f"Sizes that fit: fsdp divides d_model {enc.d_model}, tensor divides the heads ({enc.num_heads}) and "
            f"d_ff ({enc.d_ff}), fsdp x tensor divides the vocabulary ({enc.vocab_size})")
  # The largest fsdp size within this one that fits, the devices it frees going to data.
  fits = max((f for f in range(1, fsdp + 1)
              if fsdp % f == 0 and enc.d_model % f == 0 and enc.vocab_size % (f * tensor) == 0), default=1)
  if fits != fsdp:
    advice += f"; here e.g. MeshConfig.data={data * fsdp // fits}, MeshConfig.fsdp={fits}"
  return (f"warning: the mesh {dict(mesh.shape)} cannot split {len(fallbacks)} parameter(s) as the sharding rules "
          f"ask, because its fsdp/tensor sizes do not divide their dimensions: {_size(got)} of parameters per "
          f"device instead of {_size(wanted)}, and optimizer moments like them on top. Largest: {listed}. "
          f"{advice}.")


def _size(nbytes: float) -> str:
  return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def abstract_state(config: InstructorConfig, tx: optax.GradientTransformation, mesh: Mesh) -> TrainState:
  """ShapeDtypeStructs with shardings for the whole state: the restore target for orbax."""
  shardings = state_shardings(config, tx, mesh)
  shapes = jax.eval_shape(lambda r: _new_state(nn.unbox(_init_params_fn(config)(r)), tx), jax.random.key(0))
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def _new_state(params: Any, tx: optax.GradientTransformation) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def init_state(config: InstructorConfig, tx: optax.GradientTransformation, mesh: Mesh,
               seed: int = 0, params: Any = None) -> TrainState:
  """A sharded train state: random init from `seed`, or from `params` (host or device arrays)."""
  shardings = state_shardings(config, tx, mesh)
  if params is None:
    init = lambda rng: _new_state(nn.unbox(_init_params_fn(config)(rng)), tx)
    return jax.jit(init, out_shardings=shardings)(jax.random.key(seed))
  _check_params(params, config)
  # Each host copies only its own shards out of the host arrays (multi-process safe); nothing
  # full-size is materialised on one device.
  params = jax.tree.map(
      lambda x, sh: jax.device_put(x, sh) if isinstance(x, jax.Array)
      else jax.make_array_from_callback(np.shape(x), sh, lambda idx, x=x: np.asarray(x)[idx]),
      params, shardings.params)
  # Master weights are float32 whatever the source stored (fp16/bf16 exports).
  to_fp32 = lambda p: _new_state(jax.tree.map(lambda x: x.astype(jnp.float32), p), tx)
  return jax.jit(to_fp32, in_shardings=(shardings.params,), out_shardings=shardings, donate_argnums=(0,))(params)


def _check_params(params: Any, config: InstructorConfig) -> None:
  """Initial parameters must have the model's names and shapes; says which differ."""
  expected = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(
      nn.unbox(jax.eval_shape(_init_params_fn(config), jax.random.key(0))))}
  got = {jax.tree_util.keystr(k): tuple(np.shape(v)) for k, v in jax.tree_util.tree_leaves_with_path(params)}
  missing, extra = sorted(expected.keys() - got.keys()), sorted(got.keys() - expected.keys())
  wrong = [f"{k}: {got[k]} != {expected[k]}" for k in sorted(expected.keys() & got.keys()) if got[k] != expected[k]]
  if missing or extra or wrong:
    raise ValueError(f"initial parameters do not fit the model config: missing {missing[:5]}, unexpected "
                     f"{extra[:5]}, wrong shapes {wrong[:5]}. Check INIT_CHECKPOINT and its config.")


def batch_shardings(mesh: Mesh, packed: bool = False) -> dict[str, NamedSharding]:
  """Rows over the batch axes: of the unpacked batch's keys, or of the packed one's (medi_packing)."""
  if packed:
    return {k: shd.batch_sharding(mesh, 2) for k in PACKED_KEYS}
  return {k: shd.batch_sharding(mesh, 1 if k.endswith("n_instr") else 2) for k in BATCH_KEYS}


def embed_triples(model: InstructorModel, params: Any, batch: Batch, rng: jax.Array,
                  deterministic: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Query, positive and negative embeddings [B, E], one encoder pass per distinct length.

  Roles of equal length are interleaved row-wise ([B, R, L] -> [B*R, L]) rather than
  concatenated, so each device's rows stay on that device. With query_len == doc_len (the
  paper's 512/512) this is one pass over 3B rows; with shorter queries the queries run as a
  second pass at their own length instead of being padded to doc_len, because a padded query
  costs a full doc_len row of matmuls and a doc_len^2 attention.
  """
  by_length: dict[int, list[str]] = {}
  for role in ROLES:
    by_length.setdefault(batch[f"{role}_ids"].shape[1], []).append(role)
  out = {}
  for i, (length, roles) in enumerate(sorted(by_length.items())):
    def interleave(field):
      x = jnp.stack([batch[f"{r}_{field}"] for r in roles], axis=1)
      return x.reshape((-1,) + x.shape[2:])
    ids_NL, mask_NL, n_instr_N = (interleave(f) for f in FIELDS)
    emb_NE = model.apply({"params": params}, ids_NL, mask_NL, n_instr_N, deterministic=deterministic,
                         rngs=None if deterministic else {"dropout": jax.random.fold_in(rng, i)})
    emb_BRE = emb_NE.reshape(-1, len(roles), emb_NE.shape[-1])
    for j, role in enumerate(roles):
      out[role] = emb_BRE[:, j]
  return out["query"], out["pos"], out["neg"]


def embed_packed_triples(model: InstructorModel, params: Any, batch: Batch, rng: jax.Array, deterministic: bool,
                         shards: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Query, positive and negative embeddings [B, E] of a packed batch (medi_packing's layout): one
  encoder pass over the packed rows, pooled per text slot, then each triple's three slots gathered
  from its own block of rows."""
  segments_NL = batch["packed_segments"]
  emb_NSE = model.apply({"params": params}, batch["packed_ids"], (segments_NL > 0).astype(jnp.int32),
                        batch["packed_n_instr"], deterministic=deterministic, segments_BL=segments_NL,
                        offsets_BL=batch["packed_offsets"], rngs=None if deterministic else {"dropout": rng})
  rows, slots, dim = emb_NSE.shape
  triples = batch["text_slots"].shape[0]
  # text_slots count within the block's own rows: block k of the triples owns block k of the rows.
  # Gathered block by block, each block on the devices of its shard: a gather over the flattened
  # rows would all-gather every slot's embedding (and all-reduce its gradient) across the devices.
  block = P(shd.BATCH_AXES, None, None)
  emb_KME = jax.lax.with_sharding_constraint(emb_NSE.reshape(shards, rows // shards * slots, dim), block)
  slots_KT1 = jax.lax.with_sharding_constraint(batch["text_slots"].reshape(shards, triples // shards * 3, 1), block)
  emb_B3E = jnp.take_along_axis(emb_KME, slots_KT1, axis=1).reshape(triples, 3, dim)
  return emb_B3E[:, 0], emb_B3E[:, 1], emb_B3E[:, 2]


def _split_rows(x: jax.Array, chunks: int) -> jax.Array:
  """[B, ...] -> [C, B/C, ...] with row a*C + c in chunk c, so every chunk spans every device."""
  y = x.reshape((x.shape[0] // chunks, chunks) + x.shape[1:])
  y = jnp.swapaxes(y, 0, 1)
  return jax.lax.with_sharding_constraint(y, P(None, shd.BATCH_AXES, *([None] * (x.ndim - 1))))


def _merge_rows(y: jax.Array) -> jax.Array:
  """Inverse of _split_rows."""
  x = jnp.swapaxes(y, 0, 1)
  return x.reshape((-1,) + x.shape[2:])


def grad_cache_grads(embed: Callable, loss_fn: Callable, params: Any, batch: Batch, rng: jax.Array,
                     chunks: int) -> tuple[tuple[jax.Array, Metrics], Any]:
  """((loss, metrics), d loss / d params) with activations held for one chunk of rows at a time.

  GradCache (Gao et al., 2021): embed the whole global batch without gradients, take d loss /
  d embedding over the full batch (so every negative still counts), then re-run each chunk with
  gradients and pull those embedding gradients back through it. Chunk c uses the same dropout
  rng in both passes, so the result is the exact gradient of the loss. (Micro-batch gradient
  accumulation would instead shrink the negative pool to one micro-batch.)
  """
  split = {k: _split_rows(v, chunks) for k, v in batch.items()}
  chunk_ids = jnp.arange(chunks)

  def embed_chunk(p, chunk, c):
    return embed(p, chunk, jax.random.fold_in(rng, c))

  frozen = jax.lax.stop_gradient(params)
  embs_CBE = jax.lax.map(lambda xs: embed_chunk(frozen, *xs), (split, chunk_ids))
  embs = tuple(_merge_rows(e) for e in embs_CBE)
  (loss, metrics), emb_grads = jax.value_and_grad(lambda e: loss_fn(*e), has_aux=True)(embs)
  grads_CBE = tuple(_split_rows(g, chunks) for g in emb_grads)

  def accumulate(total, xs):
    chunk, c, cotangent = xs
    _, pullback = jax.vjp(lambda p: embed_chunk(p, chunk, c), params)
    return jax.tree.map(jnp.add, total, pullback(cotangent)[0]), None

  zeros = jax.tree.map(jnp.zeros_like, params)
  grads, _ = jax.lax.scan(accumulate, zeros, (split, chunk_ids, grads_CBE))
  return (loss, metrics), grads


def make_train_step(config: InstructorConfig, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    mesh: Mesh, *, loss: str = "instructor", temperature: float = 0.01,
                    grad_cache_chunks: int = 1, seed: int = 0, deterministic: bool = False,
                    compiler_options: dict[str, Any] | None = None, packed: bool = False,
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
  """The jitted step; `grad_cache_chunks > 1` switches on GradCache with that many chunks.

  `compiler_options` go to XLA for this step only (xla_options.train_compiler_options()).
  `packed`: batches in medi_packing's layout (TrainConfig.pack_length), packed for
  `grad_cache_chunks` (medi_packing.make_packed_batch(chunks=...)).
  """
  if config.encoder.attention_impl == "auto":
    # "auto" may pick cuDNN for a deterministic forward pass, and its fallback would not cover the
    # backward pass (traced later); training asks for cuDNN by name.
    config = config.with_encoder(attention_impl="dot_product_attention")
  model = InstructorModel(config)
  loss_fn = functools.partial(get_loss(loss), temperature=temperature)
  shards = shd.batch_size_multiple(mesh)
  embed = (functools.partial(embed_packed_triples, model, deterministic=deterministic, shards=shards) if packed
           else functools.partial(embed_triples, model, deterministic=deterministic))

  def plain(params, batch, rng):
    return loss_fn(*embed(params, batch, rng))

  def step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    batch_size = batch["text_slots" if packed else "query_ids"].shape[0]
    if packed and batch["packed_ids"].shape[0] % (shards * grad_cache_chunks):
      raise ValueError(f"{batch['packed_ids'].shape[0]} packed rows do not split over the {shards} batch shards x "
                       f"{grad_cache_chunks} GradCache chunks: pack with medi_packing.make_packed_batch(chunks=...).")
    if batch_size % (shards * grad_cache_chunks):
      raise ValueError(f"global batch {batch_size} must be a multiple of data*fsdp ({shards}) x "
                       f"grad_cache_chunks ({grad_cache_chunks}); change BATCH_SIZE or the mesh.")
    rng = jax.random.fold_in(jax.random.key(seed), state.step)
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(shd.LOGICAL_RULES):
      if grad_cache_chunks > 1:
        (loss_value, metrics), grads = grad_cache_grads(embed, loss_fn, state.params, batch, rng, grad_cache_chunks)
      else:
        (loss_value, metrics), grads = jax.value_and_grad(plain, has_aux=True)(state.params, batch, rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, loss=loss_value, grad_norm=global_norm(grads), param_norm=global_norm(params),
                   lr=schedule(state.step), real_tokens=real_tokens(batch))
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  state_sh = state_shardings(config, tx, mesh)
  return jax.jit(step, in_shardings=(state_sh, batch_shardings(mesh, packed)),
                 out_shardings=(state_sh, shd.replicated(mesh)), donate_argnums=(0,),
                 compiler_options=compiler_options or None)


def real_tokens(batch: Batch) -> jax.Array:
  """Text tokens (not padding) in the batch, packed or not."""
  if "packed_segments" in batch:
    return jnp.sum(batch["packed_segments"] > 0)
  return sum(jnp.sum(batch[f"{r}_mask"]) for r in ROLES)


def global_norm(tree: Any) -> jax.Array:
  """L2 norm over all leaves, in float32."""
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def num_params(params: Any) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
