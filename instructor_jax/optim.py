"""Optimisers: AdamW with linear warm-up and linear decay (INSTRUCTOR), or Adafactor (GTR/t5x)."""

from __future__ import annotations

import dataclasses
import math
import numbers

import jax
import optax

from instructor_jax.config import ConfigError

OPTIMIZERS = ("adamw", "adafactor")


# field -> (low, high, low excluded, high excluded); grad_clip_norm <= 0 turns clipping off, and a
# learning rate of 0 leaves the parameters as they are (a run that only evaluates, a test).
_RANGES = {"learning_rate": (0.0, math.inf, False, True), "warmup_fraction": (0.0, 1.0, False, True),
           "final_lr_fraction": (0.0, 1.0, False, False), "b1": (0.0, 1.0, False, True), "b2": (0.0, 1.0, False, True),
           "eps": (0.0, math.inf, True, True), "weight_decay": (0.0, math.inf, False, True),
           "grad_clip_norm": (-math.inf, math.inf, True, True)}


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """Defaults are INSTRUCTOR's (HF Trainer): AdamW, lr 2e-5, 10% warm-up, linear decay, clip 1.0."""

  name: str = "adamw"
  learning_rate: float = 2e-5
  warmup_fraction: float = 0.1
  # Fraction of peak lr left at the last step (0: HF's get_linear_schedule_with_warmup).
  final_lr_fraction: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 0.0
  grad_clip_norm: float = 1.0  # <= 0 disables clipping

  def __post_init__(self):
    if self.name not in OPTIMIZERS:
      raise ConfigError(f"OptimConfig.name={self.name!r}; expected one of {OPTIMIZERS}.")
    # Gin passes what was written ('1e-3' in quotes is a string, a negative rate ascends the loss):
    # checked here by field, not found as a TypeError inside optax or a diverging run.
    for name, (low, high, low_open, high_open) in _RANGES.items():
      value = getattr(self, name)
      ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
      ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
      if not ok:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ConfigError(f"OptimConfig.{name}={value!r}; expected a number in {interval}.")


def learning_rate_schedule(config: OptimConfig, total_steps: int) -> optax.Schedule:
  """Linear warm-up from 0, then linear decay; evaluated at the update count (0 on the first step).

  Warm-up steps are rounded up, as HF's TrainingArguments.get_warmup_steps does: a short run with a
  warm-up fraction still starts from 0 rather than at the peak rate."""
  warmup = math.ceil(config.warmup_fraction * total_steps)
  peak, final = config.learning_rate, config.learning_rate * config.final_lr_fraction
  decay = optax.linear_schedule(peak, final, max(total_steps - warmup, 1))
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def _decay_mask(params):
  # Like HF Trainer, norm scales (the only 1-D parameters in T5) are not decayed.
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(config: OptimConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(gradient transformation, lr schedule); clipping is by global norm over all parameters."""
  schedule = learning_rate_schedule(config, total_steps)
  if config.name == "adamw":
    tx = optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                     weight_decay=config.weight_decay, mask=_decay_mask)
  else:
    tx = optax.adafactor(schedule, weight_decay_rate=config.weight_decay or None)
  if config.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
  return tx, schedule
