"""BENCHMARKS.md section from the JSON that benchmarks/run.py (or gpu_all.sh) wrote.

  python benchmarks/report.py $OUT/embed.json $OUT/train.json [$OUT/embed_cudnn.json] > section.md

Every ratio is against the baseline measured in the same run (same process, same machine), and
each file's machine, date, versions and command are printed with its rows. Issue 7's GPU targets
are marked met / not met where a row measures one.
"""

from __future__ import annotations

import json
import sys

TARGETS = {"short+instruction": 3.0, "512-token docs": 4.0}  # x sentence-transformers, on GPU
MFU_TARGET, MFU_MIN_BATCH, MFU_MIN_LENGTH = 0.40, 256, 256
MIN_COSINE = 0.999  # embeddings must match for a speed figure to count
# The packed and job rows count towards a speed target only if their outputs equal `encode`'s
# (float rounding; unit-norm embeddings): a broken fast path must not meet a target.
MAX_ROW_DIFF = 1e-2


def _verdict(ok: bool) -> str:
  return "**met**" if ok else "not met"


def _attention(r: dict) -> str:
  impl, kernel = r.get("attention_impl", "?"), r.get("attention_kernel")
  return impl if kernel in (None, impl) else f"{impl} ({kernel})"


def header(r: dict) -> list[str]:
  return [f"### {r['device']} ({r['backend']}), {r['date']}, shape {r['shape']}, {r['dtype']}, "
          f"attention {_attention(r)}", "",
          f"`{r.get('command', 'python benchmarks/run.py')}` — JAX {r['jax']}, torch {r.get('torch', '?')}, "
          f"transformers {r.get('transformers', '?')}, sentence-transformers {r.get('sentence_transformers', '?')}", ""]


def embed_rows(r: dict) -> list[str]:
  gpu = r["backend"] == "gpu"
  head = "| embed | rows | instructor_jax tok/s | sentence-transformers tok/s | ratio | min cosine |"
  out = [head + (" target (best of the three rows, cosine ≥ 0.999) |" if gpu else ""),
         "|---|---|---|---|---|---|" + ("---|" if gpu else "")]
  for e in r.get("embed", []):
    ratios = [e["speedup"]]
    ratios += [e["packed_speedup"]] if e.get("packed_max_abs_diff", 1.0) <= MAX_ROW_DIFF else []
    ratios += [e["job_speedup"]] if e.get("job_max_abs_diff", 1.0) <= MAX_ROW_DIFF else []
    target = TARGETS.get(e["case"])
    verdict = ""
    if gpu and target:
      why = "" if e["min_cosine"] >= MIN_COSINE else f", cosine {e['min_cosine']:.4f} < {MIN_COSINE}"
      verdict = f" {_verdict(max(ratios) >= target and not why)} (≥ {target:g}×{why}) |"
    elif gpu:
      verdict = " |"
    out.append(f"| {e['case']}, `encode(pack=False)` | {e['rows']} | {e['ours_tok_s']:,.0f} | {e['st_tok_s']:,.0f} | "
               f"{e['speedup']:.2f}× | {e['min_cosine']:.5f} |{verdict}")
    if "ours_packed_tok_s" in e:  # not measured for documents: none fits a 128-token row
      out.append(f"| same, `encode(pack=True)`, the job's rows per batch | | {e['ours_packed_tok_s']:,.0f} | | "
                 f"{e['packed_speedup']:.2f}× | |" + (" |" if gpu else ""))
    out.append(f"| same, embed job ({e.get('job_format', 'parquet')} out) | | {e['job_tok_s']:,.0f} | | "
               f"{e['job_speedup']:.2f}× | |" + (" |" if gpu else ""))
  return out


def _memory(t: dict) -> str:
  """XLA's temp buffers of our compiled step (activations and the like), or PyTorch's peak allocation."""
  if "temp_gib" in t:
    return f"XLA temp {t['temp_gib']:.1f} GiB"
  return f"peak {t['peak_gib']:.1f} GiB" if "peak_gib" in t else ""


def train_rows(r: dict) -> list[str]:
  rows = r.get("train", [])
  torch_at: dict[int, dict] = {}  # the strongest PyTorch row at each batch is the baseline
  for t in rows:  # rows cut short ("running") or failed have no tok_s
    if t["impl"].startswith("pytorch") and "tok_s" in t and t["tok_s"] > torch_at.get(t["batch"], {}).get("tok_s", 0):
      torch_at[t["batch"]] = t
  out = ["| train step | triples × tokens | tok/s | MFU (measured peak) | MFU (data sheet) | "
         "vs fastest PyTorch at that batch | max batch ≥ | memory | note |",
         "|---|---|---|---|---|---|---|---|---|"]
  for t in rows:
    if "error" in t or t.get("status") == "running":
      why = t["error"][:80] if "error" in t else f"cut short by the time limit (started {t.get('started', '?')})"
      if "temp_gib" in t:  # XLA's compiled estimate: how far over the card an out-of-memory row was
        why += f" (XLA temp {t['temp_gib']:.1f} GiB + arguments {t.get('argument_gib', 0):.1f} GiB)"
      out.append(f"| {t['impl']} | {t['batch']} × {t['length']} | – | – | – | – | – | – | {why} |")
      continue
    base = torch_at.get(t["batch"])
    ratio = f"{t['tok_s'] / base['tok_s']:.2f}× ({base['impl']})" if base and t["impl"].startswith("jax") else ""
    mfu, spec = t.get("mfu"), t.get("mfu_spec")
    notes = []
    # Other recipes: no ratio to the PyTorch rows, and no MFU verdict (both drop everything at 0.1).
    nodrop = t["impl"].endswith(("-nodrop", "-noattndrop"))
    if nodrop:
      ratio = ""
      notes.append("dropout 0 (the other rows 0.1)" if t["impl"].endswith("-nodrop") else
                   "attention dropout 0, the other dropouts 0.1 (the other rows: all 0.1)")
    if (r["backend"] == "gpu" and t["impl"].startswith("jax") and not nodrop and t["batch"] >= MFU_MIN_BATCH
        and t["length"] >= MFU_MIN_LENGTH and mfu is not None):
      notes.append(f"MFU target {_verdict(mfu >= MFU_TARGET)} (≥ {MFU_TARGET:.0%})")
    if mfu is not None and mfu > 1:
      notes.append("MFU > 100%: the peak measurement was disturbed (machine load); re-measure")
    note = "; ".join(notes)
    out.append(f"| {t['impl']} | {t['batch']} × {t['length']} | {t['tok_s']:,.0f} | "
               f"{'' if mfu is None else f'{mfu:.1%}'} | {'' if spec is None else f'{spec:.1%}'} | {ratio} | "
               f"{t.get('max_batch_at_least', '')} | {_memory(t)} | {note} |")
  return out


def missing_rows(r: dict) -> list[str]:
  """What the run planned and did not measure (a step cut short by its time limit, or killed)."""
  planned = r.get("planned", {})
  embedded = {e["case"] for e in r.get("embed", [])}
  trained = {f"{t['impl']}@{t['batch']}" for t in r.get("train", [])}
  missing = [f"embed {c}" for c in planned.get("embed", []) if c not in embedded]
  missing += [f"train {v}" for v in planned.get("train", []) if v not in trained]
  out = []
  if r.get("complete") is False:
    out.append("**This run did not finish** (cut short by its time limit or killed): the rows above are what it "
               "measured" + (f"; never measured: {', '.join(missing)}." if missing else "."))
  elif missing:
    out.append(f"Never measured: {', '.join(missing)}.")
  return out + [""] if out else []


def section(results: list[dict]) -> str:
  lines: list[str] = []
  for r in results:
    lines += header(r)
    if "load_average_start" in r:
      end = r.get("load_average_end")
      lines += [f"Machine load (1-min average) {r['load_average_start'][0]:.1f} at the start"
                + (f", {end[0]:.1f} at the end" if end else "") + f"; torch threads {r.get('torch_threads', '?')}.", ""]
    if "matmul" in r:
      m = r["matmul"]
      lines += [f"Matmul peak in the same run ({r['dtype']}): JAX {m['jax_tflops']:.2f} TFLOP/s, "
                f"torch {m['torch_tflops']:.2f} TFLOP/s.", ""]
    if r.get("embed"):
      lines += embed_rows(r) + [""]
    if r.get("train"):
      lines += train_rows(r) + [""]
    lines += missing_rows(r)
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  paths = sys.argv[1:] if argv is None else argv
  if not paths:
    print(__doc__, file=sys.stderr)
    return 2
  results, missing = [], []
  for path in paths:  # a step cut short may have left no file: report the others
    try:
      with open(path) as f:
        results.append(json.load(f))
    except (OSError, json.JSONDecodeError) as e:
      missing.append(f"{path}: {type(e).__name__}: {e}")
  print(section(results))
  for m in missing:
    print(f"\n(not reported: {m})")
  return 0 if results else 1


if __name__ == "__main__":
  sys.exit(main())
