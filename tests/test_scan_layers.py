"""T5Config.scan_layers: the encoder's layers as one lax.scan over their stacked parameters."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instructor_jax import medi_packing, orbax_io, sharding as shd, train_step as ts
from instructor_jax.model import InstructorModel
from instructor_jax.optim import OptimConfig, make_optimizer
from instructor_jax.train_config import TrainConfig
from test_train_packing import packed, random_task
from test_train_sharding import CONFIG, mesh_of, random_batch, reference_run, run_steps

THREE = CONFIG.with_encoder(num_layers=3)


def _inputs():
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(3, 300, (4, 16)), jnp.int32)
  mask = jnp.ones((4, 16), jnp.int32).at[1, 9:].set(0)
  return ids, mask, jnp.asarray([2, 0, 3, 1], jnp.int32)


@pytest.mark.parametrize("policy", ["none", "full", "save_dots_no_batch"])
def test_scanned_layers_compute_what_unrolled_layers_do(policy):
  ids, mask, n_instr = _inputs()
  params = nn.unbox(InstructorModel(THREE).init(jax.random.key(0), ids, mask, n_instr)["params"])
  scanned = THREE.with_encoder(scan_layers=True, remat_policy=policy)
  # The parameter tree is the unrolled one (checkpoints and conversion are unchanged).
  init = nn.unbox(InstructorModel(scanned).init(jax.random.key(0), ids, mask, n_instr)["params"])
  assert jax.tree.structure(init) == jax.tree.structure(params)

  def loss(p, config):
    emb = InstructorModel(config).apply({"params": p}, ids, mask, n_instr, deterministic=False,
                                        rngs={"dropout": jax.random.key(1)})
    return jnp.sum(emb ** 3), emb

  (want, want_emb), want_grads = jax.value_and_grad(loss, has_aux=True)(params, THREE)
  (got, got_emb), got_grads = jax.value_and_grad(loss, has_aux=True)(params, scanned)
  np.testing.assert_allclose(got_emb, want_emb, atol=1e-6)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), got_grads, want_grads)
  assert np.abs(got_grads["encoder"]["relpos_bias"]["rel_embedding"]).max() > 0  # reached through the scan


def test_scanned_layers_with_dropout_are_deterministic_per_key():
  ids, mask, n_instr = _inputs()
  config = THREE.with_encoder(scan_layers=True, dropout_rate=0.1)
  params = nn.unbox(InstructorModel(THREE).init(jax.random.key(0), ids, mask, n_instr)["params"])

  def run(seed, c=config):
    return InstructorModel(c).apply({"params": params}, ids, mask, n_instr, deterministic=False,
                                    rngs={"dropout": jax.random.key(seed)})

  np.testing.assert_array_equal(run(5), run(5))
  assert np.abs(run(5) - run(6)).max() > 1e-3
  quiet = InstructorModel(config).apply({"params": params}, ids, mask, n_instr)
  assert np.abs(run(5) - quiet).max() > 1e-3


@pytest.mark.parametrize("mesh_shape", [(1, 1, 1), (2, 2, 2)])
def test_scanned_train_step_equals_the_unrolled_one(mesh_shape):
  """Two optimizer steps, full remat, on one device and a data x fsdp x tensor mesh of 8."""
  reference_params, reference_metrics = reference_run()
  config = CONFIG.with_encoder(scan_layers=True, remat_policy="full")
  params, metrics, _ = run_steps(mesh_of(*mesh_shape), [random_batch(1), random_batch(2)], config=config)
  for m, r in zip(metrics, reference_metrics):
    for k in ("loss", "loss_q2d", "loss_d2q", "grad_norm"):
      np.testing.assert_allclose(m[k], r[k], rtol=1e-5, atol=1e-5, err_msg=k)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), params, reference_params)


def test_scanned_packed_step_equals_the_unrolled_one():
  task = random_task()
  mesh = mesh_of(4, 2, 1)
  batches = [packed(task, np.arange(16), shd.batch_size_multiple(mesh))]
  want_params, want, _ = run_steps(mesh, batches, packed=True)
  got_params, got, _ = run_steps(mesh, batches, config=CONFIG.with_encoder(scan_layers=True), packed=True)
  for k in ("loss", "grad_norm"):  # random_task has texts that are all instruction: zero rows, finite gradients
    np.testing.assert_allclose(got[0][k], want[0][k], rtol=1e-5, equal_nan=False, err_msg=k)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, equal_nan=False), got_params, want_params)
  assert medi_packing.PACKED_KEYS[0] in batches[0]


def test_full_remat_in_a_scan_keeps_one_layer_at_a_time():
  """XLA's temp grows per added triple by a fraction of the plain step's when the layers are scanned
  under full remat (0.09 against 1.28 MiB here). Unrolled remat layers depend on the XLA version:
  JAX 0.10's XLA:CPU hoists their recomputation (1.33 MiB), 0.11's keeps 0.13 here but 0.78 GiB per
  triple at gtr-large against 0.18 scanned (BENCHMARKS.md), so they are not compared here."""
  config = CONFIG.with_encoder(num_layers=6, d_model=64, d_ff=256, num_heads=4, d_kv=16, dropout_rate=0.1)
  mesh = mesh_of(1, 1, 1)
  tx, schedule = make_optimizer(OptimConfig(learning_rate=1e-4), 10)

  def growth_per_triple(c):
    state = ts.init_state(c, tx, mesh)
    step = ts.make_train_step(c, tx, schedule, mesh)
    temp = [step.lower(state, shd.global_batch(random_batch(1, batch=b), mesh)).compile().memory_analysis()
            .temp_size_in_bytes for b in (8, 32)]
    return (temp[1] - temp[0]) / 24

  plain = growth_per_triple(config)
  scanned = growth_per_triple(config.with_encoder(remat_policy="full", scan_layers=True))
  assert 0 < scanned < 0.25 * plain, (plain, scanned)


def test_saved_configs_leave_scan_layers_out():
  config = CONFIG.with_encoder(scan_layers=True)
  saved = orbax_io.config_to_dict(config)
  assert "scan_layers" not in saved["encoder"]
  assert orbax_io.config_from_dict(saved) == config.with_encoder(scan_layers=False)
  with pytest.raises(ValueError, match="scan_layers='yes'; expected True or False"):
    TrainConfig(scan_layers="yes")
