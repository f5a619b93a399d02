"""Encoder parity against transformers.T5EncoderModel (fp32 hidden states within 1e-5)."""

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

from instructor_jax import hf_format  # noqa: E402
from instructor_jax.t5 import T5Encoder, relative_position_buckets  # noqa: E402

CONFIGS = {
    "v1.0": dict(d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2, feed_forward_proj="relu"),
    "v1.1": dict(d_model=32, d_kv=8, num_heads=4, d_ff=48, num_layers=2, feed_forward_proj="gated-gelu"),
    # heads * d_kv != d_model, like gtr-xl / gtr-xxl.
    "xl-like": dict(d_model=24, d_kv=16, num_heads=3, d_ff=40, num_layers=3, feed_forward_proj="relu"),
}


def _random_hf_encoder(kwargs, seed):
  torch.manual_seed(seed)
  cfg = transformers.T5Config(vocab_size=300, relative_attention_num_buckets=32,
                              relative_attention_max_distance=128, dropout_rate=0.0, **kwargs)
  model = transformers.T5EncoderModel(cfg).eval()
  with torch.no_grad():
    for p in model.parameters():  # the default init is tiny; make activations O(1)
      p.normal_(0.0, 0.3)
  return cfg, model


@pytest.mark.parametrize("attention_impl", ["dot_product_attention", "xla"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_hidden_states_match_transformers(name, attention_impl):
  hf_cfg, model = _random_hf_encoder(CONFIGS[name], seed=len(name))
  cfg = dataclasses.replace(hf_format.t5_config_from_hf(hf_cfg.to_dict(), name), attention_impl=attention_impl)
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  params = hf_format.params_from_hf(state, cfg, name)

  rng = np.random.default_rng(0)
  B, L = 3, 150  # long enough to reach the logarithmic buckets
  ids = rng.integers(2, 300, size=(B, L))
  mask = np.ones((B, L), np.int64)
  mask[1, 90:] = 0
  mask[2, 7:] = 0
  with torch.no_grad():
    ref = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
  ours = np.asarray(T5Encoder(cfg).apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask)))
  valid = mask.astype(bool)
  np.testing.assert_allclose(ours[valid], ref[valid], atol=1e-5, rtol=1e-5)


def test_bucket_table_matches_transformers():
  from transformers.models.t5.modeling_t5 import T5Attention
  for L in (1, 7, 64, 200, 600):
    pos = torch.arange(L)
    rel = pos[None, :] - pos[:, None]
    ref = T5Attention._relative_position_bucket(rel, bidirectional=True, num_buckets=32, max_distance=128)
    np.testing.assert_array_equal(relative_position_buckets(L, 32, 128), ref.numpy())
  # The t5x tiny fixture uses 4 buckets.
  pos = torch.arange(40)
  ref = T5Attention._relative_position_bucket(pos[None] - pos[:, None], True, 4, 128)
  np.testing.assert_array_equal(relative_position_buckets(40, 4, 128), ref.numpy())


@pytest.mark.parametrize("wo_scale", [1.0, 3e4])
@pytest.mark.parametrize("name", ["v1.0", "v1.1"])
def test_float16_stays_as_close_to_float32_as_transformers_float16(name, wo_scale):
  """float16 compute, float32 residual stream: no overflow where float16 hidden states would hold inf.

  The reference is transformers' own float16 load (`_keep_in_fp32_modules`: `wo` in float32).
  `wo_scale` 3e4 drives the first layer's residual past float16's 65504: a float16 stream gives
  NaN there, and `.half()`'s clamping gives errors of 0.3.
  """
  hf_cfg, model = _random_hf_encoder(CONFIGS[name], seed=len(name))
  with torch.no_grad():
    model.encoder.block[0].layer[1].DenseReluDense.wo.weight.mul_(wo_scale)
  cfg = dataclasses.replace(hf_format.t5_config_from_hf(hf_cfg.to_dict(), name), dtype="float16")
  params = hf_format.params_from_hf({k: v.numpy() for k, v in model.state_dict().items()}, cfg, name)
  rng = np.random.default_rng(0)
  ids = rng.integers(2, 300, size=(3, 150))
  mask = np.ones((3, 150), np.int64)
  mask[1, 90:] = 0
  inputs = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
  with torch.no_grad():
    ref = model(**inputs).last_hidden_state.numpy()
    model.half()
    for block in model.encoder.block:
      block.layer[1].DenseReluDense.wo.float()
    hf16 = model(**inputs).last_hidden_state.float().numpy()
  valid = mask.astype(bool)
  assert np.abs(ref[valid]).max() < 10  # the stream overflows, the normalised output does not
  hf_err = np.abs(hf16[valid] - ref[valid]).max()
  for impl in ("dot_product_attention", "xla"):
    ours = T5Encoder(dataclasses.replace(cfg, attention_impl=impl)).apply(
        {"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    assert ours.dtype == jnp.float16
    err = np.abs(np.asarray(ours, np.float32)[valid] - ref[valid]).max()
    assert np.isfinite(err) and err <= 1.5 * hf_err, (impl, err, hf_err)
