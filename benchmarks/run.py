"""Side-by-side benchmark: our embed path and train step vs sentence-transformers / PyTorch.

Everything runs in one process on the same weights and the same texts, so ratios are comparable
even on a noisy shared machine. Prints a table and writes JSON.

  python benchmarks/run.py --shape small --quick            # 2-core CPU (minutes)
  python benchmarks/run.py --shape gtr-large --out gpu.json # one GPU: bf16, instructor-large shape
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import tempfile
import time
from typing import Iterator

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
# JAX and torch share one GPU in this process: JAX must not grab 75% of its memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402

import texts  # noqa: E402
from instructor_jax.config import InstructorConfig, T5Config, preset  # noqa: E402
from instructor_jax.t5 import attention_kernel  # noqa: E402

SHAPES = {
    # t5-small-shaped encoder: big enough that matmuls dominate on a CPU, small enough for 2 cores.
    "small": InstructorConfig(T5Config(d_model=512, num_heads=8, d_kv=64, d_ff=2048, num_layers=6)),
    "tiny": preset("tiny"),  # for tests of the benchmark scripts themselves
    "gtr-base": preset("gtr-base"),
    "gtr-large": preset("gtr-large"),
}


def library_versions() -> dict:
  out = {}
  for name in ("torch", "transformers", "sentence_transformers"):
    try:
      out[name] = __import__(name).__version__
    except ImportError:
      out[name] = "not installed"
  if out["torch"] != "not installed":
    out["torch_threads"] = __import__("torch").get_num_threads()
  return out


def on_gpu() -> bool:
  return jax.default_backend() == "gpu"


def matmul_flops_per_token(cfg: T5Config, length: int) -> tuple[float, float]:
  """(forward FLOPs per token, training FLOPs per token): 2/6 x matmul params + attention."""
  ffn = (3 if cfg.feed_forward == "gated-gelu" else 2) * cfg.d_model * cfg.d_ff
  params = cfg.num_layers * (4 * cfg.d_model * cfg.inner_dim + ffn)
  attention = cfg.num_layers * length * cfg.num_heads * cfg.d_kv
  return 2 * params + 4 * attention, 6 * params + 12 * attention


def measure_matmul_peak(n: int, dtype: str) -> dict[str, float]:
  """FLOP/s of an n^3 matmul in JAX and torch (the utilisation denominator), same run."""
  import jax.numpy as jnp
  import torch
  out = {}
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.dtype(dtype))
  reps = 50 if on_gpu() else 3  # 8192^3 in bf16 is ~1.4 ms on an H100: 10 reps were barely 14 ms of work
  # bf16: also with a float32 result, which XLA:CPU runs on a faster kernel (the model's Dense
  # does the same there); the peak is the faster of the two.
  forms = [lambda x: x @ x] + ([lambda x: jax.lax.dot(x, x, preferred_element_type=jnp.float32)]
                               if dtype == "bfloat16" else [])
  # Best of several timings on a CPU: one disturbed timing (a shared machine) would understate the
  # peak and overstate every utilisation computed against it.
  trials = 1 if on_gpu() else 3
  out["jax_tflops"] = 0.0
  for form in forms:
    f = jax.jit(form)
    f(a).block_until_ready()
    for _ in range(trials):
      t = time.perf_counter()
      for _ in range(reps):
        r = f(a)
      r.block_until_ready()
      out["jax_tflops"] = max(out["jax_tflops"], 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e12)
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  ta = torch.randn(n, n, device=dev, dtype=getattr(torch, dtype))
  (ta @ ta).sum().item()
  out["torch_tflops"] = 0.0
  for _ in range(trials):
    t = time.perf_counter()
    for _ in range(reps):
      tr = ta @ ta
    tr.sum().item()
    out["torch_tflops"] = max(out["torch_tflops"], 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e12)
  return out


def build_models(cfg: InstructorConfig, workdir: str | None):
  """Random-weight Instructor + its sentence-transformers export (identical weights; none if no workdir)."""
  from instructor_jax.instructor import Instructor
  from instructor_jax.model import InstructorModel
  from instructor_jax.tokenization import Tokenizer
  import flax.linen as nn
  import jax.numpy as jnp
  ids = jnp.ones((1, 8), jnp.int32)
  params = jax.jit(lambda k: nn.unbox(InstructorModel(cfg).init(k, ids, ids, jnp.zeros((1,), jnp.int32))["params"]))(
      jax.random.PRNGKey(0))
  params = jax.device_get(params)
  model = Instructor(cfg, params, Tokenizer.from_pretrained(None, cfg.max_seq_length))
  if workdir is None:
    return model, params, None
  export_dir = os.path.join(workdir, "st")
  model.save_pretrained(export_dir)
  return model, params, export_dir


def _count_tokens(model, items, max_len) -> int:
  ids, _ = model.tokenizer.tokenize(items, max_len)
  return sum(len(x) for x in ids)


def ours_runner(model, items, batch_size: int, max_len: int, pack: bool = False):
  return lambda: model.encode(items, batch_size=batch_size, max_seq_length=max_len, pack=pack)


def job_format() -> str:
  """Parquet as a user would write it; .npy parts where pyarrow is not installed (the GPU machine)."""
  try:
    import pyarrow.parquet  # noqa: F401
    return "parquet"
  except ImportError:
    return "npy"


def job_runner(model, items, max_len: int, workdir: str):
  """The `python -m instructor_jax.embed` job (in-process) on the same rows: JSONL in, Parquet (or .npy) out.

  The model's weight fingerprint is cached after the warm-up run (embed_manifest.model_fingerprint),
  so timed runs leave it out; a one-off CLI job computes it once."""
  from instructor_jax import embed
  fmt = job_format()
  src = os.path.join(workdir, f"job_{len(items)}.jsonl")
  with open(src, "w") as f:
    for i, item in enumerate(items):
      row = {"text": item[1], "instruction": item[0]} if isinstance(item, tuple) else {"text": item}
      f.write(json.dumps(row) + "\n")
  counter = iter(range(10 ** 6))

  def run():
    out_dir = os.path.join(workdir, f"job_out_{len(items)}_{next(counter)}")
    per_row = ["--instruction-field", "instruction"] if isinstance(items[0], tuple) else []
    embed.main(["--input", src, "--output", out_dir, "--max-seq-length", str(max_len), "--no-progress",
                "--format", fmt] + per_row, model=model)
    emb = np.zeros((len(items), model.config.embedding_dim), np.float32)
    if fmt == "parquet":
      import pyarrow.parquet as pq
      table = pq.read_table(os.path.join(out_dir, "part-00000.parquet"))
      emb[np.asarray(table["id"])] = np.stack(table["embedding"].to_numpy(zero_copy_only=False))
    else:
      emb[np.load(os.path.join(out_dir, "part-00000.ids.npy"))] = np.load(os.path.join(out_dir, "part-00000.npy"))
    return emb

  return run


def st_runner(export_dir: str, items, batch_size: int, max_len: int, dtype: str):
  """ST encode in `dtype`, one call per instruction (its `prompt=` takes one prompt per call)."""
  import torch
  from sentence_transformers import SentenceTransformer
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  st = SentenceTransformer(export_dir, device=dev)
  st.max_seq_length = max_len
  if dtype in ("bfloat16", "float16"):
    st = st.to(getattr(torch, dtype))
  groups: dict[str | None, list[int]] = {}
  for i, item in enumerate(items):
    groups.setdefault(item[0] if isinstance(item, tuple) else None, []).append(i)

  def run():
    out = np.zeros((len(items), st.get_sentence_embedding_dimension()), np.float32)
    for instruction, idx in groups.items():
      batch = [items[i][1] if instruction is not None else items[i] for i in idx]
      emb = st.encode(batch, prompt=instruction, batch_size=batch_size, convert_to_tensor=True)
      out[idx] = emb.float().cpu().numpy()
    return out

  run.weight_dtype = str(next(st.parameters()).dtype).removeprefix("torch.")
  return run


def interleaved_median(runners: dict, repeats: int) -> tuple[dict[str, float], dict[str, np.ndarray]]:
  """Median seconds per runner; runs alternate so machine noise hits both sides alike."""
  outputs = {name: run() for name, run in runners.items()}  # warm-up: compiles every bucket
  times: dict[str, list[float]] = {name: [] for name in runners}
  for _ in range(repeats):
    for name, run in runners.items():
      t = time.perf_counter()
      outputs[name] = run()
      times[name].append(time.perf_counter() - t)
  return {name: float(np.median(v)) for name, v in times.items()}, outputs


def embed_section(name, model, export_dir, items, batch_size, max_len, repeats, workdir, dtype,
                  packed: bool = True) -> dict:
  """`packed=False` where no text fits a packed row (documents): that runner would be `encode` again."""
  print(f"{time.strftime('%H:%M:%S')} embed {name}: {len(items)} rows", flush=True)
  tokens = _count_tokens(model, items, max_len)
  st_run = st_runner(export_dir, items, batch_size, max_len, dtype)
  runners = {"ours": ours_runner(model, items, batch_size, max_len)}
  if packed:  # rows of 128 tokens, as many per batch as the embed job takes: the two share the full-batch shape
    from instructor_jax.embed import default_batch_tokens
    rows = max(1, default_batch_tokens() // PACK_LENGTH) * len(jax.local_devices())
    runners["ours_packed"] = ours_runner(model, items, rows, max_len, True)
  runners.update(embed_job=job_runner(model, items, max_len, workdir), st=st_run)
  seconds, out = interleaved_median(runners, repeats)
  ours, ref = out["ours"], out["st"]
  cos = np.sum(ours * ref, axis=1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(ref, axis=1)
  packed_row = {} if not packed else {
      "ours_packed_tok_s": tokens / seconds["ours_packed"], "packed_speedup": seconds["st"] / seconds["ours_packed"],
      "packed_max_abs_diff": float(np.abs(out["ours_packed"] - ours).max())}
  return {"case": name, "rows": len(items), "tokens": tokens, "repeats": repeats,
          "ours_tok_s": tokens / seconds["ours"], "st_tok_s": tokens / seconds["st"],
          "speedup": seconds["st"] / seconds["ours"], "ours_rows_s": len(items) / seconds["ours"],
          "st_rows_s": len(items) / seconds["st"], "min_cosine": float(cos.min()), **packed_row,
          "job_tok_s": tokens / seconds["embed_job"], "job_speedup": seconds["st"] / seconds["embed_job"],
          "job_format": job_format(),
          "job_max_abs_diff": float(np.abs(out["embed_job"] - ours).max()),
          # What each side actually computed in (the weights its matmuls read), not the flag.
          "ours_weight_dtype": str(model.forward_params()["token_embedder"]["embedding"].dtype),
          "st_weight_dtype": st_run.weight_dtype}


EMBED_CASES = ["512-token docs", "short+instruction"]
PACK_LENGTH = 128  # encode's and the embed job's default


def embed_sections(args: argparse.Namespace, model, export_dir: str, workdir: str, dtype: str) -> Iterator[dict]:
  """512-token documents, then short instructed sentences: one result row each, yielded as measured.

  Documents first: they compile two shapes (short texts about ten: length buckets, packed rows), so
  a run cut short by its time limit keeps the documents row.
  """
  n_short, n_docs = (256, 16) if args.quick else (20000, 2000)
  n_short, n_docs = args.short or n_short, args.docs or n_docs
  short_bs, doc_bs = (64, 8) if args.quick else (128, 64)
  yield embed_section(EMBED_CASES[0], model, export_dir, texts.documents(n_docs), doc_bs, 512, 3, workdir, dtype,
                      packed=False)
  yield embed_section(EMBED_CASES[1], model, export_dir, texts.instructed_sentences(n_short), short_bs, 512,
                      3, workdir, dtype)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
  parser.add_argument("--quick", action="store_true", help="small text counts for a 2-core CPU")
  parser.add_argument("--sections", default="matmul,embed,train")
  parser.add_argument("--train-batch", type=int, default=None, help="triples per train step")
  parser.add_argument("--train-length", type=int, default=256)
  parser.add_argument("--train-variants", default=None,
                      help="comma list of pytorch, pytorch-ckpt, jax, jax-save_dots, jax-full, jax-full-nolhs, "
                           "jax-full-fused-nodrop, jax-gc4, jax-full-scan, jax-dotsnb-scan, jax-dotsnb-scan-nodrop, "
                           "jax-dotsnb-scan-fused-nodrop, jax-dotsnb-scan-fused-noattndrop, each "
                           "optionally @BATCH, or @B1|B2 to try B2 if B1 runs out of memory (default: "
                           "pytorch,jax,jax-save_dots at --train-batch)")
  parser.add_argument("--short", type=int, default=None, help="short instructed sentences to embed")
  parser.add_argument("--docs", type=int, default=None, help="512-token documents to embed")
  parser.add_argument("--attention-impl", default="auto",
                      choices=("auto", "dot_product_attention", "cudnn", "xla", "tpu_flash"),
                      help="inference attention (T5Config; auto: cuDNN on a GPU in bf16/fp16, else XLA's fused kernel)")
  parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                      help="compute dtype of both sides in the matmul and embed sections (default: bfloat16 on a "
                           "GPU, float32 on a CPU; the train section always uses that default). float16: "
                           "sentence-transformers is cast with .half(), as its users do")
  parser.add_argument("--out", default=None, help="write the results as JSON here")
  args = parser.parse_args(argv)

  gpu = on_gpu()
  default_dtype = "bfloat16" if gpu else "float32"
  dtype = args.dtype or default_dtype
  if dtype != default_dtype and "train" in args.sections.split(","):
    parser.error(f"--dtype {dtype} applies to the matmul and embed sections; the train section runs in "
                 f"{default_dtype} here. Run the train section separately.")
  cfg = SHAPES[args.shape].with_encoder(dtype=dtype, attention_impl=args.attention_impl)
  results: dict = {"date": time.strftime("%Y-%m-%d"), "shape": args.shape, "dtype": dtype,
                   "attention_impl": args.attention_impl,
                   # What the embed rows ran ("auto" resolved for this backend and dtype).
                   "attention_kernel": attention_kernel(args.attention_impl, dtype),
                   "device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
                   "host": platform.node(), "cpu_count": os.cpu_count(), "jax": jax.__version__,
                   "command": "python benchmarks/run.py " + " ".join(sys.argv[1:] if argv is None else argv),
                   **library_versions(), "complete": False, "load_average_start": os.getloadavg()}
  sections = args.sections.split(",")
  # What this run set out to measure, so a report of a run cut short names what is missing.
  results["planned"] = {"embed": EMBED_CASES if "embed" in sections else [], "train": []}

  def save() -> None:  # after every section, so a run cut short by a time limit keeps what it measured
    if args.out:  # written whole, then renamed: a kill mid-write leaves the previous version
      tmp = pathlib.Path(f"{args.out}.tmp")
      tmp.write_text(json.dumps(results, indent=2))
      os.replace(tmp, args.out)

  if "matmul" in sections:
    print(f"{time.strftime('%H:%M:%S')} matmul peak", flush=True)
    results["matmul"] = measure_matmul_peak(8192 if gpu else 1024, dtype)
    save()
  with tempfile.TemporaryDirectory() as workdir:
    model, params, export_dir = build_models(cfg, workdir)
    if "embed" in sections:
      results["embed"] = []
      for row in embed_sections(args, model, export_dir, workdir, dtype):
        results["embed"].append(row)
        save()
    if "train" in sections:
      from train_bench import DEFAULT_VARIANTS, parse_variants, train_section
      batch = args.train_batch or (8 if args.quick else 256)
      results["planned"]["train"] = [f"{name}@{batches[0]}" for name, batches in
                                     parse_variants(args.train_variants or DEFAULT_VARIANTS, batch)]
      results["train"] = train_section(cfg, params, export_dir, batch, args.train_length,
                                       results.get("matmul", {}), quick=args.quick,
                                       variants=args.train_variants or DEFAULT_VARIANTS,
                                       on_row=lambda rows: (results.__setitem__("train", rows), save()))
  print_table(results)
  results.update(complete=True, load_average_end=os.getloadavg())
  save()
  return 0


def print_table(results: dict) -> None:
  print(f"\n{results['date']}  {results['device']} ({results['backend']})  shape={results['shape']}  "
        f"dtype={results['dtype']}  jax {results['jax']}")
  if "matmul" in results:
    m = results["matmul"]
    print(f"matmul peak: jax {m['jax_tflops']:.2f} TFLOP/s, torch {m['torch_tflops']:.2f} TFLOP/s")
  for row in results.get("embed", []):
    print(f"embed {row['case']:<20} ours {row['ours_tok_s']:>10.0f} tok/s  ST {row['st_tok_s']:>10.0f} tok/s  "
          f"x{row['speedup']:.2f}  (rows/s {row['ours_rows_s']:.1f} vs {row['st_rows_s']:.1f}; "
          f"min cos {row['min_cosine']:.5f})")
    if "ours_packed_tok_s" in row:
      print(f"      {'packed (128-token rows)':<20} ours {row['ours_packed_tok_s']:>10.0f} tok/s  "
            f"x{row['packed_speedup']:.2f} vs ST  (max |packed - padded| {row['packed_max_abs_diff']:.1e})")
    print(f"      {'embed job (CLI path)':<20} ours {row['job_tok_s']:>10.0f} tok/s  x{row['job_speedup']:.2f} "
          f"vs ST  (max |job - encode| {row['job_max_abs_diff']:.1e}; includes writing {row.get('job_format', 'parquet')})")
  for row in results.get("train", []):
    memory = (f"  XLA temp {row['temp_gib']:.1f} GiB" if "temp_gib" in row else "") + (
        f", max batch >= {row['max_batch_at_least']} on {row['device_gib']:.0f} GiB" if "max_batch_at_least" in row else "")
    if row.get("status") == "running":
      print(f"train {row['impl']:<20} cut short while running (started {row['started']})")
      continue
    print(f"train {row['impl']:<20} {row['tok_s']:>10.0f} tok/s  {row['step_s'] * 1e3:8.1f} ms/step  "
          f"MFU {row.get('mfu', float('nan')):.1%}  (batch {row['batch']} x {row['length']}){memory}"
          + (f"  {row['error']}" if "error" in row else ""))


if __name__ == "__main__":
  sys.exit(main())
