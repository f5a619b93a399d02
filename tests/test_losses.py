"""Losses against plain NumPy transcriptions of INSTRUCTOR's train.py and t5x_retrieval's loss."""

import jax
import numpy as np
import pytest

from instructor_jax import losses


def _cos(a, b):
  return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-8))


def _ce_first(scores):
  """nn.CrossEntropyLoss(scores, target=0) for one row, in float64."""
  scores = np.asarray(scores, np.float64)
  m = scores.max()
  return -(scores[0] - m - np.log(np.exp(scores - m).sum()))


def _instructor_reference(q, p, n, tau):
  """INSTRUCTOR train.py compute_loss, loop for loop (cosine similarity, target index 0)."""
  num = len(q)
  rows = [[_cos(q[i], p[i]) / tau] + [_cos(q[i], n[j]) / tau for j in range(num)] for i in range(num)]
  loss1 = np.mean([_ce_first(r) for r in rows])
  rows2 = [[_cos(p[i], q[i]) / tau] + [_cos(p[i], q[j]) / tau for j in range(num) if j != i] for i in range(num)]
  loss2 = np.mean([_ce_first(r) for r in rows2])
  return loss1 + loss2, loss1, loss2


def _gtr_reference(q, p, n, tau):
  """t5x_retrieval: CE over q_i . [p; n]^T (target i) plus CE over p_i . q^T (target i)."""
  num = len(q)
  docs = np.concatenate([p, n])
  loss1 = np.mean([_ce_first([_cos(q[i], docs[i]) / tau] + [_cos(q[i], d) / tau for k, d in enumerate(docs) if k != i])
                   for i in range(num)])
  loss2 = np.mean([_ce_first([_cos(p[i], q[i]) / tau] + [_cos(p[i], q[j]) / tau for j in range(num) if j != i])
                   for i in range(num)])
  return loss1 + loss2, loss1, loss2


def _random_triples(seed, B=6, E=16, normalise=True):
  rng = np.random.default_rng(seed)
  q, p, n = (rng.normal(size=(B, E)).astype(np.float32) for _ in range(3))
  # Make positives close to queries so the loss is far from log(B) and ordering mistakes show.
  p = p * 0.5 + q
  if normalise:
    q, p, n = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in (q, p, n))
  return q, p, n


@pytest.mark.parametrize("tau", [0.01, 0.1, 1.0])
@pytest.mark.parametrize("normalise", [True, False])
def test_instructor_loss_matches_reference(tau, normalise):
  q, p, n = _random_triples(0, normalise=normalise)
  loss, metrics = losses.instructor_loss(q, p, n, tau)
  ref, ref1, ref2 = _instructor_reference(q, p, n, tau)
  np.testing.assert_allclose(float(loss), ref, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(float(metrics["loss_q2d"]), ref1, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(float(metrics["loss_d2q"]), ref2, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("tau", [0.01, 0.1])
def test_gtr_loss_matches_reference(tau):
  q, p, n = _random_triples(1)
  loss, metrics = losses.gtr_loss(q, p, n, tau)
  ref, ref1, ref2 = _gtr_reference(q, p, n, tau)
  np.testing.assert_allclose(float(loss), ref, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(float(metrics["loss_q2d"]), ref1, rtol=2e-5, atol=2e-5)


def test_instructor_ignores_other_positives_but_gtr_does_not():
  """Other examples' positives are not candidates in INSTRUCTOR's term 1; they are in GTR's."""
  q, p, n = _random_triples(2, B=4)
  q2 = q.copy()
  q2[0] = p[1]  # query 0 now equals positive 1: a strong in-batch distractor only for GTR.
  b, _ = losses.instructor_loss(q2, p, n, 0.05)
  ga, _ = losses.gtr_loss(q, p, n, 0.05)
  gb, _ = losses.gtr_loss(q2, p, n, 0.05)
  ref = _instructor_reference(q2, p, n, 0.05)[0]
  np.testing.assert_allclose(float(b), ref, rtol=2e-5)
  assert float(gb) > float(ga) + 1.0


def test_top1_accuracy():
  q, p, n = _random_triples(3, B=5)
  _, metrics = losses.instructor_loss(q, q.copy(), n, 0.01)
  assert float(metrics["top1_q2d"]) == 1.0 and float(metrics["top1_d2q"]) == 1.0
  _, metrics = losses.instructor_loss(q, n, q.copy(), 0.01)  # every "negative" beats its positive
  assert float(metrics["top1_q2d"]) == 0.0


@pytest.mark.parametrize("name", ["instructor", "gtr"])
def test_a_zero_embedding_has_finite_gradients(name):
  """A text that is all instruction pools to a zero row; its gradient must not be NaN (it would
  spread to every parameter)."""
  q, p, n = _random_triples(4, B=4)
  q[1] = 0.0
  grads = jax.grad(lambda *e: losses.get_loss(name)(*e, temperature=0.05)[0], argnums=(0, 1, 2))(q, p, n)
  assert all(np.isfinite(np.asarray(g)).all() for g in grads)


def test_unknown_loss_name():
  with pytest.raises(ValueError, match="instructor"):
    losses.get_loss("infonce")
