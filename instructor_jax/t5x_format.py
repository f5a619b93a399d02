"""Reads t5x checkpoints (how GTR was released): msgpack `checkpoint` + zarr arrays via tensorstore.

A t5x checkpoint directory holds `checkpoint`, a msgpack file (flax serialization, ndarray
extension types) of `{'version', 'optimizer': {'target': params, 'state': ...}}`. Small arrays sit
inline; each large one is a tensorstore spec (`driver: zarr`, `kvstore: {driver: gfile, path:
<relative>}`) whose zarr v2 directory lies next to the file. Both local paths and `gs://` work:
every byte is read through a tensorstore kvstore (`file` or `gcs`).

t5x stores no model config, so the architecture is inferred from the tensor shapes. Parameter
names are the t5x dual-encoder names that our tree uses, so loading is a read, not a rename.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import re
import warnings
from typing import Any, Iterator, Mapping

import numpy as np

from instructor_jax.config import InstructorConfig, T5Config
from instructor_jax.hf_format import CheckpointError, expected_shapes

CHECKPOINT_FILE = "checkpoint"
DEFAULT_MAX_DISTANCE = 128
# Top-level t5x subtrees that an encoder does not use (t5x encoder-decoder models): skipped unread.
_DECODER_KEYS = ("decoder",)


def _split_gcs(path: str) -> tuple[str, str]:
  bucket, _, prefix = path[len("gs://"):].partition("/")
  if not bucket:
    raise CheckpointError(f"{path}: expected gs://BUCKET/PATH.")
  return bucket, prefix.strip("/")


def _kvstore(directory: str) -> dict[str, Any]:
  """A tensorstore kvstore spec for a directory (trailing slash: keys are relative to it)."""
  if directory.startswith("gs://"):
    bucket, prefix = _split_gcs(directory)
    return {"driver": "gcs", "bucket": bucket, "path": f"{prefix}/" if prefix else ""}
  return {"driver": "file", "path": os.path.abspath(directory) + "/"}


def _join(directory: str, name: str) -> str:
  return f"{directory.rstrip('/')}/{name}" if directory.startswith("gs://") else os.path.join(directory, name)


@functools.lru_cache(maxsize=1)
def _context():
  """One tensorstore context for every read: shared caches, and a bounded GCS retry budget.

  tensorstore's default retries an unreachable bucket for minutes; five retries with backoff up
  to 16 s still ride out transient errors but fail in about half a minute when offline.
  """
  import tensorstore as ts
  return ts.Context({"gcs_request_retries": {"max_retries": 5, "initial_delay": "1s", "max_delay": "16s"}})


def _open_kvstore(directory: str):
  import tensorstore as ts
  return ts.KvStore.open(_kvstore(directory), context=_context()).result()


def _keys(directory: str, first: str, last: str) -> list[str]:
  """Keys in [first, last) under `directory`, through tensorstore (same code for local and gs://)."""
  import tensorstore as ts
  try:
    keys = _open_kvstore(directory).list(ts.KvStore.KeyRange(first, last)).result()
  except Exception as e:  # missing local dir, unreachable bucket, no credentials
    raise CheckpointError(f"{directory}: cannot list ({type(e).__name__}: {e}).") from e
  return [k.decode() for k in keys]


def _has_checkpoint_file(directory: str) -> bool:
  return CHECKPOINT_FILE in _keys(directory, CHECKPOINT_FILE, CHECKPOINT_FILE + "\0")


def _steps(directory: str) -> list[int]:
  """Steps of the checkpoint_<step>/checkpoint files under a t5x model directory.

  Listing is recursive in tensorstore, so on a bucket this also enumerates array chunks: pass the
  checkpoint_<step> directory itself to skip it.
  """
  keys = _keys(directory, "checkpoint_", "checkpoint`")  # '`' sorts right after '_'
  found = (re.match(r"^checkpoint_(\d+)/checkpoint$", k) for k in keys)
  return sorted({int(m.group(1)) for m in found if m})


def _read_file(directory: str, name: str) -> bytes | None:
  try:
    result = _open_kvstore(directory).read(name).result()
  except Exception as e:
    raise CheckpointError(f"{_join(directory, name)}: cannot read ({type(e).__name__}: {e}).") from e
  return bytes(result.value) if result.state == "value" else None


def resolve_checkpoint_dir(path: str, step: int | None = None) -> str:
  """`path` itself if it holds `checkpoint`; for a t5x model dir, its `checkpoint_<step>` (latest)."""
  path = path.rstrip("/") or "/"
  if step is None and _has_checkpoint_file(path):
    return path
  if step is not None and _has_checkpoint_file(_join(path, f"checkpoint_{step}")):
    return _join(path, f"checkpoint_{step}")
  steps = _steps(path)
  if step is not None and not steps and _has_checkpoint_file(path):
    own = re.search(r"checkpoint_(\d+)$", path)
    if own and int(own.group(1)) == step:
      return path
    what = f"the checkpoint of step {own.group(1)}" if own else "a single t5x checkpoint"
    raise CheckpointError(f"{path}: is {what}, but step={step} was requested; pass its parent model directory "
                          "with the step, or drop the step.")
  if step is not None:
    raise CheckpointError(f"{path}: no checkpoint_{step}; t5x steps found: {steps or 'none'}.")
  if steps:
    return _join(path, f"checkpoint_{steps[-1]}")
  raise CheckpointError(f"{path}: no t5x '{CHECKPOINT_FILE}' file and no checkpoint_<step> directories.")


def is_t5x_checkpoint(path: str) -> bool:
  """True for a t5x checkpoint dir (has `checkpoint`) or a t5x model dir (has checkpoint_<step>/)."""
  if not path.startswith("gs://") and not os.path.isdir(path):
    return False
  try:
    return _has_checkpoint_file(path) or bool(_steps(path))
  except CheckpointError:
    return False


def read_msgpack(directory: str) -> dict[str, Any]:
  """The decoded `checkpoint` file (flax msgpack, version 2/3)."""
  from flax import serialization
  raw = _read_file(directory, CHECKPOINT_FILE)
  if raw is None:
    raise CheckpointError(f"{_join(directory, CHECKPOINT_FILE)}: file not found; expected a t5x checkpoint "
                          "directory such as .../checkpoint_1000000.")
  try:
    state = serialization.msgpack_restore(raw)
  except Exception as e:
    raise CheckpointError(f"{_join(directory, CHECKPOINT_FILE)}: not a t5x msgpack checkpoint ({e}).") from e
  if not isinstance(state, Mapping):
    raise CheckpointError(f"{_join(directory, CHECKPOINT_FILE)}: expected a msgpack map, got {type(state).__name__}.")
  return state


def _target(state: Mapping[str, Any], source: str) -> Mapping[str, Any]:
  version = state.get("version")
  if version not in (None, 2, 3):
    warnings.warn(f"{source}: t5x checkpoint version {version}; this reader was written for versions 2-3.",
                  stacklevel=3)
  if "optimizer" in state and "target" in state["optimizer"]:
    return state["optimizer"]["target"]
  if "target" in state:
    return state["target"]
  raise CheckpointError(f"{source}: no optimizer/target in the t5x checkpoint (top-level keys {sorted(state)}).")


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
  for key, value in tree.items():
    path = prefix + (str(key),)
    # A tensorstore spec is a dict too; it is recognised by its `driver` key.
    if isinstance(value, Mapping) and "driver" not in value:
      yield from _flatten(value, path)
    else:
      yield path, value


def _check_chunks(array_dir: str, name: str) -> None:
  """Refuses a zarr array with missing chunk files, which zarr would silently read as its fill value.

  That is what an interrupted `gsutil cp` leaves: without this check the tensor loads with zero
  blocks and the conversion succeeds.
  """
  raw = _read_file(array_dir, ".zarray")
  if raw is None:
    return  # not zarr v2 as expected: tensorstore's own open reports it
  meta = json.loads(raw)
  shape, chunks = meta.get("shape", []), meta.get("chunks", [])
  sep = meta.get("dimension_separator", ".")
  grid = [range(-(-n // c)) for n, c in zip(shape, chunks)] if shape else [range(1)]
  expected = {sep.join(map(str, index)) for index in itertools.product(*grid)}
  missing = sorted(expected - set(_keys(array_dir, "", "")))
  if missing and not os.environ.get("INSTRUCTOR_JAX_ALLOW_MISSING_CHUNKS"):
    raise CheckpointError(
        f"{array_dir}: tensor {name!r} lacks {len(missing)} of its {len(expected)} zarr chunk files (e.g. "
        f"{missing[:3]}); an interrupted copy? Copy the checkpoint again. (tensorstore can also leave an "
        "all-zero chunk unwritten: if the tensor really holds zero blocks, set INSTRUCTOR_JAX_ALLOW_MISSING_CHUNKS=1.)")


def _open_spec(spec: Mapping[str, Any], directory: str, name: str) -> np.ndarray:
  """Reads one tensorstore-backed array; the spec's relative gfile path is resolved to `directory`."""
  import tensorstore as ts
  spec = dict(spec)
  kv = spec.pop("kvstore", None)
  rel = (kv.get("path") if isinstance(kv, Mapping) else None) or spec.pop("path", None)
  if not rel:
    raise CheckpointError(f"{directory}: tensor {name!r} has a tensorstore spec without a path: {spec}.")
  spec.pop("path", None)
  if rel.startswith("gs://"):
    array_dir = rel
  else:
    array_dir = rel if os.path.isabs(rel) else _join(directory, rel)
  spec["kvstore"] = _kvstore(array_dir)
  _check_chunks(array_dir, name)
  try:
    store = ts.open(spec, open=True, read=True, context=_context()).result()
    return np.asarray(store.read().result())
  except Exception as e:
    raise CheckpointError(f"{array_dir}: cannot read tensor {name!r} with tensorstore "
                          f"({type(e).__name__}: {e}).") from e


def read_t5x_arrays(directory: str) -> dict[str, np.ndarray]:
  """Every parameter of `optimizer/target`, as float32 arrays keyed by '/'-joined t5x name."""
  source = _join(directory, CHECKPOINT_FILE)
  out: dict[str, np.ndarray] = {}
  dropped = set()
  for path, value in _flatten(_target(read_msgpack(directory), source)):
    name = "/".join(path)
    if path[0] in _DECODER_KEYS:
      dropped.add(path[0])  # never read: a t5x decoder can be as large as the encoder
      continue
    if isinstance(value, Mapping):
      value = _open_spec(value, directory, name)
    if not isinstance(value, np.ndarray) and not np.isscalar(value):
      raise CheckpointError(f"{source}: entry {name!r} is a {type(value).__name__}, not an array.")
    out[name] = np.asarray(value, dtype=np.float32)
  if dropped:
    warnings.warn(f"{source}: encoder-decoder t5x checkpoint; the {', '.join(sorted(dropped))} weights are "
                  "not read (only the encoder is used for embeddings).", stacklevel=2)
  return out


def _shape(arrays: Mapping[str, np.ndarray], name: str, source: str) -> tuple[int, ...]:
  if name not in arrays:
    raise CheckpointError(f"{source}: tensor {name!r} is missing; expected a t5x T5 encoder / dual encoder "
                          f"(found {sorted(arrays)[:8]}...).")
  return arrays[name].shape


def infer_config(arrays: Mapping[str, np.ndarray], source: str,
                 max_distance: int = DEFAULT_MAX_DISTANCE) -> InstructorConfig:
  """The architecture implied by the tensor shapes (t5x stores no config)."""
  vocab, d_model = _shape(arrays, "token_embedder/embedding", source)
  heads, buckets = _shape(arrays, "encoder/relpos_bias/rel_embedding", source)
  layers = sorted({int(m.group(1)) for m in (re.match(r"encoder/layers_(\d+)/", k) for k in arrays) if m})
  if not layers or layers != list(range(len(layers))):
    raise CheckpointError(f"{source}: encoder layer indices {layers} are not 0..N-1.")
  inner = _shape(arrays, "encoder/layers_0/attention/query/kernel", source)[1]
  if inner % heads:
    raise CheckpointError(f"{source}: attention width {inner} (query kernel) is not a multiple of the "
                          f"{heads} heads of encoder/relpos_bias/rel_embedding.")
  gated = "encoder/layers_0/mlp/wi_0/kernel" in arrays
  d_ff = _shape(arrays, f"encoder/layers_0/mlp/{'wi_0' if gated else 'wi'}/kernel", source)[1]
  projection = arrays.get("projection_layer/kernel")
  encoder = T5Config(vocab_size=vocab, d_model=d_model, num_heads=heads, d_kv=inner // heads, d_ff=d_ff,
                     num_layers=len(layers), feed_forward="gated-gelu" if gated else "relu",
                     relative_attention_num_buckets=buckets, relative_attention_max_distance=int(max_distance))
  return InstructorConfig(encoder=encoder, projection_dim=None if projection is None else projection.shape[1])


def params_from_t5x(arrays: Mapping[str, np.ndarray], cfg: InstructorConfig, source: str) -> dict[str, Any]:
  """Our parameter tree from t5x-named arrays; every shape is checked, nothing is left over."""
  shapes = {"/".join(k): v for k, v in expected_shapes(cfg.encoder).items()}
  if cfg.projection_dim is not None:
    shapes["projection_layer/kernel"] = (cfg.encoder.d_model, cfg.projection_dim)
  unknown = sorted(k for k in arrays if k not in shapes)
  if unknown:
    raise CheckpointError(f"{source}: unexpected tensors {unknown[:6]}; expected a T5 encoder / GTR dual encoder "
                          "without biases (t5x names such as encoder/layers_0/attention/query/kernel); "
                          "decoder and bias tensors cannot be mapped.")
  params: dict[str, Any] = {}
  for name, shape in shapes.items():
    value = arrays.get(name)
    if value is None:
      raise CheckpointError(f"{source}: tensor {name!r} is missing (inferred {cfg.encoder.num_layers} layers, "
                            f"feed_forward={cfg.encoder.feed_forward}).")
    if value.shape != shape:
      raise CheckpointError(f"{source}: tensor {name!r} has shape {value.shape}; the inferred architecture "
                            f"implies {shape}.")
    node = params
    *parents, leaf = name.split("/")
    for key in parents:
      node = node.setdefault(key, {})
    node[leaf] = np.ascontiguousarray(value, dtype=np.float32)
  return params


def load_t5x_checkpoint(path: str, max_distance: int = DEFAULT_MAX_DISTANCE,
                        step: int | None = None) -> tuple[InstructorConfig, dict[str, Any], str]:
  """(config, float32 params, checkpoint dir) of a local or gs:// t5x checkpoint."""
  directory = resolve_checkpoint_dir(path, step)
  arrays = read_t5x_arrays(directory)
  source = _join(directory, CHECKPOINT_FILE)
  cfg = infer_config(arrays, source, max_distance)
  return cfg, params_from_t5x(arrays, cfg, source), directory
