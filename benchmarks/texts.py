"""Real texts for benchmarks: short sentences with instructions and ~512-token documents.

Sources, in order: `../shared/data` next to the checkout (SICK, STS, TREC QA), the repository's
own `tests/data/sentences.tsv` and `data/medi_sample.jsonl`, so the benchmark also runs on a
machine that received only the repository.
"""

from __future__ import annotations

import csv
import json
import pathlib
import random

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
INSTRUCTIONS = (
    "Represent the Wikipedia question for retrieving supporting documents: ",
    "Represent the sentence for retrieving duplicate sentences: ",
    "Represent the Science title: ",
)


def _shared_sentences() -> list[str]:
  out: list[str] = []
  sts = SHARED / "sts" / "2015.train.tsv"
  if sts.exists():
    for line in sts.read_text().splitlines():
      parts = line.split("\t")
      if len(parts) == 3:
        out += parts[1:]
  trec = SHARED / "trecqa" / "train.csv"
  if trec.exists():
    with open(trec) as f:
      for row in csv.DictReader(f):
        out += [row.get("qtext", ""), row.get("atext", "")]
  return [s for s in out if s.strip()]


def _repo_sentences() -> list[str]:
  out: list[str] = []
  tsv = ROOT / "tests" / "data" / "sentences.tsv"
  if tsv.exists():
    out += [line.split("\t", 1)[1] for line in tsv.read_text().splitlines()[1:]]
  medi = ROOT / "data" / "medi_sample.jsonl"
  if medi.exists():
    for line in medi.read_text().splitlines():
      record = json.loads(line)
      out += [record[k][1] for k in ("query", "pos", "neg") if k in record]
  return [s for s in out if s.strip()]


def sentences(n: int, seed: int = 0) -> list[str]:
  """n real sentences (repeated with a shuffle if the sources hold fewer)."""
  pool = _shared_sentences() or _repo_sentences()
  if not pool:
    raise FileNotFoundError(f"no benchmark text found under {SHARED} or in the repository's test data.")
  rng = random.Random(seed)
  out: list[str] = []
  while len(out) < n:
    chunk = list(pool)
    rng.shuffle(chunk)
    out += chunk
  return out[:n]


def instructed_sentences(n: int, seed: int = 0) -> list[tuple[str, str]]:
  """(instruction, sentence) pairs, cycling through realistic INSTRUCTOR instructions."""
  return [(INSTRUCTIONS[i % len(INSTRUCTIONS)], s) for i, s in enumerate(sentences(n, seed))]


def documents(n: int, words: int = 420, seed: int = 1) -> list[str]:
  """n documents of real sentences glued together (~`words` words, >= 512 T5 tokens)."""
  pool = sentences(max(4000, n * 30), seed)
  out, i = [], 0
  for _ in range(n):
    doc: list[str] = []
    count = 0
    while count < words:
      doc.append(pool[i % len(pool)])
      count += len(doc[-1].split())
      i += 1
    out.append(" ".join(doc))
  return out
