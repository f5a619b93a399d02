"""Orbax checkpoints of INSTRUCTOR parameters: the layout shared by training and conversion.

Layout (one directory per step, written by `orbax.checkpoint.CheckpointManager`):
  CHECKPOINTS/<step>/params/        the parameter tree (t5x names, float32), StandardSave
  CHECKPOINTS/<step>/model_config/  `config_to_dict(InstructorConfig)`, JsonSave
  CHECKPOINTS/<step>/<other items>  whatever else the trainer saves (opt_state, train_meta, ...)
A training workdir keeps them in WORKDIR/checkpoints; every reader here accepts either path.
Restoring reads only `params` and `model_config`, optionally straight onto target shardings, so
a multi-billion-parameter model never has to fit on one device.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from instructor_jax.config import InstructorConfig, T5Config

PARAMS_ITEM = "params"
CONFIG_ITEM = "model_config"
CHECKPOINTS_SUBDIR = "checkpoints"


class OrbaxCheckpointError(ValueError):
  """A directory that holds no readable INSTRUCTOR orbax checkpoint; the message says what to do."""


def _abs(path: str) -> str:
  """Orbax requires absolute paths; cloud paths (gs://...) pass through."""
  return path if "://" in str(path) else os.path.abspath(os.path.expanduser(str(path)))


def config_to_dict(cfg: InstructorConfig) -> dict[str, Any]:
  """JSON-able form of the model config (stored as the `model_config` item).

  `scan_layers` is left out: how a run executes the layers, not what the model is, and releases
  from before it would warn about an unknown field. So is `attention_dropout_rate` when None (the
  dropout_rate, as those releases read it)."""
  d = dataclasses.asdict(cfg)
  del d["encoder"]["scan_layers"]
  if d["encoder"]["attention_dropout_rate"] is None:
    del d["encoder"]["attention_dropout_rate"]
  return d


def _known_fields(cls: type, d: Mapping[str, Any], where: str) -> dict[str, Any]:
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - names)
  if unknown:
    # A newer writer may add fields; ignoring them keeps old readers working.
    warnings.warn(f"{where}: ignoring unknown {cls.__name__} fields {unknown}.", stacklevel=3)
  return {k: v for k, v in d.items() if k in names}


def config_from_dict(d: Mapping[str, Any]) -> InstructorConfig:
  """Inverse of `config_to_dict`; missing fields take the dataclass defaults."""
  d = dict(d)
  encoder = T5Config(**_known_fields(T5Config, dict(d.pop("encoder", {})), "model_config.encoder"))
  return InstructorConfig(encoder=encoder, **_known_fields(InstructorConfig, d, "model_config"))


def checkpoint_manager(directory: str, *, max_to_keep: int | None = None, save_interval_steps: int = 1,
                       async_save: bool = True, item_names: tuple[str, ...] | None = None,
                       read_only: bool = False) -> ocp.CheckpointManager:
  """A CheckpointManager for `directory` (the checkpoints dir itself, created if missing).

  Save with `mngr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
  model_config=ocp.args.JsonSave(config_to_dict(cfg)), ...))`. With `item_names=None` any item
  can be saved (handlers are chosen from the args types); when given, it must list every item.
  """
  options = ocp.CheckpointManagerOptions(
      max_to_keep=None if read_only else max_to_keep, save_interval_steps=0 if read_only else save_interval_steps,
      enable_async_checkpointing=async_save, create=not read_only, read_only=read_only)
  if item_names is None:
    return ocp.CheckpointManager(epath.Path(_abs(directory)), options=options)
  return ocp.CheckpointManager(epath.Path(_abs(directory)), options=options, item_names=tuple(item_names))


def save_params(directory: str, params: Any, config: InstructorConfig, step: int = 0, overwrite: bool = False) -> None:
  """Writes a params-only checkpoint at `directory/<step>` in the training layout (blocking).

  An existing `directory/<step>` is an error, or with `overwrite` deleted first; other steps there
  are always an error (readers take the latest step, which would not be this one).
  """
  mngr = checkpoint_manager(directory, async_save=False)
  try:
    steps = list(mngr.all_steps())
    if [s for s in steps if s != step]:
      raise OrbaxCheckpointError(f"{directory} holds checkpoint steps {steps}; write step {step} to an empty "
                                 "destination directory.")
    if steps:
      if not overwrite:
        raise OrbaxCheckpointError(f"{directory}/{step} already exists; write to an empty destination "
                                   "directory, or pass --overwrite (overwrite=True) to replace it.")
      mngr.delete(step)
    saved = mngr.save(step, force=True, args=ocp.args.Composite(**{
        PARAMS_ITEM: ocp.args.StandardSave(params),
        CONFIG_ITEM: ocp.args.JsonSave(config_to_dict(config)),
    }))
    mngr.wait_until_finished()
    if not saved:
      raise OrbaxCheckpointError(f"orbax did not save step {step} under {directory}.")
  finally:
    mngr.close()


def checkpoint_dir(path: str) -> str:
  """The checkpoints directory: `path/checkpoints` for a training workdir, else `path` itself."""
  p = epath.Path(_abs(path))
  sub = p / CHECKPOINTS_SUBDIR
  return str(sub) if sub.is_dir() else str(p)


def _read_only_manager(path: str) -> ocp.CheckpointManager:
  directory = checkpoint_dir(path)
  if not epath.Path(directory).is_dir():
    raise OrbaxCheckpointError(f"{path}: no such directory; expected a training workdir "
                               f"(with {CHECKPOINTS_SUBDIR}/<step>/) or an orbax checkpoints directory.")
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  # PyTree handler (not Standard) so that metadata and per-leaf restore types are available.
  pytree = ocp.PyTreeCheckpointHandler()
  registry.add(PARAMS_ITEM, ocp.args.PyTreeRestore, pytree)
  registry.add(CONFIG_ITEM, ocp.args.JsonRestore, ocp.JsonCheckpointHandler())
  options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
  absl_logger = logging.getLogger("absl")
  absl_logger.addFilter(_hide_read_only_notice)  # read-only is what we asked for, not news
  try:
    return ocp.CheckpointManager(epath.Path(directory), options=options, handler_registry=registry)
  finally:
    absl_logger.removeFilter(_hide_read_only_notice)


def _hide_read_only_notice(record: logging.LogRecord) -> bool:
  return "is read only" not in record.getMessage()


def all_steps(path: str) -> list[int]:
  """Finished checkpoint steps under a workdir / checkpoints directory, ascending."""
  mngr = _read_only_manager(path)
  try:
    return sorted(mngr.all_steps())
  finally:
    mngr.close()


def latest_step(path: str) -> int | None:
  """The newest finished step, or None when there is none."""
  steps = all_steps(path)
  return steps[-1] if steps else None


def is_orbax_checkpoint(path: str) -> bool:
  """True for a training workdir or checkpoints dir holding at least one step with `params`."""
  try:
    directory = epath.Path(checkpoint_dir(path))
    return any(child.name.isdigit() and (child / PARAMS_ITEM).is_dir() for child in directory.iterdir())
  except Exception:  # a probe: missing dirs, unreachable buckets and missing filesystems all mean "no"
    return False


def _restore_args(metadata_tree: Any, shardings: Any) -> Any:
  if shardings is None:
    return jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata_tree)
  try:
    return jax.tree.map(lambda m, s: ocp.ArrayRestoreArgs(sharding=s, global_shape=tuple(m.shape), dtype=m.dtype),
                        metadata_tree, shardings)
  except ValueError as e:
    raise OrbaxCheckpointError(f"shardings do not match the checkpoint's parameter tree: {e}") from e


def restore_params(path: str, step: int | None = None, shardings: Any = None) -> tuple[InstructorConfig, Any]:
  """(config, params) of one step (default: latest); only `params` and `model_config` are read.

  Without `shardings` the leaves are NumPy arrays on the host. With `shardings` (a pytree of
  `jax.sharding.Sharding` matching the parameter tree) every process reads only its shards.
  """
  mngr = _read_only_manager(path)
  try:
    steps = sorted(mngr.all_steps())
    if not steps:
      raise OrbaxCheckpointError(f"{checkpoint_dir(path)}: no finished checkpoint step found.")
    if step is None:
      step = steps[-1]
    elif step not in steps:
      raise OrbaxCheckpointError(f"{checkpoint_dir(path)}: no step {step}; available steps: {steps}.")
    step_dir = epath.Path(checkpoint_dir(path)) / str(step)
    for item in (PARAMS_ITEM, CONFIG_ITEM):
      if not (step_dir / item).is_dir():
        raise OrbaxCheckpointError(f"{step_dir}: item {item!r} is missing; expected an INSTRUCTOR "
                                   f"checkpoint with items {PARAMS_ITEM!r} and {CONFIG_ITEM!r}.")
  finally:
    mngr.close()
  # Item by item, not through the manager: the manager would also inspect the training items
  # (optimizer state, train metadata) that have no reader here and warn about each of them.
  handler = ocp.PyTreeCheckpointHandler()
  try:
    metadata = handler.metadata(step_dir / PARAMS_ITEM)
    tree = metadata.tree if hasattr(metadata, "tree") else metadata
    params = handler.restore(step_dir / PARAMS_ITEM, args=ocp.args.PyTreeRestore(
        item=None, restore_args=_restore_args(tree, shardings)))
  except OrbaxCheckpointError:
    raise
  except Exception as e:  # tensorstore / orbax errors: their classes differ between releases
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    others = [s for s in steps if s != step]
    raise OrbaxCheckpointError(
        f"{step_dir}: the parameters of step {step} cannot be read ({first[:300]}); the step is damaged or was "
        "copied in part. " + (f"Pick another step (--step, or step=): {others}." if others else
                             "Copy the checkpoint again.")) from e
  finally:
    handler.close()
  config = config_from_dict(ocp.JsonCheckpointHandler().restore(step_dir / CONFIG_ITEM, args=ocp.args.JsonRestore()))
  # The attention kernel is the reader's choice, not the checkpoint's: workdirs written before
  # "auto" existed store "xla" (the training einsums), which would deny inference the fused kernels.
  return config.with_encoder(attention_impl=T5Config().attention_impl), _plain_dicts(params)


def _plain_dicts(tree: Any) -> Any:
  """Restored trees may come back as other Mapping types; the model wants plain nested dicts."""
  if isinstance(tree, Mapping):
    return {k: _plain_dicts(v) for k, v in tree.items()}
  return tree
