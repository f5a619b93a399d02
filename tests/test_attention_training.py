"""Training without dropout runs attention on the fused kernels; with dropout, on the einsums.

The fused kernels (jax.nn.dot_product_attention: XLA's, or cuDNN's by name) have no attention
dropout, so they serve inference and training without it (dropout_rate 0, or attention_dropout_rate
0 with the other dropouts kept). Here the loss and gradients,
the relative-position table's included, are checked against the einsum path; cuDNN itself needs a
GPU, so its calls are routed to XLA's kernel with the arguments the cuDNN path builds.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instructor_jax.config import preset
from instructor_jax.model import InstructorModel

CFG = preset("tiny").replace(max_seq_length=32)


def _batch():
  rng = np.random.default_rng(0)
  ids = rng.integers(2, 300, size=(6, 24)).astype(np.int32)
  mask = np.ones_like(ids)
  for row, length in enumerate((24, 17, 9, 24, 3, 12)):  # trailing padding, as the trainer builds it
    mask[row, length:] = 0
    ids[row, length:] = 0
  return jnp.asarray(ids), jnp.asarray(mask), jnp.asarray([0, 3, 0, 5, 1, 2], jnp.int32)


@pytest.fixture(scope="module")
def params():
  ids, mask, n_instr = _batch()
  return nn.unbox(InstructorModel(CFG).init(jax.random.key(0), ids, mask, n_instr)["params"])


def _loss_and_grads(params, impl, dropout, attention_dropout=None, scan_layers=False):
  model = InstructorModel(CFG.with_encoder(attention_impl=impl, dropout_rate=dropout,
                                           attention_dropout_rate=attention_dropout, scan_layers=scan_layers))
  ids, mask, n_instr = _batch()
  weights = jax.random.normal(jax.random.key(1), (ids.shape[0], CFG.embedding_dim))

  def loss(p):
    emb = model.apply({"params": p}, ids, mask, n_instr, deterministic=False, rngs={"dropout": jax.random.key(2)})
    return jnp.sum(emb * weights)

  return jax.jit(jax.value_and_grad(loss))(params)


@pytest.fixture
def attention_calls(monkeypatch):
  """Records every jax.nn.dot_product_attention call; `implementation="cudnn"` runs XLA's kernel."""
  real, calls = jax.nn.dot_product_attention, []

  def routed(*args, implementation=None, **kwargs):
    calls.append((implementation, sorted(k for k, v in kwargs.items() if v is not None)))
    return real(*args, implementation="xla" if implementation == "cudnn" else implementation, **kwargs)

  monkeypatch.setattr(jax.nn, "dot_product_attention", routed)
  return calls


def _assert_close(got, want):
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-6)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=2e-4, atol=1e-6), got[1], want[1])


def test_training_without_dropout_uses_the_fused_kernel_with_the_same_gradients(params, attention_calls):
  einsums = _loss_and_grads(params, "xla", 0.0)
  assert not attention_calls
  fused = _loss_and_grads(params, "dot_product_attention", 0.0)
  assert {c[0] for c in attention_calls} == {None}
  _assert_close(fused, einsums)
  table = fused[1]["encoder"]["relpos_bias"]["rel_embedding"]
  assert np.abs(np.asarray(table)).max() > 0  # the position bias gets its gradient through the kernel
  attention_calls.clear()
  auto = _loss_and_grads(params, "auto", 0.0)  # training: XLA's kernel (cuDNN only by name)
  assert {c[0] for c in attention_calls} == {None}
  jax.tree.map(np.testing.assert_array_equal, auto, fused)


def test_training_asks_cudnn_by_name_with_key_lengths(params, attention_calls):
  got = _loss_and_grads(params, "cudnn", 0.0)
  assert {c[0] for c in attention_calls} == {"cudnn"}
  assert {tuple(c[1]) for c in attention_calls} == {("bias", "key_value_seq_lengths", "scale")}
  _assert_close(got, _loss_and_grads(params, "xla", 0.0))


@pytest.mark.parametrize("impl", ["auto", "dot_product_attention", "cudnn"])
def test_training_with_dropout_keeps_the_einsums(params, attention_calls, impl):
  got = _loss_and_grads(params, impl, 0.1)
  assert not attention_calls
  jax.tree.map(np.testing.assert_array_equal, got, _loss_and_grads(params, "xla", 0.1))


@pytest.mark.parametrize("scan_layers", [False, True])
def test_attention_dropout_0_keeps_the_other_dropouts_and_runs_the_fused_kernel(params, attention_calls, scan_layers):
  einsums = _loss_and_grads(params, "xla", 0.1, attention_dropout=0.0, scan_layers=scan_layers)
  assert not attention_calls
  for impl in ("dot_product_attention", "cudnn"):
    attention_calls.clear()
    fused = _loss_and_grads(params, impl, 0.1, attention_dropout=0.0, scan_layers=scan_layers)
    assert attention_calls and {c[0] for c in attention_calls} == {None if impl != "cudnn" else "cudnn"}
    _assert_close(fused, einsums)  # the same hidden-state masks: dropping attention draws no other
  no_dropout = _loss_and_grads(params, "xla", 0.0, scan_layers=scan_layers)
  all_dropout = _loss_and_grads(params, "xla", 0.1, scan_layers=scan_layers)
  for other in (no_dropout, all_dropout):  # the other dropouts are on, the attention's off
    assert abs(float(einsums[0]) - float(other[0])) > 1e-4


def test_attention_dropout_alone_still_draws_its_masks(params):
  """dropout_rate 0 with attention dropout: the scanned layers still get a dropout key."""
  for scan_layers in (False, True):
    dropped = _loss_and_grads(params, "xla", 0.0, attention_dropout=0.3, scan_layers=scan_layers)
    assert abs(float(dropped[0]) - float(_loss_and_grads(params, "xla", 0.0, scan_layers=scan_layers)[0])) > 1e-4


def test_a_train_step_never_resolves_auto_to_cudnn(monkeypatch, attention_calls):
  """Even a deterministic step (no dropout masks) trains "auto" on XLA's kernel: cuDNN's fallback
  covers the forward pass only."""
  import types

  from instructor_jax import sharding as shd
  from instructor_jax import t5, train_step as ts
  from instructor_jax.optim import OptimConfig, make_optimizer
  monkeypatch.setattr(t5, "_default_device", lambda: types.SimpleNamespace(platform="gpu", compute_capability="9.0"))
  jax.clear_caches()
  cfg = CFG.with_encoder(dtype="bfloat16")  # "auto" at inference on that device: cuDNN
  assert t5.attention_kernel("auto", "bfloat16") == "cudnn"
  mesh = shd.make_mesh(shd.MeshConfig(data=-1, fsdp=1, tensor=1))
  tx, schedule = make_optimizer(OptimConfig(learning_rate=1e-3, warmup_fraction=0.0), total_steps=10)
  step = ts.make_train_step(cfg, tx, schedule, mesh, deterministic=True)
  ids, mask, n_instr = _batch()
  n = 8  # a multiple of the 8 test devices
  rows = {f"{role}_{field}": np.resize(np.asarray(x), (n,) + x.shape[1:]) for role in ("query", "pos", "neg")
          for field, x in (("ids", ids), ("mask", mask), ("n_instr", n_instr))}
  state = ts.init_state(cfg, tx, mesh, seed=0)  # its init runs the model's inference forward pass
  attention_calls.clear()
  _, metrics = step(state, shd.global_batch(rows, mesh))
  assert np.isfinite(float(metrics["loss"]))
  assert attention_calls and {c[0] for c in attention_calls} == {None}
  jax.clear_caches()
