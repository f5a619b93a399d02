"""Does `python -m instructor_jax.embed` hide its host work behind the device's?

    python benchmarks/embed_job_overlap.py [--short 20000] [--docs 2000] [--parts 1,4]
                                           [--rates 350000,1000000] [--repeats 3] [--out job_overlap.json]

The job reads, tokenises, packs and pads on a reader thread, runs the batches from the main thread
and writes parts on a writer thread (instructor_jax/embed.py). What the device waits for is the
reader's first batch, and any stretch where the reader falls behind. The device is simulated as in
`encode_overlap.py` (each batch keeps a serial "device" busy for padded tokens / RATE seconds; a
fetch waits for it without the GIL), so this runs on a machine without an accelerator.

Cases: short instructed sentences and ~512-token documents with an instruction, written as JSONL,
each as a job of one part and of several (`--parts`, which sets --rows-per-part). Per case and rate:
the job's wall time (in-process, after a warm-up job; best of --repeats; Parquet written, manifest
included), the device's busy time per job (what a perfect overlap would take), and the job against an
infinitely fast device (its host work alone).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import pathlib
import shutil
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from benchmarks import texts  # noqa: E402
from benchmarks.encode_overlap import SimulatedDevice, tiny_instructor  # noqa: E402
from instructor_jax import embed  # noqa: E402
from instructor_jax.instructor import Instructor  # noqa: E402

DOC_INSTRUCTION = "Represent the Wikipedia document for retrieval: "


def write_input(path: pathlib.Path, items: list[tuple[str, str]]) -> None:
  with open(path, "w") as f:
    for instruction, text in items:
      f.write(json.dumps({"instruction": instruction, "text": text}) + "\n")


def run_job(model: Instructor, src: pathlib.Path, out: pathlib.Path, rows_per_part: int, rate: float,
            repeats: int, batch_tokens: int) -> tuple[float, float, dict]:
  """Best wall seconds of `repeats` jobs, the device's busy seconds per job, the last job's summary."""
  device = SimulatedDevice(rate, model.config.embedding_dim)
  sim = Instructor(model.config, model.params, model.tokenizer, mesh=model.mesh)
  sim.embed_batch_async = sim.embed_packed_async = device.run
  argv = ["--input", str(src), "--output", str(out), "--instruction-field", "instruction", "--overwrite",
          "--no-progress", "--rows-per-part", str(rows_per_part), "--batch-tokens", str(batch_tokens)]
  times, summary = [], {}
  for _ in range(repeats):
    start = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):  # the job's own summary (errors still raise)
      summary = embed.main(argv, model=sim)
    times.append(time.perf_counter() - start)
  return min(times), device.busy_s / repeats, summary


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--short", type=int, default=20000, help="instructed short sentences")
  parser.add_argument("--docs", type=int, default=2000, help="~512-token documents")
  parser.add_argument("--parts", default="1,4", help="parts per job, comma-separated")
  parser.add_argument("--rates", default="350000,1000000", help="simulated device padded tokens/s (inf: none)")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--batch-tokens", type=int, default=32768, help="the job's accelerator default")
  parser.add_argument("--out", default=None, help="JSON results")
  args = parser.parse_args(argv)
  import jax
  model = tiny_instructor()
  results: dict = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                   "backend": jax.default_backend(), "cases": {}}
  inputs = {f"{args.short} short instructed sentences": list(texts.instructed_sentences(args.short)),
            f"{args.docs} documents (512 tokens)": [(DOC_INSTRUCTION, d) for d in texts.documents(args.docs)]}
  rates = [float(r) for r in args.rates.split(",")] + [float("inf")]
  work = pathlib.Path(tempfile.mkdtemp(prefix="job_overlap_"))
  try:
    for name, items in inputs.items():
      src = work / "input.jsonl"
      write_input(src, items)
      for parts in [int(p) for p in args.parts.split(",")]:
        per_part = -(-len(items) // parts)
        label = f"{name}, {parts} part{'s' if parts > 1 else ''}"
        run_job(model, src, work / "out", per_part, float("inf"), 1, args.batch_tokens)  # warm-up
        case = results["cases"][label] = {}
        for rate in rates:
          wall, busy, summary = run_job(model, src, work / "out", per_part, rate, args.repeats, args.batch_tokens)
          key = "host alone" if rate == float("inf") else f"device {rate:,.0f} tok/s"
          case[key] = {"wall_s": wall, "device_s": busy, "tokens": summary["tokens"],
                       "padding_efficiency": summary["padding_efficiency"]}
          line = f"{label}, {key}: job {wall:.3f} s"
          if rate != float("inf"):
            line += f", device busy {busy:.3f} s, job / device {wall / busy:.2f}"
          print(line, flush=True)
        if args.out:
          pathlib.Path(args.out).write_text(json.dumps(results, indent=1))
  finally:
    shutil.rmtree(work, ignore_errors=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
