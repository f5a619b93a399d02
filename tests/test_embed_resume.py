"""Resumability of the embed job: killed runs, corrupted parts, refusing to mix jobs, --overwrite."""

import json
import os

import numpy as np
import pytest

from embed_support import INSTRUCTION, base_args, read_output, sentences, tiny_model, write_jsonl
from instructor_jax import embed
from instructor_jax.embed_io import InputError
from instructor_jax.embed_manifest import OutputMismatchError


# Short texts packed, longer ones bucketed: resumed parts must reproduce both kinds of batch exactly.
JOB = ("--instruction", INSTRUCTION, "--pack-length", "32")  # every part has both kinds


class Killed(Exception):
  pass


@pytest.fixture(scope="module")
def model():
  return tiny_model()


@pytest.fixture(scope="module")
def job(tmp_path_factory, model):
  """An input of 5 parts and the output of one uninterrupted run."""
  tmp = tmp_path_factory.mktemp("resume")
  path = write_jsonl(str(tmp / "in.jsonl"), [{"text": t} for t in sentences(70, seed=11)])
  ref = str(tmp / "reference")
  embed.main(base_args([path], ref, *JOB), model=model)
  return path, read_output(ref)


def _kill_at(stage, part):
  def fault(s, k):
    if (s, k) == (stage, part):
      raise Killed(f"simulated kill at {stage} of part {k}")
  return fault


@pytest.mark.parametrize("stage", ["written", "renamed"])
def test_killed_run_resumes_exactly_once(tmp_path, model, job, stage):
  path, (ref_ids, ref_emb) = job
  out = str(tmp_path / "out")
  args = base_args([path], out, *JOB)
  with pytest.raises(Killed):
    embed.main(args, model=model, fault=_kill_at(stage, 2))
  names = os.listdir(out)
  if stage == "written":  # the temporary exists, the final name does not
    assert any(n.startswith(".part-00002.parquet.tmp-") for n in names) and "part-00002.parquet" not in names
  else:  # data file renamed, but no sidecar: not committed
    assert "part-00002.parquet" in names and not os.path.exists(os.path.join(out, "_parts", "part-00002.json"))
  assert "_manifest.json" not in names
  summary = embed.main(args, model=model)
  assert summary["parts_already_complete"] == 2 and summary["parts_written"] == 3
  assert not [n for n in os.listdir(out) if ".tmp-" in n]
  ids, emb = read_output(out)
  assert ids == ref_ids == list(range(70))  # exactly one embedding per row, in order
  np.testing.assert_array_equal(emb, ref_emb)


def test_slow_writer_failure_surfaces_instead_of_hanging(tmp_path, model, job):
  """The writer dies after the device loop has queued every part: the error must still surface."""
  import time
  path, _ = job
  out = str(tmp_path / "out")

  def fault(stage, k):
    if (stage, k) == ("written", 0):
      time.sleep(1.5)  # meanwhile the main thread fills the writer's queue and waits on it
      raise Killed("late writer failure")

  started = time.monotonic()
  with pytest.raises(Killed, match="late writer failure"):
    embed.main(base_args([path], out, "--instruction", INSTRUCTION), model=model, fault=fault)
  assert time.monotonic() - started < 60


def test_corrupted_part_is_recomputed(tmp_path, model, job):
  path, (ref_ids, ref_emb) = job
  out = str(tmp_path / "out")
  args = base_args([path], out, *JOB)
  embed.main(args, model=model)
  with open(os.path.join(out, "part-00001.parquet"), "r+b") as f:
    f.seek(10)
    f.write(b"garbage")
  summary = embed.main(args, model=model)
  assert summary["parts_written"] == 1 and summary["parts_already_complete"] == 4
  ids, emb = read_output(out)
  assert ids == ref_ids
  np.testing.assert_array_equal(emb, ref_emb)


def test_sidecar_of_another_job_is_neither_counted_nor_kept(tmp_path, model, job):
  """A sidecar whose job hash is not this job's (left by a process started with other settings)
  must not enter the manifest; a rerun redoes that part."""
  from instructor_jax import embed_manifest
  path, (ref_ids, ref_emb) = job
  out = str(tmp_path / "out")
  args = base_args([path], out, *JOB)
  embed.main(args, model=model)
  with open(os.path.join(out, "_job.json")) as f:
    spec = json.load(f)
  assert embed_manifest.build_manifest(out, spec, spec["num_parts"], [])["rows"]["embedded"] == 70
  sidecar = os.path.join(out, "_parts", "part-00003.json")
  with open(sidecar) as f:
    record = json.load(f)
  with open(sidecar, "w") as f:
    json.dump(dict(record, job_hash="0" * 64, rows=999), f)
  assert embed_manifest.build_manifest(out, spec, spec["num_parts"], []) is None
  summary = embed.main(args, model=model)
  assert summary["parts_written"] == 1 and summary["parts_already_complete"] == 4
  with open(os.path.join(out, "_manifest.json")) as f:
    assert json.load(f)["rows"]["embedded"] == 70
  ids, emb = read_output(out)
  assert ids == ref_ids
  np.testing.assert_array_equal(emb, ref_emb)


def test_resumes_a_job_recorded_with_the_single_stream_fingerprint(tmp_path, model, job, monkeypatch):
  """Jobs written before the per-leaf fingerprint recorded `sha256:` over all weights in one stream:
  a resume recomputes that form, so their parts still count, and another model is still refused."""
  from instructor_jax import embed_manifest
  path, (ref_ids, ref_emb) = job
  out = str(tmp_path / "out")
  args = base_args([path], out, *JOB)
  with monkeypatch.context() as m:  # the first run writes what an older release wrote
    m.setattr(embed_manifest, "FINGERPRINT_SCHEMES", ("sha256", "sha256-leaves"))
    with pytest.raises(Killed):
      embed.main(args, model=model, fault=_kill_at("renamed", 2))
  recorded = json.load(open(os.path.join(out, "_job.json")))["model"]["fingerprint"]
  assert recorded == embed_manifest.params_fingerprint(model.params, "sha256") and recorded.startswith("sha256:")
  summary = embed.main(args, model=model)
  assert summary["parts_already_complete"] == 2 and summary["parts_written"] == 3
  np.testing.assert_array_equal(read_output(out)[1], ref_emb)
  with pytest.raises(OutputMismatchError, match="model.fingerprint"):
    embed.main(args, model=tiny_model(seed=1))
  new = embed_manifest.params_fingerprint(model.params)  # what a new job records
  assert new.startswith("sha256-leaves:") and new != embed_manifest.params_fingerprint(tiny_model(seed=1).params)
  assert json.load(open(os.path.join(os.path.dirname(path), "reference", "_job.json")))["model"]["fingerprint"] == new


def test_refuses_changed_instruction_or_model_and_overwrite_restarts(tmp_path, model, job):
  path, (ref_ids, ref_emb) = job
  out = str(tmp_path / "out")
  embed.main(base_args([path], out, *JOB), model=model)
  with pytest.raises(OutputMismatchError, match="instruction.fixed"):
    embed.main(base_args([path], out, "--instruction", "Represent the title: "), model=model)
  with pytest.raises(OutputMismatchError, match="model.fingerprint"):
    embed.main(base_args([path], out, *JOB), model=tiny_model(seed=1))
  # Packing moves results by float rounding only, but "same job, same bits" needs the same rows.
  with pytest.raises(OutputMismatchError, match="pack_length: existing 32 vs now 0"):
    embed.main(base_args([path], out, "--instruction", INSTRUCTION, "--pack-length", "0"), model=model)
  with open(os.path.join(out, "manifest.json"), "w") as f:  # left by a job of an older release
    f.write("{}")
  summary = embed.main(base_args([path], out, "--instruction", "Represent the title: ", "--overwrite"), model=model)
  assert summary["parts_written"] == 5 and summary["parts_already_complete"] == 0
  assert not os.path.exists(os.path.join(out, "manifest.json"))  # Parquet readers would choke on it
  manifest = json.load(open(os.path.join(out, "_manifest.json")))
  assert manifest["instruction"]["fixed"] == "Represent the title: "
  ids, emb = read_output(out)
  assert ids == ref_ids and not np.allclose(emb, ref_emb)


def test_the_same_input_named_by_another_path_resumes(tmp_path, model, job, monkeypatch, capsys):
  """Relative against absolute, or another working directory: same size, rows and CRC-32, same job."""
  path, (ref_ids, ref_emb) = job
  out = str(tmp_path / "out")
  with pytest.raises(Killed):
    embed.main(base_args([path], out, *JOB), model=model, fault=_kill_at("written", 2))
  monkeypatch.chdir(os.path.dirname(path))
  summary = embed.main(base_args([os.path.basename(path)], out, *JOB), model=model)
  assert summary["parts_already_complete"] == 2 and summary["parts_written"] == 3
  assert f"is {path} of the existing job (same size, rows and CRC-32)" in capsys.readouterr().err
  assert read_output(out)[0] == ref_ids
  np.testing.assert_array_equal(read_output(out)[1], ref_emb)


def test_a_job_stopped_before_its_first_part_does_not_block_a_corrected_command(tmp_path, model, job):
  path, (ref_ids, ref_emb) = job
  out = str(tmp_path / "out")
  with pytest.raises(Killed):
    embed.main(base_args([path], out, "--instruction", "Represent typo: ", "--precision", "int8"), model=model,
               fault=_kill_at("written", 0))
  assert os.path.exists(os.path.join(out, "_job.json")) and os.path.exists(os.path.join(out, "_int8_ranges.npy"))
  summary = embed.main(base_args([path], out, *JOB), model=model)  # nothing to resume: no refusal
  assert summary["parts_written"] == 5 and not os.path.exists(os.path.join(out, "_int8_ranges.npy"))
  np.testing.assert_array_equal(read_output(out)[1], ref_emb)


def test_changed_input_is_refused(tmp_path, model, job):
  path, _ = job
  out = str(tmp_path / "out")
  local = write_jsonl(str(tmp_path / "in.jsonl"), [{"text": t} for t in sentences(20, seed=12)])
  embed.main(base_args([local], out), model=model)
  with open(local, "a") as f:
    f.write(json.dumps({"text": "one more row"}) + "\n")
  # The entry that changed is named, with its old and new size and rows.
  with pytest.raises(OutputMismatchError, match=r"inputs\[0\]\.rows: existing 20 vs now 21"):
    embed.main(base_args([local], out), model=model)


def _same_size_edit(fmt: str, path: str, texts: list[str]) -> None:
  """Writes `texts` in `fmt`; the caller edits one character and writes again."""
  if fmt == "parquet":
    import pyarrow as pa
    import pyarrow.parquet as pq
    # Uncompressed: a same-length edit keeps every size and every footer statistic.
    pq.write_table(pa.table({"text": texts}), path, compression="none")
  elif fmt == "csv":
    with open(path, "w") as f:
      f.write("text\n" + "".join(f'"{t}"\n' for t in texts))
  else:
    write_jsonl(path, [{"text": t} for t in texts])


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_edit_keeping_size_and_rows_is_refused(tmp_path, model, fmt):
  texts = sentences(12, seed=13)
  local, out = str(tmp_path / f"in.{fmt}"), str(tmp_path / "out")
  _same_size_edit(fmt, local, texts)
  embed.main(base_args([local], out), model=model)
  size = os.path.getsize(local)
  os.utime(local, (0, 0))  # a copy's new modification time alone is not a change
  embed.main(base_args([local], out), model=model)
  edited = texts[:5] + [texts[5][:-1] + ("x" if texts[5][-1] != "x" else "y")] + texts[6:]
  _same_size_edit(fmt, local, edited)
  assert os.path.getsize(local) == size
  with pytest.raises(OutputMismatchError, match=r"inputs\[0\]\.checksum: existing \"crc32:[0-9a-f]{8}\" vs now"):
    embed.main(base_args([local], out), model=model)


def test_cli_reports_refusal_without_traceback(tmp_path, model, job, capsys, monkeypatch):
  path, _ = job
  out = str(tmp_path / "out")
  embed.main(base_args([path], out), model=model)
  monkeypatch.setattr(embed, "_load_model", lambda args: tiny_model(seed=1))
  with pytest.raises(SystemExit) as e:
    embed.main(["--model", "some/model"] + base_args([path], out))
  assert e.value.code == 2
  assert "different embedding job" in capsys.readouterr().err


def test_resuming_on_another_batch_budget_warns_and_keeps_the_parts(tmp_path, model, job, capsys):
  """Where the job runs (devices, batch budget) moves results by float rounding only: recorded, warned, allowed."""
  path, _ = job
  out = str(tmp_path / "out")
  embed.main(base_args([path], out, *JOB, "--batch-tokens", "256"), model=model)
  runtime = json.load(open(os.path.join(out, "_runtime.json")))
  assert runtime["batch_tokens"] == 256 and runtime["devices"].startswith(f"{model.mesh.devices.size} x ")
  assert "runtime" not in json.load(open(os.path.join(out, "_job.json")))  # the job reads the same wherever it ran
  capsys.readouterr()
  summary = embed.main(base_args([path], out, *JOB, "--batch-tokens", "512"), model=model)
  assert summary["parts_already_complete"] == 5 and summary["parts_written"] == 0
  assert "batch_tokens: existing 256 vs now 512" in capsys.readouterr().err
  assert json.load(open(os.path.join(out, "_runtime.json")))["attention"] == "dot_product_attention"
  # An older release recorded no attention kernel: not a change, no warning.
  runtime = json.load(open(os.path.join(out, "_runtime.json")))
  del runtime["attention"]
  with open(os.path.join(out, "_runtime.json"), "w") as f:
    json.dump(runtime, f)
  embed.main(base_args([path], out, *JOB, "--batch-tokens", "512"), model=model)
  assert "warning: resuming" not in capsys.readouterr().err
  # ... unless this run's kernel is not that release's default (cuDNN's, on a GPU).
  with open(os.path.join(out, "_runtime.json"), "w") as f:
    json.dump(runtime, f)
  with pytest.MonkeyPatch.context() as m:
    m.setattr(type(model), "attention_kernel", property(lambda self: "cudnn"))
    embed.main(base_args([path], out, *JOB, "--batch-tokens", "512"), model=model)
  err = capsys.readouterr().err
  assert "warning: resuming" in err and "attention: existing \"not recorded" in err and "vs now \"cudnn\"" in err
  # Releases before chunked parts batched each part whole: other batches, so other float rounding.
  del runtime["chunk_chars"]
  with open(os.path.join(out, "_runtime.json"), "w") as f:
    json.dump(runtime, f)
  embed.main(base_args([path], out, *JOB, "--batch-tokens", "512"), model=model)
  err = capsys.readouterr().err
  assert "warning: resuming" in err and "chunk_chars: existing \"not recorded" in err and "attention:" not in err


def test_model_fingerprint_is_cached_per_set_of_arrays_and_follows_changes(model):
  """One hash per loaded model across jobs in a process, recomputed when any weight changes."""
  import jax
  from instructor_jax import embed_manifest
  m = tiny_model(seed=2)
  first = embed_manifest.model_fingerprint(m)
  assert first == embed_manifest.params_fingerprint(m.params)
  calls = []
  real = embed_manifest.params_fingerprint
  try:
    embed_manifest.params_fingerprint = lambda *a, **k: calls.append(1) or real(*a, **k)
    assert embed_manifest.model_fingerprint(m) == first and not calls  # cached
    leaves, tree = jax.tree.flatten(m.params)
    m.params = jax.tree.unflatten(tree, [leaves[0] + 1] + leaves[1:])  # a new array for one weight
    changed = embed_manifest.model_fingerprint(m)
    assert changed != first and len(calls) == 1
    import gc
    import weakref
    old = weakref.ref(leaves[0])
    del leaves, tree
    gc.collect()
    assert old() is None  # the cache does not keep replaced weights alive
    host = jax.tree.map(np.array, m.params)  # NumPy leaves can be edited in place: never cached
    m.params = host
    assert embed_manifest.model_fingerprint(m) == changed
    jax.tree.leaves(host)[0][...] += 1
    assert embed_manifest.model_fingerprint(m) != changed and len(calls) == 3
  finally:
    embed_manifest.params_fingerprint = real


def test_a_glob_that_matches_a_new_file_is_refused_naming_it(tmp_path, model, capsys):
  """Inputs added or removed: no input is matched by position ("resuming it" of another file), and the
  refusal names the paths in full rather than two JSON lists cut at 120 characters."""
  shards = tmp_path / "a-long-directory-name-so-that-the-input-list-runs-past-any-cut"
  shards.mkdir()
  rows = [{"text": t} for t in sentences(5, seed=3)]
  for name in ("a", "b", "c"):  # identical contents: position i of the new list matches old input i
    write_jsonl(str(shards / f"shard-{name}.jsonl"), rows)
  out = str(tmp_path / "out")
  embed.main(base_args([str(shards / "shard-*.jsonl")], out), model=model)
  write_jsonl(str(shards / "shard-aa.jsonl"), rows)
  with open(shards / "shard-c.jsonl", "a") as f:
    f.write(json.dumps({"text": "one more"}) + "\n")
  capsys.readouterr()
  with pytest.raises(OutputMismatchError) as e:
    embed.main(base_args([str(shards / "shard-*.jsonl")], out), model=model)
  assert "resuming it" not in capsys.readouterr().err
  msg = str(e.value)
  assert f"inputs: existing 3 vs now 4; added: {shards}/shard-aa.jsonl\n" in msg
  assert f"inputs[{shards}/shard-c.jsonl].rows: existing 5 vs now 6" in msg
  os.remove(shards / "shard-aa.jsonl")
  os.remove(shards / "shard-b.jsonl")
  with pytest.raises(OutputMismatchError, match=f"inputs: existing 3 vs now 2; removed: {shards}/shard-b.jsonl\n"):
    embed.main(base_args([str(shards / "shard-*.jsonl")], out), model=model)


def test_a_bad_row_after_committed_parts_advises_overwrite_or_skip(tmp_path, model):
  """"Fix the input" alone would lead to a refusal: the fixed input has another checksum, and parts of
  the job are committed. The message says so, and both ways it gives work."""
  rows = [{"text": t} for t in sentences(70, seed=11)]
  path = tmp_path / "in.jsonl"
  lines = [json.dumps(r) for r in rows]
  path.write_text("\n".join(lines[:50] + ["{not json"] + lines[50:]) + "\n")  # line 51: part 3
  out = str(tmp_path / "out")
  with pytest.raises(Killed):  # parts 0 and 1 committed, as a long job would have when it met the row
    embed.main(base_args([str(path)], out, "--on-error", "skip"), model=model, fault=_kill_at("renamed", 2))
  with pytest.raises(InputError) as e:
    embed.main(base_args([str(path)], out), model=model)
  msg = str(e.value)
  assert msg.startswith(f"{path}:51: malformed JSON") and "[malformed_json]. " in msg
  assert (f"{out} already holds committed parts of this job" in msg and "rerun with --overwrite" in msg
          and "rerun this command with --on-error skip to keep the committed parts" in msg)
  summary = embed.main(base_args([str(path)], out, "--on-error", "skip"), model=model)
  assert summary["parts_already_complete"] == 2 and summary["skipped"] == {"malformed_json": 1}
  assert read_output(out)[0] == [i for i in range(71) if i != 50]
  path.write_text("\n".join(lines) + "\n")  # fixed: another job, refused unless started over
  with pytest.raises(OutputMismatchError, match="checksum"):
    embed.main(base_args([str(path)], out), model=model)
  assert embed.main(base_args([str(path)], out, "--overwrite"), model=model)["rows"] == 70


def test_a_damaged_job_record_is_refused_by_name(tmp_path, model, job, capsys, monkeypatch):
  """A truncated `_job.json` (a full disk, a copy cut short) was a JSONDecodeError traceback; a damaged
  `_runtime.json`, a record of where runs computed, is rewritten."""
  path, (ref_ids, ref_emb) = job
  out = str(tmp_path / "out")
  args = base_args([path], out, *JOB)
  embed.main(args, model=model)
  with open(os.path.join(out, "_runtime.json"), "w") as f:
    f.write('{"devices": ')
  assert embed.main(args, model=model)["parts_already_complete"] == 5
  with open(os.path.join(out, "_job.json"), "r+") as f:
    f.truncate(100)
  with pytest.raises(OutputMismatchError, match=r"_job.json is damaged \(JSONDecodeError: .*Rerun with --overwrite"):
    embed.main(args, model=model)
  monkeypatch.setattr(embed, "_load_model", lambda args: model)
  capsys.readouterr()
  with pytest.raises(SystemExit) as e:
    embed.main(["--model", "m"] + args)
  err = capsys.readouterr().err
  assert e.value.code == 2 and err.startswith(f"error: {out}/_job.json is damaged") and "Traceback" not in err
  assert embed.main(args + ["--overwrite"], model=model)["parts_written"] == 5
  np.testing.assert_array_equal(read_output(out)[1], ref_emb)


def test_the_same_job_twice_at_once_is_refused(tmp_path, model, job):
  """Each process index locks the output directory for its run: the same command started twice would
  compute every part twice (and race --overwrite's removals); other process indices share it."""
  from instructor_jax import dir_lock
  path, (ref_ids, ref_emb) = job
  out = tmp_path / "out"
  out.mkdir()
  held = dir_lock.lock_directory(str(out), ".embed-0.lock")  # as a running job holds it
  try:
    with pytest.raises(dir_lock.DirectoryInUseError, match=r"out is in use by another embed job as process 0 "
                                                            r"\(pid \d+ on .*\); wait for it to end, stop it, or use "
                                                            r"another --output\."):
      embed.main(base_args([path], str(out), *JOB), model=model)
    assert not os.path.exists(out / "_job.json")
    other = embed.main(base_args([path], str(out), *JOB, "--process-index", "1", "--process-count", "2"),
                       model=model)
    assert other["parts_written"] == 2
  finally:
    held.close()
  assert embed.main(base_args([path], str(out), *JOB, "--process-index", "0", "--process-count", "2"),
                    model=model)["parts_written"] == 3
  np.testing.assert_array_equal(read_output(str(out))[1], ref_emb)
  assert sorted(n for n in os.listdir(out) if n.startswith(".")) == [".embed-0.lock", ".embed-1.lock"]
