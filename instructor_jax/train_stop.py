"""How a training run stops: SIGTERM/SIGINT end a single-process run at the next step boundary with a
checkpoint (the loop polls `StopFlag.signal`), or at once while the model is still being built
(`StoppedBeforeStart`); either way the command exits with EXIT_STOPPED_EARLY. (The workdir's lock is
dir_lock.py's.)
"""

from __future__ import annotations

import gc
import os
import signal
import threading

import jax


# Exit status of a run that stopped early with a checkpoint (signal or preemption notice), so that
# a scheduler or launch_tpu.sh can tell it from a finished run: EX_TEMPFAIL, "try again".
EXIT_STOPPED_EARLY = 75


class StoppedBeforeStart(BaseException):
  """A stop signal arrived while the model was being built or loaded (a BaseException, like
  KeyboardInterrupt, so that library code catching Exception, e.g. around a Hub download, lets it by)."""


_REDELIVERY_S = 0.01  # a signal handled inside a gc callback is delivered again after this


class StopFlag:
  """SIGTERM/SIGINT -> stop at the next step boundary with a checkpoint (single process).

  With several processes JAX's preemption sync manager (which owns SIGTERM there) makes every
  process stop at the same step, so Python handlers are not installed.
  """

  def __init__(self):
    self.signal: int | None = None
    self.started = False  # before the loop a signal stops at once: there is no step boundary to wait for
    self._redelivered = False
    self._timer: threading.Timer | None = None  # a signal being delivered again (see _handle)
    self._previous = {}
    if jax.process_count() == 1:
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    if self.signal == signal.SIGINT and signum == signal.SIGINT and not self._redelivered:
      raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the checkpoint
    if self._redelivered:  # this is the redelivery, or a real signal that came first: one is enough
      self._cancel_timer()
    self._redelivered = False
    self.signal = signum
    if not self.started:
      if _in_gc_callback(frame):
        # Raised in a garbage-collector callback (JAX registers one), the exception would be printed
        # as "ignored" and dropped, and the stop would wait for the first step: deliver the signal
        # again in a moment, once the callback has returned.
        self._redelivered = True
        self._timer = threading.Timer(_REDELIVERY_S, os.kill, (os.getpid(), signum))
        self._timer.daemon = True
        self._timer.start()
        return
      raise StoppedBeforeStart(signal.Signals(signum).name)

  def _cancel_timer(self) -> None:
    if self._timer is not None:
      self._timer.cancel()
      self._timer = None

  def restore(self) -> None:
    self._cancel_timer()  # a redelivery must not reach the handler that was there before
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _in_gc_callback(frame) -> bool:
  # Functions, bound methods and callable objects: the code that runs when the collector calls them.
  codes = {getattr(getattr(cb, "__func__", cb), "__code__", None) or getattr(type(cb).__call__, "__code__", None)
           for cb in gc.callbacks}
  while frame is not None:
    if frame.f_code in codes:
      return True
    frame = frame.f_back
  return False
