"""The embed job packs short texts several to a row (--pack-length), as Instructor.encode does."""

import json
import os

import numpy as np
import pytest

from embed_support import base_args, read_output, sentences, tiny_model, write_jsonl
from instructor_jax import embed
from instructor_jax.embed_batches import BatchPlan, build_part, row_choices
from instructor_jax.embed_io import Row
from instructor_jax.tokenization import DEFAULT_BUCKETS, Batch, PackedBatch, pack_rows, texts_per_row

PACK = 16
TITLE = "Represent the title: "
QUESTION = "Represent the question for retrieving answers: "


@pytest.fixture(scope="module")
def model():
  return tiny_model()


def _num_tokens(model, record) -> int:
  item = record["text"] if "task" not in record else [record["task"], record["text"]]
  return len(model.tokenizer.tokenize([item], model.max_seq_length)[0][0])


def _with_length(model, task, n):
  """A record whose model input is exactly n tokens (EOS and instruction included)."""
  for k in range(1, 64):
    record = {"text": " ".join(["river"] * k), **({"task": task} if task else {})}
    if _num_tokens(model, record) == n:
      return record
  raise AssertionError(f"no text of {n} tokens with instruction {task!r}; pick another filler word")


def _records(model):
  """Short and long texts, per-row instructions or none, near-empty texts, and texts at the pack length."""
  tasks = [None, TITLE, QUESTION]
  records = [{"text": t, **({"task": tasks[i % 3]} if i % 3 else {})} for i, t in enumerate(sentences(34, seed=31))]
  records[5:5] = [{"text": "."}, {"text": "  x  ", "task": TITLE}, _with_length(model, None, PACK),
                  _with_length(model, QUESTION, PACK), _with_length(model, None, PACK + 1)]
  return records


def _items(records):
  return [r["text"] if "task" not in r else [r["task"], r["text"]] for r in records]


def _rows(records, first=0):
  return [Row(first + i, first + i, r.get("task"), r["text"]) for i, r in enumerate(records)]


def _batches(model, records, pack, first=0):
  """Every batch of one part holding `records` (8 devices, 256 tokens per device batch, max_len 64)."""
  plan = BatchPlan(model.tokenizer, 64, DEFAULT_BUCKETS, 256, 8, pack)
  return [b for piece in build_part(0, first, len(records), _rows(records, first), {}, plan) for b in piece.batches]


def test_build_part_packs_short_texts_and_buckets_the_rest(model):
  records = _records(model)
  lengths = [_num_tokens(model, r) for r in records]
  batches = _batches(model, records, PACK)
  placed = sorted(i for layout, _ in batches for row in layout for i in row)
  assert placed == list(range(len(records)))  # every text in exactly one batch slot
  kind = {}
  for layout, batch in batches:
    for row in layout:
      kind.update({i: type(batch) for i in row})
    if isinstance(batch, PackedBatch):
      assert batch.ids.shape[0] in row_choices(PACK, 256, 8) and batch.ids.shape[1] == PACK
      assert all(len(row) <= PACK // 4 and sum(lengths[i] for i in row) <= PACK for row in layout)
      assert int(batch.mask.sum()) == sum(lengths[i] for row in layout for i in row)
    else:
      assert all(len(row) == 1 for row in layout) and batch.ids.shape[0] % 8 == 0
  assert {i for i, k in kind.items() if k is PackedBatch} == {i for i, n in enumerate(lengths) if n <= PACK}
  assert lengths[7] == lengths[8] == PACK and kind[7] is kind[8] is PackedBatch and kind[9] is Batch
  packed_rows = sum(len(layout) for layout, b in batches if isinstance(b, PackedBatch))
  assert packed_rows < sum(n <= PACK for n in lengths)  # several texts share a row
  assert all(isinstance(b, Batch) for _, b in _batches(model, records, 0))


def test_packed_job_equals_unpacked_job_and_encode(tmp_path, model):
  records = _records(model)
  path = write_jsonl(str(tmp_path / "in.jsonl"), records)
  runs = {}
  for pack in (PACK, 0):
    out = str(tmp_path / f"pack{pack}")
    # Rows without the field get the empty instruction: the plain text, nothing excluded from pooling.
    runs[pack] = embed.main(base_args([path], out, "--instruction-field", "task", "--instruction", "",
                                      "--pack-length", str(pack)), model=model)
    ids, emb = read_output(out)
    assert ids == list(range(len(records)))
    np.testing.assert_allclose(emb, model.encode(_items(records), pack=False), atol=2e-6)
    np.testing.assert_allclose(emb, model.encode(_items(records)), atol=2e-6)
    assert json.load(open(os.path.join(out, "_manifest.json")))["pack_length"] == pack
  packed, plain = runs[PACK], runs[0]
  # Packed programs are (rows, PACK, texts per row), rows a multiple of the 8 devices; the rest bucketed.
  packed_shapes = [s for s in packed["batch_shapes"] if len(s) == 3]
  assert packed_shapes and all(r % 8 == 0 and (n, s) == (PACK, PACK // 4) for r, n, s in packed_shapes)
  assert all(s[0] % 8 == 0 and s[1] > PACK for s in packed["batch_shapes"] if len(s) == 2)
  assert all(len(s) == 2 for s in plain["batch_shapes"])
  # Statistics: same real tokens; padding efficiency = real tokens / computed positions of every batch.
  lengths = [_num_tokens(model, r) for r in records]
  assert packed["tokens"] == plain["tokens"] == sum(lengths)
  for pack, summary in runs.items():
    computed = sum(b.ids.size for k in range(0, len(records), 16)
                   for _, b in _batches(model, records[k:k + 16], pack, k))
    assert summary["padding_efficiency"] == pytest.approx(sum(lengths) / computed)


def test_negative_pack_length_is_refused(tmp_path, model, capsys):
  path = write_jsonl(str(tmp_path / "in.jsonl"), [{"text": "a sentence"}])
  with pytest.raises(SystemExit) as e:
    embed.main(base_args([path], str(tmp_path / "out"), "--pack-length", "-1"), model=model)
  assert e.value.code == 2
  assert "error: --pack-length -1: expected a token count >= 0 (0 disables packing)" in capsys.readouterr().err
  assert "0 disables packing" in embed.build_parser().format_help()


def test_pack_rows_fills_the_rows_of_a_large_part():
  """A part holds up to 100k texts: the rows opened early for long texts must still take short ones."""
  rng = np.random.default_rng(0)
  lengths = [int(n) for n in np.concatenate([rng.integers(60, 121, 1000), rng.integers(4, 41, 4000)])]
  rows = pack_rows(lengths, 128, texts_per_row(128))
  assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
  assert all(sum(lengths[i] for i in row) <= 128 and len(row) <= 32 for row in rows)
  # A window over recently opened rows left 17% of this input's rows empty.
  assert sum(lengths) / (128 * len(rows)) > 0.97
