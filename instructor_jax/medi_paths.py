"""Where a MEDI file is: a local file, a folder holding one (TFDS's manual directory), or a remote
(gs://, s3://) path, which is copied once per host into this package's cache (`cache_root()`).

Reading and validating the file is medi_records.py's; this module only finds it, so that checks made
before anything is built (train.check_before_building) can look a path up without reading it.
"""

from __future__ import annotations

import json
import os
import secrets
from typing import Any

from instructor_jax.config import ConfigError, MissingPathError

MEDI_FILENAMES = ("medi-data.json", "medi-data.jsonl")


def cache_root() -> str:
  """Per-host cache of this package (MEDI copies, token caches, compiled steps): $INSTRUCTOR_JAX_CACHE."""
  return os.environ.get("INSTRUCTOR_JAX_CACHE", os.path.expanduser("~/.cache/instructor_jax"))

def _remote(path: str) -> Any:
  """An etils.epath.Path for a remote (gs://, s3://) path: the one place remote storage is reached, so
  that a test can stand a local folder in for a bucket whichever backend (tf.io.gfile, gcsfs) is installed."""
  from etils import epath  # resolves gs:// through tf.io.gfile or gcsfs, whichever is installed
  return epath.Path(path)


def _medi_in_folder(folder: str, names: list[str]) -> str:
  """The name of the MEDI file among the file `names` of `folder` (local or remote), else MissingPathError."""
  for name in MEDI_FILENAMES:
    if name in names:
      return name
  if "dataset_info.json" in names:  # a file that _iter_jsonl would otherwise read as a (non-)MEDI file
    raise MissingPathError(
        f"{folder}: a prepared TFDS dataset (dataset_info.json, features.json), not the folder holding MEDI's JSON. "
        "Pass medi-data.json, or the manual directory holding it (the manual_dir it was prepared from, by default "
        "<data_dir>/downloads/manual); Python code reads the prepared dataset with "
        "medi_batches.global_batches(medi_tfds.Medi(data_dir=<data_dir>), ...).")
  found = sorted(n for n in names if n.endswith((".json", ".jsonl")))
  if len(found) == 1:
    return found[0]
  raise MissingPathError(f"{folder}: expected one of {MEDI_FILENAMES} (or a single .json/.jsonl file) in this "
                         f"directory, found {found[:10] or 'none'}. Place medi-data.json there.")


def locate_medi_file(path: str) -> str:
  """The MEDI file behind `path` (the file, or a folder holding one; local or remote), not copied: for
  checks before anything is built. A missing path raises MissingPathError (a FileNotFoundError)."""
  if "://" in str(path):
    remote = _remote(str(path))
    if remote.is_dir():
      return os.fspath(remote / _medi_in_folder(str(path), [p.name for p in remote.iterdir()]))
    if not remote.exists():  # checked, not left to copy(): tf.io.gfile raises its own NotFoundError, no OSError
      raise MissingPathError(f"{path}: no such MEDI file or directory. Pass the path of medi-data.json (INSTRUCTOR's "
                             "MEDI release) or of its directory, readable from every host.")
    return str(path)
  path = os.path.expanduser(os.fspath(path))
  if os.path.isfile(path):
    return path
  if os.path.isdir(path):
    return os.path.join(path, _medi_in_folder(path, [n for n in os.listdir(path)
                                                      if os.path.isfile(os.path.join(path, n))]))
  relative = "" if os.path.isabs(path) else f" (a relative path, read from the current directory {os.getcwd()})"
  raise MissingPathError(f"{path}: no such MEDI file or directory{relative}. Pass the path of medi-data.json "
                         "(INSTRUCTOR's MEDI release) or of its directory.")


def _localize_remote(path: str) -> str:
  """A local copy of a remote (gs://, s3://) MEDI file or folder, made once per host.

  Every host of a pod reads the whole corpus (any example can land in its slice), so a single
  sequential download beats many small remote reads. The copy is reused across restarts while the
  remote file keeps its size and modification time (recorded beside the copy), else fetched again.
  """
  remote = _remote(locate_medi_file(path))
  cache = os.path.join(cache_root(), "medi", path.split("://", 1)[1].replace("/", "_"))
  try:
    st = remote.stat()
    source = {"remote": os.fspath(remote), "length": st.length, "mtime": st.mtime}
  except (NotImplementedError, OSError):  # a backend without stat: the copy is trusted as it is
    source = {"remote": os.fspath(remote)}
  stamp = cache + ".source.json"
  if os.path.isfile(cache) and os.path.isfile(stamp):
    with open(stamp) as f:
      if json.load(f) == source:
        print(f"{path}: using the local copy {cache} (same size and modification time; delete it to fetch again)")
        return cache
  print(f"{path}: copying {os.fspath(remote)} to {cache}" + (" (the remote file changed)" if os.path.isfile(cache) else ""))
  # Not the pid alone: hosts in containers that share the cache over NFS can have the same pid.
  tmp = f"{cache}.tmp{os.getpid()}.{secrets.token_hex(4)}"
  try:
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    open(tmp, "xb").close()  # fails here, as an OSError, where the backend's copy would raise its own error
  except OSError as e:
    raise ConfigError(f"{path}: cannot copy the remote MEDI file into {os.path.dirname(cache)} ({e.strerror or e}); "
                      "set INSTRUCTOR_JAX_CACHE to a writable local folder with room for it.") from None
  try:
    remote.copy(tmp, overwrite=True)
    os.replace(tmp, cache)  # atomic: a killed download never looks complete
    with open(tmp, "x") as f:
      json.dump(source, f)
    os.replace(tmp, stamp)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return cache


def medi_size(path: str) -> int | None:
  """Bytes of the MEDI file behind `path`, None where unknown (a remote folder, a backend without
  stat): saved with each checkpoint, so that a resume notices a file replaced at the same path,
  which the path alone cannot show. One stat; a remote file is not copied here."""
  try:
    if "://" in str(path):
      remote = _remote(path)
      return None if remote.is_dir() else int(remote.stat().length)
    return os.path.getsize(resolve_medi_file(path))
  except Exception:  # noqa: BLE001 - it only feeds a resume warning, which must never fail a run
    return None


def resolve_medi_file(path: str) -> str:
  """The MEDI file itself, given the file or a (TFDS manual) directory holding one; a remote (gs://)
  one is copied to this host's cache first. A missing path raises MissingPathError."""
  if "://" in str(path):
    return _localize_remote(str(path))
  return locate_medi_file(path)
