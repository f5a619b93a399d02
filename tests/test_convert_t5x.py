"""The real t5x tiny dual-encoder checkpoint: inferred architecture, every tensor's values, export parity."""

import gzip
import json
import os
import shutil
import warnings

import numpy as np
import pytest
from flax import serialization

from instructor_jax import Instructor, t5x_format
from instructor_jax.hf_format import CheckpointError

T5X = os.path.join(os.path.dirname(__file__), "fixtures", "t5x_tiny")
LAYERS = 2


def _zarr_by_hand(directory):
  """Decodes a 2-D zarr v2 array (gzip, '<f4', C order) without any zarr library: an independent check."""
  with open(os.path.join(directory, ".zarray")) as f:
    meta = json.load(f)
  assert meta["compressor"]["id"] == "gzip" and meta["dtype"] == "<f4" and meta["order"] == "C"
  (rows, cols), (crow, ccol) = meta["shape"], meta["chunks"]
  out = np.zeros((rows, cols), np.float32)
  for i in range(-(-rows // crow)):
    for j in range(-(-cols // ccol)):
      with open(os.path.join(directory, f"{i}.{j}"), "rb") as f:
        chunk = np.frombuffer(gzip.decompress(f.read()), "<f4").reshape(crow, ccol)  # edge chunks are full size
      block = out[i * crow:(i + 1) * crow, j * ccol:(j + 1) * ccol]
      block[...] = chunk[:block.shape[0], :block.shape[1]]
  return out


def _expected_from_files():
  """t5x name -> array, read straight from the files with names mapped by hand."""
  with open(os.path.join(T5X, "checkpoint"), "rb") as f:
    target = serialization.msgpack_restore(f.read())["optimizer"]["target"]
  enc = target["encoder"]
  out = {
      "token_embedder/embedding": _zarr_by_hand(os.path.join(T5X, "target.token_embedder.embedding")),
      "encoder/relpos_bias/rel_embedding": enc["relpos_bias"]["rel_embedding"],
      "encoder/encoder_norm/scale": enc["encoder_norm"]["scale"],
      "projection_layer/kernel": target["projection_layer"]["kernel"],
  }
  for i in range(LAYERS):
    for part in ("attention.query", "attention.key", "attention.value", "attention.out", "mlp.wi", "mlp.wo"):
      out[f"encoder/layers_{i}/{part.replace('.', '/')}/kernel"] = _zarr_by_hand(
          os.path.join(T5X, f"target.encoder.layers_{i}.{part}.kernel"))
    for norm in ("pre_attention_layer_norm", "pre_mlp_layer_norm"):
      out[f"encoder/layers_{i}/{norm}/scale"] = enc[f"layers_{i}"][norm]["scale"]
  return out


def _flat(tree, prefix=""):
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from _flat(v, f"{prefix}{k}/")
    else:
      yield f"{prefix}{k}", v


def test_inferred_architecture():
  cfg, _, directory = t5x_format.load_t5x_checkpoint(T5X)
  e = cfg.encoder
  assert (e.num_layers, e.d_model, e.num_heads, e.d_kv, e.d_ff, e.vocab_size) == (2, 4, 2, 2, 8, 32128)
  assert (e.relative_attention_num_buckets, e.relative_attention_max_distance, e.feed_forward) == (4, 128, "relu")
  assert cfg.projection_dim == 768 and cfg.normalize
  assert directory == T5X
  cfg64, _, _ = t5x_format.load_t5x_checkpoint(T5X, max_distance=64)
  assert cfg64.encoder.relative_attention_max_distance == 64


def test_every_tensor_value_matches_files():
  _, params, _ = t5x_format.load_t5x_checkpoint(T5X)
  ours = dict(_flat(params))
  expected = _expected_from_files()
  assert set(ours) == set(expected)
  for name, value in expected.items():
    assert ours[name].dtype == np.float32 and ours[name].shape == value.shape, name
    np.testing.assert_array_equal(ours[name], value, err_msg=name)
  # The square 4x4 q/k/v kernels would hide a transposition from any shape check.
  q = expected["encoder/layers_0/attention/query/kernel"]
  assert q.shape == (4, 4) and not np.allclose(q, q.T)


@pytest.fixture(scope="module")
def t5x_export(tmp_path_factory):
  pytest.importorskip("torch")
  model = Instructor.from_pretrained(T5X)
  dst = str(tmp_path_factory.mktemp("t5x") / "st")
  model.save_pretrained(dst)
  return model, dst


def test_export_tensors_are_transposed_t5x_kernels(t5x_export):
  from safetensors.numpy import load_file
  _, dst = t5x_export
  out = load_file(os.path.join(dst, "model.safetensors"))
  exp = _expected_from_files()
  hf = {"shared.weight": exp["token_embedder/embedding"],
        "encoder.final_layer_norm.weight": exp["encoder/encoder_norm/scale"],
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight":
            exp["encoder/relpos_bias/rel_embedding"].T}
  for i in range(LAYERS):
    b = f"encoder.block.{i}.layer"
    for short, long in (("q", "query"), ("k", "key"), ("v", "value"), ("o", "out")):
      hf[f"{b}.0.SelfAttention.{short}.weight"] = exp[f"encoder/layers_{i}/attention/{long}/kernel"].T
    hf[f"{b}.1.DenseReluDense.wi.weight"] = exp[f"encoder/layers_{i}/mlp/wi/kernel"].T
    hf[f"{b}.1.DenseReluDense.wo.weight"] = exp[f"encoder/layers_{i}/mlp/wo/kernel"].T
    hf[f"{b}.0.layer_norm.weight"] = exp[f"encoder/layers_{i}/pre_attention_layer_norm/scale"]
    hf[f"{b}.1.layer_norm.weight"] = exp[f"encoder/layers_{i}/pre_mlp_layer_norm/scale"]
  assert set(out) == set(hf)
  for name, value in hf.items():
    np.testing.assert_array_equal(out[name], value, err_msg=name)
  dense = load_file(os.path.join(dst, "2_Dense", "model.safetensors"))["linear.weight"]
  np.testing.assert_array_equal(dense, exp["projection_layer/kernel"].T)
  with open(os.path.join(dst, "config.json")) as f:
    hf_cfg = json.load(f)
  assert (hf_cfg["relative_attention_num_buckets"], hf_cfg["relative_attention_max_distance"]) == (4, 128)


def test_jax_embeddings_equal_st_export(t5x_export):
  st_mod = pytest.importorskip("sentence_transformers")
  model, dst = t5x_export
  instruction = "Represent the Wikipedia question for retrieving relevant documents:"
  texts = ["who wrote the origin of species", "a much longer passage " * 20, "x"]
  ours = model.encode([[instruction, t] for t in texts])
  plain = model.encode(texts)
  st = st_mod.SentenceTransformer(dst, device="cpu")
  d_instr = float(np.abs(st.encode(texts, prompt=instruction) - ours).max())
  d_plain = float(np.abs(st.encode(texts) - plain).max())
  print(f"[parity] t5x tiny -> ST export: max|ST - JAX| = {d_instr:.3g} (with instruction), {d_plain:.3g} (plain)")
  assert d_instr <= 1e-5 and d_plain <= 1e-5


def _copy_with_target(tmp_path, edit):
  """A copy of the fixture whose msgpack target is changed by `edit(target)`."""
  dst = str(tmp_path / "ckpt")
  shutil.copytree(T5X, dst)
  with open(os.path.join(dst, "checkpoint"), "rb") as f:
    state = serialization.msgpack_restore(f.read())
  edit(state["optimizer"]["target"])
  with open(os.path.join(dst, "checkpoint"), "wb") as f:
    f.write(serialization.msgpack_serialize(state))
  return dst


def test_decoder_is_dropped_with_a_note(tmp_path):
  def add_decoder(target):
    # Spec pointing nowhere: reading it would fail, so the test also proves it is never opened.
    target["decoder"] = {"layers_0": {"self_attention": {"query": {"kernel": {
        "driver": "zarr", "kvstore": {"driver": "gfile", "path": "target.decoder.missing"}}}}},
        "decoder_norm": {"scale": np.ones(4, np.float32)}}
  src = _copy_with_target(tmp_path, add_decoder)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    _, params, _ = t5x_format.load_t5x_checkpoint(src)
  assert any("decoder" in str(w.message) for w in caught)
  assert "decoder" not in params


def test_errors_name_the_tensor(tmp_path):
  src = _copy_with_target(tmp_path, lambda t: t["projection_layer"].__setitem__("bias", np.zeros(768, np.float32)))
  with pytest.raises(CheckpointError, match="projection_layer/bias"):
    t5x_format.load_t5x_checkpoint(src)
  shutil.rmtree(os.path.join(src, "target.encoder.layers_1.mlp.wo.kernel"))
  with pytest.raises(CheckpointError, match="encoder/layers_1/mlp/wo/kernel"):
    t5x_format.load_t5x_checkpoint(src)


def test_missing_zarr_chunks_are_refused_not_read_as_zeros(tmp_path, monkeypatch):
  """An interrupted copy leaves chunk files out; zarr would fill them with zeros without a word."""
  src = str(tmp_path / "ckpt")
  shutil.copytree(T5X, src)
  os.remove(os.path.join(src, "target.token_embedder.embedding", "3.0"))
  with pytest.raises(CheckpointError, match=r"token_embedder/embedding' lacks 1 of its 8 zarr chunk files.*'3.0'"):
    t5x_format.load_t5x_checkpoint(src)
  monkeypatch.setenv("INSTRUCTOR_JAX_ALLOW_MISSING_CHUNKS", "1")
  params = t5x_format.load_t5x_checkpoint(src)[1]
  assert not np.asarray(params["token_embedder"]["embedding"])[3 * 4096:4 * 4096].any()


def test_shape_mismatch_names_the_tensor(tmp_path):
  src = _copy_with_target(tmp_path, lambda t: t["encoder"]["layers_1"]["pre_mlp_layer_norm"].__setitem__(
      "scale", np.ones(5, np.float32)))
  with pytest.raises(CheckpointError, match=r"encoder/layers_1/pre_mlp_layer_norm/scale.*\(5,\).*\(4,\)"):
    t5x_format.load_t5x_checkpoint(src)


def test_model_dir_with_step_subdirs(tmp_path):
  root = tmp_path / "model"
  root.mkdir()
  for step in (500, 1000):
    shutil.copytree(T5X, root / f"checkpoint_{step}")
  assert t5x_format.is_t5x_checkpoint(str(root))
  assert t5x_format.resolve_checkpoint_dir(str(root)).endswith("checkpoint_1000")
  assert t5x_format.resolve_checkpoint_dir(str(root), step=500).endswith("checkpoint_500")
  with pytest.raises(CheckpointError, match=r"checkpoint_7.*\[500, 1000\]"):
    t5x_format.resolve_checkpoint_dir(str(root), step=7)
  # The checkpoint_<step> directory itself, with or without its own step.
  one = str(root / "checkpoint_500")
  assert t5x_format.resolve_checkpoint_dir(one, step=500) == one
  with pytest.raises(CheckpointError, match="is the checkpoint of step 500, but step=1000 was requested"):
    t5x_format.resolve_checkpoint_dir(one, step=1000)
  with pytest.raises(CheckpointError, match="is a single t5x checkpoint, but step=0 was requested"):
    t5x_format.resolve_checkpoint_dir(T5X, step=0)


def test_gcs_paths_map_to_gcs_kvstore():
  # Only the spec is checked (no network in CI): gs:// resolves to tensorstore's gcs driver.
  assert t5x_format._kvstore("gs://t5-data/pretrained_models/t5x/retrieval/gtr_base/checkpoint_1100000") == {
      "driver": "gcs", "bucket": "t5-data", "path": "pretrained_models/t5x/retrieval/gtr_base/checkpoint_1100000/"}
  assert t5x_format._join("gs://b/ckpt", "target.x") == "gs://b/ckpt/target.x"
