"""What each way of running the layers costs the train step in memory and compile time, without running it.

    python benchmarks/remat_memory.py [--shape gtr-large] [--batch 8] [--length 256] [--dtype bfloat16]
                                      [--settings plain,full,full-scan,dotsnb-scan] [--out remat.json]

For each setting the step (INSTRUCTOR loss, AdamW, dropout 0.1, one device) is lowered on abstract
arrays and compiled, as the trainer compiles it; reported are the compile time and XLA's memory
analysis of the compiled step (temp: activations and gradient buffers; arguments: the state and the
batch). Settings: `plain` (no remat), `full`, `save_dots`, `dotsnb` (save_dots_no_batch), each
optionally `-scan` (T5Config.scan_layers: the layers as one lax.scan). On XLA:CPU, unrolled remat
layers keep as much as the plain step (XLA hoists their recomputation), so there the scan is the
only way remat shows; on a GPU the same command gives that backend's figures.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from benchmarks.train_bench import _random_triples  # noqa: E402
from instructor_jax.config import preset  # noqa: E402

POLICIES = {"plain": "none", "full": "full", "save_dots": "save_dots", "dotsnb": "save_dots_no_batch"}


def measure(config, batch: int, length: int) -> dict:
  import jax

  from instructor_jax import sharding as shd, train_step as ts
  from instructor_jax.optim import OptimConfig, make_optimizer
  mesh = shd.make_mesh(shd.MeshConfig(), jax.devices()[:1])
  tx, schedule = make_optimizer(OptimConfig(learning_rate=2e-5), 1000)
  state = ts.abstract_state(config, tx, mesh)
  shardings = ts.batch_shardings(mesh)
  data = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k])
          for k, v in _random_triples(batch, length, config.encoder.vocab_size).items()}
  began = time.perf_counter()
  compiled = ts.make_train_step(config, tx, schedule, mesh).lower(state, data).compile()
  seconds = time.perf_counter() - began
  m = compiled.memory_analysis()
  return {"compile_s": seconds, "temp_gib": m.temp_size_in_bytes / 2**30,
          "argument_gib": m.argument_size_in_bytes / 2**30,
          "temp_mib_per_triple": m.temp_size_in_bytes / 2**20 / batch}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--shape", default="gtr-large", help="a preset of instructor_jax.config")
  p.add_argument("--batch", type=int, default=8, help="triples per step")
  p.add_argument("--length", type=int, default=256, help="tokens per text")
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--settings", default="plain,full,full-scan,dotsnb-scan")
  p.add_argument("--out", default=None)
  args = p.parse_args(argv)
  import jax
  base = preset(args.shape).with_encoder(dtype=args.dtype, dropout_rate=0.1, attention_impl="xla")
  results = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
             "backend": jax.default_backend(), "device": jax.devices()[0].device_kind, "rows": {}}
  for setting in args.settings.split(","):
    policy, _, scan = setting.partition("-")
    if policy not in POLICIES or scan not in ("", "scan"):
      raise SystemExit(f"--settings: {setting!r} is not one of {sorted(POLICIES)}, optionally with -scan.")
    config = base.with_encoder(remat_policy=POLICIES[policy], scan_layers=bool(scan))
    row = results["rows"][setting] = measure(config, args.batch, args.length)
    print(f"{setting:14s} compile {row['compile_s']:6.1f} s | XLA temp {row['temp_gib']:7.2f} GiB "
          f"({row['temp_mib_per_triple']:.0f} MiB per triple) | arguments {row['argument_gib']:.2f} GiB", flush=True)
    if args.out:
      pathlib.Path(args.out).write_text(json.dumps(results, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
