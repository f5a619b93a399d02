"""The learning-rate schedule: linear warm-up from 0, then linear decay, warm-up steps rounded up as HF does."""

import pytest

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
