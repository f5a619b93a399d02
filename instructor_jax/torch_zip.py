"""Reads `torch.save` zip files of plain state dicts into NumPy, without importing torch.

hkunlp/instructor-* publish their weights (and `2_Dense`) only as `pytorch_model.bin`, while the
machines that embed or train with JAX (TPU VMs, GPU images) often have no torch. A state dict in
torch's zip format (torch >= 1.6) is a pickle of `_rebuild_tensor_*` calls over raw little-endian
storages, so it can be rebuilt with NumPy.

The file is untrusted input. Like `torch.load(weights_only=True)`, only the pickle globals a state
dict needs are allowed, so no code from it runs; beyond that, every value those calls receive is
checked (dtypes by identity, non-negative integer offsets/sizes/strides, views inside their
storage, no more elements than the storage holds, storage sizes as recorded), pickle BUILD only
sets attributes of a dict, and the pure-Python unpickler is used (its memo is a dict: the C one
allocates up to any index a 9-byte pickle names).

Anything else raises `Unsupported`; `damaged` says whether the file is broken (rather than in a
format torch itself may read, such as the legacy pre-1.6 one).
"""

from __future__ import annotations

import collections
import io
import math
import operator
import pickle
import zipfile
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np

_TORCH_DTYPES = {name: np.dtype(t) for name, t in {
    "float64": np.float64, "float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16,
    "int64": np.int64, "int32": np.int32, "int16": np.int16, "int8": np.int8, "uint8": np.uint8,
    "uint16": np.uint16, "uint32": np.uint32, "uint64": np.uint64, "bool": np.bool_,
    "float8_e4m3fn": ml_dtypes.float8_e4m3fn, "float8_e5m2": ml_dtypes.float8_e5m2,
}.items()}
# Typed storage classes name their element type (v2 rebuilds); `UntypedStorage` is raw bytes whose
# type comes with the tensor (v3 rebuilds, for dtypes without a typed storage class).
_STORAGE_DTYPES = {f"{prefix}Storage": _TORCH_DTYPES[name] for prefix, name in [
    ("Double", "float64"), ("Float", "float32"), ("Half", "float16"), ("BFloat16", "bfloat16"), ("Long", "int64"),
    ("Int", "int32"), ("Short", "int16"), ("Char", "int8"), ("Byte", "uint8"), ("Bool", "bool")]}
_STORAGE_DTYPES["UntypedStorage"] = None
_ALLOWED_DTYPES = list(_TORCH_DTYPES.values())  # the typed storages' dtypes are among these
# A state dict's data.pkl is kilobytes (a few hundred KB for an 11B model); anything far larger is
# not one, and reading it would be a decompression bomb.
_MAX_PICKLE_BYTES = 64 << 20


class Unsupported(Exception):
  """Not a torch zip state dict this reader can rebuild; `damaged`: the file itself is broken."""

  def __init__(self, reason: str, damaged: bool = False):
    super().__init__(reason)
    self.damaged = damaged


# NamedTuples have no __dict__, so a pickle BUILD cannot rewrite them.
class _StorageType(NamedTuple):
  name: str
  dtype: np.dtype | None


class _Storage(NamedTuple):
  buffer: bytearray
  dtype: np.dtype | None


def _index(value: Any, what: str) -> int:
  try:
    number = operator.index(value)
  except TypeError:
    raise Unsupported(f"{what} is {type(value).__name__}, not an integer", damaged=True) from None
  if number < 0:
    raise Unsupported(f"{what} is negative ({number})", damaged=True)
  return number


def _rebuild(storage: Any, offset: Any, size: Any, stride: Any, dtype: Any) -> np.ndarray:
  if not isinstance(storage, _Storage):
    raise Unsupported("a tensor is rebuilt from something that is not a storage", damaged=True)
  if not any(dtype is allowed for allowed in _ALLOWED_DTYPES):
    raise Unsupported(f"a tensor has element type {dtype!r:.80}, not a torch dtype", damaged=True)
  if not isinstance(size, tuple) or not isinstance(stride, tuple) or len(size) != len(stride):
    raise Unsupported("a tensor's size and stride are not tuples of one length", damaged=True)
  offset = _index(offset, "a tensor's storage offset")
  shape = tuple(_index(n, "a tensor dimension") for n in size)
  strides = tuple(_index(s, "a tensor stride") for s in stride)
  available = len(storage.buffer) // dtype.itemsize
  count = math.prod(shape)
  # Real state dicts never repeat elements (stride 0 expansions); refusing them bounds the copy
  # below by the file's own size.
  if count > available:
    raise Unsupported(f"a tensor of shape {shape} has more elements than its storage ({available})", damaged=True)
  try:
    # np.ndarray checks that the view stays inside the buffer; it also parses every ml_dtypes type.
    view = np.ndarray(shape, dtype=dtype, buffer=storage.buffer, offset=offset * dtype.itemsize,
                      strides=tuple(s * dtype.itemsize for s in strides))
  except (TypeError, ValueError) as e:
    raise Unsupported(f"a tensor of shape {shape} (offset {offset}, strides {strides}) does not fit its "
                      f"storage of {available} elements: {e}", damaged=True) from None
  # C-contiguous tensors are views of the storage (like torch, tied weights share memory), which
  # keeps peak memory at one copy of the file; anything else is copied into C order.
  return view if view.flags.c_contiguous else np.array(view, order="C")


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
  if not isinstance(storage, _Storage) or storage.dtype is None:
    raise Unsupported("a v2 tensor without a typed storage", damaged=True)
  return _rebuild(storage, offset, size, stride, storage.dtype)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
  return _rebuild(storage, offset, size, stride, dtype)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
  if not isinstance(data, np.ndarray):
    raise Unsupported("a parameter that does not hold a tensor", damaged=True)
  return data


_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _Unpickler(pickle._Unpickler):  # the pure-Python one: see the module docstring
  def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str):
    super().__init__(io.BytesIO(data))
    self._archive, self._prefix = archive, prefix
    self._storages: dict[str, bytearray] = {}

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) in _GLOBALS:
      return _GLOBALS[(module, name)]
    if module in ("torch", "torch.storage") and name in _STORAGE_DTYPES:
      return _StorageType(name, _STORAGE_DTYPES[name])
    if module == "torch" and name in _TORCH_DTYPES:
      return _TORCH_DTYPES[name]
    raise Unsupported(f"it pickles {module:.80}.{name:.80}, which is not part of a plain state dict")

  def load_build(self) -> None:
    # BUILD sets state on the object below it. state_dict() pickles its `_metadata` attribute
    # that way; nothing else in a state dict needs it, so only a dict's plain attributes may be set.
    state = self.stack.pop()
    target = self.stack[-1]
    if not isinstance(target, collections.OrderedDict) or not isinstance(state, dict) or \
        not all(isinstance(k, str) and not k.startswith("__") for k in state):
      raise Unsupported(f"it sets state on a {type(target).__name__}, which a plain state dict never does")
    target.__dict__.update(state)

  dispatch = dict(pickle._Unpickler.dispatch)
  dispatch[pickle.BUILD[0]] = load_build

  def persistent_load(self, pid: Any) -> _Storage:
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)
            and isinstance(pid[2], str)):
      raise Unsupported(f"unknown persistent id {repr(pid)[:120]}")
    _, storage_type, key, _location, numel = pid
    entry = f"{self._prefix}data/{key}"
    if key not in self._storages:
      try:
        info = self._archive.getinfo(entry)
      except KeyError:
        raise Unsupported(f"storage {entry!r:.120} is missing from the archive", damaged=True) from None
      expected = _index(numel, f"the element count of storage {entry!r:.120}") * (
          storage_type.dtype.itemsize if storage_type.dtype is not None else 1)
      if info.file_size != expected:
        raise Unsupported(f"storage {entry!r:.120} holds {info.file_size} bytes; its record says {expected}",
                          damaged=True)
      buffer = bytearray(info.file_size)  # writable, so the arrays viewing it are ordinary arrays
      with self._archive.open(info) as f:
        if f.readinto(buffer) != len(buffer):
          raise Unsupported(f"storage {entry!r:.120} is shorter than recorded", damaged=True)
      self._storages[key] = buffer
    return _Storage(self._storages[key], storage_type.dtype)


def load(path: str) -> dict[str, np.ndarray]:
  """{name: array} of a `torch.save`d state dict (torch >= 1.6 zip format), in the stored dtypes.

  Raises `Unsupported` for the legacy format, non-state-dict pickles and damaged archives.
  """
  if not zipfile.is_zipfile(path):
    raise Unsupported("it is not a zip archive (torch's legacy format, written by torch < 1.6, or not a "
                      "torch file at all)")
  try:
    with zipfile.ZipFile(path) as archive:
      pickles = [n for n in archive.namelist() if n.count("/") == 1 and n.split("/")[1] == "data.pkl"]
      if len(pickles) != 1:
        raise Unsupported(f"expected one <folder>/data.pkl in the archive, found {pickles[:4] or 'none'}")
      prefix = pickles[0][: -len("data.pkl")]
      if archive.getinfo(pickles[0]).file_size > _MAX_PICKLE_BYTES:
        raise Unsupported(f"its data.pkl is over {_MAX_PICKLE_BYTES >> 20} MB; a state dict's is kilobytes")
      # Files without a byteorder record predate it and were written little-endian.
      if prefix + "byteorder" in archive.namelist() and archive.read(prefix + "byteorder").strip() != b"little":
        raise Unsupported("it was written on a big-endian machine")
      try:
        state = _Unpickler(archive.read(pickles[0]), archive, prefix).load()
      except (Unsupported, zipfile.BadZipFile):
        raise
      except Exception as e:  # a damaged pickle: say so rather than surfacing pickle internals
        raise Unsupported(f"its data.pkl does not unpickle ({type(e).__name__}: {str(e)[:200]})",
                          damaged=True) from e
  except zipfile.BadZipFile as e:
    raise Unsupported(f"the zip archive is damaged ({e})", damaged=True) from None
  if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in state.items()):
    raise Unsupported("it does not hold a flat {name: tensor} state dict")
  return dict(state)
