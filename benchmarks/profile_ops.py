"""Profiles one workload with jax.profiler and says where the device time goes, by kind of op.

  python benchmarks/profile_ops.py --case train --shape small --batch 8 --length 128 --out /tmp/prof
  python benchmarks/profile_ops.py --case embed-docs --shape gtr-large --out $OUT/prof_docs   # one GPU

Writes the trace (open `plugins/profile/*/perfetto_trace.json.gz` in ui.perfetto.dev, or the
directory in TensorBoard/XProf), XLA's optimised HLO, and `summary.json` / `summary.txt`: device
time per XLA op, each op classified from its HLO (matmul, attention, random bits, softmax,
collectives, copies/transposes, other fusions), and the top ops. Device time is the kernels on a
GPU/TPU and the XLA:CPU thunks on a CPU (where concurrent thunks can add up to more than wall time).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import pathlib
import re
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# Classification rules, first match wins: (category, regex over the op's HLO and its callees).
CATEGORIES = [
    ("attention (fused)", re.compile(r"cudnn\$fmha|__cudnn\$fmha|flash|splash|tpu_custom_call|custom-call.*attention")),
    ("collectives", re.compile(r"\b(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(-start)?\(")),
    ("matmul", re.compile(r"\b(dot|convolution)\(|gemm|cublas|__triton_gemm")),
    # Threefry is u32 adds, shifts and xors; the dropout mask's bits-to-float conversion is fused too.
    ("random bits", re.compile(r"rng-bit-generator\(|\bu32\[[^\]]*\][^\n]*\b(shift-right-logical|xor)\(")),
    ("softmax / exp", re.compile(r"\bexponential\(")),
]
# An op whose HLO (callees included) only moves data is a copy / transpose.
MOVEMENT_OPS = {"parameter", "constant", "copy", "transpose", "bitcast", "reshape", "broadcast", "slice",
                "dynamic-slice", "concatenate", "tuple", "get-tuple-element", "pad", "reverse", "fusion"}
_OPCODE = re.compile(r"\b([a-z][a-z0-9\-]*)\(")
_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*$")
_COMP = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) [^\n]*\{\s*$")
_CALLS = re.compile(r"(?:calls|to_apply|body|condition|branch_computations)=\{?%?([\w.\-]+(?:, %?[\w.\-]+)*)\}?")


def parse_hlo(dump_dir: str) -> dict[str, list[tuple[dict[str, str], dict[str, str]]]]:
  """Per module name, one (instruction -> its line, computation -> its body) per compiled program.

  Names such as fused_computation.41 repeat across modules, so everything is keyed by module; the
  trace names a module but not which of several same-named programs (e.g. two shapes of
  jit_forward) ran, so each name keeps every dump.
  """
  modules = {}
  for path in sorted(glob.glob(os.path.join(dump_dir, "module_*after_optimizations.txt"))):
    module = os.path.basename(path).split(".")[1]
    lines, bodies, current = {}, {}, None
    for line in pathlib.Path(path).read_text().splitlines():
      m = _COMP.match(line)
      if m and "=" not in line.split("{")[0]:
        current = m.group(1)
        bodies[current] = ""
        continue
      m = _INSTR.match(line)
      if m:
        lines.setdefault(m.group(1), line)
        if current is not None:
          bodies[current] += line + "\n"
    modules.setdefault(module, []).append((lines, bodies))
  return modules


def op_text(name: str, lines: dict[str, str], bodies: dict[str, str], depth: int = 3) -> str:
  """The op's HLO line plus the bodies of the computations it calls (fusions, loops), recursively."""
  text = lines.get(name, "")
  todo = [(text, depth)]
  while todo:
    t, d = todo.pop()
    for m in _CALLS.finditer(t):
      for comp in re.split(r",\s*%?", m.group(1)):
        body = bodies.get(comp, "")
        text += "\n" + body
        if d > 0:
          todo.append((body, d - 1))
  return text


def opcodes(text: str) -> set[str]:
  """HLO opcodes in `text` (metadata and quoted strings, which hold JAX names, left out)."""
  found = set()
  for line in text.splitlines():
    code = re.sub(r'"[^"]*"', "", line.split(", metadata=")[0])
    found.update(_OPCODE.findall(code.split(" = ", 1)[-1]))
  return found


def classify(name: str, text: str) -> str:
  for category, pattern in CATEGORIES:
    if pattern.search(text):
      return category
  codes = opcodes(text)
  if (codes and codes <= MOVEMENT_OPS) or (not text and re.match(r"^(copy|transpose)", name)):
    return "copy / transpose"
  return "other fusions"


def classify_in(module: list[tuple[dict[str, str], dict[str, str]]], op: str) -> str:
  """The op's kind in the programs of that module name that define it; "ambiguous" if they disagree."""
  kinds = {classify(op, op_text(op, lines, bodies)) for lines, bodies in module if op in lines}
  if not kinds:
    return classify(op, "")
  return kinds.pop() if len(kinds) == 1 else "ambiguous (programs share a name)"


def device_events(trace_file: str) -> tuple[list[dict], str]:
  """Events that carry an XLA op, and whose: the accelerator's timelines when there are any, else the host's."""
  with gzip.open(trace_file, "rt") as f:
    data = json.load(f)
  events = data["traceEvents"] if isinstance(data, dict) else data
  process = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
  ops = [e for e in events if e.get("ph") == "X" and "hlo_op" in (e.get("args") or {})]
  on_device = [e for e in ops if "/device:" in process.get(e["pid"], "")]
  return (on_device, "device") if on_device else (ops, "host")


def summarise(out_dir: str, dump_dir: str, iterations: int, wall_s: float, top: int = 25,
              backend: str = "cpu") -> dict:
  traces = sorted(glob.glob(os.path.join(out_dir, "plugins", "profile", "*", "perfetto_trace.json.gz")))
  if not traces:
    raise FileNotFoundError(f"no perfetto_trace.json.gz under {out_dir}/plugins/profile; did jax.profiler run?")
  modules = parse_hlo(dump_dir)
  events, timeline = device_events(traces[-1])
  if timeline == "host" and backend != "cpu":
    # No kernel timeline (e.g. CUPTI not permitted in a container): these are host-side launch times.
    print(f"warning: no {backend} device events in the trace; the op times below are host-side", file=sys.stderr)
  per_op: dict[tuple[str, str], float] = collections.Counter()
  for e in events:
    per_op[(e["args"].get("hlo_module", ""), e["args"]["hlo_op"])] += float(e.get("dur", 0.0)) / 1e3  # us -> ms
  category_of = {(mod, op): classify_in(modules.get(mod, []), op) for mod, op in per_op}
  by_category: dict[str, float] = collections.Counter()
  for op, ms in per_op.items():
    by_category[category_of[op]] += ms
  total = sum(per_op.values()) or 1.0
  return {"iterations": iterations, "timeline": timeline, "wall_ms_per_iteration": wall_s * 1e3 / iterations,
          "device_ms_per_iteration": total / iterations,
          "by_category": [{"category": c, "ms_per_iteration": ms / iterations, "share": ms / total}
                          for c, ms in sorted(by_category.items(), key=lambda kv: -kv[1])],
          "top_ops": [{"module": key[0], "op": key[1], "category": category_of[key], "ms_per_iteration": ms / iterations,
                       "share": ms / total} for key, ms in per_op.most_common(top)]}


def format_summary(s: dict, title: str) -> str:
  out = [title, f"wall {s['wall_ms_per_iteration']:.1f} ms/iteration; XLA ops on the {s.get('timeline', 'host')} "
         f"timeline {s['device_ms_per_iteration']:.1f} ms",
         "", "by kind of op:"]
  out += [f"  {r['category']:<20} {r['ms_per_iteration']:>9.2f} ms  {r['share']:6.1%}" for r in s["by_category"]]
  out += ["", "top ops:"]
  out += [f"  {r['module'] + ':' + r['op']:<44} {r['category']:<20} {r['ms_per_iteration']:>9.2f} ms  {r['share']:6.1%}"
          for r in s["top_ops"]]
  return "\n".join(out)


def workload(args, cfg):
  """(run once, finish) for the chosen case on random weights."""
  import run
  import texts
  model, params, _ = run.build_models(cfg, None)  # no sentence-transformers export: only JAX runs here
  if args.case == "train":
    import train_bench
    step, sync = train_bench._jax_step(cfg, params, args.batch, args.length, args.remat, scan_layers=args.scan_layers)
    return lambda: sync(step())
  items = texts.documents(args.batch) if args.case == "embed-docs" else texts.instructed_sentences(args.batch)
  batch_size = args.batch if args.case == "embed-docs" else max(1, args.batch // 4)
  return lambda: model.encode(items, batch_size=batch_size, max_seq_length=args.length, pack=args.case != "embed-docs")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--case", choices=("train", "embed-docs", "embed-short"), default="train")
  p.add_argument("--shape", default="small", help="a shape of benchmarks/run.py (small, gtr-base, gtr-large)")
  p.add_argument("--batch", type=int, default=8, help="triples per step (train) or texts per call (embed)")
  p.add_argument("--length", type=int, default=128, help="tokens per text (train) or max_seq_length (embed)")
  p.add_argument("--remat", default="none", help="train: TrainConfig.remat_policy")
  p.add_argument("--scan-layers", action="store_true", help="train: TrainConfig.scan_layers")
  p.add_argument("--dropout", type=float, default=0.1, help="train: dropout rate")
  p.add_argument("--iterations", type=int, default=2)
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                 help="compute dtype (default: bfloat16 on a GPU, float32 on a CPU)")
  p.add_argument("--attention-impl", choices=("auto", "dot_product_attention", "cudnn", "xla", "tpu_flash"),
                 default="auto",
                 help="attention (T5Config); training uses the einsums, except tpu_flash with --dropout 0")
  p.add_argument("--out", required=True, help="directory for the trace, the HLO and the summary")
  p.add_argument("--summary-only", action="store_true", help="re-summarise an existing --out without running")
  args = p.parse_args(argv)
  dump_dir = os.path.join(args.out, "hlo")
  if not args.summary_only:
    import shutil
    shutil.rmtree(dump_dir, ignore_errors=True)  # a reused --out must not mix in another run's programs
  if args.summary_only:
    previous = json.loads(pathlib.Path(args.out, "summary.json").read_text())
    print(format_summary(summarise(args.out, dump_dir, previous["iterations"],
                                   previous["wall_ms_per_iteration"] * previous["iterations"] / 1e3), previous["title"]))
    return 0
  # Must precede JAX's backend start-up: XLA reads XLA_FLAGS once. Command buffers (CUDA graphs)
  # off: with them the H200's trace showed one op, `command_buffer_1`, for the whole step
  # (2026-11-28), with no kernel inside it named. The step may then run a little slower than
  # the timed rows of run.py, which keep them.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={dump_dir}"
                             " --xla_gpu_enable_command_buffer=").strip()
  import jax
  import run
  dtype = args.dtype or ("bfloat16" if run.on_gpu() else "float32")
  cfg = run.SHAPES[args.shape].with_encoder(dtype=dtype, dropout_rate=args.dropout, attention_impl=args.attention_impl)
  once = workload(args, cfg)
  once()
  once()  # compiled and warm
  t = time.perf_counter()
  with jax.profiler.trace(args.out, create_perfetto_trace=True):
    for _ in range(args.iterations):
      once()
  wall = time.perf_counter() - t
  summary = summarise(args.out, dump_dir, args.iterations, wall, backend=jax.default_backend())
  title = (f"{args.case}  shape={args.shape} dtype={dtype} batch={args.batch} length={args.length} "
           f"remat={args.remat}{' scanned' if args.scan_layers else ''} dropout={args.dropout} "
           f"attention={args.attention_impl}  {jax.devices()[0].device_kind}  "
           f"{time.strftime('%Y-%m-%d')}")
  text = format_summary(summary, title)
  pathlib.Path(args.out, "summary.txt").write_text(text + "\n")
  pathlib.Path(args.out, "summary.json").write_text(json.dumps(dict(summary, title=title), indent=2))
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
