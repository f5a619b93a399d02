"""torch `.bin` state dicts read without torch: exact against torch.load, and safe on crafted files."""

import os
import pathlib
import pickle
import struct
import subprocess
import sys
import zipfile

import ml_dtypes
import numpy as np
import pytest

from instructor_jax import hf_format, torch_zip
from instructor_jax.hf_format import CheckpointError

DENSE_BIN = pathlib.Path(__file__).parent / "fixtures" / "tiny_instructor" / "2_Dense" / "pytorch_model.bin"


@pytest.fixture
def no_torch(monkeypatch):
  """As on a TPU VM or GPU image without PyTorch: `import torch` fails."""
  monkeypatch.setitem(sys.modules, "torch", None)


# ---- writing torch-format archives without torch (protocol-2 pickle opcodes, as torch.save writes) ----

def _int(n) -> bytes:
  if isinstance(n, float):
    return b"G" + struct.pack(">d", n)  # BINFLOAT
  if -2 ** 31 <= n < 2 ** 31:
    return b"J" + struct.pack("<i", n)
  raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
  return b"\x8a" + bytes([len(raw)]) + raw  # LONG1


def _str(s: str) -> bytes:
  return b"X" + struct.pack("<I", len(s.encode())) + s.encode()


def _global(module: str, name: str) -> bytes:
  return b"c" + f"{module}\n{name}\n".encode()


def _tuple(*items: bytes) -> bytes:
  return b"(" + b"".join(items) + b"t"


def _storage(key: str, numel: int, storage_class: str = "FloatStorage", extra: bytes = b"") -> bytes:
  module = "torch.storage" if storage_class == "UntypedStorage" else "torch"
  return _tuple(_str("storage"), _global(module, storage_class), _str(key), _str("cpu"), _int(numel)) + b"Q" + extra


def _tensor(storage: bytes, offset: int, size, stride, dtype: bytes | None = None) -> bytes:
  args = [storage, _int(offset), _tuple(*map(_int, size)), _tuple(*map(_int, stride)), b"\x89", b"}"]
  if dtype is None:
    return _global("torch._utils", "_rebuild_tensor_v2") + _tuple(*args) + b"R"
  return _global("torch._utils", "_rebuild_tensor_v3") + _tuple(*args, dtype) + b"R"


def _archive(path: pathlib.Path, tensors: dict[str, bytes], storages: dict[str, bytes], pickle_bytes=None):
  """A zip laid out as torch.save writes it, with the given data.pkl entries and raw storages."""
  body = pickle_bytes or (b"\x80\x02}(" + b"".join(_str(k) + v for k, v in tensors.items()) + b"u.")
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", body)
    z.writestr("archive/byteorder", "little")
    for key, raw in storages.items():
      z.writestr(f"archive/data/{key}", raw)
  return path


def _rewrite(src: pathlib.Path, dst: pathlib.Path, edit) -> pathlib.Path:
  """Copies a torch zip, passing each (name, bytes) through `edit` (None drops the entry)."""
  with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
    for name in zin.namelist():
      data = edit(name, zin.read(name))
      if data is not None:
        zout.writestr(name, data)
  return dst


SIX_FLOATS = np.arange(6, dtype=np.float32).tobytes()


# ---- reading real files ------------------------------------------------------------------------

def test_every_layout_and_dtype_matches_torch_load(tmp_path):
  torch = pytest.importorskip("torch")
  g = torch.Generator().manual_seed(0)
  base = torch.randn(2, 3, generator=g)
  state = {
      "contiguous": base, "transposed": base.t(), "row_view": base[1], "scalar": torch.tensor(3.5),
      "empty": torch.zeros(0, 4), "strided": torch.randn(3, 4, 5, generator=g).permute(2, 0, 1)[1:, :, ::2],
      "bf16": torch.randn(7, generator=g).to(torch.bfloat16), "fp16": torch.randn(5, generator=g).half(),
      "fp64": torch.randn(3, generator=g).double(), "int64": torch.arange(5), "bool": torch.tensor([True, False]),
      "uint16": torch.arange(4).to(torch.uint16), "e4m3": torch.randn(4, generator=g).to(torch.float8_e4m3fn),
      "e5m2": torch.randn(4, generator=g).to(torch.float8_e5m2),
      "parameter": torch.nn.Parameter(torch.randn(2, 2, generator=g)),
  }
  torch.save(state, tmp_path / "w.bin")
  torch.save(torch.nn.Linear(3, 2).state_dict(), tmp_path / "module.bin")  # carries `_metadata` (pickle BUILD)
  ours = torch_zip.load(str(tmp_path / "w.bin"))
  theirs = torch.load(tmp_path / "w.bin", weights_only=True)
  assert list(ours) == list(theirs)
  for name, ref in theirs.items():
    got = ours[name]
    assert got.shape == tuple(ref.shape) and got.flags.c_contiguous and got.flags.writeable, name
    assert str(got.dtype) == str(ref.dtype).removeprefix("torch."), name
    np.testing.assert_array_equal(got.astype(np.float64), ref.detach().to(torch.float64).numpy(), err_msg=name)
  # As in torch, contiguous tensors over one storage share its memory; others are copies.
  assert np.shares_memory(ours["contiguous"], ours["row_view"])
  assert not np.shares_memory(ours["contiguous"], ours["transposed"])
  module = torch_zip.load(str(tmp_path / "module.bin"))
  assert sorted(module) == ["bias", "weight"] and module["weight"].shape == (2, 3)


def test_fixture_dense_reads_without_torch_as_torch_reads_it(monkeypatch):
  try:
    import torch
    ref = torch.load(DENSE_BIN, weights_only=True)["linear.weight"].numpy()
  except ImportError:
    ref = None  # the torch-less CI run: the golden parity tests check these weights end to end
  monkeypatch.setitem(sys.modules, "torch", None)
  ours = hf_format.load_state_file(str(DENSE_BIN))
  assert list(ours) == ["linear.weight"] and ours["linear.weight"].shape == (24, 16)
  assert ours["linear.weight"].dtype == np.float32 and np.isfinite(ours["linear.weight"]).all()
  if ref is not None:
    np.testing.assert_array_equal(ours["linear.weight"], ref)


def test_handwritten_archive_reads_every_rebuild(tmp_path):
  e5m2 = np.array([1.5, -2.0, 0.25, 3.0], dtype=ml_dtypes.float8_e5m2)
  path = _archive(tmp_path / "hand.bin", {
      "matrix": _tensor(_storage("0", 6), 0, (2, 3), (3, 1)),
      "column": _tensor(_storage("0", 6), 1, (2,), (3,)),
      "e5m2": _tensor(_storage("1", 4, "UntypedStorage"), 0, (4,), (1,), _global("torch", "float8_e5m2")),
  }, {"0": SIX_FLOATS, "1": e5m2.tobytes()})
  got = torch_zip.load(str(path))
  np.testing.assert_array_equal(got["matrix"], np.arange(6, dtype=np.float32).reshape(2, 3))
  np.testing.assert_array_equal(got["column"], [1.0, 4.0])
  assert got["e5m2"].dtype == ml_dtypes.float8_e5m2
  np.testing.assert_array_equal(got["e5m2"].astype(np.float32), e5m2.astype(np.float32))


# ---- crafted files: refused, without running code or reading outside the file -------------------

class _RunsCode:
  def __init__(self, marker: str):
    self.marker = marker

  def __reduce__(self):
    return os.mkdir, (self.marker,)


@pytest.mark.parametrize("torch_installed", [True, False])
def test_pickled_code_is_never_run(tmp_path, monkeypatch, torch_installed):
  if torch_installed:
    pytest.importorskip("torch")
  else:
    monkeypatch.setitem(sys.modules, "torch", None)
  marker = tmp_path / "ran"
  evil = _rewrite(DENSE_BIN, tmp_path / "evil.bin", lambda name, data: (
      pickle.dumps({"linear.weight": _RunsCode(str(marker))}, protocol=2) if name.endswith("data.pkl") else data))
  with pytest.raises(CheckpointError, match="evil.bin"):
    hf_format.load_state_file(str(evil))
  assert not marker.exists()


@pytest.mark.parametrize("offset, size, stride, message", [
    (-1, (100,), (1,), "storage offset is negative"),
    (0, (6,), (-1,), "stride is negative"),
    (0, (3,), (2 ** 40,), "does not fit its storage"),
    (4, (2, 2), (3, 1), "does not fit its storage"),
    (0, (16384, 16384), (0, 0), "more elements than its storage"),  # 1 GiB from 24 bytes
    (0, (2,), (1.5,), "not an integer"),
])
def test_views_outside_their_storage_are_refused(tmp_path, no_torch, offset, size, stride, message):
  path = _archive(tmp_path / "view.bin", {"w": _tensor(_storage("0", 6), offset, size, stride)}, {"0": SIX_FLOATS})
  with pytest.raises(CheckpointError, match=rf"view\.bin: a damaged torch checkpoint: .*{message}"):
    hf_format.load_state_file(str(path))


@pytest.mark.parametrize("dtype, message", [
    (_str("(5,)f4"), "not a torch dtype"),  # a subarray dtype would stride past the buffer
    (_global("torch", "complex64"), "not part of a plain state dict"),
])
def test_only_torch_dtypes_are_accepted(tmp_path, no_torch, dtype, message):
  path = _archive(tmp_path / "dtype.bin", {"w": _tensor(_storage("0", 24, "UntypedStorage"), 0, (6,), (1,), dtype)},
                  {"0": SIX_FLOATS})
  with pytest.raises(CheckpointError, match=rf"dtype\.bin: .*{message}"):
    hf_format.load_state_file(str(path))


def test_pickle_build_cannot_rewrite_a_storage(tmp_path, no_torch):
  rewrite = b"}" + _str("dtype") + _str("(5,)f4") + b"sb"  # {"dtype": "(5,)f4"} BUILD onto the storage
  path = _archive(tmp_path / "build.bin", {"w": _tensor(_storage("0", 6, extra=rewrite), 0, (6,), (1,))},
                  {"0": SIX_FLOATS})
  with pytest.raises(CheckpointError, match=r"build\.bin: .*sets state on a _Storage"):
    hf_format.load_state_file(str(path))


def test_a_nine_byte_pickle_cannot_make_the_unpickler_allocate(tmp_path):
  # LONG_BINPUT at index 2**25: the C unpickler grows its memo array to that size (256 MB+).
  path = _archive(tmp_path / "memo.bin", {}, {}, pickle_bytes=b"\x80\x02}r" + struct.pack("<I", 2 ** 25) + b".")
  code = ("import resource, sys; from instructor_jax import torch_zip; "
          "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
          "assert torch_zip.load(sys.argv[1]) == {}; "
          "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)")
  done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120,
                        env=dict(os.environ, PYTHONPATH=str(pathlib.Path(__file__).parents[1])))
  assert done.returncode == 0, done.stderr
  assert int(done.stdout) < 64 * 1024, f"peak RSS grew by {int(done.stdout) // 1024} MB"


def test_legacy_format_without_torch_says_what_to_do(tmp_path, no_torch):
  legacy = tmp_path / "old.bin"
  legacy.write_bytes(pickle.dumps({"w": [1.0]}, protocol=2))
  with pytest.raises(CheckpointError, match=r"old\.bin: cannot be read without PyTorch: .*legacy format.*Install torch"):
    hf_format.load_state_file(str(legacy))


def test_damaged_archives_name_what_is_wrong(tmp_path, no_torch):
  def damaged(name, edit, message):
    path = _rewrite(DENSE_BIN, tmp_path / f"{name}.bin", edit)
    with pytest.raises(CheckpointError, match=rf"{name}\.bin: a damaged torch checkpoint: {message}.*Download"):
      hf_format.load_state_file(str(path))

  damaged("missing", lambda n, d: None if n.endswith("data/0") else d, "storage 'pytorch_model/data/0' is missing")
  damaged("short", lambda n, d: d[:100] if n.endswith("data/0") else d, "storage .* holds 100 bytes; its record says 1536")
  damaged("garbled", lambda n, d: d[:40] if n.endswith("data.pkl") else d, "its data.pkl does not unpickle")
  raw = bytearray(DENSE_BIN.read_bytes())
  central = raw.find(b"PK\x01\x02")
  raw[central:central + 4] = b"XXXX"
  (tmp_path / "badzip.bin").write_bytes(bytes(raw))
  with pytest.raises(CheckpointError, match=r"badzip\.bin: a damaged torch checkpoint: the zip archive is damaged"):
    hf_format.load_state_file(str(tmp_path / "badzip.bin"))
  with pytest.raises(CheckpointError, match=r"nowhere\.bin: no such file"):
    hf_format.load_state_file(str(tmp_path / "nowhere.bin"))


def test_a_huge_data_pkl_is_not_decompressed(tmp_path, no_torch):
  path = tmp_path / "bomb.bin"
  with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
    z.writestr("archive/data.pkl", b"\0" * (65 << 20))
  assert path.stat().st_size < 1 << 20
  with pytest.raises(CheckpointError, match=r"bomb\.bin: .*data\.pkl is over 64 MB"):
    hf_format.load_state_file(str(path))
