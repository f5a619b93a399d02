"""Reads `torch.save` zip files of plain state dicts into NumPy, without importing torch.

hkunlp/instructor-* publish their weights (and `2_Dense`) only as `pytorch_model.bin`, while the
machines that embed or train with JAX (TPU VMs, GPU images) often have no torch. A state dict in
torch's zip format (torch >= 1.6) is a pickle of `_rebuild_tensor_*` calls over raw little-endian
storages, so it can be rebuilt with NumPy. Only the pickle globals a state dict needs are allowed:
like `torch.load(weights_only=True)`, no code from a downloaded checkpoint ever runs.

Anything else (torch's legacy pre-1.6 format, a global this reader does not know) raises
`Unsupported`; the caller then falls back to torch, where it is installed.
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

# Typed storage classes name their element type (v2 rebuilds); `UntypedStorage` is raw bytes whose
# type comes with the tensor (v3 rebuilds, for dtypes without a typed storage class).
_STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
    "UntypedStorage": None,
}
_TORCH_DTYPES = {
    "float64": np.float64, "float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16,
    "int64": np.int64, "int32": np.int32, "int16": np.int16, "int8": np.int8, "uint8": np.uint8,
    "uint16": np.uint16, "uint32": np.uint32, "uint64": np.uint64, "bool": np.bool_,
    "float8_e4m3fn": ml_dtypes.float8_e4m3fn, "float8_e5m2": ml_dtypes.float8_e5m2,
}


class Unsupported(Exception):
  """The file is not a torch zip state dict this reader can rebuild (torch itself may)."""


class _StorageType:
  def __init__(self, name: str):
    self.name, self.dtype = name, _STORAGE_DTYPES[name]


class _Storage:
  def __init__(self, raw: bytes, dtype: Any):
    self.raw, self.dtype = raw, dtype


def _rebuild(storage: _Storage, offset: int, size: tuple[int, ...], stride: tuple[int, ...],
             dtype: Any) -> np.ndarray:
  dtype = np.dtype(dtype)
  flat = np.frombuffer(storage.raw, dtype=dtype)
  if not size:
    return np.array(flat[offset], dtype=dtype)
  extent = offset + 1 + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else offset
  if extent > flat.size:
    raise Unsupported(f"a tensor of shape {tuple(size)} (offset {offset}, strides {tuple(stride)}) reaches "
                      f"element {extent} of a storage of {flat.size}: the file is truncated or corrupt")
  view = np.lib.stride_tricks.as_strided(flat[offset:], shape=tuple(size),
                                         strides=tuple(s * dtype.itemsize for s in stride), writeable=False)
  return np.array(view, order="C")  # a contiguous copy that owns its memory


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, backward_hooks, metadata=None):
  if storage.dtype is None:
    raise Unsupported("a v2 tensor over an untyped storage")
  return _rebuild(storage, offset, size, stride, storage.dtype)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
  return _rebuild(storage, offset, size, stride, dtype)


def _rebuild_parameter(data, requires_grad, backward_hooks):
  return data


_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _Unpickler(pickle.Unpickler):
  def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str):
    super().__init__(io.BytesIO(data))
    self._archive, self._prefix = archive, prefix
    self._storages: dict[str, _Storage] = {}

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) in _GLOBALS:
      return _GLOBALS[(module, name)]
    if module in ("torch", "torch.storage") and name in _STORAGE_DTYPES:
      return _StorageType(name)
    if module == "torch" and name in _TORCH_DTYPES:
      return _TORCH_DTYPES[name]
    raise Unsupported(f"it pickles {module}.{name}, which is not part of a plain state dict")

  def persistent_load(self, pid: Any) -> _Storage:
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
      raise Unsupported(f"unknown persistent id {pid!r}")
    _, storage_type, key, _location, _numel = pid
    if key not in self._storages:
      entry = f"{self._prefix}data/{key}"
      try:
        raw = self._archive.read(entry)
      except KeyError:
        raise Unsupported(f"storage {entry!r} is missing from the archive") from None
      self._storages[key] = _Storage(raw, storage_type.dtype)
    storage = self._storages[key]
    if storage.dtype is None and storage_type.dtype is not None:
      storage = _Storage(storage.raw, storage_type.dtype)
    return storage


def load(path: str) -> dict[str, np.ndarray]:
  """{name: array} of a `torch.save`d state dict (torch >= 1.6 zip format), in the stored dtypes.

  Raises `Unsupported` for the legacy format, non-state-dict pickles and damaged archives.
  """
  if not zipfile.is_zipfile(path):
    raise Unsupported("it is not a zip archive (torch's legacy format, written by torch < 1.6, or not a "
                      "torch file at all)")
  with zipfile.ZipFile(path) as archive:
    pickles = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
      raise Unsupported(f"expected one <folder>/data.pkl in the archive, found {pickles or 'none'}")
    prefix = pickles[0][: -len("data.pkl")]
    names = set(archive.namelist())
    # Files without a byteorder record predate it and were written little-endian.
    if prefix + "byteorder" in names and archive.read(prefix + "byteorder").strip() != b"little":
      raise Unsupported("it was written on a big-endian machine")
    try:
      state = _Unpickler(archive.read(pickles[0]), archive, prefix).load()
    except Unsupported:
      raise
    except Exception as e:  # a damaged pickle: say so rather than surfacing pickle internals
      raise Unsupported(f"its data.pkl does not unpickle ({type(e).__name__}: {e})") from e
  if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in state.items()):
    raise Unsupported("it does not hold a flat {name: tensor} state dict")
  return dict(state)
