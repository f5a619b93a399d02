"""Task-homogeneous global batches: inference-equal tokens, single-task, disjoint host slices, exact resume."""

import logging
import os
import pathlib

import numpy as np
import pytest

from instructor_jax import medi_batches, medi_records, tokenization
from instructor_jax.config import ConfigError

SAMPLE = str(pathlib.Path(__file__).parent.parent / "data" / "medi_sample.jsonl")
KEYS = [f"{f}_{k}" for f in medi_batches.FIELDS for k in ("ids", "mask", "n_instr")]


@pytest.fixture(scope="module")
def tokenizer():
  return tokenization.Tokenizer.from_pretrained(None)


@pytest.fixture(scope="module")
def records():
  return medi_records.read_medi(SAMPLE, log=lambda _: None)[0]


@pytest.fixture(scope="module")
def tasks(tokenizer, records):
  return {name: medi_batches.tokenize_task(name, [(r.query, r.pos, r.neg) for r in recs], tokenizer.encode_pieces)
          for name, recs in records.items()}


def _run(tasks, steps, **kw):
  kw = dict(dict(global_batch_size=32, seed=7, query_len=24, doc_len=48), **kw)
  return list(medi_batches.global_batches(None, tasks=tasks, num_steps=steps, **kw))


@pytest.mark.parametrize("query_len, doc_len", [(512, 512), (24, 48), (6, 3)])
def test_ids_masks_and_n_instr_equal_the_inference_tokenizer(tokenizer, records, tasks, query_len, doc_len):
  for name, recs in records.items():
    rows = np.arange(0, len(recs), 7)
    got = medi_batches.make_batch(tasks[name], rows, query_len, doc_len)
    for field in medi_batches.FIELDS:
      max_len = query_len if field == "query" else doc_len
      ids, n_instr = tokenizer.tokenize([getattr(recs[i], field) for i in rows], max_len)
      want = tokenization.pad_batch(ids, n_instr, max_len)
      np.testing.assert_array_equal(got[f"{field}_ids"], want.ids, err_msg=f"{name} {field}")
      np.testing.assert_array_equal(got[f"{field}_mask"], want.mask, err_msg=f"{name} {field}")
      np.testing.assert_array_equal(got[f"{field}_n_instr"], want.n_instr, err_msg=f"{name} {field}")
      assert got[f"{field}_ids"].dtype == np.int32 and got[f"{field}_n_instr"].dtype == np.int32


def test_instruction_edge_cases_follow_the_rule(tokenizer):
  triples = [(("", "A sentence without instruction."), ("A ", "one-token instruction is pooled"),
              ("Represent the Wikipedia question for retrieving relevant documents; ", "  padded text  ")),
             ("plain string query", ("Represent: ", "x"), ("Represent the title:", "\tTabs\nand  spaces 123"))]
  task = medi_batches.tokenize_task("t", triples, tokenizer.encode_pieces)
  for max_len in (3, 8, 512):
    got = medi_batches.make_batch(task, np.arange(2), max_len, max_len)
    for f, field in enumerate(medi_batches.FIELDS):
      ids, n_instr = tokenizer.tokenize([t[f] for t in triples], max_len)
      np.testing.assert_array_equal(got[f"{field}_ids"], tokenization.pad_batch(ids, n_instr, max_len).ids)
      np.testing.assert_array_equal(got[f"{field}_n_instr"], n_instr)
  assert medi_batches.make_batch(task, np.arange(2), 512, 512)["pos_n_instr"][0] == 0  # the <= 1 quirk


def test_every_batch_comes_from_one_task(tasks):
  rows_of = {}
  for name, task in tasks.items():
    b = medi_batches.make_batch(task, np.arange(len(task)), 24, 48)
    rows_of[name] = {np.concatenate([b["query_ids"][i], b["pos_ids"][i], b["neg_ids"][i]]).tobytes()
                     for i in range(len(task))}
  seen = set()
  for step, name, batch in _run(tasks, 60):
    seen.add(name)
    assert {k: v.shape[0] for k, v in batch.items()} == {k: 32 for k in KEYS}
    assert batch["query_ids"].shape == (32, 24) and batch["pos_ids"].shape == (32, 48)
    for i in range(32):
      row = np.concatenate([batch["query_ids"][i], batch["pos_ids"][i], batch["neg_ids"][i]]).tobytes()
      assert row in rows_of[name], f"step {step}: row {i} is not from task {name}"
  assert seen == set(tasks)


def test_two_hosts_get_disjoint_slices_that_form_the_global_batch(tasks):
  whole = _run(tasks, 25)
  hosts = [_run(tasks, 25, process_index=p, process_count=2) for p in range(2)]
  plan = medi_batches.BatchPlan({n: len(t) for n, t in tasks.items()}, 32, 7)
  draws = np.zeros(len(plan.tasks), np.int64)
  for (s, name, b), (s0, n0, b0), (s1, n1, b1) in zip(whole, *hosts):
    assert s == s0 == s1 and name == n0 == n1
    for k in KEYS:
      assert b0[k].shape[0] == b1[k].shape[0] == 16
      np.testing.assert_array_equal(np.concatenate([b0[k], b1[k]]), b[k])
    t = plan.tasks.index(name)
    g = plan.global_indices(t, int(draws[t]))
    draws[t] += 1
    halves = [medi_batches.host_slice(g, p, 2) for p in range(2)]
    assert not set(halves[0]) & set(halves[1]) and len(set(g)) == 32
    np.testing.assert_array_equal(b0["query_ids"], medi_batches.make_batch(tasks[name], halves[0], 24, 48)["query_ids"])


@pytest.mark.parametrize("process_count", [1, 2])
def test_bucketed_batches_are_the_padded_ones_cut_to_their_bucket(tasks, process_count):
  """Only padding columns go; every host gets the same lengths (the global batch's buckets)."""
  buckets = (16, 32, 48)
  seen = set()
  for p in range(process_count):
    kw = dict(process_index=p, process_count=process_count, query_len=64, doc_len=96)
    padded, bucketed = _run(tasks, 40, **kw), _run(tasks, 40, length_buckets=buckets, **kw)
    lengths = []
    for (s, name, full), (s2, name2, cut) in zip(padded, bucketed):
      assert (s, name) == (s2, name2)
      for key in KEYS:
        if key.endswith("n_instr"):
          np.testing.assert_array_equal(cut[key], full[key])
          continue
        width = cut[key].shape[1]
        np.testing.assert_array_equal(cut[key], full[key][:, :width])
        assert not full[key][:, width:].any()
      lq, ld = cut["query_ids"].shape[1], cut["pos_ids"].shape[1]
      assert cut["neg_ids"].shape[1] == ld
      # The smallest bucket (or the maximum) holding the global batch's longest text.
      g = plan_rows(tasks, s)
      for fields, got, max_len in ((("query",), lq, 64), (("pos", "neg"), ld, 96)):
        longest = max(int(np.max(np.diff(tasks[name].fields[f].offsets)[g])) for f in fields)
        assert got == min([b for b in buckets if min(longest, max_len) <= b < max_len] or [max_len])
      lengths.append((lq, ld))
      seen.add((lq, ld))
    if p == 0:
      first_host = lengths
    assert lengths == first_host
  assert len(seen) > 1  # the sample's batches do land in different buckets


def plan_rows(tasks, step, batch=32, seed=7):
  """The global rows of `step` in `_run`'s plan."""
  plan = medi_batches.BatchPlan({n: len(t) for n, t in tasks.items()}, batch, seed)
  t = int(plan.task_ids(step, step + 1)[0])
  return plan.global_indices(t, int(plan.draws_before(step)[t]))


def test_an_instruction_longer_than_its_input_keeps_its_n_instr(tokenizer):
  # "hello wor" alone is 3 pieces, "hello world" 2 (+ EOS: 3 positions): the bucket must leave room for
  # the instruction, or n_instr (capped at the padded length - 1) would change and pool the EOS.
  triples = [(("hello wor", "ld"), ("a", "b"), ("a", "b")) for _ in range(2)]
  task = medi_batches.tokenize_task("t", triples, tokenizer.encode_pieces)
  rows = np.arange(2)
  n, length = int(task.fields["query"].n_instr[0]), int(np.diff(task.fields["query"].offsets)[0])
  assert n >= length  # the case this test is about
  lq, _ = medi_batches.padded_lengths(task, rows, 512, 512, tuple(range(2, 512)))
  assert lq == n + 1
  np.testing.assert_array_equal(medi_batches.make_batch(task, rows, lq, 8)["query_n_instr"],
                                medi_batches.make_batch(task, rows, 512, 8)["query_n_instr"])


@pytest.mark.parametrize("process_count", [1, 4])
def test_resume_at_step_k_is_byte_identical(tasks, process_count):
  full = _run(tasks, 70, process_index=process_count - 1, process_count=process_count)
  for k in (1, 33, 69):
    resumed = _run(tasks, 70 - k, start_step=k, process_index=process_count - 1, process_count=process_count)
    assert [(s, n) for s, n, _ in resumed] == [(s, n) for s, n, _ in full[k:]]
    for (_, _, a), (_, _, b) in zip(resumed, full[k:]):
      assert all(a[key].tobytes() == b[key].tobytes() for key in KEYS)


def test_epochs_short_tasks_and_tails(caplog):
  with caplog.at_level(logging.WARNING):
    plan = medi_batches.BatchPlan({"a": 10, "b": 25, "tiny": 3}, 4, seed=1)
  assert plan.tasks == ["a", "b"] and "tiny" in caplog.text
  np.testing.assert_array_equal(plan.batches_per_epoch, [2, 6])
  for t, m in enumerate(plan.batches_per_epoch):
    for epoch in range(3):
      used = np.concatenate([plan.global_indices(t, epoch * m + j) for j in range(m)])
      assert len(set(used)) == 4 * m  # no example twice in an epoch; the tail is n % 4 examples
      np.testing.assert_array_equal(used, plan.permutation(t, epoch)[:4 * m])
    assert not np.array_equal(plan.permutation(t, 0), plan.permutation(t, 1))
  with pytest.raises(ConfigError, match=r"BATCH_SIZE 4: no MEDI task has that many examples.*\(largest: b 3, a 2\); "
                                       "lower BATCH_SIZE"):
    medi_batches.BatchPlan({"a": 2, "b": 3}, 4, seed=0)


def test_task_choice_follows_rates_and_replay_counts():
  plan = medi_batches.BatchPlan({"a": 100, "b": 300}, 4, seed=3)
  ids = plan.task_ids(0, 20000)
  assert abs(np.mean(ids == 1) - 0.75) < 0.02
  np.testing.assert_array_equal(plan.draws_before(12345), np.bincount(ids[:12345], minlength=2))
  np.testing.assert_array_equal(plan.task_ids(500, 700), ids[500:700])  # counter-based: no state


def test_task_sequence_golden():
  # Changing the hash, seed mixing or rate order changes every run's data order, and resuming a run
  # started with older code would then replay a different stream. Update only deliberately.
  plan = medi_batches.BatchPlan({"a": 100, "b": 200, "c": 300}, 4, seed=0)
  assert plan.task_ids(0, 16).tolist() == [2, 0, 2, 2, 0, 1, 1, 1, 2, 2, 2, 1, 2, 1, 2, 2]


def test_rates_capped_and_temperature_scaled():
  assert medi_batches.task_rates({"a": 100, "b": 300}) == pytest.approx({"a": 0.25, "b": 0.75})
  assert medi_batches.task_rates({"a": 100, "b": 300}, cap=100) == pytest.approx({"a": 0.5, "b": 0.5})
  r = medi_batches.task_rates({"a": 100, "b": 400}, temperature=2.0)
  assert r == pytest.approx({"a": 1 / 3, "b": 2 / 3})


def test_bad_arguments_are_refused(tasks):
  with pytest.raises(ValueError, match="multiple of process_count"):
    _run(tasks, 1, global_batch_size=30, process_count=4)
  with pytest.raises(ValueError, match="process_index 2"):
    _run(tasks, 1, process_index=2, process_count=2)
  for name, value in (("seed", -1), ("start_step", -5), ("global_batch_size", 0), ("query_len", 1)):
    with pytest.raises(ValueError, match=rf"global_batches\({name}={value}\): expected an int >= "):
      _run(tasks, 1, **{name: value})


def test_loads_a_medi_file_directly():
  got = list(medi_batches.global_batches(SAMPLE, global_batch_size=8, num_steps=3, query_len=16,
                                         doc_len=16, log_fn=lambda _: None))
  assert [s for s, _, _ in got] == [0, 1, 2] and all(b["query_ids"].shape == (8, 16) for _, _, b in got)


def test_tokenised_cache_round_trip_gives_identical_batches(tmp_path):
  medi = tmp_path / "medi-data.jsonl"
  medi.write_text("\n".join(pathlib.Path(SAMPLE).read_text(encoding="utf-8").splitlines()[:700]) + "\n")
  kw = dict(global_batch_size=16, num_steps=10, query_len=16, doc_len=32, cache_dir=str(tmp_path / "cache"))
  logs = [[], []]
  first, second = (list(medi_batches.global_batches(str(tmp_path), log_fn=logs[i].append, **kw)) for i in range(2))
  assert not any("tokenised cache" in line for line in logs[0])
  assert any("tokenised cache" in line for line in logs[1])
  assert [(s, n) for s, n, _ in first] == [(s, n) for s, n, _ in second]
  assert all(a[k].tobytes() == b[k].tobytes() for (_, _, a), (_, _, b) in zip(first, second) for k in KEYS)
  medi.write_text(medi.read_text() + medi.read_text().splitlines()[0] + "\n")  # edited file: new key
  logs.append([])
  list(medi_batches.global_batches(str(tmp_path), log_fn=logs[2].append, **kw))
  assert not any("tokenised cache" in line for line in logs[2])
  assert len(list((tmp_path / "cache").iterdir())) == 2


def _small_medi(tmp_path, lines=200):
  medi = tmp_path / "medi-data.jsonl"
  medi.write_text("\n".join(pathlib.Path(SAMPLE).read_text(encoding="utf-8").splitlines()[:lines]) + "\n")
  return str(medi)


def test_an_unwritable_cache_warns_once_and_the_run_goes_on(tmp_path):
  medi = _small_medi(tmp_path)
  (tmp_path / "afile").write_text("")
  cache_dir = str(tmp_path / "afile" / "medi_tokens")  # not writable, even by root
  logs = []
  got = medi_batches.load_tasks(medi, log_fn=logs.append, cache_dir=cache_dir)
  warnings = [line for line in logs if line.startswith("warning:")]
  assert len(warnings) == 1 and cache_dir in warnings[0] and "INSTRUCTOR_JAX_CACHE" in warnings[0], logs
  want = medi_batches.load_tasks(medi, log_fn=lambda _: None)
  assert list(got) == list(want) and all(got[t].fields[f].tokens.tobytes() == want[t].fields[f].tokens.tobytes()
                                         for t in want for f in medi_batches.FIELDS)


def test_a_save_by_another_host_with_the_same_pid_is_left_alone(tmp_path):
  """Hosts in containers sharing the cache (NFS) can have the same pid: temp names must not be the pid alone."""
  tasks = medi_batches.load_tasks(_small_medi(tmp_path), log_fn=lambda _: None)
  directory = tmp_path / "cache" / "medi_tokens_x"
  other = pathlib.Path(f"{directory}.tmp{os.getpid()}")
  other.mkdir(parents=True)
  (other / "00000.query.tokens.npy").write_text("another host's half-written file")
  medi_batches.save_tasks(tasks, str(directory))
  medi_batches.save_tasks(tasks, str(directory))  # a second host finishing later: no error, its copy dropped
  assert (other / "00000.query.tokens.npy").read_text() == "another host's half-written file"
  assert sorted(p.name for p in directory.parent.iterdir()) == [directory.name, other.name]
  loaded = medi_batches.load_saved_tasks(str(directory))
  assert all(loaded[t].fields[f].tokens.tobytes() == tasks[t].fields[f].tokens.tobytes()
             for t in tasks for f in medi_batches.FIELDS)


def test_the_cache_key_covers_the_code_that_decides_which_records_are_kept(tmp_path, monkeypatch):
  """medi_records.py decides which records are skipped: a change there must not reuse old token arrays."""
  medi = _small_medi(tmp_path, 10)
  key = medi_batches._cache_key(medi)  # pylint: disable=protected-access
  edited = tmp_path / "medi_records.py"
  edited.write_text(pathlib.Path(medi_records.__file__).read_text() + "\n# a changed rule\n")
  monkeypatch.setattr(medi_records, "__file__", str(edited))
  assert medi_batches._cache_key(medi) != key  # pylint: disable=protected-access


def test_hosts_that_read_another_corpus_are_named(tasks):
  """A pod's hosts each draw the batches alone: the check sees other sizes, other names, other token counts."""
  fingerprint = medi_batches.corpus_fingerprint
  fewer = dict(tasks, trecqa_answers=medi_batches.TaskArrays("trecqa_answers", {
      f: medi_batches.FieldArrays(a.tokens, a.offsets[:-1], a.n_instr[:-1])
      for f, a in tasks["trecqa_answers"].fields.items()}))
  renamed = {("sick_relatedness2" if n == "sick_relatedness" else n): t for n, t in tasks.items()}
  query = tasks["msrp_paraphrase"].fields["query"]
  longer = query.offsets + (np.arange(len(query.offsets)) >= 7)  # one text one token longer
  retokenised = dict(tasks, msrp_paraphrase=medi_batches.TaskArrays("msrp_paraphrase", dict(
      tasks["msrp_paraphrase"].fields, query=medi_batches.FieldArrays(query.tokens, longer, query.n_instr))))
  medi_batches.check_same_corpus(tasks, lambda x: np.stack([x, fingerprint(dict(tasks)), x]))
  for other, shown in ((fewer, "process 2 has 4 tasks, 1904 examples"), (renamed, "process 2 has 4 tasks, 1905"),
                       (retokenised, "process 2 has 4 tasks, 1905")):
    with pytest.raises(ConfigError, match=f"process 0 has 4 tasks, 1905 examples, {shown}.*process\\(es\\) \\[2\\]"
                                          ".*INSTRUCTOR_JAX_CACHE"):
      medi_batches.check_same_corpus(tasks, lambda x, other=other: np.stack([x, x, fingerprint(other)]))


def test_truncation_report_counts_what_padding_does(tasks):
  """The start-up note on truncation agrees with FieldArrays.pad, example by example."""
  query_len, doc_len = 8, 12
  truncated = {"query": 0, "doc": 0}
  total = {"query": 0, "doc": 0}
  eos_only = 0
  for task in tasks.values():
    for field, arrays in task.fields.items():
      max_len = query_len if field == "query" else doc_len
      kind = "query" if field == "query" else "doc"
      rows = np.arange(len(arrays))
      _, mask, n_instr = arrays.pad(rows, max_len)
      truncated[kind] += int(np.sum(np.diff(arrays.offsets) > max_len))
      total[kind] += len(rows)
      eos_only += int(np.sum((n_instr > 0) & (n_instr >= mask.sum(1) - 1)))
  report = medi_batches.truncation_report(tasks, query_len, doc_len)
  assert f"{100 * truncated['query'] / total['query']:.1f}% of queries exceed query_len 8" in report
  assert f"{100 * truncated['doc'] / total['doc']:.1f}% of documents exceed doc_len 12" in report
  assert eos_only > 0 and f"; {eos_only} texts keep only their instruction" in report
  assert medi_batches.truncation_report(tasks, 512, 512) is None


def test_a_text_whose_instruction_covers_it_trains_and_is_reported():
  """Inference refuses such a text (InstructionCoversTextError); training keeps it, pooled over nothing,
  and says so at start-up even when nothing is truncated."""
  encode_fn = medi_batches.sentencepiece_encode_fn()
  triples = [(["Represent the question: ", "a query"], ["compreh", "end"], ["compreh", "ends"]),
             (["Represent the question: ", "a query"], ["Represent the doc: ", ""], ["Represent the doc: ", "b"])]
  task = medi_batches.tokenize_task("t", triples, encode_fn)
  assert task.fields["pos"].n_instr.tolist()[0] == 3 and np.diff(task.fields["pos"].offsets).tolist()[0] == 2
  assert task.fields["neg"].n_instr.tolist()[0] == 3 and np.diff(task.fields["neg"].offsets).tolist()[0] == 3
  report = medi_batches.truncation_report({"t": task}, 512, 512)  # the empty text pools EOS alone
  assert "3 texts keep only their instruction" in report and "2 of them pool nothing, not even EOS" in report
