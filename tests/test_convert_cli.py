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


def test_dtype_names_as_embed_and_evaluate_take_them(tmp_path):
  from safetensors import safe_open
  dst = str(tmp_path / "bf16")
  assert main([TINY, dst, "--dtype", "bf16"]) == 0
  with safe_open(os.path.join(dst, "model.safetensors"), "np") as f:
    assert {str(f.get_slice(k).get_dtype()) for k in f.keys()} == {"BF16"}


def test_cli_source_prompts_carry_over(tmp_path):
  first, second = str(tmp_path / "a"), str(tmp_path / "b")
  assert main([TINY, first, "--prompt", "sci=Represent the Science title:"]) == 0
  assert main([first, second, "--prompt", "q=Q: "]) == 0
  with open(os.path.join(second, "config_sentence_transformers.json")) as f:
    assert json.load(f)["prompts"] == {"sci": "Represent the Science title:", "q": "Q: "}


def test_cli_default_prompt_name_carries_over(tmp_path):
  """sentence-transformers applies the default prompt when encode gets none: dropping it changes embeddings."""
  src, dst = tmp_path / "src", str(tmp_path / "dst")
  shutil.copytree(TINY, src)
  (src / "config_sentence_transformers.json").write_text(json.dumps(
      {"prompts": {"query": "Represent the question: "}, "default_prompt_name": "query"}))
  assert main([str(src), dst]) == 0
  with open(os.path.join(dst, "config_sentence_transformers.json")) as f:
    st_config = json.load(f)
  assert st_config["prompts"] == {"query": "Represent the question: "} and st_config["default_prompt_name"] == "query"


def test_overwrite_removes_a_stale_dense_bin(tmp_path):
  """A torch 2_Dense/pytorch_model.bin (compat layout) must not outlive an export that has no such file."""
  dst = str(tmp_path / "dst")
  stale = os.path.join(dst, "2_Dense", "pytorch_model.bin")
  os.makedirs(os.path.dirname(stale))
  with open(stale, "wb") as f:
    f.write(b"old")
  assert main([TINY, dst, "--overwrite"]) == 0
  assert not os.path.exists(stale) and os.path.exists(os.path.join(dst, "2_Dense", "model.safetensors"))


def test_older_sentence_transformers_layout_with_a_transformer_folder(tmp_path):
  """modules.json may put the T5 in a folder such as 0_Transformer/ (config, weights, tokenizer there)."""
  src = tmp_path / "old"
  shutil.copytree(TINY, src)
  (src / "0_Transformer").mkdir()
  for name in os.listdir(TINY):
    if os.path.isfile(os.path.join(TINY, name)) and name not in ("modules.json", "LICENSE-NOTE.md"):
      shutil.move(str(src / name), str(src / "0_Transformer" / name))
  modules = json.loads((src / "modules.json").read_text())
  for module in modules:
    if module["type"].endswith("Transformer"):
      module["path"] = "0_Transformer"
  (src / "modules.json").write_text(json.dumps(modules))
  old, new = load_source(str(src)), load_source(TINY)
  assert old.config == new.config and old.tokenizer_dir == str(src / "0_Transformer")
  for key in ("token_embedder", "projection_layer"):
    assert (old.params[key][next(iter(old.params[key]))] == new.params[key][next(iter(new.params[key]))]).all()


def test_pooling_other_than_mean_is_refused(tmp_path):
  src = tmp_path / "cls"
  shutil.copytree(TINY, src)
  cfg = json.loads((src / "1_Pooling" / "config.json").read_text())
  (src / "1_Pooling" / "config.json").write_text(json.dumps(
      {**cfg, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}))
  with pytest.raises(CheckpointError, match=r"1_Pooling/config.json: pooling \['cls'\]; INSTRUCTOR and GTR use mean"):
    load_source(str(src))


def test_pooling_config_read_as_sentence_transformers_reads_it():
  from instructor_jax.hf_format import pooling_modes
  assert pooling_modes({"pooling_mode": "mean", "include_prompt": False}) == ["mean"]  # sentence-transformers >= 6
  assert pooling_modes({"pooling_mode": ["mean", "max"], "pooling_mode_mean_tokens": True}) == ["mean", "max"]
  assert pooling_modes({"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": False}) == ["mean"]
  assert pooling_modes({"word_embedding_dimension": 768}) == ["mean"]  # no mode at all: the default
  assert pooling_modes({"pooling_mode_cls_token": True, "pooling_mode_max_tokens": True}) == ["cls", "max"]


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

  assert "is a file; expected a directory" in _error([TINY, str(unknown / "weights.h5")], capsys)
  err = _error([TINY, str(taken), "--to", "orbax"], capsys)
  assert "holds ['x'], so it is not an orbax checkpoint directory" in err and not (taken / "0").exists()
  assert "--max-seq-length 1: expected >= 2" in _error([TINY, str(tmp_path / "o11"), "--max-seq-length", "1"], capsys)
  assert "--max-distance 0: expected >= 1" in _error([T5X, str(tmp_path / "o12"), "--max-distance", "0"], capsys)
  err = _error([T5X, str(tmp_path / "o13"), "--max-distance", "1"], capsys)  # t5x_tiny has 4 buckets
  assert "relative_attention_max_distance=1; expected > 1" in err

  no_d_model = tmp_path / "no_d_model"
  shutil.copytree(TINY, no_d_model)
  cfg = json.loads((no_d_model / "config.json").read_text())
  del cfg["d_model"]
  (no_d_model / "config.json").write_text(json.dumps(cfg))
  assert "config.json lacks ['d_model']" in _error([str(no_d_model), str(tmp_path / "o14")], capsys)


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


def test_a_tokenizer_config_without_vocabulary_is_refused(tmp_path, capsys):
  """transformers builds a vocabulary of the special tokens alone from tokenizer_config.json: every
  word <unk>, every embedding nearly the same."""
  half = tmp_path / "half"
  shutil.copytree(TINY, half)
  for name in ("tokenizer.json", "spiece.model"):
    if (half / name).exists():
      (half / name).unlink()
  assert main([str(half), str(tmp_path / "out")]) == 2
  assert "tokenizer_config.json without tokenizer.json or spiece.model" in capsys.readouterr().err
  from instructor_jax import Instructor
  with pytest.raises(CheckpointError, match="a partial copy"):
    Instructor.from_pretrained(str(half))


def test_a_tokenizer_larger_than_the_embedding_table_is_refused():
  from instructor_jax.sources import LoadedModel, load_tokenizer
  loaded = load_source(TINY)
  small = LoadedModel(loaded.config.with_encoder(vocab_size=1000), loaded.params, loaded.tokenizer_dir, "test")
  with pytest.raises(CheckpointError, match=r"has 32100 pieces but the model's embedding table 1000 rows"):
    load_tokenizer(small, 64)
  assert len(load_tokenizer(loaded, 64).hf_tokenizer) <= loaded.config.encoder.vocab_size


def test_a_quoted_tilde_in_dst_is_the_home_directory(tmp_path, monkeypatch):
  monkeypatch.setenv("HOME", str(tmp_path))
  monkeypatch.chdir(tmp_path)
  assert main([TINY, "~/exported"]) == 0
  assert (tmp_path / "exported" / "modules.json").exists() and not (tmp_path / "~").exists()
  (tmp_path / "st_here").mkdir()
  (tmp_path / "st_here" / "modules.json").write_text("[]")
  assert main([TINY, "~/st_here", "--to", "orbax"]) == 2  # the foreign-directory check sees the real place


def _copy(tmp_path, name):
  src = tmp_path / name
  shutil.copytree(TINY, src)
  return src


def test_max_seq_length_of_a_sentence_transformers_6_directory(tmp_path):
  """sentence-transformers 6 writes no max_seq_length to sentence_bert_config.json: it keeps the
  tokenizer's model_max_length, and reads the length from there."""
  src = _copy(tmp_path, "st6")
  (src / "sentence_bert_config.json").write_text(json.dumps({"transformer_task": "feature-extraction"}))
  tok_cfg = json.loads((src / "tokenizer_config.json").read_text())
  (src / "tokenizer_config.json").write_text(json.dumps({**tok_cfg, "model_max_length": 64}))
  assert load_source(str(src)).config.max_seq_length == 64
  dst = tmp_path / "exported"
  assert main([str(src), str(dst)]) == 0  # and the export keeps it
  assert json.loads((dst / "sentence_bert_config.json").read_text())["max_seq_length"] == 64
  (src / "tokenizer_config.json").write_text(json.dumps({**tok_cfg, "model_max_length": int(1e30)}))
  assert load_source(str(src)).config.max_seq_length == 512  # transformers' "no limit": the T5 default
  (src / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 128}))
  (src / "tokenizer_config.json").write_text(json.dumps({**tok_cfg, "model_max_length": 64}))
  assert load_source(str(src)).config.max_seq_length == 128  # sentence_bert_config.json's value comes first


@pytest.mark.parametrize("change", ["layer_norm", "second_dense", "no_pooling", "dense_first", "st6_names",
                                    "instructor_embedding_save"])
def test_modules_this_package_does_not_compute_are_refused(tmp_path, change):
  """Any module besides Transformer, Pooling, [Dense], [Normalize] would be skipped silently, and the
  embeddings differ from sentence-transformers'."""
  src = _copy(tmp_path, change)
  modules = json.loads((src / "modules.json").read_text())
  transformer, pooling, dense, normalize = modules
  layer_norm = {"idx": 4, "name": "4", "path": "4_LayerNorm", "type": "sentence_transformers.models.LayerNorm"}
  new, match = {
      "layer_norm": ([transformer, pooling, layer_norm, dense, normalize], r"module 2 \(4_LayerNorm\) is "
                                                                           r"'sentence_transformers.models.LayerNorm'"),
      "second_dense": ([transformer, pooling, dense, {**dense, "path": "3_Dense"}, normalize], r"module 3 \(3_Dense\)"),
      "no_pooling": ([transformer, dense, normalize], r"module 1 \(2_Dense\)"),
      "dense_first": ([dense, transformer, pooling], r"module 0 \(2_Dense\)"),
      "st6_names": ([{**m, "type": t} for m, t in zip(modules, (
          "sentence_transformers.base.modules.transformer.Transformer",
          "sentence_transformers.sentence_transformer.modules.pooling.Pooling",
          "sentence_transformers.base.modules.dense.Dense", "sentence_transformers.base.modules.normalize.Normalize"))],
                    None),
      # INSTRUCTOR(...).save() in 1.0.1 (sentence-transformers 2.2.2 records the class's module).
      "instructor_embedding_save": ([{**transformer, "type": "InstructorEmbedding.instructor"},
                                     {**pooling, "type": "InstructorEmbedding.instructor"}, dense, normalize], None),
  }[change]
  (src / "modules.json").write_text(json.dumps(new))
  if match is None:  # sentence-transformers 6 moved its modules; the class names are what count
    loaded, reference = load_source(str(src)), load_source(TINY)
    assert loaded.config == reference.config
    return
  with pytest.raises(CheckpointError, match=match + ".*would change its embeddings"):
    load_source(str(src))
  (src / "modules.json").write_text(json.dumps([transformer]))
  with pytest.raises(CheckpointError, match="no Pooling module after the Transformer"):
    load_source(str(src))


def test_a_dense_module_without_its_config_says_so(tmp_path):
  src = _copy(tmp_path, "nodensecfg")
  (src / "2_Dense" / "config.json").unlink()
  with pytest.raises(CheckpointError, match=r"2_Dense/config.json: missing; .*Copy the whole model directory again"):
    load_source(str(src))


def test_a_directory_without_tokenizer_files(tmp_path):
  """The bundled T5 vocabulary serves a 32128-row T5 saved without its tokenizer, with a warning; any
  other vocabulary size (mT5, a resized table) is refused rather than embedded with the wrong ids."""
  from instructor_jax.sources import LoadedModel, load_tokenizer
  src = _copy(tmp_path, "notok")
  for name in ("tokenizer.json", "tokenizer_config.json", "spiece.model", "special_tokens_map.json"):
    (src / name).unlink()
  loaded = load_source(str(src))
  with pytest.warns(UserWarning, match="no tokenizer files; using the standard T5 vocabulary"):
    assert len(load_tokenizer(loaded, 64).hf_tokenizer) == 32100
  bigger = LoadedModel(loaded.config.with_encoder(vocab_size=250112), loaded.params, loaded.tokenizer_dir, "test")
  with pytest.raises(CheckpointError, match=r"no tokenizer files .*250112 rows, not the standard T5 vocabulary's 32128"):
    load_tokenizer(bigger, 64)


def test_to_orbax_refuses_what_it_cannot_keep(tmp_path, capsys):
  """An orbax checkpoint is read with the bundled T5 vocabulary and holds no prompts."""
  err = _error([TINY, str(tmp_path / "o1"), "--to", "orbax", "--prompt", "q=Q: "], capsys)
  assert "--prompt and --instructor-embedding-compat shape a sentence-transformers export" in err
  import transformers
  added = _copy(tmp_path, "added")
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(added))
  tokenizer.add_tokens(["[QRY]"])  # a model fine-tuned with a marker token: ids past the T5 vocabulary
  tokenizer.save_pretrained(str(added))
  err = _error([str(added), str(tmp_path / "o2"), "--to", "orbax"], capsys)
  assert "the tokenizer differs from the standard T5 vocabulary" in err and "'[QRY]'" in err
  assert not (tmp_path / "o2").exists()
  prompted = _copy(tmp_path, "prompted")
  (prompted / "config_sentence_transformers.json").write_text(json.dumps(
      {"prompts": {"query": "Represent the question: "}, "default_prompt_name": "query"}))
  assert main([str(prompted), str(tmp_path / "o3"), "--to", "orbax"]) == 0
  assert "prompts (query; default query) are not kept" in capsys.readouterr().err
  assert main([TINY, str(tmp_path / "o4"), "--to", "orbax"]) == 0  # the fixture's own tokenizer is the standard one
