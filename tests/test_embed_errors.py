"""Bad input for the embed job: every case fails with file and line, or is skipped and counted."""

import json
import os

import numpy as np
import pytest

from embed_support import base_args, read_output, sentences, tiny_model, write_jsonl
from instructor_jax import embed, embed_manifest, embed_report
from instructor_jax.embed_io import InputError

GOOD = [json.dumps({"id": f"r{i}", "text": f"a good sentence number {i}"}) for i in range(6)]

# name -> (bad JSONL line(s) inserted after line 2 (bytes), reason, expected text in the error)
CASES = {
    "malformed_json": ([b'{"id": "x", "text": "unterminated'], "malformed_json", "malformed JSON"),
    "not_an_object": ([b'["a list"]'], "malformed_json", "expected a JSON object"),
    "missing_text": ([b'{"id": "x", "body": "no text field"}'], "missing_text", "no text field 'text'"),
    "non_string_text": ([b'{"id": "x", "text": 12}'], "non_string_text", "is an int, expected a string"),
    "null_text": ([b'{"id": "x", "text": null}'], "missing_text", "text field 'text' is null"),
    "empty_text": ([b'{"id": "x", "text": "   "}'], "empty_text", "is empty"),
    "invalid_utf8": ([b'{"id": "x", "text": "caf\xe9"}'], "invalid_utf8", "invalid UTF-8"),
    "lone_surrogate": ([b'{"id": "x", "text": "bad \\ud800 escape"}'], "invalid_utf8", "not valid UTF-8"),
    "duplicate_id": ([b'{"id": "r0", "text": "same id as line 1"}'], "duplicate_id", "in.jsonl:1)"),
    "missing_id": ([b'{"text": "no id"}'], "missing_id", "no id field 'id' (fields: ['text']); set --id-field"),
    "null_id": ([b'{"id": null, "text": "null id"}'], "missing_id", "id field 'id' is null"),
}


@pytest.fixture(scope="module")
def model():
  return tiny_model()


def _input(tmp_path, bad_lines):
  lines = [g.encode() for g in GOOD[:2]] + bad_lines + [g.encode() for g in GOOD[2:]]
  path = tmp_path / "in.jsonl"
  path.write_bytes(b"\n".join(lines) + b"\n")
  return str(path)


@pytest.mark.parametrize("case", sorted(CASES))
def test_fail_names_file_and_line(tmp_path, model, case):
  bad, reason, text = CASES[case]
  path = _input(tmp_path, bad)
  with pytest.raises(InputError) as e:
    embed.main(base_args([path], str(tmp_path / "out"), "--id-field", "id"), model=model)
  msg = str(e.value)
  assert f"{path}:3:" in msg and text in msg and f"[{reason}]" in msg and "--on-error skip" in msg


@pytest.mark.parametrize("case", sorted(CASES))
def test_skip_counts_reason(tmp_path, model, case):
  bad, reason, _ = CASES[case]
  path = _input(tmp_path, bad)
  out = str(tmp_path / "out")
  summary = embed.main(base_args([path], out, "--id-field", "id", "--on-error", "skip"), model=model)
  assert summary["skipped"] == {reason: 1} and summary["rows"] == len(GOOD)
  manifest = json.load(open(os.path.join(out, "_manifest.json")))
  assert manifest["rows"]["skipped"] == {reason: 1} and manifest["rows"]["input_slots"] == len(GOOD) + 1
  ids, emb = read_output(out)
  assert ids == [f"r{i}" for i in range(6)]  # the first occurrence of a duplicated id is kept
  np.testing.assert_allclose(emb, model.encode([f"a good sentence number {i}" for i in range(6)]), atol=1e-6)


def test_blank_lines_are_counted_not_fatal(tmp_path, model):
  path = _input(tmp_path, [b"", b"   "])
  summary = embed.main(base_args([path], str(tmp_path / "out"), "--id-field", "id"), model=model)
  assert summary["skipped"] == {"blank_line": 2} and summary["rows"] == 6


@pytest.mark.parametrize("policy", ["fail", "skip"])
def test_unreadable_file(tmp_path, model, policy, capsys):
  good = _input(tmp_path, [])
  missing = str(tmp_path / "missing.jsonl")
  nomatch = str(tmp_path / "nothing-*.jsonl")
  args = base_args([good, missing, nomatch], str(tmp_path / "out"), "--on-error", policy)
  if policy == "fail":
    with pytest.raises(InputError, match=f"{missing}: cannot read the file.*--on-error skip"):
      embed.main(args, model=model)
    return
  summary = embed.main(args, model=model)
  # Files, not rows: counted apart from the skipped rows.
  assert summary["skipped"] == {} and summary["unreadable_files"] == 2 and summary["rows"] == 6
  embed_report.print_summary(summary)
  assert "skipped rows: none; truncated rows: 0; unreadable files skipped: 2\n" in capsys.readouterr().err
  manifest = json.load(open(os.path.join(str(tmp_path / "out"), "_manifest.json")))
  assert [u["path"] for u in manifest["unreadable_files"]] == [missing, nomatch]
  assert manifest["rows"]["skipped"] == {} and manifest["manifest_version"] == 2


def test_text_and_csv_errors_name_lines(tmp_path, model):
  txt = tmp_path / "in.txt"
  txt.write_bytes(b"first\n\nthird \xff\nfourth\n")
  summary = embed.main(base_args([str(txt)], str(tmp_path / "o1"), "--on-error", "skip"), model=model)
  assert summary["skipped"] == {"blank_line": 1, "invalid_utf8": 1}
  ids, _ = read_output(str(tmp_path / "o1"))
  assert ids == [0, 3]  # ids are 0-based positions: line number - 1
  # A blank line is skipped and counted as in JSONL and CSV, even under --on-error fail.
  with pytest.raises(InputError, match=r"in.txt:3: invalid UTF-8"):
    embed.main(base_args([str(txt)], str(tmp_path / "o2")), model=model)
  csv_path = tmp_path / "in.csv"
  csv_path.write_text('text,id\n"multi\nline",1\ntoo,many,fields\n', encoding="utf-8")
  with pytest.raises(InputError, match=r"in.csv:4 \(data row 2\): 3 fields, but the header has 2 \[malformed_row\]"):
    embed.main(base_args([str(csv_path)], str(tmp_path / "o3")), model=model)


def test_parquet_missing_column_and_nulls(tmp_path, model):
  import pyarrow as pa
  import pyarrow.parquet as pq
  path = str(tmp_path / "in.parquet")
  pq.write_table(pa.table({"body": ["one", None, "three"], "n": [1, 2, 3]}), path)
  with pytest.raises(InputError, match=r"in.parquet: row 1: no text field 'text' \(fields: \['body', 'n'\]\)"):
    embed.main(base_args([path], str(tmp_path / "o1")), model=model)
  with pytest.raises(InputError, match=r"in.parquet: row 2: text field 'body' is null \[missing_text\]"):
    embed.main(base_args([path], str(tmp_path / "o3"), "--text-field", "body"), model=model)
  summary = embed.main(base_args([path], str(tmp_path / "o2"), "--text-field", "body", "--on-error", "skip"),
                       model=model)
  assert summary["skipped"] == {"missing_text": 1} and summary["rows"] == 2
  assert read_output(str(tmp_path / "o2"))[0] == [0, 2]


@pytest.mark.parametrize("args,message", [
    (["--buckets", "foo"], "--buckets 'foo': expected comma-separated token counts"),
    (["--max-seq-length", "1"], "--max-seq-length 1: expected >= 2"),
    (["--dtype", "bogus"], "argument --dtype: invalid choice: 'bogus'"),
    (["--int8-ranges", "r.npy"], "--int8-ranges applies to --precision int8 or uint8, not float32"),
    (["--precision", "int8", "--int8-ranges", "nope.npy"], "--int8-ranges nope.npy: no such file"),
    (["--calibration-rows", "1"], "--calibration-rows 1: expected >= 2"),
    (["--rows-per-part", "0"], "--rows-per-part 0: expected a row count >= 1"),
    (["--batch-tokens", "0"], "--batch-tokens 0: expected a token count >= 1"),
    (["--id-type", "str"], "--id-type str needs --id-field"),
    (["--process-index", "1"], "--process-index 1 is not in [0, --process-count 1)"),
    (["--process-index", "2", "--process-count", "2"], "--process-index 2 is not in [0, --process-count 2)"),
    (["--process-count", "0"], "--process-count 0: expected a process count >= 1"),
    (["--process-count", "-2", "--process-index", "0"], "--process-count -2: expected a process count >= 1"),
])
def test_bad_options_stop_before_loading_or_writing(tmp_path, capsys, args, message):
  out = tmp_path / "out"
  with pytest.raises(SystemExit) as e:
    embed.main(["--model", "never/loaded", *base_args([_input(tmp_path, [])], str(out)), *args])
  assert e.value.code == 2 and message in capsys.readouterr().err
  assert not out.exists()


def test_a_job_that_skips_every_row_fails(tmp_path, model):
  """--on-error skip with a mistyped --text-field must not look like success, nor block the fixed command."""
  out = tmp_path / "out"
  with pytest.raises(InputError, match=r"no row was embedded: every row was skipped \(missing_text 6\).*'body'"):
    embed.main(base_args([_input(tmp_path, [])], str(out), "--text-field", "body", "--on-error", "skip"),
               model=model)
  assert not (out / "_manifest.json").exists()  # a pipeline waiting for it must not take this for done
  assert not list(out.glob("part-*")) and not list((out / "_parts").iterdir())  # no empty parts to read
  with pytest.raises(InputError, match=r"no row was embedded"):  # the same mistake again: refused again
    embed.main(base_args([_input(tmp_path, [])], str(out), "--text-field", "body", "--on-error", "skip"),
               model=model)
  assert not (out / "_manifest.json").exists()
  summary = embed.main(base_args([_input(tmp_path, [])], str(out), "--on-error", "skip"), model=model)
  assert summary["rows"] == 6 and (out / "_manifest.json").exists()
  # Plain text has no fields: the message names the file instead of --text-field.
  blanks = tmp_path / "blanks.txt"
  blanks.write_text("\n \n")
  with pytest.raises(InputError, match=r"blanks.txt: no row was embedded: every row was skipped \(blank_line 2\); "
                                       r"the plain-text inputs hold no non-blank line"):
    embed.main(base_args([str(blanks)], str(tmp_path / "o2"), "--on-error", "skip"), model=model)
  # Nor is a JSONL file of blank lines told to check --text-field: no field was read.
  blanks = tmp_path / "blanks.jsonl"
  blanks.write_text("\n \n")
  with pytest.raises(InputError, match=r"blanks.jsonl: no row was embedded: every row was skipped \(blank_line 2\); "
                                       r"the inputs hold no non-blank line\."):
    embed.main(base_args([str(blanks)], str(tmp_path / "o3")), model=model)


@pytest.mark.parametrize("precision", ["float32", "int8"])
def test_a_job_that_failed_before_its_first_part_takes_the_corrected_command(tmp_path, model, capsys, precision):
  """--on-error fail stops at a bad row after `_job.json` is written; the fixed input is another job's
  identity, but nothing was committed, so the job is forgotten and the rerun the message asks for runs."""
  good = [{"id": i, "text": s} for i, s in enumerate(sentences(6))]
  path = tmp_path / "in.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in good[:3]) + "{not json\n" +
                  "".join(json.dumps(r) + "\n" for r in good[3:]), encoding="utf-8")
  out = tmp_path / "out"
  args = base_args([str(path)], str(out), "--precision", precision)
  with pytest.raises(InputError, match=r"in.jsonl:4"):
    embed.main(args, model=model)
  assert not (out / "_job.json").exists() and not (out / "_int8_ranges.npy").exists()
  assert not list(out.glob("part-*"))
  path.write_text("".join(json.dumps(r) + "\n" for r in good), encoding="utf-8")  # fixed
  summary = embed.main(args, model=model)
  assert summary["rows"] == 6 and (out / "_manifest.json").exists()
  # Once a part is committed, a different job is refused as before.
  path.write_text("".join(json.dumps(r) + "\n" for r in good[:5]), encoding="utf-8")
  with pytest.raises(embed_manifest.OutputMismatchError, match="different embedding job"):
    embed.main(args, model=model)


def test_an_output_directory_holding_other_files_is_refused(tmp_path, model):
  """Writing parts beside unrelated files (here the job's own input) would leave a directory that no
  Parquet reader can read as one dataset."""
  path = tmp_path / "in.jsonl"
  path.write_text("".join(json.dumps({"text": s}) + "\n" for s in sentences(3)), encoding="utf-8")
  for extra in ([], ["--overwrite"]):
    with pytest.raises(InputError, match=r"holds files an embed job did not write \(in.jsonl\); pass a new"):
      embed.main(base_args([str(path)], str(tmp_path), *extra), model=model)
  assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]
  # A name merely starting with "part-" is not a part either (a Parquet reader fails on it).
  out = tmp_path / "out"
  (out / "part-sub").mkdir(parents=True)
  (out / "part-notes.txt").write_text("hi")
  with pytest.raises(InputError, match=r"did not write \(part-notes.txt, part-sub\)"):
    embed.main(base_args([str(path)], str(out)), model=model)
  # The job's own files are accepted on a rerun.
  (out / "part-sub").rmdir()
  (out / "part-notes.txt").unlink()
  embed.main(base_args([str(path)], str(out)), model=model)
  embed.main(base_args([str(path)], str(out)), model=model)


@pytest.mark.parametrize("body", ["", "text,id\n"])
def test_an_input_without_data_rows_fails_before_writing(tmp_path, model, body):
  path = tmp_path / "in.csv"
  path.write_text(body, encoding="utf-8")
  with pytest.raises(InputError, match=r"in.csv: no data rows to embed"):
    embed.main(base_args([str(path)], str(tmp_path / "out")), model=model)
  assert not (tmp_path / "out").exists()


def test_tsv_quotes_are_csv_quoting_strictly_or_literal_text_on_request(tmp_path, model):
  """GLUE/STS/MSRP TSVs hold literal quotes: read as CSV quoting they silently merged rows. A stray
  quote is now an error naming the line, and --input-format tsv-unquoted reads such files."""
  texts = ['"Hello" he said, twice', 'plain text', '"an opening quote only', 'a "quoted" middle']
  path = tmp_path / "in.tsv"
  path.write_text("id\ttext\n" + "".join(f"{i}\t{t}\n" for i, t in enumerate(texts)), encoding="utf-8")
  with pytest.raises(InputError, match=r"in.tsv:2 \(data row 1\): .*expected after '\"'.*--input-format tsv-unquoted"):
    embed.main(base_args([str(path)], str(tmp_path / "o1")), model=model)
  # Under --on-error skip a bad row is a malformed row and reading goes on; the unclosed quote of line 4
  # swallows line 5 into the same bad row (said in its message), so one good row is left.
  skipped = embed.main(base_args([str(path)], str(tmp_path / "o3"), "--on-error", "skip"), model=model)
  assert skipped["skipped"] == {"malformed_row": 2} and skipped["rows"] == 1
  assert read_output(str(tmp_path / "o3"))[0] == [1]
  from instructor_jax import embed_io
  rows = list(embed_io._csv_rows(str(path), "tsv"))
  assert [line for line, _, _ in rows] == [2, 3, 4]
  assert isinstance(rows[2][2], embed_io.Unparsable) and "lines 4-5 belong to it" in rows[2][2]
  # A bad line inside a quoted field: the field's next lines belong to the bad row, not to new rows.
  mid = tmp_path / "mid.csv"
  mid.write_bytes(b'id,text\r\n10,"he said "hi" to me\r\nsecond line",x\r\n20,ok\r\n')
  assert [(line, list(row) if not isinstance(row, str) else "bad") for line, _, row in
          embed_io._csv_rows(str(mid), "csv")] == [(2, "bad"), (4, ["20", "ok"])]
  out = str(tmp_path / "o2")
  summary = embed.main(base_args([str(path)], out, "--input-format", "tsv-unquoted"), model=model)
  assert summary["rows"] == 4
  ids, emb = read_output(out)
  np.testing.assert_allclose(emb, model.encode(texts), atol=1e-6)
  assert ids == [0, 1, 2, 3]


def test_integer_ids_beyond_int64_are_bad_ids_not_a_crash(tmp_path, model):
  path = tmp_path / "big.jsonl"
  path.write_text('{"id": 1, "text": "a cat"}\n{"id": 100000000000000000000000, "text": "a dog"}\n')
  with pytest.raises(InputError, match=r"big.jsonl:2: id 100000000000000000000000 does not fit in int64"):
    embed.main(base_args([str(path)], str(tmp_path / "o1"), "--id-field", "id", "--id-type", "int"), model=model)
  summary = embed.main(base_args([str(path)], str(tmp_path / "o2"), "--id-field", "id", "--id-type", "int",
                                 "--on-error", "skip"), model=model)
  assert summary["skipped"] == {"bad_id": 1} and summary["rows"] == 1


def test_integer_ids_are_ascii_digits(tmp_path, model):
  """int() reads "1_0" as 10 and an Arabic-Indic digit as 3: such ids are bad ids, not silent aliases."""
  path = tmp_path / "ids.csv"
  path.write_text("id,text\n10,a cat\n1_0,a dog\n\u0663,a bird\n+3,a fish\n", encoding="utf-8")
  summary = embed.main(base_args([str(path)], str(tmp_path / "o"), "--id-field", "id", "--id-type", "int",
                                 "--on-error", "skip"), model=model)
  assert summary["skipped"] == {"bad_id": 2} and read_output(str(tmp_path / "o"))[0] == [10, 3]


@pytest.mark.parametrize("kind", ["text", "pickle", "npz", "vector"])
def test_int8_ranges_that_are_no_npy_array_stop_before_loading(tmp_path, capsys, kind):
  ranges = tmp_path / "r.npy"
  if kind == "text":
    ranges.write_text("min,max\n")
  elif kind == "pickle":
    np.save(ranges, np.array([{"min": 0}], dtype=object), allow_pickle=True)
  elif kind == "npz":
    np.savez(ranges, np.zeros((2, 4)))
    os.replace(str(ranges) + ".npz", ranges)
  else:
    np.save(ranges, np.zeros(8))
  out = tmp_path / "out"
  with pytest.raises(SystemExit) as e:
    embed.main(["--model", "never/loaded", *base_args([_input(tmp_path, [])], str(out)), "--precision", "int8",
                "--int8-ranges", str(ranges)])
  err = capsys.readouterr().err
  assert e.value.code == 2 and f"error: --int8-ranges {ranges}: expected a NumPy .npy array of shape [2, E]" in err
  assert "Traceback" not in err and not out.exists()


def test_output_that_is_a_file_and_compressed_or_array_inputs_are_explained(tmp_path, model):
  src = _input(tmp_path, [])
  (tmp_path / "afile").write_text("x")
  with pytest.raises(InputError, match=r"--output .*afile is a file; pass a directory"):
    embed.main(base_args([src], str(tmp_path / "afile")), model=model)
  with pytest.raises(InputError, match=r"--output .*afile/out: cannot create the directory \(Not a directory: "):
    embed.main(base_args([src], str(tmp_path / "afile" / "out")), model=model)
  (tmp_path / "in.jsonl.gz").write_bytes(b"\x1f\x8b")
  with pytest.raises(InputError, match=r"in.jsonl.gz: compressed inputs are not read"):
    embed.main(base_args([str(tmp_path / "in.jsonl.gz")], str(tmp_path / "o1")), model=model)
  array = tmp_path / "array.json"
  array.write_text('[\n  {"text": "a"},\n  {"text": "b"}\n]\n')
  with pytest.raises(InputError, match=r"array.json:1: .*a JSON array rather than JSON Lines"):
    embed.main(base_args([str(array)], str(tmp_path / "o2")), model=model)


def test_csv_duplicate_id_names_the_first_data_row(tmp_path, model):
  path = tmp_path / "dup.csv"
  path.write_text("id,text\nx1,hello\nx2,world\nx1,again\n", encoding="utf-8")
  with pytest.raises(InputError, match=r"dup.csv:4 \(data row 3\): duplicate id 'x1' \(first used at .*dup.csv: data row 1\)"):
    embed.main(base_args([str(path)], str(tmp_path / "out"), "--id-field", "id"), model=model)


@pytest.mark.parametrize("option", [["--id-field", "id"], ["--text-field", "sentence"], ["--text-field", "text"],
                                    ["--instruction-field", "instruction"]])
def test_text_input_rejects_field_options(tmp_path, model, option):
  """A field option on a plain-text input would otherwise be ignored silently."""
  path = tmp_path / "in.txt"
  path.write_text("a\nb\n")
  with pytest.raises(InputError, match=f"plain-text inputs .*{option[0]}"):
    embed.main(base_args([str(path)], str(tmp_path / "out"), *option), model=model)


def test_text_field_applies_to_the_structured_inputs_beside_plain_text(tmp_path, model):
  (tmp_path / "a.txt").write_text("one line\nanother line\n")
  (tmp_path / "b.jsonl").write_text(json.dumps({"body": "a third text"}) + "\n")
  summary = embed.main(base_args([str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")], str(tmp_path / "out"),
                                 "--text-field", "body"), model=model)
  assert summary["rows"] == 3


def test_a_headerless_tsv_is_explained(tmp_path, model):
  """SemEval STS files have no header: their first row is taken as one, which the error must say."""
  path = tmp_path / "sts.tsv"
  path.write_text("4.5\tA man is playing a guitar.\tA man plays the guitar.\n0.5\tA cat.\tA plane.\n")
  with pytest.raises(InputError, match=r"no text field 'text' \(fields: \['4.5', .*set --text-field; a CSV/TSV "
                                       r"file's first line is its header"):
    embed.main(base_args([str(path)], str(tmp_path / "out"), "--input-format", "tsv-unquoted"), model=model)


def test_an_empty_jsonl_is_not_told_about_csv_headers(tmp_path, model):
  path = tmp_path / "in.jsonl"
  path.write_text("")
  with pytest.raises(InputError, match=r"in.jsonl: no data rows to embed\.$"):
    embed.main(base_args([str(path)], str(tmp_path / "out")), model=model)


def test_unknown_extension_is_explained(tmp_path, model):
  path = tmp_path / "in.dat"
  path.write_text("x\n")
  with pytest.raises(InputError, match="--input-format"):
    embed.main(base_args([str(path)], str(tmp_path / "out")), model=model)


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "txt"])
def test_utf8_byte_order_mark_is_not_part_of_the_first_row(tmp_path, model, fmt):
  """Spreadsheet exports start with a BOM: the header / first line must still read as written."""
  texts = [f"a good sentence number {i}" for i in range(4)]
  body = {"csv": "text,other\n" + "".join(f"{t},{i}\n" for i, t in enumerate(texts)),
          "jsonl": "".join(json.dumps({"text": t}) + "\n" for t in texts),
          "txt": "".join(t + "\n" for t in texts)}[fmt]
  path = tmp_path / f"in.{fmt}"
  path.write_bytes(b"\xef\xbb\xbf" + body.encode())
  out = str(tmp_path / "out")
  summary = embed.main(base_args([str(path)], out), model=model)
  assert summary["rows"] == 4 and summary["skipped"] == {}
  np.testing.assert_allclose(read_output(out)[1], model.encode(texts), atol=1e-6)


def test_an_instruction_covering_its_text_fails_with_its_line_or_is_skipped(tmp_path, model):
  """Only tokenising shows it ("compreh" is 3 pieces, "comprehend" 1): the row is already accepted and
  its part being built when it is found, so its line and the skip count must still come out right."""
  rows = [dict(json.loads(g), instruction="Represent the sentence: ") for g in GOOD]
  rows.insert(2, {"id": "x", "instruction": "compreh", "text": "end"})
  path = tmp_path / "in.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  args = base_args([str(path)], str(tmp_path / "out"), "--id-field", "id", "--instruction-field", "instruction")
  with pytest.raises(InputError) as e:
    embed.main(args, model=model)
  msg = str(e.value)
  assert f"{path}:3:" in msg and "alone tokenises to 3 pieces" in msg and "[instruction_covers_text]" in msg
  assert "--on-error skip" in msg
  summary = embed.main(args + ["--on-error", "skip"], model=model)
  assert summary["skipped"] == {"instruction_covers_text": 1} and summary["rows"] == len(GOOD)
  manifest = json.load(open(tmp_path / "out" / "_manifest.json"))
  assert manifest["rows"]["skipped"] == {"instruction_covers_text": 1} and manifest["rows"]["embedded"] == 6
  ids, emb = read_output(str(tmp_path / "out"))
  assert ids == [f"r{i}" for i in range(6)]
  expected = model.encode([[r["instruction"], r["text"]] for r in rows if r["id"] != "x"])
  np.testing.assert_allclose(emb, expected, atol=2e-6)
  # int8 calibrates on the first rows before any part is built: the row is left out of it, then
  # failed with its line or skipped as above (it used to end the job with encode's traceback).
  int8 = base_args([str(path)], str(tmp_path / "out8"), "--id-field", "id", "--instruction-field", "instruction",
                   "--precision", "int8")
  with pytest.raises(InputError, match=f"{path}:3:.*instruction_covers_text"):
    embed.main(int8, model=model)
  assert embed.main(int8 + ["--on-error", "skip", "--overwrite"], model=model)["skipped"] == {"instruction_covers_text": 1}
  np.testing.assert_allclose(np.load(tmp_path / "out8" / "_int8_ranges.npy"),
                             np.stack([expected.min(0), expected.max(0)]), atol=1e-6)


def test_a_blank_csv_instruction_cell_takes_the_instruction_default(tmp_path, model):
  """A CSV cannot hold null: a blank cell is a row without an instruction, which --instruction covers."""
  path = tmp_path / "inst.csv"
  path.write_text("id,text,inst\n1,alpha beta,Represent the query: \n2,gamma delta,\n", encoding="utf-8")
  embed.main(base_args([str(path)], str(tmp_path / "o"), "--id-field", "id", "--instruction-field", "inst",
                       "--instruction", "Default: "), model=model)
  expected = model.encode([["Represent the query: ", "alpha beta"], ["Default: ", "gamma delta"]])
  np.testing.assert_allclose(read_output(str(tmp_path / "o"))[1], expected, atol=2e-6)
  # Without a default it is a row without an instruction, as a JSONL null is (it was an empty instruction).
  with pytest.raises(InputError, match=r"inst.csv:3 \(data row 2\): instruction field 'inst' is a blank cell \(pass "
                                       r"--instruction as the default for such rows\) \[missing_instruction\]"):
    embed.main(base_args([str(path)], str(tmp_path / "o2"), "--id-field", "id", "--instruction-field", "inst"),
               model=model)


@pytest.mark.parametrize("fmt", ["csv", "tsv-unquoted"])
def test_blank_csv_id_and_text_cells_are_nulls(tmp_path, model, fmt):
  """A blank id cell was the id "" (and a second one a duplicate id ''); a blank text cell is as a null text."""
  sep = "," if fmt == "csv" else "\t"
  path = tmp_path / "in.txt"
  path.write_text("".join(sep.join(r) + "\n" for r in [("id", "text"), ("a", "one"), ("", "two"), ("", "three"),
                                                         ("d", "")]), encoding="utf-8")
  args = base_args([str(path)], str(tmp_path / "o"), "--id-field", "id", "--input-format", fmt)
  with pytest.raises(InputError, match=r"in.txt:3 \(data row 2\): id field 'id' is a blank cell \[missing_id\]"):
    embed.main(args, model=model)
  summary = embed.main(args + ["--on-error", "skip"], model=model)
  assert summary["skipped"] == {"missing_id": 2, "missing_text": 1} and read_output(str(tmp_path / "o"))[0] == ["a"]
  with pytest.raises(InputError, match=r"in.txt:5 \(data row 4\): text field 'text' is a blank cell \[missing_text\]"):
    embed.main(base_args([str(path)], str(tmp_path / "o2"), "--input-format", fmt), model=model)


def test_csv_rows_found_bad_when_tokenised_and_tsv_unquoted_rows_are_named_by_line(tmp_path, model):
  """instruction_covers_text in a CSV gave only `data row N`; tsv-unquoted's first use of an id `row N`."""
  path = tmp_path / "in.csv"
  path.write_text('id,inst,text\n1,Q: ,"a text\nover two lines"\n2,compreh,end\n', encoding="utf-8")
  with pytest.raises(InputError, match=r"in.csv:4 \(data row 2\): .*\[instruction_covers_text\]"):
    embed.main(base_args([str(path)], str(tmp_path / "o1"), "--instruction-field", "inst"), model=model)
  dup = tmp_path / "dup.tsv"
  dup.write_text("id\ttext\nx1\thello\nx2\tworld\nx1\tagain\n", encoding="utf-8")
  with pytest.raises(InputError, match=r"dup.tsv:4 \(data row 3\): duplicate id 'x1' \(first used at .*dup.tsv:2 "
                                       r"\(data row 1\)\)"):
    embed.main(base_args([str(dup)], str(tmp_path / "o2"), "--id-field", "id", "--input-format", "tsv-unquoted"),
               model=model)


def test_rows_whose_instruction_fills_the_max_length_are_counted_and_warned(tmp_path, model, capsys):
  """As in 1.0.1 they embed the instruction alone (pooling sees only </s>), so all such rows look alike."""
  path = write_jsonl(str(tmp_path / "in.jsonl"), [{"text": t} for t in sentences(4)])
  out = str(tmp_path / "o")
  summary = embed.main(base_args([path], out, "--instruction", "Represent the document for retrieval: ",
                                 "--max-seq-length", "4"), model=model)
  assert summary["text_cut_away"] == 4
  assert "warning: 4 rows kept no token of their text" in capsys.readouterr().err
  assert json.load(open(os.path.join(out, "_manifest.json")))["rows"]["text_cut_away"] == 4
  emb = read_output(out)[1]
  np.testing.assert_allclose(emb, np.broadcast_to(emb[0], emb.shape), atol=1e-6)
  # Short instruction, room for the text: nothing to warn about.
  assert embed.main(base_args([path], str(tmp_path / "o2"), "--instruction", "Q: "), model=model)["text_cut_away"] == 0


def test_an_existing_path_with_glob_characters_is_that_file(tmp_path, model):
  """`data[1].jsonl` exists: it is the input, not a pattern matching `data1.jsonl` (or nothing)."""
  literal = write_jsonl(str(tmp_path / "data[1].jsonl"), [{"text": t} for t in sentences(3)])
  out = str(tmp_path / "o1")
  assert embed.main(base_args([literal], out), model=model)["rows"] == 3
  write_jsonl(str(tmp_path / "data1.jsonl"), [{"text": t} for t in sentences(5, seed=1)])
  out2 = str(tmp_path / "o2")
  assert embed.main(base_args([literal], out2), model=model)["rows"] == 3
  np.testing.assert_allclose(read_output(out2)[1], model.encode(sentences(3)), atol=1e-6)
  # A pattern that is no file's name still globs.
  assert embed.main(base_args([str(tmp_path / "data?.jsonl")], str(tmp_path / "o3")), model=model)["rows"] == 5


@pytest.mark.parametrize("how", ["twice", "glob", "link"])
def test_a_file_named_twice_is_refused(tmp_path, model, how):
  """Its rows would be embedded twice (with --id-field, every one a duplicate id)."""
  path = write_jsonl(str(tmp_path / "a.jsonl"), [{"text": t} for t in sentences(3)])
  write_jsonl(str(tmp_path / "b.jsonl"), [{"text": t} for t in sentences(2)])
  if how == "link":
    os.symlink(path, tmp_path / "c.jsonl")
  second = {"twice": path, "glob": str(tmp_path / "*.jsonl"), "link": str(tmp_path / "c.jsonl")}[how]
  shown = {"twice": repr(path), "glob": f"'{tmp_path}/*.jsonl' (matching {path})", "link": repr(second)}[how]
  with pytest.raises(InputError) as e:
    embed.main(base_args([path, second], str(tmp_path / "out")), model=model)
  assert str(e.value) == (f"--input names the file {path} twice, as {path!r} and as {shown}: its rows would be "
                          "embedded twice. Name each file once.")
  assert not (tmp_path / "out").exists()


def test_a_job_of_more_parts_than_five_digits_name_is_refused(tmp_path, model, monkeypatch):
  """Readers of the directory take part files in name order: part-100000 would come before part-10001."""
  from instructor_jax import embed_output
  monkeypatch.setattr(embed_output, "MAX_PARTS", 3)  # 70 rows at 16 a part make 5
  path = write_jsonl(str(tmp_path / "in.jsonl"), [{"text": t} for t in sentences(70)])
  out = tmp_path / "out"
  with pytest.raises(InputError, match=r"70 input rows at --rows-per-part 16 make 5 parts, more than the 3 whose "
                                       r"file names \(part-00000 to part-00002\) sort in part order; pass "
                                       r"--rows-per-part 24 or more\."):
    embed.main(base_args([path], str(out)), model=model)
  assert not out.exists()
  assert embed.main(base_args([path], str(out), "--rows-per-part", "24"), model=model)["parts_total"] == 3


def test_ctrl_c_is_one_line_saying_how_to_resume(tmp_path, model, capsys, monkeypatch):
  path = write_jsonl(str(tmp_path / "in.jsonl"), [{"text": t} for t in sentences(40)])
  out = str(tmp_path / "out")
  monkeypatch.setattr(embed, "_load_model", lambda args: model)

  def interrupt(stage, k):
    if (stage, k) == ("written", 1):
      raise KeyboardInterrupt

  capsys.readouterr()
  with pytest.raises(SystemExit) as e:
    embed.main(["--model", "m"] + base_args([path], out), fault=interrupt)
  assert e.value.code == 130
  assert capsys.readouterr().err == (f"interrupted: {out} keeps the parts committed so far; rerun the same command "
                                     "to resume the job.\n")
  assert embed.main(base_args([path], out), model=model)["parts_already_complete"] == 1
