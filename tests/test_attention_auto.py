"""attention_impl="auto" (the default): cuDNN's fused attention on a GPU in bf16/fp16, XLA's elsewhere.

cuDNN needs a GPU (tests/test_accelerator.py compares it with XLA's kernel there). Here the choice
itself is checked: on CPU "auto" is XLA's kernel bit for bit; with the backend reported as a GPU it
calls cuDNN with the arguments of attention_impl="cudnn", and falls back to XLA's kernel, with a
warning, where cuDNN refuses the call while tracing.
"""

import json
import os
import types
import warnings

import jax
import numpy as np
import pytest
from embed_support import sentences, tiny_model

from instructor_jax import embed, t5
from instructor_jax.config import T5Config
from instructor_jax.instructor import Instructor
from instructor_jax.t5 import attention_kernel

TEXTS = [["Represent the sentence: ", s] for s in sentences(13)] + sentences(2)  # 15 rows: a filler row at 8


@pytest.fixture(scope="module")
def model():
  return tiny_model()


def _with(model, **encoder):
  return Instructor(model.config.with_encoder(**encoder), model.params, model.tokenizer)


HOPPER = types.SimpleNamespace(platform="gpu", compute_capability="9.0")


def test_auto_is_the_default_and_resolves_per_device_and_dtype():
  assert T5Config().attention_impl == "auto"
  assert attention_kernel("auto", "bfloat16", HOPPER) == "cudnn"
  assert attention_kernel("auto", "float16", HOPPER) == "cudnn"
  assert attention_kernel("auto", "float32", HOPPER) == "dot_product_attention"  # cuDNN has no float32 kernel
  for other in (types.SimpleNamespace(platform="gpu", compute_capability="7.0"),  # V100: no cuDNN flash attention
                types.SimpleNamespace(platform="gpu", compute_capability="gfx90a"),  # ROCm
                types.SimpleNamespace(platform="gpu"), types.SimpleNamespace(platform="tpu"), jax.devices()[0]):
    assert attention_kernel("auto", "bfloat16", other) == "dot_product_attention", other
  assert attention_kernel("auto", "bfloat16") == "dot_product_attention"  # JAX's first device: a CPU here
  for impl in ("xla", "dot_product_attention", "cudnn", "tpu_flash"):
    assert attention_kernel(impl, "bfloat16", HOPPER) == impl


def test_auto_on_cpu_is_xla_fused_attention_bit_for_bit(model):
  assert model.config.encoder.attention_impl == "auto" and model.attention_kernel == "dot_product_attention"
  assert _with(model, dtype="float16").attention_kernel == "xla"  # XLA:CPU cannot fuse float16 attention
  for dtype in ("float32", "bfloat16"):
    for pack in (False, True):
      want = _with(model, dtype=dtype, attention_impl="dot_product_attention").encode(TEXTS, batch_size=8, pack=pack)
      np.testing.assert_array_equal(_with(model, dtype=dtype).encode(TEXTS, batch_size=8, pack=pack), want)


@pytest.fixture
def as_if_on_gpu(monkeypatch):
  """`start()` makes the model trace as if on a Hopper GPU from then on (jit caches cleared around
  it) and routes every `implementation="cudnn"` call to XLA's kernel, recording it; `refuse` makes
  them raise instead."""
  real = jax.nn.dot_product_attention
  calls, refuse = [], []

  def routed(*args, implementation=None, **kwargs):
    calls.append((implementation, sorted(k for k, v in kwargs.items() if v is not None)))
    if implementation == "cudnn" and refuse:
      raise RuntimeError("cuDNN is not detected.")
    return real(*args, implementation="xla" if implementation == "cudnn" else implementation, **kwargs)

  def start():
    jax.clear_caches()
    monkeypatch.setattr(jax.nn, "dot_product_attention", routed)
    monkeypatch.setattr(t5, "_default_device", lambda: HOPPER)

  yield start, calls, refuse
  jax.clear_caches()  # no program traced under the pretence outlives the test


def test_auto_on_a_gpu_calls_cudnn_as_attention_impl_cudnn_does(model, as_if_on_gpu):
  start, calls, _ = as_if_on_gpu
  auto, cudnn = _with(model, dtype="bfloat16"), _with(model, dtype="bfloat16", attention_impl="cudnn")
  start()
  for pack in (False, True):
    calls.clear()
    got = auto.encode(TEXTS, batch_size=8, pack=pack)
    auto_calls = list(calls)
    calls.clear()
    np.testing.assert_array_equal(got, cudnn.encode(TEXTS, batch_size=8, pack=pack))
    assert auto_calls == calls and {c[0] for c in auto_calls} == {"cudnn"}, auto_calls
    assert {tuple(c[1]) for c in auto_calls} == ({("bias", "mask", "scale")} if pack
                                                 else {("bias", "key_value_seq_lengths", "scale")})
  assert auto.attention_kernel == "dot_product_attention"  # what its CPU devices run; on a GPU mesh: cudnn


def test_auto_falls_back_to_xla_where_cudnn_refuses(model, as_if_on_gpu):
  start, calls, refuse = as_if_on_gpu
  auto, cudnn = _with(model, dtype="bfloat16"), _with(model, dtype="bfloat16", attention_impl="cudnn")
  want = _with(model, dtype="bfloat16", attention_impl="dot_product_attention").encode(TEXTS, batch_size=8)
  start()
  refuse.append(True)
  with pytest.warns(UserWarning, match=r"attention_impl='auto': cuDNN's fused attention refused .*cuDNN is not "
                                       r"detected.*using XLA's dot_product_attention"):
    got = auto.encode(TEXTS, batch_size=8)
  assert {c[0] for c in calls} == {"cudnn", None}
  np.testing.assert_array_equal(got, want)
  with pytest.raises(RuntimeError, match="cuDNN is not detected"):  # asked for by name, a refusal is an error
    cudnn.encode(TEXTS, batch_size=8)


def test_a_mesh_off_the_default_backend_resolves_auto_to_xla(model, monkeypatch):
  """"auto" is resolved while tracing, from the default backend: CPU devices beside a GPU get XLA's kernel."""
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    on_cpu = _with(model, dtype="bfloat16")
  assert on_cpu.config.encoder.attention_impl == "dot_product_attention"
  assert on_cpu.attention_kernel == "dot_product_attention"


def test_embed_job_records_the_attention_kernel(model, tmp_path):
  src = tmp_path / "in.jsonl"
  src.write_text("".join(json.dumps({"text": t}) + "\n" for t in sentences(5)))
  out = str(tmp_path / "out")
  embed.main(["--input", str(src), "--output", out, "--no-progress", "--format", "npy"], model=model)
  runtime = json.load(open(os.path.join(out, "_runtime.json")))
  assert runtime["attention"] == "dot_product_attention"
