"""Packed training batches (TrainConfig.pack_length): the layout, and the same step as unpacked."""

import jax
import numpy as np
import pytest

from instructor_jax import medi_batches, medi_packing, sharding as shd
from instructor_jax.medi_batches import FieldArrays, TaskArrays
from test_train_sharding import CONFIG, mesh_of, run_steps

QUERY_LEN, DOC_LEN, PACK = 8, 12, 16


def random_task(n: int = 64, seed: int = 0) -> TaskArrays:
  """Texts of 1..20 tokens with EOS (some past QUERY_LEN / DOC_LEN, so truncation is exercised) and
  instructions of 0..4 pieces."""
  rng = np.random.default_rng(seed)
  fields = {}
  for role in medi_packing.ROLES:
    ids = [list(rng.integers(3, 300, size=rng.integers(0, 20))) + [1] for _ in range(n)]
    fields[role] = FieldArrays.from_lists(ids, rng.integers(0, 5, size=n))
  return TaskArrays("random", fields)


def packed(task, rows, shards, process_index=0, process_count=1, pack=PACK, chunks=1):
  return medi_packing.make_packed_batch(task, rows, shards=shards, process_index=process_index,
                                        process_count=process_count, query_len=QUERY_LEN, doc_len=DOC_LEN,
                                        pack_length=pack, chunks=chunks)


@pytest.mark.parametrize("chunks", [1, 2])
def test_every_text_lies_whole_in_its_slot(chunks):
  """Text slots count rows within their unit: block i // b, GradCache chunk i % chunks, whose row a
  is row a * chunks + chunk of the block."""
  task, rows, shards = random_task(), np.arange(40, 56), 4
  b = packed(task, rows, shards, chunks=chunks)
  unpacked = medi_batches.make_batch(task, rows, QUERY_LEN, DOC_LEN)
  s = medi_packing.texts_per_row(PACK)
  per_block = b["packed_ids"].shape[0] // shards
  assert b["packed_ids"].shape == (shards * per_block, PACK) and b["packed_n_instr"].shape == (shards * per_block, s)
  assert b["text_slots"].shape == (len(rows), 3) and per_block % chunks == 0
  for i in range(len(rows)):
    for r, role in enumerate(medi_packing.ROLES):
      block, local = divmod(i, len(rows) // shards)
      row = block * per_block + b["text_slots"][i, r] // s * chunks + local % chunks
      slot = b["text_slots"][i, r] % s
      where = b["packed_segments"][row] == slot + 1
      want = unpacked[f"{role}_ids"][i][unpacked[f"{role}_mask"][i] > 0]
      np.testing.assert_array_equal(b["packed_ids"][row][where], want, err_msg=f"triple {i} {role}")
      np.testing.assert_array_equal(b["packed_offsets"][row][where], np.arange(len(want)))
      assert np.all(np.diff(np.flatnonzero(where)) == 1), "a text's tokens must be contiguous"
      assert b["packed_n_instr"][row, slot] == unpacked[f"{role}_n_instr"][i]
  # Nothing else is in the rows: real tokens are exactly the unpacked batch's.
  assert np.count_nonzero(b["packed_segments"]) == sum(unpacked[f"{r}_mask"].sum() for r in medi_packing.ROLES)


def test_hosts_slices_are_the_single_host_batch():
  task, rows = random_task(), np.arange(16)
  whole = packed(task, rows, shards=4)
  parts = [packed(task, rows, shards=4, process_index=p, process_count=2) for p in range(2)]
  for k in medi_packing.PACKED_KEYS:
    np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), whole[k], err_msg=k)


def test_row_count_ladder():
  counts = [medi_packing.row_count(n) for n in (0, 1, 7, 15, 16, 17, 33, 100, 1000)]
  assert counts == [1, 1, 7, 15, 16, 18, 36, 104, 1024]
  for n in range(1, 5000):
    assert n <= medi_packing.row_count(n) <= n * 9 / 8


@pytest.mark.parametrize("chunks", [1, 2])
def test_pad_rows_keeps_every_unit_aligned(chunks):
  task, rows = random_task(), np.arange(16)
  b = packed(task, rows, shards=4, chunks=chunks)
  have = b["packed_ids"].shape[0] // (4 * chunks)
  wide = medi_packing.pad_rows(b, have + 3, local_blocks=4, chunks=chunks)
  for k in medi_packing.ROW_KEYS:
    w, n = wide[k].reshape(4, have + 3, chunks, -1), b[k].reshape(4, have, chunks, -1)
    np.testing.assert_array_equal(w[:, :have], n)
    assert not w[:, have:].any()
  with pytest.raises(ValueError, match="cannot pad"):
    medi_packing.pad_rows(b, have - 1, local_blocks=4, chunks=chunks)


@pytest.mark.parametrize("mesh_shape", [(1, 1, 1), (4, 2, 1)])
def test_packed_step_equals_unpacked_step(mesh_shape):
  """Without dropout a packed batch trains exactly as the unpacked one, up to float rounding, on one
  device and on a mesh of 8 (blocks of rows on the devices of their triples)."""
  task = random_task()
  mesh = mesh_of(*mesh_shape)
  shards = shd.batch_size_multiple(mesh)
  steps = [np.arange(16), np.arange(24, 40)]
  plain = [medi_batches.make_batch(task, r, QUERY_LEN, DOC_LEN) for r in steps]
  packs = [packed(task, r, shards) for r in steps]
  p_params, p_metrics, _ = run_steps(mesh, plain)
  q_params, q_metrics, _ = run_steps(mesh, packs, packed=True)
  for m, r in zip(q_metrics, p_metrics):
    for k in ("loss", "loss_q2d", "loss_d2q", "grad_norm", "real_tokens"):
      np.testing.assert_allclose(m[k], r[k], rtol=2e-5, atol=2e-5, err_msg=k, equal_nan=False)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5, equal_nan=False), q_params, p_params)
  if shards == 1:  # one block of 16 triples packs tighter than it pads (with 2 triples a block, not here)
    assert packs[0]["packed_ids"].size < sum(plain[0][f"{r}_ids"].size for r in medi_packing.ROLES)


def test_packed_step_with_dropout_runs():
  task = random_task()
  mesh = mesh_of(2, 1, 1)
  config = CONFIG.with_encoder(dropout_rate=0.1)
  _, metrics, _ = run_steps(mesh, [packed(task, np.arange(16), 2)], config=config, packed=True)
  assert np.isfinite(metrics[0]["loss"])


def test_packed_grad_cache_step_equals_the_plain_unpacked_step():
  """GradCache over packed batches: every chunk is a packed batch of its own; same loss, gradients
  and update as the plain unpacked step, on 4 data x 2 fsdp devices."""
  task, mesh = random_task(), mesh_of(4, 2, 1)
  rows = np.arange(16)
  _, reference, _ = run_steps(mesh, [medi_batches.make_batch(task, rows, QUERY_LEN, DOC_LEN)])
  params, metrics, _ = run_steps(mesh, [packed(task, rows, 8, chunks=2)], packed=True, grad_cache_chunks=2)
  for k in ("loss", "grad_norm", "param_norm", "real_tokens"):
    np.testing.assert_allclose(metrics[0][k], reference[0][k], rtol=2e-5, atol=2e-5, err_msg=k, equal_nan=False)


# ---- the trainer -------------------------------------------------------------------------------------

def _train_config(**kw):
  from test_train_resume import CONFIG as RESUME_CONFIG
  return RESUME_CONFIG.__class__(**{**RESUME_CONFIG.__dict__, "pack_length": 64, **kw})


def test_packed_training_resumes_exactly_and_reports_what_it_computes(tmp_path, capsys):
  """Dropout on, 8 devices (2 data x 2 fsdp x 2 tensor): a packed run stopped and resumed equals an
  unbroken one; it trains on the same triples as the bucketed run (same tasks, same text tokens)."""
  import re

  from instructor_jax import orbax_io
  from instructor_jax.train import train
  from test_train_resume import MESH, OPTIM, _flatten
  cfg = _train_config()
  records = train(cfg, OPTIM, MESH, str(tmp_path / "a"))
  out = capsys.readouterr().out
  compiled = re.findall(r"compiling the step for (\d+) packed rows of 64 tokens", out)
  # Step 1 with one row per text (4 shards of 2 triples: 6 rows each), then the batches' own counts.
  assert compiled[0] == "24" and len(compiled) == len(set(compiled)) and len(compiled) < 6
  bucketed = train(_train_config(pack_length=0), OPTIM, MESH, str(tmp_path / "bucketed"))
  assert [r["task"] for r in records] == [r["task"] for r in bucketed]
  for r, b in zip(records[1:], bucketed[1:]):
    np.testing.assert_allclose(r["real_tokens_per_s"] * r["step_seconds"], b["real_tokens_per_s"] * b["step_seconds"],
                               rtol=1e-6)
    padded = r["tokens_per_s"] * r["step_seconds"]
    assert any(abs(padded - int(n) * 64) < 1e-6 * padded for n in compiled), (padded, compiled)
  first = train(_train_config(stop_after_steps=3), OPTIM, MESH, str(tmp_path / "b"))
  second = train(cfg, OPTIM, MESH, str(tmp_path / "b"))
  np.testing.assert_allclose([r["loss"] for r in first + second], [r["loss"] for r in records], rtol=1e-6)
  flat_a = _flatten(orbax_io.restore_params(str(tmp_path / "a"))[1])
  flat_b = _flatten(orbax_io.restore_params(str(tmp_path / "b"), step=6)[1])
  for k in flat_a:
    np.testing.assert_allclose(flat_b[k], flat_a[k], atol=1e-6, err_msg=k)


def test_packed_training_with_grad_cache_trains_as_without(tmp_path):
  """The trainer packs for its GradCache chunks (step 1 included): without dropout, the losses of the
  packed plain step."""
  from instructor_jax.train import train
  from test_train_resume import MESH, OPTIM
  plain = train(_train_config(dropout_rate=0.0, train_steps=3), OPTIM, MESH, str(tmp_path / "plain"))
  cached = train(_train_config(dropout_rate=0.0, train_steps=3, grad_cache_chunks=2), OPTIM, MESH, str(tmp_path / "gc"))
  np.testing.assert_allclose([r["loss"] for r in cached], [r["loss"] for r in plain], rtol=1e-5)


@pytest.mark.parametrize("kw,message", [
    ({"pack_length": 32}, "pack_length=32 is shorter than query_len (48) or doc_len (64)"),
    ({"pack_length": -1}, "pack_length=-1; expected an integer >= 0"),
])
def test_packing_config_errors(kw, message):
  import re
  with pytest.raises(ValueError, match=re.escape(f"TrainConfig.{message}")):
    _train_config(**kw)


def test_an_empty_slot_has_finite_gradients():
  """Packed rows of step 1 and filler slots pool to zero vectors: l2_normalize must not give NaN."""
  import jax.numpy as jnp

  from instructor_jax.model import l2_normalize
  grad = jax.grad(lambda x: jnp.sum(l2_normalize(x)[0]))(jnp.zeros((2, 4)).at[0].set(1.0))
  assert np.all(np.isfinite(grad))
  np.testing.assert_allclose(l2_normalize(jnp.array([[3.0, 4.0], [0.0, 0.0]])), [[0.6, 0.8], [0.0, 0.0]], rtol=1e-6)
