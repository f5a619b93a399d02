"""seqio + TFDS MEDI pipeline: vocabulary parity with HF, builder from a manual dir, tasks, mixture."""

import json
import pathlib
import re

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
seqio = pytest.importorskip("seqio")
tfds = pytest.importorskip("tensorflow_datasets")

from instructor_jax import medi_batches, medi_records, medi_seqio, medi_tfds, tokenization  # noqa: E402

SAMPLE = pathlib.Path(__file__).parent.parent / "data" / "medi_sample.jsonl"

TRICKY = [
    "two  spaces", "  leading and trailing  ", "tab\there", "new\nline", "cr\r\nlf", "paragraphs\n\n\nhere",
    "unicode: naïve café — “quotes” ‘single’ …", "東京は日本の首都です", "emoji 🙂👍🏽 🇩🇪", "digits 1234567890 3.14159 1,000,000",
    "fullwidth ＡＢＣ１２３", "ligatures ﬁ ﬀ ﬃ", "zero\u200bwidth", "nbsp\u00a0here", "ÄÖÜ äöü ß Straße İstanbul",
    "a\u0301 combining", "soft\u00adhyphen", "em\u2003space \u3000ideographic", "ｶﾀｶﾅ ①②③ ¼ ½ ™ ©", "", " ",
    "x" * 300, "<s> is not special in T5", "<extra_id_100> is not special either",
]
# Hugging Face reads these as special tokens; SentencePiece (and so seqio's vocabulary) spells them out.
SPECIAL = ["<extra_id_0> sentinel", "a</s>b", "x </s> y", "<pad> <unk>", "<extra_id_99>"]


@pytest.fixture(scope="module")
def tokenizer():
  return tokenization.Tokenizer.from_pretrained(None)


@pytest.fixture(scope="module")
def sample_texts():
  records = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines()]
  return [r[f][k] for r in records[::5] for f in ("query", "pos", "neg") for k in (0, 1)]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """A MEDI builder prepared from a manual dir holding the sample plus three bad records."""
  root = tmp_path_factory.mktemp("medi")
  manual = root / "manual"
  manual.mkdir()
  lines = SAMPLE.read_text(encoding="utf-8").splitlines()
  bad = [json.dumps({"query": ["", "q"], "pos": ["", "p"], "task_name": "x"}),
         json.dumps({"query": ["", "q"], "pos": ["", " "], "neg": ["", "n"], "task_name": "x"}),
         json.dumps({"query": "q", "pos": ["", "p"], "neg": ["", "n"], "task_id": 5})]
  (manual / "medi-data.jsonl").write_text("\n".join(lines[:3] + bad + lines[3:]) + "\n", encoding="utf-8")
  builder = medi_tfds.Medi(data_dir=str(root / "data"))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
  return str(root / "data")


def test_seqio_vocabulary_ids_equal_hf_on_real_and_tricky_text(tokenizer, sample_texts):
  vocab = medi_seqio.medi_vocabulary()
  assert vocab.vocab_size == 32000 and vocab.eos_id == tokenization.EOS_ID and vocab.unk_id == 2
  texts = sample_texts + TRICKY
  raw = [list(vocab.encode(t)) for t in texts]
  assert raw == tokenizer.encode_pieces(texts)
  assert list(vocab.encode("translate English to German: The house is wonderful.")) == [
      13959, 1566, 12, 2968, 10, 37, 629, 19, 1627, 5]


def test_special_token_strings_the_one_divergence_and_its_fix(tokenizer):
  vocab = medi_seqio.medi_vocabulary()
  hf = tokenizer.encode_pieces(SPECIAL)
  assert hf[0][0] == 32099 and hf[4] == [32000] and 1 in hf[1] and hf[3] == [0, 2]
  assert all(list(vocab.encode(t)) != h for t, h in zip(SPECIAL, hf))  # spelled out by SentencePiece
  assert medi_seqio.vocabulary_encode_fn(vocab)(SPECIAL + TRICKY) == tokenizer.encode_pieces(SPECIAL + TRICKY)
  assert medi_batches.sentencepiece_encode_fn()(SPECIAL + TRICKY) == tokenizer.encode_pieces(SPECIAL + TRICKY)


def test_builder_makes_a_split_per_task_and_reports_bad_records(data_dir):
  builder = medi_tfds.Medi(data_dir=data_dir)
  sizes = {name: info.num_examples for name, info in builder.info.splits.items()}
  assert sizes == {"msrp_paraphrase": 600, "sick_entailment": 600, "sick_relatedness": 454, "trecqa_answers": 251}
  meta = builder.info.metadata["validation"]
  assert meta["valid"] == 1905
  assert meta["skipped"] == {"missing key": 1, "empty text": 1, "not an [instruction, text] pair": 1}
  assert meta["first_skipped"] == {"missing key": [3], "empty text": [4], "not an [instruction, text] pair": [5]}
  ex = next(iter(tfds.as_numpy(builder.as_dataset(split="trecqa_answers").take(1))))
  assert ex["task_name"] == b"trecqa_answers" and ex["query_instruction"].startswith(b"Represent the question")
  assert not (pathlib.Path(data_dir) / "downloads" / "medi_by_task").exists()  # the staging copy, as large as MEDI


def test_split_names_are_tfds_safe_and_unique():
  assert medi_tfds.split_names(["a b", "a/b", "all", "ok-1", "x.y"]) == {
      "a b": "a_b", "a/b": "a_b_2", "all": "all_task", "ok-1": "ok-1", "x.y": "x_y"}
  # A valid name keeps itself; the renamed ones take the suffixes.
  assert medi_tfds.split_names(["a/b", "a b", "a_b"]) == {"a b": "a_b_2", "a/b": "a_b_3", "a_b": "a_b"}
  assert medi_tfds.split_names(["A", "a"]) == {"A": "A", "a": "a_2"}  # split files must differ on any filesystem


def test_a_task_name_without_an_ascii_letter_or_digit_gets_a_stable_split_name():
  """TFDS refuses a split with no alphanumeric character ("__" from "日本" was refused deep inside prepare)."""
  names = medi_tfds.split_names(["日本", "-", "!!!", "ok"])
  assert names["ok"] == "ok" and all(re.fullmatch(r"task_[0-9a-f]{8}", names[t]) for t in ("日本", "-", "!!!"))
  assert len(set(names.values())) == 4 and medi_tfds.split_names(["日本", "x"])["日本"] == names["日本"]


def test_prepare_and_read_back_tasks_with_awkward_names(tmp_path):
  """Every task comes back under its own name, whatever its split is called; the staging copy is gone."""
  tasks = ["日本", "-", "!!!", "a/b", "a_b", "all"]
  records = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines()[:2 * len(tasks)]]
  manual = tmp_path / "manual"
  manual.mkdir()
  (manual / "medi-data.json").write_text(json.dumps([dict(r, task_name=tasks[i % len(tasks)])
                                                     for i, r in enumerate(records)], ensure_ascii=False))
  data = tmp_path / "data"
  builder = medi_tfds.Medi(data_dir=str(data))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
  splits = medi_tfds.task_splits(medi_tfds.Medi(data_dir=str(data)))
  assert sorted(splits) == sorted(tasks) and splits["a_b"] == "a_b" and splits["a/b"] == "a_b_2"
  for task, split in splits.items():
    got = list(tfds.as_numpy(builder.as_dataset(split=split)))
    assert sorted(int(ex["index"]) for ex in got) == [i for i in range(len(records)) if tasks[i % len(tasks)] == task]
    assert {ex["task_name"].decode("utf-8") for ex in got} == {task}
  assert {name: len(t) for name, t in medi_seqio.load_tasks_from_builder(builder).items()} == dict.fromkeys(tasks, 2)
  assert not (data / "downloads" / "medi_by_task").exists()  # as large as MEDI


def test_an_unprepared_data_dir_says_how_to_prepare_it(tmp_path):
  with pytest.raises(FileNotFoundError, match="MEDI is not prepared in data_dir .*download_and_prepare.*"
                                               "downloads/manual"):
    medi_seqio.register_medi_tasks(str(tmp_path / "nothing_here"))
  version = tmp_path / "data" / "medi" / "1.0.0"  # the prepared dataset's own folder, given as data_dir
  version.mkdir(parents=True)
  (version / "dataset_info.json").write_text("{}")
  with pytest.raises(FileNotFoundError, match=f"is itself a prepared dataset's folder: pass the data_dir above it, "
                                              f"{tmp_path / 'data'}"):
    medi_seqio.register_medi_tasks(str(version))
  assert "<data_dir>/downloads/manual" in medi_tfds.Medi.MANUAL_DOWNLOAD_INSTRUCTIONS


def test_seqio_task_names_have_no_dash_and_stay_unique():
  assert medi_seqio.seqio_task_names({"a-b": "a-b", "a_b": "a_b", "c": "c", "a b": "a_b_2"}) == {
      "a_b": "medi.a_b", "a b": "medi.a_b_2", "c": "medi.c", "a-b": "medi.a_b_3"}


def test_tasks_whose_names_hold_a_dash_register_and_load(tmp_path):
  """TFDS split names keep '-', seqio task names may not hold it."""
  manual = tmp_path / "manual"
  manual.mkdir()
  lines = SAMPLE.read_text(encoding="utf-8").splitlines()[:8]
  records = [dict(json.loads(line), task_name=("msrp-paraphrase" if i < 4 else "msrp_paraphrase"))
             for i, line in enumerate(lines)]
  (manual / "medi-data.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
  data = str(tmp_path / "data")
  medi_tfds.Medi(data_dir=data).download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
  assert medi_seqio.register_medi_tasks(data) == {"msrp-paraphrase": "medi.msrp_paraphrase_2",
                                                  "msrp_paraphrase": "medi.msrp_paraphrase"}
  tasks = medi_seqio.load_tasks_from_builder(medi_tfds.Medi(data_dir=data))
  assert {name: len(t) for name, t in tasks.items()} == {"msrp-paraphrase": 4, "msrp_paraphrase": 4}


def test_seqio_task_output_equals_the_inference_tokenizer(data_dir, tokenizer):
  names = medi_seqio.register_medi_tasks(data_dir)
  assert names["trecqa_answers"] == "medi.trecqa_answers" and len(names) == 4
  records = {r.index: r for r in medi_records.iter_medi(str(SAMPLE), log=lambda _: None)}
  ds = seqio.get_mixture_or_task(names["sick_entailment"]).get_dataset(
      medi_seqio.sequence_lengths(12, 20), split="train", shuffle=False)
  examples = list(tfds.as_numpy(ds.take(40)))
  for field in medi_batches.FIELDS:
    max_len = 12 if field == "query" else 20
    items = [getattr(records[int(ex["index"]) - 3], field) for ex in examples]  # 3 bad lines inserted before
    want = tokenization.pad_batch(*tokenizer.tokenize(items, max_len), max_len)
    np.testing.assert_array_equal(np.stack([ex[f"{field}_ids"] for ex in examples]), want.ids)
    np.testing.assert_array_equal(np.stack([ex[f"{field}_mask"] for ex in examples]), want.mask)
    np.testing.assert_array_equal([ex[f"{field}_n_instr"] for ex in examples], want.n_instr)


def test_mixture_rates_are_size_weighted_capped_or_tempered(data_dir):
  rates = medi_seqio.register_medi_mixture("medi_test", data_dir, cap=454)
  assert rates == pytest.approx({"msrp_paraphrase": 454 / 1613, "sick_entailment": 454 / 1613,
                                 "sick_relatedness": 454 / 1613, "trecqa_answers": 251 / 1613})
  mixture = seqio.get_mixture_or_task("medi_test")
  assert {t.name: mixture.get_rate(t) for t in mixture.tasks} == pytest.approx(
      {f"medi.{t}": r for t, r in rates.items()})
  ex = next(iter(tfds.as_numpy(mixture.get_dataset(medi_seqio.sequence_lengths(8, 16), split="train").take(1))))
  assert ex["query_ids"].shape == (8,) and ex["pos_mask"].shape == (16,) and ex["neg_n_instr"].shape == ()


def test_global_batches_from_the_builder_equal_those_from_the_file(data_dir):
  kw = dict(global_batch_size=16, process_index=1, process_count=2, seed=5, query_len=16, doc_len=24, num_steps=12)
  from_builder = list(medi_batches.global_batches(medi_tfds.Medi(data_dir=data_dir), **kw))
  from_file = list(medi_batches.global_batches(str(SAMPLE), log_fn=lambda _: None, **kw))
  for (s, n, a), (s2, n2, b) in zip(from_builder, from_file, strict=True):
    assert (s, n) == (s2, n2)
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)


def test_manual_dir_without_medi_file_fails_clearly(tmp_path):
  (tmp_path / "manual").mkdir()
  (tmp_path / "manual" / "README.txt").write_text("not MEDI")
  builder = medi_tfds.Medi(data_dir=str(tmp_path / "data"))
  with pytest.raises(FileNotFoundError, match="medi-data.json"):
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(tmp_path / "manual")))
