"""Model configurations: frozen dataclasses, presets for the released GTR/INSTRUCTOR sizes."""

from __future__ import annotations

import dataclasses
import numbers
from typing import Optional

FEED_FORWARD_KINDS = ("relu", "gated-gelu")
REMAT_POLICIES = ("none", "full", "save_dots", "save_dots_no_batch")
ATTENTION_IMPLS = ("auto", "xla", "dot_product_attention", "cudnn", "tpu_flash")
# Compute dtypes users may name, and what each name means.
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


class ConfigError(ValueError):
  """A setting (or combination) that cannot run; the message names it, what was expected and what to do.
  The command-line tools print it in one line, without a traceback."""


class MissingPathError(ConfigError, FileNotFoundError):
  """A configured path that does not exist (a gin file, MEDI_PATH, INIT_CHECKPOINT, eval_sts_path)."""


def canonical_dtype(dtype: str) -> str:
  """The compute dtype a name means ("bf16" -> "bfloat16")."""
  if str(dtype) not in DTYPES:
    raise ConfigError(f"dtype={dtype!r}; expected one of {sorted(set(DTYPES.values()))}.")
  return DTYPES[str(dtype)]


@dataclasses.dataclass(frozen=True)
class T5Config:
  """The T5 encoder stack; defaults are gtr-base (T5 v1.0)."""

  vocab_size: int = 32128
  d_model: int = 768
  num_heads: int = 12
  d_kv: int = 64
  d_ff: int = 3072
  num_layers: int = 12
  # "relu" is T5 v1.0 (GTR, INSTRUCTOR); "gated-gelu" is T5 v1.1 (sentence-t5 and many fine-tunes).
  feed_forward: str = "relu"
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  dropout_rate: float = 0.1
  # The rate for the attention weights; None: dropout_rate, as T5, GTR and INSTRUCTOR train (Hugging
  # Face's T5 drops the softmax weights at the model's one rate). 0 with dropout_rate > 0 keeps the
  # other dropouts and lets training run attention on a fused kernel (cuDNN's, XLA's, the TPU flash
  # kernel), which have no attention dropout: another recipe than INSTRUCTOR's, chosen for speed.
  attention_dropout_rate: Optional[float] = None
  # Compute dtype; parameters are always stored in float32.
  dtype: str = "float32"
  remat_policy: str = "none"
  # "auto" (default): at inference "cudnn" on a GPU of compute capability >= 8.0 in bfloat16/float16, falling back to
  # "dot_product_attention" where cuDNN refuses a call, and "dot_product_attention" elsewhere
  # (t5.attention_kernel); in training without attention dropout "dot_product_attention".
  # "dot_product_attention": jax.nn.dot_product_attention, XLA's implementation, at inference and
  # in training without attention dropout (on CPU XLA keeps its logits matmul a library call, 1.15x faster
  # than the einsums at 512 tokens). "xla": explicit einsums everywhere. Training with attention
  # dropout always uses the einsums (the fused kernels have none; see attention_dropout_rate). "cudnn": the same call
  # with implementation="cudnn" (cuDNN flash attention, forward and backward; GPU, bf16/fp16 only;
  # JAX never picks it by itself; an error where cuDNN refuses). It takes the padding as per-row key
  # lengths, so masks must be trailing padding, as every batch built by this package is. "tpu_flash": the Pallas TPU
  # flash-attention kernel, bias and segment ids inside it, at inference and in training without
  # attention dropout, where the length is a multiple of 128 (tpu_attention.py); other lengths, and
  # training with attention dropout, use the paths above.
  attention_impl: str = "auto"
  # Run the layers as one lax.scan over their stacked parameters (t5.Encoder._scanned_layers):
  # remat then recomputes one layer at a time, and the program compiles once per layer, not per
  # stack. A compute option like remat_policy: the parameter layout and checkpoints are unchanged.
  scan_layers: bool = False

  def __post_init__(self):
    if self.feed_forward not in FEED_FORWARD_KINDS:
      raise ConfigError(f"T5Config.feed_forward={self.feed_forward!r}; expected one of {FEED_FORWARD_KINDS}.")
    if self.remat_policy not in REMAT_POLICIES:
      raise ConfigError(f"T5Config.remat_policy={self.remat_policy!r}; expected one of {REMAT_POLICIES}.")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ConfigError(f"T5Config.attention_impl={self.attention_impl!r}; expected one of {ATTENTION_IMPLS}.")
    for name in ("dropout_rate", "attention_dropout_rate"):
      rate = getattr(self, name)
      if not ((rate is None and name == "attention_dropout_rate") or
              (isinstance(rate, numbers.Real) and not isinstance(rate, bool) and 0 <= rate < 1)):
        raise ConfigError(f"T5Config.{name}={rate!r}; expected a number with 0 <= rate < 1"
                          + (", or None for dropout_rate." if name == "attention_dropout_rate" else "."))
    for name in ("vocab_size", "d_model", "num_heads", "d_kv", "d_ff", "num_layers"):
      if not getattr(self, name) >= 1:
        raise ConfigError(f"T5Config.{name}={getattr(self, name)!r}; expected an integer >= 1.")
    if self.relative_attention_num_buckets < 4 or self.relative_attention_num_buckets % 2:
      raise ConfigError("T5Config.relative_attention_num_buckets must be even and >= 4 "
                        f"(bidirectional buckets), got {self.relative_attention_num_buckets}.")
    # Distances below num_buckets // 4 get a bucket each; the rest are spread logarithmically up to
    # max_distance, which must therefore lie beyond them (T5 uses 128).
    if not self.relative_attention_max_distance > self.relative_attention_num_buckets // 4:
      raise ConfigError(f"T5Config.relative_attention_max_distance={self.relative_attention_max_distance}; expected "
                        f"> {self.relative_attention_num_buckets // 4} (num_buckets / 4) for "
                        f"{self.relative_attention_num_buckets} buckets. T5, GTR and INSTRUCTOR use 128.")

  @property
  def attention_dropout(self) -> float:
    """The rate the attention weights are dropped at (attention_dropout_rate, else dropout_rate)."""
    return self.dropout_rate if self.attention_dropout_rate is None else self.attention_dropout_rate

  @property
  def inner_dim(self) -> int:
    """Width of the joined q/k/v projections; differs from d_model for gtr-xl/xxl."""
    return self.num_heads * self.d_kv


@dataclasses.dataclass(frozen=True)
class InstructorConfig:
  """INSTRUCTOR: T5 encoder -> instruction-masked mean pooling -> projection -> L2 norm."""

  encoder: T5Config = T5Config()
  # None means no projection layer (embedding dim = d_model).
  projection_dim: Optional[int] = 768
  max_seq_length: int = 512
  normalize: bool = True

  def __post_init__(self):
    if not self.max_seq_length >= 2:
      raise ConfigError(f"max_seq_length={self.max_seq_length!r}; expected >= 2 (at least one token and </s>).")
    if self.projection_dim is not None and not self.projection_dim >= 1:
      raise ConfigError(f"projection_dim={self.projection_dim!r}; expected an integer >= 1, or None for no projection.")

  @property
  def embedding_dim(self) -> int:
    return self.projection_dim if self.projection_dim is not None else self.encoder.d_model

  def replace(self, **kwargs) -> "InstructorConfig":
    return dataclasses.replace(self, **kwargs)

  def with_encoder(self, **kwargs) -> "InstructorConfig":
    return dataclasses.replace(self, encoder=dataclasses.replace(self.encoder, **kwargs))


PRESETS = {
    "gtr-base": InstructorConfig(T5Config(d_model=768, num_heads=12, d_kv=64, d_ff=3072, num_layers=12)),
    "gtr-large": InstructorConfig(T5Config(d_model=1024, num_heads=16, d_kv=64, d_ff=4096, num_layers=24)),
    "gtr-xl": InstructorConfig(T5Config(d_model=1024, num_heads=32, d_kv=128, d_ff=16384, num_layers=24)),
    "gtr-xxl": InstructorConfig(T5Config(d_model=1024, num_heads=128, d_kv=128, d_ff=65536, num_layers=24)),
    # Small enough for CPU tests; heads*d_kv != d_model on purpose, like gtr-xl/xxl.
    "tiny": InstructorConfig(T5Config(d_model=32, num_heads=4, d_kv=16, d_ff=64, num_layers=2), projection_dim=24),
}


def preset(name: str) -> InstructorConfig:
  """Returns the preset called `name` (gtr-base, gtr-large, gtr-xl, gtr-xxl, tiny)."""
  key = name.replace("_", "-").lower()
  if key not in PRESETS:
    raise ConfigError(f"Unknown model preset {name!r}; expected one of {sorted(PRESETS)}.")
  return PRESETS[key]
