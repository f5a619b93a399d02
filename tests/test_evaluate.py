"""`python -m instructor_jax.evaluate`: metrics against independent computations, file formats, errors."""

import json

import numpy as np
import pytest
from embed_support import tiny_model

from instructor_jax import evaluate


@pytest.fixture(scope="module")
def model():
  return tiny_model()


def test_spearman_with_ties_matches_scipy():
  stats = pytest.importorskip("scipy.stats")  # not a dependency; test_spearman_by_hand needs none
  rng = np.random.default_rng(0)
  x, y = rng.integers(0, 5, 200).astype(float), rng.normal(size=200)  # many ties in x
  assert evaluate.spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
  assert evaluate.pearson(x, y) == pytest.approx(stats.pearsonr(x, y).statistic, abs=1e-12)


def test_non_finite_scores_give_nan_not_a_plausible_number():
  assert np.isnan(evaluate.spearman([1, 2, 2, 3, np.nan], [1, 2, 3, 4, 5]))
  assert np.isnan(evaluate.pearson([1, 2, np.inf], [1, 2, 3]))


def test_spearman_by_hand():
  # ranks of x: 1, 2.5, 2.5, 4; of y: 4, 3, 2, 1 -> Pearson of the ranks
  rx, ry = np.array([1, 2.5, 2.5, 4]), np.array([4, 3, 2, 1.0])
  assert evaluate.spearman([0.1, 0.5, 0.5, 0.9], [9, 7, 3, 1]) == pytest.approx(np.corrcoef(rx, ry)[0, 1])


def test_ranking_metrics_by_hand():
  # Query 1: positives land at ranks 2 and 3. Query 2: the positive ranks first.
  scores = [np.array([0.9, 0.8, 0.7, 0.1]), np.array([0.2, 0.9])]
  labels = [np.array([0, 1, 1, 0]), np.array([0, 1])]
  got = evaluate.ranking_metrics(scores, labels)
  assert got["mrr"] == pytest.approx((1 / 2 + 1) / 2)
  assert got["map"] == pytest.approx(((1 / 2 + 2 / 3) / 2 + 1) / 2)
  ndcg1 = (1 / np.log2(3) + 1 / np.log2(4)) / (1 + 1 / np.log2(3))
  assert got["ndcg@10"] == pytest.approx((ndcg1 + 1) / 2)


def _write(path, text):
  path.write_text(text, encoding="utf-8")
  return str(path)


def test_sts_formats_and_scores_equal_direct_computation(tmp_path, model):
  rows = [(4.5, "A man is playing a guitar.", "A man plays the guitar."),
          (0.5, "A cat sleeps.", "Stocks fell sharply today."),
          (3.0, "Two dogs run in a field.", "Dogs are running outside."),
          (1.2, "A woman cuts an onion.", "A man is playing a guitar.")]
  tsv = _write(tmp_path / "sts.tsv", "".join(f"{s}\t{a}\t{b}\n" for s, a, b in rows))
  sick = _write(tmp_path / "sick.txt", "pair_ID\tsentence_A\tsentence_B\trelatedness_score\tentailment_judgment\n"
                + "".join(f"{i}\t{a}\t{b}\t{s}\tNEUTRAL\n" for i, (s, a, b) in enumerate(rows)))
  for path in (tsv, sick):
    pairs, gold = evaluate.read_sts(path)
    assert pairs == [(a, b) for _, a, b in rows] and gold.tolist() == [s for s, _, _ in rows]
  instruction = "Represent the sentence: "
  got = evaluate.evaluate_sts(model, *evaluate.read_sts(tsv), instruction=instruction)
  emb = model.encode([[instruction, t] for _, a, b in rows for t in (a, b)])
  emb /= np.linalg.norm(emb, axis=1, keepdims=True)
  cosine = np.sum(emb[0::2] * emb[1::2], axis=1)
  assert got["pairs"] == 4
  assert got["spearman"] == pytest.approx(100 * evaluate.spearman(cosine, [s for s, _, _ in rows]))
  assert got["pearson"] == pytest.approx(100 * evaluate.pearson(cosine, [s for s, _, _ in rows]))


def test_cli_rerank_skips_one_sided_questions_and_writes_json(tmp_path, fixtures_dir, capsys):
  csv_path = _write(tmp_path / "qa.csv", "qtext,label,atext\n"
                    'Who wrote Hamlet ?,1,"Shakespeare wrote Hamlet , a tragedy ."\n'
                    "Who wrote Hamlet ?,0,The weather is mild in spring .\n"
                    "Who wrote Hamlet ?,0,Paris is the capital of France .\n"
                    "What is the capital of France ?,1,Paris is the capital of France .\n"
                    "What is the capital of France ?,0,The weather is mild in spring .\n"
                    "Only positives ?,1,Some answer .\n")
  sts = _write(tmp_path / "sts.tsv", "4\tA dog runs.\tA dog is running.\n1\tA dog runs.\tThe market crashed.\n"
               "2.5\tA cat sits.\tA cat is sitting on a mat.\n")
  out = tmp_path / "results.json"
  results = evaluate.main(["--model", str(fixtures_dir / "tiny_instructor"), "--rerank", csv_path, "--sts", sts,
                           "--json", str(out)])
  assert json.loads(out.read_text()) == results
  r = results["rerank"][csv_path]
  assert r["questions"] == 2 and r["skipped_questions"] == 1
  assert all(0 < r[k] <= 100 for k in ("mrr", "map", "ndcg@10"))
  printed = capsys.readouterr().out
  assert "2 questions (1 without both labels skipped)" in printed and "3 pairs, Spearman" in printed


@pytest.mark.parametrize("name, text, message", [
    ("bad.tsv", "4\tA dog runs.\tA dog is running.\nnot a score\tx\ty\n",
     r"bad.tsv:2: gold score 'not a score'; expected a finite number \(score<TAB>sentence1"),
    ("nan.tsv", "4\ta\tb\nnan\tc\td\n", r"nan.tsv:2: gold score 'nan'; expected a finite number"),
    ("short.tsv", "4\tonly one sentence\n", r"short.tsv:1: 2 tab-separated fields; expected score<TAB>sentence1"),
    # SICK without its header: its pair_ID column would be read as the gold score.
    ("sick_rows.txt", "1\tA dog runs.\tA dog is running.\t4.5\tENTAILMENT\n",
     r"sick_rows.txt:1: 5 tab-separated fields; expected .*\(a SICK file needs its header line\)"),
    ("blank.tsv", "4\ta\tb\n3\t \tfoo bar\n", r"blank.tsv:2: an empty sentence"),
    ("empty.tsv", "", "empty file"),
    ("one.tsv", "4\tA dog runs.\tA dog is running.\n\n", "1 pair\\(s\\) with 1 distinct score"),
    ("flat.tsv", "3\ta\tb\n3\tc\td\n", "2 pair\\(s\\) with 1 distinct score"),
])
def test_bad_sts_files_name_file_and_line(tmp_path, name, text, message):
  with pytest.raises(evaluate.EvalDataError, match=message):
    evaluate.read_sts(_write(tmp_path / name, text))


def test_a_byte_order_mark_is_read(tmp_path):
  sts = tmp_path / "bom.tsv"
  sts.write_bytes("\ufeff4\ta\tb\n1\tc\td\n".encode("utf-8"))
  assert evaluate.read_sts(str(sts))[1].tolist() == [4.0, 1.0]
  csv_path = tmp_path / "bom.csv"
  csv_path.write_bytes("\ufeffqtext,label,atext\nq,1,a\nq,0,b\n".encode("utf-8"))
  assert evaluate.read_rerank(str(csv_path)) == [("q", [("a", 1), ("b", 0)])]


def test_bad_rerank_files_and_nothing_to_do(tmp_path, capsys):
  with pytest.raises(evaluate.EvalDataError, match=r"expected the columns qtext, label, atext \(missing \['label'\]\)"):
    evaluate.read_rerank(_write(tmp_path / "a.csv", "qtext,atext\nq,a\n"))
  with pytest.raises(evaluate.EvalDataError, match=r"b.csv:3: label 'yes'; expected 0 or 1"):
    evaluate.read_rerank(_write(tmp_path / "b.csv", "qtext,label,atext\nq,1,a\nq,yes,b\n"))
  for name, text, message in (
      ("short.csv", "qtext,label,atext\nq,1,a\nq,1\n", r"short.csv:3: 2 fields, but the header has 3"),
      ("extra.csv", "qtext,label,atext\nq,1,a,b\n", r"extra.csv:2: 4 fields, but the header has 3"),
      # A stray quote: the lenient reader glued the following lines into one field.
      ("stray.csv", 'qtext,label,atext\nq,1,"an open quote\nq,0,b\n', r"stray.csv:\d+: .*CSV quoting"),
      ("empty_text.csv", "qtext,label,atext\nq,1,\n", r"empty_text.csv:2: an empty qtext or atext")):
    with pytest.raises(evaluate.EvalDataError, match=message):
      evaluate.read_rerank(_write(tmp_path / name, text))
  (tmp_path / "latin1.csv").write_bytes("qtext,label,atext\nq,1,caf\xe9\n".encode("latin-1"))
  with pytest.raises(evaluate.EvalDataError, match=r"latin1.csv: not UTF-8 \(byte \d+\); save the file as UTF-8"):
    evaluate.read_rerank(str(tmp_path / "latin1.csv"))
  with pytest.raises(FileNotFoundError, match=r"missing.csv: no such reranking CSV file"):
    evaluate.read_rerank(str(tmp_path / "missing.csv"))
  with pytest.raises(evaluate.EvalDataError, match=r"is a directory; expected a STS file"):
    evaluate.read_sts(str(tmp_path))
  with pytest.raises(SystemExit) as e:  # a bad file fails before any model is loaded
    evaluate.main(["--model", "never/loaded", "--sts", str(tmp_path / "missing.tsv")])
  assert e.value.code == 2 and "missing.tsv" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    evaluate.main(["--model", "never/loaded"])


def test_an_instruction_covering_a_text_is_one_error_line(tmp_path, fixtures_dir, capsys):
  sts = _write(tmp_path / "sts.tsv", "4\tA dog runs.\tend\n1\tA dog runs.\tThe market crashed.\n")
  with pytest.raises(SystemExit) as e:
    evaluate.main(["--model", str(fixtures_dir / "tiny_instructor"), "--sts", sts, "--sts-instruction", "compreh"])
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith(f"error: {sts}: text 'end': the instruction 'compreh' alone tokenises to 3 pieces"), err
  assert "Traceback" not in err


def test_a_bad_json_destination_fails_before_the_model_loads(tmp_path, capsys):
  sts = _write(tmp_path / "sts.tsv", "4\tA dog runs.\tA dog is running.\n1\tA cat.\tThe market crashed.\n")
  with pytest.raises(SystemExit) as e:
    evaluate.main(["--model", "never/loaded", "--sts", sts, "--json", str(tmp_path)])
  assert e.value.code == 2
  assert f"--json {tmp_path} is a directory" in capsys.readouterr().err
