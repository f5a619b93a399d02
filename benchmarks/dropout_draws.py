"""What a dropout mask costs, by how its random bits are drawn: forward and backward of dropout alone.

  python benchmarks/dropout_draws.py                               # CPU: [24, 128, 2048] float32
  python benchmarks/dropout_draws.py --shape 12288,256,256 --out results/dropout.json  # GPU: a gtr-large layer

Rows (best and median of --repeats, after a compile):
  blocks   the encoder's draws (t5.dropout_draws): four 16-bit draws per Threefry-2x32 block
  words    jax.random.bits words split in two 16-bit draws (the encoder before 2026-11-28)
  flax     flax.linen.Dropout: a 32-bit draw per element
  none     the same computation without dropout (the floor: reading and writing the tensor)
The time is jax.grad of sum(dropout(x)**2) at rate 0.1, so the mask is drawn for the forward pass
and again (or kept) for the backward one, as in a training step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

RATE = 0.1


def _word_draws(key, shape):
  import jax
  import jax.numpy as jnp
  *lead, last = shape
  words = jax.random.bits(key, (*lead, (last + 1) // 2), jnp.uint32)
  return jnp.stack([words & 0xFFFF, words >> 16], axis=-1).reshape(*lead, -1)[..., :last]


def _losses():
  """name -> loss(x, key) whose gradient is timed."""
  import flax.linen as nn
  import jax.numpy as jnp
  from instructor_jax import t5
  drop = round(RATE * 65536)

  def sixteen_bit(draw):
    def loss(x, key):
      kept = (x.astype(jnp.float32) * np.float32(65536 / (65536 - drop))).astype(x.dtype)
      y = jnp.where(draw(key, x.shape) >= drop, kept, jnp.zeros((), x.dtype))
      return jnp.sum(y.astype(jnp.float32) ** 2)
    return loss

  def flax_loss(x, key):
    y = nn.Dropout(RATE).apply({}, x, deterministic=False, rngs={"dropout": key})
    return jnp.sum(y.astype(jnp.float32) ** 2)

  return {"blocks": sixteen_bit(t5.dropout_draws), "words": sixteen_bit(_word_draws), "flax": flax_loss,
          "none": lambda x, key: jnp.sum(x.astype(jnp.float32) ** 2)}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--shape", default="24,128,2048", help="comma-separated, e.g. 12288,256,256: one gtr-large layer's "
                 "attention weights at 256 triples (768 texts x 16 heads) of 256 tokens")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--repeats", type=int, default=7)
  p.add_argument("--rows", default="blocks,words,flax,none")
  p.add_argument("--out", default=None, help="write the rows as JSON here")
  args = p.parse_args(argv)
  import jax
  import jax.numpy as jnp
  shape = tuple(int(d) for d in args.shape.split(","))
  x = jnp.ones(shape, args.dtype)
  key = jax.random.key(0)
  losses = _losses()
  names = args.rows.split(",")
  unknown = sorted(set(names) - set(losses))
  if unknown:
    p.error(f"--rows: unknown {unknown}; expected some of {sorted(losses)}")
  grads = {name: jax.jit(jax.grad(losses[name])) for name in names}
  for g in grads.values():
    g(x, key).block_until_ready()
  times: dict[str, list[float]] = {name: [] for name in names}
  for _ in range(args.repeats):  # interleaved, so that load on a shared machine touches every row alike
    for name, g in grads.items():
      start = time.perf_counter()
      g(x, key).block_until_ready()
      times[name].append(time.perf_counter() - start)
  elements = int(np.prod(shape))
  rows = [{"draws": name, "best_ms": 1e3 * min(t), "median_ms": 1e3 * float(np.median(t)),
           "ns_per_element": 1e9 * min(t) / elements} for name, t in times.items()]
  print(f"{time.strftime('%Y-%m-%d %H:%M')}  {jax.devices()[0].device_kind}  shape {shape} {args.dtype}  "
        f"jax {jax.__version__}")
  for row in rows:
    print(f"  {row['draws']:<7} best {row['best_ms']:9.2f} ms  median {row['median_ms']:9.2f} ms  "
          f"{row['ns_per_element']:.3f} ns/element")
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump({"device": str(jax.devices()[0].device_kind), "shape": shape, "dtype": args.dtype,
                 "jax": jax.__version__, "rows": rows}, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
