"""Training checkpoints in WORKDIR/checkpoints/<step>/ (the `orbax_io` layout plus optimizer state).

Items per step: `params` (the plain t5x-named tree, what `orbax_io.restore_params`, the convert
CLI and `Instructor.from_pretrained(WORKDIR)` read), `model_config` (json), `opt_state` and
`train_meta` (json: step, data seed, batch size, ...). Saves are asynchronous and made by every
process (each writes its own shards); this module imports no model code.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from instructor_jax import orbax_io

OPT_ITEM = "opt_state"
META_ITEM = "train_meta"


class TrainCheckpointer:
  """Async save every `every` steps keeping `keep`; restore of the full state onto shardings."""

  def __init__(self, workdir: str, every: int, keep: int | None, async_save: bool = True):
    # Object-store paths (gs://...) are used as given; local ones made absolute for orbax.
    root = workdir.rstrip("/") if "://" in workdir else os.path.abspath(workdir)
    self.directory = f"{root}/{orbax_io.CHECKPOINTS_SUBDIR}"
    self.manager = orbax_io.checkpoint_manager(
        self.directory, max_to_keep=keep, save_interval_steps=every, async_save=async_save)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, model_config: dict[str, Any], meta: dict[str, Any],
           force: bool = False) -> bool:
    """Starts an async save of `state` at `step` (if due, or `force`); True when one started."""
    args = ocp.args.Composite(**{
        orbax_io.PARAMS_ITEM: ocp.args.StandardSave(state.params),
        orbax_io.CONFIG_ITEM: ocp.args.JsonSave(model_config),
        OPT_ITEM: ocp.args.StandardSave(state.opt_state),
        META_ITEM: ocp.args.JsonSave(dict(meta, step=int(step))),
    })
    return self.manager.save(step, args=args, force=force)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """(state with params/opt_state on the abstract state's shardings, model_config dict, meta)."""
    args = ocp.args.Composite(**{
        orbax_io.PARAMS_ITEM: ocp.args.StandardRestore(abstract_state.params),
        orbax_io.CONFIG_ITEM: ocp.args.JsonRestore(),
        OPT_ITEM: ocp.args.StandardRestore(abstract_state.opt_state),
        META_ITEM: ocp.args.JsonRestore(),
    })
    try:
      restored = self.manager.restore(step, args=args)
    except (ValueError, KeyError, FileNotFoundError) as e:
      raise orbax_io.OrbaxCheckpointError(
          f"{self.directory}/{step}: cannot resume from this checkpoint ({type(e).__name__}: {e}). It was "
          "written by a different model or optimiser configuration; use the same gin config, or a "
          "fresh --workdir (pass this checkpoint as INIT_CHECKPOINT to start from its parameters).") from e
    meta = restored[META_ITEM]
    step_array = jax.device_put(np.int32(meta["step"]), abstract_state.step.sharding)
    state = abstract_state.replace(step=step_array, params=restored[orbax_io.PARAMS_ITEM], opt_state=restored[OPT_ITEM])
    return state, restored[orbax_io.CONFIG_ITEM], meta

  def model_config(self, step: int) -> dict[str, Any]:
    """The `model_config` item of `step` alone (to build the restore target before restoring)."""
    return self.manager.restore(step, args=ocp.args.Composite(**{
        orbax_io.CONFIG_ITEM: ocp.args.JsonRestore()}))[orbax_io.CONFIG_ITEM]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def reached_preemption(self, step: int) -> bool:
    """True on every process at the same step once any of them got a preemption notice."""
    return self.manager.reached_preemption(step)

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def read_model_config(path: str) -> tuple[int, dict[str, Any]]:
  """(latest step, its model_config dict) of an orbax workdir / checkpoints dir, reading nothing else."""
  manager = orbax_io.checkpoint_manager(orbax_io.checkpoint_dir(path), read_only=True)
  try:
    step = manager.latest_step()
    if step is None:
      raise orbax_io.OrbaxCheckpointError(f"{path}: no finished checkpoint step to initialise from.")
    restored = manager.restore(step, args=ocp.args.Composite(**{orbax_io.CONFIG_ITEM: ocp.args.JsonRestore()}))
    return step, restored[orbax_io.CONFIG_ITEM]
  finally:
    manager.close()
