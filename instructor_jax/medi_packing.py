"""Packed training batches: a global batch's texts laid several to a row (`TrainConfig.pack_length`).

With length buckets a step still pads every query to the batch's longest query and every document
to its longest document: on the MEDI sample only ~40% of the padded positions are text at 256
triples (BENCHMARKS.md). Packing lays the texts end to end in rows of `pack_length` tokens instead,
each text its own segment: attention stays inside a segment (t5.Encoder), relative positions
inside a text are those of the text alone, and pooling is per segment, so without dropout the
embeddings are those of the unpacked batch up to float rounding (tested).

Layout, for S = texts_per_row(pack_length) text slots per row and `shards` = data x fsdp batch
shards (the global batch's B triples split into `shards` blocks of b = B / shards, as the unpacked
batch's rows are), without GradCache:
  packed_ids, packed_segments, packed_offsets   int32 [shards * R, pack_length]
      token ids; segment 1..S of the text in its row (0: padding); position inside the text
  packed_n_instr                                int32 [shards * R, S]   instruction length per slot
  text_slots                                    int32 [B, 3]   row * S + slot, within the shard's
      own R rows, of the query, positive and negative of every triple
Block k of the rows holds exactly the texts of block k of the triples, so both arrays, sharded
over the same batch axes, put every text on the device of its triple. R, the same for every block
and host, is `row_count` of the most rows any block needs (best-fit decreasing, `tokenization.
pack_rows`); every host packs every block's lengths (cheap) to agree on it without communication.
With C GradCache chunks each block holds C * R rows, every chunk's texts packed apart
(`make_packed_batch`), so that a chunk of the batch is itself a packed batch of this layout.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from instructor_jax import tokenization

ROLES = ("query", "pos", "neg")
PACKED_KEYS = ("packed_ids", "packed_segments", "packed_offsets", "packed_n_instr", "text_slots")
ROW_KEYS = PACKED_KEYS[:4]  # one entry per packed row


def texts_per_row(pack_length: int) -> int:
  """Text slots per packed training row: MEDI texts with their EOS are rarely under 8 tokens, and
  slots cost pooling work and gathered embeddings ([R * S, E]) whether used or not."""
  return max(1, pack_length // 8)


def row_count(needed: int) -> int:
  """Rows per block, rounded up so that few shapes compile: exact up to 15, then to a multiple of
  an eighth of the power of two at or below `needed` (at most 1/8 filler rows)."""
  needed = max(int(needed), 1)
  step = 1 << max(needed.bit_length() - 4, 0)
  return -(-needed // step) * step


def max_rows(triples_per_block: int, chunks: int = 1) -> int:
  """Rows per unit when every text needs a row of its own: the shape of step 0 (train._loop)."""
  return row_count(3 * triples_per_block // chunks)


def _lengths(task: Any, triples: np.ndarray, query_len: int, doc_len: int) -> np.ndarray:
  """[len(triples) * 3] token counts (with EOS) after truncation, triple-major (q, pos, neg, q, ...)."""
  out = []
  for role in ROLES:
    field = task.fields[role]
    full = field.offsets[triples + 1] - field.offsets[triples]
    out.append(np.minimum(full, query_len if role == "query" else doc_len))
  return np.stack(out, axis=1).reshape(-1)


def _blocks(rows: np.ndarray, shards: int, chunks: int) -> list[np.ndarray]:
  if len(rows) % (shards * chunks):
    raise ValueError(f"global batch of {len(rows)} triples does not split into {shards} batch shards (data x fsdp) "
                     f"x {chunks} GradCache chunks.")
  return np.split(rows, shards)


def rows_per_unit(task: Any, rows: np.ndarray, shards: int, query_len: int, doc_len: int, pack_length: int,
                  chunks: int = 1) -> int:
  """R for the global batch `rows`: `row_count` of the most rows any unit (a block's GradCache chunk,
  its triples i % chunks == c) packs into."""
  s = texts_per_row(pack_length)
  need = max(len(tokenization.pack_rows(_lengths(task, b[c::chunks], query_len, doc_len).tolist(), pack_length, s))
             for b in _blocks(rows, shards, chunks) for c in range(chunks))
  return row_count(need)


def make_packed_batch(task: Any, rows: np.ndarray, *, shards: int, process_index: int, process_count: int,
                      query_len: int, doc_len: int, pack_length: int, chunks: int = 1) -> dict[str, np.ndarray]:
  """This host's packed slice of the global batch `rows` (the host's blocks, in order).

  With GradCache (`chunks` > 1, train_step.grad_cache_grads) chunk c takes triples a * chunks + c and
  rows a * chunks + c. So each block packs every chunk's triples (i % chunks == c) on their own into
  R rows and interleaves them (row a of chunk c at a * chunks + c), text_slots counting rows within
  the chunk: a chunk is then itself a packed batch of this layout, over the same blocks.
  """
  if shards % process_count:
    raise ValueError(f"{shards} batch shards (data x fsdp) do not split over {process_count} hosts.")
  num_rows = rows_per_unit(task, rows, shards, query_len, doc_len, pack_length, chunks)
  per_host = shards // process_count
  blocks = _blocks(rows, shards, chunks)[process_index * per_host:(process_index + 1) * per_host]
  parts = [_pack_block(task, b, query_len, doc_len, pack_length, num_rows, chunks) for b in blocks]
  return {k: np.concatenate([p[k] for p in parts]) for k in PACKED_KEYS}


def _pack_block(task: Any, triples: np.ndarray, query_len: int, doc_len: int, pack_length: int,
                num_rows: int, chunks: int) -> dict[str, np.ndarray]:
  units = [_pack_unit(task, triples[c::chunks], query_len, doc_len, pack_length, num_rows) for c in range(chunks)]
  out = {k: np.stack([u[k] for u in units], axis=1).reshape((num_rows * chunks,) + units[0][k].shape[1:])
         for k in ROW_KEYS}
  slots = np.empty((len(triples), 3), np.int32)
  for c, u in enumerate(units):
    slots[c::chunks] = u["text_slots"]
  out["text_slots"] = slots
  return out


def _pack_unit(task: Any, triples: np.ndarray, query_len: int, doc_len: int, pack_length: int,
               num_rows: int) -> dict[str, np.ndarray]:
  s = texts_per_row(pack_length)
  ids, n_instr = [], []
  for role in ROLES:
    max_len = query_len if role == "query" else doc_len
    field = task.fields[role]
    ids.append(field.truncated(triples, max_len))
    n_instr.append(tokenization.instruction_lengths(field.n_instr[triples], max_len))
  # Triple-major text order: text 3 * i + r is role r of triple i.
  texts = [ids[r][i] for i in range(len(triples)) for r in range(3)]
  text_n_instr = np.stack(n_instr, axis=1).reshape(-1)
  packed = tokenization.pack_rows([len(t) for t in texts], pack_length, s)
  batch = tokenization.pad_packed(packed, texts, text_n_instr, pack_length, s, num_rows)
  slots = np.empty(len(texts), np.int32)
  for r, row in enumerate(packed):
    for j, t in enumerate(row):
      slots[t] = r * s + j
  return {"packed_ids": batch.ids, "packed_segments": batch.segments, "packed_offsets": batch.offsets,
          "packed_n_instr": batch.n_instr, "text_slots": slots.reshape(-1, 3)}


def pad_rows(batch: Mapping[str, np.ndarray], num_rows: int, local_blocks: int,
             chunks: int = 1) -> dict[str, np.ndarray]:
  """`batch` with every unit (block x chunk) of its `local_blocks` blocks padded with empty rows to
  `num_rows` (the same texts in the same slots: text_slots index rows within their unit)."""
  have = batch["packed_ids"].shape[0] // (local_blocks * chunks)
  if num_rows < have:
    raise ValueError(f"cannot pad {have} packed rows per unit down to {num_rows}.")
  out = dict(batch)
  for k in ROW_KEYS:
    x = batch[k].reshape((local_blocks, have, chunks) + batch[k].shape[1:])
    x = np.pad(x, [(0, 0), (0, num_rows - have)] + [(0, 0)] * (x.ndim - 2))
    out[k] = x.reshape((-1,) + batch[k].shape[1:])
  return out
