"""MEDI pipeline throughput per host, in triples/s, for 256-token documents (pinned to one core).

    python benchmarks/medi_pipeline.py [--triples 8192] [--global-batch 1024] [--steps 40] [--seqio]

Documents are real sentences of data/medi_sample.jsonl concatenated until they exceed 256 tokens
(truncated to doc_len=256 by the rule); queries are the sample's real queries (query_len=64).
Reports three figures:
  batches   steady state of `global_batches` (what the trainer waits on every step): pick the
            task, gather, truncate, pad, mask; host 0 of --hosts.
  tokenise  the one-off read + validation + tokenisation at start-up (SentencePiece, one core);
            a restart memory-maps the token cache instead (`cache_dir`).
  seqio     (--seqio) on-the-fly seqio task over a prepared TFDS builder, tokenising in tf.data.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import tempfile
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

REPO = pathlib.Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "medi_sample.jsonl"


def make_long_medi(path: str, n: int, tokenizer, doc_tokens: int = 256) -> None:
  """A MEDI .jsonl of n triples with real-text documents longer than doc_tokens."""
  records = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines()]
  sentences = [r[f][1] for r in records for f in ("pos", "neg")]
  lengths = [len(x) for x in tokenizer.encode_pieces(sentences)]
  docs, cur, cur_len = [], [], 0
  for s, k in zip(sentences * 8, lengths * 8):
    cur.append(s)
    cur_len += k
    if cur_len > doc_tokens + 8:
      docs.append(" ".join(cur))
      cur, cur_len = [], 0
  with open(path, "w", encoding="utf-8") as f:
    for i in range(n):
      r = records[i % len(records)]
      out = {"query": r["query"], "pos": [r["pos"][0], docs[(2 * i) % len(docs)]],
             "neg": [r["neg"][0], docs[(2 * i + 1) % len(docs)]], "task_name": r["task_name"]}
      f.write(json.dumps(out) + "\n")


def bench_batches(tasks, args) -> float:
  from instructor_jax import medi_batches
  it = medi_batches.global_batches(None, tasks=tasks, global_batch_size=args.global_batch,
                                   process_count=args.hosts, process_index=0, seed=0, query_len=64,
                                   doc_len=256, num_steps=args.steps + 3)
  for _ in range(3):
    next(it)
  start, rows, full = time.perf_counter(), 0, 0
  for _, _, batch in it:
    rows += batch["pos_ids"].shape[0]
    full += int((batch["pos_mask"].sum(1) == 256).sum())
  rate = rows / (time.perf_counter() - start)
  print(f"batches : {rate:,.0f} triples/s per host (global batch {args.global_batch}, {args.hosts} host(s), "
        f"{full / rows:.0%} of documents at the full 256 tokens)")
  return rate


def bench_seqio(path: str, args) -> float:
  import seqio
  import tensorflow as tf
  import tensorflow_datasets as tfds
  from instructor_jax import medi_seqio, medi_tfds
  tf.config.threading.set_inter_op_parallelism_threads(1)
  tf.config.threading.set_intra_op_parallelism_threads(1)
  with tempfile.TemporaryDirectory() as tmp:
    manual = os.path.join(tmp, "manual")
    os.makedirs(manual)
    os.link(path, os.path.join(manual, "medi-data.jsonl"))
    builder = medi_tfds.Medi(data_dir=os.path.join(tmp, "data"))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual))
    names = medi_seqio.register_medi_tasks(os.path.join(tmp, "data"))
    task = seqio.get_mixture_or_task(sorted(names.values())[0])
    ds = task.get_dataset(medi_seqio.sequence_lengths(64, 256), split="train", shuffle=False, num_epochs=None)
    it = iter(tfds.as_numpy(ds.batch(256)))
    next(it)
    start = time.perf_counter()
    n = sum(next(it)["pos_ids"].shape[0] for _ in range(12))
    rate = n / (time.perf_counter() - start)
  print(f"seqio   : {rate:,.0f} triples/s (seqio task over TFDS, tokenising on the fly, 1 TF thread)")
  return rate


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--triples", type=int, default=12288)
  parser.add_argument("--global-batch", type=int, default=1024)
  parser.add_argument("--hosts", type=int, default=1)
  parser.add_argument("--steps", type=int, default=40)
  parser.add_argument("--core", type=int, default=0)
  parser.add_argument("--seqio", action="store_true")
  args = parser.parse_args()
  os.sched_setaffinity(0, {args.core})
  from instructor_jax import medi_batches, tokenization
  tokenizer = tokenization.Tokenizer.from_pretrained(None)
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "medi-data.jsonl")
    make_long_medi(path, args.triples, tokenizer)
    start = time.perf_counter()
    tasks = medi_batches.load_tasks(path, log_fn=lambda _: None, cache_dir=os.path.join(tmp, "cache"))
    took = time.perf_counter() - start
    print(f"tokenise: {args.triples / took:,.0f} triples/s (one-off at start-up: read, validate, tokenise "
          f"{args.triples} triples with SentencePiece, one core, write the token cache)")
    start = time.perf_counter()
    medi_batches.load_tasks(path, log_fn=lambda _: None, cache_dir=os.path.join(tmp, "cache"))
    print(f"restart : {time.perf_counter() - start:.3f} s to memory-map the token cache")
    bench_batches(tasks, args)
    if args.seqio:
      bench_seqio(path, args)


if __name__ == "__main__":
  main()
