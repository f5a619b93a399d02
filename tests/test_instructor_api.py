"""The Instructor API: sentence-transformers parity, invariances, bf16, devices, clear errors."""

import json
import pathlib
import shutil
import warnings

import numpy as np
import pytest

from instructor_jax import Instructor
from instructor_jax.hf_format import CheckpointError
from instructor_jax.tokenization import InputError

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "tiny_instructor"
DATA = pathlib.Path(__file__).parent / "data" / "sentences.tsv"
INSTRUCTIONS = ["Represent the Science title: ", "Represent the Wikipedia question for retrieving supporting documents:",
                "query: "]


def sentences(n=40):
  lines = DATA.read_text().splitlines()[1:]
  return [line.split("\t", 1)[1] for line in lines[:n]]


@pytest.fixture(scope="module")
def model():
  return Instructor.from_pretrained(str(FIXTURE))


def test_matches_sentence_transformers_with_prompt(model):
  st = pytest.importorskip("sentence_transformers")
  ref_model = st.SentenceTransformer(str(FIXTURE), device="cpu")
  pooling = next(m for m in ref_model if isinstance(m, st.models.Pooling))
  pooling.include_prompt = False  # what our export writes; hkunlp's old config predates the flag
  texts = sentences(24)
  worst = 0.0
  for instruction in INSTRUCTIONS:
    want = ref_model.encode(texts, prompt=instruction, batch_size=8, convert_to_numpy=True)
    got = model.encode([[instruction, t] for t in texts], batch_size=8)
    worst = max(worst, float(np.abs(got - want).max()))
  assert worst <= 1e-5, worst


def test_same_text_same_embedding_whatever_the_batch(model):
  texts = [["Represent the sentence: ", s] for s in sentences(20)]
  alone = np.stack([model.encode([t], batch_size=1)[0] for t in texts[:4]])
  mixed = model.encode(texts, batch_size=16)[:4]
  # Different padded lengths (buckets) and batch companions.
  long_pad = model.encode(texts[:4], batch_size=4, buckets=(512,))
  np.testing.assert_allclose(mixed, alone, atol=2e-6)
  np.testing.assert_allclose(long_pad, alone, atol=2e-6)


def test_bfloat16_close_to_float32(model):
  texts = [["Represent the sentence: ", s] for s in sentences(16)] + sentences(8)
  bf16 = Instructor(model.config.with_encoder(dtype="bfloat16"), model.params, model.tokenizer)
  cos = np.sum(bf16.encode(texts) * model.encode(texts), axis=1)
  assert cos.min() >= 0.999, cos.min()


@pytest.mark.parametrize("pack", [True, False])
def test_float16_close_to_float32(model, pack):
  """float16 runs on CPU too (its matmuls widened to float32 there, exactly; see t5.matmul)."""
  texts = [["Represent the sentence: ", s] for s in sentences(16)] + sentences(8)
  fp16 = Instructor(model.config.with_encoder(dtype="fp16"), model.params, model.tokenizer)
  assert fp16.config.encoder.dtype == "float16"
  cos = np.sum(fp16.encode(texts, pack=pack) * model.encode(texts, pack=pack), axis=1)
  assert cos.min() >= 0.999, cos.min()


def test_float16_on_a_cpu_mesh_of_a_gpu_host_is_refused(model, monkeypatch):
  """The CPU float16 form is chosen by the default backend; a CPU mesh beside a GPU would get the GPU form."""
  import jax
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  with pytest.raises(ValueError, match="float16 on a CPU mesh while JAX's default backend is gpu"):
    Instructor(model.config.with_encoder(dtype="float16"), model.params, model.tokenizer)


def test_float16_on_gpu_is_float16_gemms_feeding_a_float32_residual_stream(monkeypatch):
  """The accelerator form (lowered here, not run): float16 operands everywhere; `out` and `wo` return float32."""
  import dataclasses

  import jax
  import jax.numpy as jnp
  from instructor_jax.config import preset
  from instructor_jax.t5 import T5Encoder
  cfg = dataclasses.replace(preset("tiny").encoder, dtype="float16", attention_impl="xla", num_layers=1)
  ids = jnp.ones((2, 8), jnp.int32)
  params = T5Encoder(cfg).init(jax.random.PRNGKey(0), ids, ids)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  hlo = jax.jit(T5Encoder(cfg).apply).lower(params, ids, ids).as_text()
  dots = [line.split("dot_general")[1].rsplit("->", 1) for line in hlo.splitlines() if "dot_general" in line]
  # q, k, v, logits, weights x values, out, wi, wo
  assert len(dots) == 8 and all(operands.count("xf16>") == 2 for operands, _ in dots), dots
  assert [result.strip()[-4:] for _, result in dots].count("f32>") == 3, dots  # logits, out, wo


@pytest.mark.parametrize("bf16_dot", [True, False])
def test_bfloat16_matmuls_on_cpu_accumulate_to_float32_then_round(monkeypatch, bf16_dot):
  """XLA:CPU's fast bf16 GEMM is the one with a float32 result where the CPU has bf16 dot instructions;
  without them the operands are widened to float32 (BENCHMARKS.md). Both give the same numbers."""
  import jax
  import jax.numpy as jnp
  from instructor_jax import t5
  monkeypatch.setattr(t5, "cpu_has_bf16_dot", lambda: bf16_dot)
  dense = t5.Dense(8, ("embed", "mlp"), jnp.bfloat16)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 16)), jnp.float32)
  params = dense.init(jax.random.PRNGKey(0), x)
  hlo = jax.jit(dense.apply).lower(params, x).as_text()
  dots = [line for line in hlo.splitlines() if "dot_general" in line]
  operands = "bf16>" if bf16_dot else "tensor<4x16xf32>"
  assert len(dots) == 1 and operands in dots[0] and "-> tensor<4x8xf32>" in dots[0], dots
  got = dense.apply(params, x)
  assert got.dtype == jnp.bfloat16
  kernel = params["params"]["kernel"].unbox()
  want = (x.astype(jnp.bfloat16).astype(jnp.float32) @ kernel.astype(jnp.bfloat16).astype(jnp.float32))
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want.astype(jnp.bfloat16), np.float32))


@pytest.mark.parametrize("text, expected", [
    ("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 fma\n", True),   # Zen 4, Sapphire Rapids
    ("processor\t: 0\nflags\t\t: fpu avx2 fma vaes\n", False),                 # Zen 3: AVX2 only
    ("processor\t: 0\nflags\t\t: fpu avx512f amx_bf16 amx_tile\n", True),
    ("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n", True),             # Graviton 3
    ("processor\t: 0\nFeatures\t: fp asimd evtstrm aes crc32\n", False),        # Graviton 2
    ("nothing that lists CPU features\n", True),
])
def test_cpu_bf16_dot_instructions_are_read_from_cpuinfo(tmp_path, text, expected):
  from instructor_jax.t5 import cpu_has_bf16_dot
  path = tmp_path / "cpuinfo"
  path.write_text(text)
  assert cpu_has_bf16_dot(str(path)) is expected
  assert cpu_has_bf16_dot(str(tmp_path / "missing")) is True  # not Linux: the form measured on AVX512-BF16


def test_bfloat16_weights_cast_once_give_bit_identical_embeddings(model):
  """The bf16 forward reads pre-cast matmul weights; the numbers equal casting at every use."""
  import jax
  import jax.numpy as jnp
  from instructor_jax.model import InstructorModel
  from instructor_jax.tokenization import pad_batch
  bf16 = Instructor(model.config.with_encoder(dtype="bfloat16"), model.params, model.tokenizer)
  ids, n_instr = bf16.tokenizer.tokenize([["Represent the sentence: ", s] for s in sentences(8)], 64)
  batch = pad_batch(ids, n_instr, 64, 8)
  got = np.asarray(bf16.embed_batch_async(batch))
  apply = jax.jit(lambda p, *a: InstructorModel(bf16.config).apply({"params": p}, *a))
  want = np.asarray(apply(bf16.params, batch.ids, batch.mask, batch.n_instr))
  np.testing.assert_array_equal(got, want)
  dtypes = {jax.tree_util.keystr(k): v.dtype for k, v in jax.tree_util.tree_flatten_with_path(bf16.forward_params())[0]}
  assert dtypes["['encoder']['layers_0']['mlp']['wi']['kernel']"] == jnp.bfloat16
  assert dtypes["['token_embedder']['embedding']"] == jnp.bfloat16
  assert dtypes["['projection_layer']['kernel']"] == jnp.float32  # the projection runs in float32
  assert dtypes["['encoder']['encoder_norm']['scale']"] == jnp.float32
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(bf16.params))  # what save_pretrained writes
  assert model.forward_params() is model.params  # float32: no copy
  # Editing a weight in place is seen by the next call (the cast copy is rebuilt).
  before = bf16.encode(["a plain sentence"])
  bf16.params["token_embedder"]["embedding"] = bf16.params["token_embedder"]["embedding"] * 0.5
  fresh = Instructor(bf16.config, bf16.params, bf16.tokenizer)
  np.testing.assert_array_equal(bf16.encode(["a plain sentence"]), fresh.encode(["a plain sentence"]))
  assert np.abs(bf16.encode(["a plain sentence"]) - before).max() > 1e-4


def test_cudnn_attention_arguments_give_the_same_embeddings(model, monkeypatch):
  """The cuDNN path (padding as key lengths, shared [1, H, L, L] bias) checked on CPU.

  cuDNN itself needs a GPU; here its call is routed to JAX's XLA implementation with the very
  arguments the cuDNN path builds, so what is checked is that those arguments mean the same thing.
  """
  import jax
  real = jax.nn.dot_product_attention
  calls = []

  def routed(*args, implementation=None, **kwargs):
    calls.append((implementation, sorted(k for k, v in kwargs.items() if v is not None), kwargs["bias"].shape))
    return real(*args, implementation="xla" if implementation == "cudnn" else implementation, **kwargs)

  monkeypatch.setattr(jax.nn, "dot_product_attention", routed)
  texts = [["Represent the sentence: ", s] for s in sentences(13)] + sentences(2)  # 15: a filler row
  cudnn = Instructor(model.config.with_encoder(attention_impl="cudnn"), model.params, model.tokenizer)
  for pack in (False, True):
    want = model.encode(texts, batch_size=8, pack=pack)
    calls.clear()
    np.testing.assert_allclose(cudnn.encode(texts, batch_size=8, pack=pack), want, atol=1e-6)
    assert {c[0] for c in calls} == {"cudnn"}
    kinds = {tuple(c[1]) for c in calls}
    # Unpacked rows: lengths, no mask; packed rows need the per-text block mask.
    assert kinds == ({("bias", "mask", "scale")} if pack else {("bias", "key_value_seq_lengths", "scale")}), kinds
    assert all(c[2][0] == 1 for c in calls)  # the position bias is shared by the batch, never [B, ...]


def test_one_device_equals_eight_devices(model):
  import jax
  assert len(jax.local_devices()) == 8
  one = Instructor(model.config, model.params, model.tokenizer,
                   mesh=jax.sharding.Mesh(np.array(jax.local_devices()[:1]), ("data",)))
  texts = sentences(20)
  np.testing.assert_allclose(one.encode(texts, batch_size=8), model.encode(texts, batch_size=8), atol=2e-6)


def test_output_shape_order_and_norm(model):
  texts = sentences(10)
  out = model.encode(texts, batch_size=3)
  assert out.shape == (10, 24) and out.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
  np.testing.assert_allclose(out[::-1], model.encode(texts[::-1], batch_size=3), atol=2e-6)
  assert model.encode("single string").shape == (24,)


@pytest.mark.parametrize("bad", [[["only one"]], [[1, "text"]], [None], [["a", "b", "c", "d"]]])
def test_bad_input_is_a_clear_error(model, bad):
  with pytest.raises(InputError, match="input 0"):
    model.encode(bad)


def test_an_instruction_covering_its_text_is_an_error_as_in_instructor_embedding(model):
  """1.0.1 fails an assertion when the instruction alone has more pieces than instruction + text;
  pooling over nothing would give a zero vector."""
  from instructor_jax.tokenization import InstructionCoversTextError
  # More pieces alone than in the whole input (1.0.1 asserts), or as many (1.0.1 returns zeros).
  for item, n, total in ((["compreh", "end"], 3, 2), (["Represent the: compreh", "end"], 7, 6),
                         (["compreh", "ends"], 3, 3), (["informat", "ion"], 2, 2)):
    with pytest.raises(InstructionCoversTextError, match=f"input 1: .* to {n} pieces .* only {total} with EOS"):
      model.encode([["Represent the title: ", "a cat"], item])
  assert np.linalg.norm(model.encode([["compreh", "end of it"]])) > 0.99  # one piece left to pool, and EOS


def test_sentence_transformers_style_device_dimension_and_tokenizer(model):
  import jax
  assert model.get_sentence_embedding_dimension() == 24 == model.encode("a cat").shape[0]
  one = Instructor.from_pretrained(str(FIXTURE), device="cpu:1")
  assert list(one.mesh.devices.flat) == [jax.local_devices(backend="cpu")[1]]
  np.testing.assert_allclose(one.encode(sentences(5)), model.encode(sentences(5)), atol=2e-6)
  assert Instructor.from_pretrained(str(FIXTURE), device="cpu").mesh.devices.size == 8
  for device, message in (("cuda", "no 'gpu' backend"), ("cpu:8", "an index below 8"), ("cpu:x", "an index")):
    with pytest.raises(ValueError, match=message):
      Instructor.from_pretrained(str(FIXTURE), device=device)
  with pytest.raises(TypeError, match="from_pretrained"):
    Instructor.from_pretrained(str(FIXTURE), cache_folder="/tmp")
  with pytest.raises(InputError, match="got one string 'a cat'; wrap it in a list"):
    model.tokenizer.tokenize("a cat")
  with pytest.raises(InputError, match="Tokenizer.encode_pieces"):
    model.tokenizer.encode_pieces("a cat")


def test_an_unwrapped_pair_warns_but_embeds_two_texts_as_instructor_embedding_does(model):
  with pytest.warns(UserWarning, match=r"pass \[\[instruction, text\]\]"):
    out = model.encode(["Represent the title: ", "a cat"])
  np.testing.assert_allclose(out, np.stack([model.encode("Represent the title: "), model.encode("a cat")]), atol=1e-6)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    model.encode(["a cat", "a dog"])  # two plain texts: no warning


@pytest.mark.parametrize("kwargs", [{"batch_size": 0}, {"batch_size": -1}, {"batch_size": 2.5}, {"batch_size": True}])
def test_bad_batch_size_is_refused_not_zero_embeddings(model, kwargs):
  with pytest.raises(ValueError, match="batch_size"):
    model.encode([["Represent the title: ", "a cat"]], **kwargs)


def test_max_seq_length_zero_is_refused_not_the_default(model):
  with pytest.raises(ValueError, match="max_len must be >= 2"):
    model.encode(["a cat"], max_seq_length=0)


def test_unknown_layout_and_missing_paths(tmp_path):
  (tmp_path / "weights.npz").write_bytes(b"")
  with pytest.raises(CheckpointError, match="unknown checkpoint layout"):
    Instructor.from_pretrained(str(tmp_path))
  with pytest.raises(CheckpointError, match="no such directory"):
    Instructor.from_pretrained(str(tmp_path / "nope" / "deeper"))


def test_not_a_t5_encoder(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
  with pytest.raises(CheckpointError, match="expected a T5 encoder"):
    Instructor.from_pretrained(str(tmp_path))


def test_offline_hub_id_is_a_clear_error(monkeypatch, tmp_path):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setenv("SENTENCE_TRANSFORMERS_HOME", str(tmp_path))
  with pytest.raises(CheckpointError, match="could not be fetched from the Hugging Face Hub.*sentence-transformers 2.x"):
    Instructor.from_pretrained("hkunlp/instructor-nonexistent-xyz")


def test_offline_hub_id_falls_back_to_instructor_embeddings_cache(model, monkeypatch, tmp_path):
  """Users of InstructorEmbedding 1.0.1 have hkunlp/instructor-* in sentence-transformers 2.x's cache
  (SENTENCE_TRANSFORMERS_HOME/owner_name), not in the Hub's: offline, that copy is loaded."""
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setenv("SENTENCE_TRANSFORMERS_HOME", str(tmp_path))
  shutil.copytree(FIXTURE, tmp_path / "hkunlp_instructor-tiny")
  with pytest.warns(UserWarning, match="hkunlp_instructor-tiny") as caught:
    cached = Instructor.from_pretrained("hkunlp/instructor-tiny")
  assert caught[0].filename == __file__  # the warning points at the caller's line
  with pytest.raises(CheckpointError, match=r"the sentence-transformers 2.x copy at .*hkunlp_instructor-tiny is not used "
                                            r"for a --revision / revision= request"):
    Instructor.from_pretrained("hkunlp/instructor-tiny", revision="main")  # that copy records no revision
  (tmp_path / "hkunlp_instructor-partial").mkdir()  # no modules.json: an interrupted download, not used
  with pytest.raises(CheckpointError, match="could not be fetched"):
    Instructor.from_pretrained("hkunlp/instructor-partial")
  pairs = [["Represent the title: ", "a cat"], "a plain sentence"]
  np.testing.assert_array_equal(cached.encode(pairs), model.encode(pairs))


def test_a_default_prompt_is_kept_and_its_non_use_by_encode_is_said(tmp_path):
  """sentence-transformers' encode prepends a model's default prompt; ours takes [instruction, text]
  pairs as 1.0.1 does, so loading such a model says how to get sentence-transformers' vectors."""
  src = tmp_path / "prompted"
  shutil.copytree(FIXTURE, src)
  (src / "config_sentence_transformers.json").write_text(json.dumps(
      {"prompts": {"query": "Represent the question: "}, "default_prompt_name": "query"}))
  with pytest.warns(UserWarning, match=r"default prompt 'query' \('Represent the question: '\) is not applied by "
                                       r"encode.*\[\[model.prompts\['query'\], text\], \.\.\.\]") as caught:
    prompted = Instructor.from_pretrained(str(src))
  assert caught[0].filename == __file__
  assert prompted.prompts == {"query": "Represent the question: "} and prompted.default_prompt_name == "query"
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # no default prompt, no warning
    Instructor.from_pretrained(FIXTURE)


def test_packed_rows_equal_padded_rows(model):
  texts = sentences(40)
  items = ([["Represent the sentence: ", t] for t in texts[:20]] + texts[20:]
           + ["", ["Title ", "one-token instruction"], ["query: ", ""], "word " * 300])
  padded = model.encode(items, batch_size=16, pack=False)
  packed = model.encode(items, batch_size=16, pack=True, pack_length=64)
  np.testing.assert_allclose(packed, padded, atol=2e-6)


def test_pack_rows_places_every_text_once_within_capacity():
  from instructor_jax.tokenization import pack_rows
  rng = np.random.default_rng(0)
  lengths = list(rng.integers(1, 65, size=500))
  rows = pack_rows(lengths, 64, max_texts=5)
  assert sorted(i for row in rows for i in row) == list(range(500))
  assert all(sum(lengths[i] for i in row) <= 64 and len(row) <= 5 for row in rows)
  assert sum(lengths) / (64 * len(rows)) > 0.8  # best-fit decreasing fills rows (padding to 64: ~0.5)
  with pytest.raises(ValueError, match="more than the packed row length"):
    pack_rows([65], 64, 5)


@pytest.mark.parametrize("repo, expected", [
    # sentence-transformers/gtr-t5-* style: safetensors next to .bin, plus ONNX / OpenVINO exports.
    ({"model.safetensors": "w", "pytorch_model.bin": "w", "onnx/model.onnx": "x", "onnx/config.json": "{}",
      "openvino/openvino_model.bin": "x", "2_Dense/model.safetensors": "w", "2_Dense/pytorch_model.bin": "w"},
     {"model.safetensors", "2_Dense/model.safetensors"}),
    # hkunlp/instructor-* style: torch .bin only.
    ({"pytorch_model.bin": "w", "2_Dense/pytorch_model.bin": "w"}, {"pytorch_model.bin", "2_Dense/pytorch_model.bin"}),
])
def test_hub_download_fetches_only_the_weights_it_loads(monkeypatch, tmp_path, repo, expected):
  """No ONNX/OpenVINO exports and no duplicate .bin weights (gtr-t5-xxl: ~10 GB each) are downloaded."""
  import fnmatch
  import huggingface_hub
  from instructor_jax import sources
  repo = {"config.json": "{}", "modules.json": json.dumps([{"path": ""}, {"path": "1_Pooling"}, {"path": "2_Dense"}]),
          "1_Pooling/config.json": "{}", "2_Dense/config.json": "{}", "spiece.model": "s", **repo}
  fetched = set()

  def fake_snapshot_download(name, revision=None, allow_patterns=None, ignore_patterns=None):
    for path, content in repo.items():
      if any(fnmatch.fnmatch(path, p) for p in allow_patterns) and not any(
          fnmatch.fnmatch(path, p) for p in ignore_patterns or ()):
        fetched.add(path)
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(content)
    return str(tmp_path)

  monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
  assert sources.resolve_hub_id("owner/model") == str(tmp_path)
  weights = {p for p in fetched if p.endswith((".bin", ".safetensors", ".onnx"))}
  assert weights == expected
  assert not any(p.startswith(("onnx/", "openvino/")) for p in fetched)


def test_encode_refuses_what_it_cannot_honour(model):
  with pytest.raises(ValueError, match="output_value='token_embeddings'"):
    model.encode(["a"], output_value="token_embeddings")
  with pytest.raises(TypeError):
    model.encode(["a"], no_such_option=True)
  # InstructorEmbedding's own arguments are accepted.
  out = model.encode(["a"], device="cpu", convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False)
  np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
