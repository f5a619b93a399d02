"""HF / sentence-transformers dir -> JAX -> exported dir: same tensors, same embeddings in ST and transformers."""

import json
import os
import shutil
import warnings

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
sentence_transformers = pytest.importorskip("sentence_transformers")

from safetensors.numpy import load_file  # noqa: E402

from instructor_jax import Instructor, hf_format  # noqa: E402
from instructor_jax.export import plan_shards  # noqa: E402

TINY = os.path.join(os.path.dirname(__file__), "fixtures", "tiny_instructor")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model", "special_tokens_map.json")
INSTRUCTION = "Represent the Science title:"
TEXTS = ["3D ActionSLAM: wearable person tracking in multi-floor environments",
         "The quick brown fox jumps over the lazy dog, again and again.",
         "numbers 12345 and   spaces\nnewlines ünïcödé"]


def _exported_tensors(directory):
  index = os.path.join(directory, "model.safetensors.index.json")
  if not os.path.exists(index):
    return load_file(os.path.join(directory, "model.safetensors"))
  with open(index) as f:
    files = sorted(set(json.load(f)["weight_map"].values()))
  out = {}
  for name in files:
    out.update(load_file(os.path.join(directory, name)))
  return out


def _plain_transformers_embed(directory, instruction, texts):
  """T5EncoderModel + the pooling rule written out by hand (mean after the instruction, dense, L2)."""
  tok = transformers.AutoTokenizer.from_pretrained(directory)
  model = transformers.T5EncoderModel.from_pretrained(directory).eval()
  n_instr = len(tok(instruction)["input_ids"]) - 1
  dense_path = os.path.join(directory, "2_Dense", "model.safetensors")
  dense = load_file(dense_path)["linear.weight"] if os.path.exists(dense_path) else None
  out = []
  for text in texts:
    ids = tok(instruction + text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
      hidden = model(input_ids=ids).last_hidden_state[0].numpy()
    pooled = hidden[n_instr:].mean(axis=0)
    if dense is not None:
      pooled = dense.astype(np.float32) @ pooled
    out.append(pooled / np.linalg.norm(pooled))
  return np.stack(out)


def _check_embeddings(src_model, directory, report_name):
  ours = src_model.encode([[INSTRUCTION, t] for t in TEXTS])
  st = sentence_transformers.SentenceTransformer(directory, device="cpu")
  st_emb = st.encode(TEXTS, prompt=INSTRUCTION)
  plain = _plain_transformers_embed(directory, INSTRUCTION, TEXTS)
  d_st, d_plain = float(np.abs(st_emb - ours).max()), float(np.abs(plain - ours).max())
  print(f"[parity] {report_name}: max|ST - JAX| = {d_st:.3g}, max|transformers - JAX| = {d_plain:.3g}")
  assert d_st <= 1e-5 and d_plain <= 1e-5, (d_st, d_plain)


def _random_hf_dir(path, kind, seed):
  """A tiny random T5 model directory (transformers 5), saved as torch .bin or safetensors."""
  torch.manual_seed(seed)
  ff = "gated-gelu" if kind == "v1.1" else "relu"
  cfg = transformers.T5Config(vocab_size=32128, d_model=8, d_kv=4, num_heads=3, d_ff=12, num_layers=2,
                              num_decoder_layers=1, feed_forward_proj=ff, dropout_rate=0.0)
  model_cls = transformers.T5ForConditionalGeneration if kind == "seq2seq" else transformers.T5EncoderModel
  model = model_cls(cfg).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.normal_(0.0, 0.5)
  os.makedirs(path)
  if kind == "bin":
    cfg.architectures = ["T5EncoderModel"]
    cfg.to_json_file(os.path.join(path, "config.json"))
    torch.save(model.state_dict(), os.path.join(path, "pytorch_model.bin"))
  else:
    model.save_pretrained(path)
  for name in TOKENIZER_FILES:
    shutil.copy(os.path.join(TINY, name), path)
  return path


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
  model = Instructor.from_pretrained(TINY)
  dst = str(tmp_path_factory.mktemp("export") / "tiny_st")
  model.save_pretrained(dst, prompts={"sci": INSTRUCTION})
  return model, dst


def test_round_trip_tensors_identical(tiny_export):
  _, dst = tiny_export
  src = load_file(os.path.join(TINY, "model.safetensors"))
  out = _exported_tensors(dst)
  assert set(out) == set(src)
  for name in src:
    assert out[name].dtype == np.float32 and out[name].shape == src[name].shape, name
    np.testing.assert_array_equal(out[name], src[name], err_msg=name)
  dense_src = torch.load(os.path.join(TINY, "2_Dense", "pytorch_model.bin"), weights_only=True)["linear.weight"]
  np.testing.assert_array_equal(load_file(os.path.join(dst, "2_Dense", "model.safetensors"))["linear.weight"],
                                dense_src.numpy())


def test_export_layout(tiny_export):
  _, dst = tiny_export
  with open(os.path.join(dst, "modules.json")) as f:
    modules = json.load(f)
  assert [m["path"] for m in modules] == ["", "1_Pooling", "2_Dense", "3_Normalize"]
  with open(os.path.join(dst, "1_Pooling", "config.json")) as f:
    assert json.load(f)["include_prompt"] is False
  with open(os.path.join(dst, "config.json")) as f:
    assert json.load(f)["architectures"] == ["T5EncoderModel"]
  with open(os.path.join(dst, "sentence_bert_config.json")) as f:
    assert json.load(f)["max_seq_length"] == 512
  with open(os.path.join(dst, "config_sentence_transformers.json")) as f:
    assert json.load(f)["prompts"] == {"sci": INSTRUCTION}
  with open(os.path.join(dst, "tokenizer_config.json")) as f:
    tok_cfg = json.load(f)
  # transformers 4.x rejects a list here (InstructorEmbedding 1.0.1 runs on 4.48).
  assert not isinstance(tok_cfg.get("extra_special_tokens"), list)
  assert len([t for t in tok_cfg["additional_special_tokens"] if "extra_id_" in t]) == 100
  assert os.path.exists(os.path.join(dst, "spiece.model")) and os.path.exists(os.path.join(dst, "README.md"))
  assert not os.path.exists(os.path.join(dst, "2_Dense", "pytorch_model.bin"))


def test_round_trip_embeddings_st_and_transformers(tiny_export):
  model, dst = tiny_export
  _check_embeddings(model, dst, "tiny_instructor -> ST export")
  st = sentence_transformers.SentenceTransformer(dst, device="cpu")
  np.testing.assert_allclose(st.encode(TEXTS, prompt_name="sci"), st.encode(TEXTS, prompt=INSTRUCTION), atol=0)
  # The exported tokenizer gives the ids of the source tokenizer, special tokens included.
  a, b = (transformers.AutoTokenizer.from_pretrained(d) for d in (TINY, dst))
  for text in TEXTS + ["<extra_id_0> x </s>"]:
    assert a(text)["input_ids"] == b(text)["input_ids"]


def test_reexport_of_export_is_identical(tiny_export, tmp_path):
  _, dst = tiny_export
  again = str(tmp_path / "again")
  Instructor.from_pretrained(dst).save_pretrained(again)
  first, second = _exported_tensors(dst), _exported_tensors(again)
  assert set(first) == set(second)
  for name in first:
    np.testing.assert_array_equal(first[name], second[name], err_msg=name)
  with open(os.path.join(again, "config_sentence_transformers.json")) as f:
    assert json.load(f)["prompts"] == {"sci": INSTRUCTION}  # the source's prompts, as convert keeps them


def test_save_pretrained_keeps_the_default_prompt_and_adds_new_prompts(tmp_path):
  """sentence-transformers applies the default prompt when encode gets none: dropping it changes embeddings."""
  src, dst = tmp_path / "src", str(tmp_path / "dst")
  shutil.copytree(TINY, src)
  (src / "config_sentence_transformers.json").write_text(json.dumps(
      {"prompts": {"query": "Represent the question: "}, "default_prompt_name": "query"}))
  with pytest.warns(UserWarning, match="default prompt 'query'"):  # which encode does not apply (1.0.1)
    model = Instructor.from_pretrained(str(src))
  assert model.prompts == {"query": "Represent the question: "} and model.default_prompt_name == "query"
  model.save_pretrained(dst, prompts={"q": "Q: "})
  with open(os.path.join(dst, "config_sentence_transformers.json")) as f:
    st_config = json.load(f)
  assert st_config["prompts"] == {"query": "Represent the question: ", "q": "Q: "}
  assert st_config["default_prompt_name"] == "query"


def test_sharded_export_round_trip(tiny_export, tmp_path):
  model, dst = tiny_export
  sharded = str(tmp_path / "sharded")
  # The embedding alone is 2 MB: a 600 KB limit forces several shards.
  model.save_pretrained(sharded, max_shard_bytes=600_000)
  files = sorted(f for f in os.listdir(sharded) if f.endswith(".safetensors"))
  assert len(files) > 1 and os.path.exists(os.path.join(sharded, "model.safetensors.index.json"))
  assert not os.path.exists(os.path.join(sharded, "model.safetensors"))
  with open(os.path.join(sharded, "model.safetensors.index.json")) as f:
    index = json.load(f)
  assert sorted(set(index["weight_map"].values())) == sorted(files)
  single, split = _exported_tensors(dst), _exported_tensors(sharded)
  assert set(single) == set(split)
  for name in single:
    np.testing.assert_array_equal(single[name], split[name], err_msg=name)
  # Loading the sharded dir back (our reader) and in ST gives the same embeddings.
  _check_embeddings(Instructor.from_pretrained(sharded), sharded, "sharded export")


def test_plan_shards_orders_and_bounds():
  sizes = [("a", 5), ("b", 5), ("c", 11), ("d", 1), ("e", 9)]
  assert plan_shards(sizes, 10) == [["a", "b"], ["c"], ["d", "e"]]
  assert plan_shards(sizes, 100) == [["a", "b", "c", "d", "e"]]


@pytest.mark.parametrize("kind", ["bin", "v1.1", "seq2seq"])
def test_other_hf_sources(kind, tmp_path):
  src = _random_hf_dir(str(tmp_path / f"src_{kind}"), kind, seed=len(kind))
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    model = Instructor.from_pretrained(src)
  messages = [str(w.message) for w in caught]
  if kind == "seq2seq":
    assert any("decoder" in m for m in messages), messages
  # A plain T5 directory loads without a projection, and says so: a partial copy looks the same.
  assert any("no modules.json" in m and "without a projection" in m and "2_Dense" in m for m in messages), messages
  assert model.config.projection_dim is None
  assert model.config.encoder.feed_forward == ("gated-gelu" if kind == "v1.1" else "relu")
  dst = str(tmp_path / f"dst_{kind}")
  model.save_pretrained(dst)
  src_tensors = hf_format.load_hf_weights(src)
  out = _exported_tensors(dst)
  expected = set(hf_format.hf_name_map(model.config.encoder))
  assert set(out) == expected
  for name in expected:
    np.testing.assert_array_equal(out[name], src_tensors[name], err_msg=name)
  with open(os.path.join(dst, "modules.json")) as f:
    assert [m["path"] for m in json.load(f)] == ["", "1_Pooling", "3_Normalize"]
  _check_embeddings(model, dst, f"random {kind} source -> ST export")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_export(tiny_export, tmp_path, dtype):
  model, _ = tiny_export
  dst = str(tmp_path / dtype)
  model.save_pretrained(dst, dtype=dtype)
  with open(os.path.join(dst, "config.json")) as f:
    assert json.load(f)["torch_dtype"] == dtype
  st_model = transformers.T5EncoderModel.from_pretrained(dst, dtype=getattr(torch, dtype))
  ref = load_file(os.path.join(TINY, "model.safetensors"))["shared.weight"]
  got = st_model.state_dict()["shared.weight"].float().numpy()
  np.testing.assert_allclose(got, ref, rtol=1e-2 if dtype == "bfloat16" else 1e-3, atol=1e-3)
  # Our reader loads the half-precision export back to float32.
  reloaded = Instructor.from_pretrained(dst)
  np.testing.assert_array_equal(np.asarray(reloaded.params["token_embedder"]["embedding"]), got)


def test_instructor_embedding_compat_layout(tiny_export, tmp_path):
  # InstructorEmbedding 1.0.1 itself needs transformers 4.x (another environment); this checks the
  # layout it reads (Pooling(**config) without include_prompt, 2_Dense/pytorch_model.bin) and that
  # sentence-transformers still matches once include_prompt is switched off after loading.
  model, _ = tiny_export
  from instructor_jax.export import save_sentence_transformers
  dst = str(tmp_path / "compat")
  save_sentence_transformers(dst, model.config, jax.device_get(model.params), model.tokenizer.hf_tokenizer,
                             instructor_embedding_compat=True)
  with open(os.path.join(dst, "1_Pooling", "config.json")) as f:
    pooling = json.load(f)
  legacy_keys = {"word_embedding_dimension", "pooling_mode_cls_token", "pooling_mode_mean_tokens",
                 "pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens",
                 "pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken"}
  assert set(pooling) <= legacy_keys and pooling["pooling_mode_mean_tokens"]
  bin_weight = torch.load(os.path.join(dst, "2_Dense", "pytorch_model.bin"), weights_only=True)["linear.weight"]
  np.testing.assert_array_equal(bin_weight.numpy(),
                                load_file(os.path.join(dst, "2_Dense", "model.safetensors"))["linear.weight"])
  st = sentence_transformers.SentenceTransformer(dst, device="cpu")
  st.set_pooling_include_prompt(False)
  diff = float(np.abs(st.encode(TEXTS, prompt=INSTRUCTION) - model.encode([[INSTRUCTION, t] for t in TEXTS])).max())
  assert diff <= 1e-5, diff


def test_encoder_tensors_the_config_does_not_describe_are_refused(tmp_path):
  """Weights with more encoder tensors than config.json describes (an extra layer, UMT5's per-layer
  bias tables) must fail naming the tensor, not load with those tensors silently dropped."""
  from safetensors.numpy import save_file
  src = str(tmp_path / "extra")
  shutil.copytree(TINY, src)
  tensors = load_file(os.path.join(src, "model.safetensors"))
  bias = tensors["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
  tensors["encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"] = bias + 1
  save_file(tensors, os.path.join(src, "model.safetensors"), metadata={"format": "pt"})
  with pytest.raises(hf_format.CheckpointError, match=r"encoder\.block\.1\.layer\.0\.SelfAttention\.relative_attention_bias"):
    Instructor.from_pretrained(src)
  with open(os.path.join(src, "config.json")) as f:
    config = json.load(f)
  with pytest.raises(hf_format.CheckpointError, match="umt5"):
    hf_format.t5_config_from_hf(dict(config, model_type="umt5"), "config.json")


def test_lowercasing_models_are_refused(tmp_path):
  """1.0.1 lowercases instruction and text when sentence_bert_config.json says do_lower_case; we do
  not, so such a model must be refused rather than embedded differently."""
  src = str(tmp_path / "lower")
  shutil.copytree(TINY, src)
  path = os.path.join(src, "sentence_bert_config.json")
  with open(path) as f:
    cfg = json.load(f)
  with open(path, "w") as f:
    json.dump(dict(cfg, do_lower_case=True), f)
  with pytest.raises(hf_format.CheckpointError, match="do_lower_case is true"):
    Instructor.from_pretrained(src)


def test_a_partial_copy_or_a_module_folder_is_refused_with_what_to_pass(tmp_path, monkeypatch):
  from instructor_jax.sources import detect_kind
  """A copy without its Dense folder, or one module folder passed as the model, must say so (not fail
  on a missing file, or read 2_Dense/config.json as a T5 config)."""
  src = str(tmp_path / "copy")
  shutil.copytree(TINY, src)
  for module, kind in (("2_Dense", "Dense"), ("1_Pooling", "Pooling")):
    with pytest.raises(hf_format.CheckpointError, match=rf"{module} is the {kind} module folder .*pass {src}"):
      Instructor.from_pretrained(os.path.join(src, module))
  monkeypatch.chdir(src)  # the model itself, named relatively, is no module folder
  for name in (".", "./"):
    assert detect_kind(name) == "hf"
  with pytest.raises(hf_format.CheckpointError, match=rf"pass {src}, the whole model"):
    Instructor.from_pretrained("2_Dense")
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # the whole directory loads without the plain-T5 warning
    assert Instructor.from_pretrained(src).config.projection_dim is not None
  shutil.rmtree(os.path.join(src, "2_Dense"))
  with pytest.raises(hf_format.CheckpointError, match=r"modules.json lists the Dense module '2_Dense', but .* does "
                                                      r"not exist \(a partial copy\?\)"):
    Instructor.from_pretrained(src)


def test_a_training_workdir_before_its_first_checkpoint_says_so(tmp_path):
  workdir = tmp_path / "w"
  (workdir / "checkpoints").mkdir(parents=True)
  (workdir / ".train.lock").write_text("")
  with pytest.raises(hf_format.CheckpointError, match="is a training workdir without a finished checkpoint yet"):
    Instructor.from_pretrained(str(workdir))
