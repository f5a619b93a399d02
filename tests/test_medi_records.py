"""MEDI file validation: bad records skipped and reported exactly, nothing valid dropped, non-MEDI refused."""

import json
import os
import pathlib

import pytest

from instructor_jax import medi_paths, medi_records
from instructor_jax.config import ConfigError, MissingPathError

SAMPLE = pathlib.Path(__file__).parent.parent / "data" / "medi_sample.jsonl"


def _good(i, task="t1", key="task_name"):
  return {"query": ["Represent the question: ", f"question {i}"], "pos": ["", f"answer {i}"],
          "neg": ["Represent the doc: ", f"wrong {i}"], key: task}


# (record, reason it must be skipped for, or None when valid)
CASES = [
    (_good(0), None),
    ([1, 2], "not a JSON object"),
    ({"pos": ["", "a"], "neg": ["", "b"], "task_name": "t1"}, "missing key"),
    ({"query": ["", "a"], "pos": ["", "a"], "neg": ["", "b"]}, "missing key"),
    (dict(_good(4), query=["only one"]), "not an [instruction, text] pair"),
    (dict(_good(5), pos="a plain string"), "not an [instruction, text] pair"),
    (dict(_good(6), neg=["instr", 7]), "not an [instruction, text] pair"),
    (dict(_good(7), pos=["instr", "   \n"]), "empty text"),
    (dict(_good(8), task_name=""), "bad task name"),
    (_good(9, task=42, key="task_id"), None),
    (dict(_good(10), neg=[["i", "first neg"], ["i", "second neg"]]), None),
    (dict(_good(11), query=["", "q"]), None),  # an empty instruction is "no instruction", valid
    (_good(12, task="t2"), None),
    (dict(_good(13), query=["i", ""]), "empty text"),
    (dict(_good(14), task_name=None, task_id="7"), None),
    (dict(_good(15), pos=["", "p \ud83d broken emoji"]), "invalid unicode"),  # legal JSON, not encodable
    (dict(_good(16), task_name="t\udc80"), "invalid unicode"),
]


def _write(path: pathlib.Path, records, jsonl: bool) -> str:
  text = "\n".join(json.dumps(r) for r in records) + "\n" if jsonl else json.dumps(records, indent=1)
  path.write_text(text, encoding="utf-8")
  return str(path)


@pytest.mark.parametrize("jsonl", [False, True])
def test_bad_records_skipped_and_reported_exactly(tmp_path, jsonl, monkeypatch):
  monkeypatch.setattr(medi_records, "_CHUNK", 64)  # exercise the streaming refills
  path = _write(tmp_path / ("m.jsonl" if jsonl else "m.json"), [c[0] for c in CASES], jsonl)
  lines = []
  tasks, report = medi_records.read_medi(path, log=lines.append)
  expected_bad = {}
  for i, (_, reason) in enumerate(CASES):
    if reason:
      expected_bad.setdefault(reason, []).append(i)
  assert dict(report.skipped) == {r: len(ix) for r, ix in expected_bad.items()}
  assert report.examples == expected_bad
  valid = [i for i, (_, reason) in enumerate(CASES) if reason is None]
  assert sorted(r.index for recs in tasks.values() for r in recs) == valid
  assert report.valid == len(valid) and report.total == len(CASES)
  assert sorted(tasks) == ["42", "7", "t1", "t2"]
  assert tasks["t1"][1].neg == ("i", "first neg") and report.extra_negatives == 1
  for reason, ix in expected_bad.items():
    assert any(f"record {ix[0]} ({reason})" in line for line in lines), (reason, lines)
  assert f"skipped {len(expected_bad['missing key'])} (missing key); first: [2, 3]" in lines[-1]


def test_invalid_jsonl_line_is_skipped_with_its_line_number(tmp_path):
  path = tmp_path / "m.jsonl"
  path.write_text(json.dumps(_good(0)) + "\n{not json\n\n" + json.dumps(_good(2)) + "\n")
  lines = []
  tasks, report = medi_records.read_medi(str(path), log=lines.append)
  assert report.skipped == {"invalid JSON": 1} and report.examples == {"invalid JSON": [1]}
  assert [r.index for r in tasks["t1"]] == [0, 2]
  assert lines[0].startswith(f"{path}:2: skipping record 1 (invalid JSON)")


def test_jsonl_skips_name_the_line_of_every_reason(tmp_path):
  """Blank lines make record numbers drift from line numbers; messages give the line an editor jumps to."""
  path = tmp_path / "m.jsonl"
  bad = [{"x": 1}, dict(_good(1), pos=["i", " "])]
  path.write_text("\n".join([json.dumps(_good(0)), "", json.dumps(bad[0]), "", json.dumps(bad[1])]) + "\n")
  lines = []
  medi_records.read_medi(str(path), log=lines.append)
  assert lines[0].startswith(f"{path}:3: skipping record 1 (missing key)")
  assert lines[1].startswith(f"{path}:5: skipping record 2 (empty text)")


@pytest.mark.parametrize("jsonl", [False, True])
def test_bytes_that_are_not_utf8_skip_their_record_only(tmp_path, jsonl):
  """A Latin-1 'café' is skipped and counted like any bad record (JSONL: with its line), not a crash."""
  records = [_good(0), dict(_good(1), pos=["", "café"]), _good(2)]
  dump = lambda x: json.dumps(x, ensure_ascii=False)  # noqa: E731
  text = "\n".join(map(dump, records)) + "\n" if jsonl else dump(records)
  path = tmp_path / ("m.jsonl" if jsonl else "m.json")
  path.write_bytes(text.encode("latin-1"))
  lines = []
  tasks, report = medi_records.read_medi(str(path), log=lines.append)
  assert [r.index for r in tasks["t1"]] == [0, 2] and report.skipped == {"invalid unicode": 1}
  where = f"{path}:2:" if jsonl else f"{path}:"
  assert lines[0].startswith(f"{where} skipping record 1 (invalid unicode): pos text") and "UTF-8" in lines[0]


def test_any_amount_of_leading_whitespace(tmp_path, monkeypatch):
  monkeypatch.setattr(medi_records, "_CHUNK", 64)  # several whitespace-only chunks before the '['
  path = tmp_path / "m.json"
  path.write_text(" " * 100_000 + "\n" + json.dumps([_good(0)]))
  assert medi_records.read_medi(str(path), log=lambda _: None)[1].valid == 1


def test_pretty_printed_jsonl_gets_a_hint(tmp_path):
  path = tmp_path / "m.jsonl"
  path.write_text(json.dumps({"data": [_good(0), _good(1)]}, indent=2))
  with pytest.raises(medi_records.MediFormatError, match="one whole JSON object per line"):
    medi_records.read_medi(str(path), log=lambda _: None)


def test_home_directory_is_expanded(tmp_path, monkeypatch):
  monkeypatch.setenv("HOME", str(tmp_path))
  _write(tmp_path / "medi-data.json", [_good(0)], False)
  assert medi_paths.resolve_medi_file("~/medi-data.json") == str(tmp_path / "medi-data.json")


def test_only_the_first_few_offenders_are_printed_but_all_counted(tmp_path):
  records = [dict(_good(i), pos=["", ""]) if i % 2 else _good(i) for i in range(40)]
  lines = []
  _, report = medi_records.read_medi(_write(tmp_path / "m.json", records, False), log=lines.append)
  assert report.skipped == {"empty text": 20}
  assert report.examples["empty text"] == [1, 3, 5, 7, 9][: medi_records.SHOW_FIRST]
  assert sum("skipping record" in line for line in lines) == medi_records.SHOW_FIRST


def test_streaming_parse_equals_json_load(tmp_path, monkeypatch):
  monkeypatch.setattr(medi_records, "_CHUNK", 97)
  records = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines()[:300]]
  records[5]["query"][1] = "unicode ünïcödé — 東京 🙂, \"quoted\", [brackets], {braces}"
  path = _write(tmp_path / "m.json", records, False)
  got = [obj for _, _, obj in medi_records._iter_json_array(path)]  # pylint: disable=protected-access
  assert got == json.loads(pathlib.Path(path).read_text(encoding="utf-8"))


@pytest.mark.parametrize("chunk", [5, 7, 11, 16, 1 << 24])
def test_values_cut_at_a_chunk_edge_decode_whole(tmp_path, monkeypatch, chunk):
  """A number (or literal) that ends at a chunk's edge decodes there, shorter: it must be read again, longer."""
  monkeypatch.setattr(medi_records, "_CHUNK", chunk)
  values = [12345678, 1.5e300, True, None, "x", [], {}, -7, 90000, 12]
  path = tmp_path / "m.json"
  path.write_text(json.dumps(values).replace(" ", ""))
  assert [obj for _, _, obj in medi_records._iter_json_array(str(path))] == values  # pylint: disable=protected-access


A = json.dumps(_good(0), ensure_ascii=False)
B = json.dumps(dict(_good(1), pos=["", "東京 ünï"]), ensure_ascii=False)


@pytest.mark.parametrize("chunk", [64, 1 << 24])
@pytest.mark.parametrize("good, bad, message", [  # the error is at the first character of `bad`
    (f"[{A},\r\n {B}]\r\n", f"[{A}]\r\n",
     "unexpected '\\[{\"query.* after the closing ']' of the JSON list of 2 records"),
    (f"[{B}] ", "oops", "unexpected 'oops' after the closing"),
    (f"[{B}\n", f"{A}]", "expected ',' or ']' after record 0, found '{' \\(a missing comma"),
    (f"[{B},\n", f",{A}]", "an extra ',' after record 0"),
    (f"[{B},{A}, ", "]", "a trailing ',' before ']' after record 1"),
    ("[ ", f",{A}]", "an extra ',' after '\\['"),
    (f"[{B},{A},", "", "the JSON list is truncated after record 1"),
    (f"[{B}, {A}", "", "the JSON list is truncated after record 1"),
    (f"[{B},\n{A[:-1]}", "]", "invalid JSON in record 1 \\(Expecting ',' delimiter"),
])
def test_json_syntax_errors_name_their_byte_and_line(tmp_path, monkeypatch, chunk, good, bad, message):
  """Whatever json.load refuses is refused, at the byte and line where it goes wrong (past a BOM, CRLFs and
  non-ASCII text), and before any summary counts a file read in part."""
  monkeypatch.setattr(medi_records, "_CHUNK", chunk)
  with pytest.raises(json.JSONDecodeError):
    json.loads(good + bad)
  path = tmp_path / "m.json"
  path.write_bytes(b"\xef\xbb\xbf" + (good + bad).encode("utf-8"))
  at, line = 3 + len(good.encode("utf-8")), good.count("\n") + 1
  with pytest.raises(medi_records.MediFormatError, match=message) as e:
    medi_records.read_medi(str(path), log=lambda _: None)
  assert str(e.value).startswith(f"{path}: ") and f"at byte {at} (line {line});" in str(e.value)


def test_whitespace_after_the_list_is_fine(tmp_path, monkeypatch):
  monkeypatch.setattr(medi_records, "_CHUNK", 16)
  path = tmp_path / "m.json"
  path.write_text(f"\n[ {A} ,\n\t{B}\r\n]\n" + " \n" * 50)
  assert medi_records.read_medi(str(path), log=lambda _: None)[1].valid == 2


def test_real_sample_is_all_valid():
  tasks, report = medi_records.read_medi(str(SAMPLE), log=lambda _: None)
  assert report.skipped == {} and report.valid == 1905
  assert {t: len(r) for t, r in tasks.items()} == {
      "msrp_paraphrase": 600, "sick_entailment": 600, "sick_relatedness": 454, "trecqa_answers": 251}


@pytest.mark.parametrize("content, message", [
    ("id,text\n1,hello\n", "starts with 'i'"),
    ('{"a": 1}\n{"b": 2}\n', "no valid MEDI record"),
    ('[{"query": ["", "a"], "pos": ["", "b"], "neg": ["", "c"], "task_name": "t"}, {"qu', "truncated|invalid JSON"),
    ("", "starts with ''"),
])
def test_not_medi_at_all_fails_clearly(tmp_path, content, message):
  path = tmp_path / "x.json"
  path.write_text(content)
  with pytest.raises(medi_records.MediFormatError, match=message):
    medi_records.read_medi(str(path), log=lambda _: None)


def test_a_large_non_medi_list_fails_early(tmp_path, monkeypatch):
  monkeypatch.setattr(medi_records, "_PROBE", 10)
  path = _write(tmp_path / "x.json", [{"id": i, "text": "x"} for i in range(100)] + [_good(0)], False)
  with pytest.raises(medi_records.MediFormatError, match="none of the first 10 records"):
    medi_records.read_medi(path, log=lambda _: None)


def test_directory_holding_medi_data_json(tmp_path):
  _write(tmp_path / "medi-data.json", [_good(0)], False)
  (tmp_path / "notes.json").write_text("{}")
  assert medi_paths.resolve_medi_file(str(tmp_path)).endswith("medi-data.json")
  with pytest.raises(FileNotFoundError, match="medi-data.json"):
    medi_paths.resolve_medi_file(str(tmp_path / "missing"))


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  """A local folder standing in for gs://bucket, through the one function that reaches remote storage."""
  from etils import epath
  root = tmp_path / "bucket"
  root.mkdir()
  monkeypatch.setattr(medi_paths, "_remote", lambda p: epath.Path(str(p).replace("gs://bucket", str(root))))
  monkeypatch.setenv("INSTRUCTOR_JAX_CACHE", str(tmp_path / "cache"))
  return root


def test_remote_medi_path_is_downloaded_once(bucket, tmp_path):
  """gs:// paths (pods) are copied to a local cache atomically; folders resolve to their MEDI file."""
  (bucket / "medi").mkdir()
  src = bucket / "medi" / "medi-data.json"
  src.write_text(json.dumps([{"query": ["Represent: ", "q"], "pos": ["Represent: ", "p"], "neg": ["Represent: ", "n"],
                              "task_name": "t"}]))
  local = medi_paths.resolve_medi_file("gs://bucket/medi")
  assert local.startswith(str(tmp_path / "cache")) and open(local).read() == src.read_text()
  mtime = os.path.getmtime(local)
  assert medi_paths.resolve_medi_file("gs://bucket/medi") == local and os.path.getmtime(local) == mtime
  # A changed remote file (another size or modification time) is fetched again.
  src.write_text(src.read_text().replace('"q"', '"a longer query"'))
  assert medi_paths.resolve_medi_file("gs://bucket/medi") == local and open(local).read() == src.read_text()
  assert medi_paths.resolve_medi_file("gs://bucket/medi/medi-data.json").endswith("medi-data.json")
  assert sorted(os.listdir(os.path.dirname(local))) == sorted(  # no temp file left behind
      [os.path.basename(p) + s for p in (local, local.replace("bucket_medi", "bucket_medi_medi-data.json"))
       for s in ("", ".source.json")])
  # The size a resume compares: one stat of the remote file, none for a remote folder.
  assert medi_paths.medi_size("gs://bucket/medi/medi-data.json") == src.stat().st_size
  assert medi_paths.medi_size("gs://bucket/medi") is None


def test_a_missing_remote_file_is_the_missing_path_error_of_a_local_one(bucket, tmp_path):
  """Not a backend's exception (tf.io.gfile's NotFoundError is no OSError) after the model is built."""
  for path in ("gs://bucket/medi-data.json", "gs://bucket/no/such/folder"):
    for find in (medi_paths.locate_medi_file, medi_paths.resolve_medi_file):
      with pytest.raises(MissingPathError, match=f"^{path}: no such MEDI file or directory. Pass the path"):
        find(path)
  assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("names, message", [
    (["a.json", "b.jsonl", "notes.txt"], "expected one of .* found \\['a.json', 'b.jsonl'\\]. Place medi-data.json"),
    ([], "found none"),
    (["dataset_info.json", "features.json", "medi-train.tfrecord-00000-of-00001"],
     "a prepared TFDS dataset .*not the folder holding MEDI's JSON. Pass medi-data.json, or the manual directory"),
    (["dataset_info.json"], "a prepared TFDS dataset"),
])
def test_a_folder_without_one_medi_file_fails_alike_local_and_remote(bucket, tmp_path, names, message):
  """A remote folder used to copy its first JSON file; a prepared TFDS folder is named as one."""
  for folder in (bucket, tmp_path / "local"):
    folder.mkdir(exist_ok=True)
    for name in names:
      (folder / name).write_text("{}")
  errors = []
  for path in ("gs://bucket", str(tmp_path / "local")):
    with pytest.raises(MissingPathError, match=message) as e:
      medi_paths.resolve_medi_file(path)
    errors.append(str(e.value).removeprefix(path))
  assert errors[0] == errors[1] and not (tmp_path / "cache").exists()


def test_an_unwritable_cache_for_a_remote_copy_says_which_setting(bucket, tmp_path, monkeypatch):
  (bucket / "medi-data.json").write_text(json.dumps([_good(0)]))
  (tmp_path / "afile").write_text("")
  monkeypatch.setenv("INSTRUCTOR_JAX_CACHE", str(tmp_path / "afile" / "cache"))  # unwritable, even by root
  with pytest.raises(ConfigError, match="cannot copy the remote MEDI file into .*afile/cache/medi .*INSTRUCTOR_JAX_C"):
    medi_paths.resolve_medi_file("gs://bucket")


def test_a_copy_by_another_host_with_the_same_pid_is_left_alone(bucket, tmp_path):
  """Hosts in containers sharing the cache (NFS) can have the same pid: temp names must not be the pid alone."""
  (bucket / "medi-data.json").write_text(json.dumps([_good(0)]))
  cache = tmp_path / "cache" / "medi" / "bucket_medi-data.json"
  cache.parent.mkdir(parents=True)
  other = pathlib.Path(f"{cache}.tmp{os.getpid()}")
  other.write_text("another host's half-written copy")
  assert open(medi_paths.resolve_medi_file("gs://bucket/medi-data.json")).read() == json.dumps([_good(0)])
  assert other.read_text() == "another host's half-written copy"


def test_medi_size_of_a_file_a_folder_and_a_missing_path(tmp_path):
  path = _write(tmp_path / "medi-data.json", [_good(0)], False)
  assert medi_paths.medi_size(path) == medi_paths.medi_size(str(tmp_path)) == os.path.getsize(path)
  assert medi_paths.medi_size(str(tmp_path / "missing.json")) is None
