"""GEMM throughput of the ways a Dense layer can be written, in one process: which kernel XLA picks.

  python benchmarks/gemm_forms.py                      # [4096, 512] x [512, 2048], the small shape's MLP
  python benchmarks/gemm_forms.py --m 64 --k 32 --n 48 --reps 1   # a smoke run

Forms: float32; bf16 x bf16 with a bf16 result; the same with a float32 result (what `Dense` asks
for on CPU); int8 x int8 -> int32; and float32 -> int8 -> GEMM -> float32 (quantise and dequantise
included). With torch installed, torch's float32 and bf16 matmuls on the same shape too (the kernels
sentence-transformers runs on). Prints GFLOP/s (GOP/s for int8) and the ratio to JAX's float32;
`--json` writes them.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np


def forms() -> dict:
  def f32(a, b, a8, b8):
    return a @ b

  def bf16_result(a, b, a8, b8):
    return a.astype(jnp.bfloat16) @ b.astype(jnp.bfloat16)

  def f32_result(a, b, a8, b8):
    return jax.lax.dot(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), preferred_element_type=jnp.float32)

  def widened(a, b, a8, b8):
    # bf16 operands widened back to float32: a float32 GEMM on bf16 values (exact products).
    bf16_to_f32 = lambda x: x.astype(jnp.bfloat16).astype(jnp.float32)
    return bf16_to_f32(a) @ bf16_to_f32(b)

  def int8(a, b, a8, b8):
    return jax.lax.dot(a8, b8, preferred_element_type=jnp.int32)

  def int8_quantised(a, b, a8, b8):
    scale = jnp.max(jnp.abs(a), axis=-1, keepdims=True) / 127.0
    q = jnp.round(a / scale).astype(jnp.int8)
    return jax.lax.dot(q, b8, preferred_element_type=jnp.int32).astype(jnp.float32) * scale

  return {"float32": f32, "bf16 -> bf16": bf16_result, "bf16 -> float32": f32_result,
          "bf16 widened to float32": widened, "int8 -> int32": int8,
          "float32 -> int8 GEMM -> float32": int8_quantised}


def _best_seconds(f, reps: int) -> float:
  f()
  best = float("inf")
  for _ in range(reps):
    start = time.perf_counter()
    f()
    best = min(best, time.perf_counter() - start)
  return best


def torch_rates(a: np.ndarray, b: np.ndarray, reps: int) -> dict[str, float]:
  try:
    import torch
  except ImportError:
    return {}
  flops = 2 * a.shape[0] * a.shape[1] * b.shape[1]
  # On the same kind of device as JAX's (a GPU machine's torch rows must not be CPU rates), synchronised.
  device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  rates = {}
  for dtype in (torch.float32, torch.bfloat16):
    ta, tb = (torch.from_numpy(x).to(device=device, dtype=dtype) for x in (a, b))
    rates[f"torch {str(dtype).removeprefix('torch.')}"] = flops / _best_seconds(lambda: (ta @ tb, sync()), reps) / 1e9
  return rates


def main(argv: list[str] | None = None) -> dict[str, float]:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--m", type=int, default=4096)
  parser.add_argument("--k", type=int, default=512)
  parser.add_argument("--n", type=int, default=2048)
  parser.add_argument("--reps", type=int, default=10)
  parser.add_argument("--json", default=None, help="write {form: GFLOP/s} here")
  args = parser.parse_args(argv)
  rng = np.random.default_rng(0)
  a_np = rng.standard_normal((args.m, args.k), dtype=np.float32)
  b_np = rng.standard_normal((args.k, args.n), dtype=np.float32)
  a, b = jnp.asarray(a_np), jnp.asarray(b_np)
  a8 = jnp.asarray(rng.integers(-127, 128, (args.m, args.k), dtype=np.int8))
  b8 = jnp.asarray(rng.integers(-127, 128, (args.k, args.n), dtype=np.int8))
  flops = 2 * args.m * args.k * args.n
  rates = {}
  for name, form in forms().items():
    f = jax.jit(form)
    rates[name] = flops / _best_seconds(lambda: f(a, b, a8, b8).block_until_ready(), args.reps) / 1e9
  rates.update(torch_rates(a_np, b_np, args.reps))
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, [{args.m}, {args.k}] x [{args.k}, {args.n}], "
        f"best of {args.reps}")
  for name, rate in rates.items():
    print(f"  {name:34s} {rate:8.1f} G(FL)OP/s  {rate / rates['float32']:.2f}x float32")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"jax": jax.__version__, "shape": [args.m, args.k, args.n], "gflops": rates}, f, indent=2)
  return rates


if __name__ == "__main__":
  main()
