"""One process per directory: the trainer locks its workdir (a second trainer would interleave
metrics.jsonl and race for checkpoint steps) and the embed job its --output per process index (a
second copy would compute every part twice and race --overwrite's removals)."""

from __future__ import annotations

import errno
import os
import sys


class DirectoryInUseError(RuntimeError):
  """Another process holds the directory's lock; the message names it and what to do."""


def lock_directory(directory: str, lock_file: str = ".train.lock", user: str = "training process",
                   option: str = "--workdir"):
  """An exclusive lock on a local directory, held (the returned open file) for the run; None where it
  cannot be had (gs://, which has no locks; not POSIX; a filesystem without locks, with a warning)."""
  if "://" in directory:
    return None
  try:
    import fcntl
  except ImportError:  # not POSIX
    return None
  os.makedirs(directory, exist_ok=True)
  f = open(os.path.join(directory, lock_file), "a+")
  try:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as e:
    if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):  # a filesystem without locks
      print(f"warning: cannot lock {directory} ({e}); make sure no other {user} uses it.", file=sys.stderr)
      f.close()
      return None
    f.seek(0)
    holder = f.read().strip() or "?"
    f.close()
    raise DirectoryInUseError(f"{directory} is in use by another {user} ({holder}); wait for it to end, "
                              f"stop it, or use another {option}.") from None
  f.seek(0)
  f.truncate()
  f.write(f"pid {os.getpid()} on {os.uname().nodename}")
  f.flush()
  return f
