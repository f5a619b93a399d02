"""The training command's set-up, before any model exists: flags, gin, joining the other processes of
a multi-host job, and the persistent compilation cache. Gin stays here, at the edge: library code takes
the plain dataclasses."""

from __future__ import annotations

import argparse
import glob
import logging
import os
import re
import tokenize

import gin
import jax

from instructor_jax import sharding as shd
from instructor_jax.config import ConfigError, MissingPathError
from instructor_jax.medi_paths import cache_root
from instructor_jax.optim import OptimConfig
from instructor_jax.train_config import TrainConfig


# The repository's gin_configs/ (next to the package in a clone or an editable install).
SHIPPED_GIN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gin_configs")

# Gin binds these at the edge (main); library code takes the plain dataclasses.
GIN_TRAIN_CONFIG = gin.external_configurable(TrainConfig, module="instructor_jax")
GIN_OPTIM_CONFIG = gin.external_configurable(OptimConfig, module="instructor_jax")
GIN_MESH_CONFIG = gin.external_configurable(shd.MeshConfig, module="instructor_jax")


def parse_flags(argv: list[str], description: str) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m instructor_jax.train", description=description)
  p.add_argument("--gin_file", action="append", default=[], help="repeatable; later files override earlier")
  p.add_argument("--gin_bindings", action="append", default=[], help="repeatable, e.g. 'BATCH_SIZE = 64'")
  p.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl, tensorboard/, config.gin (local or gs://)")
  p.add_argument("--coordinator_address", default=None, help="host:port of process 0 (multi-host without auto-detection)")
  p.add_argument("--num_processes", type=int, default=None)
  p.add_argument("--process_id", type=int, default=None)
  p.add_argument("--distributed", choices=("auto", "on", "off"), default="auto",
                 help="call jax.distributed.initialize(): auto = on a TPU VM, under a coordinator "
                      "(JAX_COORDINATOR_ADDRESS), or in a multi-task srun / mpirun launch")
  return p.parse_args(argv)


def parse_gin(files: list[str], bindings: list[str]) -> None:
  """Parses gin files (includes resolve against each file's folder and its parent) and bindings."""
  for f in files:
    if not os.path.exists(f):
      raise MissingPathError(f"--gin_file {f}: no such file (paths are relative to the current directory).")
    for d in (os.path.dirname(os.path.abspath(f)), os.path.dirname(os.path.dirname(os.path.abspath(f)))):
      gin.add_config_file_search_path(d)
  if os.path.isdir(SHIPPED_GIN):  # so that a user's own file can include runs/quickstart_cpu.gin and what it includes
    gin.add_config_file_search_path(SHIPPED_GIN)
  # gin's package-path reader logs an error for every search path an include is *not* under;
  # a missing include still raises, so those log lines are noise.
  logging.disable(logging.ERROR)
  try:
    gin.parse_config_files_and_bindings(files, bindings)
  except (ValueError, SyntaxError, tokenize.TokenError) as e:  # gin names the file or binding and its line
    if isinstance(e, ConfigError):
      raise
    hint = ""
    if "malformed node or string" in str(e):  # MEDI_PATH = data/x.jsonl: gin reads an unquoted name
      hint = " (a string value needs quotes, e.g. MEDI_PATH = 'data/medi.jsonl')"
    raise ConfigError(f"gin: {e}{hint}") from e
  except OSError as e:  # an include gin cannot find; gin's message lists the paths it searched
    shipped = f", and against {SHIPPED_GIN}" if os.path.isdir(SHIPPED_GIN) else ""
    raise ConfigError(f"gin: {e}. Includes are resolved against each --gin_file's folder and its parent"
                      f"{shipped}.") from e
  finally:
    logging.disable(logging.NOTSET)


def gin_configs() -> tuple[TrainConfig, OptimConfig, shd.MeshConfig]:
  """The run's configurations from the parsed gin; a bad value or an unbound macro is a ConfigError."""
  try:
    return GIN_TRAIN_CONFIG(), GIN_OPTIM_CONFIG(), GIN_MESH_CONFIG()
  except ValueError as e:  # gin appends which configurable it was calling
    if isinstance(e, ConfigError):
      raise
    raise ConfigError(str(e)) from e


def check_macros_used(bindings: list[str], operative: str) -> None:
  """A macro set in --gin_bindings that no configuration reads is a typo (TRAIN_STEP=5 for TRAIN_STEPS):
  gin would ignore it silently, and the run would use the file's value."""
  for binding in bindings:
    for line in binding.splitlines():
      m = re.match(r"\s*([A-Za-z_]\w*)\s*=", line)
      if m and not re.search(rf"%{m.group(1)}\b", operative):
        used = sorted(set(re.findall(r"%([A-Za-z_]\w*)", operative)))
        raise ConfigError(f"--gin_bindings {line.strip()!r}: no configuration reads the macro {m.group(1)} "
                         f"(a typo?). Macros in use: {', '.join(used) or 'none'}; or bind a parameter directly, "
                         "e.g. TrainConfig.train_steps=...")


_CLUSTER_ENV = ("JAX_COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS")


def _in_multiprocess_launch() -> bool:
  """A launcher started several processes of this job (a bare `salloc` shell has SLURM_JOB_ID but no
  job step, and JAX's SLURM detection then fails to find a coordinator)."""
  if any(e in os.environ for e in _CLUSTER_ENV):
    return True
  if "SLURM_STEP_NODELIST" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    return True
  return int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1


def maybe_initialize_distributed(flags: argparse.Namespace) -> None:
  """Joins the processes of a multi-host job (before any other JAX call)."""
  given = {f"--{k}": getattr(flags, k) for k in ("coordinator_address", "num_processes", "process_id")}
  if any(v is not None for v in given.values()):
    missing = [k for k, v in given.items() if v is None]
    if missing:
      raise ConfigError(f"{', '.join(k for k, v in given.items() if v is not None)} given without "
                        f"{', '.join(missing)}: a job joined by hand needs all three (the same coordinator "
                        "host:port and process count on every process, and each its own --process_id from 0), "
                        "or none of them where JAX detects the cluster (TPU VMs, SLURM, Open MPI).")
    if not 0 <= flags.process_id < flags.num_processes:
      raise ConfigError(f"--process_id {flags.process_id} with --num_processes {flags.num_processes}; expected "
                        f"0 <= process_id < num_processes.")
    _join(coordinator_address=flags.coordinator_address, num_processes=flags.num_processes,
          process_id=flags.process_id)
    return
  on_tpu_vm = os.path.exists("/dev/accel0") or bool(glob.glob("/dev/vfio/[0-9]*"))
  if flags.distributed == "on" or (flags.distributed == "auto" and (on_tpu_vm or _in_multiprocess_launch())):
    _join()  # cluster detection (TPU metadata, SLURM, Open MPI, ...) fills in every argument


def _join(**arguments) -> None:
  _use_gloo_on_cpu()
  try:
    jax.distributed.initialize(**arguments)
  except (ValueError, RuntimeError) as e:
    raise ConfigError(f"joining the other processes failed ({type(e).__name__}: {e}). For a single-process "
                      "run pass --distributed=off; for several, --coordinator_address, --num_processes and "
                      "--process_id, the same coordinator and count on every process.") from e


# How many processes a launcher started on this host: Open MPI's count, SLURM's ("8", or "8(x2)" for
# two nodes of 8).
_LOCAL_PROCESS_ENV = ("OMPI_COMM_WORLD_LOCAL_SIZE", "SLURM_STEP_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE")


def warn_if_gpus_left_idle() -> None:
  """JAX's cluster detection (SLURM, Open MPI) gives each process one GPU, assuming a process per GPU:
  one task per node would train on one GPU of each node without a word. Warns where this host's
  processes (as the launcher counts them) use fewer GPUs between them than the host has."""
  if jax.process_count() == 1 or jax.local_devices()[0].platform != "gpu":
    return
  counts = [re.match(r"\d+", os.environ.get(name, "")) for name in _LOCAL_PROCESS_ENV]
  local_processes = next((int(m.group()) for m in counts if m), None)
  if local_processes is None:  # joined by hand: each process uses every GPU it sees
    return
  visible = os.environ.get("CUDA_VISIBLE_DEVICES")
  on_host = (len([d for d in visible.split(",") if d.strip()]) if visible is not None
             else len(glob.glob("/dev/nvidia[0-9]*")))
  if local_processes * jax.local_device_count() < on_host:
    logging.warning("the %d process(es) on this host use %d of its %d GPUs: run one process per GPU (srun "
                    "--ntasks-per-node=%d, mpirun -npernode %d), which JAX's cluster detection assumes, or "
                    "join the processes by hand (--coordinator_address, --num_processes, --process_id) so that "
                    "each process uses every GPU it sees.", local_processes,
                    local_processes * jax.local_device_count(), on_host, on_host, on_host)


def _use_gloo_on_cpu() -> None:
  """CPU processes need a collectives backend to form one mesh; no effect on TPU/GPU devices."""
  try:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  except (AttributeError, ValueError):  # an older/newer JAX without the option
    pass


COMPILATION_CACHE_BYTES = 8 << 30  # least recently used entries go first


def use_persistent_compilation_cache(workdir: str) -> None:
  """Keeps compiled steps on disk, so that a restart (a preemption) does not compile them again: with
  length buckets a run compiles one step per (query, document) length pair it meets. A cache the
  user chose (JAX_COMPILATION_CACHE_DIR or jax.config) is left as it is.

  JAX writes cache entries from process 0 only, so a multi-host job with a gs:// workdir keeps them
  there (`{workdir}/jax_compilation_cache`), where every host reads them and a TPU created again after
  a preemption finds them; a single host keeps them under `cache_root()`. Call after joining the
  processes."""
  if jax.config.jax_compilation_cache_dir:
    return
  shared = jax.process_count() > 1 and "://" in workdir
  cache = f"{workdir.rstrip('/')}/jax_compilation_cache" if shared else os.path.join(cache_root(), "jax_compilation_cache")
  jax.config.update("jax_compilation_cache_dir", cache)
  if shared and jax.config.jax_persistent_cache_enable_xla_caches == "xla_gpu_per_fusion_autotune_cache_dir":
    # JAX hands XLA:GPU an autotune cache folder inside this one by default, and XLA's own file layer
    # cannot write gs:// (the first compile fails): JAX's entries only, there.
    jax.config.update("jax_persistent_cache_enable_xla_caches", "none")
  if jax.config.jax_compilation_cache_max_size == -1 and not shared:
    # JAX's default, no limit: sweeps would fill the disk. (Its eviction works on local disks only.)
    jax.config.update("jax_compilation_cache_max_size", COMPILATION_CACHE_BYTES)
