"""Reading and validating MEDI files (`medi-data.json`, its JSONL form, the hard-negative release).

A MEDI record is `{"query": [instr, text], "pos": [instr, text], "neg": [instr, text],
"task_name": str}`; some copies carry `task_id` (int or str) instead of `task_name`. The
hard-negative release has the same schema; a `neg` holding a list of pairs is accepted and its
first pair used (counted in the report, never silent).

Bad records (and JSONL lines that are not JSON) are skipped and counted per reason, with the first
few offending indices printed; a file that is not MEDI at all (not a JSON list / JSONL of objects,
or no record with MEDI keys), and a .json list that is not valid JSON (anything after its closing
']' included), raise `MediFormatError`, the latter naming the byte and line. The file is streamed,
so the 2.6 GB release never sits in memory as one JSON document. No TensorFlow here: the trainer
reads MEDI files on machines without it.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import re
from typing import Any, Callable, Iterator, NamedTuple

from instructor_jax.medi_paths import resolve_medi_file

FIELDS = ("query", "pos", "neg")
SHOW_FIRST = 5  # offending indices printed per reason
_CHUNK = 1 << 24
_MAX_RECORD = 1 << 26
_PROBE = 1000  # records without any MEDI key, at the start, before we call the file "not MEDI"
# Lone surrogates: JSON's \ud83d escapes, or bytes that are not UTF-8 (read as surrogateescape).
# Neither can be encoded for the tokenizer or TFDS, so such records are skipped where they are read.
_SURROGATE = re.compile("[\ud800-\udfff]")
_WHITESPACE = re.compile(r"[ \t\n\r]*")  # JSON's own
_COMMA = re.compile(r"[ \t\n\r]*,[ \t\n\r]*")
_SURROGATE_DETAIL = "holds a lone surrogate (a bad \\u escape, or bytes that are not UTF-8); MEDI files must be UTF-8"

Pair = tuple[str, str]


class MediFormatError(ValueError):
  """The file is not a MEDI file at all (as opposed to a MEDI file with a few bad records)."""


class MediRecord(NamedTuple):
  """One valid example; `index` is its 0-based position in the file."""

  query: Pair
  pos: Pair
  neg: Pair
  task: str
  index: int


@dataclasses.dataclass
class ValidationReport:
  """Counts of valid and skipped records, per reason, with the first few skipped indices."""

  path: str
  valid: int = 0
  skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  examples: dict = dataclasses.field(default_factory=dict)
  extra_negatives: int = 0
  per_task: collections.Counter = dataclasses.field(default_factory=collections.Counter)

  @property
  def total(self) -> int:
    return self.valid + sum(self.skipped.values())

  def skip(self, reason: str, index: int, detail: str, log: Callable[[str], None], line: int | None = None) -> None:
    """Counts a skipped record; the first few are logged as `path:line:` (JSONL) or by 0-based record index."""
    self.skipped[reason] += 1
    shown = self.examples.setdefault(reason, [])
    if len(shown) < SHOW_FIRST:
      shown.append(index)
      where = f"{self.path}:{line}" if line is not None else self.path
      log(f"{where}: skipping record {index} ({reason}): {detail}")

  def summary(self) -> str:
    lines = [f"{self.path}: {self.valid} valid records of {self.total} in {len(self.per_task)} tasks; "
             f"{sum(self.skipped.values())} skipped."]
    for reason, n in sorted(self.skipped.items()):
      lines.append(f"  skipped {n} ({reason}); first: {self.examples[reason]}")
    if self.extra_negatives:
      lines.append(f"  {self.extra_negatives} records had several negatives; the first of each was used.")
    return "\n".join(lines)


def _pair(value: Any) -> Pair | None:
  if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(x, str) for x in value):
    return value[0], value[1]
  return None


def _task(obj: dict) -> str | None:
  for key in ("task_name", "task_id"):
    value = obj.get(key)
    if isinstance(value, bool):
      continue
    if isinstance(value, (str, int)) and str(value).strip():
      return str(value)
  return None


def validate_record(obj: Any, index: int, report: ValidationReport,
                    log: Callable[[str], None], line: int | None = None) -> MediRecord | None:
  """A MediRecord, or None after counting the reason it was skipped (`line`: its JSONL line, for messages)."""
  def skip(reason: str, detail: str) -> None:
    report.skip(reason, index, detail, log, line)

  if not isinstance(obj, dict):
    skip("not a JSON object", f"got {type(obj).__name__}")
    return None
  missing = [k for k in FIELDS if k not in obj]
  if "task_name" not in obj and "task_id" not in obj:
    missing.append("task_name|task_id")
  if missing:
    skip("missing key", f"missing {missing}; keys are {sorted(obj)[:8]}")
    return None
  task = _task(obj)
  if task is None:
    skip("bad task name", f"expected a non-empty string or int, got {obj.get('task_name', obj.get('task_id'))!r:.60}")
    return None
  if _SURROGATE.search(task):
    skip("invalid unicode", f"task name {task!r:.60} {_SURROGATE_DETAIL}")
    return None
  pairs = {}
  for key in FIELDS:
    value = obj[key]
    several = key == "neg" and isinstance(value, list) and value and _pair(value[0]) is not None
    pair = _pair(value[0]) if several else _pair(value)
    if pair is None:
      skip("not an [instruction, text] pair", f"{key} = {value!r:.80}")
      return None
    if not pair[1].strip():
      skip("empty text", f"{key} text is empty or whitespace")
      return None
    bad = next((part for part, x in zip(("instruction", "text"), pair) if _SURROGATE.search(x)), None)
    if bad is not None:
      skip("invalid unicode", f"{key} {bad} {_SURROGATE_DETAIL}")
      return None
    pairs[key] = pair
    report.extra_negatives += int(several and len(value) > 1)
  report.valid += 1
  report.per_task[task] += 1
  return MediRecord(pairs["query"], pairs["pos"], pairs["neg"], task, index)


def _first_char(path: str) -> str:
  """The first character after a BOM and whitespace (however much whitespace), or "" for an empty file."""
  with open(path, "rb") as f:
    head = f.read(3).removeprefix(b"\xef\xbb\xbf")
    while True:
      head = head.lstrip(b" \t\r\n")
      if head:
        return head[:1].decode("latin-1")
      head = f.read(1 << 16)
      if not head:
        return ""


def _location(path: str, offset: int) -> str:
  """"byte B (line L)" of the character at `offset` of `path` as `_iter_json_array` decodes it.

  Found by decoding the file again up to there: only an error pays for it, never the parse."""
  with open(path, "rb") as f:
    where = 3 if f.read(3) == b"\xef\xbb\xbf" else 0  # the BOM that utf-8-sig drops
  line = 1
  with open(path, "r", encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
    while offset > 0:
      text = f.read(min(offset, _CHUNK))
      if not text:
        break
      where += len(text.encode("utf-8", "surrogateescape"))
      line, offset = line + text.count("\n"), offset - len(text)
  return f"byte {where} (line {line})"


def _iter_json_array(path: str) -> Iterator[tuple[int, int | None, Any]]:
  """(index, None, object) for each element of a top-level JSON list, reading the file in chunks.

  As strict as `json.load`: one comma between elements, none before the first or after the last,
  and nothing but whitespace after the closing ']' (a second list, from `cat a.json b.json`, is an
  error, not records dropped unseen). Errors name their byte offset and line (`_location`).
  """
  decoder = json.JSONDecoder()
  # newline="": no newline translation, so that a character offset maps back to a byte offset (CR and
  # LF are whitespace to JSON, and neither may appear raw inside a string).
  with open(path, "r", encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
    buf, pos, dropped, eof = "", 0, 0, False  # dropped: characters of the file before buf[0]

    def refill() -> bool:
      """Appends a chunk to what is left of `buf` from `pos` on; False (nothing changed) at the end."""
      nonlocal buf, pos, dropped, eof
      more = f.read(_CHUNK)
      if not more:
        eof = True
        return False
      dropped, buf, pos = dropped + pos, buf[pos:] + more, 0
      return True

    def next_char() -> str:
      """The next character that is not whitespace, at `pos`; "" at the end of the file."""
      nonlocal pos
      while True:
        pos = _WHITESPACE.match(buf, pos).end()
        if pos < len(buf):
          return buf[pos]
        if eof or not refill():
          return ""

    def fail(what: str, at: int, hint: str = "a MEDI .json file is one JSON list of objects ('[{...}, {...}]'); "
             "fix the file there, or re-download it if it was cut short.") -> MediFormatError:
      return MediFormatError(f"{path}: {what} at {_location(path, at)}; {hint}")

    next_char()
    pos += 1  # the '[' (_first_char checked it)
    index, char = 0, next_char()
    while char != "]" or index:  # at index 0, "]" closes an empty list
      if char in ("", ",", "]"):  # where a record must start
        after = f"after record {index - 1}" if index else "after '['"
        what = {"": f"the JSON list is truncated {after}", ",": f"an extra ',' {after}",
                "]": f"a trailing ',' before ']' {after}"}[char]
        raise fail(what, dropped + pos)
      try:
        obj, end = decoder.raw_decode(buf, pos)
      except json.JSONDecodeError as e:
        at = dropped + e.pos
        # No MEDI record is near _MAX_RECORD long: failing with that much text ahead is real.
        if len(buf) - pos > _MAX_RECORD or not refill():
          raise fail(f"invalid JSON in record {index} ({e.msg})", at) from None
        continue
      # A number cut at the chunk's edge ("12|3", "1.5e|+3", "1.|5") decodes as a shorter one: read on.
      if len(buf) - end < 3 and refill():
        continue
      yield index, None, obj
      index, pos = index + 1, end
      if pos > _CHUNK:
        dropped, buf, pos = dropped + pos, buf[pos:], 0
      comma = _COMMA.match(buf, pos)  # the common case, in one match: ", " and the next record's first character
      if comma is not None and comma.end() < len(buf):
        pos = comma.end()
        char = buf[pos]
        continue
      char = next_char()
      if char == "]":
        break
      if char != ",":
        raise fail(f"the JSON list is truncated after record {index - 1}" if not char else
                   f"expected ',' or ']' after record {index - 1}, found {char!r} (a missing comma?)", dropped + pos)
      pos += 1
      char = next_char()
    pos += 1
    if next_char():
      raise fail(f"unexpected {buf[pos:pos + 20]!r} after the closing ']' of the JSON list of {index} records",
                 dropped + pos, "a MEDI .json file is one JSON list and nothing after it; merge two lists joined by "
                 "`cat a.json b.json` into one, or write JSONL (one record per line), which can be joined.")


def _iter_jsonl(path: str, report: ValidationReport,
                log: Callable[[str], None]) -> Iterator[tuple[int, int | None, Any]]:
  """(index, line number, object) for each non-blank line."""
  index = 0
  with open(path, "r", encoding="utf-8-sig", errors="surrogateescape") as f:
    for line_no, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        report.skip("invalid JSON", index, e.msg, log, line_no)
        index += 1
        continue
      yield index, line_no, obj
      index += 1


def iter_medi(path: str, report: ValidationReport | None = None,
              log: Callable[[str], None] = print) -> Iterator[MediRecord]:
  """Valid records of a MEDI .json / .jsonl file (or a directory holding one), streamed."""
  path = resolve_medi_file(path)
  report = report if report is not None else ValidationReport(path)
  report.path = path
  first = _first_char(path)
  if first == "[":
    objects = _iter_json_array(path)
  elif first == "{":
    objects = _iter_jsonl(path, report, log)
  else:
    raise MediFormatError(f"{path}: not a MEDI file; expected a JSON list of records ('[') or JSONL "
                          f"(one '{{' object per line), the file starts with {first!r}.")
  for index, line, obj in objects:
    record = validate_record(obj, index, report, log, line)
    if record is not None:
      yield record
    elif report.valid == 0 and report.total >= _PROBE and set(report.skipped) <= {"missing key", "not a JSON object", "invalid JSON"}:
      raise MediFormatError(f"{path}: not a MEDI file; none of the first {report.total} records has the "
                            f"keys {FIELDS} + task_name/task_id.\n{report.summary()}")
  if report.valid == 0:
    hint = ("\nJSONL holds one whole JSON object per line; a pretty-printed file, or a list wrapped in an "
            "object, is not JSONL: write a top-level JSON list ('[...]') instead."
            if report.skipped["invalid JSON"] * 2 > report.total else "")
    raise MediFormatError(f"{path}: no valid MEDI record; expected objects with {FIELDS} as "
                          f"[instruction, text] pairs and task_name or task_id.\n{report.summary()}{hint}")


def read_medi(path: str, log: Callable[[str], None] = print) -> tuple[dict[str, list[MediRecord]], ValidationReport]:
  """All valid records grouped by task (tasks sorted by name, file order within a task), and the report."""
  report = ValidationReport(path)
  tasks: dict[str, list[MediRecord]] = collections.defaultdict(list)
  for record in iter_medi(path, report, log):
    tasks[record.task].append(record)
  log(report.summary())
  return {t: tasks[t] for t in sorted(tasks)}, report
