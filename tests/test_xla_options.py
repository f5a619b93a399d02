"""Per-backend XLA compiler options for the train step."""

import logging

import jax
import numpy as np
import pytest

from instructor_jax import xla_options
from test_train_sharding import mesh_of, random_batch, reference_run, run_steps


def test_gpu_gets_latency_hiding_scheduler_others_nothing():
  assert xla_options.train_compiler_options(backend="gpu") == {"xla_gpu_enable_latency_hiding_scheduler": True}
  assert xla_options.train_compiler_options(backend="cpu") == {}
  assert xla_options.train_compiler_options(backend="tpu") == {}


def test_overrides_are_added_and_unknown_ones_refused():
  opts = xla_options.train_compiler_options({"xla_gpu_enable_latency_hiding_scheduler": False}, backend="gpu")
  assert opts == {"xla_gpu_enable_latency_hiding_scheduler": False}
  with pytest.raises(ValueError, match="xla_gpu_no_such_option"):
    xla_options.train_compiler_options({"xla_gpu_no_such_option": True}, backend="cpu")


def test_a_default_this_xla_lacks_is_dropped_with_a_warning(monkeypatch, caplog):
  monkeypatch.setattr(xla_options, "GPU_DEFAULTS", {"xla_gpu_option_from_the_future": True,
                                                    "xla_gpu_enable_latency_hiding_scheduler": True})
  with caplog.at_level(logging.WARNING):
    opts = xla_options.train_compiler_options(backend="gpu")
  assert opts == {"xla_gpu_enable_latency_hiding_scheduler": True}
  assert "xla_gpu_option_from_the_future" in caplog.text


def test_step_compiled_with_gpu_options_gives_the_same_results():
  """The GPU option set is accepted by this XLA and changes scheduling only, never the numbers."""
  params, metrics, _ = run_steps(mesh_of(1, 1, 1), [random_batch(1), random_batch(2)],
                                 compiler_options=xla_options.train_compiler_options(backend="gpu"))
  ref_params, ref_metrics = reference_run()
  assert [float(m["loss"]) for m in metrics] == pytest.approx([float(m["loss"]) for m in ref_metrics], rel=1e-6)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
