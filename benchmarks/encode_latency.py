"""Latency of small `Instructor.encode` calls: a call's last batch padded to a power of two rows, or to `batch_size`.

    python benchmarks/encode_latency.py                       # small shape, 1 / 3 / 40 queries, batch_size 32 and 512
    python benchmarks/encode_latency.py --shape tiny --repeats 1 --out latency.json   # a smoke run

A call's last (or only) packed and bucketed batch used to be padded to `batch_size` rows, so one
query cost `batch_size` rows of 128 tokens: what a search service embedding one query per request
pays. Now it is padded to the next power of two rows times the device count
(`encode_batches.BatchSpec.rows_for`). Both are timed in one process on the same model and texts:
`full rows` replaces `rows_for` with the old rule. Every shape is compiled before the timing (a
service warms up once); reported: best wall time of --repeats calls, milliseconds, and the ratio.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from benchmarks.run import SHAPES, build_models  # noqa: E402
from instructor_jax import encode_batches  # noqa: E402

QUERY = ["Represent the question for retrieving supporting documents: ", "what is the capital of France?"]


def _best_ms(model, items, batch_size: int, repeats: int) -> float:
  model.encode(items, batch_size=batch_size)  # compiles this call's shapes
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    model.encode(items, batch_size=batch_size)
    best = min(best, time.perf_counter() - start)
  return 1000 * best


def main(argv: list[str] | None = None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--shape", default="small", choices=sorted(SHAPES))
  p.add_argument("--calls", default="1,3,40", help="texts per call, comma-separated")
  p.add_argument("--batch-sizes", default="32,512")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--out", default=None)
  args = p.parse_args(argv)
  import jax
  model, _, _ = build_models(SHAPES[args.shape].replace(max_seq_length=512), None)
  full_rows = lambda spec, n: spec.rows  # the rule before: every batch has `rows` rows
  rows_for = encode_batches.BatchSpec.rows_for
  rows = []
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} x{model.mesh.devices.size}, shape {args.shape}, "
        f"best of {args.repeats}")
  for batch_size in (int(x) for x in args.batch_sizes.split(",")):
    for n in (int(x) for x in args.calls.split(",")):
      items = [[QUERY[0], f"{QUERY[1]} ({i})"] for i in range(n)]
      times = {}
      for name, rule in (("full rows", full_rows), ("power of two", rows_for)):
        encode_batches.BatchSpec.rows_for = rule
        try:
          times[name] = _best_ms(model, items, batch_size, args.repeats)
        finally:
          encode_batches.BatchSpec.rows_for = rows_for
      row = {"texts": n, "batch_size": batch_size, **{f"{k} ms": round(v, 2) for k, v in times.items()},
             "speed-up": round(times["full rows"] / times["power of two"], 2)}
      rows.append(row)
      print(f"  {n:4d} texts, batch_size {batch_size:4d}: {times['full rows']:9.2f} ms padded to batch_size, "
            f"{times['power of two']:8.2f} ms to a power of two  x{row['speed-up']}")
  result = {"jax": jax.__version__, "device": jax.devices()[0].device_kind, "devices": model.mesh.devices.size,
            "shape": args.shape, "repeats": args.repeats, "rows": rows}
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps(result, indent=1))
  return result


if __name__ == "__main__":
  main()
