"""attention_impl="tpu_flash": the Pallas TPU kernel, run here by Pallas' TPU interpreter on the CPU.

The interpreter executes the kernel's own program (blocks, online softmax, bias and segment
handling, and its backward kernels), so these tests check the numbers; what they cannot check is
Mosaic's compilation for a real TPU.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from embed_support import INSTRUCTION, sentences, tiny_model
from instructor_jax import tpu_attention
from instructor_jax.instructor import Instructor
from instructor_jax.model import InstructorModel

pltpu = pytest.importorskip("jax.experimental.pallas.tpu")

ITEMS = [(INSTRUCTION, t) for t in sentences(12, seed=3)]


@pytest.fixture(scope="module")
def one_device_model():
  # The interpreter runs on one device: under shard_map over several CPU devices it waits forever.
  return tiny_model(mesh=Mesh(np.array(jax.devices()[:1]), ("data",)), max_seq_length=128)


def _flash(model):
  return Instructor(model.config.with_encoder(attention_impl="tpu_flash"), model.params, model.tokenizer,
                    mesh=model.mesh)


def test_embeddings_equal_the_xla_path_padded_and_packed(one_device_model):
  flash = _flash(one_device_model)
  ref = one_device_model.encode(ITEMS, buckets=(128,), pack=False)
  ref_packed = one_device_model.encode(ITEMS, pack=True)
  with pltpu.force_tpu_interpret_mode():
    got = flash.encode(ITEMS, buckets=(128,), pack=False, batch_size=8)
    got_packed = flash.encode(ITEMS, pack=True, batch_size=8)
  np.testing.assert_allclose(got, ref, atol=1e-6)
  np.testing.assert_allclose(got_packed, ref_packed, atol=1e-6)


def test_other_lengths_keep_the_xla_path(one_device_model):
  """64-token buckets are not the kernel's (128-token key blocks): no kernel, so no interpreter needed."""
  flash = _flash(one_device_model)
  short = dict(buckets=(64,), pack=False, max_seq_length=64)
  np.testing.assert_array_equal(flash.encode(ITEMS, **short), one_device_model.encode(ITEMS, **short))
  assert tpu_attention.applies(256, deterministic=False, attention_dropout=0.0)
  assert not tpu_attention.applies(256, deterministic=False, attention_dropout=0.1)
  assert not tpu_attention.applies(96, deterministic=True, attention_dropout=0.0)


def test_training_gradients_match_the_einsums_without_dropout(one_device_model):
  """The kernel's backward, bias gradient included (it trains the relative-position table)."""
  cfg = one_device_model.config.with_encoder(dropout_rate=0.0)
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(2, 1000, size=(2, 128)), jnp.int32)
  mask = jnp.asarray(np.arange(128)[None, :] < np.array([[128], [77]]), jnp.int32)
  n_instr = jnp.array([5, 3], jnp.int32)

  def grads(impl):
    model = InstructorModel(cfg.with_encoder(attention_impl=impl))

    def loss(params):
      emb = model.apply({"params": params}, ids, mask, n_instr, deterministic=False)
      return jnp.sum(jnp.sin(3.0 * emb))
    # Jitted: the interpreter's callbacks, dispatched op by op, could stall under a loaded machine.
    return jax.jit(jax.grad(loss))(one_device_model.params)

  want = grads("xla")
  with pltpu.force_tpu_interpret_mode():
    got = grads("tpu_flash")
  flat_want, flat_got = jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got)
  for (path, w), g in zip(flat_want, flat_got):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))
  rel = [g for (path, _), g in zip(flat_want, flat_got) if "rel_embedding" in jax.tree_util.keystr(path)]
  assert len(rel) == 1 and np.abs(rel[0]).max() > 0  # the bias gradient reaches the position table


def test_under_a_mesh_each_shard_gets_its_rows_and_heads(monkeypatch):
  """shard_map specs: batch over data x fsdp, heads over tensor; the per-shard call is swapped for einsums."""
  B, L, H, K = 8, 128, 4, 16
  rng = np.random.default_rng(1)
  q, k, v = (jnp.asarray(rng.standard_normal((B, L, H, K), np.float32)) for _ in range(3))
  bias = jnp.asarray(rng.standard_normal((H, L, L), np.float32))
  lengths = np.array([128, 100, 64, 1, 128, 30, 90, 128])
  segments = jnp.asarray(np.arange(L)[None, :] < lengths[:, None], jnp.int32)
  segments = segments.at[1, 50:100].set(2)  # a packed row: two texts

  def reference(q, k, v, bias, seg):
    logits = jnp.einsum("bqhk,bmhk->bhqm", q, k) + bias[None]
    same = seg[:, None, :, None] == seg[:, None, None, :]
    weights = jax.nn.softmax(jnp.where(same, logits, -jnp.inf), axis=-1)
    return jnp.einsum("bhqm,bmhk->bqhk", weights, v)

  seen = []

  def local(q, k, v, bias, seg):
    seen.append((q.shape, bias.shape, seg.shape))
    return reference(q, k, v, bias, seg)

  monkeypatch.setattr(tpu_attention, "_local", local)
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
  rows = P(("data", "fsdp"))
  args = [jax.device_put(x, NamedSharding(mesh, spec)) for x, spec in
          ((q, rows), (k, rows), (v, rows), (bias, P()), (segments, rows))]  # as the train step's inputs are
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    got = jax.jit(tpu_attention.flash_attention_BLHK)(*args)
  assert seen == [((2, L, 2, K), (2, L, L), (2, L))]
  np.testing.assert_allclose(got, reference(q, k, v, bias, segments), atol=1e-5)
