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
MFU_TARGET, MFU_MIN_BATCH = 0.40, 256


def _verdict(ok: bool) -> str:
  return "**met**" if ok else "not met"


def header(r: dict) -> list[str]:
  return [f"### {r['device']} ({r['backend']}), {r['date']}, shape {r['shape']}, {r['dtype']}, "
          f"attention {r.get('attention_impl', '?')}", "",
          f"`{r.get('command', 'python benchmarks/run.py')}` — JAX {r['jax']}, torch {r.get('torch', '?')}, "
          f"transformers {r.get('transformers', '?')}, sentence-transformers {r.get('sentence_transformers', '?')}", ""]


def embed_rows(r: dict) -> list[str]:
  gpu = r["backend"] == "gpu"
  out = ["| embed | rows | instructor_jax tok/s | sentence-transformers tok/s | ratio | min cosine |" +
         (" target (best of the three rows) |" if gpu else ""), "|---|---|---|---|---|---|" + ("---|" if gpu else "")]
  for e in r.get("embed", []):
    best = max(e["speedup"], e.get("packed_speedup", 0.0), e["job_speedup"])
    target = TARGETS.get(e["case"])
    verdict = f" {_verdict(best >= target)} (≥ {target:g}×) |" if gpu and target else (" |" if gpu else "")
    out.append(f"| {e['case']}, `encode` | {e['rows']} | {e['ours_tok_s']:,.0f} | {e['st_tok_s']:,.0f} | "
               f"{e['speedup']:.2f}× | {e['min_cosine']:.5f} |{verdict}")
    if "ours_packed_tok_s" in e:  # not measured for documents: none fits a 128-token row
      out.append(f"| same, `encode(pack=True)`, batch / 4 | | {e['ours_packed_tok_s']:,.0f} | | "
                 f"{e['packed_speedup']:.2f}× | |" + (" |" if gpu else ""))
    out.append(f"| same, embed job ({e.get('job_format', 'parquet')} out) | | {e['job_tok_s']:,.0f} | | "
               f"{e['job_speedup']:.2f}× | |" + (" |" if gpu else ""))
  return out


def train_rows(r: dict) -> list[str]:
  rows = r.get("train", [])
  torch_at: dict[int, dict] = {}  # the strongest PyTorch row at each batch is the baseline
  for t in rows:
    if t["impl"].startswith("pytorch") and "error" not in t and t["tok_s"] > torch_at.get(t["batch"], {}).get("tok_s", 0):
      torch_at[t["batch"]] = t
  out = ["| train step | triples × tokens | tok/s | MFU (measured peak) | MFU (data sheet) | "
         "vs fastest PyTorch at that batch | max batch ≥ | note |",
         "|---|---|---|---|---|---|---|---|"]
  for t in rows:
    if "error" in t or t.get("status") == "running":
      why = t["error"][:80] if "error" in t else f"cut short by the time limit (started {t.get('started', '?')})"
      out.append(f"| {t['impl']} | {t['batch']} × {t['length']} | – | – | – | – | – | {why} |")
      continue
    base = torch_at.get(t["batch"])
    ratio = f"{t['tok_s'] / base['tok_s']:.2f}× ({base['impl']})" if base and t["impl"].startswith("jax") else ""
    mfu, spec = t.get("mfu"), t.get("mfu_spec")
    note = ""
    if r["backend"] == "gpu" and t["impl"].startswith("jax") and t["batch"] >= MFU_MIN_BATCH and mfu is not None:
      note = f"MFU target {_verdict(mfu >= MFU_TARGET)} (≥ {MFU_TARGET:.0%})"
    out.append(f"| {t['impl']} | {t['batch']} × {t['length']} | {t['tok_s']:,.0f} | "
               f"{'' if mfu is None else f'{mfu:.1%}'} | {'' if spec is None else f'{spec:.1%}'} | {ratio} | "
               f"{t.get('max_batch_at_least', '')} | {note} |")
  return out


def section(results: list[dict]) -> str:
  lines: list[str] = []
  for r in results:
    lines += header(r)
    if "matmul" in r:
      m = r["matmul"]
      lines += [f"Matmul peak in the same run ({r['dtype']}): JAX {m['jax_tflops']:.2f} TFLOP/s, "
                f"torch {m['torch_tflops']:.2f} TFLOP/s.", ""]
    if r.get("embed"):
      lines += embed_rows(r) + [""]
    if r.get("train"):
      lines += train_rows(r) + [""]
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
