"""Host side of the embed job: reads each pending part's rows and turns them into padded batches.

Shape key: R rows per batch, L bucket (or packed row) length, S texts per packed row.

A part is prepared chunk by chunk, as `Instructor.encode`'s input is (encode_batches.py): rows are
tokenised as soon as they hold FIRST_CHUNK characters (then twice that, up to LARGEST_CHUNK), and
every batch a chunk fills goes to the devices at once. Before, a whole part (100,000 rows by
default) was read and tokenised before its first batch left, so on an accelerator the first part's
host time added to the job's (BENCHMARKS.md, "Embedding job: host work behind the device").

Texts of up to --pack-length tokens are packed several to a row of that length (tokenization.pack_rows
over each chunk, best-fit decreasing; segment ids keep attention and pooling within each text), as
Instructor.encode does. Longer texts are grouped by length bucket and padded to it, longest first.
Either kind is cut into batches of R rows with R * L <= --batch-tokens per device. Batches are full
(the largest R) until the part's last chunk, whose remainders take R from a fixed set per bucket or
packed length (full, 1/2, 1/4, 1/8, each a multiple of the local device count), so the number of
compiled programs is at most 4 per length however the data looks, and a part's tail wastes little
padding. Rows and texts that do not fill a batch wait for the next chunk of the same part.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
from typing import Any, Callable, Sequence

from instructor_jax.embed_io import (BadRow, Fields, InputError, InputFile, Row, iter_raw, needed_columns,
                                     parse_row)
from instructor_jax.tokenization import (CUT_CHARS_PER_PIECE, Batch, InstructionCoversTextError, PackedBatch,
                                         bucket_length, pack_rows, pad_batch, pad_packed, texts_per_row)

# Characters tokenised per chunk; each text counts at most CUT_CHARS_PER_PIECE * max_len of them
# (about where tokenization.encode_leading stops). 128k characters: ~1,200 short instructed
# sentences or ~50 512-token documents, the host work the devices wait for at the start of a part.
FIRST_CHUNK = 1 << 17
LARGEST_CHUNK = 1 << 21

# (positions in the part's valid rows of each batch row's texts: one per bucketed row, up to S per
# packed row; the batch)
PlannedBatch = tuple[list[list[int]], Batch | PackedBatch]

# Skip reason of a row whose instruction alone tokenises to as many pieces as instruction + text with
# EOS, or more (tokenization.InstructionCoversTextError): found only when its chunk is tokenised.
COVERED_REASON = "instruction_covers_text"
ON_ERROR_ADVICE = ("Fix the input, or pass --on-error skip to skip such rows (they are counted by reason in the "
                   "summary and the manifest).")
# Once parts are committed the fixed input (another checksum) is another job, which a rerun refuses.
COMMITTED_ADVICE = ("{out_dir} already holds committed parts of this job, which a fixed input (another checksum) "
                    "would not match: fix the input and rerun with --overwrite to start over, or rerun this command "
                    "with --on-error skip to keep the committed parts and skip such rows (counted by reason in the "
                    "summary and the manifest).")


class BadRowError(InputError):
  """A bad row under --on-error fail: `problem` names it; the advice depends on whether `out_dir` (given
  when it holds committed parts) must be started over for a fixed input."""

  def __init__(self, problem: str, out_dir: str | None = None):
    self.problem = problem
    advice = ON_ERROR_ADVICE if out_dir is None else COMMITTED_ADVICE.format(out_dir=out_dir)
    super().__init__(f"{problem}. {advice}")


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
  """What a finished part's sidecar records."""

  index: int
  first_slot: int
  slots: int
  ids: list[Any]  # of the valid rows, input order
  skipped: dict[str, int]
  truncated: int
  tokens: int
  instructions: dict[str, int]
  text_cut_away: int = 0  # rows that kept no token of their text (the instruction filled max_len)


@dataclasses.dataclass
class PartPiece:
  """Batches of part `index` ready for the devices; the part's last piece also carries its `work`."""

  index: int
  slots: int
  batches: list[PlannedBatch]
  work: PartWork | None = None


@dataclasses.dataclass(frozen=True)
class BatchPlan:
  """How the job batches: `pack_length` (at most max_len; 0 packs nothing) is the packed row length."""

  tokenizer: Any
  max_len: int
  buckets: Sequence[int]
  batch_tokens: int
  num_devices: int
  pack_length: int


class PartBuilder:
  """Prepares one part: `add` takes its valid rows in input order and returns a piece whenever a chunk
  has been tokenised; `finish` batches what is left and returns the part's last piece.

  A row that tokenising shows to be bad (COVERED_REASON) raises BadRowError naming it (`Row.where`),
  or with `skip_bad` is dropped and counted with the part's skipped rows."""

  def __init__(self, index: int, first_slot: int, slots: int, plan: BatchPlan, skip_bad: bool = False):
    self.index, self.first_slot, self.slots, self.plan = index, first_slot, slots, plan
    self.skip_bad = skip_bad
    self.skipped: collections.Counter = collections.Counter()  # rows dropped after tokenising
    self.rows: list[Row] = []  # read, not yet tokenised
    self.chars, self.budget = 0, FIRST_CHUNK
    self.row_ids: list[Any] = []
    self.ids: list[list[int] | None] = []  # per valid row; None once padded into a batch
    self.n_instr: list[int] = []
    self.packed_rows: list[list[int]] = []  # packed rows not yet in a batch
    self.long: dict[int, list[int]] = collections.defaultdict(list)  # bucket -> texts not yet in a batch
    self.truncated, self.tokens, self.text_cut_away = 0, 0, 0
    self.instructions: collections.Counter = collections.Counter()

  def add(self, row: Row) -> PartPiece | None:
    self.rows.append(row)
    cap = CUT_CHARS_PER_PIECE * self.plan.max_len
    self.chars += min(cap, len(row.text)) + min(cap, len(row.instruction or ""))
    if self.chars < self.budget:
      return None
    self.budget = min(LARGEST_CHUNK, 2 * self.budget)
    return PartPiece(self.index, self.slots, self._chunk(last=False))

  def finish(self, skipped: dict[str, int]) -> PartPiece:
    batches = self._chunk(last=True)
    skipped = dict(sorted((collections.Counter(skipped) + self.skipped).items()))
    work = PartWork(self.index, self.first_slot, self.slots, self.row_ids, skipped, self.truncated, self.tokens,
                    dict(self.instructions), self.text_cut_away)
    return PartPiece(self.index, self.slots, batches, work)

  def _chunk(self, last: bool) -> list[PlannedBatch]:
    """Tokenises the rows read since the last chunk and returns the batches they fill (all, if last)."""
    plan, rows, start = self.plan, self.rows, len(self.ids)
    self.rows, self.chars = [], 0
    items = [r.text if r.instruction is None else [r.instruction, r.text] for r in rows]
    truncated: list[bool] = []
    covered: list[InstructionCoversTextError] = []
    ids, n_instr = plan.tokenizer.tokenize(items, plan.max_len, truncated, covered) if items else ([], [])
    if covered:
      if not self.skip_bad:
        error = covered[0]
        row = rows[error.index]
        raise BadRowError(f"{row.where or f'input row {row.slot + 1}'}: {error.detail()} [{COVERED_REASON}]")
      # The row keeps its claim on its id (read_parts' `seen`): other processes, which do not tokenise
      # this part, must agree on which occurrence of an id is kept.
      self.skipped[COVERED_REASON] += len(covered)
      keep = sorted(set(range(len(rows))) - {e.index for e in covered})
      rows, ids, n_instr, truncated = ([x[j] for j in keep] for x in (rows, ids, n_instr, truncated))
    self.row_ids += [r.id for r in rows]
    self.ids += ids
    self.n_instr += n_instr
    self.truncated += sum(truncated)
    # Instruction + EOS is the whole row: the text was truncated away, and pooling sees only EOS.
    self.text_cut_away += sum(len(x) == n + 1 for x, n in zip(ids, n_instr))
    self.tokens += sum(len(x) for x in ids)
    self.instructions.update(r.instruction or "" for r in rows)
    # Every text has its EOS, so pack_length 0 leaves nothing short.
    short = [start + j for j, x in enumerate(ids) if len(x) <= plan.pack_length]
    # Long texts first: the expensive programs run (and compile) early, and the ETA errs on the safe side.
    for j in sorted((start + j for j, x in enumerate(ids) if len(x) > plan.pack_length), key=lambda i: -len(
        self.ids[i])):
      self.long[bucket_length(len(self.ids[j]), plan.buckets, plan.max_len)].append(j)
    batches = []
    for length in sorted(self.long, reverse=True):
      batches += self._cut(self.long[length], length, last, self._pad_bucketed)
    if short:
      layout = pack_rows([len(self.ids[i]) for i in short], plan.pack_length, texts_per_row(plan.pack_length))
      self.packed_rows += [[short[j] for j in row] for row in layout]
    if self.packed_rows:
      batches += self._cut(self.packed_rows, plan.pack_length, last, self._pad_packed)
    return batches

  def _cut(self, queue: list, length: int, last: bool, pad: Callable[[list, int, int], PlannedBatch]
           ) -> list[PlannedBatch]:
    """Full batches from the front of `queue` (and, if last, the remainder in smaller ones), removed from it."""
    choices = row_choices(length, self.plan.batch_tokens, self.plan.num_devices)
    sizes = split_rows(len(queue), choices) if last else [choices[0]] * (len(queue) // choices[0])
    batches, start = [], 0
    for size in sizes:
      batches.append(pad(queue[start:start + size], length, size))
      start += size
    del queue[:start]
    return batches

  def _pad_bucketed(self, idx: list[int], length: int, size: int) -> PlannedBatch:
    batch = pad_batch([self.ids[i] for i in idx], [self.n_instr[i] for i in idx], length, size)
    self._release(idx)
    return [[i] for i in idx], batch

  def _pad_packed(self, rows: list[list[int]], length: int, size: int) -> PlannedBatch:
    batch = pad_packed(rows, self.ids, self.n_instr, length, texts_per_row(length), size)
    self._release(i for row in rows for i in row)
    return rows, batch

  def _release(self, positions: Any) -> None:
    for i in positions:
      self.ids[i] = None


def build_part(index: int, first_slot: int, slots: int, rows: list[Row], skipped: dict[str, int],
               plan: BatchPlan) -> list[PartPiece]:
  """All pieces of one part, its rows given at once (the job streams them through `PartBuilder`)."""
  builder = PartBuilder(index, first_slot, slots, plan)
  pieces = [piece for piece in map(builder.add, rows) if piece is not None]
  return pieces + [builder.finish(skipped)]


def locate(files: list[InputFile], slot: int) -> str:
  """`file:line` (JSONL, text), `file:line (data row N)` (tsv-unquoted: a row per line after the header),
  `file: data row N` (CSV/TSV, whose quoted fields may span lines) or `file: row N` (Parquet)."""
  f = next(f for f in reversed(files) if slot >= f.first_slot)
  n = slot - f.first_slot + 1
  if f.format in ("jsonl", "text"):
    return f"{f.path}:{n}"
  if f.format == "tsv-unquoted":
    return f"{f.path}:{n + 1} (data row {n})"
  return f"{f.path}: {'data ' if f.format in ('csv', 'tsv') else ''}row {n}"


def read_parts(files: list[InputFile], fields: Fields, on_error: str, rows_per_part: int,
                pending: set[int], plan: BatchPlan, emit: Callable[[PartPiece], None]) -> None:
  """Streams all rows in input order, emitting the pieces of every pending part as they are ready."""
  # id -> first slot. Every process checks every row, so all agree on which occurrence is kept.
  seen: dict[Any, int] = {}
  last_pending = max(pending, default=-1)
  current, builder, skipped = -1, None, collections.Counter()

  def finish():
    if builder is not None:
      emit(builder.finish(dict(skipped)))

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
      current, builder, skipped = part, None, collections.Counter()
      if part > last_pending and fields.id is None:
        return
      if part in pending:
        first = part * rows_per_part
        builder = PartBuilder(part, first, min(rows_per_part, total_slots - first), plan, on_error == "skip")
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
      piece = builder.add(row)
      if piece is not None:
        emit(piece)
      continue
    if on_error == "fail" and row.reason != "blank_line":
      raise BadRowError(row.message())
    skipped[row.reason] += 1
  finish()
