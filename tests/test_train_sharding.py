"""The train step on 8 fake CPU devices: mesh-independent results, global negatives, GradCache."""

import functools
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instructor_jax import sharding as shd, train_step as ts
from instructor_jax.config import preset
from instructor_jax.losses import instructor_loss
from instructor_jax.model import InstructorModel
from instructor_jax.optim import OptimConfig, make_optimizer
from instructor_jax.train import pad_batch_to

CONFIG = preset("tiny").with_encoder(dropout_rate=0.0)
QUERY_LEN, DOC_LEN = 8, 12  # different lengths: exercises the two-pass path
# eps 1e-3 keeps Adam's first step from turning float-noise-sized gradients into +-lr updates.
OPTIM = OptimConfig(learning_rate=1e-4, warmup_fraction=0.0, eps=1e-3)
# At the default 0.01 a random tiny model's softmax is so peaked (loss ~80) that reduction-order
# noise grows ~1e-4 relative by the second step; 0.1 keeps the comparison well conditioned.
TEMPERATURE = 0.1


def random_batch(seed: int, batch: int = 16) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  out = {}
  for role in ts.ROLES:
    length = QUERY_LEN if role == "query" else DOC_LEN
    lengths = rng.integers(3, length + 1, size=batch)
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
    out[f"{role}_ids"] = (rng.integers(3, 300, size=(batch, length)) * mask).astype(np.int32)
    out[f"{role}_mask"] = mask
    out[f"{role}_n_instr"] = rng.integers(0, 3, size=batch).astype(np.int32)
  return out


@functools.lru_cache(maxsize=1)
def host_params():
  boxed = ts._init_params_fn(CONFIG)(jax.random.key(0))
  return jax.device_get(nn.unbox(boxed))


def mesh_of(data, fsdp, tensor):
  return shd.make_mesh(shd.MeshConfig(data, fsdp, tensor), jax.devices()[:data * fsdp * tensor])


def run_steps(mesh, batches, config=CONFIG, optim=OPTIM, **step_kwargs):
  tx, schedule = make_optimizer(optim, 10)
  state = ts.init_state(config, tx, mesh, params=host_params())
  step = ts.make_train_step(config, tx, schedule, mesh, temperature=TEMPERATURE, **step_kwargs)
  metrics = []
  for b in batches:
    state, m = step(state, shd.global_batch(b, mesh))
    metrics.append(jax.device_get(m))
  return jax.device_get(state.params), metrics, state


@functools.lru_cache(maxsize=1)
def reference_run():
  """Two steps on one device: what every mesh (and GradCache) must reproduce."""
  params, metrics, _ = run_steps(mesh_of(1, 1, 1), [random_batch(1), random_batch(2)])
  return params, metrics


def test_same_results_on_every_mesh():
  batches = [random_batch(1), random_batch(2)]
  reference_params, reference_metrics = reference_run()
  for shape in [(8, 1, 1), (2, 4, 1), (2, 2, 2)]:
    params, metrics, state = run_steps(mesh_of(*shape), batches)
    for m, r in zip(metrics, reference_metrics):
      for k in ("loss", "loss_q2d", "loss_d2q", "grad_norm"):
        np.testing.assert_allclose(m[k], r[k], rtol=1e-5, atol=1e-5, err_msg=f"{k} on mesh {shape}")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, err_msg=f"params on mesh {shape}"),
                 params, reference_params)
  # The state really is sharded on the last mesh: FSDP over embed, tensor over the MLP width.
  wi = state.params["encoder"]["layers_0"]["mlp"]["wi"]["kernel"]
  assert wi.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  assert {s.data.shape for s in wi.addressable_shards} == {(16, 32)}
  mu = jax.tree.leaves(state.opt_state, is_leaf=lambda x: hasattr(x, "mu"))
  assert any(getattr(x, "mu", None) is not None for x in mu)


def test_negatives_come_from_every_device():
  """Query 0's only close hard negative sits on the last device's shard; the step's loss must feel it."""
  mesh = mesh_of(8, 1, 1)
  base = random_batch(3)
  planted = {k: v.copy() for k, v in base.items()}
  last = len(base["neg_ids"]) - 1
  # neg[last] := a copy of query 0 (padded to doc length): a perfect "negative" for query 0 only.
  planted["neg_ids"][last] = 0
  planted["neg_ids"][last, :QUERY_LEN] = base["query_ids"][0]
  planted["neg_mask"][last] = 0
  planted["neg_mask"][last, :QUERY_LEN] = base["query_mask"][0]
  planted["neg_n_instr"][last] = base["query_n_instr"][0]
  model = InstructorModel(CONFIG)
  embed = jax.jit(lambda p, b: ts.embed_triples(model, p, b, jax.random.key(0), True))
  params = jax.device_put(host_params(), shd.replicated(mesh))
  global_planted = shd.global_batch(planted, mesh)
  q, p, n = embed(params, global_planted)
  owner = [s.device for s in global_planted["neg_ids"].addressable_shards if s.index[0].start == last - 1]
  assert owner == [mesh.devices.flat[-1]] and q.sharding.spec[0] is not None  # rows are sharded
  np.testing.assert_allclose(float(q[0] @ n[last]), 1.0, atol=1e-5)
  _, metrics, _ = run_steps(mesh, [planted])
  planted_loss, planted_terms = instructor_loss(np.asarray(q), np.asarray(p), np.asarray(n), TEMPERATURE)
  np.testing.assert_allclose(metrics[0]["loss"], float(planted_loss), rtol=1e-5)
  # Without the cross-device negative (the step's embeddings, n[last] swapped back) term 1 drops.
  qb, pb, nb = embed(params, shd.global_batch(base, mesh))
  _, base_terms = instructor_loss(np.asarray(qb), np.asarray(pb), np.asarray(nb), TEMPERATURE)
  assert float(planted_terms["loss_q2d"]) > float(base_terms["loss_q2d"]) + 1.0 / len(base["neg_ids"])


def test_embed_triples_matches_separate_passes():
  """Interleaving roles of equal length and running queries at their own length changes nothing."""
  model = InstructorModel(CONFIG)
  batch = {k: jnp.asarray(v) for k, v in random_batch(4).items()}
  params = host_params()
  q, p, n = ts.embed_triples(model, params, batch, jax.random.key(0), True)
  for role, got in zip(ts.ROLES, (q, p, n)):
    want = model.apply({"params": params}, batch[f"{role}_ids"], batch[f"{role}_mask"], batch[f"{role}_n_instr"])
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_grad_cache_gives_the_plain_gradients():
  mesh = mesh_of(2, 2, 2)
  batch = shd.global_batch(random_batch(1), mesh)
  model = InstructorModel(CONFIG)
  embed = functools.partial(ts.embed_triples, model, deterministic=True)
  loss_fn = functools.partial(instructor_loss, temperature=TEMPERATURE)
  params = jax.device_put(host_params(), ts.state_shardings(CONFIG, make_optimizer(OPTIM, 10)[0], mesh).params)
  rng = jax.random.key(0)

  def both(params, batch):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(shd.LOGICAL_RULES):
      plain = jax.value_and_grad(lambda p: loss_fn(*embed(p, batch, rng)), has_aux=True)(params)
      cached = ts.grad_cache_grads(embed, loss_fn, params, batch, rng, chunks=4)
    return plain, cached

  ((loss, _), grads), ((loss_gc, _), grads_gc) = jax.jit(both)(params, batch)
  np.testing.assert_allclose(loss_gc, loss, rtol=1e-6)
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5 * scale), grads_gc, grads)
  # And through the whole sharded train step: the same two updates as the one-device plain run.
  reference_params, reference_metrics = reference_run()
  gc_params, gc_metrics, _ = run_steps(mesh, [random_batch(1), random_batch(2)], grad_cache_chunks=2)
  for m, r in zip(gc_metrics, reference_metrics):
    np.testing.assert_allclose(m["grad_norm"], r["grad_norm"], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), gc_params, reference_params)


def test_padding_beyond_the_longest_text_changes_nothing():
  """Why TrainConfig.length_buckets may pad a batch to its bucket instead of query_len/doc_len."""
  reference_params, reference_metrics = reference_run()
  padded = [pad_batch_to(random_batch(1), 16, 32), pad_batch_to(random_batch(2), 32, 16)]
  params, metrics, _ = run_steps(mesh_of(2, 2, 2), padded)
  for m, r in zip(metrics, reference_metrics):
    np.testing.assert_allclose(m["loss"], r["loss"], rtol=1e-6)
    assert m["real_tokens"] == r["real_tokens"]
  # 1e-5 is a tenth of one step's largest update (lr 1e-4), as on the meshes above: padding changes
  # the summation order, and on an AVX2-only CPU (no AVX-512 GEMM kernels) the two runs' parameters
  # differed by up to 1.5e-6 after two AdamW steps.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), params, reference_params)


@pytest.mark.parametrize("policy", ["full", "save_dots_no_batch"])
def test_remat_changes_nothing_but_memory(policy):
  reference_params, reference_metrics = reference_run()
  params, metrics, _ = run_steps(mesh_of(1, 1, 1), [random_batch(1), random_batch(2)],
                                 config=CONFIG.with_encoder(remat_policy=policy))
  np.testing.assert_allclose([m["loss"] for m in metrics], [m["loss"] for m in reference_metrics], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), params, reference_params)


def test_adafactor_state_is_sharded_and_steps():
  mesh = mesh_of(2, 2, 2)
  params, metrics, state = run_steps(mesh, [random_batch(1)], optim=OptimConfig(name="adafactor", learning_rate=1e-3, warmup_fraction=0.0))
  assert np.isfinite(metrics[0]["loss"]) and metrics[0]["grad_norm"] > 0
  changed = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), params, host_params())
  assert min(jax.tree.leaves(changed)) > 0  # every parameter moved
  assert all(x.sharding.mesh.shape == mesh.shape for x in jax.tree.leaves(state.opt_state))


COMPILE_STEP = r"""
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import jax
import numpy as np
from instructor_jax import sharding as shd, train_step as ts
from instructor_jax.config import preset
from instructor_jax.optim import OptimConfig, make_optimizer
cfg = preset("tiny").with_encoder(dropout_rate=0.0)
mesh = shd.make_mesh(shd.MeshConfig(2, 2, 2))
tx, schedule = make_optimizer(OptimConfig(), 10)
state = ts.abstract_state(cfg, tx, mesh)
batch = {k: jax.ShapeDtypeStruct((16,) if k.endswith("n_instr") else (16, 8 if k.startswith("query") else 12),
                                 np.int32, sharding=s) for k, s in ts.batch_shardings(mesh).items()}
ts.make_train_step(cfg, tx, schedule, mesh, grad_cache_chunks=2).lower(state, batch).compile()
print("COMPILED")
"""


def test_no_involuntary_full_rematerialization():
  """GSPMD must never fall back to replicating a whole activation (it did with the table's columns on fsdp)."""
  env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "XLA_FLAGS")}
  done = subprocess.run([sys.executable, "-c", COMPILE_STEP], env=env, capture_output=True, text=True, timeout=300)
  assert "COMPILED" in done.stdout, done.stderr
  assert "Involuntary full rematerialization" not in done.stderr, done.stderr[-3000:]


def test_vocab_that_does_not_divide_is_replicated():
  config = CONFIG.with_encoder(vocab_size=1001)
  shardings = ts.state_shardings(config, make_optimizer(OPTIM, 10)[0], mesh_of(1, 8, 1))
  assert shardings.params["token_embedder"]["embedding"].spec == jax.sharding.PartitionSpec(None, None)
  normal = ts.state_shardings(CONFIG, make_optimizer(OPTIM, 10)[0], mesh_of(1, 8, 1))
  assert normal.params["token_embedder"]["embedding"].spec == jax.sharding.PartitionSpec(("fsdp", "tensor"), None)


def test_a_mesh_that_cannot_shard_the_parameters_is_named_before_allocating():
  """fsdp=8 with d_model 36: every kernel would be replicated over fsdp; the warning says which, and how much."""
  assert ts.sharding_warning(CONFIG, mesh_of(1, 8, 1)) is None
  wide = CONFIG.with_encoder(d_model=36)
  text = ts.sharding_warning(wide, mesh_of(1, 8, 1), min_bytes=0)
  assert "cannot split" in text and "token_embedder/embedding" not in text  # vocab rows still divide by 8
  assert "18 parameter(s)" in text and "[36, 64] over 1 device(s), not 8" in text  # the largest 4 are listed
  assert "MeshConfig.data=2, MeshConfig.fsdp=4" in text  # gcd(8, 36) = 4
  found = {name for name, *_ in shd.sharding_fallbacks(jax.eval_shape(ts._init_params_fn(wide), jax.random.key(0)),
                                                       mesh_of(1, 8, 1))}
  assert "encoder/layers_1/attention/query/kernel" in found and "encoder/relpos_bias/rel_embedding" not in found
  # tensor 3 divides neither the heads nor the vocabulary: no fsdp size fits, and the warning still forms.
  text = ts.sharding_warning(CONFIG, mesh_of(1, 2, 3), min_bytes=0)
  assert "tensor divides the heads (4)" in text and "MeshConfig.data=2, MeshConfig.fsdp=1" in text


def test_batch_not_divisible_by_mesh_is_a_clear_error():
  mesh = mesh_of(8, 1, 1)
  with pytest.raises(ValueError, match="multiple of data\\*fsdp"):
    run_steps(mesh, [random_batch(6, batch=8)], grad_cache_chunks=2)  # 8 rows, 8 shards x 2 chunks


def test_mesh_config_resolves_and_rejects():
  assert shd.MeshConfig(-1, 2, 2).shape(8) == (2, 2, 2)
  with pytest.raises(ValueError, match="devices"):
    shd.MeshConfig(3, 1, 1).shape(8)
  with pytest.raises(ValueError, match="at most one -1"):
    shd.MeshConfig(-1, -1, 1).shape(8)
