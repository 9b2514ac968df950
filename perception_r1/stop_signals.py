"""SIGINT and SIGTERM honoured at any moment of a run, start-up included: from the first line of
`train()` to its last, each signal becomes a stop request (a flag every phase checks, and a call to
whoever registered for it: the running session). Ray and Serve are started with these handlers in
place and they are put back after, in case a library installed its own. A second Ctrl-C raises
KeyboardInterrupt: the user insists, and the run's `finally` blocks still tear everything down.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable

log = logging.getLogger("perception_r1")
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """A stop request arrived before training began: nothing was trained, nothing to save."""


class StopSignals:
    def __init__(self) -> None:
        self.requested = threading.Event()
        self.signal_name = ""
        self._listeners: list[Callable[[], None]] = []
        self._previous: dict[int, object] = {}
        self._interrupts = 0

    def __enter__(self) -> StopSignals:
        self.install()
        return self

    def __exit__(self, *exc) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)

    def install(self) -> None:
        """(Re)install the handlers (the main thread only: a caller running train() in a thread keeps its own)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in SIGNALS:
            current = signal.getsignal(sig)
            if current != self._handle:
                self._previous.setdefault(sig, current)
                signal.signal(sig, self._handle)

    def on_stop(self, listener: Callable[[], None]) -> None:
        """Call `listener` on a stop request (at once if one already came)."""
        self._listeners.append(listener)
        if self.requested.is_set():
            listener()

    def request(self, name: str = "a stop request") -> None:
        if not self.requested.is_set():
            self.signal_name = name
            log.warning("%s: stopping", name)
        self.requested.set()
        for listener in self._listeners:
            listener()

    def check(self, phase: str) -> None:
        """Raise `Interrupted` if a stop was requested (called between the start-up phases)."""
        if self.requested.is_set():
            raise Interrupted(f"{self.signal_name or 'a stop request'} during {phase}; nothing was trained")

    def _handle(self, signum: int, frame) -> None:
        if signum == signal.SIGINT:
            self._interrupts += 1
            if self._interrupts > 1:
                raise KeyboardInterrupt
        self.request(signal.Signals(signum).name)
