"""Does `Instructor.encode` hide its host work (tokenise, pack, pad) behind the device's?

    python benchmarks/encode_overlap.py [--short 10000] [--docs 1000] [--rates 350000,1000000]
                                        [--repeats 3] [--first-chunk CHARS] [--out overlap.json]

`encode` prepares chunk k + 1 on a worker thread while the devices run chunk k
(`instructor_jax.encode_batches`); before, it tokenised the whole input first. Both are timed in the
same run: `whole` sets the first chunk above the input size (the whole input tokenised and packed
before the first dispatch, each batch padded just before its own: what `encode` did until then,
within 2% of that code's time when measured side by side), `chunked` is the default.

The device is simulated, so the host side can be measured on a machine without an accelerator: each
batch "runs" for (padded tokens) / RATE seconds, one at a time, and fetching its result waits for it
without holding the GIL, as a real device fetch does. RATE is given in padded tokens/s; 350k is about
3x sentence-transformers on short instructed sentences on one H100 (DESIGN.md §5), the aim of issue 7.
RATE 0 runs the real model (the `tiny` shape, random weights) on this machine's JAX backend instead;
on a CPU backend `encode` prepares the chunks in turn rather than ahead (`AHEAD_ON_CPU`: host and
"device" share the cores), so there `chunked` only differs from `whole` in holding less memory.
Reported: wall seconds per call (best of --repeats) both ways; with a simulated device also its busy time per
call (what a perfect overlap would take) and the host work alone (`encode` against an infinitely
fast device).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from benchmarks import texts  # noqa: E402
from instructor_jax import encode_batches  # noqa: E402
from instructor_jax.config import preset  # noqa: E402
from instructor_jax.instructor import Instructor  # noqa: E402

ONE_CHUNK = 1 << 62  # characters: the whole input in one chunk, prepared before the first dispatch


class SimulatedDevice:
  """A serial queue: a batch dispatched at t runs from max(t, previous end) for tokens / rate seconds."""

  def __init__(self, rate: float, dim: int):
    self.rate, self.dim, self.busy_until, self.busy_s = rate, dim, 0.0, 0.0

  def run(self, batch) -> "_Pending":
    start = max(time.perf_counter(), self.busy_until)
    self.busy_until = start + batch.ids.size / self.rate
    self.busy_s += batch.ids.size / self.rate
    shape = batch.ids.shape[:1] + ((batch.n_instr.shape[1],) if batch.n_instr.ndim == 2 else ()) + (self.dim,)
    return _Pending(self.busy_until, shape)


class _Pending:
  def __init__(self, ready: float, shape: tuple[int, ...]):
    self.ready, self.shape = ready, shape

  def __array__(self, dtype=None, copy=None):
    time.sleep(max(0.0, self.ready - time.perf_counter()))  # releases the GIL, like a device fetch
    return np.zeros(self.shape, dtype or np.float32)


def tiny_instructor() -> Instructor:
  """The `tiny` shape with random weights, 512-token inputs, the repository's T5 vocabulary."""
  import jax
  import flax.linen as nn
  import jax.numpy as jnp
  from instructor_jax.model import InstructorModel
  from instructor_jax.tokenization import Tokenizer
  cfg = preset("tiny").replace(max_seq_length=512)
  ids = jnp.ones((1, 8), jnp.int32)
  params = jax.device_get(nn.unbox(InstructorModel(cfg).init(jax.random.PRNGKey(0), ids, ids,
                                                              jnp.zeros((1,), jnp.int32))["params"]))
  return Instructor(cfg, params, Tokenizer.from_pretrained(None, 512))


def timed(model: Instructor, items: list, first_chunk: int, repeats: int) -> list[float]:
  encode_batches.FIRST_CHUNK = first_chunk
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    model.encode(items, batch_size=32)
    times.append(time.perf_counter() - start)
  return times


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--short", type=int, default=10000, help="instructed short sentences")
  parser.add_argument("--docs", type=int, default=1000, help="~512-token documents")
  parser.add_argument("--rates", default="350000,1000000", help="simulated device padded tokens/s; 0: real model")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--first-chunk", type=int, default=encode_batches.FIRST_CHUNK,
                      help="characters in encode's first chunk (the library's default; smaller for small inputs)")
  parser.add_argument("--out", default=None, help="JSON results")
  args = parser.parse_args(argv)
  import jax
  real = tiny_instructor()
  cfg, params = real.config, real.params
  default_first, default_ahead = encode_batches.FIRST_CHUNK, encode_batches.AHEAD_ON_CPU
  chunk = args.first_chunk
  inputs = {f"{args.short} short instructed sentences": [list(x) for x in texts.instructed_sentences(args.short)],
            f"{args.docs} documents (512 tokens)": texts.documents(args.docs)}
  results: dict = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                   "backend": jax.default_backend(), "first_chunk_chars": chunk, "cases": {}}
  for name, items in inputs.items():
    real.encode(items[:2048], batch_size=32)  # warm-up: tokenizer caches, compiled buckets
    host_only = min(_host_only(real, items, args.repeats))
    case = results["cases"][name] = {"host_only_s": host_only}
    for rate in [float(r) for r in args.rates.split(",")]:
      model, device = real, None
      if rate > 0:
        model = Instructor(cfg, params, real.tokenizer, mesh=real.mesh)
        device = SimulatedDevice(rate, cfg.embedding_dim)
        model.embed_batch_async = model.embed_packed_async = device.run
      # A simulated device stands for an accelerator: prepare ahead although the mesh is of CPUs.
      encode_batches.AHEAD_ON_CPU = rate > 0
      try:
        whole = min(timed(model, items, ONE_CHUNK, args.repeats))
        chunked = min(timed(model, items, chunk, args.repeats))
      finally:
        encode_batches.FIRST_CHUNK, encode_batches.AHEAD_ON_CPU = default_first, default_ahead
      label = "real tiny model" if rate == 0 else f"device {rate:,.0f} tok/s"
      case[label] = {"whole_s": whole, "chunked_s": chunked, "speedup": whole / chunked}
      line = f"{name}, {label}: whole {whole:.3f} s, chunked {chunked:.3f} s ({whole / chunked:.2f}x)"
      if device is not None:  # busy time per call: the bound a perfect overlap reaches
        case[label]["device_s"] = device_s = device.busy_s / (2 * args.repeats)
        line += f"; device busy {device_s:.3f} s, host alone {host_only:.3f} s"
      print(line, flush=True)
    if args.out:
      pathlib.Path(args.out).write_text(json.dumps(results, indent=1))
  return 0


def _host_only(model: Instructor, items: list, repeats: int) -> list[float]:
  """Seconds of host work alone: `encode` against an infinitely fast device."""
  fast = Instructor(model.config, model.params, model.tokenizer, mesh=model.mesh)
  fast.embed_batch_async = fast.embed_packed_async = SimulatedDevice(float("inf"), model.config.embedding_dim).run
  return timed(fast, items, ONE_CHUNK, repeats)


if __name__ == "__main__":
  sys.exit(main())
