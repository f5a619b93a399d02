"""The encoder's 16-bit dropout (four draws per Threefry block): the rate, the scale, independence,
determinism, any mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from instructor_jax.t5 import Dropout


def _apply(x, rate=0.1, seed=0, deterministic=False):
  return Dropout(rate).apply({}, x, deterministic, rngs={"dropout": jax.random.PRNGKey(seed)})


def test_rate_scale_and_mean():
  x = jnp.ones((16, 8, 64, 129), jnp.float32)  # odd last axis: one word's upper half is unused
  y = np.asarray(_apply(x))
  dropped = (y == 0).mean()
  assert abs(dropped - 6554 / 65536) < 0.002, dropped  # about 1M draws: 6 standard deviations
  assert np.unique(y[y != 0]).tolist() == [np.float32(65536 / (65536 - 6554))]
  assert abs(y.mean() - 1.0) < 0.003


def test_the_four_draws_of_a_block_are_independent():
  keep = np.asarray(_apply(jnp.ones((256, 4096), jnp.float32))) != 0
  quarters = [keep[:, i::4].ravel() for i in range(4)]  # the 16-bit quarters of one Threefry block
  for i in range(4):
    for j in range(i + 1, 4):
      assert abs(np.corrcoef(quarters[i], quarters[j])[0, 1]) < 0.01, (i, j)
  assert abs(np.corrcoef(keep[:-1].ravel(), keep[1:].ravel())[0, 1]) < 0.01  # nor rows
  assert abs(np.corrcoef(keep[:, :-4].ravel(), keep[:, 4:].ravel())[0, 1]) < 0.01  # nor neighbouring blocks


def test_draws_are_uniform_and_other_prng_keys_draw_through_jax_random():
  from instructor_jax.t5 import dropout_draws
  draws = np.asarray(dropout_draws(jax.random.key(7), (64, 1024)))
  assert draws.max() < 65536
  counts = np.bincount(draws.ravel() >> 12, minlength=16)  # 16 equal bins, 4096 draws expected in each
  assert counts.min() > 3700 and counts.max() < 4500, counts
  rbg = np.asarray(dropout_draws(jax.random.key(7, impl="rbg"), (64, 1024)))
  assert rbg.shape == (64, 1024) and rbg.max() < 65536 and abs(rbg.mean() / 65536 - 0.5) < 0.01


def test_identity_when_deterministic_or_rate_zero_and_zeros_at_rate_one():
  x = jnp.arange(12.0).reshape(3, 4)
  np.testing.assert_array_equal(_apply(x, deterministic=True), x)
  np.testing.assert_array_equal(_apply(x, rate=0.0), x)
  np.testing.assert_array_equal(_apply(x, rate=1.0), np.zeros((3, 4)))


def test_same_key_same_mask_other_key_other_mask():
  x = jnp.ones((8, 256), jnp.float32)
  np.testing.assert_array_equal(_apply(x, seed=1), _apply(x, seed=1))
  assert not np.array_equal(_apply(x, seed=1), _apply(x, seed=2))


def test_bfloat16_is_scaled_in_float32_then_rounded():
  x = jnp.full((4, 64), 3.0, jnp.bfloat16)
  y = _apply(x)
  assert y.dtype == jnp.bfloat16
  want = jnp.asarray(3.0 * 65536 / (65536 - 6554), jnp.float32).astype(jnp.bfloat16)
  assert set(np.asarray(y, np.float32)[np.asarray(y, np.float32) != 0].tolist()) == {float(want)}


@pytest.mark.skipif(jax.device_count() < 8, reason="needs the 8 host devices tests/conftest.py sets up")
@pytest.mark.parametrize("spec", [PartitionSpec("data", "model"), PartitionSpec(None, None, "data", "model")])
def test_mask_does_not_depend_on_the_mesh(spec):
  x = jnp.asarray(np.random.default_rng(0).standard_normal((16, 4, 32, 48)), jnp.float32)
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))
  sharded = jax.device_put(x, NamedSharding(mesh, spec))
  run = jax.jit(lambda v: _apply(v, seed=3))
  np.testing.assert_array_equal(run(sharded), run(x))
  typed = jax.jit(lambda v: Dropout(0.1).apply({}, v, False, rngs={"dropout": jax.random.key(3)}))
  np.testing.assert_array_equal(typed(sharded), typed(x))  # a typed key (what the trainer passes) draws the same
