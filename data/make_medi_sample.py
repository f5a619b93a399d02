"""Builds data/medi_sample.jsonl, a small real MEDI-format training file, from ../shared/data.

    python data/make_medi_sample.py [--data ../shared/data] [--out data/medi_sample.jsonl]

Four tasks, each record `{"query": [instr, text], "pos": [...], "neg": [...], "task_name": ...}`
with INSTRUCTOR-style instructions:
  sick_entailment   SICK train: premise -> entailed hypothesis; negative = a contradiction of the
                    same premise when SICK has one, else a random other hypothesis.
  sick_relatedness  SICK train: sentence -> a non-entailed but highly related (>= 4) sentence;
                    negative = a low-relatedness (<= 2) partner of the same sentence, else random.
  msrp_paraphrase   MSR Paraphrase train: sentence -> its paraphrase (label 1); negative = a
                    random sentence of another pair.
  trecqa_answers    TREC QA train: question -> an answer sentence (label 1); negative = a
                    candidate sentence judged not to answer it (a real hard negative).
Deterministic (fixed seed); see data/README.md for sources and licences.
"""

from __future__ import annotations

import argparse
import collections
import csv
import json
import os
import random

CAP_PER_TASK = 600
SEED = 20231126

SICK_PREMISE = "Represent the premise sentence for retrieving sentences it entails: "
SICK_HYPOTHESIS = "Represent the hypothesis sentence for retrieval: "
SIMILAR = "Represent the sentence for retrieving semantically similar sentences: "
NEWS_DUP = "Represent the news sentence for retrieving duplicate sentences: "
QUESTION = "Represent the question for retrieving sentences that answer it: "
ANSWER = "Represent the news sentence for retrieval: "


def _tsv(path: str) -> list[list[str]]:
  with open(path, encoding="utf-8-sig", newline="") as f:
    return list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]


def _record(task: str, q: tuple[str, str], p: tuple[str, str], n: tuple[str, str]) -> dict:
  return {"query": list(q), "pos": list(p), "neg": list(n), "task_name": task}


def sick(data: str, rng: random.Random) -> list[dict]:
  rows = _tsv(os.path.join(data, "sick2014", "SICK_train.txt"))
  partners = collections.defaultdict(list)
  for _, a, b, score, label in rows:
    partners[a].append((b, float(score), label))
  hypotheses = sorted({b for _, _, b, _, _ in rows})
  out = {"sick_entailment": [], "sick_relatedness": []}
  for _, a, b, score, label in rows:
    if label == "ENTAILMENT":
      neg = [x for x, _, l in partners[a] if l == "CONTRADICTION"]
      n = neg[0] if neg else rng.choice([h for h in hypotheses[:2000] if h not in (a, b)])
      out["sick_entailment"].append(_record("sick_entailment", (SICK_PREMISE, a), (SICK_HYPOTHESIS, b),
                                            (SICK_HYPOTHESIS, n)))
    elif float(score) >= 4.0:
      low = [x for x, s, _ in partners[a] if s <= 2.0]
      n = low[0] if low else rng.choice([h for h in hypotheses[:2000] if h not in (a, b)])
      out["sick_relatedness"].append(_record("sick_relatedness", (SIMILAR, a), (SIMILAR, b), (SIMILAR, n)))
  return [r for task in out.values() for r in task]


def msrp(data: str, rng: random.Random) -> list[dict]:
  rows = _tsv(os.path.join(data, "msr_para", "msr-para-train.tsv"))
  out = []
  for i, (label, _, _, s1, s2) in enumerate(rows):
    if label == "1":
      n = rows[(i + rng.randrange(1, len(rows))) % len(rows)][4]  # never its own pair
      out.append(_record("msrp_paraphrase", (NEWS_DUP, s1), (NEWS_DUP, s2), (NEWS_DUP, n)))
  return out


def trecqa(data: str, rng: random.Random) -> list[dict]:
  with open(os.path.join(data, "trecqa", "train.csv"), encoding="utf-8", newline="") as f:
    rows = list(csv.reader(f))[1:]
  answers = collections.defaultdict(lambda: ([], []))
  for q, label, a in rows:
    answers[q][int(label)].append(a)
  out = []
  for q, (negs, poss) in answers.items():
    for k, p in enumerate(poss[:8]):
      if negs:
        out.append(_record("trecqa_answers", (QUESTION, q), (ANSWER, p), (ANSWER, negs[k % len(negs)])))
  return out


def main() -> None:
  here = os.path.dirname(os.path.abspath(__file__))
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data", default=os.path.join(here, "..", "..", "shared", "data"))
  parser.add_argument("--out", default=os.path.join(here, "medi_sample.jsonl"))
  args = parser.parse_args()
  rng = random.Random(SEED)
  records = sick(args.data, rng) + msrp(args.data, rng) + trecqa(args.data, rng)
  by_task = collections.defaultdict(list)
  for r in records:
    by_task[r["task_name"]].append(r)
  sample = []
  for task in sorted(by_task):
    chosen = by_task[task]
    if len(chosen) > CAP_PER_TASK:
      chosen = [chosen[i] for i in sorted(rng.sample(range(len(chosen)), CAP_PER_TASK))]
    sample += chosen
    print(f"{task}: {len(chosen)} of {len(by_task[task])}")
  with open(args.out, "w", encoding="utf-8") as f:
    for r in sample:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")
  print(f"wrote {len(sample)} records to {args.out} ({os.path.getsize(args.out) / 1e6:.2f} MB)")


if __name__ == "__main__":
  main()
