"""Output side of the embed job: precisions, part files (Parquet or .npy), atomic commits, sidecars.

A part is committed in three steps, so a run killed at any point leaves either a complete part or
one that the next run recomputes:
  1. the data files are written to hidden temporary names (`.part-00003.parquet.tmp-<host>-<pid>`);
  2. each is renamed to its final name (`part-00003.parquet`);
  3. the sidecar `_parts/part-00003.json` (row count, checksums, job hash) is written the same way.
The sidecar is the commit record: a part without one, or whose checksums do not match, is redone.
Names starting with `.` or `_` are ignored by pyarrow datasets and pandas.

Precisions follow `sentence_transformers.quantize_embeddings` (6.x): int8/uint8 use per-dimension
[min, max] ranges, `q = clip(floor((x - min) / ((max - min) / 255)), 0, 255)` (minus 128 for int8);
binary/ubinary pack `x > 0` bits (binary: minus 128 as int8).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
from typing import Any, Callable

import numpy as np

from instructor_jax import embed_io

PRECISIONS = ("float32", "float16", "int8", "uint8", "binary", "ubinary")
OUTPUT_FORMATS = ("parquet", "npy")
PARTS_DIR = "_parts"
RANGES_FILE = "_int8_ranges.npy"


def quantize(x_NE: np.ndarray, precision: str, ranges_2E: np.ndarray | None = None) -> np.ndarray:
  """float32 embeddings -> the stored precision (sentence-transformers conventions)."""
  if precision == "float32":
    return np.ascontiguousarray(x_NE, np.float32)
  if precision == "float16":
    return x_NE.astype(np.float16)
  if precision in ("int8", "uint8"):
    if ranges_2E is None:
      raise ValueError(f"{precision} needs calibration ranges [2, E].")
    starts = ranges_2E[0].astype(np.float32)
    steps = (ranges_2E[1].astype(np.float32) - starts) / 255
    steps = np.where(steps == 0, 1, steps)
    q = np.clip(np.floor((x_NE - starts) / steps), 0, 255)
    return q.astype(np.uint8) if precision == "uint8" else (q - 128).astype(np.int8)
  bits = np.packbits(x_NE > 0, axis=-1)
  return bits if precision == "ubinary" else (bits.astype(np.int16) - 128).astype(np.int8)


def stored_dim(embedding_dim: int, precision: str) -> int:
  """Width of the stored vector: packed bytes for the binary precisions."""
  return -(-embedding_dim // 8) if precision.endswith("binary") else embedding_dim


def file_sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(1 << 24):
      h.update(chunk)
  return h.hexdigest()


# Part names have five digits: readers of the directory (`pq.read_table("out/")`) take its files in name
# order, in which part-100000 would come before part-10001. Wider names for larger jobs would rename
# the parts of existing ones, so a job needing more parts is refused (`check_part_count`).
MAX_PARTS = 100_000


def part_name(index: int) -> str:
  return f"part-{index:05d}"


def check_part_count(rows: int, rows_per_part: int) -> None:
  parts = -(-rows // rows_per_part)
  if parts > MAX_PARTS:
    raise embed_io.InputError(
        f"{rows:,} input rows at --rows-per-part {rows_per_part:,} make {parts:,} parts, more than the {MAX_PARTS:,} "
        f"whose file names (part-{0:05d} to {part_name(MAX_PARTS - 1)}) sort in part order; pass --rows-per-part "
        f"{-(-rows // MAX_PARTS)} or more.")


def data_files(index: int, fmt: str) -> list[str]:
  """The final data file names of one part."""
  name = part_name(index)
  return [f"{name}.parquet"] if fmt == "parquet" else [f"{name}.npy", f"{name}.ids.npy"]


# Any part's data file name (`part_name` + a suffix of `data_files`): a file or folder merely starting
# with "part-" is not a part, and a Parquet reader of the directory would fail on it.
_DATA_FILE = re.compile(r"part-\d{5,}\.(parquet|npy|ids\.npy)")


def is_data_file(name: str) -> bool:
  return _DATA_FILE.fullmatch(name) is not None


def sidecar_path(out_dir: str, index: int) -> str:
  return os.path.join(out_dir, PARTS_DIR, f"{part_name(index)}.json")


def _tmp_path(out_dir: str, name: str) -> str:
  # Host and pid in the name: two processes never write to the same temporary file.
  return os.path.join(out_dir, f".{name}.tmp-{socket.gethostname()}-{os.getpid()}")


def _write_parquet(path: str, ids: list[Any], q_NE: np.ndarray, id_type: str) -> None:
  import pyarrow as pa
  import pyarrow.parquet as pq
  values = pa.array(q_NE.reshape(-1))
  emb = pa.FixedSizeListArray.from_arrays(values, q_NE.shape[1])
  id_arr = pa.array(ids, pa.int64() if id_type == "int" else pa.string())
  pq.write_table(pa.table({"id": id_arr, "embedding": emb}), path)


def _write_npy(path: str, array: np.ndarray) -> None:
  with open(path, "wb") as f:
    np.save(f, array, allow_pickle=False)


def atomic_json(path: str, obj: Any) -> None:
  """Writes JSON to a temporary name, fsyncs, renames (readers never see half a file)."""
  tmp = f"{path}.tmp-{socket.gethostname()}-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def commit_part(out_dir: str, index: int, fmt: str, ids: list[Any], q_NE: np.ndarray, id_type: str,
                sidecar: dict[str, Any], fault: Callable[[str, int], None] | None = None) -> dict[str, Any]:
  """Writes one part's data files and then its sidecar; returns the sidecar."""
  finals = data_files(index, fmt)
  tmps = [_tmp_path(out_dir, n) for n in finals]
  if fmt == "parquet":
    _write_parquet(tmps[0], ids, q_NE, id_type)
  else:
    _write_npy(tmps[0], q_NE)
    _write_npy(tmps[1], np.asarray(ids, np.int64) if id_type == "int" else np.asarray(ids, np.str_))
  for tmp in tmps:
    with open(tmp, "rb+") as f:
      os.fsync(f.fileno())
  if fault:
    fault("written", index)
  checksums = {}
  for tmp, name in zip(tmps, finals):
    checksums[name] = file_sha256(tmp)
    os.replace(tmp, os.path.join(out_dir, name))
  if fault:
    fault("renamed", index)
  sidecar = dict(sidecar, part=index, files=checksums)
  atomic_json(sidecar_path(out_dir, index), sidecar)
  return sidecar


def read_sidecar(out_dir: str, index: int) -> dict[str, Any] | None:
  path = sidecar_path(out_dir, index)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError):
    return None


def part_is_complete(out_dir: str, index: int, fmt: str, job_hash: str, verify: bool = True) -> bool:
  """True if the sidecar exists, belongs to this job and (verify) every checksum matches."""
  sidecar = read_sidecar(out_dir, index)
  if sidecar is None or sidecar.get("job_hash") != job_hash:
    return False
  files = sidecar.get("files", {})
  if sorted(files) != sorted(data_files(index, fmt)):
    return False
  for name, digest in files.items():
    path = os.path.join(out_dir, name)
    if not os.path.exists(path) or (verify and file_sha256(path) != digest):
      return False
  return True


def remove_part(out_dir: str, index: int) -> None:
  """Deletes a part's sidecar, data files and this part's temporaries of any host."""
  prefix = part_name(index)
  paths = [sidecar_path(out_dir, index)] + [os.path.join(out_dir, n) for n in data_files(index, "parquet")]
  paths += [os.path.join(out_dir, n) for n in data_files(index, "npy")]
  paths += [os.path.join(out_dir, n) for n in os.listdir(out_dir) if n.startswith(f".{prefix}.")]
  for path in paths:
    if os.path.exists(path):
      os.remove(path)


def read_part(out_dir: str, index: int, fmt: str) -> tuple[list[Any], np.ndarray]:
  """(ids, stored embeddings [N, E']) of one committed part, for tests and checks."""
  if fmt == "parquet":
    import pyarrow.parquet as pq
    table = pq.read_table(os.path.join(out_dir, data_files(index, fmt)[0]))
    emb = table.column("embedding").combine_chunks()
    width = emb.type.list_size
    return table.column("id").to_pylist(), emb.values.to_numpy(zero_copy_only=False).reshape(-1, width)
  emb_file, ids_file = data_files(index, fmt)
  return (np.load(os.path.join(out_dir, ids_file)).tolist(), np.load(os.path.join(out_dir, emb_file)))


# ---- int8 / uint8 calibration ----------------------------------------------------------------------

def calibration_ranges(model: Any, files: list[embed_io.InputFile], fields: embed_io.Fields, max_len: int,
                        count: int) -> np.ndarray:
  """Per-dimension [min, max] of the first `count` valid rows (every process picks the same rows).

  Rows that the job itself skips or fails on (unparsable, or an instruction covering its text) are
  left out here, so that they are reported where the job meets them, with their file and line."""
  items, pending = [], []

  def admit() -> None:  # tokenised together, as the job does, keeping those whose text survives
    if not pending:
      return
    covered: list = []
    model.tokenizer.tokenize(pending, max_len, covered=covered)
    dropped = {e.index for e in covered}
    items.extend(item for i, item in enumerate(pending) if i not in dropped)
    pending.clear()

  for file, slot, where, raw in embed_io.iter_raw(files, embed_io.needed_columns(fields)):
    row = embed_io.parse_row(file.format, fields, slot, where, raw)
    if isinstance(row, embed_io.Row):
      pending.append(row.text if row.instruction is None else [row.instruction, row.text])
      if len(items) + len(pending) >= count:
        admit()
        if len(items) >= count:
          break
  admit()
  items = items[:count]
  if len(items) < 2:
    raise embed_io.InputError("int8/uint8 calibration needs at least 2 valid rows; pass --int8-ranges instead.")
  emb_NE = model.encode(items, batch_size=64, max_seq_length=max_len)
  return np.stack([emb_NE.min(0), emb_NE.max(0)]).astype(np.float32)


def int8_ranges(args: Any, model: Any, files: list[embed_io.InputFile], fields: embed_io.Fields, max_len: int,
                out_dir: str) -> np.ndarray | None:
  """Ranges from --int8-ranges, from an earlier run of this job, or calibrated now (saved by `save_ranges`
  only once the job is accepted, so a refused command never alters an existing job's ranges)."""
  if args.precision not in ("int8", "uint8"):
    return None
  saved = os.path.join(out_dir, RANGES_FILE)
  source = args.int8_ranges or (saved if os.path.exists(saved) and not args.overwrite else None)
  if source:
    ranges = load_ranges(source, "pass a .npy file written by numpy.save" if args.int8_ranges else
                         "the job wrote it, and it is damaged: rerun with --overwrite to start over")
    if ranges.shape != (2, model.config.embedding_dim):
      raise embed_io.InputError(
          f"{source}: ranges have shape {ranges.shape}; expected (2, {model.config.embedding_dim}) "
          "(per-dimension min and max, as the `ranges` of sentence-transformers' quantize_embeddings).")
  else:
    ranges = calibration_ranges(model, files, fields, max_len, args.calibration_rows)
  return ranges


def load_ranges(path: str, advice: str) -> np.ndarray:
  """float32 [2, E] ranges from a .npy file; anything else (a pickle, text, .npz) is an InputError naming it."""
  try:
    ranges = np.load(path, allow_pickle=False)
    if not isinstance(ranges, np.ndarray) or ranges.ndim != 2 or ranges.shape[0] != 2:
      raise ValueError(f"got {type(ranges).__name__} of shape {getattr(ranges, 'shape', '?')}")
    return ranges.astype(np.float32)
  except (OSError, ValueError, TypeError) as e:
    raise embed_io.InputError(f"{path}: expected a NumPy .npy array of shape [2, E], the per-dimension min and max "
                              f"({type(e).__name__}: {e}); {advice}.") from e


def save_ranges(out_dir: str, ranges: np.ndarray) -> None:
  """Stores the job's int8/uint8 ranges next to its parts (atomically)."""
  saved = os.path.join(out_dir, RANGES_FILE)
  tmp = f"{saved}.tmp-{os.getpid()}.npy"
  np.save(tmp, ranges, allow_pickle=False)
  os.replace(tmp, saved)
