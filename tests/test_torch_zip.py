"""torch `.bin` state dicts read without torch: exact against torch.load, and safe."""

import os
import pathlib
import pickle
import sys
import zipfile

import numpy as np
import pytest

from instructor_jax import hf_format, torch_zip
from instructor_jax.hf_format import CheckpointError

DENSE_BIN = pathlib.Path(__file__).parent / "fixtures" / "tiny_instructor" / "2_Dense" / "pytorch_model.bin"


@pytest.fixture
def no_torch(monkeypatch):
  """As on a TPU VM or GPU image without PyTorch: `import torch` fails."""
  monkeypatch.setitem(sys.modules, "torch", None)


def _rewrite(src: pathlib.Path, dst: pathlib.Path, edit) -> pathlib.Path:
  """Copies a torch zip, passing each (name, bytes) through `edit` (None drops the entry)."""
  with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
    for name in zin.namelist():
      data = edit(name, zin.read(name))
      if data is not None:
        zout.writestr(name, data)
  return dst


def test_every_layout_and_dtype_matches_torch_load(tmp_path):
  torch = pytest.importorskip("torch")
  g = torch.Generator().manual_seed(0)
  base = torch.randn(2, 3, generator=g)
  state = {
      "contiguous": base, "transposed": base.t(), "row_view": base[1], "scalar": torch.tensor(3.5),
      "empty": torch.zeros(0, 4), "strided": torch.randn(3, 4, 5, generator=g).permute(2, 0, 1)[1:, :, ::2],
      "bf16": torch.randn(7, generator=g).to(torch.bfloat16), "fp16": torch.randn(5, generator=g).half(),
      "fp64": torch.randn(3, generator=g).double(), "int64": torch.arange(5), "bool": torch.tensor([True, False]),
      "uint16": torch.arange(4).to(torch.uint16), "fp8": torch.randn(4, generator=g).to(torch.float8_e4m3fn),
      "parameter": torch.nn.Parameter(torch.randn(2, 2, generator=g)),
  }
  torch.save(state, tmp_path / "w.bin")
  ours = torch_zip.load(str(tmp_path / "w.bin"))
  theirs = torch.load(tmp_path / "w.bin", weights_only=True)
  assert list(ours) == list(theirs)
  for name, ref in theirs.items():
    got = ours[name]
    assert got.shape == tuple(ref.shape) and got.flags.c_contiguous, name
    assert str(got.dtype) == str(ref.dtype).removeprefix("torch."), name
    # Compare bit patterns (NaN-safe, exact), through a dtype both sides know.
    np.testing.assert_array_equal(got.astype(np.float64), ref.detach().to(torch.float64).numpy(), err_msg=name)
  # Tensors sharing a storage come back as independent arrays.
  ours["contiguous"][0, 0] = 100.0
  assert ours["row_view"][0] == theirs["row_view"][0]


def test_fixture_dense_reads_without_torch_as_torch_reads_it(monkeypatch):
  try:
    import torch
    ref = torch.load(DENSE_BIN, weights_only=True)["linear.weight"].numpy()
  except ImportError:
    ref = None  # the torch-less CI leg: the golden parity tests check these weights end to end
  monkeypatch.setitem(sys.modules, "torch", None)
  ours = hf_format.load_state_file(str(DENSE_BIN))
  assert list(ours) == ["linear.weight"] and ours["linear.weight"].shape == (24, 16)
  assert ours["linear.weight"].dtype == np.float32 and np.isfinite(ours["linear.weight"]).all()
  if ref is not None:
    np.testing.assert_array_equal(ours["linear.weight"], ref)


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


def test_legacy_format_without_torch_says_what_to_do(tmp_path, no_torch):
  legacy = tmp_path / "old.bin"
  legacy.write_bytes(pickle.dumps({"w": [1.0]}, protocol=2))
  with pytest.raises(CheckpointError, match=r"old\.bin: cannot be read without PyTorch: .*legacy format.*Install torch"):
    hf_format.load_state_file(str(legacy))


def test_damaged_archives_name_what_is_wrong(tmp_path, no_torch):
  missing = _rewrite(DENSE_BIN, tmp_path / "missing.bin", lambda name, data: None if name.endswith("data/0") else data)
  with pytest.raises(CheckpointError, match=r"missing\.bin: .*storage 'pytorch_model/data/0' is missing"):
    hf_format.load_state_file(str(missing))
  short = _rewrite(DENSE_BIN, tmp_path / "short.bin", lambda name, data: data[:100] if name.endswith("data/0") else data)
  with pytest.raises(CheckpointError, match=r"short\.bin: .*shape \(24, 16\).*truncated or corrupt"):
    hf_format.load_state_file(str(short))
  garbled = _rewrite(DENSE_BIN, tmp_path / "garbled.bin", lambda name, data: data[:40] if name.endswith("data.pkl") else data)
  with pytest.raises(CheckpointError, match=r"garbled\.bin: .*does not unpickle"):
    hf_format.load_state_file(str(garbled))
