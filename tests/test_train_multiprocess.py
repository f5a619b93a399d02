"""A real two-process run (CPU collectives over gloo) gives the losses of a one-process run."""

import json
import os
import pathlib
import re
import socket
import subprocess
import sys

import numpy as np

from instructor_jax import orbax_io
from instructor_jax.optim import OptimConfig
from instructor_jax.sharding import MeshConfig
from instructor_jax.train import TrainConfig, train

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURE = "tests/fixtures/tiny_instructor"  # an HF/sentence-transformers dir: every host loads it, keeps its shards
# Steps 1-4 pad to two (query, document) length pairs: both hosts must pick the same ones.
BINDINGS = [f"INIT_CHECKPOINT = '{FIXTURE}'", "TRAIN_STEPS = 4", "BATCH_SIZE = 8", "TrainConfig.query_len = 48",
            "TrainConfig.doc_len = 64", "TrainConfig.length_buckets = (32,)", "TrainConfig.dropout_rate = 0.1",
            "TrainConfig.log_every = 1", "MeshConfig.data = 2", "MeshConfig.fsdp = -1"]


re_lengths = re.compile(r"compiling the step for query length (\d+), document length (\d+)")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


WORKER = r"""
import sys
import jax
import numpy as np
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
from jax.sharding import Mesh
from instructor_jax import sharding as shd
from instructor_jax.losses import instructor_loss
# Interleave the hosts' devices, as a TPU topology may: host p's rows are not one contiguous block.
devices = sorted(jax.devices(), key=lambda d: (d.id % 2, d.process_index))
mesh = Mesh(np.array(devices).reshape(4, 1, 1), shd.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
rng = np.random.default_rng(0)
full = {k: rng.normal(size=(8, 5)).astype(np.float32) for k in ("q", "p", "n")}
p = jax.process_index()
local = {k: v[p * 4:(p + 1) * 4] for k, v in full.items()}
g = shd.global_batch(local, mesh)
owners = sorted(s.index[0].start for s in g["q"].addressable_shards)
loss, _ = jax.jit(lambda b: instructor_loss(b["q"], b["p"], b["n"], 0.1))(g)
print("RESULT", p, owners, float(loss), float(instructor_loss(full["q"], full["p"], full["n"], 0.1)[0]))
"""


def _run_pair(script: str, devices: int) -> tuple[list[subprocess.Popen], list[str]]:
  """Runs `script` as processes 0 and 1 of one jax.distributed job (argv: coordinator, process id)."""
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  procs = [subprocess.Popen([sys.executable, "-c", script, f"127.0.0.1:{port}", str(i)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  return procs, [p.communicate(timeout=120)[0] for p in procs]


def test_hosts_feed_non_contiguous_row_blocks():
  """Whatever rows the mesh gives a host's devices, the global batch is the same set of triples."""
  procs, outs = _run_pair(WORKER, devices=2)
  results = []
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out
    results.append(out.split("RESULT ")[1].split())
  assert results[0][1:3] == ["[0,", "4]"] and results[1][1:3] == ["[2,", "6]"]  # interleaved blocks
  for r in results:
    np.testing.assert_allclose(float(r[3]), float(r[4]), rtol=1e-5)


CORPUS_WORKER = r"""
import sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
from jax.experimental import multihost_utils
from instructor_jax import medi_batches
from instructor_jax.config import ConfigError

def task(name, n):
  ids = medi_batches.FieldArrays.from_lists([[5, 1]] * n, [0] * n)
  return medi_batches.TaskArrays(name, {f: ids for f in medi_batches.FIELDS})

p = jax.process_index()
medi_batches.check_same_corpus({"a": task("a", 4), "b": task("b", 3)}, multihost_utils.process_allgather)
print("SAME", p, flush=True)
try:
  medi_batches.check_same_corpus({"a": task("a", 4), "b": task("b", 3 + p)}, multihost_utils.process_allgather)
except ConfigError as e:
  print("DIFFER", p, e, flush=True)
"""


def test_hosts_that_read_another_corpus_all_stop_with_its_name():
  """The trainer's start-up check over real processes: every one of them raises, naming the one that differs."""
  procs, outs = _run_pair(CORPUS_WORKER, devices=1)
  for i, (p, out) in enumerate(zip(procs, outs)):
    assert p.returncode == 0 and f"SAME {i}" in out, out
    assert f"DIFFER {i} MEDI differs between the processes of this run: process 0 has 2 tasks, 7 examples, " \
           "process 1 has 2 tasks, 8 examples" in out, out


def test_two_processes_match_one(tmp_path):
  workdir = tmp_path / "two"
  sts = tmp_path / "sts.tsv"  # scored at the last checkpoint by both hosts together (train_eval.py)
  sts.write_text("4.5\tA man plays a guitar.\tA man is playing the guitar.\n0.5\tA cat sleeps.\tPrices rose.\n"
                 "3.0\tTwo dogs run.\tDogs are running.\n1.5\tA girl reads.\tA man plays a guitar.\n")
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
  procs = []
  for i in range(2):
    cmd = [sys.executable, "-m", "instructor_jax.train", "--gin_file=gin_configs/runs/quickstart_cpu.gin",
           *[f"--gin_bindings={b}" for b in BINDINGS], f"--gin_bindings=TrainConfig.eval_sts_path = '{sts}'",
           f"--workdir={workdir}",
           f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"]
    procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  outs = [p.communicate(timeout=240)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out
  assert len(set(re_lengths.findall(outs[0]))) == 2
  assert "initialised from hf:" in outs[0] and "2 process(es), 4 cpu device(s)" in outs[0] and "mesh {'data': 2, 'fsdp': 2, 'tensor': 1}" in outs[0]
  two = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]

  # The same run in this (8-device) process: one host feeding the whole global batch.
  cfg = TrainConfig(medi_path=str(REPO / "data" / "medi_sample.jsonl"), init_checkpoint=str(REPO / FIXTURE),
                    train_steps=4, batch_size=8,
                    query_len=48, doc_len=64, length_buckets=(32,), temperature=0.05, dtype="float32",
                    dropout_rate=0.1, log_every=1, eval_sts_path=str(sts))
  one = train(cfg, OptimConfig(learning_rate=1e-3), MeshConfig(data=2, fsdp=-1), str(tmp_path / "one"))
  assert [r["step"] for r in two] == [1, 2, 3, 4]
  assert [r["task"] for r in two] == [r["task"] for r in one]
  np.testing.assert_allclose([r["loss"] for r in two], [r["loss"] for r in one], rtol=1e-5)
  assert "eval_sts_spearman" in two[-1] and "eval_sts_spearman" not in two[-2]
  np.testing.assert_allclose(two[-1]["eval_sts_pearson"], one[-1]["eval_sts_pearson"], atol=1e-3)
  # Both processes wrote their shards of one checkpoint, readable as a whole.
  assert orbax_io.latest_step(str(workdir)) == 4
  _, params = orbax_io.restore_params(str(workdir))
  assert params["encoder"]["layers_0"]["mlp"]["wi"]["kernel"].shape == (16, 32)


def test_two_processes_pack_as_one(tmp_path):
  """Packed batches (TrainConfig.pack_length): each host packs its own batch shards' texts into their
  rows, and all hosts agree on the row counts; without dropout the losses are one process's."""
  workdir = tmp_path / "two"
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
  bindings = BINDINGS + ["TrainConfig.pack_length = 64", "TrainConfig.dropout_rate = 0.0"]
  procs = []
  for i in range(2):
    cmd = [sys.executable, "-m", "instructor_jax.train", "--gin_file=gin_configs/runs/quickstart_cpu.gin",
           *[f"--gin_bindings={b}" for b in bindings], f"--workdir={workdir}",
           f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"]
    procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  outs = [p.communicate(timeout=240)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out
  assert re.search(r"compiling the step for 24 packed rows of 64 tokens", outs[0]), outs[0]
  two = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  cfg = TrainConfig(medi_path=str(REPO / "data" / "medi_sample.jsonl"), init_checkpoint=str(REPO / FIXTURE),
                    train_steps=4, batch_size=8, query_len=48, doc_len=64, pack_length=64, temperature=0.05,
                    dtype="float32", dropout_rate=0.0, log_every=1)
  one = train(cfg, OptimConfig(learning_rate=1e-3), MeshConfig(data=2, fsdp=-1), str(tmp_path / "one"))
  assert [r["task"] for r in two] == [r["task"] for r in one]
  np.testing.assert_allclose([r["loss"] for r in two], [r["loss"] for r in one], rtol=1e-5)
