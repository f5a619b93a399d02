"""The embed job prepares each part a chunk of rows at a time and sends every full batch on at once."""

import os

import numpy as np
import pytest

from embed_support import base_args, read_output, sentences, tiny_model, write_jsonl
from instructor_jax import embed, embed_batches
from instructor_jax.embed_batches import BatchPlan, build_part, row_choices
from instructor_jax.embed_io import InputError, Row
from instructor_jax.embed_output import PARTS_DIR
from instructor_jax.tokenization import DEFAULT_BUCKETS, PackedBatch

PACK = 16
TITLE = "Represent the title: "


@pytest.fixture(scope="module")
def model():
  return tiny_model()


@pytest.fixture
def small_chunks(monkeypatch):
  """Chunks of a few rows, so that a part of tens of rows is prepared in many."""
  monkeypatch.setattr(embed_batches, "FIRST_CHUNK", 150)
  monkeypatch.setattr(embed_batches, "LARGEST_CHUNK", 600)


def _records(n, seed=5):
  texts = sentences(n, seed=seed)
  return [{"text": t, **({"task": TITLE} if i % 2 else {})} for i, t in enumerate(texts)]


def _items(records):
  return [r["text"] if "task" not in r else [r["task"], r["text"]] for r in records]


def _rows(records):
  return [Row(i, i, r.get("task"), r["text"]) for i, r in enumerate(records)]


def _plan(model, pack, batch_tokens=256, devices=8):
  return BatchPlan(model.tokenizer, 64, DEFAULT_BUCKETS, batch_tokens, devices, pack)


@pytest.mark.parametrize("pack", [PACK, 0])
def test_a_part_is_batched_chunk_by_chunk(model, small_chunks, pack):
  records = _records(120)
  truncated: list[bool] = []
  ids, n_instr = model.tokenizer.tokenize(_items(records), 64, truncated)
  pieces = build_part(3, 300, 130, _rows(records), {"empty_text": 2}, _plan(model, pack))
  assert len(pieces) > 4 and all(p.index == 3 and p.slots == 130 for p in pieces)
  assert all(p.work is None for p in pieces[:-1])
  batches = [b for p in pieces for b in p.batches]
  placed = sorted(i for layout, _ in batches for row in layout for i in row)
  assert placed == list(range(len(records)))  # every text in exactly one slot of one batch
  for p in pieces[:-1]:  # before the part's last chunk, only full batches leave
    for _, batch in p.batches:
      assert batch.ids.shape[0] == row_choices(batch.ids.shape[1], 256, 8)[0]
  for layout, batch in batches:  # each slot holds its text's own ids and instruction length
    for r, row in enumerate(layout):
      if isinstance(batch, PackedBatch):
        for s, i in enumerate(row):
          assert batch.ids[r][batch.segments[r] == s + 1].tolist() == ids[i] and batch.n_instr[r, s] == n_instr[i]
      else:
        (i,) = row
        assert batch.ids[r, :len(ids[i])].tolist() == ids[i] and batch.n_instr[r] == n_instr[i]
  work = pieces[-1].work
  assert (work.index, work.first_slot, work.slots, work.ids) == (3, 300, 130, list(range(120)))
  assert work.tokens == sum(len(x) for x in ids) and work.truncated == sum(truncated) > 0 and work.skipped == {"empty_text": 2}
  assert work.instructions == {"": 60, TITLE: 60}


def test_a_part_whose_batches_all_left_early_still_finishes(tmp_path, model, monkeypatch):
  """Every row its own chunk and every batch full as soon as its rows are read: the part's last piece
  has no batch, and the part is written once its last batch in flight returns."""
  monkeypatch.setattr(embed_batches, "FIRST_CHUNK", 1)
  monkeypatch.setattr(embed_batches, "LARGEST_CHUNK", 1)
  text = next(" ".join(["river"] * k) for k in range(1, 40) if len(model.tokenizer.tokenize([" ".join(
      ["river"] * k)], 64)[0][0]) == 20)  # bucket 24: one row per device at --batch-tokens 16
  records = [{"text": text} for _ in range(16)]
  pieces = build_part(0, 0, 16, _rows(records), {}, _plan(model, 0, batch_tokens=16))
  assert [len(p.batches) for p in pieces].count(1) == 2 and pieces[-1].batches == [] and pieces[-1].work
  path = write_jsonl(str(tmp_path / "in.jsonl"), records)
  out = str(tmp_path / "out")
  summary = embed.main(base_args([path], out, "--batch-tokens", "16", "--pack-length", "0"), model=model)
  ids, emb = read_output(out)
  assert ids == list(range(16)) and summary["batch_shapes"] == [(8, 24)]
  np.testing.assert_allclose(emb, model.encode([text] * 16, pack=False), atol=2e-6)


@pytest.mark.parametrize("pack", [PACK, 0])
def test_chunked_job_equals_encode_and_a_one_chunk_job(tmp_path, model, monkeypatch, pack):
  records = _records(150)
  path = write_jsonl(str(tmp_path / "in.jsonl"), records)
  runs = {}
  for first in (150, 1 << 40):
    monkeypatch.setattr(embed_batches, "FIRST_CHUNK", first)
    monkeypatch.setattr(embed_batches, "LARGEST_CHUNK", max(first, 600))
    out = str(tmp_path / f"out{first}")
    summary = embed.main(base_args([path], out, "--instruction-field", "task", "--instruction", "",
                                   "--rows-per-part", "64", "--pack-length", str(pack)), model=model)
    ids, emb = read_output(out)
    assert ids == list(range(150)) and summary["rows"] == 150 and summary["truncated"] > 0
    np.testing.assert_allclose(emb, model.encode(_items(records), pack=False), atol=2e-6)
    runs[first] = summary
  assert runs[150]["tokens"] == runs[1 << 40]["tokens"]


def test_a_bad_row_in_a_later_chunk_fails_before_its_part_is_written(tmp_path, model, small_chunks):
  lines = [f'{{"text": "sentence number {i} of the input"}}' for i in range(60)]
  lines[40] = '{"text": 12}'
  path = tmp_path / "in.jsonl"
  path.write_text("\n".join(lines) + "\n")
  out = str(tmp_path / "out")
  with pytest.raises(InputError, match=rf"{path}:41: .*is an int, expected a string.*--on-error skip"):
    embed.main(base_args([str(path)], out, "--rows-per-part", "100"), model=model)
  assert not [n for n in os.listdir(os.path.join(out, PARTS_DIR)) if n.startswith("part-00000.")]


def test_parts_are_committed_in_order_when_one_has_no_valid_row(tmp_path, model, monkeypatch):
  """A part whose rows were all skipped has no batch; it still waits for the parts before it."""
  from instructor_jax import embed_output
  committed = []
  commit = embed_output.commit_part

  def spy(out, k, *args, **kwargs):
    committed.append(k)
    return commit(out, k, *args, **kwargs)

  monkeypatch.setattr(embed_output, "commit_part", spy)
  lines = [f'{{"text": "sentence {i} of the input"}}' if not 16 <= i < 32 else '{"text": 1}' for i in range(48)]
  path = tmp_path / "in.jsonl"
  path.write_text("\n".join(lines) + "\n")
  out = str(tmp_path / "out")
  summary = embed.main(base_args([str(path)], out, "--on-error", "skip"), model=model)
  assert committed == [0, 1, 2] and summary["skipped"] == {"non_string_text": 16}
  ids, emb = read_output(out)
  assert ids == list(range(16)) + list(range(32, 48))
  np.testing.assert_allclose(emb, model.encode([f"sentence {i} of the input" for i in ids]), atol=2e-6)
