"""INSTRUCTOR: T5 encoder -> mean pooling over the text tokens -> projection -> L2 normalisation.

Shape key: B batch, L length, D d_model, E embedding dim.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from instructor_jax.config import InstructorConfig
from instructor_jax.t5 import BATCH, EMBED, LENGTH, Dense, Embedder, Encoder

PROJECTION_AXES = (EMBED, "projection")


def pooling_mask(mask_BL: jax.Array, n_instr_B: jax.Array) -> jax.Array:
  """Attention mask with the first n_instr positions of every row switched off (float32 [B, L])."""
  positions_L = jnp.arange(mask_BL.shape[1])
  keep_BL = positions_L[None, :] >= n_instr_B[:, None]
  return (mask_BL.astype(bool) & keep_BL).astype(jnp.float32)


def packed_pooling_weights(segments_BL: jax.Array, offsets_BL: jax.Array, n_instr_BS: jax.Array) -> jax.Array:
  """Per-text pooling weights of packed rows (float32 [B, S, L]): text s+1, minus its instruction."""
  texts_S = jnp.arange(1, n_instr_BS.shape[1] + 1)
  in_text_BSL = segments_BL[:, None, :] == texts_S[None, :, None]
  return (in_text_BSL & (offsets_BL[:, None, :] >= n_instr_BS[:, :, None])).astype(jnp.float32)


def masked_mean(hidden_BLD: jax.Array, weights_BL: jax.Array) -> jax.Array:
  """Mean over the weighted positions, in float32; the 1e-9 floor matches sentence-transformers."""
  total_BD = jnp.einsum("bld,bl->bd", hidden_BLD.astype(jnp.float32), weights_BL)
  count_B1 = jnp.maximum(jnp.sum(weights_BL, axis=1, keepdims=True), 1e-9)
  return total_BD / count_B1


def l2_normalize(x_BE: jax.Array) -> jax.Array:
  """x / max(||x||, 1e-12), as torch.nn.functional.normalize.

  The floor is taken under the square root (the same value): sqrt's gradient at an all-zero row is
  0/0, and a zero row (an empty text slot of a packed training batch) must not turn the gradients NaN.
  """
  norm_B1 = jnp.sqrt(jnp.maximum(jnp.sum(x_BE * x_BE, axis=-1, keepdims=True), 1e-24))
  return x_BE / norm_B1


class InstructorModel(nn.Module):
  """(ids, attention mask, instruction length) -> float32 embeddings [B, E].

  The encoder attends to the whole sequence, instruction included; only the pooling skips the
  first `n_instr` positions (the INSTRUCTOR contract; n_instr is 0 for plain texts).
  """

  config: InstructorConfig

  @nn.compact
  def __call__(self, ids_BL: jax.Array, mask_BL: jax.Array, n_instr_B: jax.Array,
               deterministic: bool = True, segments_BL: jax.Array | None = None,
               offsets_BL: jax.Array | None = None) -> jax.Array:
    """[B, E] embeddings; with packed rows (`segments_BL`, `offsets_BL` = position inside the text,
    and `n_instr_B` holding [B, S] instruction lengths) [B, S, E], one per text slot."""
    cfg = self.config
    # Module names are the t5x dual-encoder names (token_embedder, encoder, projection_layer), so
    # t5x checkpoints map by renaming alone.
    x_BLD = Embedder(cfg.encoder, name="token_embedder")(ids_BL)
    x_BLD = nn.with_logical_constraint(x_BLD, (BATCH, LENGTH, EMBED))
    hidden_BLD = Encoder(cfg.encoder, name="encoder")(x_BLD, mask_BL, deterministic, segments_BL)
    if segments_BL is None:
      pooled_BD = masked_mean(hidden_BLD, pooling_mask(mask_BL, n_instr_B))
    else:
      weights_BSL = packed_pooling_weights(segments_BL, offsets_BL, n_instr_B)
      total_BSD = jnp.einsum("bld,bsl->bsd", hidden_BLD.astype(jnp.float32), weights_BSL)
      pooled_BD = total_BSD / jnp.maximum(jnp.sum(weights_BSL, axis=-1, keepdims=True), 1e-9)
    if cfg.projection_dim is not None:
      # Projection in float32: it is tiny and keeps bf16 runs close to the reference.
      pooled_BD = Dense(cfg.projection_dim, PROJECTION_AXES, jnp.float32, name="projection_layer")(pooled_BD)
    return l2_normalize(pooled_BD) if cfg.normalize else pooled_BD


def with_compute_dtype_weights(params: Any, dtype: str) -> Any:
  """Encoder matmul kernels and the token embedding stored in the compute dtype.

  The model casts exactly these to the compute dtype at every use (t5.Dense, Embedder), so the
  outputs are the same (bit-identical on CPU; on GPU up to XLA's GEMM kernel choice) while each
  call skips the casts and reads half the weight bytes.
  The projection (float32 by design), norms and the position-bias table keep float32.
  """
  target = jnp.dtype(dtype)

  def cast(path, x):
    keys = [getattr(k, "key", None) for k in path]
    in_encoder = keys[0] == "encoder" and keys[-1] == "kernel"
    return x.astype(target) if in_encoder or keys == ["token_embedder", "embedding"] else x

  return jax.tree_util.tree_map_with_path(cast, params)
