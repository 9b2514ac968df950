"""Wall time with at least one call in flight: a generation actor runs several calls at once (vLLM batches
across them), so summing each call's duration would count the same second several times."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class BusyClock:
    def __init__(self, now: Callable[[], float] = time.perf_counter) -> None:
        self.now = now
        self.lock = threading.Lock()
        self.active = 0
        self.since = 0.0  # start of the current busy stretch, or of the current period within it
        self.busy = 0.0

    def enter(self) -> None:
        with self.lock:
            if self.active == 0:
                self.since = self.now()
            self.active += 1

    def leave(self) -> None:
        with self.lock:
            self.active -= 1
            if self.active == 0:
                self.busy += self.now() - self.since

    def take(self) -> float:
        """Busy seconds since the previous take (a stretch still running counts up to now), then reset."""
        with self.lock:
            now = self.now()
            out = self.busy + (now - self.since if self.active else 0.0)
            self.busy, self.since = 0.0, now
            return out
