"""Training on MEDI: padding every batch to query_len/doc_len vs to its length bucket.

    python benchmarks/train_padding.py                      # the shipped sample, counts only
    python benchmarks/train_padding.py --medi /data/medi-data.json --steps 2000 --batch 1024
    python benchmarks/train_padding.py --time-steps 4       # also times train steps (t5-small shape)

For the first --steps global batches of the trainer's own stream (`global_batches`, seed 0) it
reports, per setting of `TrainConfig.length_buckets`: the share of padded positions that are
text, the model FLOPs per step (train_outputs.train_step_flops, the MFU numerator), the number of
distinct (query, document) lengths, i.e. compiled steps, and with --time-steps the wall time of
that many train steps (from step 1 on) on this machine, each shape compiled before timing. The FLOPs ratio is what
bucketing saves on a compute-bound accelerator; the timed ratio is what it saved here.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from instructor_jax import medi_batches, train_outputs  # noqa: E402
from instructor_jax.train_config import TrainConfig  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent


def stream(tasks, args, buckets):
  """The trainer's batches: step 0 always at query_len / doc_len (train._loop), the rest bucketed."""
  from instructor_jax.train import pad_batch_to
  out = list(medi_batches.global_batches(None, tasks=tasks, global_batch_size=args.batch, num_steps=args.steps,
                                         query_len=args.query_len, doc_len=args.doc_len, length_buckets=buckets,
                                         log_fn=lambda _: None))
  step, task, first = out[0]
  out[0] = (step, task, pad_batch_to(first, args.query_len, args.doc_len))
  return out


def counts(batches, model, batch_size):
  real = padded = flops = 0.0
  shapes = collections.Counter()
  for _, _, b in batches:
    lq, ld = b["query_ids"].shape[1], b["pos_ids"].shape[1]
    shapes[(lq, ld)] += 1
    real += sum(float(b[f"{r}_mask"].sum()) for r in ("query", "pos", "neg"))
    padded += batch_size * (lq + 2 * ld)
    flops += train_outputs.train_step_flops(model, batch_size, lq, ld)
  n = max(len(batches), 1)
  return {"text_share": real / max(padded, 1), "flops_per_step": flops / n, "shapes": len(shapes),
          "commonest_shapes": [f"{q}x{d}: {c}" for (q, d), c in shapes.most_common(4)]}


def time_steps(batches, model, args):
  """Seconds for the batches' train steps, every shape compiled (and run once) beforehand."""
  import jax

  from instructor_jax import sharding as shd, train_step as ts
  from instructor_jax.optim import OptimConfig, make_optimizer
  mesh = shd.make_mesh(shd.MeshConfig(), jax.devices()[:1])
  tx, schedule = make_optimizer(OptimConfig(learning_rate=1e-5), 1000)
  state = ts.init_state(model, tx, mesh)
  step = ts.make_train_step(model, tx, schedule, mesh)
  done = set()
  for _, _, b in batches:  # compile every shape first
    key = (b["query_ids"].shape[1], b["pos_ids"].shape[1])
    if key not in done:
      state, metrics = step(state, shd.global_batch(b, mesh))
      jax.block_until_ready(metrics)
      done.add(key)
  start = time.perf_counter()
  for _, _, b in batches:
    state, metrics = step(state, shd.global_batch(b, mesh))
  jax.block_until_ready(metrics)
  return time.perf_counter() - start


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--medi", default=str(REPO / "data" / "medi_sample.jsonl"))
  p.add_argument("--steps", type=int, default=200)
  p.add_argument("--batch", type=int, default=8, help="global batch (triples)")
  p.add_argument("--query-len", type=int, default=512)
  p.add_argument("--doc-len", type=int, default=512)
  p.add_argument("--model", default="gtr-large", help="preset whose FLOPs are counted")
  p.add_argument("--time-steps", type=int, default=0, help="also time this many train steps, both ways")
  p.add_argument("--time-shape", default="small", help="the model timed (benchmarks/run.py's SHAPES)")
  p.add_argument("--out")
  args = p.parse_args(argv)
  from instructor_jax.config import preset
  model = preset(args.model)
  tasks = medi_batches.load_tasks(args.medi, log_fn=lambda _: None)
  rows = {}
  settings = {"pad to query_len/doc_len": (), "TrainConfig default": TrainConfig().length_buckets}
  for name, buckets in settings.items():
    batches = stream(tasks, args, buckets)
    rows[name] = {"length_buckets": list(buckets), **counts(batches, model, args.batch)}
    if args.time_steps:
      from run import SHAPES
      # Steps 1.. (step 0 is the same full-length step both ways).
      rows[name]["seconds"] = time_steps(batches[1:1 + args.time_steps], SHAPES[args.time_shape], args)
  base = rows["pad to query_len/doc_len"]
  for name, r in rows.items():
    r["flops_saved"] = base["flops_per_step"] / r["flops_per_step"]
    if args.time_steps:
      r["speedup"] = base["seconds"] / r["seconds"]
    print(f"{name:28s} buckets {str(r['length_buckets']):16s} text {100 * r['text_share']:5.1f}% of positions | "
          f"{r['flops_per_step'] / 1e12:8.3f} TFLOP/step ({args.model}), {r['flops_saved']:.2f}x fewer | "
          f"{r['shapes']} shapes ({', '.join(r['commonest_shapes'])})"
          + (f" | {args.time_steps} steps of {args.time_shape} {r['seconds']:.2f} s, {r['speedup']:.2f}x" if args.time_steps
             else ""))
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
  return rows


if __name__ == "__main__":
  main()
