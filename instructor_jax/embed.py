"""Batch embedding job: `python -m instructor_jax.embed --model M --input PATH... --output DIR`.

One process runs three stages that overlap:
  reader thread : reads rows in input order, validates them, and for each of this process's pending
                  parts tokenises, packs short texts several to a row and pads longer ones to
                  length buckets, a chunk of rows at a time (embed_batches.py);
  main thread   : dispatches batches to all local devices without waiting and fetches each result
                  two batches later (the only host sync, and one that is needed);
  writer thread : quantises and commits finished parts (temp file -> rename -> sidecar).
Parts are fixed slices of --rows-per-part input rows; process i of n owns parts k with k % n == i.
Process 0 writes _manifest.json once every part has its sidecar: with jax.distributed it waits at
a barrier for the others; with --process-index/--process-count (independent launches) it waits up
to --wait-for-peers seconds, otherwise a later run of process 0 writes it (complete parts are skipped).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import os
import queue
import sys
import threading
import time
from typing import Any, Callable, Sequence

import numpy as np

from instructor_jax import embed_batches, embed_io, embed_manifest, embed_output, embed_report
from instructor_jax.config import DTYPES
from instructor_jax.embed_batches import BatchPlan, read_parts
from instructor_jax.embed_io import BadRow, Fields, InputError
from instructor_jax.hf_format import CheckpointError
from instructor_jax.instructor import scatter_embeddings
from instructor_jax.tokenization import DEFAULT_BUCKETS, PackedBatch
from instructor_jax.dir_lock import DirectoryInUseError, lock_directory

FETCH_LAG = 2  # batches in flight before the oldest result is fetched
Fault = Callable[[str, int], None]


DEFAULT_TEXT_FIELD = "text"


def default_batch_tokens() -> int:
  """Tokens per device batch when --batch-tokens is not given.

  On CPU small batches stay in cache: 2048 tokens ran 8-18% faster than 8192 (BENCHMARKS.md).
  """
  import jax
  return 2048 if jax.default_backend() == "cpu" else 32768


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m instructor_jax.embed", description=__doc__.split("\n")[0])
  p.add_argument("--model", help="required: Hub id, sentence-transformers/HF dir, t5x dir or training workdir")
  p.add_argument("--input", nargs="+", required=True, help="files or globs (quote globs), in order; a path "
                 "that exists is that file, glob characters in its name included. Each file may be named once")
  p.add_argument("--output", required=True, help="output directory")
  p.add_argument("--input-format", default="auto", choices=("auto",) + embed_io.FORMATS,
                 help="default: from the extension. csv/tsv follow CSV quoting; tsv-unquoted is one row per "
                      "line split on tabs, quotes being literal text (GLUE/STS/MSRP files)")
  # None, not "text", so that naming it for plain-text inputs can be refused; Fields gets the default.
  p.add_argument("--text-field", default=None, help="field (JSONL, Parquet) or column (CSV/TSV) holding the "
                 f"text (default: {DEFAULT_TEXT_FIELD})")
  p.add_argument("--instruction", default=None, help="instruction for every row (default for rows without "
                 "--instruction-field: the field absent or null, or a blank CSV/TSV cell)")
  p.add_argument("--instruction-field", default=None, help="per-row instruction field")
  p.add_argument("--id-field", default=None, help="id field (default: the row's 0-based position in the input)")
  p.add_argument("--id-type", default=None, choices=("int", "str"), help="default: int for positional ids, "
                 "str with --id-field")
  p.add_argument("--format", default="parquet", choices=embed_output.OUTPUT_FORMATS,
                 help="parquet: id + embedding columns; npy: part-NNNNN.npy plus part-NNNNN.ids.npy (default: parquet)")
  p.add_argument("--precision", default="float32", choices=embed_output.PRECISIONS, help="stored precision, the "
                 "bytes of sentence-transformers' quantize_embeddings (default: float32)")
  p.add_argument("--int8-ranges", default=None, help=".npy [2, E] per-dimension min/max for int8/uint8")
  p.add_argument("--calibration-rows", type=int, default=10_000, help="rows (first valid rows of the input) "
                 "used for int8/uint8 ranges when --int8-ranges is not given (default: %(default)s)")
  p.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                 help="compute dtype (default bfloat16 on accelerators, float32 on CPU; float16 is for GPUs without bf16)")
  p.add_argument("--max-seq-length", type=int, default=None, help="tokens per text, instruction and </s> "
                 "included; longer texts are truncated (default: the model's, 512 for INSTRUCTOR)")
  p.add_argument("--batch-tokens", type=int, default=None, help="token budget per device batch "
                 "(default 32768 on accelerators, 2048 on CPU)")
  p.add_argument("--pack-length", type=int, default=128, metavar="N", help="texts of up to N tokens are "
                 "packed several to a row of N tokens (segment ids keep them apart; embeddings equal unpacked "
                 "ones to float rounding, and padding almost vanishes); longer texts use --buckets. Capped at "
                 "the maximum sequence length; 0 disables packing (default 128)")
  p.add_argument("--buckets", default=",".join(map(str, DEFAULT_BUCKETS)), help="padded lengths of texts "
                 "longer than --pack-length, comma-separated (default: %(default)s)")
  p.add_argument("--rows-per-part", type=int, default=100_000, help="input rows per output part (default: "
                 "%(default)s); a part is tokenised and packed a chunk of rows at a time, its batches leaving as "
                 "they fill")
  p.add_argument("--on-error", default="fail", choices=("fail", "skip"), help="a bad row stops the job with its "
                 "file and line, or is skipped and counted by reason (default: fail)")
  p.add_argument("--overwrite", action="store_true", help="discard existing results in --output")
  p.add_argument("--process-index", type=int, default=None, help="default: jax.process_index()")
  p.add_argument("--process-count", type=int, default=None, help="default: jax.process_count()")
  p.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize() first (GPU "
                 "clusters under SLURM/Open MPI; settings come from the environment)")
  p.add_argument("--wait-for-peers", type=float, default=0.0, help="seconds process 0 waits for other "
                 "processes' parts before writing the manifest (independent launches only)")
  p.add_argument("--no-progress", action="store_true")
  return p


def _fields(args: argparse.Namespace) -> Fields:
  id_type = args.id_type or ("str" if args.id_field else "int")
  if args.id_field is None and id_type != "int":
    raise SystemExit("--id-type str needs --id-field (positional ids are integers).")
  return Fields(args.text_field or DEFAULT_TEXT_FIELD, args.instruction_field, args.id_field, id_type, args.instruction)


def _load_model(args: argparse.Namespace) -> Any:
  import jax
  from instructor_jax.instructor import Instructor
  dtype = args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
  return Instructor.from_pretrained(args.model, dtype=dtype, max_seq_length=args.max_seq_length)


# ---- pipeline stages ------------------------------------------------------------------------------

class _Stage(threading.Thread):
  """A daemon thread whose exception is re-raised in the main thread by `check()`."""

  def __init__(self, target: Callable[[], None], name: str):
    super().__init__(name=name, daemon=True)
    self._target_fn, self.error = target, None

  def run(self) -> None:
    try:
      self._target_fn()
    except BaseException as e:  # noqa: BLE001 - handed to the main thread
      self.error = e

  def check(self) -> None:
    if self.error is not None:
      raise self.error


def _put(q: queue.Queue, item: Any, stop: threading.Event, consumer: _Stage | None = None) -> None:
  """Blocking put that gives up when the job stops and re-raises a consumer thread's failure."""
  while not stop.is_set():
    try:
      q.put(item, timeout=0.2)
      return
    except queue.Full:
      if consumer is not None:
        consumer.check()
  raise _Stopped()


class _Stopped(Exception):
  """The main thread is shutting down; a stage ends quietly."""


# ---- the job -------------------------------------------------------------------------------------

def _prepare_output(out_dir: str, owned: list[int], process_index: int, fmt: str, overwrite: bool,
                    held: contextlib.ExitStack) -> None:
  """Creates and locks the directory; with --overwrite removes this process's parts (and process 0 the manifest)."""
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise InputError(f"--output {out_dir} is a file; pass a directory (new, or one this job wrote).")
  # Parquet readers take every file not starting with "_" or "." as data: anything else there would
  # make the directory unreadable as one dataset (and --overwrite discards results, not other files).
  foreign = sorted(n for n in os.listdir(out_dir) if not n.startswith(("_", "."))
                   and not embed_output.is_data_file(n) and not n.startswith(embed_manifest.LEGACY_MANIFEST_FILE)
                   ) if os.path.isdir(out_dir) else []
  if foreign:
    raise InputError(f"--output {out_dir} holds files an embed job did not write ({', '.join(foreign[:3])}"
                     f"{', ...' if len(foreign) > 3 else ''}); pass a new or empty directory, or one an embed "
                     "job wrote.")
  try:
    os.makedirs(os.path.join(out_dir, embed_output.PARTS_DIR), exist_ok=True)
  except OSError as e:  # a path under a regular file, no permission
    raise InputError(f"--output {out_dir}: cannot create the directory ({e.strerror}: {e.filename}); pass a "
                     "directory that can be created or written.") from e
  # Per process index: independent launches share the directory, each with its own parts; the same
  # command started twice would compute every part twice, and race --overwrite's removals.
  lock = lock_directory(out_dir, f".embed-{process_index}.lock", f"embed job as process {process_index}", "--output")
  if lock is not None:
    held.enter_context(lock)
  if not overwrite:
    return
  for k in owned:
    embed_output.remove_part(out_dir, k)
  manifest = os.path.join(out_dir, embed_manifest.MANIFEST_FILE)
  if process_index == 0 and os.path.exists(manifest):
    os.remove(manifest)
  if process_index == 0:
    embed_manifest.remove_legacy_manifest(out_dir)


def _existing_parts(out_dir: str) -> int:
  """One past the highest part index present in the directory (0 if none)."""
  if not os.path.isdir(out_dir):
    return 0
  numbers = [n[5:].split(".")[0] for n in os.listdir(out_dir) if n.startswith("part-")]
  found = [int(x) for x in numbers if x.isdigit()]
  return max(found, default=-1) + 1


def _device_loop(model: Any, parts: queue.Queue, reader: _Stage, writes: queue.Queue, writer: _Stage,
                 progress: embed_report.Progress, stop: threading.Event) -> set[tuple[int, ...]]:
  """Dispatches every batch without waiting and fetches results FETCH_LAG batches later.

  Returns the compiled batch shapes: (R, L) bucketed, (R, L, S) packed.
  """
  shapes: set[tuple[int, ...]] = set()
  inflight: collections.deque = collections.deque()
  # Part index -> [embeddings (a row per slot, trimmed to the valid rows when written), batches in
  # flight, the part's PartWork once its last piece has come].
  open_parts: dict[int, list[Any]] = {}

  def drain_one():
    index, rows, result = inflight.popleft()
    state = open_parts[index]
    scatter_embeddings(rows, result, state[0])
    state[1] -= 1
    texts = sum(len(r) for r in rows)
    progress.update(texts, 0, 0, texts)
    settle(index)

  def settle(index: int) -> None:
    out_NE, in_flight, work = open_parts[index]
    if work is None or in_flight:
      return
    del open_parts[index]
    progress.update(0, 0, 0, work.slots - len(work.ids))
    writer.check()
    _put(writes, (work, out_NE[:len(work.ids)]), stop, writer)

  while True:
    try:
      piece = parts.get(timeout=0.2)
    except queue.Empty:
      reader.check()
      continue
    if piece is None:
      break
    if piece.index not in open_parts:
      open_parts[piece.index] = [np.zeros((piece.slots, model.config.embedding_dim), np.float32), 0, None]
    for rows, batch in piece.batches:
      packed = isinstance(batch, PackedBatch)
      shapes.add(batch.ids.shape + batch.n_instr.shape[1:] if packed else batch.ids.shape)
      # The mask counts real tokens for both kinds; ids.size is what the devices compute on.
      progress.update(0, int(batch.mask.sum()), batch.ids.size, 0)
      result = model.embed_packed_async(batch) if packed else model.embed_batch_async(batch)
      open_parts[piece.index][1] += 1
      inflight.append((piece.index, rows, result))
      while len(inflight) > FETCH_LAG:
        drain_one()
    if piece.work is not None:
      open_parts[piece.index][2] = piece.work
      if not open_parts[piece.index][1]:
        # Nothing of this part in flight: what is, is earlier parts', which are committed first (parts
        # are written in order; this only waits where a part had no batch at all).
        while inflight:
          drain_one()
      settle(piece.index)
  while inflight:
    drain_one()
  reader.check()
  return shapes


def _write_parts(writes: queue.Queue, out_dir: str, fmt: str, precision: str, ranges: np.ndarray | None,
                 id_type: str, job_hash: str, fault: Fault | None, done: list[dict[str, Any]],
                 stop: threading.Event) -> None:
  while not stop.is_set():
    try:
      item = writes.get(timeout=0.2)
    except queue.Empty:
      continue
    if item is None:
      return
    work, out_NE = item
    sidecar = {"job_hash": job_hash, "rows": len(work.ids), "slots": work.slots, "first_slot": work.first_slot,
               "skipped": work.skipped, "truncated": work.truncated, "text_cut_away": work.text_cut_away,
               "tokens": work.tokens, "instructions": work.instructions}
    q_NE = embed_output.quantize(out_NE, precision, ranges)
    done.append(embed_output.commit_part(out_dir, work.index, fmt, work.ids, q_NE, id_type, sidecar, fault))


def _finalize(out_dir: str, spec: dict[str, Any], unreadable: list[BadRow], model_source: str | None,
              process_index: int, distributed: bool, wait_s: float, args: argparse.Namespace) -> str | None:
  """Process 0 writes _manifest.json once all parts are committed; returns its path or None.

  A job whose every part is there and that embedded no row at all gets no manifest (see
  `_refuse_all_skipped`); decided here, from all parts, after every process has finished."""
  if distributed:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("instructor_jax.embed:parts_done")
  if process_index != 0:
    return None
  unread = [{"path": b.where, "error": b.detail} for b in unreadable]
  deadline = time.monotonic() + wait_s
  while (manifest := embed_manifest.build_manifest(out_dir, spec, spec["num_parts"], unread)) is None:
    if distributed:
      raise RuntimeError(f"{out_dir}: every process finished but some part sidecars are missing under "
                         f"{embed_output.PARTS_DIR}/ or belong to another job; the output directory must be shared "
                         "by all processes, and every process must run the same command.")
    if time.monotonic() >= deadline:
      return None
    time.sleep(min(5.0, max(0.1, deadline - time.monotonic())))
  if not manifest["rows"]["embedded"]:
    _refuse_all_skipped(args, manifest["rows"]["skipped"], spec["num_parts"], spec["inputs"])
  manifest["model"] = dict(manifest["model"], source=model_source)
  return embed_manifest.write_manifest(out_dir, manifest)


@dataclasses.dataclass
class _Plan:
  """What this process will do: inputs, parts, the job identity, and which parts are left."""

  files: list[embed_io.InputFile]
  unreadable: list[BadRow]
  num_parts: int
  spec: dict[str, Any]
  ranges: np.ndarray | None
  complete: set[int]
  pending: list[int]
  pending_slots: int


def _plan(args: argparse.Namespace, model: Any, fields: Fields, index: int, count: int, max_len: int,
          buckets: list[int], pack_length: int, runtime: dict[str, Any], held: contextlib.ExitStack) -> _Plan:
  """Counts the inputs, checks the output directory against this job (locking it into `held`), finds
  the pending parts."""
  out_dir, per_part = args.output, args.rows_per_part
  files, unreadable = embed_io.plan_inputs(args.input, args.input_format, args.on_error)
  text_files = [f.path for f in files if f.format == "text"]
  if text_files and (fields.id or fields.instruction):
    raise InputError(f"{text_files[0]}: plain-text inputs have one text per line and positional ids; "
                     "--id-field and --instruction-field need JSONL, CSV/TSV or Parquet inputs.")
  if text_files and len(text_files) == len(files) and args.text_field is not None:
    raise InputError(f"{text_files[0]}: plain-text inputs have one text per line and no fields; drop --text-field "
                     "(it names a field of JSONL, CSV/TSV or Parquet inputs).")
  total = sum(f.rows for f in files)
  if total == 0:  # nothing to embed is a mistake (an empty export, a CSV without data rows), not success
    if not files and unreadable:
      raise InputError(f"no readable input: {unreadable[0].message()}")
    header = (" (CSV/TSV inputs need a header row, then one row per text)"
              if any(f.format in embed_io.DELIMITED for f in files) else "")
    raise InputError(f"{', '.join(f.path for f in files[:3])}: no data rows to embed{header}.")
  embed_output.check_part_count(total, per_part)
  num_parts = -(-total // per_part)
  owned = [k for k in range(max(num_parts, _existing_parts(out_dir))) if k % count == index]
  _prepare_output(out_dir, owned, index, args.format, args.overwrite, held)
  if count == 1 and not embed_manifest.has_results(out_dir):
    # A run stopped before its first part left only the job's identity (and int8 ranges): nothing
    # to resume, so a corrected command starts afresh rather than being refused as another job.
    # One process only: with several, another may be starting this job.
    embed_manifest.forget_job(out_dir)
  ranges = embed_output.int8_ranges(args, model, files, fields, max_len, out_dir)
  recorded = None if args.overwrite else embed_manifest.recorded_fingerprint_scheme(out_dir)
  spec = embed_manifest.job_spec(args, model, fields, files, unreadable, max_len, buckets, pack_length, ranges,
                                 recorded or embed_manifest.FINGERPRINT_SCHEMES[0])
  embed_manifest.check_or_write_job(out_dir, spec, args.overwrite)
  embed_manifest.note_runtime(out_dir, runtime, model.config.encoder.dtype)
  if ranges is not None:
    embed_output.save_ranges(out_dir, ranges)
  job_hash = embed_manifest.spec_hash(spec)
  complete = {k for k in owned if k < num_parts and embed_output.part_is_complete(out_dir, k, args.format, job_hash)}
  pending = sorted(k for k in owned if k < num_parts and k not in complete)
  for k in pending:  # leftovers of a killed run: temporaries, an uncommitted data file
    embed_output.remove_part(out_dir, k)
  pending_slots = sum(min(per_part, total - k * per_part) for k in pending)
  return _Plan(files, unreadable, num_parts, spec, ranges, complete, pending, pending_slots)


def run_job(args: argparse.Namespace, model: Any, fault: Fault | None = None) -> dict[str, Any]:
  """Runs the embedding job for parsed arguments and a loaded `Instructor`; returns the summary."""
  import jax
  t0 = time.perf_counter()
  fields, out_dir = _fields(args), args.output
  distributed = args.process_count is None and jax.process_count() > 1
  index = jax.process_index() if args.process_index is None else args.process_index
  count = jax.process_count() if args.process_count is None else args.process_count
  if not 0 <= index < count:
    raise SystemExit(f"--process-index {index} is not in [0, --process-count {count}).")
  max_len = args.max_seq_length or model.max_seq_length
  buckets = sorted({min(int(b), max_len) for b in str(args.buckets).split(",")})
  batch_tokens = args.batch_tokens or default_batch_tokens()
  pack_length = min(args.pack_length, max_len)
  ndev = model.mesh.devices.size
  runtime = {"devices": f"{ndev} x {model.mesh.devices.flat[0].device_kind}", "batch_tokens": batch_tokens,
             "attention": model.attention_kernel,
             "chunk_chars": f"{embed_batches.FIRST_CHUNK} doubling to {embed_batches.LARGEST_CHUNK}"}
  # The output directory's lock (`_prepare_output`), released however the job ends.
  with contextlib.ExitStack() as held:
    plan = _plan(args, model, fields, index, count, max_len, buckets, pack_length, runtime, held)
    job_hash = embed_manifest.spec_hash(plan.spec)

    stop = threading.Event()
    # Pieces the reader may run ahead of the devices: 4 chunks' batches (~2M characters each, a part's
    # last piece also with its leftovers), besides the chunk it is building.
    parts_q: queue.Queue = queue.Queue(maxsize=4)
    writes_q: queue.Queue = queue.Queue(maxsize=2)
    done: list[dict[str, Any]] = []

    batching = BatchPlan(model.tokenizer, max_len, buckets, batch_tokens, ndev, pack_length)

    def read():
      read_parts(plan.files, fields, args.on_error, args.rows_per_part, set(plan.pending), batching,
                 lambda piece: _put(parts_q, piece, stop))
      _put(parts_q, None, stop)

    reader = _Stage(read, "embed-reader")
    writer = _Stage(lambda: _write_parts(writes_q, out_dir, args.format, args.precision, plan.ranges, fields.id_type,
                                         job_hash, fault, done, stop), "embed-writer")
    progress = embed_report.Progress(plan.pending_slots, not args.no_progress)
    reader.start()
    writer.start()
    try:
      shapes = _device_loop(model, parts_q, reader, writes_q, writer, progress, stop)
      _put(writes_q, None, stop, writer)
      writer.join()
      writer.check()
    except InputError as e:
      stop.set()
      writer.join()  # its commit in progress done: what the directory holds is final
      # A bad row under --on-error fail, before any part was committed: the directory holds no results,
      # so forget the job, and the corrected command (what the message asks for) is not refused as a
      # different job. One process only: with several, others may be running this job.
      if count == 1 and not embed_manifest.has_results(out_dir):
        embed_manifest.forget_job(out_dir)
      elif isinstance(e, embed_batches.BadRowError) and embed_manifest.has_results(out_dir):
        raise embed_batches.BadRowError(e.problem, out_dir) from e
      raise
    finally:
      stop.set()
      progress.bar.close()
    manifest = _finalize(out_dir, plan.spec, plan.unreadable, model.source, index, distributed, args.wait_for_peers,
                         args)
    return embed_report.summary(done, plan, progress, shapes, manifest, t0)


def _refuse_all_skipped(args: argparse.Namespace, skipped: dict[str, int], num_parts: int,
                        inputs: list[dict[str, Any]]) -> None:
  """Almost always a mistyped --text-field or --instruction-field under --on-error skip. No manifest is
  written (a pipeline waiting for it must not take this for done), and the job identity and its parts
  (all of them empty) are removed, so that the directory holds no results and the corrected command is
  not refused as a different job."""
  for k in range(num_parts):
    embed_output.remove_part(args.output, k)
  embed_manifest.forget_job(args.output)
  reasons = ", ".join(f"{k} {v}" for k, v in skipped.items())
  names = ", ".join(i["path"] for i in inputs[:3]) + (", ..." if len(inputs) > 3 else "")
  plain = all(i["format"] == "text" for i in inputs)
  if set(skipped) == {"blank_line"} or plain:  # no field was read, or plain text has none to have mistyped
    hint = f"the {'plain-text ' if plain else ''}inputs hold no non-blank line"
  else:
    hint = (f"check --text-field {args.text_field or DEFAULT_TEXT_FIELD!r} and the other field options against "
            "the input")
  raise InputError(f"{names}: no row was embedded: every row was skipped ({reasons}); {hint}. "
                   f"{args.output} holds no results; rerun with the corrected options.")


def main(argv: Sequence[str] | None = None, model: Any = None, fault: Fault | None = None) -> dict[str, Any]:
  """CLI entry point; `model` (an Instructor) skips loading --model, for tests and notebooks."""
  parser = build_parser()
  args = parser.parse_args(argv)
  if model is None and not args.model:
    parser.error("the following arguments are required: --model")
  if args.distributed:
    import jax
    jax.distributed.initialize()  # before any other JAX call; every host then sees its process index
  _check_options(parser, args, model)
  try:
    summary = run_job(args, model if model is not None else _load_model(args), fault)
  except (InputError, embed_manifest.OutputMismatchError, CheckpointError, DirectoryInUseError) as e:
    if model is not None:  # in-process callers get the exception
      raise
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(2) from e
  except KeyboardInterrupt:
    if model is not None:
      raise
    # Not the traceback of whichever thread was interrupted: committed parts are complete, and the
    # rest is redone by the same command.
    print(f"interrupted: {args.output} keeps the parts committed so far; rerun the same command to resume the "
          "job.", file=sys.stderr)
    raise SystemExit(130) from None
  embed_report.print_summary(summary)
  return summary


def _check_options(parser: argparse.ArgumentParser, args: argparse.Namespace, model: Any) -> None:
  """Option values checked before the model is loaded or anything is written to --output (one
  `error:` line and exit status 2, as argparse's own)."""
  if args.rows_per_part < 1:
    parser.error(f"--rows-per-part {args.rows_per_part}: expected a row count >= 1")
  if args.batch_tokens is not None and args.batch_tokens < 1:
    parser.error(f"--batch-tokens {args.batch_tokens}: expected a token count >= 1")
  if args.pack_length < 0:
    parser.error(f"--pack-length {args.pack_length}: expected a token count >= 0 (0 disables packing)")
  if args.id_type == "str" and args.id_field is None:
    parser.error("--id-type str needs --id-field (positional ids are integers)")
  if args.process_count is not None and args.process_count < 1:
    parser.error(f"--process-count {args.process_count}: expected a process count >= 1")
  if args.process_index is not None:
    import jax  # main has initialised jax.distributed by now, if asked to
    count = jax.process_count() if args.process_count is None else args.process_count
    if not 0 <= args.process_index < count:
      parser.error(f"--process-index {args.process_index} is not in [0, --process-count {count})")
  try:
    buckets = [int(b) for b in str(args.buckets).split(",")]
  except ValueError:
    buckets = []
  if not buckets or min(buckets) < 2:
    parser.error(f"--buckets {args.buckets!r}: expected comma-separated token counts >= 2, e.g. 64,128,256,512")
  if args.max_seq_length is not None and args.max_seq_length < 2:
    parser.error(f"--max-seq-length {args.max_seq_length}: expected >= 2 (at least one token and </s>)")
  if args.int8_ranges and args.precision not in ("int8", "uint8"):
    parser.error(f"--int8-ranges applies to --precision int8 or uint8, not {args.precision}")
  if args.int8_ranges and not os.path.isfile(args.int8_ranges):
    parser.error(f"--int8-ranges {args.int8_ranges}: no such file (expected a .npy of shape [2, E])")
  if args.int8_ranges:
    try:
      embed_output.load_ranges(args.int8_ranges, "pass a .npy file written by numpy.save")
    except InputError as e:
      parser.error(f"--int8-ranges {e}")
  if args.calibration_rows < 2:
    parser.error(f"--calibration-rows {args.calibration_rows}: expected >= 2 (int8/uint8 ranges need a spread)")


if __name__ == "__main__":
  main()
