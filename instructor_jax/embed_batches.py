"""Host side of the embed job: reads each pending part's rows and turns them into padded batches.

Shape key: R rows per batch, L bucket (or packed row) length, S texts per packed row.

Texts of up to --pack-length tokens are packed several to a row of that length (tokenization.pack_rows
over the whole part, best-fit decreasing; segment ids keep attention and pooling within each text),
as Instructor.encode does. Longer texts are sorted by token count within the part (the sort window),
grouped by length bucket, and padded to it. Either kind is cut into batches of R rows with
R * L <= --batch-tokens per device. R comes from a fixed set per bucket or packed length (full, 1/2,
1/4, 1/8, each a multiple of the local device count), so the number of compiled programs is at most
4 per length however the data looks, and a part's tail wastes little padding.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
from typing import Any, Callable, Sequence

import numpy as np

from instructor_jax.embed_io import (BadRow, Fields, InputError, InputFile, Row, iter_raw, needed_columns,
                                     parse_row)
from instructor_jax.tokenization import (Batch, PackedBatch, bucket_length, pack_rows, pad_batch, pad_packed,
                                         texts_per_row)


def row_choices(length: int, batch_tokens: int, num_devices: int) -> list[int]:
  """Allowed batch row counts for one bucket, largest first (powers of two per device)."""
  per_device = max(1, batch_tokens // length)
  per_device = 1 << (per_device.bit_length() - 1)
  return [(per_device >> s) * num_devices for s in range(4) if per_device >> s >= 1]


def split_rows(n: int, choices: list[int]) -> list[int]:
  """Greedy cut of n rows into allowed batch sizes; only the last batch may have filler rows."""
  sizes = []
  while n > 0:
    fits = [c for c in choices if c <= n]
    size = fits[0] if fits else choices[-1]
    sizes.append(size)
    n -= size
  return sizes


@dataclasses.dataclass
class PartWork:
  """One part ready for the devices: its batches and everything the sidecar needs."""

  index: int
  first_slot: int
  slots: int
  ids: list[Any]  # of the valid rows, input order
  # (positions in `ids` of each batch row's texts: one per bucketed row, up to S per packed row, batch)
  batches: list[tuple[list[list[int]], Batch | PackedBatch]]
  skipped: dict[str, int]
  truncated: int
  tokens: int
  instructions: dict[str, int]


def build_part(index: int, first_slot: int, slots: int, rows: list[Row], skipped: dict[str, int],
               tokenizer: Any, max_len: int, buckets: Sequence[int], batch_tokens: int,
               num_devices: int, pack_length: int) -> PartWork:
  """Tokenises (the INSTRUCTOR rule in tokenization.py), packs or sorts, and batches one part's rows.

  `pack_length` (at most max_len; 0 packs nothing) is the packed row length.
  """
  items = [r.text if r.instruction is None else [r.instruction, r.text] for r in rows]
  truncated: list[bool] = []
  ids, n_instr = tokenizer.tokenize(items, max_len, truncated) if items else ([], [])
  lengths = np.array([len(x) for x in ids], np.int64)
  # Every text has its EOS, so pack_length 0 leaves nothing short.
  short = lengths <= pack_length
  # Long texts first: the expensive programs run (and compile) early, and the ETA errs on the safe side.
  batches = (_bucketed_batches(np.flatnonzero(~short), ids, n_instr, max_len, buckets, batch_tokens, num_devices)
             + _packed_batches(np.flatnonzero(short), ids, n_instr, pack_length, batch_tokens, num_devices))
  counts = collections.Counter(r.instruction or "" for r in rows)
  return PartWork(index, first_slot, slots, [r.id for r in rows], batches, skipped, sum(truncated),
                  int(lengths.sum()), dict(counts))


def _bucketed_batches(positions: np.ndarray, ids: list[list[int]], n_instr: list[int], max_len: int,
                      buckets: Sequence[int], batch_tokens: int,
                      num_devices: int) -> list[tuple[list[list[int]], Batch]]:
  """One text per row, longest first, padded to its length bucket."""
  order = sorted(positions.tolist(), key=lambda i: -len(ids[i]))
  by_bucket: dict[int, list[int]] = collections.defaultdict(list)
  for i in order:
    by_bucket[bucket_length(len(ids[i]), buckets, max_len)].append(i)
  batches = []
  for length, members in by_bucket.items():
    start = 0
    for size in split_rows(len(members), row_choices(length, batch_tokens, num_devices)):
      idx = members[start:start + size]
      batches.append(([[i] for i in idx], pad_batch([ids[i] for i in idx], [n_instr[i] for i in idx], length, size)))
      start += size
  return batches


def _packed_batches(positions: np.ndarray, ids: list[list[int]], n_instr: list[int], pack_length: int,
                    batch_tokens: int, num_devices: int) -> list[tuple[list[list[int]], PackedBatch]]:
  """Texts of at most pack_length tokens, several to a row (the layout Instructor.encode uses)."""
  if not len(positions):
    return []
  max_texts = texts_per_row(pack_length)
  layout = pack_rows([len(ids[i]) for i in positions], pack_length, max_texts)
  packed = [[int(positions[j]) for j in row] for row in layout]
  batches, start = [], 0
  for size in split_rows(len(packed), row_choices(pack_length, batch_tokens, num_devices)):
    chunk = packed[start:start + size]
    batches.append((chunk, pad_packed(chunk, ids, n_instr, pack_length, max_texts, size)))
    start += size
  return batches


def locate(files: list[InputFile], slot: int) -> str:
  """`file:line` (JSONL, text), `file: data row N` (CSV/TSV, header not counted) or `file: row N` (Parquet)."""
  f = next(f for f in reversed(files) if slot >= f.first_slot)
  n = slot - f.first_slot + 1
  if f.format in ("jsonl", "text"):
    return f"{f.path}:{n}"
  return f"{f.path}: {'data ' if f.format in ('csv', 'tsv') else ''}row {n}"


def read_parts(files: list[InputFile], fields: Fields, on_error: str, rows_per_part: int,
                pending: set[int], make_part: Callable[..., PartWork], emit: Callable[[Any], None]) -> None:
  """Streams all rows in input order, emitting a PartWork for every pending part."""
  # id -> first slot. Every process checks every row, so all agree on which occurrence is kept.
  seen: dict[Any, int] = {}
  last_pending = max(pending, default=-1)
  current, rows, skipped = -1, [], collections.Counter()

  def finish():
    if current in pending:
      first = current * rows_per_part
      slots = min(rows_per_part, total_slots - first)
      emit(make_part(current, first, slots, rows, dict(skipped)))

  total_slots = sum(f.rows for f in files)
  pending_sorted = sorted(pending)

  def skip(first: int, count: int) -> bool:
    """Nothing to do in [first, first + count): no pending part there and no ids to check."""
    if fields.id is not None:
      return False
    i = bisect.bisect_left(pending_sorted, first // rows_per_part)
    return i == len(pending_sorted) or pending_sorted[i] * rows_per_part >= first + count

  for file, slot, where, raw in iter_raw(files, needed_columns(fields), skip):
    part = slot // rows_per_part
    if part != current:
      finish()
      current, rows, skipped = part, [], collections.Counter()
      if part > last_pending and fields.id is None:
        return
    mine = part in pending
    if not mine and fields.id is None:
      continue
    row = parse_row(file.format, fields, slot, where, raw)
    if isinstance(row, Row) and fields.id is not None:
      first = seen.setdefault(row.id, slot)
      if first != slot:
        row = BadRow(slot, "duplicate_id", where, f"duplicate id {row.id!r} (first used at {locate(files, first)})")
    if not mine:
      continue
    if isinstance(row, Row):
      rows.append(row)
      continue
    if on_error == "fail" and row.reason != "blank_line":
      raise InputError(f"{row.message()}. Fix the input, or pass --on-error skip to skip such rows "
                       "(they are counted by reason in the summary and the manifest).")
    skipped[row.reason] += 1
  finish()
