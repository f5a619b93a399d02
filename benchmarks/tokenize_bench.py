"""Host-side tokenisation throughput: can the host feed the accelerator?

    python benchmarks/tokenize_bench.py [--docs 500] [--short 10000] [--repeats 3] [--out tok.json]

Kept tokens/s (the ids the model sees, EOS included) of `Tokenizer.tokenize` at max_seq_length 512
on real-text documents of three lengths and on short instructed sentences, four ways, run
interleaved (the order rotating), best of --repeats:
  leading    the default: long texts are encoded only as far as truncation keeps them
             (`tokenization.encode_leading`);
  whole      every text encoded whole, then truncated;
  before     the same through `encode_batch`, which also computes character offsets (this
             project before 2026-11-27; `encode_batch_fast` skips them);
  hf         the Hugging Face tokenizer call sentence-transformers makes (`truncation=True`,
             `max_length=512`; it too encodes whole texts), on the same model input strings.
All four must give the same ids (checked). The Rust tokenizer uses every core
(TOKENIZERS_PARALLELISM); the embed job tokenises in a reader thread beside the device loop, so
the accelerator waits on the host when the device's tokens/s exceed these.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from benchmarks import texts  # noqa: E402
from instructor_jax import tokenization  # noqa: E402
from instructor_jax.tokenization import Tokenizer  # noqa: E402

MAX_LEN = 512
INSTRUCTION = "Represent the Wikipedia document for retrieval: "


def cases(n_docs: int, n_short: int) -> dict[str, list]:
  out = {f"documents of ~{w} words": [(INSTRUCTION, d) for d in texts.documents(n_docs, w)] for w in (420, 2000, 10000)}
  out["short instructed sentences"] = texts.instructed_sentences(n_short)
  return out


def measure(tok: Tokenizer, items: list, repeats: int) -> dict:
  inputs = [tokenization.model_input_text(*item) for item in items]
  hf = tok.hf_tokenizer

  def with_offsets(batch):
    return [e.ids for e in tok._backend.encode_batch(list(batch), add_special_tokens=False)]

  def run(mode: str):
    if mode == "hf":
      return hf(inputs, truncation=True, max_length=MAX_LEN)["input_ids"]
    if mode == "before":
      return tokenization.build_inputs(with_offsets, items, MAX_LEN)[0]
    tok.whitespace_separable = mode == "leading"
    return tok.tokenize(items, MAX_LEN)[0]

  modes = ("leading", "whole", "before", "hf") if tok.whitespace_separable else ("whole", "before", "hf")
  best = {m: float("inf") for m in modes}
  out = {m: run(m) for m in modes}  # warm-up
  try:
    for r in range(repeats):
      for m in modes[r % len(modes):] + modes[:r % len(modes)]:  # rotated: no mode always runs first
        out[m] = None
        gc.collect()  # the previous mode's garbage is not collected on this one's time
        t = time.perf_counter()
        out[m] = run(m)
        best[m] = min(best[m], time.perf_counter() - t)
  finally:
    tok.whitespace_separable = "leading" in modes
  for m in modes:
    if out[m] != out["whole"]:
      raise SystemExit(f"tokenize_bench: the {m} ids differ from whole-text encoding; this is a bug.")
  kept = sum(len(x) for x in out["whole"])
  whole_pieces = sum(len(x) for x in tok.encode_pieces(inputs))
  return {"texts": len(items), "kept_tokens": kept, "whole_pieces_per_text": whole_pieces / len(items),
          "kept_tokens_per_s": {m: kept / s for m, s in best.items()}}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--docs", type=int, default=500)
  parser.add_argument("--short", type=int, default=10000)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--out")
  args = parser.parse_args(argv)
  tok = Tokenizer.from_pretrained(None, MAX_LEN)
  results = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": os.cpu_count(),
             "load": os.getloadavg()[0], "cases": {}}
  print(f"| texts (max_seq_length {MAX_LEN}) | pieces per text, whole | leading | whole | before | HF truncation=True "
        f"| leading / before |\n|---|---|---|---|---|---|---|")
  for name, items in cases(args.docs, args.short).items():
    r = measure(tok, items, args.repeats)
    results["cases"][name] = r
    rate = r["kept_tokens_per_s"]
    lead = rate.get("leading")
    print(f"| {name} | {r['whole_pieces_per_text']:,.0f} | " + (f"{lead:,.0f}" if lead else "off")
          + f" | {rate['whole']:,.0f} | {rate['before']:,.0f} | {rate['hf']:,.0f} | "
          + (f"{lead / rate['before']:.2f}×" if lead else "")
          + " |", flush=True)
    if args.out:  # after every case, so a run cut short by a time limit keeps what it measured
      with open(args.out + ".tmp", "w") as f:
        json.dump(results, f, indent=1)
      os.replace(args.out + ".tmp", args.out)
  print(f"kept tokens/s; {results['cpus']} CPUs, load {results['load']:.1f}, {results['date']}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
