"""The learning-rate schedule: linear warm-up from 0, then linear decay, warm-up steps rounded up as HF does."""

import re

import pytest

from instructor_jax.config import ConfigError
from instructor_jax.optim import OptimConfig, learning_rate_schedule


@pytest.mark.parametrize("total,warmup", [(100, 10), (5, 1), (12, 2)])
def test_warmup_steps_round_up_like_hf(total, warmup):
  """HF's TrainingArguments.get_warmup_steps takes ceil(total * ratio): 5 steps at 0.1 still warm up."""
  schedule = learning_rate_schedule(OptimConfig(learning_rate=1e-3, warmup_fraction=0.1), total)
  assert float(schedule(0)) == 0.0
  assert float(schedule(warmup)) == pytest.approx(1e-3)
  assert float(schedule(warmup - 1)) < 1e-3
  assert float(schedule(total)) == pytest.approx(0.0, abs=1e-12)


def test_no_warmup_starts_at_the_peak():
  schedule = learning_rate_schedule(OptimConfig(learning_rate=1e-3, warmup_fraction=0.0), 10)
  assert float(schedule(0)) == pytest.approx(1e-3) and float(schedule(5)) == pytest.approx(5e-4)


@pytest.mark.parametrize("field, value, interval", [
    ("learning_rate", "1e-3", "[0, inf)"),  # quoted in gin: a string
    ("learning_rate", -1.0, "[0, inf)"),  # would ascend the loss
    ("learning_rate", float("inf"), "[0, inf)"),
    ("warmup_fraction", 1.0, "[0, 1)"),
    ("final_lr_fraction", 1.5, "[0, 1]"),
    ("b2", 1.5, "[0, 1)"),
    ("eps", 0.0, "(0, inf)"),
    ("weight_decay", -0.1, "[0, inf)"),
    ("grad_clip_norm", None, "(-inf, inf)"),
    ("grad_clip_norm", float("nan"), "(-inf, inf)"),
    ("b1", True, "[0, 1)"),
])
def test_optim_config_errors_name_the_field_and_the_range(field, value, interval):
  with pytest.raises(ConfigError, match=re.escape(f"OptimConfig.{field}={value!r}; expected a number in {interval}.")):
    OptimConfig(**{field: value})
  assert OptimConfig(grad_clip_norm=0.0, weight_decay=0.01, final_lr_fraction=1.0).grad_clip_norm == 0.0
