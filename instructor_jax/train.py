"""Contrastive fine-tuning of GTR into INSTRUCTOR on a device mesh (one host or a pod).

  python -m instructor_jax.train --gin_file=gin_configs/runs/quickstart_cpu.gin --workdir=/tmp/qs

Top to bottom: mesh -> state (resume order: latest checkpoint in the workdir -> INIT_CHECKPOINT ->
random init) -> data (resumed at the restored step) -> compiled step -> loop (metrics, async
checkpoints, preemption, non-finite loss). The command's set-up (flags, gin, joining the other
processes) is in train_launch.py, stop signals in train_stop.py, the workdir lock in dir_lock.py.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any, Iterator, Optional

import gin
import jax
import numpy as np
from jax.sharding import Mesh

from instructor_jax import medi_packing, orbax_io, sharding as shd, train_outputs
from instructor_jax.config import ConfigError, InstructorConfig, MissingPathError, preset
from instructor_jax.medi_batches import pad_batch_to
from instructor_jax.evaluate import EvalDataError
from instructor_jax.hf_format import CheckpointError
from instructor_jax.medi_paths import cache_root, medi_size
from instructor_jax.medi_records import MediFormatError
from instructor_jax.optim import OptimConfig, make_optimizer
from instructor_jax.sources import looks_like_hub_id
from instructor_jax.train_checkpoint import TrainCheckpointer, read_model_config
from instructor_jax.train_config import TrainConfig
from instructor_jax.train_launch import (check_macros_used, gin_configs, maybe_initialize_distributed, parse_flags,
                                         parse_gin, use_persistent_compilation_cache, warn_if_gpus_left_idle)
from instructor_jax.train_step import (TrainState, abstract_state, init_state, make_train_step, num_params,
                                       sharding_warning, state_shardings)
from instructor_jax.dir_lock import DirectoryInUseError, lock_directory
from instructor_jax.train_stop import EXIT_STOPPED_EARLY, StopFlag, StoppedBeforeStart
from instructor_jax.xla_options import train_compiler_options


class NonFiniteLossError(RuntimeError):
  """The loss, gradient norm or updated parameters became NaN/inf; the last good checkpoint is left as it was."""


# ---- model and state ---------------------------------------------------------------------------------

def with_compute_options(model: InstructorConfig, cfg: TrainConfig) -> InstructorConfig:
  return model.with_encoder(dtype=cfg.dtype, remat_policy=cfg.remat_policy, dropout_rate=cfg.dropout_rate,
                            attention_dropout_rate=cfg.attention_dropout_rate,
                            attention_impl=cfg.attention_impl, scan_layers=cfg.scan_layers)


def architecture(model: InstructorConfig) -> dict[str, Any]:
  """The saved model_config: compute-only options reset, so inference readers get a clean config.

  attention_impl is stored as "xla", which every release reads ("auto" is newer); readers choose
  their own kernel (orbax_io.load_checkpoint resets it)."""
  return orbax_io.config_to_dict(model.with_encoder(dtype="float32", remat_policy="none", attention_impl="xla"))


def _checked(model: InstructorConfig, mesh) -> InstructorConfig:
  """`model`, after a warning (before any state is allocated) if the mesh cannot shard it as the rules ask."""
  if jax.process_index() == 0 and (warning := sharding_warning(model, mesh)):
    print(warning, file=sys.stderr, flush=True)
  return model


def build_state(cfg: TrainConfig, tx, mesh, ckpt: TrainCheckpointer) -> tuple[InstructorConfig, TrainState, str]:
  """(model config, sharded state, where it came from), in the resume order."""
  latest = ckpt.latest_step()
  if latest is not None:
    model = _checked(with_compute_options(orbax_io.config_from_dict(ckpt.model_config(latest)), cfg), mesh)
    state, _, meta = ckpt.restore(latest, abstract_state(model, tx, mesh))
    now = run_meta(cfg)
    changed = [k for k in _STREAM_KEYS if k in meta and meta[k] != now[k]]  # older checkpoints lack some keys
    if changed:
      print(f"warning: resuming {ckpt.directory}/{latest} with " + ", ".join(
          f"{k} {now[k]!r} (checkpoint: {meta[k]!r})" for k in changed) + "; the data stream will differ.")
    changed = [k for k in ("model", "init_checkpoint") if k in meta and meta[k] != now[k]]
    if changed:
      print(f"warning: resuming {ckpt.directory}/{latest}, which was started with " + ", ".join(
          f"{k} {meta[k]!r}" for k in changed) + "; the checkpoint's model is what trains on (now set: " + ", ".join(
          f"{k} {now[k]!r}" for k in changed) + ", which applies to a new workdir only).")
    if meta.get("train_steps") not in (None, cfg.train_steps):
      print(f"warning: resuming {ckpt.directory}/{latest} with TRAIN_STEPS {cfg.train_steps} (checkpoint: "
            f"{meta['train_steps']}); the learning-rate schedule is laid over the new length from here on.")
    return model, state, f"resumed {ckpt.directory}/{latest}"
  if cfg.init_checkpoint and orbax_io.is_orbax_checkpoint(cfg.init_checkpoint):
    # Read straight onto the shardings: no host ever holds the whole model (gtr-xxl is 19 GB).
    step, config_dict = read_model_config(cfg.init_checkpoint)
    model = _checked(with_compute_options(orbax_io.config_from_dict(config_dict), cfg), mesh)
    _, params = orbax_io.restore_params(cfg.init_checkpoint, step, shardings=state_shardings(model, tx, mesh).params)
    return model, init_state(model, tx, mesh, params=params), f"initialised from {cfg.init_checkpoint} step {step}"
  if cfg.init_checkpoint:
    from instructor_jax.sources import load_source
    loaded = load_source(cfg.init_checkpoint)
    model = _checked(with_compute_options(loaded.config, cfg), mesh)
    return model, init_state(model, tx, mesh, params=loaded.params), f"initialised from {loaded.description}"
  model = _checked(with_compute_options(preset(cfg.model), cfg), mesh)
  return model, init_state(model, tx, mesh, seed=cfg.seed), f"random init ({cfg.model}, seed {cfg.seed})"


# Settings that decide the data stream from a given step on (a resume with others warns).
# The MEDI file is known by its path (another file, or a moved one, warns) and its size (a file
# replaced at the same path, nearly always), and query_len / doc_len decide what the examples hold.
_STREAM_KEYS = ("medi_path", "medi_bytes", "batch_size", "data_seed", "mixing_temperature", "rate_cap", "query_len",
                "doc_len")


def run_meta(cfg: TrainConfig) -> dict[str, Any]:
  """Saved with every checkpoint, so a resume can say what changed."""
  medi = cfg.medi_path
  if medi and "://" not in medi:  # the same file named relatively or absolutely is the same stream
    medi = os.path.abspath(os.path.expanduser(medi))
  return {"medi_path": medi, "medi_bytes": medi_size(medi) if medi else None,
          "batch_size": cfg.batch_size, "data_seed": cfg.data_seed,
          "mixing_temperature": cfg.mixing_temperature, "rate_cap": cfg.rate_cap, "query_len": cfg.query_len,
          "doc_len": cfg.doc_len, "train_steps": cfg.train_steps, "model": cfg.model,
          "init_checkpoint": cfg.init_checkpoint}


def batches(cfg: TrainConfig, start_step: int, num_steps: int,
            shards: int) -> Iterator[tuple[int, str, dict[str, np.ndarray]]]:
  """This host's slices of the MEDI global batches, from `start_step` (identical to an unbroken run);
  packed per block of each of the `shards` batch shards with TrainConfig.pack_length."""
  _require_medi_path(cfg)
  from instructor_jax.medi_batches import check_same_corpus, global_batches, load_tasks
  # The tokenised corpus is kept per host, so a restart (preemption) memory-maps it instead of
  # re-reading and re-tokenising all of MEDI (~1.4M triples, minutes per host).
  tasks = load_tasks(cfg.medi_path, cache_dir=os.path.join(cache_root(), "medi_tokens"))
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    check_same_corpus(tasks, multihost_utils.process_allgather)
  return global_batches(cfg.medi_path, tasks=tasks, global_batch_size=cfg.batch_size,
                        process_index=jax.process_index(), process_count=jax.process_count(), seed=cfg.data_seed,
                        start_step=start_step, query_len=cfg.query_len, doc_len=cfg.doc_len,
                        temperature=cfg.mixing_temperature, rate_cap=cfg.rate_cap, num_steps=num_steps,
                        length_buckets=cfg.length_buckets, pack_length=cfg.pack_length, shards=shards,
                        chunks=cfg.grad_cache_chunks)


# ---- the loop ----------------------------------------------------------------------------------------

def _fetch(pending: tuple[int, str, Any, dict[str, float]]) -> tuple[int, str, dict[str, float]]:
  step, task, metrics, cost = pending
  values = {k: float(v) for k, v in jax.device_get(metrics).items()} | cost
  # loss and grad norm come from the state before the update, param norm from the one after it
  # (the one a checkpoint would save): all three must be finite.
  if not all(np.isfinite(values[k]) for k in ("loss", "grad_norm", "param_norm")):
    raise NonFiniteLossError(f"step {step} (task {task!r}): loss {values['loss']}, grad norm {values['grad_norm']}, "
                             f"param norm {values['param_norm']}")
  return step, task, values


def train(cfg: TrainConfig, optim: OptimConfig, mesh_config: shd.MeshConfig, workdir: str,
          gin_text: str = "") -> RunRecords:
  """Runs (or resumes) training; returns the metric records this run logged (`.stopped_early` set if a
  signal or preemption notice ended it before its last step, with a checkpoint)."""
  if "://" not in workdir:  # `--workdir=~/w` reaches us unexpanded (the shell expands ~ only at a word start)
    workdir = os.path.expanduser(workdir)
  mesh = shd.make_mesh(mesh_config)
  check_before_building(cfg, mesh, workdir)
  tx, schedule = make_optimizer(optim, cfg.train_steps)
  # Installed before the model is built or loaded (minutes for gtr-xxl), so that a SIGTERM then
  # also ends the run with EXIT_STOPPED_EARLY ("run again") rather than the signal's default.
  stop = StopFlag()
  lock = None
  try:
    # Before restoring anything: a refused second trainer loads nothing.
    lock = lock_directory(workdir) if jax.process_index() == 0 else None
    return _train(cfg, tx, schedule, mesh, workdir, gin_text, stop)
  except StoppedBeforeStart as e:
    print(f"stopping on {e.args[0]} before the first step; nothing new to save. Run the same command to "
          f"resume (exit status {EXIT_STOPPED_EARLY}).", flush=True)
    records = RunRecords()
    records.stopped_early = e.args[0]
    return records
  finally:
    stop.restore()
    if lock is not None:
      lock.close()  # after _train has waited for the last checkpoint write


def _train(cfg: TrainConfig, tx, schedule, mesh, workdir: str, gin_text: str, stop: StopFlag) -> RunRecords:
  ckpt = TrainCheckpointer(workdir, cfg.checkpoint_every, cfg.keep_checkpoints, cfg.async_checkpointing)
  try:
    model, state, origin = build_state(cfg, tx, mesh, ckpt)
    start = int(jax.device_get(state.step))
    end = cfg.train_steps if cfg.stop_after_steps is None else min(cfg.train_steps, start + cfg.stop_after_steps)
    if jax.process_index() == 0:
      print(f"{origin}; {num_params(state.params) / 1e6:.1f}M parameters; mesh {dict(mesh.shape)}; "
            f"{jax.process_count()} process(es), {jax.device_count()} {jax.devices()[0].device_kind} device(s); "
            f"steps {start} -> {end} of {cfg.train_steps}", flush=True)
    if start >= end:
      if jax.process_index() == 0:
        print(f"nothing to do: {workdir} is at step {start} and TRAIN_STEPS is {cfg.train_steps}; raise TRAIN_STEPS "
              "to train further (the learning-rate schedule stretches to the new length).", flush=True)
      return RunRecords()
    if jax.process_index() == 0:  # the config of the run that writes the next checkpoints, not of a no-op
      from etils import epath
      path = epath.Path(workdir) / "config.gin"
      path.parent.mkdir(parents=True, exist_ok=True)
      archive = epath.Path(workdir) / f"config-until-step{start}.gin"
      # A resume with other settings keeps both. Only the first attempt at this step archives: one that
      # failed before its first checkpoint left its own config.gin, which never trained.
      if start and path.exists() and path.read_text() != gin_text and not archive.exists():
        archive.write_text(path.read_text())
      path.write_text(gin_text)
    step_fn = make_train_step(model, tx, schedule, mesh, loss=cfg.loss, temperature=cfg.temperature,
                              grad_cache_chunks=cfg.grad_cache_chunks, seed=cfg.seed,
                              compiler_options=train_compiler_options(cfg.xla_options),
                              packed=cfg.pack_length > 0)
    writer = _metrics_writer(cfg, model, workdir, start)
    evaluator = _sts_eval(cfg, model, mesh, state_shardings(model, tx, mesh).params) if cfg.eval_sts_path else None
    try:
      return _loop(cfg, model, mesh, step_fn, state, ckpt, _Logger(writer, cfg.log_every, start), start, end,
                   stop, evaluator)
    finally:
      writer.close()
  finally:
    ckpt.close()  # waits for the last checkpoint write


def check_before_building(cfg: TrainConfig, mesh: Mesh, workdir: str | None = None) -> None:
  """What can be checked before the model is built (gtr-large may first be downloaded) and MEDI read."""
  shards = shd.batch_size_multiple(mesh)
  if cfg.batch_size % (shards * cfg.grad_cache_chunks):
    chunks = f" x grad_cache_chunks ({cfg.grad_cache_chunks})" if cfg.grad_cache_chunks > 1 else ""
    raise ConfigError(f"BATCH_SIZE {cfg.batch_size} is not a multiple of data*fsdp ({shards}, mesh "
                      f"{dict(mesh.shape)}){chunks}; change BATCH_SIZE, MeshConfig or TrainConfig.grad_cache_chunks.")
  try:
    shd.check_host_rows(mesh, cfg.batch_size)
  except ValueError as e:
    raise ConfigError(f"BATCH_SIZE {cfg.batch_size} on mesh {dict(mesh.shape)}: {e}") from None
  _require_medi_path(cfg)
  try:
    from instructor_jax.medi_paths import locate_medi_file
    locate_medi_file(cfg.medi_path)  # a remote one is only looked up here, and fetched once per host later
    if cfg.eval_sts_path:  # a bad file fails now, not at the first checkpoint
      from instructor_jax.evaluate import read_sts
      read_sts(cfg.eval_sts_path)
  except FileNotFoundError as e:
    raise MissingPathError(str(e)) from None
  train_compiler_options(cfg.xla_options)  # an unknown option name fails now, not after the model is built
  _check_attention_backend(cfg.attention_impl, mesh)
  if workdir is not None and "://" not in workdir and os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"--workdir {workdir} is a file; expected a directory (new, or a run's workdir to resume).")
  if workdir is not None:  # every host: all reach the workdir (the compilation cache; process 0 the metrics)
    train_outputs.check_remote_workdir(workdir)
  init = cfg.init_checkpoint
  resuming = workdir is not None and orbax_io.is_orbax_checkpoint(workdir)  # then INIT_CHECKPOINT is not read
  if (init and not resuming and "://" not in init and not looks_like_hub_id(init)
      and not os.path.exists(os.path.expanduser(init))):
    raise MissingPathError(f"INIT_CHECKPOINT {init}: no such directory (a local path; a Hub id has the form "
                           "owner/name).")


def _check_attention_backend(impl: str, mesh: Mesh) -> None:
  """"cudnn" and "tpu_flash" name one platform's kernels: elsewhere they would fail inside the first
  step, after the model is built and MEDI read."""
  platform = mesh.devices.flat[0].platform
  needs = {"cudnn": "gpu", "tpu_flash": "tpu"}.get(impl)
  if needs is not None and platform != needs:
    raise ConfigError(f"TrainConfig.attention_impl {impl!r} runs on {needs.upper()}s only, and this mesh is on "
                      f"{platform.upper()}; use 'auto' (each platform's best kernel) or 'xla'.")


def _require_medi_path(cfg: TrainConfig) -> None:
  if not cfg.medi_path:
    raise ConfigError("TrainConfig.medi_path is not set; bind MEDI_PATH (e.g. --gin_bindings=\"MEDI_PATH = "
                      "'data/medi_sample.jsonl'\") to a MEDI .json/.jsonl file or the directory holding one.")


class RunRecords(list):
  """The metric records a run logged; `stopped_early` names what ended it before its last step, if anything."""

  stopped_early: Optional[str] = None


def _metrics_writer(cfg: TrainConfig, model: InstructorConfig, workdir: str,
                    start: int) -> train_outputs.MetricsWriter:
  return train_outputs.MetricsWriter(
      workdir, chief=jax.process_index() == 0, start_step=start, total_steps=cfg.train_steps, batch_size=cfg.batch_size,
      num_devices=jax.device_count(), device_peak_flops=train_outputs.peak_flops(jax.devices()[0].device_kind))


def _sts_eval(cfg: TrainConfig, model: InstructorConfig, mesh, param_shardings):
  from instructor_jax.medi_batches import sentencepiece_encode_fn
  from instructor_jax.train_eval import StsEval
  # The training tokenisation (HF's ids), at most doc_len tokens per text.
  return StsEval(cfg.eval_sts_path, model, mesh, param_shardings, cfg.eval_instruction, cfg.doc_len,
                 sentencepiece_encode_fn())


def _evaluate(evaluator, state: TrainState, values: dict[str, float]):
  """Adds the evaluation to `values`; a failing evaluation (e.g. out of memory) warns and is switched
  off for the rest of the run rather than ending it (the checkpoint is already saved)."""
  try:
    values.update(evaluator(state.params))
    return evaluator
  except Exception as e:  # noqa: BLE001 - any failure of the side job, reported by name
    print(f"warning: the STS evaluation failed ({type(e).__name__}: {str(e)[:300]}); training goes on without "
          "it. `python -m instructor_jax.evaluate` scores the saved checkpoints.", file=sys.stderr, flush=True)
    return None


def _loop(cfg: TrainConfig, model: InstructorConfig, mesh, step_fn, state: TrainState, ckpt: TrainCheckpointer,
          log: "_Logger", start: int, end: int, stop: StopFlag, evaluator=None) -> RunRecords:
  """Steps start..end; metrics of step n are fetched while step n+1 runs; saves only checked states;
  `evaluator` (train_eval.StsEval) scores the parameters of every checkpoint but a preemption's."""
  meta = run_meta(cfg)
  pending = None
  compiled: set[tuple[int, int]] = set()  # (query, document) lengths, or (packed rows, pack_length), run at
  shards = shd.batch_size_multiple(mesh)
  local_blocks = shards // jax.process_count()
  stop.started = True
  if stop.signal is not None:
    raise StoppedBeforeStart(signal.Signals(stop.signal).name)
  try:
    for step, task, local in batches(cfg, start, end - start, shards):
      if step == 0:
        # The largest shape first, so that a batch that does not fit in memory fails now rather than
        # at the first batch whose texts reach query_len / doc_len (hours in, and again on every
        # resume). Padding further changes nothing but float rounding and the dropout masks, and
        # depends on the step alone, so a resumed run still equals an unbroken one.
        chunks = cfg.grad_cache_chunks
        local = (medi_packing.pad_rows(local, medi_packing.max_rows(cfg.batch_size // shards, chunks), local_blocks,
                                       chunks) if cfg.pack_length else pad_batch_to(local, cfg.query_len, cfg.doc_len))
      if cfg.pack_length:
        lengths = (local["packed_ids"].shape[0] * jax.process_count(), cfg.pack_length)
        what = f"{lengths[0]} packed rows of {lengths[1]} tokens"
        why = ("step 1 runs with one row per text, so that a batch too large for memory fails now" if step == 0
               else "a new row count")
      else:
        lengths = (local["query_ids"].shape[1], local["pos_ids"].shape[1])
        what = f"query length {lengths[0]}, document length {lengths[1]}"
        why = ("step 1 runs at query_len / doc_len, so that a batch too large for memory fails now" if step == 0
               else "a new pair of TrainConfig.length_buckets")
      new_shape = lengths not in compiled
      if new_shape and jax.process_index() == 0:
        print(f"step {step + 1}: compiling the step for {what} ({why}; read from the compilation cache if "
              "compiled before)", flush=True)
      compiled.add(lengths)
      began = time.time()
      state, metrics = step_fn(state, shd.global_batch(local, mesh))
      if new_shape:  # the call returns once compiled and dispatched: its time is compiling, not training
        log.exclude(time.time() - began)
      if pending is not None:
        log(*_fetch(pending))
      done = step + 1
      # What the matmuls see this step (its lengths are the batch's buckets), for tokens/s and MFU.
      if cfg.pack_length:
        cost = {"padded_tokens": lengths[0] * lengths[1],
                "flops": train_outputs.packed_step_flops(model, *lengths, texts=3 * cfg.batch_size)}
      else:
        cost = {"padded_tokens": cfg.batch_size * (lengths[0] + 2 * lengths[1]),
                "flops": train_outputs.train_step_flops(model, cfg.batch_size, *lengths)}
      pending = (done, task, metrics, cost)
      # A signal during the last step is no early stop: the run ends there anyway, finished.
      notice = stop.signal is not None or (jax.process_count() > 1 and ckpt.reached_preemption(done))
      preempted = notice and done < end
      if preempted or done == end or done % cfg.checkpoint_every == 0:
        # Only a state whose own loss was checked finite is ever saved.
        logged_step, task_name, values = _fetch(pending)
        ckpt.save(done, state, architecture(model), meta, force=True)
        if evaluator is not None and not preempted:  # a preempted host has seconds, not minutes
          began = time.time()
          evaluator = _evaluate(evaluator, state, values)
          log.exclude(time.time() - began, "eval_seconds")  # not training: out of step_seconds, tokens/s, MFU
        log(logged_step, task_name, values, force=True)
        pending = None
      if preempted:
        why = "a preemption notice" if stop.signal is None else signal.Signals(stop.signal).name
        print(f"stopping at step {done} on {why}; checkpoint saved in {ckpt.directory}. "
              f"Run the same command to resume (exit status {EXIT_STOPPED_EARLY}).", flush=True)
        log.records.stopped_early = why
        break
  except NonFiniteLossError as e:
    ckpt.wait()
    good = ckpt.latest_step()
    where = "none" if good is None else f"{ckpt.directory}/{good}"
    raise NonFiniteLossError(f"{e}. Training stopped; the last good checkpoint is {where} (untouched). Lower "
                             "the learning rate, raise the temperature, or check this task's data.") from None
  return log.records


class _Logger:
  """Writes a record every `every` steps (and when forced); throughput spans the steps since the last one."""

  def __init__(self, writer: train_outputs.MetricsWriter, every: int, start: int):
    self.writer, self.every = writer, every
    self.last_step, self.last_time = start, None
    self.sums = dict.fromkeys(self.SUMMED, 0.0)
    self.excluded = dict.fromkeys(self.EXCLUDED, 0.0)  # seconds since the last record that were not steps
    self.records = RunRecords()

  SUMMED = ("real_tokens", "padded_tokens", "flops")  # per step, averaged over the steps of a record
  EXCLUDED = ("compile_seconds", "eval_seconds")  # compiling a new shape; the STS evaluation at a checkpoint

  def exclude(self, seconds: float, what: str = "compile_seconds") -> None:
    """Leaves `seconds` out of the current record's step time, logged as `what`."""
    self.excluded[what] += seconds

  def __call__(self, step: int, task: str, values: dict[str, float], force: bool = False) -> None:
    for k in self.SUMMED:
      self.sums[k] += values.pop(k, 0.0)
    if not force and step % self.every and self.records:
      return
    now = time.time()
    # The first record of a run includes the first compilation, so it reports no throughput.
    steps = max(step - self.last_step, 1)
    away = sum(self.excluded.values())
    seconds = None if self.last_time is None else max(now - self.last_time - away, 1e-9) / steps
    if self.last_time is not None:
      values.update({k: v for k, v in self.excluded.items() if v})
    record = self.writer.write(step, task, values, seconds, **{k: v / steps for k, v in self.sums.items()})
    self.records.append(record)
    self.last_step, self.last_time, self.sums = step, now, dict.fromkeys(self.SUMMED, 0.0)
    self.excluded = dict.fromkeys(self.EXCLUDED, 0.0)


# Mistakes in the run's settings or inputs. Their messages name the setting, file or record, what was
# expected and what to do, so the command line prints them in one line (status 2), as embed, convert and
# evaluate do; any other exception keeps its traceback.
USER_ERRORS = (ConfigError, CheckpointError, orbax_io.OrbaxCheckpointError, MediFormatError, EvalDataError,
               DirectoryInUseError)


def main(argv: list[str] | None = None) -> int:
  flags = parse_flags(sys.argv[1:] if argv is None else argv, __doc__.split("\n")[0])
  try:
    maybe_initialize_distributed(flags)
    warn_if_gpus_left_idle()
    use_persistent_compilation_cache(flags.workdir)
    parse_gin(flags.gin_file, flags.gin_bindings)
    cfg, optim, mesh_config = gin_configs()
    check_macros_used(flags.gin_bindings, gin.operative_config_str())
    records = train(cfg, optim, mesh_config, flags.workdir, gin.operative_config_str())
  except NonFiniteLossError as e:
    print(f"error: non-finite loss at {e}", file=sys.stderr, flush=True)
    return 1
  except USER_ERRORS as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 2
  return EXIT_STOPPED_EARLY if records.stopped_early else 0


if __name__ == "__main__":
  sys.exit(main())
