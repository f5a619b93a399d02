"""Per-backend XLA compiler options for the train step (the latency-hiding scheduler on GPU).

Passed per compilation (`jax.jit(..., compiler_options=...)`) rather than through XLA_FLAGS, so
they apply to the step only, need no environment set before JAX starts, and an option that a
newer XLA has dropped is reported instead of aborting the process at start-up.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

import jax
import numpy as np

from instructor_jax.config import ConfigError

# On GPU the latency-hiding scheduler overlaps the data-parallel gradient reduction and the FSDP
# all-gathers with compute; CPU and TPU (on by default in libtpu) get nothing extra.
GPU_DEFAULTS: dict[str, Any] = {"xla_gpu_enable_latency_hiding_scheduler": True}

_GPU_BACKENDS = ("gpu", "cuda", "rocm")
_log = logging.getLogger(__name__)


def _is_known(name: str, value: Any) -> bool:
  try:
    jax.jit(lambda x: x + 1, compiler_options={name: value}).lower(np.float32(0)).compile()
  except Exception as e:  # JaxRuntimeError; its class moved between JAX releases
    if "No such compile option" in str(e):
      return False
    raise
  return True


def train_compiler_options(overrides: Mapping[str, Any] | None = None, backend: str | None = None) -> dict[str, Any]:
  """Defaults for `backend` (default: JAX's) updated by `overrides`; unknown defaults are dropped."""
  backend = backend or jax.default_backend()
  options: dict[str, Any] = dict(GPU_DEFAULTS) if backend in _GPU_BACKENDS else {}
  for name in list(options):
    if not _is_known(name, options[name]):
      _log.warning("XLA in jax %s has no compiler option %r; training without it.", jax.__version__, name)
      del options[name]
  for name, value in (overrides or {}).items():
    if not _is_known(name, value):
      raise ConfigError(f"TrainConfig.xla_options: XLA in jax {jax.__version__} has no compiler option {name!r}; "
                        f"check the name against XLA's DebugOptions for this release or remove it.")
    options[name] = value
  return options
