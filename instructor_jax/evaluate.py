r"""Quick evaluation of an embedding model: STS (Spearman) and answer reranking (MRR, MAP, nDCG@10).

    python -m instructor_jax.evaluate --model WORKDIR --step 20000 \
        --sts sts/2015.val.tsv --sts sick2014/SICK_test_annotated.txt --rerank trecqa/test.csv

Meant for checking checkpoints during and after training without torch or a network (MTEB, on a
`convert` export, is the full benchmark). Inputs:
- STS: `score<TAB>sentence1<TAB>sentence2` lines (SemEval STS), or SICK's tab-separated file with
  its header (`sentence_A`, `sentence_B`, `relatedness_score`). Metric: Spearman (and Pearson) of
  the cosine against the gold score, x100.
- Reranking: a CSV with header `qtext,label,atext` (TREC QA answer selection; label 1 = answers
  the question). Candidates are ranked by cosine to their question; questions with no positive or
  no negative candidate are skipped (TREC QA's "clean" setting) and counted. Metrics x100.
Every text is embedded once per instruction, whatever the number of pairs it appears in.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from typing import Any, Mapping, Sequence

import numpy as np

from instructor_jax.tokenization import InstructionCoversTextError

STS_INSTRUCTION = "Represent the sentence for semantic similarity: "
QUERY_INSTRUCTION = "Represent the question for retrieving supporting documents: "
DOC_INSTRUCTION = "Represent the document for retrieval: "


class EvalDataError(ValueError):
  """An evaluation file that cannot be read as the format it claims."""


def _read_text(path: str, what: str) -> str:
  """A whole evaluation file as text: local or gs://, UTF-8 (a BOM dropped); errors name the file."""
  from etils import epath  # local paths and gs:// alike (a pod's hosts read the same file)
  if not epath.Path(path).exists():
    raise FileNotFoundError(f"{path}: no such {what} file.")
  if epath.Path(path).is_dir():
    raise EvalDataError(f"{path} is a directory; expected a {what} file.")
  try:  # bytes, decoded here: epath's read_text does not honour every encoding (a BOM would stay)
    return epath.Path(path).read_bytes().decode("utf-8-sig")
  except UnicodeDecodeError as e:
    raise EvalDataError(f"{path}: not UTF-8 (byte {e.start}); save the file as UTF-8.") from None


def read_sts(path: str) -> tuple[list[tuple[str, str]], np.ndarray]:
  """(sentence pairs, gold scores) of a SemEval STS TSV or a SICK file (recognised by its header)."""
  lines = _read_text(path, "STS").splitlines()
  if not lines:
    raise EvalDataError(f"{path}: empty file; expected STS pairs.")
  header = lines[0].split("\t")
  if {"sentence_A", "sentence_B", "relatedness_score"} <= set(header):
    a, b, s = (header.index(k) for k in ("sentence_A", "sentence_B", "relatedness_score"))
    start = 2
  else:
    s, a, b, start = 0, 1, 2, 1
  pairs, gold = [], []
  expected = ("SICK columns sentence_A, sentence_B, relatedness_score" if start == 2 else
              "score<TAB>sentence1<TAB>sentence2 (a SICK file needs its header line)")
  for line_no, line in enumerate(lines[start - 1:], start):
    if not line.strip():
      continue
    fields = line.split("\t")
    # Exactly three fields in SemEval's format: SICK without its header, or an MSR paraphrase row,
    # would otherwise score an id column as the gold and compare the wrong texts.
    if (start == 1 and len(fields) != 3) or len(fields) <= max(a, b, s):
      raise EvalDataError(f"{path}:{line_no}: {len(fields)} tab-separated fields; expected {expected}, got "
                          f"{line[:80]!r}.")
    try:
      score = float(fields[s])
    except ValueError:
      score = float("nan")
    if not np.isfinite(score):
      raise EvalDataError(f"{path}:{line_no}: gold score {fields[s][:20]!r}; expected a finite number ({expected}).")
    if not fields[a].strip() or not fields[b].strip():
      raise EvalDataError(f"{path}:{line_no}: an empty sentence; expected {expected}.")
    pairs.append((fields[a], fields[b]))
    gold.append(score)
  if len(pairs) < 2 or len(set(gold)) < 2:
    raise EvalDataError(f"{path}: {len(pairs)} pair(s) with {len(set(gold))} distinct score(s); a correlation "
                        "needs at least two pairs with different gold scores.")
  return pairs, np.asarray(gold, np.float64)


def read_rerank(path: str) -> list[tuple[str, list[tuple[str, int]]]]:
  """[(question, [(candidate, label 0/1), ...]), ...] in file order, from a `qtext,label,atext` CSV."""
  groups: dict[str, list[tuple[str, int]]] = {}
  # Strict CSV: a stray quote is an error naming its line, where the lenient default silently glues
  # the following lines into one field.
  reader = csv.reader(io.StringIO(_read_text(path, "reranking CSV"), newline=""), strict=True)
  try:
    header = next(reader, [])
    missing = {"qtext", "label", "atext"} - set(header)
    if missing:
      raise EvalDataError(f"{path}: header {header}; expected the columns qtext, label, atext "
                          f"(missing {sorted(missing)}).")
    for fields in reader:
      if not fields:
        continue
      if len(fields) != len(header):
        raise EvalDataError(f"{path}:{reader.line_num}: {len(fields)} fields, but the header has {len(header)}.")
      row = dict(zip(header, fields))
      if row["label"] not in ("0", "1"):
        raise EvalDataError(f"{path}:{reader.line_num}: label {row['label']!r}; expected 0 or 1.")
      if not row["qtext"].strip() or not row["atext"].strip():
        raise EvalDataError(f"{path}:{reader.line_num}: an empty qtext or atext.")
      groups.setdefault(row["qtext"], []).append((row["atext"], int(row["label"])))
  except csv.Error as e:
    raise EvalDataError(f"{path}:{reader.line_num}: {e} (CSV quoting: a field with commas, quotes or line breaks "
                        "is enclosed in double quotes, and quotes inside it are doubled).") from None
  if not groups:
    raise EvalDataError(f"{path}: no rows under the header.")
  return list(groups.items())


def _ranks(x: np.ndarray) -> np.ndarray:
  """1-based ranks, ties sharing their average rank (as Spearman's rho needs)."""
  order = np.argsort(x, kind="stable")
  ranks = np.empty(len(x), np.float64)
  ranks[order] = np.arange(1, len(x) + 1)
  values, inverse = np.unique(x, return_inverse=True)
  sums = np.bincount(inverse, weights=ranks, minlength=len(values))
  return (sums / np.bincount(inverse, minlength=len(values)))[inverse]


def pearson(x: np.ndarray, y: np.ndarray) -> float:
  """NaN when any value is not finite (an overflowing model must not get a plausible score)."""
  if not (np.isfinite(x).all() and np.isfinite(y).all()):
    return float("nan")
  x, y = np.asarray(x, np.float64) - np.mean(x), np.asarray(y, np.float64) - np.mean(y)
  return float(np.sum(x * y) / np.sqrt(np.sum(x * x) * np.sum(y * y)))


def spearman(x: np.ndarray, y: np.ndarray) -> float:
  """NaN when any value is not finite (sorting would otherwise rank NaN highest)."""
  if not (np.isfinite(x).all() and np.isfinite(y).all()):
    return float("nan")
  return pearson(_ranks(np.asarray(x)), _ranks(np.asarray(y)))


def ranking_metrics(scores: Sequence[np.ndarray], labels: Sequence[np.ndarray], k: int = 10) -> dict[str, float]:
  """MRR, MAP and nDCG@k (binary gains) over queries; candidates sorted by score, ties in input order."""
  rr, ap, ndcg = [], [], []
  for s, y in zip(scores, labels):
    hits = np.asarray(y)[np.argsort(-np.asarray(s), kind="stable")]
    positions = np.flatnonzero(hits) + 1
    rr.append(1.0 / positions[0])
    ap.append(float(np.mean(np.arange(1, len(positions) + 1) / positions)))
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    ideal = discounts[:min(len(positions), k)].sum()
    ndcg.append(float((hits[:k] * discounts[:len(hits[:k])]).sum() / ideal))
  return {"mrr": float(np.mean(rr)), "map": float(np.mean(ap)), f"ndcg@{k}": float(np.mean(ndcg))}


def unit_rows(emb: np.ndarray) -> np.ndarray:
  return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)


def sts_scores(emb: Mapping[str, np.ndarray], pairs: Sequence[tuple[str, str]], gold: np.ndarray) -> dict[str, float]:
  """Spearman and Pearson (x100) of each pair's cosine against its gold score; `emb`: text -> unit vector."""
  cosine = np.array([float(emb[a] @ emb[b]) for a, b in pairs])
  return {"spearman": 100 * spearman(cosine, gold), "pearson": 100 * pearson(cosine, gold)}


def _embed(model: Any, texts: Sequence[str], instruction: str, batch_size: int) -> dict[str, np.ndarray]:
  """{text: unit-norm embedding}, each distinct text embedded once."""
  unique = list(dict.fromkeys(texts))
  try:
    emb = model.encode([[instruction, t] if instruction else t for t in unique], batch_size=batch_size)
  except InstructionCoversTextError as e:
    raise EvalDataError(f"text {unique[e.index]!r:.80}: {e.detail()}") from None
  return dict(zip(unique, unit_rows(emb)))


def evaluate_sts(model: Any, pairs: Sequence[tuple[str, str]], gold: np.ndarray,
                 instruction: str = STS_INSTRUCTION, batch_size: int = 64) -> dict[str, Any]:
  emb = _embed(model, [t for pair in pairs for t in pair], instruction, batch_size)
  return {"pairs": len(pairs), **sts_scores(emb, pairs, gold)}


def evaluate_rerank(model: Any, groups: Sequence[tuple[str, list[tuple[str, int]]]],
                    query_instruction: str = QUERY_INSTRUCTION, doc_instruction: str = DOC_INSTRUCTION,
                    batch_size: int = 64) -> dict[str, Any]:
  kept = [(q, c) for q, c in groups if 0 < sum(label for _, label in c) < len(c)]
  if not kept:
    raise EvalDataError("no question has both a positive and a negative candidate; nothing to rank.")
  queries = _embed(model, [q for q, _ in kept], query_instruction, batch_size)
  docs = _embed(model, [d for _, c in kept for d, _ in c], doc_instruction, batch_size)
  scores = [np.array([queries[q] @ docs[d] for d, _ in c]) for q, c in kept]
  labels = [np.array([label for _, label in c]) for _, c in kept]
  metrics = {name: 100 * value for name, value in ranking_metrics(scores, labels).items()}
  return {"questions": len(kept), "skipped_questions": len(groups) - len(kept), **metrics}


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m instructor_jax.evaluate", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", required=True, help="Hub id, sentence-transformers/HF dir, t5x or orbax checkpoint, "
                 "or a training workdir")
  p.add_argument("--step", type=int, default=None, help="step of an orbax workdir or t5x model dir (default: latest)")
  p.add_argument("--dtype", default="float32", help="compute dtype (default float32: evaluation sets are small)")
  p.add_argument("--max-seq-length", type=int, default=None)
  p.add_argument("--batch-size", type=int, default=64)
  p.add_argument("--sts", action="append", default=[], metavar="FILE", help="STS TSV or SICK file (repeatable)")
  p.add_argument("--rerank", action="append", default=[], metavar="FILE", help="qtext,label,atext CSV (repeatable)")
  p.add_argument("--sts-instruction", default=STS_INSTRUCTION)
  p.add_argument("--query-instruction", default=QUERY_INSTRUCTION)
  p.add_argument("--doc-instruction", default=DOC_INSTRUCTION)
  p.add_argument("--json", default=None, metavar="OUT", help="also write the results here as JSON")
  return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  parser = build_parser()
  args = parser.parse_args(argv)
  if not args.sts and not args.rerank:
    parser.error("nothing to evaluate: pass --sts FILE and/or --rerank FILE")
  from instructor_jax.hf_format import CheckpointError
  from instructor_jax.instructor import Instructor
  try:
    # Read every file before loading the model, so a typo fails in seconds; so is --json checked.
    sts = [(path, *read_sts(path)) for path in args.sts]
    rerank = [(path, read_rerank(path)) for path in args.rerank]
    if args.json:
      if os.path.isdir(args.json):
        raise EvalDataError(f"--json {args.json} is a directory; expected a file name to write the results to.")
      os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    kwargs = {} if args.step is None else {"step": args.step}
    model = Instructor.from_pretrained(args.model, dtype=args.dtype, max_seq_length=args.max_seq_length, **kwargs)
    results = {"model": model.source, "dtype": model.config.encoder.dtype, "sts": {}, "rerank": {}}
    for path, pairs, gold in sts:
      results["sts"][path] = _naming(path, evaluate_sts, model, pairs, gold, args.sts_instruction, args.batch_size)
      r = results["sts"][path]
      print(f"sts     {path}: {r['pairs']} pairs, Spearman {r['spearman']:.2f}, Pearson {r['pearson']:.2f}")
    for path, groups in rerank:
      results["rerank"][path] = _naming(path, evaluate_rerank, model, groups, args.query_instruction,
                                        args.doc_instruction, args.batch_size)
      r = results["rerank"][path]
      print(f"rerank  {path}: {r['questions']} questions ({r['skipped_questions']} without both labels skipped), "
            f"MRR {r['mrr']:.2f}, MAP {r['map']:.2f}, nDCG@10 {r['ndcg@10']:.2f}")
    if args.json:
      with open(args.json, "w") as f:
        json.dump(results, f, indent=1)
  except (EvalDataError, CheckpointError, OSError, ValueError) as e:  # OSError: FileNotFoundError, a bad --json
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(2) from None
  return results


def _naming(path: str, evaluate: Any, *args: Any) -> dict[str, Any]:
  """`evaluate(*args)`, an EvalDataError raised there naming the file whose data it concerns."""
  try:
    return evaluate(*args)
  except EvalDataError as e:
    raise EvalDataError(f"{path}: {e}") from None


if __name__ == "__main__":
  main()
