"""The encoder's 16-bit dropout: the rate, the scale, independence, determinism, any mesh."""

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


def test_the_two_halves_of_a_word_are_independent():
  keep = np.asarray(_apply(jnp.ones((256, 4096), jnp.float32))) != 0
  low, high = keep[:, 0::2].ravel(), keep[:, 1::2].ravel()
  assert abs(np.corrcoef(low, high)[0, 1]) < 0.01
  assert abs(np.corrcoef(keep[:-1].ravel(), keep[1:].ravel())[0, 1]) < 0.01  # nor rows


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
def test_mask_does_not_depend_on_the_mesh():
  x = jnp.asarray(np.random.default_rng(0).standard_normal((16, 4, 32, 48)), jnp.float32)
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))
  sharded = jax.device_put(x, NamedSharding(mesh, PartitionSpec("data", "model")))
  run = jax.jit(lambda v: _apply(v, seed=3))
  np.testing.assert_array_equal(run(sharded), run(x))
