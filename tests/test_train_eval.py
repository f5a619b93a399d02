"""STS evaluation inside training: every checkpoint scored on the training mesh, equal to the evaluate CLI."""

import dataclasses
import json
import pathlib

import pytest

pytest.importorskip("sentencepiece")  # the trainer's tokenisation (a `train` extra)

from instructor_jax import evaluate  # noqa: E402
from instructor_jax.optim import OptimConfig  # noqa: E402
from instructor_jax.sharding import MeshConfig  # noqa: E402
from instructor_jax.train import TrainConfig, train  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
STS = [(4.8, "A man is playing a guitar.", "A man plays a guitar."),
       (0.2, "A cat is sleeping on the sofa.", "The stock market fell sharply."),
       (3.6, "Two dogs run through a field.", "Dogs are running in the grass."),
       (1.0, "A woman slices an onion.", "A man is playing a guitar."),
       (4.2, "The girl rides a horse.", "A girl is riding a horse."),
       (2.5, "A child reads a book.", "Someone is reading."),
       (0.8, "Rain falls on the city.", "A boy eats an apple."),
       (3.1, "People walk on the beach.", "A group walks by the sea.")]


def test_every_checkpoint_is_scored_on_the_mesh_as_the_cli_scores_it(tmp_path):
  sts = tmp_path / "sts.tsv"
  sts.write_text("".join(f"{s}\t{a}\t{b}\n" for s, a, b in STS), encoding="utf-8")
  cfg = TrainConfig(medi_path=str(REPO / "data" / "medi_sample.jsonl"), model="tiny", train_steps=4, batch_size=8,
                    query_len=16, doc_len=24, temperature=0.05, dtype="float32", dropout_rate=0.0,
                    checkpoint_every=2, log_every=1, eval_sts_path=str(sts), eval_instruction="Represent it: ")
  workdir = tmp_path / "run"
  records = train(cfg, OptimConfig(learning_rate=1e-3), MeshConfig(data=2, fsdp=2, tensor=2), str(workdir))
  scored = {r["step"]: r for r in records if "eval_sts_spearman" in r}
  assert sorted(scored) == [2, 4]  # the checkpoints, and only them
  lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [x["step"] for x in lines] == [1, 2, 3, 4] and "eval_sts_pearson" in lines[3]
  cli = evaluate.main(["--model", str(workdir), "--step", "4", "--sts", str(sts), "--sts-instruction", "Represent it: "])
  got = cli["sts"][str(sts)]
  assert scored[4]["eval_sts_spearman"] == pytest.approx(got["spearman"], abs=1e-6)
  assert scored[4]["eval_sts_pearson"] == pytest.approx(got["pearson"], abs=1e-4), (scored[4], got)


def test_a_failing_evaluation_keeps_the_checkpoint_and_the_run(tmp_path, monkeypatch, capsys):
  """The checkpoint is saved before the evaluation; an evaluation that fails (e.g. out of memory) warns."""
  from instructor_jax import orbax_io, train_eval
  sts = tmp_path / "sts.tsv"
  sts.write_text("".join(f"{s}\t{a}\t{b}\n" for s, a, b in STS), encoding="utf-8")

  def fail(self, params):
    raise MemoryError("RESOURCE_EXHAUSTED: out of memory while compiling the embed")

  monkeypatch.setattr(train_eval.StsEval, "__call__", fail)
  cfg = TrainConfig(medi_path=str(REPO / "data" / "medi_sample.jsonl"), model="tiny", train_steps=4, batch_size=8,
                    query_len=16, doc_len=24, dtype="float32", checkpoint_every=2, log_every=1, eval_sts_path=str(sts))
  records = train(cfg, OptimConfig(), MeshConfig(), str(tmp_path / "run"))
  assert [r["step"] for r in records] == [1, 2, 3, 4] and not any("eval_sts_spearman" in r for r in records)
  assert orbax_io.all_steps(str(tmp_path / "run")) == [2, 4]
  err = capsys.readouterr().err
  assert err.count("the STS evaluation failed (MemoryError: RESOURCE_EXHAUSTED") == 1  # then switched off


def test_a_bad_eval_file_fails_before_training(tmp_path):
  bad = tmp_path / "bad.tsv"
  bad.write_text("not a score\tx\ty\n")
  cfg = TrainConfig(medi_path=str(REPO / "data" / "medi_sample.jsonl"), model="tiny", train_steps=1, batch_size=8,
                    eval_sts_path=str(bad))
  with pytest.raises(evaluate.EvalDataError, match=r"bad.tsv:1: gold score .not a score.; expected a finite number"):
    train(cfg, OptimConfig(), MeshConfig(), str(tmp_path / "never"))
  assert not (tmp_path / "never").exists()
  with pytest.raises(FileNotFoundError, match="missing.tsv: no such STS file"):
    train(dataclasses.replace(cfg, eval_sts_path=str(tmp_path / "missing.tsv")), OptimConfig(), MeshConfig(),
          str(tmp_path / "never"))


def test_an_eval_instruction_covering_a_text_is_a_setting_error_before_training(tmp_path):
  from instructor_jax.config import ConfigError
  sts = tmp_path / "sts.tsv"
  sts.write_text("".join(f"{s}\t{a}\t{b}\n" for s, a, b in STS) + "1\tend\tA man plays.\n", encoding="utf-8")
  cfg = TrainConfig(medi_path=str(REPO / "data" / "medi_sample.jsonl"), model="tiny", train_steps=2, batch_size=8,
                    query_len=16, doc_len=24, dtype="float32", checkpoint_every=2, eval_sts_path=str(sts),
                    eval_instruction="compreh")
  with pytest.raises(ConfigError, match=r"TrainConfig.eval_instruction on .*sts.tsv, text 'end': the instruction"):
    train(cfg, OptimConfig(), MeshConfig(), str(tmp_path / "run"))
  from instructor_jax import orbax_io
  assert orbax_io.latest_step(str(tmp_path / "run")) is None  # refused before the first step


def test_evaluation_time_is_not_step_time(tmp_path, monkeypatch):
  """A checkpoint's record reports the steps' time: the evaluation after the save is not training, and
  counting it would understate tokens/s and MFU at every checkpoint."""
  import time as time_module
  from instructor_jax import train_eval
  sts = tmp_path / "sts.tsv"
  sts.write_text("".join(f"{s}\t{a}\t{b}\n" for s, a, b in STS), encoding="utf-8")
  skipped, real_time = [0.0], time_module.time

  def slow_eval(self, params):
    skipped[0] += 1000.0  # the evaluation "takes" 1000 s on the clock the trainer reads
    return {"eval_sts_spearman": 0.5}

  monkeypatch.setattr(train_eval.StsEval, "__call__", slow_eval)
  monkeypatch.setattr(time_module, "time", lambda: real_time() + skipped[0])
  cfg = TrainConfig(medi_path=str(REPO / "data" / "medi_sample.jsonl"), model="tiny", train_steps=4, batch_size=8,
                    query_len=16, doc_len=24, dtype="float32", dropout_rate=0.0, checkpoint_every=2, log_every=1,
                    eval_sts_path=str(sts))
  records = train(cfg, OptimConfig(), MeshConfig(), str(tmp_path / "run"))
  assert skipped[0] == 2000.0  # evaluated at both checkpoints
  timed = [r for r in records if r.get("step_seconds") is not None]
  assert {r["step"] for r in timed} == {2, 3, 4} and all(r["step_seconds"] < 100 for r in timed), timed
  evaluated = {r["step"]: r for r in timed if "eval_seconds" in r}  # logged apart from compiling
  assert sorted(evaluated) == [2, 4] and all(999 < r["eval_seconds"] < 1100 for r in evaluated.values()), timed
  assert all(r.get("compile_seconds", 0.0) < 100 for r in timed), timed
