"""Stopping at a step boundary: the first SIGINT or SIGTERM asks training to stop where a checkpoint resumes
exactly; a second one interrupts at once."""

from __future__ import annotations

import signal
import threading


class StopRequested(KeyboardInterrupt):
    """Training stopped at a step boundary on SIGINT or SIGTERM, after saving a checkpoint there."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopOnSignal:
    """While active, the first SIGINT or SIGTERM only asks training to stop at the next step boundary, where
    the update and its counters are complete, so the checkpoint saved there resumes exactly; a second signal
    interrupts at once (the last checkpoint stays). Signals reach only the main thread: elsewhere it does
    nothing."""

    def __enter__(self) -> "StopOnSignal":
        self.signum: int | None = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc) -> bool:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False
