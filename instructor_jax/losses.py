"""Contrastive losses on (global) batches of unit embeddings: INSTRUCTOR's and GTR's in-batch softmax.

Shape key: B batch (the *global* batch: on a mesh XLA all-gathers the embeddings, so negatives
come from every device), E embedding dim.

Both functions score with cosine similarity / temperature and return (loss, metrics); they are pure and hold no
parameters, so the train step differentiates straight through them.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

Metrics = dict[str, jax.Array]
LossFn = Callable[[jax.Array, jax.Array, jax.Array, float], tuple[jax.Array, Metrics]]


def _unit(x_BE: jax.Array) -> jax.Array:
  """Float32 unit rows: the reference scores with cosine similarity, so unnormalised inputs work too.

  x / max(||x||, 1e-8), the floor taken under the square root: norm's gradient at an all-zero row
  (what a text pools to when its instruction count covers it all) is NaN, and would turn every
  parameter NaN."""
  x = x_BE.astype(jnp.float32)
  return x / jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-16))


def _cross_entropy(logits_BC: jax.Array, target_B: jax.Array) -> jax.Array:
  """Per-row softmax cross-entropy in float32."""
  logp_BC = jax.nn.log_softmax(logits_BC.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(logp_BC, target_B[:, None], axis=-1)[:, 0]


def _top1(logits_BC: jax.Array, target_B: jax.Array) -> jax.Array:
  return jnp.mean((jnp.argmax(logits_BC, axis=-1) == target_B).astype(jnp.float32))


def instructor_loss(q_BE: jax.Array, p_BE: jax.Array, n_BE: jax.Array,
                    temperature: float = 0.01) -> tuple[jax.Array, Metrics]:
  """INSTRUCTOR's train.py loss: CE(q_i -> [p_i, n_0..n_{B-1}]) + CE(p_i -> [q_i, q_{j != i}]).

  Term 1 scores each query against its own positive and *every* hard negative of the batch (other
  examples' positives are not candidates); term 2 scores each positive against its own query and
  every other query. Both targets are index 0 after the reference's column order, which a
  permutation of the candidates does not change, so term 2 uses the plain [B, B] matrix.
  """
  q, p, n = (_unit(x) for x in (q_BE, p_BE, n_BE))
  B = q.shape[0]
  own_B1 = jnp.sum(q * p, axis=-1, keepdims=True)
  logits1_BC = jnp.concatenate([own_B1, q @ n.T], axis=1) / temperature
  term1_B = _cross_entropy(logits1_BC, jnp.zeros((B,), jnp.int32))
  logits2_BB = (p @ q.T) / temperature
  diag_B = jnp.arange(B)
  term2_B = _cross_entropy(logits2_BB, diag_B)
  loss1, loss2 = jnp.mean(term1_B), jnp.mean(term2_B)
  metrics = {"loss_q2d": loss1, "loss_d2q": loss2,
             "top1_q2d": _top1(logits1_BC, jnp.zeros((B,), jnp.int32)), "top1_d2q": _top1(logits2_BB, diag_B)}
  return loss1 + loss2, metrics


def gtr_loss(q_BE: jax.Array, p_BE: jax.Array, n_BE: jax.Array,
             temperature: float = 0.01) -> tuple[jax.Array, Metrics]:
  """t5x_retrieval's bidirectional in-batch softmax: q_i vs all [p; n], and p_i vs all q.

  Term 1: each query against every positive and every hard negative of the batch (target its own
  positive); term 2: each positive against every query (target its own query). The loss is the
  sum of the two directions' means, as t5x_retrieval's InBatchCrossEntropyLoss(bidirectional=True).
  """
  q, p, n = (_unit(x) for x in (q_BE, p_BE, n_BE))
  diag_B = jnp.arange(q.shape[0])
  logits1_BC = (q @ jnp.concatenate([p, n], axis=0).T) / temperature
  logits2_BB = (p @ q.T) / temperature
  loss1 = jnp.mean(_cross_entropy(logits1_BC, diag_B))
  loss2 = jnp.mean(_cross_entropy(logits2_BB, diag_B))
  metrics = {"loss_q2d": loss1, "loss_d2q": loss2,
             "top1_q2d": _top1(logits1_BC, diag_B), "top1_d2q": _top1(logits2_BB, diag_B)}
  return loss1 + loss2, metrics


LOSSES: dict[str, LossFn] = {"instructor": instructor_loss, "gtr": gtr_loss}


def get_loss(name: str) -> LossFn:
  """The loss called `name` ("instructor" or "gtr")."""
  if name not in LOSSES:
    raise ValueError(f"TrainConfig.loss={name!r}; expected one of {sorted(LOSSES)}.")
  return LOSSES[name]
