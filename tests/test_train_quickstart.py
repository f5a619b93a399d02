"""The README quickstart end to end: train on the MEDI sample, embed from the workdir, export, load in ST."""

import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from instructor_jax import Instructor, orbax_io

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_trains_embeds_and_exports(tmp_path):
  workdir = tmp_path / "quickstart"
  cmd = [sys.executable, "-m", "instructor_jax.train", "--gin_file=gin_configs/runs/quickstart_cpu.gin",
         "--gin_bindings=TrainConfig.log_every = 1", f"--workdir={workdir}"]
  done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stdout + done.stderr
  assert "step 300/300 | loss" in done.stdout

  records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == list(range(1, 301))
  assert {"loss", "loss_q2d", "loss_d2q", "top1_q2d", "grad_norm", "lr", "task"} <= records[-1].keys()
  assert "triples_per_s" in records[-1] and 0 < records[-1]["real_tokens_per_s"] < records[-1]["tokens_per_s"]
  losses = np.array([r["loss"] for r in records])
  # Per-batch losses are noisy (tasks differ in difficulty): compare the first and last 50 steps.
  assert losses[-50:].mean() < 0.6 * losses[:50].mean(), (losses[:50].mean(), losses[-50:].mean())
  assert orbax_io.all_steps(str(workdir)) == [200, 300]
  assert (workdir / "config.gin").read_text().count("TrainConfig.") > 5
  assert any((workdir / "tensorboard").iterdir())

  model = Instructor.from_pretrained(str(workdir))
  inputs = [["Represent the sentence for retrieving paraphrases: ", "The cat sat on the mat."],
            "A plain sentence without an instruction."]
  emb = model.encode(inputs)
  assert emb.shape == (2, 24)
  np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)

  export = tmp_path / "export"
  model.save_pretrained(str(export))
  # The export is a valid INIT_CHECKPOINT (the path GTR checkpoints take): lr 0 keeps its weights.
  from instructor_jax.optim import OptimConfig
  from instructor_jax.sharding import MeshConfig
  from instructor_jax.train import TrainConfig, train
  cfg = TrainConfig(medi_path=str(REPO / "data" / "medi_sample.jsonl"), init_checkpoint=str(export), train_steps=1,
                    batch_size=8, query_len=16, doc_len=16, dtype="float32")
  record = train(cfg, OptimConfig(learning_rate=0.0), MeshConfig(), str(tmp_path / "from_export"))[0]
  norm = np.sqrt(sum(float(np.sum(np.square(np.asarray(x)))) for x in jax.tree.leaves(model.params)))
  np.testing.assert_allclose(record["param_norm"], norm, rtol=1e-5)

  st_mod = pytest.importorskip("sentence_transformers")  # last: the checks above need no torch
  st_emb = st_mod.SentenceTransformer(str(export), device="cpu").encode([inputs[1]], normalize_embeddings=False)
  np.testing.assert_allclose(st_emb[0], emb[1], atol=1e-5)
