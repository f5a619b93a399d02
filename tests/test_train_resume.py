"""Resume == uninterrupted, a non-finite loss keeps the last good checkpoint, SIGTERM saves and exits 75."""

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from instructor_jax import dir_lock, orbax_io, train_stop
from instructor_jax.config import ConfigError
from instructor_jax.optim import OptimConfig
from instructor_jax.sharding import MeshConfig
from instructor_jax.train import NonFiniteLossError, TrainConfig, train

REPO = pathlib.Path(__file__).resolve().parents[1]
SAMPLE = str(REPO / "data" / "medi_sample.jsonl")
# Dropout on, on purpose: the per-step rng (fold_in(seed, step)) must resume too; and so must the
# steps' padded lengths (length buckets below query_len / doc_len: the sample's batches vary).
CONFIG = TrainConfig(medi_path=SAMPLE, model="tiny", train_steps=6, batch_size=8, query_len=48, doc_len=64,
                     temperature=0.05, dtype="float32", dropout_rate=0.1, checkpoint_every=100, log_every=1,
                     length_buckets=(32,))
OPTIM = OptimConfig(learning_rate=1e-3)
MESH = MeshConfig(data=2, fsdp=2, tensor=2)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  return workdir, train(CONFIG, OPTIM, MESH, workdir)


def test_resume_equals_uninterrupted(uninterrupted, tmp_path):
  workdir_a, records_a = uninterrupted
  workdir_b = str(tmp_path / "b")
  first = train(CONFIG.__class__(**{**CONFIG.__dict__, "stop_after_steps": 3}), OPTIM, MESH, workdir_b)
  assert [r["step"] for r in first] == [1, 2, 3] and orbax_io.latest_step(workdir_b) == 3
  second = train(CONFIG, OPTIM, MESH, workdir_b)
  assert [r["step"] for r in second] == [4, 5, 6]
  assert [r["task"] for r in first + second] == [r["task"] for r in records_a]
  np.testing.assert_allclose([r["loss"] for r in first + second], [r["loss"] for r in records_a], rtol=1e-6)
  _, params_a = orbax_io.restore_params(workdir_a)
  _, params_b = orbax_io.restore_params(workdir_b, step=6)
  flat_a, flat_b = _flatten(params_a), _flatten(params_b)
  assert flat_a.keys() == flat_b.keys()
  for k in flat_a:
    np.testing.assert_allclose(flat_b[k], flat_a[k], atol=1e-6, err_msg=k)
  lines = (pathlib.Path(workdir_b) / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(x)["step"] for x in lines] == [1, 2, 3, 4, 5, 6]


def test_steps_pad_to_their_buckets_and_report_what_they_compute(tmp_path, capsys):
  records = train(TrainConfig(**{**CONFIG.__dict__, "train_steps": 4}), OPTIM, MESH, str(tmp_path / "w"))
  compiled = re.findall(r"compiling the step for query length (\d+), document length (\d+)", capsys.readouterr().out)
  # Step 1 runs at the largest shape (a batch too large fails at once); steps 2-4 at their buckets.
  assert compiled[0] == ("48", "64") and len(compiled) == len(set(compiled)) == 2
  lengths = {(int(q), int(d)) for q, d in compiled}
  assert all(q in (32, 48) and d in (32, 64) for q, d in lengths)
  for r in records[1:]:  # the first record has no throughput (it includes compiling)
    padded = r["tokens_per_s"] * r["step_seconds"]
    assert any(abs(padded - 8 * (q + 2 * d)) < 1e-6 * padded for q, d in lengths), (padded, lengths)
    assert r["real_tokens_per_s"] <= r["tokens_per_s"]
  # Compiling a new shape is reported on its own, not counted as step time.
  assert [r for r in records[1:] if r.get("compile_seconds", 0) > 0]


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(uninterrupted):
  workdir, _ = uninterrupted
  _, good = orbax_io.restore_params(workdir, step=6)
  # lr 1e35 at step 7 sends the parameters to ~1e35 (their norm overflows float32) while step 7's
  # loss, computed before the update, is still finite: the step-7 state must not be saved.
  exploding = CONFIG.__class__(**{**CONFIG.__dict__, "train_steps": 10, "checkpoint_every": 1})
  with pytest.raises(NonFiniteLossError, match=r"step 7 .*param norm inf.*last good checkpoint is .*checkpoints/6"):
    train(exploding, OptimConfig(learning_rate=1e35, warmup_fraction=0.0), MESH, workdir)
  assert orbax_io.all_steps(workdir) == [6]
  _, after = orbax_io.restore_params(workdir, step=6)
  for k, v in _flatten(good).items():
    np.testing.assert_array_equal(_flatten(after)[k], v)


def test_init_checkpoint_is_used_and_a_workdir_checkpoint_wins(uninterrupted, tmp_path):
  source, _ = uninterrupted
  _, source_params = orbax_io.restore_params(source, step=6)
  source_norm = np.sqrt(sum(float(np.sum(np.square(v))) for v in _flatten(source_params).values()))
  frozen = OptimConfig(learning_rate=0.0)  # parameters stay as loaded, so param_norm shows where they came from
  cfg = CONFIG.__class__(**{**CONFIG.__dict__, "init_checkpoint": source, "train_steps": 2, "stop_after_steps": 1})
  first = train(cfg, frozen, MESH, str(tmp_path / "w"))
  np.testing.assert_allclose(first[0]["param_norm"], source_norm, rtol=1e-5)
  # Resuming never reads INIT_CHECKPOINT again (here it no longer exists).
  gone = CONFIG.__class__(**{**cfg.__dict__, "init_checkpoint": str(tmp_path / "deleted"), "stop_after_steps": None})
  second = train(gone, frozen, MESH, str(tmp_path / "w"))
  assert [r["step"] for r in second] == [2]
  np.testing.assert_allclose(second[0]["param_norm"], source_norm, rtol=1e-5)


def test_sigterm_saves_and_exits_cleanly(tmp_path):
  workdir = tmp_path / "preempted"
  cmd = [sys.executable, "-m", "instructor_jax.train", "--gin_file=gin_configs/runs/quickstart_cpu.gin",
         "--gin_bindings=TRAIN_STEPS = 100000", "--gin_bindings=TrainConfig.log_every = 1", f"--workdir={workdir}"]
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  metrics = workdir / "metrics.jsonl"
  deadline = time.time() + 120
  while not (metrics.exists() and metrics.read_text().count("\n") >= 3):
    assert proc.poll() is None, proc.stdout.read()
    assert time.time() < deadline, "no metrics after 120 s"
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 75, out  # stopped early, with a checkpoint: "run again"
  stopped = int(out.split("stopping at step ")[1].split()[0])
  assert orbax_io.latest_step(str(workdir)) == stopped, out
  assert json.loads(metrics.read_text().splitlines()[-1])["step"] == stopped


def _flatten(tree, prefix=""):
  if isinstance(tree, dict):
    return {k2: v2 for k, v in tree.items() for k2, v2 in _flatten(v, f"{prefix}{k}/").items()}
  return {prefix.rstrip("/"): np.asarray(tree)}


def test_restart_reuses_the_tokenised_medi_cache(tmp_path, monkeypatch, capsys):
  """A restarted run memory-maps the tokenised corpus instead of re-tokenising MEDI, with identical batches."""
  from instructor_jax.train import batches
  monkeypatch.setenv("INSTRUCTOR_JAX_CACHE", str(tmp_path))
  first = list(batches(CONFIG, 2, 3, shards=1))
  out = capsys.readouterr().out
  assert "using the tokenised cache" not in out
  validation = next(line for line in out.splitlines() if " valid records of " in line)
  second = list(batches(CONFIG, 2, 3, shards=1))
  out = capsys.readouterr().out
  assert "using the tokenised cache" in out
  assert validation in out  # the validation summary (what was skipped) is shown on cached runs too
  assert [(s, t) for s, t, _ in first] == [(s, t) for s, t, _ in second]
  for (_, _, a), (_, _, b) in zip(first, second):
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_metrics_past_the_resumed_checkpoint_are_not_duplicated(tmp_path):
  """A run killed after its last checkpoint (step 3) logged steps 4-5; resuming logs them again, once."""
  from instructor_jax.train_outputs import MetricsWriter
  path = tmp_path / "metrics.jsonl"
  path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 6)))
  writer = MetricsWriter(str(tmp_path), chief=True, total_steps=6, batch_size=8, num_devices=1,
                         device_peak_flops=None, start_step=3)
  for step in (4, 5):
    writer.write(step, "task", {"loss": 0.5}, None)
  writer.close()
  assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3, 4, 5]
  # TensorBoard: the resumed run's event file tells it to hide other files' events from step 4 on.
  from tensorboardX.proto import event_pb2
  starts = []
  for events in (tmp_path / "tensorboard").iterdir():
    data = events.read_bytes()
    while data:  # TFRecord: length (8 bytes), its CRC (4), the record, its CRC (4)
      n = int.from_bytes(data[:8], "little")
      event = event_pb2.Event.FromString(data[12:12 + n])
      data = data[16 + n:]
      if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
        starts.append(event.step)
  assert starts == [4]


@pytest.mark.parametrize("field,value,message", [
    ("keep_checkpoints", 0, "keep_checkpoints=0; expected an integer >= 1 or None"),
    ("batch_size", "16", "batch_size='16'; expected an integer >= 1"),
    ("data_seed", -1, "data_seed=-1; expected an integer >= 0"),
    ("query_len", 1, "query_len=1; expected an integer >= 2"),
    ("mixing_temperature", 0.0, "mixing_temperature=0.0; expected > 0"),
    ("dtype", "fp16", "dtype='fp16'; expected one of ('bfloat16', 'float32')"),
    ("loss", "foo", "loss='foo'; expected one of ['gtr', 'instructor']"),
    ("dropout_rate", 1.0, "dropout_rate=1.0; expected 0 <= rate < 1"),
    ("remat_policy", "all", "remat_policy='all'; expected one of"),
    ("attention_impl", "tpu_flash", "attention_impl='tpu_flash' needs length_buckets that are multiples of 128"),
    ("length_buckets", "64", "length_buckets='64'; expected a tuple of integers >= 2"),
    ("length_buckets", (64, 1), "length_buckets=(64, 1); expected a tuple of integers >= 2"),
])
def test_config_errors_name_the_field(field, value, message):
  with pytest.raises(ValueError, match=re.escape(f"TrainConfig.{message}")):
    TrainConfig(**{**CONFIG.__dict__, field: value})


def test_tpu_flash_needs_dropout_0_and_lengths_of_128s():
  flash = {**CONFIG.__dict__, "attention_impl": "tpu_flash", "length_buckets": (), "query_len": 128, "doc_len": 256}
  with pytest.raises(ValueError, match=re.escape("TrainConfig.attention_impl='tpu_flash' needs no attention dropout")):
    TrainConfig(**flash)
  assert TrainConfig(**{**flash, "dropout_rate": 0.0, "length_buckets": [256, 128, 128]}).length_buckets == (128, 256)
  assert TrainConfig(**{**flash, "attention_dropout_rate": 0.0}).attention_dropout == 0.0


def test_cudnn_needs_half_precision_and_dropout_0():
  cudnn = {**CONFIG.__dict__, "attention_impl": "cudnn"}  # CONFIG: float32, dropout 0.1
  with pytest.raises(ValueError, match=re.escape("TrainConfig.attention_impl='cudnn' needs dtype bfloat16 or float16")):
    TrainConfig(**cudnn)
  with pytest.raises(ValueError, match=re.escape("TrainConfig.attention_impl='cudnn' needs no attention dropout")):
    TrainConfig(**{**cudnn, "dtype": "bfloat16"})
  with pytest.raises(ValueError, match=re.escape("needs no attention dropout")):
    TrainConfig(**{**cudnn, "dtype": "bfloat16", "dropout_rate": 0.0, "attention_dropout_rate": 0.1})
  assert TrainConfig(**{**cudnn, "dtype": "bfloat16", "dropout_rate": 0.0}).attention_impl == "cudnn"
  # The other dropouts may stay: only the attention weights' is the kernel's concern.
  assert TrainConfig(**{**cudnn, "dtype": "bfloat16", "attention_dropout_rate": 0}).attention_dropout == 0


@pytest.mark.parametrize("value", [-0.1, 1.0, "0", True, float("nan")])
def test_attention_dropout_rate_is_checked(value):
  with pytest.raises(ValueError, match=re.escape(f"TrainConfig.attention_dropout_rate={value!r}; expected None")):
    TrainConfig(**{**CONFIG.__dict__, "attention_dropout_rate": value})
  assert TrainConfig(**CONFIG.__dict__).attention_dropout == CONFIG.dropout_rate


def test_numpy_numbers_from_config_code_are_accepted():
  cfg = TrainConfig(**{**CONFIG.__dict__, "batch_size": np.int64(8), "temperature": np.float32(0.05), "seed": 0})
  assert cfg.batch_size == 8


def test_run_errors_come_before_the_model_is_built_or_the_workdir_is_written(tmp_path):
  chunks = TrainConfig(**{**CONFIG.__dict__, "grad_cache_chunks": 3})
  with pytest.raises(ValueError, match=r"BATCH_SIZE 8 .* x grad_cache_chunks \(3\)"):
    train(chunks, OPTIM, MESH, str(tmp_path / "w"))
  missing = TrainConfig(**{**CONFIG.__dict__, "medi_path": "no/such/medi.json"})
  with pytest.raises(FileNotFoundError, match="relative path, read from the current directory"):
    train(missing, OPTIM, MESH, str(tmp_path / "w"))
  no_init = TrainConfig(**{**CONFIG.__dict__, "init_checkpoint": str(tmp_path / "no_such_model")})
  with pytest.raises(FileNotFoundError, match=r"INIT_CHECKPOINT .*no_such_model: no such directory"):
    train(no_init, OPTIM, MESH, str(tmp_path / "w"))
  bad_xla = TrainConfig(**{**CONFIG.__dict__, "xla_options": {"xla_no_such_option": True}})
  with pytest.raises(ValueError, match="no compiler option 'xla_no_such_option'"):
    train(bad_xla, OPTIM, MESH, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


def test_a_finished_workdir_is_left_alone(uninterrupted, capsys):
  workdir, _ = uninterrupted
  before = (pathlib.Path(workdir) / "config.gin").read_text()
  shorter = TrainConfig(**{**CONFIG.__dict__, "train_steps": 4})
  assert train(shorter, OPTIM, MESH, workdir, gin_text="TRAIN_STEPS = 4") == []
  out = capsys.readouterr().out
  assert "warning: resuming" in out and "TRAIN_STEPS 4 (checkpoint: 6)" in out
  assert "nothing to do: " in out and "is at step 6 and TRAIN_STEPS is 4" in out
  assert (pathlib.Path(workdir) / "config.gin").read_text() == before


def test_sigterm_while_the_model_is_built_exits_as_stopped_early(tmp_path, monkeypatch):
  """Loading INIT_CHECKPOINT can take minutes: a SIGTERM then must still mean "run again" (75), not 143."""
  import os
  from instructor_jax import train as train_module
  real_build = train_module.build_state

  reached = []

  def build_and_get_terminated(*args):
    try:  # as library code around a download does: the stop must get through `except Exception`
      os.kill(os.getpid(), signal.SIGTERM)
    except Exception:  # noqa: BLE001
      pass
    reached.append(True)  # not reached: loading stops at once
    return real_build(*args)

  monkeypatch.setattr(train_module, "build_state", build_and_get_terminated)
  before = signal.getsignal(signal.SIGTERM)
  records = train(CONFIG, OPTIM, MESH, str(tmp_path / "w"))
  assert records == [] and records.stopped_early == "SIGTERM" and not reached
  assert orbax_io.latest_step(str(tmp_path / "w")) is None
  assert signal.getsignal(signal.SIGTERM) == before  # the handler is handed back


def test_a_stop_signal_landing_in_a_gc_callback_is_delivered_again_not_dropped(capsys):
  """An exception raised in a garbage-collector callback is printed as "ignored" and dropped: a SIGTERM
  handled there (JAX registers such a callback) must still stop the load, a moment later."""
  import gc
  import os
  armed = []

  def callback(phase, info):
    if armed and phase == "start":
      armed.clear()
      os.kill(os.getpid(), signal.SIGTERM)
      for _ in range(1000):  # the handler runs at one of these bytecodes, inside the callback
        pass

  class Callback:  # a callable object, not a function: its __call__ is what runs
    def __call__(self, phase, info):
      callback(phase, info)

  for registered in (callback, Callback()):
    stop = train_stop.StopFlag()
    armed.append(True)
    gc.callbacks.append(registered)
    try:
      with pytest.raises(train_stop.StoppedBeforeStart, match="SIGTERM"):
        gc.collect()
        time.sleep(2)  # the redelivered signal interrupts this
    finally:
      gc.callbacks.remove(registered)
      stop.restore()
    assert "Exception ignored" not in capsys.readouterr().err


def test_a_pending_redelivery_is_cancelled_when_the_handlers_are_handed_back(monkeypatch):
  """train() may end within the redelivery's 10 ms: the signal must not reach the previous handler."""
  import gc
  import os
  monkeypatch.setattr(train_stop, "_REDELIVERY_S", 1.0)  # still pending when restore() runs, however slow CI is
  got = []
  previous = signal.signal(signal.SIGTERM, lambda *a: got.append(a[0]))
  try:
    stop = train_stop.StopFlag()

    def callback(phase, info):
      if phase == "start" and not got and stop._timer is None:
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):
          pass

    gc.callbacks.append(callback)
    try:
      gc.collect()
    finally:
      gc.callbacks.remove(callback)
    assert stop._timer is not None  # redelivery pending
    stop.restore()
    time.sleep(1.5)
    assert got == [] and stop._timer is None
  finally:
    signal.signal(signal.SIGTERM, previous)


def test_resuming_with_other_settings_warns_and_keeps_the_old_config(tmp_path, capsys):
  workdir = str(tmp_path / "w")
  first = TrainConfig(**{**CONFIG.__dict__, "stop_after_steps": 2})
  train(first, OPTIM, MESH, workdir, gin_text="first")
  # An attempt that fails before its first checkpoint leaves its config.gin, which never trained: the
  # archive of what trained until step 2 must not take it.
  with pytest.raises(ConfigError, match="BATCH_SIZE 2000: no MEDI task has that many examples"):
    train(TrainConfig(**{**CONFIG.__dict__, "batch_size": 2000}), OPTIM, MESH, workdir, gin_text="failed")
  other_medi = str(tmp_path / "other_medi.jsonl")
  shutil.copyfile(CONFIG.medi_path, other_medi)
  changed = TrainConfig(**{**CONFIG.__dict__, "mixing_temperature": 3.0, "rate_cap": 1000, "model": "gtr-base",
                            "medi_path": other_medi, "doc_len": CONFIG.doc_len // 2, "stop_after_steps": 1})
  capsys.readouterr()
  train(changed, OPTIM, MESH, workdir, gin_text="second")
  out = capsys.readouterr().out
  assert (f"medi_path {other_medi!r} (checkpoint: {CONFIG.medi_path!r}), mixing_temperature 3.0 (checkpoint: 1.0), "
          f"rate_cap 1000 (checkpoint: None), doc_len {CONFIG.doc_len // 2} (checkpoint: {CONFIG.doc_len}); the data "
          "stream will") in out
  assert "which was started with model 'tiny'; the checkpoint's model is what trains on" in out
  assert (tmp_path / "w" / "config-until-step2.gin").read_text() == "first"
  assert (tmp_path / "w" / "config.gin").read_text() == "second"


def test_resuming_on_a_medi_file_replaced_at_the_same_path_warns(tmp_path, capsys):
  medi = tmp_path / "medi.jsonl"
  shutil.copyfile(CONFIG.medi_path, medi)
  cfg = TrainConfig(**{**CONFIG.__dict__, "medi_path": str(medi), "stop_after_steps": 1})
  workdir = str(tmp_path / "w")
  train(cfg, OPTIM, MESH, workdir)
  size = medi.stat().st_size
  medi.write_text(medi.read_text() * 2)  # another stream, same path
  capsys.readouterr()
  train(cfg, OPTIM, MESH, workdir)
  assert f"medi_bytes {2 * size} (checkpoint: {size}); the data stream will differ." in capsys.readouterr().out


def test_a_second_trainer_on_a_busy_workdir_is_refused(tmp_path):
  workdir = tmp_path / "w"
  workdir.mkdir()
  held = dir_lock.lock_directory(str(workdir))  # as a running trainer holds it
  try:
    with pytest.raises(RuntimeError, match=r"is in use by another training process \(pid \d+ on "):
      train(CONFIG, OPTIM, MESH, str(workdir))
  finally:
    held.close()
  assert [r["step"] for r in train(TrainConfig(**{**CONFIG.__dict__, "stop_after_steps": 1}), OPTIM, MESH,
                                   str(workdir))] == [1]


def test_a_filesystem_without_locks_warns_and_trains(tmp_path, monkeypatch, capsys):
  import errno
  import fcntl

  def no_locks(*args):
    raise OSError(errno.ENOSYS, "Function not implemented")

  monkeypatch.setattr(fcntl, "flock", no_locks)
  assert dir_lock.lock_directory(str(tmp_path)) is None
  assert "warning: cannot lock" in capsys.readouterr().err


def test_a_workdir_given_with_tilde_is_the_home_one(tmp_path, monkeypatch):
  """`--workdir=~/w` reaches train() unexpanded; it must not become a directory named "~"."""
  monkeypatch.setenv("HOME", str(tmp_path))
  monkeypatch.chdir(tmp_path)
  train(TrainConfig(**{**CONFIG.__dict__, "stop_after_steps": 1}), OPTIM, MESH, "~/w")
  assert orbax_io.latest_step(str(tmp_path / "w")) == 1 and not (tmp_path / "~").exists()


def test_the_trainer_keeps_compiled_steps_on_disk_unless_told_where(tmp_path):
  """One host: under the cache root. Several with a gs:// workdir: in the workdir, since JAX writes
  entries from process 0 only (and a TPU created again after a preemption starts with empty disks)."""
  probe = ("import sys, jax; from instructor_jax import train_launch; jax.process_count = lambda: int(sys.argv[2]); "
           "train_launch.use_persistent_compilation_cache(sys.argv[1]); "
           "print(jax.config.jax_compilation_cache_dir, jax.config.jax_compilation_cache_max_size, "
           "jax.config.jax_persistent_cache_enable_xla_caches)")
  base = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  xla = "xla_gpu_per_fusion_autotune_cache_dir"  # JAX's default: XLA:GPU's autotune cache beside its entries
  local = f"{tmp_path / 'jax_compilation_cache'} {8 << 30} {xla}"
  for extra, args, want in (({}, ("/w", "1"), local), ({}, ("gs://b/w", "1"), local), ({}, ("/w", "2"), local),
                            # XLA's own file layer cannot write gs://: JAX's entries only there
                            ({}, ("gs://b/w/", "2"), "gs://b/w/jax_compilation_cache -1 none"),
                            # the user's, as they set it
                            ({"JAX_COMPILATION_CACHE_DIR": "/elsewhere"}, ("gs://b/w", "2"), f"/elsewhere -1 {xla}")):
    env = dict(base, INSTRUCTOR_JAX_CACHE=str(tmp_path), JAX_PLATFORMS="cpu", **extra)
    done = subprocess.run([sys.executable, "-c", probe, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == want, args


@pytest.mark.parametrize("flags, message", [
    (["--coordinator_address=10.0.0.1:1234"], "--coordinator_address given without --num_processes, --process_id"),
    (["--num_processes=2", "--process_id=0"], "--num_processes, --process_id given without --coordinator_address"),
    (["--process_id=1"], "--process_id given without --coordinator_address, --num_processes"),
    (["--coordinator_address=h:1", "--num_processes=2", "--process_id=2"], "--process_id 2 with --num_processes 2"),
])
def test_partial_distributed_flags_are_one_line_errors(tmp_path, capsys, flags, message):
  from instructor_jax.train import main
  assert main([f"--workdir={tmp_path / 'w'}", "--gin_file=gin_configs/runs/quickstart_cpu.gin", *flags]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_a_failed_join_by_hand_is_a_one_line_error(tmp_path, capsys, monkeypatch):
  def refuse(**kwargs):
    raise RuntimeError("DEADLINE_EXCEEDED: Barrier timed out")

  monkeypatch.setattr(jax.distributed, "initialize", refuse)
  from instructor_jax.train import main
  assert main([f"--workdir={tmp_path / 'w'}", "--gin_file=gin_configs/runs/quickstart_cpu.gin",
               "--coordinator_address=10.0.0.1:1234", "--num_processes=2", "--process_id=1"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: joining the other processes failed (RuntimeError: DEADLINE_EXCEEDED") and \
      err.count("\n") == 1, err


def test_a_process_with_fewer_gpus_than_its_host_has_is_warned(monkeypatch, caplog):
  import types

  from instructor_jax import train_launch
  gpu = types.SimpleNamespace(platform="gpu")
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(jax, "local_devices", lambda: [gpu])
  monkeypatch.setattr(jax, "local_device_count", lambda: 1)
  monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")  # what the launcher gives every task (--gres=gpu:4)
  for name in train_launch._LOCAL_PROCESS_ENV:
    monkeypatch.delenv(name, raising=False)
  train_launch.warn_if_gpus_left_idle()  # joined by hand: nothing to say
  assert not caplog.text
  monkeypatch.setenv("SLURM_STEP_TASKS_PER_NODE", "1(x2)")  # one task per node, JAX gave it one GPU
  train_launch.warn_if_gpus_left_idle()
  assert "the 1 process(es) on this host use 1 of its 4 GPUs" in caplog.text and "--ntasks-per-node=4" in caplog.text
  caplog.clear()
  monkeypatch.setenv("SLURM_STEP_TASKS_PER_NODE", "4(x2)")  # one task per GPU, as JAX's detection assumes
  train_launch.warn_if_gpus_left_idle()
  monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "4")
  train_launch.warn_if_gpus_left_idle()
  assert not caplog.text


def test_compiling_a_new_shape_is_left_out_of_the_step_time(monkeypatch):
  from instructor_jax import train as train_module
  clock = iter([100.0, 110.0])
  monkeypatch.setattr(train_module.time, "time", lambda: next(clock))
  written = []

  class Writer:
    def write(self, step, task, values, seconds, **per_step):
      written.append((step, seconds, dict(values)))
      return {}

  log = train_module._Logger(Writer(), every=1, start=0)
  log(1, "t", {"loss": 1.0})  # t = 100: the run's first record, no throughput
  log.exclude(8.0)
  log(3, "t", {"loss": 1.0})  # t = 110: 2 steps in 10 s, 8 s of them compiling
  assert written[0][1] is None and written[1][1] == 1.0 and written[1][2]["compile_seconds"] == 8.0
