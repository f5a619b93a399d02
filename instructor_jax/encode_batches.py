"""Host side of `Instructor.encode`: tokenisation, packing and padding on a worker thread, chunk by chunk.

Before, `encode` tokenised its whole input before the first batch reached a device; on a GPU that
serial host time is a sizeable share of a short-text call (10,000 instructed sentences: ~0.3 s of
tokenising on two cores against ~1 s of device time at the throughput we aim for). Now the input is
cut into chunks of 128k, 256k, ... up to 2M characters, and a worker thread prepares chunk k + 1
(tokenise, pack, pad) while the devices run chunk k. Only the first chunk is waited for. An input
of one chunk, or any input on CPU devices (AHEAD_ON_CPU), is prepared on the calling thread, each
batch padded just before its dispatch.

Batches are formed as before: short texts packed several to a row (`pack_rows`), longer ones
longest first in batches of `batch_size`, padded to their length bucket. Rows that do not fill a
batch at the end of a chunk are carried into the next chunk, so as before only the call's last
packed and last bucketed batch hold filler rows, and those are padded only to the next power of two
times the device count (`BatchSpec.rows_for`). Token ids are dropped once padded, so the host keeps
about two chunks of ids instead of the whole input's.

Shape key: R rows per batch, L bucket (or packed row) length, S texts per packed row.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from typing import Any, Callable, Iterator, Sequence

from instructor_jax.tokenization import (CUT_CHARS_PER_PIECE, Batch, InstructionCoversTextError, PackedBatch,
                                         bucket_length, pack_rows, pad_batch, pad_packed, split_item, texts_per_row)

# Chunks are measured in characters, each text counting at most CUT_CHARS_PER_PIECE * max_len (about
# where tokenization.encode_leading cuts it), so a chunk of documents costs about what a chunk of
# short sentences does. 128k characters: ~1,200 short instructed sentences or ~50 512-token documents.
# Texts encoded whole (no ASCII space past the cut point, e.g. CJK) cost more than their capped count.
FIRST_CHUNK = 1 << 17  # characters tokenised before the devices start
LARGEST_CHUNK = 1 << 21
# On a CPU backend the "device" is the host's own cores: a worker tokenising beside XLA only takes
# cores from its matmuls (1,000 512-token documents, tiny model, two cores: 0.93-0.95x in three of
# four runs), so chunks are prepared in turn there, each when the previous one has been dispatched.
AHEAD_ON_CPU = False

# (input indices of each batch row's texts: one per bucketed row, up to S per packed row; the batch)
PlannedBatch = tuple[list[list[int]], Batch | PackedBatch]
TokenizeFn = Callable[[Sequence[Any]], tuple[list[list[int]], list[int]]]


@dataclasses.dataclass(frozen=True)
class BatchSpec:
  """How `encode` batches: `rows` per batch (a multiple of the device count), `batch_size` texts per
  bucketed batch, texts of at most `pack_length` tokens packed (0: none), longer ones padded to a bucket."""

  rows: int
  batch_size: int
  pack_length: int
  buckets: Sequence[int]
  max_len: int
  devices: int = 1

  def rows_for(self, n: int) -> int:
    """Rows a batch of `n` rows is padded to: `rows` when full; a call's last, partial batch only to the
    next power of two times the device count. One query then runs one row per device, not `batch_size`
    (BENCHMARKS.md: 35x faster at the default 32 on a CPU), for at most log2(rows / devices) more
    compiled shapes."""
    r = self.devices
    while r < n:
      r *= 2
    return min(r, self.rows)


def chunk_stop(items: Sequence[Any], start: int, budget: int, max_len: int) -> int:
  """End of the chunk that starts at `start`: at least one item, then items while `budget` characters last."""
  cap, stop, used = CUT_CHARS_PER_PIECE * max_len, start, 0
  while stop < len(items) and (stop == start or used < budget):
    used += min(cap, _chars(items[stop]))
    stop += 1
  return stop


def _chars(item: Any) -> int:
  if isinstance(item, str):
    return len(item)
  if isinstance(item, (list, tuple)):
    return sum(len(x) for x in item[:2] if isinstance(x, str))
  return 0  # not an input item: split_item's error names it


class _Batcher:
  """Turns tokenised chunks into full batches; what does not fill one waits for the next chunk.

  `add` returns each batch as (rows, pad): `pad()` lays it out and drops its texts' ids. The worker
  pads a chunk's batches at once; a call of one chunk pads each just before dispatching it, as
  `encode` did before chunking, so that padding overlaps the previous batch's device time.
  """

  def __init__(self, n: int, spec: BatchSpec):
    self.spec = spec
    self.ids: list[list[int] | None] = [None] * n
    self.n_instr = [0] * n
    self.packed_rows: list[list[int]] = []  # packed rows not yet in a batch (input indices)
    self.long: list[int] = []  # texts longer than pack_length not yet in a batch

  def add(self, start: int, ids: list[list[int]], n_instr: list[int],
          last: bool) -> list[tuple[list[list[int]], Callable[[], Batch | PackedBatch]]]:
    spec = self.spec
    self.ids[start:start + len(ids)] = ids
    self.n_instr[start:start + len(ids)] = n_instr
    short = [start + j for j, x in enumerate(ids) if len(x) <= spec.pack_length]
    self.long += [start + j for j, x in enumerate(ids) if len(x) > spec.pack_length]
    out = []
    if short:
      self.packed_rows += [[short[j] for j in row] for row in pack_rows(
          [len(ids[i - start]) for i in short], spec.pack_length, texts_per_row(spec.pack_length))]
    full = len(self.packed_rows) if last else len(self.packed_rows) // spec.rows * spec.rows
    out += [(rows, functools.partial(self._pad_packed, rows))
            for rows in (self.packed_rows[b:b + spec.rows] for b in range(0, full, spec.rows))]
    del self.packed_rows[:full]
    # Longest first, like sentence-transformers: batches of similar length waste little padding.
    self.long.sort(key=lambda i: -len(self.ids[i]))
    full = len(self.long) if last else len(self.long) // spec.batch_size * spec.batch_size
    out += [([[i] for i in idx], functools.partial(self._pad_bucketed, idx))
            for idx in (self.long[b:b + spec.batch_size] for b in range(0, full, spec.batch_size))]
    del self.long[:full]
    return out

  def _pad_packed(self, rows: list[list[int]]) -> PackedBatch:
    spec = self.spec
    batch = pad_packed(rows, self.ids, self.n_instr, spec.pack_length, texts_per_row(spec.pack_length),
                       spec.rows_for(len(rows)))
    self._release(i for row in rows for i in row)
    return batch

  def _pad_bucketed(self, idx: list[int]) -> Batch:
    spec = self.spec
    length = bucket_length(max(len(self.ids[i]) for i in idx), spec.buckets, spec.max_len)
    batch = pad_batch([self.ids[i] for i in idx], [self.n_instr[i] for i in idx], length, spec.rows_for(len(idx)))
    self._release(idx)
    return batch

  def _release(self, indices: Any) -> None:
    for i in indices:
      self.ids[i] = None


class _Ahead:
  """`fn(*args)` on a new thread; `result()` waits for it and returns its value or raises its error.

  A plain daemon thread rather than an executor: `concurrent.futures` refuses work once interpreter
  shutdown has begun (an `encode` in an atexit handler or a thread outliving the main one), and a
  daemon thread never holds up the interpreter's exit. Where no thread can start, `fn` runs inline.
  """

  def __init__(self, fn: Callable[..., Any], *args: Any):
    self._value: Any = None
    self._error: BaseException | None = None
    self._thread: threading.Thread | None = threading.Thread(
        target=self._run, args=(fn, args), name="instructor-encode", daemon=True)
    try:
      self._thread.start()
    except RuntimeError:  # "can't create new thread at interpreter shutdown"
      self._thread = None
      self._run(fn, args)

  def _run(self, fn: Callable[..., Any], args: tuple) -> None:
    try:
      self._value = fn(*args)
    except BaseException as e:  # noqa: BLE001 - handed to the thread that waits for the result
      self._error = e

  def wait(self) -> None:
    if self._thread is not None and self._thread is not threading.current_thread():
      self._thread.join()

  def result(self) -> Any:
    self.wait()
    if self._error is not None:
      raise self._error
    return self._value


def planned_batches(tokenize: TokenizeFn, items: Sequence[Any], spec: BatchSpec,
                    platform: str = "gpu") -> Iterator[PlannedBatch]:
  """Every item's batch, in dispatch order; the next chunk is prepared on a worker thread meanwhile
  (on the calling thread when it is needed, for devices of `platform` "cpu": see AHEAD_ON_CPU).

  The caller closes the generator when it stops early (`Instructor._run_pipelined` does), so that
  the worker is waited for at once and not when the generator is garbage-collected.
  """
  first, largest = FIRST_CHUNK, LARGEST_CHUNK  # read here, so that tests can shrink them
  batcher = _Batcher(len(items), spec)

  def prepare(start: int, budget: int) -> tuple[int, list]:
    stop = chunk_stop(items, start, budget, spec.max_len)
    try:
      ids, n_instr = tokenize(items[start:stop])
    except InstructionCoversTextError as e:  # its index is the chunk's; the caller's is the whole input's
      raise e.shifted(start) from None
    return stop, batcher.add(start, ids, n_instr, last=stop == len(items))

  def prepare_padded(start: int, budget: int) -> tuple[int, list[PlannedBatch]]:
    stop, planned = prepare(start, budget)
    return stop, [(rows, pad()) for rows, pad in planned]

  if not items:
    return
  one_chunk = chunk_stop(items, 0, first, spec.max_len) == len(items)
  if not one_chunk:  # a bad item fails the call before any device work, naming its index in the whole input
    for i, item in enumerate(items):
      split_item(item, i)
  if one_chunk or (platform == "cpu" and not AHEAD_ON_CPU):
    budget, stop = first, 0
    while stop < len(items):
      stop, planned = prepare(stop, budget)
      budget = min(largest, 2 * budget)
      for rows, pad in planned:  # padded just before dispatch, overlapping the previous batch's device time
        yield rows, pad()
    return
  # One chunk ahead at most: the worker and this thread never touch the batcher at the same time.
  ahead = _Ahead(prepare_padded, 0, first)
  try:
    budget, stop = first, 0
    while stop < len(items):
      stop, batches = ahead.result()
      budget = min(largest, 2 * budget)
      if stop < len(items):
        ahead = _Ahead(prepare_padded, stop, budget)
      yield from batches
  finally:
    ahead.wait()  # on an error in the caller too: the chunk being prepared finishes first
