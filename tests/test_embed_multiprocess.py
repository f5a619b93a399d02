"""The embed job across real processes: SIGKILL mid-run then restart, and a jax.distributed pair."""

import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from embed_support import base_args, read_output, sentences, tiny_model, write_jsonl
from instructor_jax import embed

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))

RUN = """
import sys
sys.path.insert(0, {tests!r})
from embed_support import tiny_model
from instructor_jax import embed
embed.main(sys.argv[1:], model=tiny_model())
"""

DISTRIBUTED = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address="127.0.0.1:{port}", num_processes=2, process_id=int(sys.argv[1]))
sys.path.insert(0, {tests!r})
from embed_support import tiny_model
from instructor_jax import embed
s = embed.main(sys.argv[2:], model=tiny_model())
print("RESULT", jax.process_index(), jax.process_count(), len(jax.local_devices()), s["parts_written"],
      bool(s["manifest"]))
"""


def _sidecars(out):
  parts = os.path.join(out, "_parts")
  return [n for n in os.listdir(parts) if n.endswith(".json")] if os.path.isdir(parts) else []


@pytest.mark.slow
def test_sigkill_mid_run_then_restart(tmp_path):
  path = write_jsonl(str(tmp_path / "in.jsonl"), [{"text": t} for t in sentences(3000, seed=21)])
  out = str(tmp_path / "out")
  args = base_args([path], out, "--rows-per-part", "100")  # 30 parts
  proc = subprocess.Popen([sys.executable, "-c", RUN.format(tests=TESTS_DIR), *args], env=dict(os.environ),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  deadline = time.monotonic() + 240
  while len(_sidecars(out)) < 3 and proc.poll() is None and time.monotonic() < deadline:
    time.sleep(0.005)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  committed = len(_sidecars(out))
  leftovers = sorted(n for n in os.listdir(out) if n.startswith("."))
  print(f"killed with {committed} of 30 parts committed; leftovers: {leftovers}")
  assert 3 <= committed < 30, f"the kill should land mid-run ({committed} parts committed)"
  assert not os.path.exists(os.path.join(out, "_manifest.json"))
  model = tiny_model()
  summary = embed.main(args, model=model)
  assert summary["parts_already_complete"] >= committed and summary["parts_written"] == 30 - summary[
      "parts_already_complete"]
  ids, emb = read_output(out)
  assert ids == list(range(3000))  # exactly one embedding per row
  ref = str(tmp_path / "reference")
  embed.main(args[:args.index("--output") + 1] + [ref] + args[args.index("--output") + 2:], model=model)
  np.testing.assert_array_equal(emb, read_output(ref)[1])


@pytest.mark.slow
def test_jax_distributed_two_processes(tmp_path):
  path = write_jsonl(str(tmp_path / "in.jsonl"), [{"text": t} for t in sentences(90, seed=22)])
  out = str(tmp_path / "out")
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  script = DISTRIBUTED.format(port=port, tests=TESTS_DIR)
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  procs = [subprocess.Popen([sys.executable, "-c", script, str(i), *base_args([path], out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  results = [p.communicate(timeout=300) for p in procs]
  for p, (stdout, stderr) in zip(procs, results):
    assert p.returncode == 0, stderr[-3000:]
  lines = sorted(line for stdout, _ in results for line in stdout.splitlines() if line.startswith("RESULT"))
  # 6 parts of 16 rows: process 0 takes 0, 2, 4 and writes the manifest after the barrier.
  assert lines == ["RESULT 0 2 2 3 True", "RESULT 1 2 2 3 False"]
  ids, emb = read_output(out)
  assert ids == list(range(90))
  np.testing.assert_allclose(emb, tiny_model().encode(sentences(90, seed=22)), atol=1e-6)
