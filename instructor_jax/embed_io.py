"""Input side of the embed job: finding, counting and parsing JSONL / Parquet / CSV / TSV / text rows.

Every input row occupies one *slot*: its 0-based position in the concatenation of all input files
(globs expanded and sorted, files in the order given). JSONL and text files have one slot per
physical line (blank lines included, so slots never depend on the error policy), CSV/TSV one per
data row after the header, Parquet one per row. Slots define the output parts and, when no
`--id-field` is given, the ids.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import json
import os
import re
import zlib
from typing import Any, Callable, Iterator

FORMATS = ("jsonl", "parquet", "csv", "tsv", "tsv-unquoted", "text")
DELIMITED = ("csv", "tsv", "tsv-unquoted")
_EXTENSIONS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet",
               ".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".txt": "text", ".text": "text"}
# Reasons a row is skipped. `blank_line` (an empty line in a JSONL/CSV file) is always skipped and
# counted, never an error: editors and `cat` leave them behind. `unreadable_file` is a whole file's,
# counted apart from rows (the manifest's `unreadable_files`).
REASONS = ("unreadable_file", "blank_line", "malformed_json", "malformed_row", "invalid_utf8", "missing_text",
           "non_string_text", "empty_text", "missing_instruction", "non_string_instruction", "missing_id",
           "bad_id", "duplicate_id")
_COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".zip", ".lz4")
_JSON_ARRAY_HINT = (" (a JSON array rather than JSON Lines? write one object per line, e.g. "
                    "`jq -c '.[]' FILE > FILE.jsonl`)")
_CHUNK = 1 << 24
_BOM = b"\xef\xbb\xbf"
# Texts can be long; the csv module's default 128 KiB field limit would reject them.
csv.field_size_limit(2**31 - 1)


class InputError(ValueError):
  """Bad input under `--on-error fail`; the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class Fields:
  """How to read a row: which fields hold text / instruction / id, and the fixed instruction."""

  text: str = "text"
  instruction: str | None = None  # per-row instruction field
  id: str | None = None
  id_type: str = "int"  # "int" or "str"; positional ids are always int
  fixed_instruction: str | None = None  # --instruction: for every row (or rows without the field)


@dataclasses.dataclass(frozen=True)
class InputFile:
  path: str
  format: str
  size: int
  rows: int  # slots
  first_slot: int
  checksum: str  # `scan_file`'s: an edit that keeps size and rows still changes it


@dataclasses.dataclass(frozen=True)
class Row:
  """A valid input row."""

  slot: int
  id: Any
  instruction: str | None
  text: str
  where: str = ""  # as BadRow's: errors found only when the row is tokenised name it


@dataclasses.dataclass(frozen=True)
class BadRow:
  slot: int
  reason: str
  where: str  # "file:line" or "file: row N"
  detail: str

  def message(self) -> str:
    return f"{self.where}: {self.detail} [{self.reason}]"


# ---- planning ------------------------------------------------------------------------------------

def expand_inputs(patterns: list[str]) -> list[tuple[str, str | None]]:
  """(path, problem or None) per input; globs expand sorted, a pattern matching nothing is a problem.

  A path that exists is that file, even if its name holds glob characters (`data[1].jsonl`): read as
  a pattern it would match another file (`data1.jsonl`), or none. A file named twice (a glob and the
  file itself, or a link to it) is refused: its rows would be embedded twice."""
  out: list[tuple[str, str | None]] = []
  named: dict[tuple[int, int], tuple[str, str]] = {}  # (device, inode) -> (path, the argument naming it)
  for pattern in patterns:
    if os.path.isdir(pattern):
      found = [(pattern, "is a directory; pass the files (or a glob such as DIR/*.jsonl)")]
    elif os.path.exists(pattern) or not glob.has_magic(pattern):
      found = [(pattern, None)]
    else:
      matches = sorted(p for p in glob.glob(pattern, recursive=True) if not os.path.isdir(p))
      found = [(p, None) for p in matches] or [(pattern, "the pattern matches no file")]
    for path, problem in found:
      if problem is None and os.path.exists(path):
        st = os.stat(path)
        key = (st.st_dev, st.st_ino)
        if key in named:
          raise InputError(f"--input names the file {named[key][0]} twice, as {_named_as(*named[key])} and as "
                           f"{_named_as(path, pattern)}: its rows would be embedded twice. Name each file once.")
        named[key] = (path, pattern)
    out += found
  return out


def _named_as(path: str, argument: str) -> str:
  return repr(argument) if argument == path else f"{argument!r} (matching {path})"


def detect_format(path: str, forced: str | None) -> str:
  """The input format from `--input-format` or the extension."""
  ext = os.path.splitext(path)[1].lower()
  if ext in _COMPRESSED:
    raise InputError(f"{path}: compressed inputs are not read; decompress it first (e.g. `gunzip -k`, "
                     "`zstd -d`), or write Parquet, which compresses internally.")
  if forced and forced != "auto":
    return forced
  if ext not in _EXTENSIONS:
    raise InputError(f"{path}: cannot tell the input format from the extension {ext!r}; expected one of "
                     f"{sorted(_EXTENSIONS)}, or pass --input-format {{{','.join(FORMATS)}}}.")
  return _EXTENSIONS[ext]


def scan_file(path: str, fmt: str) -> tuple[int, str]:
  """(slots, checksum) of one file, reading it once (CSV/TSV twice: rows need the csv module's parse).

  The checksum is a CRC-32 of every byte, so that an edit keeping the size and row count still
  shows. Parquet is read whole for it too (its rows come from the footer): a footer-only check
  misses a same-length edit of an uncompressed file, whose sizes and statistics stay the same
  (tested), and of a compressed one whenever the compressed page size happens not to change.
  """
  crc, lines, last = 0, 0, b"\n"
  with open(path, "rb") as f:
    while chunk := f.read(_CHUNK):
      crc = zlib.crc32(chunk, crc)
      lines += chunk.count(b"\n")
      last = chunk[-1:]
  checksum = f"crc32:{crc:08x}"
  if fmt == "parquet":
    import pyarrow.parquet as pq
    return pq.ParquetFile(path).metadata.num_rows, checksum
  if fmt in DELIMITED:
    return sum(1 for _ in _csv_rows(path, fmt)), checksum
  return lines + (last != b"\n"), checksum


def plan_inputs(patterns: list[str], forced_format: str | None,
                on_error: str) -> tuple[list[InputFile], list[BadRow]]:
  """Resolves, checks and counts every input; unreadable files raise or become skipped entries."""
  files: list[InputFile] = []
  unreadable: list[BadRow] = []
  slot = 0
  for path, problem in expand_inputs(patterns):
    try:
      if problem:
        raise OSError(problem)
      fmt = detect_format(path, forced_format)
      rows, checksum = scan_file(path, fmt)
    except (OSError, UnicodeDecodeError, csv.Error, ValueError) as e:
      if isinstance(e, InputError):
        raise
      bad = BadRow(-1, "unreadable_file", path, f"cannot read the file ({type(e).__name__}: {e})")
      if on_error == "fail":
        raise InputError(f"{bad.message()}. Fix or remove it, or pass --on-error skip to skip it.") from e
      unreadable.append(bad)
      continue
    files.append(InputFile(path, fmt, os.path.getsize(path), rows, slot, checksum))
    slot += rows
  return files, unreadable


# ---- raw rows ------------------------------------------------------------------------------------

def _csv_rows(path: str, fmt: str) -> Iterator[tuple[int, list[str], list[str]]]:
  """(first line number, header, row) per data row; undecodable bytes kept as surrogates.

  csv and tsv follow Python's csv module (quoted fields may hold delimiters, newlines and doubled
  quotes), strictly: a stray quote is an error naming the line, where the lenient default silently
  glued following lines into one field. tsv-unquoted is one row per line, split on tabs, quotes
  being literal text (GLUE / STS / MSRP files).
  """
  # utf-8-sig: spreadsheet exports start with a byte-order mark, which would otherwise become part of
  # the first header name (and the text field would be "missing" on every row).
  with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
    lines = _Lines(f)
    if fmt == "tsv-unquoted":
      reader = csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE)
    else:
      reader = csv.reader(lines, delimiter="\t" if fmt == "tsv" else ",", strict=True)
    hint = (" If quotes in this file are literal text rather than CSV quoting, pass --input-format "
            "tsv-unquoted." if fmt == "tsv" else "")
    try:
      header = next(reader, None)
    except csv.Error as e:
      raise csv.Error(f"line 1 (the header): {e}.{hint}") from e
    if header is None:
      return
    while True:
      line, lines.record = lines.count + 1, []
      try:
        row = next(reader)
      except StopIteration:
        return
      except csv.Error as e:  # one bad row, not a bad file: reading goes on after it
        # The reader resumes at the next line; if the bad row left a quoted field open, the lines up to
        # the quote that closes it are still that field, not rows of their own.
        text = "".join(lines.record)
        while text.count('"') % 2 and (more := next(lines, None)) is not None:
          text += more
        span = f"; lines {line}-{lines.count} belong to it" if lines.count > line else ""
        row = Unparsable(f"{e} (a quote that does not open or close a quoted field{span}).{hint}")
      yield line, header, row


class _Lines:
  """The file's physical lines, counted, with those read since `record` was last reset."""

  def __init__(self, f):
    self.f, self.count, self.record = f, 0, []

  def __iter__(self):
    return self

  def __next__(self) -> str:
    line = next(self.f)
    self.count += 1
    self.record.append(line)
    return line


class Unparsable(str):
  """A CSV/TSV row the csv module refused: the reason, in place of the row's fields."""


def _parquet_rows(f: InputFile, columns: list[str],
                  skip: Callable[[int, int], bool]) -> Iterator[tuple[InputFile, int, str, Any]]:
  import pyarrow.parquet as pq
  pf = pq.ParquetFile(f.path)
  names = pf.schema_arrow.names
  present = [c for c in columns if c in names]
  slot = f.first_slot
  for group in range(pf.metadata.num_row_groups):
    n = pf.metadata.row_group(group).num_rows
    if skip(slot, n):  # row groups nobody here needs are not even decoded
      slot += n
      continue
    for batch in pf.iter_batches(batch_size=8192, row_groups=[group], columns=present or names[:1]):
      for rec in batch.to_pylist():
        rec = {k: rec[k] for k in present}
        rec["__columns__"] = names
        yield f, slot, f"{f.path}: row {slot - f.first_slot + 1}", rec
        slot += 1


def iter_raw(files: list[InputFile], columns: list[str], skip: Callable[[int, int], bool] | None = None
             ) -> Iterator[tuple[InputFile, int, str, Any]]:
  """(file, slot, where, raw) per slot in input order; raw is bytes, a CSV (header, row) or a dict.

  `skip(first_slot, count)` may declare a range unneeded: whole files and Parquet row groups in such
  ranges are not read (their slots are simply not yielded).
  """
  skip = skip or (lambda first, count: False)
  for f in files:
    slot = f.first_slot
    if skip(f.first_slot, f.rows):
      continue
    if f.format == "parquet":
      yield from _parquet_rows(f, columns, skip)
      continue
    if f.format in DELIMITED:
      for line, header, row in _csv_rows(f.path, f.format):
        # Both units: editors count lines, dataframes count data rows (quoted newlines and the header
        # make them differ), and messages naming another row, such as a duplicate id's first use, give its data row.
        yield f, slot, f"{f.path}:{line} (data row {slot - f.first_slot + 1})", (header, row)
        slot += 1
    else:
      with open(f.path, "rb") as fh:
        for line in fh:
          if slot == f.first_slot and line.startswith(_BOM):
            line = line[len(_BOM):]  # a UTF-8 byte-order mark is not part of the first row
          yield f, slot, f"{f.path}:{slot - f.first_slot + 1}", line
          slot += 1
    if slot != f.first_slot + f.rows:
      raise InputError(f"{f.path}: had {f.rows} rows when the job started and {slot - f.first_slot} now; "
                       "an input changed during the run. Rerun once the inputs are final.")


# ---- parsing -------------------------------------------------------------------------------------

def _bad(slot: int, where: str, reason: str, detail: str) -> BadRow:
  return BadRow(slot, reason, where, detail)


def _record_from_raw(fmt: str, slot: int, where: str, raw: Any) -> dict | BadRow | str:
  """A field dict, a BadRow, or (text format) the line itself."""
  if fmt in ("jsonl", "text"):
    try:
      line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
      return _bad(slot, where, "invalid_utf8", f"invalid UTF-8 at byte {e.start} of the line")
    line = line.rstrip("\n").rstrip("\r")
    if fmt == "text":
      return line
    if not line.strip():
      return _bad(slot, where, "blank_line", "blank line")
    try:
      rec = json.loads(line)
    except json.JSONDecodeError as e:
      hint = _JSON_ARRAY_HINT if line.lstrip().startswith("[") else ""
      return _bad(slot, where, "malformed_json", f"malformed JSON at column {e.colno}: {e.msg}{hint}")
    if not isinstance(rec, dict):
      hint = _JSON_ARRAY_HINT if isinstance(rec, list) and rec and isinstance(rec[0], dict) else ""
      return _bad(slot, where, "malformed_json", f"expected a JSON object per line, got {type(rec).__name__}{hint}")
    return rec
  if fmt in DELIMITED:
    header, row = raw
    if isinstance(row, Unparsable):
      return _bad(slot, where, "malformed_row", str(row))
    if not row or (len(row) == 1 and not row[0].strip()):
      return _bad(slot, where, "blank_line", "blank line")
    if len(row) != len(header):
      return _bad(slot, where, "malformed_row", f"{len(row)} fields, but the header has {len(header)}")
    # A CSV/TSV cell cannot be null: a blank one is the null of JSONL and Parquet (missing_text,
    # missing_instruction or the --instruction default, missing_id), not an empty string or id "".
    return {name: cell if cell != "" else None for name, cell in zip(header, row)}
  return raw


def _field(rec: dict, name: str) -> tuple[bool, Any]:
  return (name in rec and rec[name] is not None), rec.get(name)


def _absent(fmt: str, rec: dict, what: str, name: str) -> str:
  """Why a field is not there: null (a JSON null, an empty Parquet cell, a blank CSV/TSV cell) or missing
  from the record."""
  if name not in rec:
    return f"no {what} field {name!r}"
  return f"{what} field {name!r} is {'a blank cell' if fmt in DELIMITED else 'null'}"


def _known_fields(rec: dict) -> list[str]:
  return list(rec.get("__columns__") or sorted(rec))[:12]


def _a_type(value: Any) -> str:
  """'an int', 'a list': the value's type with its article, for messages."""
  name = type(value).__name__
  return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _check_utf8(value: str) -> bool:
  try:
    value.encode("utf-8")
    return True
  except UnicodeEncodeError:  # lone surrogates: undecodable CSV bytes or "\ud800" escapes in JSON
    return False


_ASCII_INT = re.compile(r"[+-]?[0-9]+")


def _parse_id(fmt: str, rec: dict, fields: Fields, slot: int, where: str) -> Any:
  present, value = _field(rec, fields.id)
  if not present and fields.id not in rec:
    return _bad(slot, where, "missing_id", f"no id field {fields.id!r} (fields: {_known_fields(rec)}); set --id-field")
  if not present:
    return _bad(slot, where, "missing_id", _absent(fmt, rec, "id", fields.id))
  if fields.id_type == "int":
    if isinstance(value, bool) or not isinstance(value, (int, str)):
      return _bad(slot, where, "bad_id", f"id {value!r:.60} is not an integer (--id-type int)")
    # ASCII digits only: int() also reads "1_0" as 10 and "٣" (Arabic-Indic three) as 3.
    if isinstance(value, str) and not _ASCII_INT.fullmatch(value.strip()):
      return _bad(slot, where, "bad_id", f"id {value!r:.60} is not an integer (--id-type int)")
    number = int(value)
    if not -2 ** 63 <= number < 2 ** 63:  # ids are stored as int64
      return _bad(slot, where, "bad_id", f"id {value!r:.60} does not fit in int64 (--id-type int); use --id-type str")
    return number
  if isinstance(value, bool) or not isinstance(value, (int, str)):
    return _bad(slot, where, "bad_id", f"id {value!r:.60} is {_a_type(value)}; expected a string or integer")
  value = str(value)
  return value if _check_utf8(value) else _bad(slot, where, "invalid_utf8", "the id is not valid UTF-8")


def parse_row(fmt: str, fields: Fields, slot: int, where: str, raw: Any) -> Row | BadRow:
  """Validates one raw row: text present, a non-empty UTF-8 string; instruction and id likewise."""
  rec = _record_from_raw(fmt, slot, where, raw)
  if isinstance(rec, BadRow):
    return rec
  if isinstance(rec, str):  # text format
    if not rec.strip():  # as in JSONL and CSV: skipped and counted, the other lines keep their ids
      return _bad(slot, where, "blank_line", "blank line")
    return Row(slot, slot, fields.fixed_instruction, rec, where)
  present, text = _field(rec, fields.text)
  if not present and fields.text in rec:
    return _bad(slot, where, "missing_text", _absent(fmt, rec, "text", fields.text))
  if not present:
    header = ("; a CSV/TSV file's first line is its header: add one naming the columns if the file has none"
              if fmt in DELIMITED else "")
    return _bad(slot, where, "missing_text", f"no text field {fields.text!r} (fields: {_known_fields(rec)}); "
                f"set --text-field{header}")
  if not isinstance(text, str):
    return _bad(slot, where, "non_string_text", f"text field {fields.text!r} is {_a_type(text)}, "
                "expected a string")
  if not _check_utf8(text):
    return _bad(slot, where, "invalid_utf8", f"text field {fields.text!r} is not valid UTF-8")
  if not text.strip():
    return _bad(slot, where, "empty_text", f"text field {fields.text!r} is empty")
  instruction = fields.fixed_instruction
  if fields.instruction:
    present, value = _field(rec, fields.instruction)
    if present and not isinstance(value, str):
      return _bad(slot, where, "non_string_instruction",
                  f"instruction field {fields.instruction!r} is {_a_type(value)}, expected a string")
    if present and not _check_utf8(value):
      return _bad(slot, where, "invalid_utf8", f"instruction field {fields.instruction!r} is not valid UTF-8")
    if not present and instruction is None:
      return _bad(slot, where, "missing_instruction", f"{_absent(fmt, rec, 'instruction', fields.instruction)} "
                  "(pass --instruction as the default for such rows)")
    instruction = value if present else instruction
  row_id = slot if fields.id is None else _parse_id(fmt, rec, fields, slot, where)
  if isinstance(row_id, BadRow):
    return row_id
  return Row(slot, row_id, instruction, text, where)


def needed_columns(fields: Fields) -> list[str]:
  return [c for c in (fields.text, fields.instruction, fields.id) if c]
