"""What a training run writes: metrics.jsonl, TensorBoard events, a progress line; throughput and MFU."""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from typing import Any, Mapping

from instructor_jax.config import ConfigError, InstructorConfig

# Dense bf16 peak FLOP/s per chip, from the vendors' spec sheets (device_kind prefix -> FLOP/s).
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA GH200": 989e12,
    "NVIDIA A100": 312e12,
}


def peak_flops(device_kind: str) -> float | None:
  """Peak bf16 FLOP/s of one device, or None when unknown (then no MFU is reported)."""
  for prefix in sorted(PEAK_FLOPS, key=len, reverse=True):
    if device_kind.startswith(prefix):
      return PEAK_FLOPS[prefix]
  return None


def encoder_flops(config: InstructorConfig, rows: int, length: int) -> float:
  """Forward model FLOPs of `rows` sequences of `length` tokens (matmuls + attention + projection)."""
  enc = config.encoder
  ff_mats = 3 if enc.feed_forward == "gated-gelu" else 2
  per_token = 2 * enc.num_layers * (4 * enc.d_model * enc.inner_dim + ff_mats * enc.d_model * enc.d_ff)
  attention = 2 * 2 * enc.num_layers * length * enc.inner_dim  # q.k^T and weights.v, per token
  projection = 2 * enc.d_model * (config.projection_dim or 0) / length  # once per row
  return rows * length * (per_token + attention + projection)


def train_step_flops(config: InstructorConfig, batch_size: int, query_len: int, doc_len: int) -> float:
  """Model FLOPs of one step: forward + backward (2x forward); recomputation is not counted."""
  return 3 * (encoder_flops(config, batch_size, query_len) + encoder_flops(config, 2 * batch_size, doc_len))


def packed_step_flops(config: InstructorConfig, rows: int, length: int, texts: int) -> float:
  """Model FLOPs of one step over `rows` packed rows of `length` tokens holding `texts` texts: every
  position's matmuls, attention over the whole row (masked pairs are computed too), one projection
  per text (the step projects every text slot, used or not: under 0.1% more, not counted)."""
  projection = 2 * config.encoder.d_model * (config.projection_dim or 0) * texts
  return 3 * (encoder_flops(config.replace(projection_dim=None), rows, length) + projection)


def _step_of(line: str) -> int | None:
  try:
    return int(json.loads(line)["step"])
  except (ValueError, KeyError, TypeError):
    return None


class _JsonlSink:
  """Appends JSON lines; on object stores (gs://...), which cannot append, rewrites the file.

  Records past `start_step` (logged by a run that died after its last checkpoint) are dropped on
  open: the resumed run logs those steps again, and the file must hold each step once.
  """

  def __init__(self, path: str, start_step: int = 0):
    from etils import epath
    self.path = epath.Path(path)
    self.remote = "://" in path
    old = self.path.read_text().splitlines(keepends=True) if self.path.exists() else []
    kept = [x for x in old if x.strip() and (_step_of(x) is None or _step_of(x) <= start_step)]
    kept = [x if x.endswith("\n") else x + "\n" for x in kept]
    self.lines = kept if self.remote else []
    if not self.remote and kept != old:
      self.path.write_text("".join(kept))
    self._file = None if self.remote else open(path, "a")

  def write(self, line: str) -> None:
    if self.remote:
      self.lines.append(line)
      self.path.write_text("".join(self.lines))
    else:
      self._file.write(line)
      self._file.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()


def _importable(module: str) -> bool:
  try:
    return importlib.util.find_spec(module) is not None
  except ModuleNotFoundError:  # a parent package ("google") is missing
    return False


def check_remote_workdir(workdir: str) -> None:
  """A gs:// workdir takes metrics.jsonl through etils.epath (TensorFlow's gfile, or gcsfs) and the
  TensorBoard events through tensorboardX (google-cloud-storage): refuse it before anything is built
  where those are missing, rather than fail once the model is loaded (on a pod: on process 0 only,
  leaving the other hosts waiting)."""
  if not workdir.startswith("gs://"):
    return
  missing = [pkg for pkg, ok in (("google-cloud-storage", _importable("google.cloud.storage")),
                                 ("tensorflow or gcsfs", _importable("tensorflow") or _importable("gcsfs"))) if not ok]
  if missing:
    raise ConfigError(f"--workdir {workdir}: writing the metrics and TensorBoard events to gs:// needs "
                      f"{' and '.join(missing)}, not installed here; pip install -e '.[train]' (which has them), or "
                      "pip install google-cloud-storage gcsfs.")


class MetricsWriter:
  """Writes one record per logged step; only the chief process (index 0) writes files."""

  def __init__(self, workdir: str, *, chief: bool, total_steps: int, batch_size: int, num_devices: int,
               device_peak_flops: float | None, start_step: int = 0):
    self.chief = chief
    self.total_steps = total_steps
    self.batch_size = batch_size
    self.peak = None if device_peak_flops is None else device_peak_flops * num_devices
    self._jsonl = self._tb = None
    if chief:
      from etils import epath
      from tensorboardX import SummaryWriter
      epath.Path(workdir).mkdir(parents=True, exist_ok=True)
      self._jsonl = _JsonlSink(f"{workdir.rstrip('/')}/metrics.jsonl", start_step)
      # A resume from step s (after a kill, the old event files may hold later steps): TensorBoard
      # hides earlier files' events from step s + 1 on, so a curve shows the resumed run only.
      self._tb = SummaryWriter(f"{workdir.rstrip('/')}/tensorboard", purge_step=start_step + 1 if start_step else None)

  def write(self, step: int, task: str, metrics: Mapping[str, float], seconds: float | None,
            real_tokens: float = 0.0, padded_tokens: float = 0.0, flops: float = 0.0) -> dict[str, Any]:
    """Records the metrics of `step` (1-based count of updates done).

    `seconds` is the wall time per step; `real_tokens` (text), `padded_tokens` (the positions the
    matmuls see, at the step's padded lengths) and model `flops` are per step, all averaged since
    the previous record. tokens_per_s counts padded positions, real_tokens_per_s only the text.
    """
    record: dict[str, Any] = {"step": step, "task": task, **{k: float(v) for k, v in metrics.items()}}
    if seconds:
      record["step_seconds"] = seconds
      record["triples_per_s"] = self.batch_size / seconds
      record["tokens_per_s"] = padded_tokens / seconds
      record["real_tokens_per_s"] = real_tokens / seconds
      if self.peak:
        record["mfu"] = flops / seconds / self.peak
    record["time"] = time.time()
    if self.chief:
      self._jsonl.write(json.dumps(record) + "\n")
      for k, v in record.items():
        if isinstance(v, float) and k != "time":
          self._tb.add_scalar(f"train/{k}", v, step)
      print(self._progress_line(record), file=sys.stdout, flush=True)
    return record

  def _progress_line(self, r: Mapping[str, Any]) -> str:
    parts = [f"step {r['step']}/{self.total_steps}", f"loss {r['loss']:.4f}",
             f"top1 {r.get('top1_q2d', float('nan')):.3f}", f"lr {r.get('lr', 0.0):.3g}",
             f"gnorm {r.get('grad_norm', float('nan')):.3g}"]
    if "eval_sts_spearman" in r:
      parts.append(f"STS Spearman {r['eval_sts_spearman']:.2f}")
    if "triples_per_s" in r:
      parts.append(f"{r['triples_per_s']:.1f} triples/s {r['tokens_per_s']:.0f} tok/s "
                   f"({r.get('real_tokens_per_s', float('nan')):.0f} not padding)")
    if "mfu" in r:
      parts.append(f"MFU {100 * r['mfu']:.1f}%")
    parts.append(f"task {r['task']}")
    return " | ".join(parts)

  def close(self) -> None:
    if self.chief:
      self._jsonl.close()
      self._tb.close()
