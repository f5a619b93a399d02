"""Checks that need a GPU (or TPU): they skip on CPU, which is where CI runs.

On a GPU machine (benchmarks/gpu_all.sh `extra` runs them first):
    JAX_PLATFORMS=cuda python -m pytest -q tests/test_accelerator.py
conftest.py defaults JAX_PLATFORMS to cpu, so without that variable these tests skip everywhere.
INSTRUCTOR_JAX_ACCELERATOR_TESTS_ON_CPU=1 runs those that need no cuDNN on the CPU, to check the
tests themselves.
"""

import dataclasses
import os
import warnings

import jax
import numpy as np
import pytest
from embed_support import sentences, tiny_model

from instructor_jax import sharding as shd
from instructor_jax import train_step as ts
from instructor_jax.config import preset
from instructor_jax.instructor import Instructor
from instructor_jax.medi_batches import global_batches
from instructor_jax.optim import OptimConfig, make_optimizer
from instructor_jax.tokenization import Tokenizer

pytestmark = pytest.mark.skipif(jax.default_backend() == "cpu" and not os.environ.get("INSTRUCTOR_JAX_ACCELERATOR_TESTS_ON_CPU"),
                                reason="needs a GPU or TPU (JAX_PLATFORMS=cuda)")
gpu_only = pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs a GPU")


def _model(**encoder):
  """The tiny test model (head dim 16: cuDNN needs a multiple of 8) with other encoder settings."""
  base = tiny_model()
  return Instructor(base.config.with_encoder(**encoder), base.params, base.tokenizer)


def _texts():
  return [["Represent the sentence for retrieval: ", s] for s in sentences(40)] + sentences(24, seed=1)


def _min_cosine(a, b):
  return float(np.min(np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)))


@gpu_only
@pytest.mark.parametrize("pack", [False, True])
def test_cudnn_attention_equals_xla_attention(pack):
  """The relative-position bias and the padding (key lengths) reach cuDNN's fused kernel intact."""
  texts = _texts()
  ref = _model(dtype="bfloat16", attention_impl="dot_product_attention").encode(texts, pack=pack)
  got = _model(dtype="bfloat16", attention_impl="cudnn").encode(texts, pack=pack)
  assert _min_cosine(got, ref) >= 0.999


@gpu_only
def test_auto_picks_cudnn_on_this_gpu():
  """The default (attention_impl="auto") runs cuDNN's kernel on an Ampere-or-later GPU in bf16."""
  from instructor_jax.t5 import _compute_capability
  if _compute_capability(jax.devices()[0]) < 8.0:
    pytest.skip("cuDNN's flash attention needs compute capability 8.0")
  auto = _model(dtype="bfloat16")
  assert auto.config.encoder.attention_impl == "auto" and auto.attention_kernel == "cudnn"
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # no fallback warning: cuDNN took every call
    got = auto.encode(_texts())
  np.testing.assert_array_equal(got, _model(dtype="bfloat16", attention_impl="cudnn").encode(_texts()))


@gpu_only
def test_cudnn_attention_in_float16_equals_xla_attention():
  texts = _texts()
  ref = _model(dtype="float16", attention_impl="dot_product_attention").encode(texts)
  assert _min_cosine(_model(dtype="float16", attention_impl="cudnn").encode(texts), ref) >= 0.999


@gpu_only
def test_cudnn_training_gradients_match_the_einsums():
  """Training at dropout 0 with attention_impl="cudnn": cuDNN's backward pass, the bias gradient included."""
  import flax.linen as nn
  import jax.numpy as jnp
  from instructor_jax.model import InstructorModel
  base = tiny_model()
  rng = np.random.default_rng(0)
  ids = rng.integers(2, 300, size=(8, 64)).astype(np.int32)
  mask = (np.arange(64)[None, :] < rng.integers(3, 65, size=(8, 1))).astype(np.int32)
  ids, n_instr = ids * mask, np.minimum(mask.sum(1) - 1, 3).astype(np.int32)
  weights = jax.random.normal(jax.random.key(1), (8, base.config.embedding_dim))

  def loss_and_grads(impl):
    model = InstructorModel(base.config.with_encoder(dtype="bfloat16", dropout_rate=0.0, attention_impl=impl))
    loss = lambda p: jnp.sum(model.apply({"params": p}, ids, mask, n_instr, deterministic=False,
                                         rngs={"dropout": jax.random.key(2)}) * weights)
    return jax.jit(jax.value_and_grad(loss))(nn.unbox(base.params))

  (loss_c, g_c), (loss_x, g_x) = loss_and_grads("cudnn"), loss_and_grads("xla")
  np.testing.assert_allclose(float(loss_c), float(loss_x), rtol=2e-2, atol=1e-2)
  flat_c, flat_x = (np.concatenate([np.ravel(np.asarray(x, np.float32)) for x in jax.tree.leaves(g)]) for g in (g_c, g_x))
  assert _min_cosine(flat_c[None], flat_x[None]) >= 0.99
  table = lambda g: np.asarray(g["encoder"]["relpos_bias"]["rel_embedding"], np.float32).ravel()[None]
  assert _min_cosine(table(g_c), table(g_x)) >= 0.99  # the bias gradient reaches the position table


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_close_to_float32(dtype):
  texts = _texts()
  ref = _model(dtype="float32").encode(texts)
  assert _min_cosine(_model(dtype=dtype).encode(texts), ref) >= 0.999


def test_bf16_train_step_learns():
  """The quickstart recipe's step in bf16 with dropout on the accelerator (no gin or TensorBoard,
  which the GPU machine lacks): finite, and the loss falls over 60 steps of the MEDI sample."""
  import pathlib
  medi = pathlib.Path(__file__).resolve().parents[1] / "data" / "medi_sample.jsonl"
  cfg = preset("tiny").with_encoder(dtype="bfloat16", dropout_rate=0.1)
  mesh = shd.make_mesh(shd.MeshConfig(data=-1, fsdp=1, tensor=1))
  tx, schedule = make_optimizer(OptimConfig(learning_rate=1e-3, warmup_fraction=0.1), total_steps=60)
  state = ts.init_state(cfg, tx, mesh, seed=0)
  step_fn = ts.make_train_step(cfg, tx, schedule, mesh, loss="instructor", temperature=0.05)
  losses = []
  encode = Tokenizer.from_pretrained(None).encode_pieces  # HF's ids; the GPU machine has no sentencepiece
  for _, _, local in global_batches(str(medi), global_batch_size=16, query_len=64, doc_len=64, num_steps=60,
                                    encode_fn=encode, log_fn=lambda _: None):
    state, metrics = step_fn(state, shd.global_batch(local, mesh))
    losses.append(float(metrics["loss"]))
  losses = np.array(losses)
  assert np.isfinite(losses).all() and losses[-15:].mean() < losses[:15].mean(), losses


def test_preset_shapes_compile_on_the_accelerator():
  """gtr-base's real shape in bf16 (one forward), so a kernel or layout problem at size shows here."""
  cfg = dataclasses.replace(preset("gtr-base"), max_seq_length=128).with_encoder(dtype="bfloat16")
  from instructor_jax.model import InstructorModel
  import jax.numpy as jnp
  ids = jnp.ones((8, 128), jnp.int32)
  params = jax.jit(InstructorModel(cfg).init)(jax.random.PRNGKey(0), ids, ids, jnp.zeros((8,), jnp.int32))
  out = jax.jit(InstructorModel(cfg).apply)(params, ids, ids, jnp.zeros((8,), jnp.int32))
  assert out.shape == (8, 768) and bool(jnp.isfinite(out).all())
