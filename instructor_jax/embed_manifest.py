"""The embed job's identity (`_job.json`) and its final `_manifest.json`.

The job spec holds everything that decides the stored numbers: model fingerprint, compute dtype,
maximum length, instruction(s), fields, inputs (paths, sizes, row counts, checksums), part size, precision,
calibration ranges. Its hash is stored in every part sidecar; an output directory whose spec
differs from the current command is refused (unless --overwrite), so results never mix.

The manifest is written once, by process 0, when every part's sidecar exists (see embed.py).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime
import hashlib
import json
import os
import sys
import weakref
from typing import Any

import jax
import numpy as np

from instructor_jax.embed_io import BadRow, Fields, InputFile
from instructor_jax.embed_output import PARTS_DIR, RANGES_FILE, atomic_json, read_sidecar, stored_dim

JOB_FILE = "_job.json"
RUNTIME_FILE = "_runtime.json"  # where the last run computed: informative, not part of the job's identity
LEGACY_MANIFEST_FILE = "manifest.json"
MANIFEST_FILE = "_manifest.json"  # leading "_": Parquet readers skip it, so the directory reads as one dataset
# 2: rows.skipped counts rows only; unreadable files, skipped whole, are counted apart (version 1 had
# them there as "unreadable_file", a number of files among numbers of rows).
MANIFEST_VERSION = 2
# A per-row instruction field can carry millions of distinct strings; keep the manifest readable.
MAX_LISTED_INSTRUCTIONS = 1000


class OutputMismatchError(RuntimeError):
  """The output directory holds results of a different job, or a job record that cannot be read."""


FINGERPRINT_SCHEMES = ("sha256-leaves", "sha256")  # the first for new jobs


def params_fingerprint(params: Any, scheme: str = "sha256-leaves") -> str:
  """`scheme:hex` identifying the weights: every parameter's path, dtype, shape and bytes (as stored: float32).

  "sha256-leaves": the sha256 of each parameter's bytes, computed on parallel threads (hashlib
  releases the GIL), then one sha256 over `path|dtype|shape|digest` lines in path order. "sha256":
  one sha256 over all of them in turn, what jobs written before 2026-11-27 recorded (a single core
  at ~1.5 GB/s: 0.9 s of every gtr-large job's start-up, 13 s for gtr-xxl's 19 GB); computed only
  to resume such a job (`recorded_fingerprint_scheme`).
  """
  leaves = sorted(jax.tree_util.tree_flatten_with_path(params)[0], key=lambda kv: jax.tree_util.keystr(kv[0]))

  def host(leaf: Any) -> np.ndarray:  # one leaf at a time on the host: bounded host memory
    return np.ascontiguousarray(jax.device_get(leaf))

  h = hashlib.sha256()
  if scheme == "sha256":
    for path, leaf in leaves:
      value = host(leaf)
      h.update(f"{jax.tree_util.keystr(path)}|{value.dtype}|{value.shape}|".encode())
      h.update(value.tobytes())
    return "sha256:" + h.hexdigest()
  if scheme not in FINGERPRINT_SCHEMES:
    raise ValueError(f"unknown parameter fingerprint scheme {scheme!r}; expected one of {FINGERPRINT_SCHEMES}.")

  def line(path_leaf: tuple[Any, Any]) -> str:
    value = host(path_leaf[1])
    return f"{jax.tree_util.keystr(path_leaf[0])}|{value.dtype}|{value.shape}|{hashlib.sha256(value).hexdigest()}\n"

  with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
    for text in pool.map(line, leaves):  # in path order
      h.update(text.encode())
  return "sha256-leaves:" + h.hexdigest()


_FINGERPRINTS: "weakref.WeakKeyDictionary[Any, tuple[tuple, list, str]]" = weakref.WeakKeyDictionary()


def model_fingerprint(model: Any, scheme: str = "sha256-leaves") -> str:
  """`params_fingerprint(model.params)`, computed once per model and set of parameter arrays.

  Jobs run in one process on one loaded model (a notebook, benchmarks/run.py) hash its weights
  once. Only JAX arrays are cached (immutable: a NumPy leaf could be edited in place), by tree
  structure and array identity, held by weak references so that replaced weights are freed.
  """
  leaves, treedef = jax.tree_util.tree_flatten(model.params)
  if not all(isinstance(x, jax.Array) for x in leaves):
    return params_fingerprint(model.params, scheme)
  key = (scheme, treedef, tuple(id(x) for x in leaves))
  entry = _FINGERPRINTS.get(model)
  # A live weak reference to the very array rules out an id reused by a new array.
  if entry is None or entry[0] != key or any(ref() is not x for ref, x in zip(entry[1], leaves)):
    entry = _FINGERPRINTS[model] = (key, [weakref.ref(x) for x in leaves], params_fingerprint(model.params, scheme))
  return entry[2]


def recorded_fingerprint_scheme(out_dir: str) -> str | None:
  """The fingerprint scheme of the job recorded in `out_dir` (None if none or unknown), so a resume
  compares like with like."""
  job = read_job(out_dir)
  recorded = (job or {}).get("model", {}).get("fingerprint")
  scheme = recorded.split(":")[0] if isinstance(recorded, str) and ":" in recorded else None
  return scheme if scheme in FINGERPRINT_SCHEMES else None


def read_job(out_dir: str) -> dict[str, Any] | None:
  """The recorded job (`_job.json`), None if there is none; a damaged one is refused by name."""
  path = os.path.join(out_dir, JOB_FILE)
  if not os.path.exists(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      job = json.load(f)
  except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
    job = e
  if not isinstance(job, dict):
    problem = f"{type(job).__name__}: {job}" if isinstance(job, ValueError) else f"a JSON {type(job).__name__}"
    raise OutputMismatchError(f"{path} is damaged ({problem}); it records which job the results in {out_dir} belong "
                              "to, so they cannot be checked or resumed. Rerun with --overwrite to start over, or "
                              "use another --output directory.")
  return job


def spec_hash(spec: dict[str, Any]) -> str:
  return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
  out = []
  for key in sorted(set(old) | set(new)):
    a, b = old.get(key), new.get(key)
    if isinstance(a, dict) and isinstance(b, dict):
      out += _diff(a, b, f"{prefix}{key}.")
    elif isinstance(a, list) and isinstance(b, list) and len(a) != len(b) and None not in (_paths(a), _paths(b)):
      out += _diff_paths(a, b, f"{prefix}{key}")
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and a != b:
      # Per entry: with many input files, the one that changed must show (an edited file's size).
      for i, (x, y) in enumerate(zip(a, b)):
        if isinstance(x, dict) and isinstance(y, dict):
          out += _diff(x, y, f"{prefix}{key}[{i}].")
        elif x != y:
          out.append(f"{prefix}{key}[{i}]: existing {json.dumps(x)[:120]} vs now {json.dumps(y)[:120]}")
    elif a != b:
      out.append(f"{prefix}{key}: existing {json.dumps(a, sort_keys=True)[:120]} vs now "
                 f"{json.dumps(b, sort_keys=True)[:120]}")
  return out


def _paths(entries: list[Any]) -> list[str] | None:
  """The paths of a list of inputs (dicts with a path) or of paths, else None."""
  paths = [e.get("path") if isinstance(e, dict) else e for e in entries]
  return paths if all(isinstance(p, str) for p in paths) else None


def _diff_paths(a: list[Any], b: list[Any], name: str, shown: int = 10) -> list[str]:
  """Inputs added or removed (a glob that matched a new file): the count, the paths that differ in full
  (a cut JSON list would hide them), and the changes of the inputs in both."""
  was, now = _paths(a), _paths(b)
  line = f"{name}: existing {len(a)} vs now {len(b)}"
  was_set, now_set = set(was), set(now)
  for label, paths in (("added", [p for p in now if p not in was_set]),
                       ("removed", [p for p in was if p not in now_set])):
    if paths:
      more = f", ... ({len(paths) - shown} more)" if len(paths) > shown else ""
      line += f"; {label}: " + ", ".join(paths[:shown]) + more
  before = {x["path"]: x for x in a if isinstance(x, dict)}
  return [line] + [d for y in b if isinstance(y, dict) and y["path"] in before
                   for d in _diff(before[y["path"]], y, f"{name}[{y['path']}].")]


def job_spec(args: Any, model: Any, fields: Fields, files: list[InputFile], unreadable: list[BadRow], max_len: int,
             buckets: list[int], pack_length: int, ranges: np.ndarray | None,
             fingerprint_scheme: str = "sha256-leaves") -> dict[str, Any]:
  """Everything that decides the stored numbers (see the module docstring)."""
  cfg = model.config
  ranges_hash = None if ranges is None else hashlib.sha256(ranges.tobytes()).hexdigest()
  return {
      "model": {"fingerprint": model_fingerprint(model, fingerprint_scheme),
                "embedding_dim": cfg.embedding_dim, "compute_dtype": cfg.encoder.dtype,
                "normalize": cfg.normalize, "max_seq_length": max_len},
      "instruction": {"fixed": fields.fixed_instruction, "field": fields.instruction},
      "fields": {"text": fields.text, "id": fields.id, "id_type": fields.id_type},
      "inputs": [{"path": f.path, "format": f.format, "size": f.size, "rows": f.rows, "checksum": f.checksum}
                 for f in files],
      "unreadable_inputs": [b.where for b in unreadable],
      "rows_per_part": args.rows_per_part,
      "num_parts": -(-sum(f.rows for f in files) // args.rows_per_part),
      "output": {"format": args.format, "precision": args.precision,
                 "stored_dim": stored_dim(cfg.embedding_dim, args.precision),
                 "int8_ranges": None if ranges is None else {"file": RANGES_FILE, "sha256": ranges_hash}},
      # Buckets change the padding, and in bf16 padding-free results can differ in the last bit.
      "buckets": list(buckets),
      # Texts longer than the largest bucket: padded to doubling lengths (since 2026-11-28), before that
      # to max_seq_length. Recorded only where it applies (a bucket list below max_seq_length), so
      # that jobs it does not touch keep their identity, and the others are not resumed across the change.
      **({"long_padding": "doubling"} if max(buckets, default=max_len) < max_len else {}),
      # Likewise the packed row length (the effective one, capped at max_seq_length): a text's
      # neighbours and offset in its row change the summation order, so results move by float
      # rounding (~1.5e-7 in float32, more in bf16, and a step at int8/binary edges). Mixing parts
      # of two settings would be harmless for search but would break "same spec, same bits"
      # (a resumed job equals an uninterrupted one exactly), so a change is refused like --buckets.
      "pack_length": pack_length,
  }


def forget_job(out_dir: str) -> None:
  """Removes the job's identity, runtime record and int8 ranges from a directory that holds no results,
  so that the next command starts afresh there."""
  for name in (JOB_FILE, RUNTIME_FILE, RANGES_FILE):
    with contextlib.suppress(FileNotFoundError):
      os.remove(os.path.join(out_dir, name))


def has_results(out_dir: str) -> bool:
  """Whether the directory holds a part's data file, a part's sidecar or a manifest: anything beyond
  a job's identity."""
  if not os.path.isdir(out_dir):
    return False
  if any(n.startswith("part-") or n in (MANIFEST_FILE, LEGACY_MANIFEST_FILE) for n in os.listdir(out_dir)):
    return True
  parts = os.path.join(out_dir, PARTS_DIR)
  return os.path.isdir(parts) and any(n.endswith(".json") for n in os.listdir(parts))


def _adopt_renamed_inputs(old: dict[str, Any], spec: dict[str, Any]) -> None:
  """An input named by another path (relative against absolute, another working directory, a moved
  file) with the same format, size, rows and CRC-32 is the same input: `spec` takes the recorded path,
  so that the job and its parts' hash stay those of the existing job. Inputs are matched by position,
  so only when there are as many as before: with one added or removed (a glob that matched a new
  file), position i is another file, and `_diff` names what changed instead."""
  if len(old.get("inputs") or []) != len(spec["inputs"]):
    return
  for i, (was, now) in enumerate(zip(old["inputs"], spec["inputs"])):
    same = all(was.get(k) == now[k] for k in ("format", "size", "rows", "checksum"))
    if same and was.get("path") != now["path"]:
      print(f"note: input {i} {now['path']} is {was['path']} of the existing job (same size, rows and CRC-32); "
            "resuming it.", file=sys.stderr)
      now["path"] = was["path"]


def check_or_write_job(out_dir: str, spec: dict[str, Any], overwrite: bool) -> None:
  """Writes `_job.json`, or refuses if the directory holds another job's results (`spec` may take
  the existing job's input paths: `_adopt_renamed_inputs`)."""
  path = os.path.join(out_dir, JOB_FILE)
  old = None if overwrite else read_job(out_dir)
  if old is not None:
    _adopt_renamed_inputs(old, spec)
    diffs = _diff(old, spec)
    if diffs:
      raise OutputMismatchError(
          f"{out_dir} holds results of a different embedding job; mixing them would give inconsistent "
          "embeddings. Differences:\n  " + "\n  ".join(diffs) +
          "\nUse another --output directory, or --overwrite to discard the existing results.")
    return
  # Every process writes the same bytes; the atomic rename makes concurrent writers harmless.
  atomic_json(path, spec)


def note_runtime(out_dir: str, runtime: dict[str, Any], compute_dtype: str) -> None:
  """Records where this run computes (`_runtime.json`), warning on stderr if it differs from the last run.

  Not part of the job's identity: resuming on other devices or with another batch budget is allowed,
  since what changes is batch shapes and kernels, i.e. float rounding, not the model or the texts.
  Kept out of `_job.json` so that the job file reads the same whatever ran it.
  """
  path = os.path.join(out_dir, RUNTIME_FILE)
  try:
    with open(path, encoding="utf-8") as f:
      old = json.load(f)
  except (OSError, ValueError):  # none yet, or damaged: a record of where runs computed, overwritten below
    old = None
  if isinstance(old, dict):
    if "attention" not in old and runtime.get("attention") != "dot_product_attention":
      # Releases before 2026-11-27 recorded no kernel; their inference default was XLA's fused one.
      old["attention"] = "not recorded (an earlier release: dot_product_attention unless set otherwise)"
    if "chunk_chars" not in old:
      # Releases before chunked parts (2026-11-27) batched each part whole: other texts shared batches.
      old["chunk_chars"] = "not recorded (an earlier release: each part batched whole)"
    # Other keys an older release did not record are news, not changes.
    changed = _diff(old, {k: v for k, v in runtime.items() if k in old})
    if changed:
      print(f"warning: resuming {out_dir} with " + "; ".join(changed) + ". Parts written now differ from the "
            f"existing ones by the float rounding of {compute_dtype} computation, not bit for bit; the same "
            "--batch-tokens, attention kernel and chunking on the same kind and number of devices give identical bits.",
            file=sys.stderr)
  atomic_json(path, runtime)


def merge_counts(parts: list[dict[str, Any]], key: str) -> dict[str, int]:
  total: dict[str, int] = {}
  for p in parts:
    for k, v in p.get(key, {}).items():
      total[k] = total.get(k, 0) + int(v)
  return dict(sorted(total.items()))


def build_manifest(out_dir: str, spec: dict[str, Any], num_parts: int,
                   unreadable: list[dict[str, str]]) -> dict[str, Any] | None:
  """The manifest from all sidecars, or None while some part is still missing.

  A sidecar left by another job (a different `job_hash`: say a process started with other settings
  before `_job.json` refused it) counts as missing, as it does for `part_is_complete`: its counts
  must not enter this job's manifest."""
  job_hash = spec_hash(spec)
  parts = [read_sidecar(out_dir, i) for i in range(num_parts)]
  if any(p is None or p.get("job_hash") != job_hash for p in parts):
    return None
  instructions = merge_counts(parts, "instructions")
  skipped = merge_counts(parts, "skipped")
  return {
      "manifest_version": MANIFEST_VERSION,
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "job_hash": job_hash,
      **spec,
      "instructions": {
          "distinct": len(instructions),
          "counts": dict(list(instructions.items())[:MAX_LISTED_INSTRUCTIONS]),
          "listed_all": len(instructions) <= MAX_LISTED_INSTRUCTIONS,
      },
      "rows": {
          "input_slots": sum(p["slots"] for p in parts),
          "embedded": sum(p["rows"] for p in parts),
          "skipped": skipped,
          "truncated": sum(p.get("truncated", 0) for p in parts),
          # Rows whose text was truncated away entirely (the instruction filled max_seq_length).
          "text_cut_away": sum(p.get("text_cut_away", 0) for p in parts),
      },
      "unreadable_files": unreadable,  # {path, error} of each input skipped whole (--on-error skip)
      "parts": [{k: p[k] for k in ("part", "rows", "slots", "first_slot", "files", "skipped", "truncated")}
                for p in parts],
  }


def write_manifest(out_dir: str, manifest: dict[str, Any]) -> str:
  path = os.path.join(out_dir, MANIFEST_FILE)
  atomic_json(path, manifest)
  remove_legacy_manifest(out_dir)
  return path


def remove_legacy_manifest(out_dir: str) -> None:
  """Drops the pre-0.1 `manifest.json` (no leading "_"), which Parquet readers would try to read."""
  legacy = os.path.join(out_dir, LEGACY_MANIFEST_FILE)
  if os.path.exists(legacy):
    os.remove(legacy)
