"""The device mesh, the one table of logical->mesh axis rules, and global batches from host data.

Mesh axes: `data` (pure data parallelism), `fsdp` (data parallelism whose parameters and
optimizer state are also sharded, ZeRO-3 style) and `tensor` (Megatron-style over heads / MLP).
The batch is split over data x fsdp, so the global batch must be a multiple of data * fsdp.

This module imports no model code: it maps the logical axis names that `t5.py` attaches to every
parameter and activation onto whatever mesh the run uses.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from instructor_jax.config import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis -> mesh axis, applied in order. Flax uses a mesh axis at most once per array, so activations
# (batch, length, embed) shard batch over data x fsdp and leave embed whole, while parameters
# (embed, mlp) shard embed over fsdp and mlp over tensor.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("length", None),
    # Before "embed", so that the table's rows take fsdp x tensor and its columns stay whole: with
    # columns over fsdp the lookup's output comes out split by columns and GSPMD falls back to
    # replicating whole [B, L, D] activations ("involuntary full rematerialization").
    ("vocab", ("fsdp", "tensor")),
    ("embed", "fsdp"),
    ("joined_kv", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("relpos_buckets", None),
    ("projection", None),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh axis sizes; exactly one may be -1, meaning "all remaining devices"."""

  data: int = -1
  fsdp: int = 1
  tensor: int = 1

  def shape(self, num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) sizes with -1 resolved against `num_devices`."""
    sizes = [self.data, self.fsdp, self.tensor]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
      raise ConfigError(f"MeshConfig{tuple(sizes)}: sizes must be positive, with at most one -1.")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
      if num_devices % known:
        raise ConfigError(f"MeshConfig{tuple(sizes)}: {num_devices} devices do not divide by {known}.")
      sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
      raise ConfigError(f"MeshConfig{tuple(sizes)} needs {math.prod(sizes)} devices but {num_devices} "
                        "are in use; set one axis to -1 or fix the sizes (gin: MeshConfig.data=...).")
    return tuple(sizes)


def make_mesh(config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh over `devices` (default: every device of every process)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = config.shape(len(devices))
  # Axis types are explicit because JAX's default changed between versions; Auto lets XLA
  # propagate shardings from the in/out shardings and the logical constraints.
  axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  if len(devices) == len(jax.devices()):
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=axis_types)


def batch_size_multiple(mesh: Mesh) -> int:
  """The global batch must be a multiple of this (the number of batch shards)."""
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def logical_to_sharding(logical_specs: Any, mesh: Mesh) -> Any:
  """NamedShardings for a tree of logical PartitionSpecs, through LOGICAL_RULES."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, LOGICAL_RULES)


def boxed_shardings(abstract_boxed: Any, mesh: Mesh) -> Any:
  """Shardings of a tree whose leaves carry flax logical-partitioning boxes (unboxed leaves: replicated).

  A dimension that its mesh axes do not divide (e.g. 32128 vocab rows over 256 devices) keeps the
  longest prefix of those axes that does, down to none, since jax.Arrays must split evenly.
  """
  mesh_specs = nn.logical_to_mesh(nn.get_partition_spec(abstract_boxed), LOGICAL_RULES)
  shapes = nn.unbox(abstract_boxed)
  return jax.tree.map(lambda spec, x: NamedSharding(mesh, _fit(spec, x.shape, mesh)), mesh_specs, shapes,
                      is_leaf=lambda s: isinstance(s, P))


def _shards(spec: P, mesh: Mesh) -> int:
  axes = [a for entry in spec if entry is not None for a in ((entry,) if isinstance(entry, str) else entry)]
  return math.prod(mesh.shape[a] for a in axes)


def sharding_fallbacks(abstract_boxed: Any, mesh: Mesh) -> list[tuple[str, tuple[int, ...], int, int, int]]:
  """(name, shape, bytes, devices it is split over, devices the rules ask for) of every parameter
  that `boxed_shardings` splits over fewer devices than its rule, largest first.

  That happens when a mesh axis does not divide the dimension it would split (e.g. fsdp=12 and
  d_model 1024): the parameter and its optimizer moments are then replicated along that axis.
  """
  mesh_specs = nn.logical_to_mesh(nn.get_partition_spec(abstract_boxed), LOGICAL_RULES)
  shapes = jax.tree.leaves(nn.unbox(abstract_boxed))
  specs = jax.tree_util.tree_flatten_with_path(mesh_specs, is_leaf=lambda s: isinstance(s, P))[0]
  out = []
  for (path, spec), x in zip(specs, shapes):
    wanted, got = _shards(spec, mesh), _shards(_fit(spec, x.shape, mesh), mesh)
    if got < wanted:
      name = "/".join(str(getattr(k, "key", k)) for k in path)
      out.append((name, tuple(x.shape), int(np.prod(x.shape)) * x.dtype.itemsize, got, wanted))
  return sorted(out, key=lambda f: -f[2] / f[3])


def _fit(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    while axes and dim % math.prod(mesh.shape[a] for a in axes):
      axes = axes[:-1]
    fitted.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return P(*fitted)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Rows over data x fsdp, other dimensions whole."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def _host_blocks(sharding: NamedSharding, global_shape: tuple[int, ...], local_rows: int) -> dict[int, int]:
  """Global row block start -> offset in this host's rows, for the distinct blocks its devices hold.

  Every host feeds its own examples into whatever row blocks the mesh gives its devices (on TPU
  slices these need not be contiguous). The losses are invariant to the order of examples within
  a batch, so the global batch is the same set of triples whatever the device order.
  """
  starts = sorted({idx[0].start or 0 for idx in sharding.addressable_devices_indices_map(global_shape).values()})
  block = global_shape[0] // math.prod(sharding.mesh.shape[a] for a in BATCH_AXES)
  if len(starts) * block != local_rows:
    raise ValueError(
        f"process {jax.process_index()} has {local_rows} rows of the global batch but its devices hold "
        f"{len(starts) * block} distinct rows on mesh {dict(sharding.mesh.shape)}: the batch axes (data x fsdp) "
        "must give every host its own rows. Keep `tensor` within a host and make data * fsdp a multiple of "
        "the number of processes.")
  return {start: i * block for i, start in enumerate(starts)}


def check_host_rows(mesh: Mesh, batch_size: int) -> None:
  """Raises ValueError unless the batch axes give every process its own rows of a global batch
  (what `global_batch` needs), so that a mesh that does not is refused before anything is built."""
  if batch_size % jax.process_count():
    raise ValueError(f"the global batch ({batch_size}) does not divide among {jax.process_count()} processes.")
  _host_blocks(batch_sharding(mesh, 1), (batch_size,), batch_size // jax.process_count())


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Global arrays (rows over data x fsdp) from this process's slice of every field."""
  out = {}
  for name, x in local.items():
    global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
    sharding = batch_sharding(mesh, x.ndim)
    offsets = _host_blocks(sharding, global_shape, x.shape[0])
    block = global_shape[0] // batch_size_multiple(mesh)
    shards = [jax.device_put(x[offsets[idx[0].start or 0]:][:block], device)
              for device, idx in sharding.addressable_devices_indices_map(global_shape).items()]
    out[name] = jax.make_array_from_single_device_arrays(global_shape, sharding, shards)
  return out
