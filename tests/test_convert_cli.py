"""`python -m instructor_jax.convert`: help text, conversions in-process, and clear errors."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from instructor_jax.convert import main, parse_size
from instructor_jax.hf_format import CheckpointError
from instructor_jax.sources import load_source

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
TINY = os.path.join(FIXTURES, "tiny_instructor")
T5X = os.path.join(FIXTURES, "t5x_tiny")


def test_help_documents_every_source_and_destination():
  out = subprocess.run([sys.executable, "-m", "instructor_jax.convert", "--help"], capture_output=True, text=True,
                       check=True, timeout=120).stdout
  for needle in ("Hugging Face Hub id", "hkunlp/instructor-large", "HF_HUB_OFFLINE", "model.safetensors.index.json",
                 "pytorch_model.bin", "read without torch", "v1.1", "T5ForConditionalGeneration", "t5x checkpoint",
                 "gs://", "--max-distance", "orbax checkpoint", "training workdir", "--step", "--to",
                 "st (default)", "include_prompt: false", "--dtype", "bfloat16", "--prompt", "--max-shard-size",
                 "examples:", "python -m instructor_jax.convert hkunlp/instructor-large", "--to orbax"):
    assert needle in out, needle


def test_cli_t5x_to_sharded_st_with_prompts(tmp_path, capsys):
  dst = str(tmp_path / "st")
  rc = main([T5X, dst, "--max-shard-size", "200KB", "--prompt", "query=Represent the question: ",
             "--prompt", "doc=Represent the document: ", "--max-seq-length", "128"])
  assert rc == 0, capsys.readouterr().err
  with open(os.path.join(dst, "model.safetensors.index.json")) as f:
    assert len(set(json.load(f)["weight_map"].values())) > 1
  with open(os.path.join(dst, "config_sentence_transformers.json")) as f:
    assert json.load(f)["prompts"] == {"query": "Represent the question: ", "doc": "Represent the document: "}
  with open(os.path.join(dst, "sentence_bert_config.json")) as f:
    assert json.load(f)["max_seq_length"] == 128
  err = capsys.readouterr().err
  assert "t5x:" in err and "2 layers, d_model 4" in err
  # Round trip through our own reader: the same architecture and values.
  a, b = load_source(T5X), load_source(dst)
  assert b.config.encoder == a.config.encoder and b.config.projection_dim == 768


def test_cli_source_prompts_carry_over(tmp_path):
  first, second = str(tmp_path / "a"), str(tmp_path / "b")
  assert main([TINY, first, "--prompt", "sci=Represent the Science title:"]) == 0
  assert main([first, second, "--prompt", "q=Q: "]) == 0
  with open(os.path.join(second, "config_sentence_transformers.json")) as f:
    assert json.load(f)["prompts"] == {"sci": "Represent the Science title:", "q": "Q: "}


def _error(argv, capsys):
  assert main(argv) == 2
  return capsys.readouterr().err


def test_cli_errors(tmp_path, capsys):
  gpt = tmp_path / "gpt"
  gpt.mkdir()
  (gpt / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
  err = _error([str(gpt), str(tmp_path / "o1")], capsys)
  assert "gpt2" in err and "T5ForConditionalGeneration" in err and "decoder is dropped" in err

  no_weights = tmp_path / "no_weights"
  shutil.copytree(TINY, no_weights)
  os.remove(no_weights / "model.safetensors")
  assert "no model.safetensors, pytorch_model.bin" in _error([str(no_weights), str(tmp_path / "o2")], capsys)

  missing_shard = tmp_path / "missing_shard"
  shutil.copytree(TINY, missing_shard)
  (missing_shard / "model.safetensors.index.json").write_text(json.dumps(
      {"metadata": {}, "weight_map": {"shared.weight": "model-00001-of-00002.safetensors"}}))
  assert "model-00001-of-00002.safetensors" in _error([str(missing_shard), str(tmp_path / "o3")], capsys)

  wrong_shape = tmp_path / "wrong_shape"
  shutil.copytree(TINY, wrong_shape)
  cfg = json.loads((wrong_shape / "config.json").read_text())
  (wrong_shape / "config.json").write_text(json.dumps({**cfg, "d_ff": 33}))
  err = _error([str(wrong_shape), str(tmp_path / "o4")], capsys)
  assert "encoder.block.0.layer.1.DenseReluDense.wi.weight" in err and "(32, 16)" in err

  unknown = tmp_path / "unknown"
  unknown.mkdir()
  (unknown / "weights.h5").write_bytes(b"\0")
  err = _error([str(unknown), str(tmp_path / "o5")], capsys)
  assert "unknown checkpoint layout" in err and "weights.h5" in err

  assert "no such directory" in _error([str(tmp_path / "does" / "not" / "exist"), str(tmp_path / "o6")], capsys)
  assert "is a file" in _error([str(unknown / "weights.h5"), str(tmp_path / "o7")], capsys)

  taken = tmp_path / "taken"
  taken.mkdir()
  (taken / "x").write_text("")
  assert "--overwrite" in _error([TINY, str(taken)], capsys)
  assert "float32" in _error([TINY, str(tmp_path / "o8"), "--to", "orbax", "--dtype", "bfloat16"], capsys)
  assert "t5x checkpoints only" in _error([TINY, str(tmp_path / "o9"), "--max-distance", "64"], capsys)
  with pytest.raises(SystemExit):
    main([TINY, str(tmp_path / "o10"), "--prompt", "no-equals-sign"])


def test_dense_with_bias_is_refused(tmp_path):
  src = tmp_path / "biased"
  shutil.copytree(TINY, src)
  cfg = json.loads((src / "2_Dense" / "config.json").read_text())
  (src / "2_Dense" / "config.json").write_text(json.dumps({**cfg, "bias": True}))
  with pytest.raises(CheckpointError, match="2_Dense/config.json.*bias"):
    load_source(str(src))


def test_parse_size():
  assert parse_size("2GB") == 2 * 10**9 and parse_size("500MiB") == 500 * 2**20 and parse_size("1234") == 1234


def test_cli_output_has_no_advice_about_missing_torch(tmp_path):
  """Without torch, transformers advises on import that "models won't be available"; ours are.

  Meaningful where torch is not installed (the second CI run); elsewhere transformers stays quiet anyway.
  """
  done = subprocess.run([sys.executable, "-m", "instructor_jax.convert", os.path.join(FIXTURES, "tiny_instructor"),
                         str(tmp_path / "st")], capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr
  assert "PyTorch was not found" not in done.stdout + done.stderr
