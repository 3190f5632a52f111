"""Stopping on a signal: schedulers (SLURM, Kubernetes, systemd) stop jobs with SIGTERM, people with Ctrl-C.

`StopOnSignals` turns SIGTERM, SIGINT and SIGHUP into a `Stopped` exception in the main thread, so that the run
unwinds through its cleanup (prediction shards and temporary files removed, an earlier output left as it was) and the
command exits with 128 + the signal number and one line that says the run was stopped.

Training steps are not cut in half: a stop is held until the step boundary (`hold`; after the step's validation when
one follows), so the resumable checkpoint written on the way out holds a consistent model and optimizer state.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Iterable, Optional

log = logging.getLogger(__name__)

SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, name))


class Stopped(BaseException):
    """A signal asked the run to stop. A BaseException, so that no `except Exception` on the way swallows it."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.name = signal.Signals(signum).name
        super().__init__(f"stopped by {self.name}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopOnSignals:
    """Install the handlers for the life of a run (a context manager); see the module docstring."""

    def __init__(self, ignore_after: bool = False) -> None:
        """`ignore_after`: on leaving, ignore these signals instead of restoring the earlier handlers - for a
        command's process, whose result is decided by then: a stop that lands while the interpreter shuts down
        (seconds, with PyTorch loaded) must not turn a complete run into a traceback or a kill."""
        self.ignore_after = ignore_after
        self.main_pid = os.getpid()
        self.pending: Optional[int] = None
        self._held: frozenset[int] = frozenset()
        self._stopping = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopOnSignals":
        for signum in SIGNALS:
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: a caller's own handling stays
                break
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, signal.SIG_IGN if self.ignore_after else handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if os.getpid() != self.main_pid:
            return  # a forked loader worker: the main process stops and shuts it down
        if self._stopping:
            log.warning("received %s while stopping; finishing the cleanup", signal.Signals(signum).name)
            return
        if signum in self._held:
            self.pending = signum
            return
        self._stopping = True
        raise Stopped(signum)

    def hold(self, signal_numbers: Iterable[int] = SIGNALS) -> None:
        """Hold a stop by these signals until `raise_pending` (a training step runs to its end)."""
        self._held = frozenset(signal_numbers)

    def raise_pending(self) -> None:
        """End a hold; raise a stop that arrived during it."""
        self._held = frozenset()
        if self.pending is not None and not self._stopping:
            self._stopping = True
            raise Stopped(self.pending)
