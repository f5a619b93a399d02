"""The embed job's progress bar and its end-of-job summary (returned, and printed to stderr)."""

from __future__ import annotations

import sys
import time
from typing import Any

from instructor_jax import embed_manifest


class Progress:
  """tqdm bar over this process's pending rows, with tokens/s; throughput kept for the summary."""

  def __init__(self, total: int, enabled: bool):
    from tqdm import tqdm
    # Not a terminal (a cluster log file): one line every 30 s instead of a redrawn bar.
    interval = 0.5 if sys.stderr.isatty() else 30.0
    self.bar = tqdm(total=total, unit="row", dynamic_ncols=True, disable=not enabled, desc="embed",
                    file=sys.stderr, smoothing=0.1, mininterval=interval, maxinterval=max(10.0, interval))
    self.start, self.rows, self.tokens, self.padded = time.perf_counter(), 0, 0, 0

  def update(self, rows: int, tokens: int, padded: int, slots: int) -> None:
    self.rows, self.tokens, self.padded = self.rows + rows, self.tokens + tokens, self.padded + padded
    self.bar.update(slots)
    elapsed = max(time.perf_counter() - self.start, 1e-9)
    self.bar.set_postfix_str(f"{self.tokens / elapsed:,.0f} tok/s", refresh=False)


def summary(done: list[dict[str, Any]], plan: Any, progress: Progress, shapes: set[tuple[int, ...]],
             manifest: str | None, t0: float) -> dict[str, Any]:
  """What main() returns: rows, skips, tokens, padding efficiency, parts, throughput (`plan`: embed._Plan)."""
  seconds = time.perf_counter() - t0
  skipped = embed_manifest.merge_counts(done, "skipped")
  compute_s = max(time.perf_counter() - progress.start, 1e-9)
  return {
      # Rows skipped by reason; input files skipped whole are counted apart.
      "rows": progress.rows, "skipped": skipped, "unreadable_files": len(plan.unreadable),
      "truncated": sum(d["truncated"] for d in done),
      "text_cut_away": sum(d.get("text_cut_away", 0) for d in done),
      "tokens": progress.tokens, "padding_efficiency": progress.tokens / max(progress.padded, 1),
      "parts_written": len(done), "parts_already_complete": len(plan.complete), "parts_total": plan.num_parts,
      "parts_pending_elsewhere": plan.num_parts - len(done) - len(plan.complete),
      "batch_shapes": sorted(shapes), "seconds": seconds, "compute_seconds": compute_s,
      "rows_per_s": progress.rows / compute_s, "tokens_per_s": progress.tokens / compute_s,
      "manifest": manifest,
  }


def print_summary(s: dict[str, Any]) -> None:
  skipped = ", ".join(f"{k} {v}" for k, v in s["skipped"].items()) or "none"
  # The rates are over the embedding itself; the total also holds planning (counting and checksumming
  # the inputs) and int8/uint8 calibration.
  print(f"embedded {s['rows']:,} rows ({s['tokens']:,} tokens) in {s['seconds']:.1f} s, "
        f"{s['compute_seconds']:.1f} s of them embedding: "
        f"{s['rows_per_s']:,.1f} rows/s, {s['tokens_per_s']:,.0f} tokens/s, padding efficiency "
        f"{s['padding_efficiency']:.0%}, {len(s['batch_shapes'])} batch shapes", file=sys.stderr)
  unreadable = f"; unreadable files skipped: {s['unreadable_files']}" if s["unreadable_files"] else ""
  print(f"skipped rows: {skipped}; truncated rows: {s['truncated']:,}{unreadable}", file=sys.stderr)
  if s.get("text_cut_away"):
    print(f"warning: {s['text_cut_away']:,} rows kept no token of their text within the max sequence length "
          "(their instruction filled it): each embeds its instruction alone, so such rows all look alike; "
          "raise --max-seq-length or shorten the instruction.", file=sys.stderr)
  print(f"parts: {s['parts_written']} written, {s['parts_already_complete']} already complete, "
        f"{s['parts_pending_elsewhere']} for other processes or unfinished, of {s['parts_total']}", file=sys.stderr)
  print(f"manifest: {s['manifest'] or 'not written yet: process 0 writes it once every part exists (with independent launches, rerun process 0 after the others finish; it skips complete parts)'}",
        file=sys.stderr)
