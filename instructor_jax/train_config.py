"""`TrainConfig`: one training run's settings, checked by field name when built (gin passes raw values)."""

from __future__ import annotations

import dataclasses
import numbers
from typing import Optional

from instructor_jax.config import ATTENTION_IMPLS, REMAT_POLICIES, ConfigError
from instructor_jax.losses import LOSSES

# float16 is left out: T5 activations can overflow it (t5x trains T5 in bfloat16).
TRAIN_DTYPES = ("bfloat16", "float32")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """One training run; bound by gin (`TrainConfig.batch_size = %BATCH_SIZE`)."""

  medi_path: Optional[str] = None  # MEDI .json/.jsonl, or the TFDS manual dir holding one
  model: str = "gtr-large"  # preset used for a random init (the architecture otherwise comes from the checkpoint)
  init_checkpoint: Optional[str] = None  # Hub id, HF/sentence-transformers dir, t5x or orbax checkpoint
  train_steps: int = 20_000
  batch_size: int = 4  # global: all hosts, all devices
  query_len: int = 512
  doc_len: int = 512
  # Each step pads its queries / documents only to the smallest of these lengths that holds the
  # global batch's longest one (query_len / doc_len when none does; always for the first step, so that a
  # batch too large for memory fails at once): a fraction of the compute on short texts, one
  # compiled step per length pair met. Without dropout the loss is that of full padding up to float
  # rounding; with dropout the masks, drawn per padded shape, differ. (): always pad to
  # query_len / doc_len.
  length_buckets: tuple[int, ...] = (64, 128, 256, 384)
  # > 0: pack each global batch's texts several to a row of this many tokens (>= query_len and
  # doc_len; medi_packing) instead of padding them to buckets, which are then unused. On the MEDI
  # sample at 256 triples: 88% of positions are text at 512, against 39% with buckets (BENCHMARKS.md).
  # One compiled step per row count met (rounded up by eighths).
  pack_length: int = 0
  loss: str = "instructor"  # or "gtr"
  temperature: float = 0.01
  dtype: str = "bfloat16"  # compute dtype; parameters and optimizer state stay float32
  remat_policy: str = "none"  # none | full | save_dots | save_dots_no_batch
  # The layers as one lax.scan (T5Config.scan_layers): remat recomputes one layer at a time, and the
  # step compiles in a fraction of the time; the dropout masks are other draws than unrolled layers'.
  scan_layers: bool = False
  dropout_rate: float = 0.1
  # None: the attention weights are dropped at dropout_rate too (INSTRUCTOR's recipe). 0: they are
  # not, the other dropouts stay, and attention may run on a fused kernel in training
  # (attention_impl "cudnn", "dot_product_attention" or "tpu_flash"; T5Config.attention_dropout_rate).
  attention_dropout_rate: Optional[float] = None
  attention_impl: str = "xla"
  grad_cache_chunks: int = 1  # > 1: GradCache with this many chunks (same gradients, less memory)
  seed: int = 0  # parameter init and dropout
  data_seed: int = 0
  mixing_temperature: float = 1.0  # MEDI task rates proportional to min(n, rate_cap) ** (1 / T)
  rate_cap: Optional[int] = None
  # STS file (SemEval TSV or SICK; local or gs://) scored at every checkpoint: metrics.jsonl's
  # eval_sts_spearman / eval_sts_pearson (train_eval.py). None: no evaluation.
  eval_sts_path: Optional[str] = None
  eval_instruction: str = "Represent the sentence for semantic similarity: "
  checkpoint_every: int = 1000
  keep_checkpoints: Optional[int] = 3
  async_checkpointing: bool = True
  log_every: int = 10
  stop_after_steps: Optional[int] = None  # end this run (with a checkpoint) after this many of its steps
  # XLA compiler options for the step, over the per-backend defaults (GPU: latency-hiding scheduler).
  xla_options: Optional[dict] = None

  def __post_init__(self):
    # Gin passes whatever was written ('16' in quotes is a string): check types here, by field name,
    # rather than fail later deep inside JAX.
    for name in ("train_steps", "batch_size", "query_len", "doc_len", "grad_cache_chunks", "checkpoint_every",
                 "log_every", "keep_checkpoints", "stop_after_steps", "seed", "data_seed", "rate_cap", "pack_length"):
      value = getattr(self, name)
      optional = name in ("keep_checkpoints", "stop_after_steps", "rate_cap")
      # Seeds feed unsigned integer RNGs; a length holds at least one token and </s>.
      least = 0 if name in ("seed", "data_seed", "pack_length") else 2 if name in ("query_len", "doc_len") else 1
      if (value is None and optional) or (_is_integer(value) and value >= least):
        continue
      kind = f"an integer >= {least}" + (" or None" if optional else "")
      raise ConfigError(f"TrainConfig.{name}={value!r}; expected {kind}.")
    for name in ("temperature", "dropout_rate", "mixing_temperature"):
      if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), numbers.Real):
        raise ConfigError(f"TrainConfig.{name}={getattr(self, name)!r}; expected a number.")
    if not self.mixing_temperature > 0:
      raise ConfigError(f"TrainConfig.mixing_temperature={self.mixing_temperature}; expected > 0 (1 samples MEDI "
                        "tasks in proportion to their size).")
    if not self.temperature > 0:
      raise ConfigError(f"TrainConfig.temperature={self.temperature}; expected > 0 (INSTRUCTOR uses 0.01).")
    if not 0 <= self.dropout_rate < 1:
      raise ConfigError(f"TrainConfig.dropout_rate={self.dropout_rate}; expected 0 <= rate < 1 (GTR uses 0.1).")
    rate = self.attention_dropout_rate
    if rate is not None and (isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0 <= rate < 1):
      raise ConfigError(f"TrainConfig.attention_dropout_rate={rate!r}; expected None (dropout_rate) or a number "
                        "with 0 <= rate < 1 (0 lets attention run on a fused kernel in training).")
    if self.loss not in LOSSES:
      raise ConfigError(f"TrainConfig.loss={self.loss!r}; expected one of {sorted(LOSSES)}.")
    if self.dtype not in TRAIN_DTYPES:
      raise ConfigError(f"TrainConfig.dtype={self.dtype!r}; expected one of {TRAIN_DTYPES} (the compute dtype; "
                        "parameters and optimizer state stay float32).")
    if not isinstance(self.scan_layers, bool):
      raise ConfigError(f"TrainConfig.scan_layers={self.scan_layers!r}; expected True or False.")
    for name, allowed in (("remat_policy", REMAT_POLICIES), ("attention_impl", ATTENTION_IMPLS)):
      if getattr(self, name) not in allowed:
        raise ConfigError(f"TrainConfig.{name}={getattr(self, name)!r}; expected one of {allowed}.")
    if (not isinstance(self.length_buckets, (tuple, list))
        or not all(_is_integer(b) and b >= 2 for b in self.length_buckets)):
      raise ConfigError(f"TrainConfig.length_buckets={self.length_buckets!r}; expected a tuple of integers >= 2 "
                        "(e.g. (64, 128, 256)), or () to pad every batch to query_len / doc_len.")
    object.__setattr__(self, "length_buckets", tuple(sorted(set(int(b) for b in self.length_buckets))))
    if self.attention_impl == "tpu_flash" and any(b % 128 for b in self.length_buckets
                                                  if b < max(self.query_len, self.doc_len)):
      raise ConfigError(f"TrainConfig.attention_impl='tpu_flash' needs length_buckets that are multiples of 128 (its "
                        f"key blocks); got {self.length_buckets}. Use e.g. (128, 256, 384), or ().")
    if self.attention_impl == "tpu_flash" and (self.attention_dropout or self.query_len % 128 or self.doc_len % 128):
      # Otherwise the step would silently never use the kernel.
      raise ConfigError(f"TrainConfig.attention_impl='tpu_flash' needs no attention dropout (the kernel has none: "
                        f"attention_dropout_rate = 0, or dropout_rate = 0) and query_len/doc_len multiples of 128 "
                        f"(its key blocks); got attention dropout {self.attention_dropout}, query_len "
                        f"{self.query_len}, doc_len {self.doc_len}.")
    if self.pack_length and self.pack_length < max(self.query_len, self.doc_len):
      raise ConfigError(f"TrainConfig.pack_length={self.pack_length} is shorter than query_len ({self.query_len}) or "
                        f"doc_len ({self.doc_len}): every text must fit a packed row. Use pack_length >= "
                        f"{max(self.query_len, self.doc_len)}, or 0 for length buckets.")
    if self.pack_length and self.attention_impl == "tpu_flash" and self.pack_length % 128:
      raise ConfigError(f"TrainConfig.attention_impl='tpu_flash' needs pack_length a multiple of 128 (its key "
                        f"blocks); got {self.pack_length}.")
    if self.attention_impl == "cudnn" and self.dtype == "float32":
      raise ConfigError("TrainConfig.attention_impl='cudnn' needs dtype bfloat16 or float16 (cuDNN's fused attention "
                        "has no float32 kernel); got dtype 'float32'. Use attention_impl='dot_product_attention' "
                        "for XLA's fused kernel, or 'xla'.")
    if self.attention_impl == "cudnn" and self.attention_dropout:
      # Otherwise the step would silently never use the kernel (it has no attention dropout).
      raise ConfigError(f"TrainConfig.attention_impl='cudnn' needs no attention dropout (cuDNN's fused attention has "
                        f"none, so with it the step runs the einsums); got attention dropout {self.attention_dropout}. "
                        "Set attention_dropout_rate = 0 (the other dropouts stay; not INSTRUCTOR's recipe), or "
                        "dropout_rate = 0, or attention_impl = 'xla'.")

  @property
  def attention_dropout(self) -> float:
    """The rate the attention weights are dropped at (attention_dropout_rate, else dropout_rate)."""
    return self.dropout_rate if self.attention_dropout_rate is None else self.attention_dropout_rate


def _is_integer(value) -> bool:
  """Python and NumPy integers, not bools."""
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)
