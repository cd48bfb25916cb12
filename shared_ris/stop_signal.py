"""Stopping a long job cleanly: SIGTERM / Ctrl-C ask, the job finishes its step and saves."""

from __future__ import annotations

import signal
import threading
import time


class StopOnSignal:
    """SIGTERM / SIGINT set ``requested``; the loop finishes its step, saves and returns.

    A signal arriving more than ``patience`` seconds after the first stops at once
    (KeyboardInterrupt): an impatient second Ctrl-C. Copies of the first that arrive together
    (the terminal, torchrun and SLURM may each deliver one) only repeat the request.
    Handlers are only installed from the main thread.
    """

    def __init__(self, patience: float = 5.0) -> None:
        self.requested = False
        self.patience = patience
        self._first = 0.0
        self._previous: dict = {}

    def _handle(self, signum, _frame) -> None:
        if self.requested and time.monotonic() - self._first > self.patience:
            raise KeyboardInterrupt
        if not self.requested:
            self.requested, self._first = True, time.monotonic()

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
