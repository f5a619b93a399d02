"""Training on MEDI: padding every batch to query_len/doc_len vs to its length bucket vs packing it.

    python benchmarks/train_padding.py                      # the shipped sample, counts only
    python benchmarks/train_padding.py --medi /data/medi-data.json --steps 2000 --batch 1024
    python benchmarks/train_padding.py --time-steps 4       # also times train steps (t5-small shape)
    python benchmarks/train_padding.py --batch 32 --time-steps 4 --no-full-padding-time

For the first --steps global batches of the trainer's own stream (`global_batches`, seed 0) it
reports, per setting of `TrainConfig.length_buckets` and for `TrainConfig.pack_length`
(--pack-length): the share of padded positions that are
text, the model FLOPs per step (train_outputs.train_step_flops, the MFU numerator), the number of
distinct (query, document) lengths or packed row counts, i.e. compiled steps, and with --time-steps the wall time of
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

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from instructor_jax import medi_batches, medi_packing, tokenization, train_outputs  # noqa: E402
from instructor_jax.train_config import TrainConfig  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent


def stream(tasks, args, buckets, pack_length=0):
  """The trainer's batches (one batch shard): step 0 always at its largest shape (train._loop), the rest
  bucketed, or packed into rows of `pack_length`."""
  out = list(medi_batches.global_batches(None, tasks=tasks, global_batch_size=args.batch, num_steps=args.steps,
                                         query_len=args.query_len, doc_len=args.doc_len, length_buckets=buckets,
                                         pack_length=pack_length, log_fn=lambda _: None))
  step, task, first = out[0]
  out[0] = (step, task, medi_packing.pad_rows(first, medi_packing.max_rows(args.batch), 1) if pack_length
            else medi_batches.pad_batch_to(first, args.query_len, args.doc_len))
  return out


def shape_of(b):
  """(rows, pack length) of a packed batch, (query, document length) otherwise: one compiled step each."""
  if "packed_ids" in b:
    return ("packed",) + b["packed_ids"].shape
  return b["query_ids"].shape[1], b["pos_ids"].shape[1]


def counts(batches, model, batch_size):
  real = padded = flops = 0.0
  shapes = collections.Counter()
  for _, _, b in batches:
    shapes[shape_of(b)] += 1
    if "packed_ids" in b:
      rows, length = b["packed_ids"].shape
      real += float(np.count_nonzero(b["packed_segments"]))
      padded += rows * length
      flops += train_outputs.packed_step_flops(model, rows, length, texts=3 * batch_size)
      continue
    lq, ld = b["query_ids"].shape[1], b["pos_ids"].shape[1]
    real += sum(float(b[f"{r}_mask"].sum()) for r in ("query", "pos", "neg"))
    padded += batch_size * (lq + 2 * ld)
    flops += train_outputs.train_step_flops(model, batch_size, lq, ld)
  n = max(len(batches), 1)
  return {"text_share": real / max(padded, 1), "flops_per_step": flops / n, "shapes": len(shapes),
          "commonest_shapes": [f"{_shape_name(k)}: {c}" for k, c in shapes.most_common(4)]}


def row_ladder(batches, model, batch_size, ladder):
  """What packing each step into shorter rows would save: per step (step 0, the memory check, left
  out), the row length of `ladder` that holds the step's longest text with the fewest model FLOPs,
  against rows of the packed stream's own length; the texts' lengths are read off its segments."""
  fixed = best = real = fixed_pos = best_pos = 0.0
  chosen = collections.Counter()
  for _, _, b in batches[1:]:
    lengths = [int(n) for row in b["packed_segments"] for n in np.bincount(row)[1:] if n]
    options = []
    for length in sorted(set(ladder) | {b["packed_ids"].shape[1]}):
      if length >= max(lengths):
        rows = medi_packing.row_count(len(tokenization.pack_rows(lengths, length, medi_packing.texts_per_row(length))))
        options.append((train_outputs.packed_step_flops(model, rows, length, texts=3 * batch_size), rows, length))
    flops, rows, length = min(options)
    chosen[length] += 1
    real += sum(lengths)
    best, best_pos = best + flops, best_pos + rows * length
    fixed += train_outputs.packed_step_flops(model, *b["packed_ids"].shape, texts=3 * batch_size)
    fixed_pos += b["packed_ids"].size
  return {"row_lengths_chosen": dict(sorted(chosen.items())), "flops_saved": fixed / best,
          "text_share_fixed": real / fixed_pos, "text_share_best": real / best_pos}


def _shape_name(key) -> str:
  return f"{key[1]}x{key[2]} packed" if key[0] == "packed" else f"{key[0]}x{key[1]}"


def time_steps(batches, model, args):
  """Seconds for the batches' train steps, every shape compiled (and run once) beforehand."""
  import jax

  from instructor_jax import sharding as shd, train_step as ts
  from instructor_jax.optim import OptimConfig, make_optimizer
  mesh = shd.make_mesh(shd.MeshConfig(), jax.devices()[:1])
  tx, schedule = make_optimizer(OptimConfig(learning_rate=1e-5), 1000)
  state = ts.init_state(model, tx, mesh)
  step = ts.make_train_step(model, tx, schedule, mesh, packed="packed_ids" in batches[0][2])
  done = set()
  for _, _, b in batches:  # compile every shape first
    key = shape_of(b)
    if key not in done:
      state, metrics = step(state, shd.global_batch(b, mesh))
      jax.block_until_ready(metrics)
      done.add(key)
  start = time.perf_counter()
  for _, _, b in batches:
    state, metrics = step(state, shd.global_batch(b, mesh))
  jax.block_until_ready(metrics)
  return time.perf_counter() - start


def _ratios(rows, args) -> None:
  """FLOPs against padding to query_len/doc_len; time against it, or buckets with --no-full-padding-time."""
  base = rows["pad to query_len/doc_len"]
  timed_base = rows["TrainConfig default"] if args.no_full_padding_time else base
  for r in rows.values():
    r["flops_saved"] = base["flops_per_step"] / r["flops_per_step"]
    if "seconds" in r and "seconds" in timed_base:
      r["speedup"] = timed_base["seconds"] / r["seconds"]


def _write(args, rows) -> None:
  if args.out:
    tmp = pathlib.Path(args.out + ".tmp")
    tmp.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    tmp.replace(args.out)


def _encode_fn():
  """SentencePiece (the trainer's), else the inference tokenizer, which gives the same ids (tested in
  test_medi_batches) more slowly: the GPU machine's image has no sentencepiece."""
  try:
    import sentencepiece  # noqa: F401
    return None
  except ImportError:
    from instructor_jax import tokenization
    return tokenization.Tokenizer.from_pretrained(None).encode_pieces


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--medi", default=str(REPO / "data" / "medi_sample.jsonl"))
  p.add_argument("--steps", type=int, default=200)
  p.add_argument("--batch", type=int, default=8, help="global batch (triples)")
  p.add_argument("--query-len", type=int, default=512)
  p.add_argument("--doc-len", type=int, default=512)
  p.add_argument("--model", default="gtr-large", help="preset whose FLOPs are counted")
  p.add_argument("--pack-length", type=int, default=512, help="TrainConfig.pack_length of the packed row")
  p.add_argument("--time-steps", type=int, default=0, help="also time this many train steps, every way")
  p.add_argument("--time-shape", default="small", help="the model timed (benchmarks/run.py's SHAPES)")
  p.add_argument("--time-dtype", default="float32", help="compute dtype of the timed steps (bfloat16 on a GPU)")
  p.add_argument("--time-remat", default="none", help="TrainConfig.remat_policy of the timed steps")
  p.add_argument("--time-scan-layers", action="store_true",
                 help="TrainConfig.scan_layers for the timed steps (each shape compiles ~4x faster on a GPU)")
  p.add_argument("--no-full-padding-time", action="store_true",
                 help="time buckets and packing only (speed-ups then against buckets): 512/512 steps are slow")
  p.add_argument("--row-ladder", default="", help="also count packing each step into the shortest of these row "
                 "lengths (comma-separated) that costs the fewest FLOPs, e.g. 64,128,256")
  p.add_argument("--out")
  args = p.parse_args(argv)
  from instructor_jax.config import preset
  model = preset(args.model)
  tasks = medi_batches.load_tasks(args.medi, encode_fn=_encode_fn(), log_fn=lambda _: None)
  rows = {}
  packed_name = f"packed, rows of {args.pack_length}"
  settings = {"pad to query_len/doc_len": ((), 0), "TrainConfig default": (TrainConfig().length_buckets, 0),
              packed_name: ((), args.pack_length)}
  streams = {}
  for name, (buckets, pack_length) in settings.items():
    began = time.perf_counter()
    streams[name] = stream(tasks, args, buckets, pack_length)
    # Building the batches, per step (the stream's set-up and step 0's padding included, spread over the steps).
    host_ms = 1e3 * (time.perf_counter() - began) / max(len(streams[name]), 1)
    rows[name] = {"length_buckets": list(buckets), "pack_length": pack_length, "host_ms_per_step": host_ms,
                  **counts(streams[name], model, args.batch)}
  _ratios(rows, args)
  if args.row_ladder:
    ladder = [int(x) for x in args.row_ladder.split(",")]
    rows[packed_name]["row_ladder"] = ladder_row = row_ladder(streams[packed_name], model, args.batch, ladder)
    print(f"packed rows per step from {ladder + [args.pack_length]}: {ladder_row['flops_saved']:.3f}x fewer FLOPs "
          f"than rows of {args.pack_length} (steps 1..), text {100 * ladder_row['text_share_best']:.1f}% of positions "
          f"against {100 * ladder_row['text_share_fixed']:.1f}%; lengths chosen {ladder_row['row_lengths_chosen']}")
  # Written after the counts and after every timed setting: a run cut short (a device lease's time
  # limit) keeps what it measured.
  _write(args, rows)
  for name, (buckets, pack_length) in settings.items():
    if args.time_steps and not (args.no_full_padding_time and not buckets and not pack_length):
      from run import SHAPES
      # Steps 1.. (step 0 is the same full-length step both ways).
      timed = SHAPES[args.time_shape].with_encoder(dtype=args.time_dtype, remat_policy=args.time_remat,
                                                   scan_layers=args.time_scan_layers)
      rows[name]["seconds"] = time_steps(streams[name][1:1 + args.time_steps], timed, args)
      _ratios(rows, args)
      _write(args, rows)
  for name, r in rows.items():
    print(f"{name:28s} buckets {str(r['length_buckets']):20s} text {100 * r['text_share']:5.1f}% of positions | "
          f"{r['flops_per_step'] / 1e12:8.3f} TFLOP/step ({args.model}), {r['flops_saved']:.2f}x fewer | "
          f"{r['shapes']} shapes ({', '.join(r['commonest_shapes'])}) | host {r['host_ms_per_step']:.1f} ms/step"
          + (f" | {args.time_steps} steps of {args.time_shape} {r['seconds']:.2f} s, {r['speedup']:.2f}x"
             if "speedup" in r else ""))
  return rows


if __name__ == "__main__":
  main()
