"""The driver's deadlines, one per phase of a run: the learner must come up within `startup_s`, a
step must complete within `stall_s` of the last one, and after a stop request the learner must end
within `stop_s`. `overdue()` names the phase whose deadline passed (the session turns it into a
stop with a diagnosis); the clock is injectable, so the rules are tested without waiting.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

Phase = Literal["", "startup", "stall", "stop"]


@dataclass(frozen=True)
class Deadlines:
    startup_s: float
    stall_s: float
    stop_s: float


class Watchdog:
    def __init__(self, deadlines: Deadlines, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.deadlines, self.clock = deadlines, clock
        self.started = self.last_progress = clock()
        self.stop_at: float | None = None

    def progress(self) -> None:
        """A learner step, or the learner's (re)start: the stall clock starts over."""
        self.last_progress = self.clock()

    def stopping(self) -> None:
        if self.stop_at is None:
            self.stop_at = self.clock()

    def since_progress(self) -> float:
        return self.clock() - self.last_progress

    def overdue(self, *, learner_up: bool) -> Phase:
        now, d = self.clock(), self.deadlines
        if self.stop_at is not None:
            return "stop" if now - self.stop_at > d.stop_s else ""
        if not learner_up:
            return "startup" if now - self.started > d.startup_s else ""
        return "stall" if now - self.last_progress > d.stall_s else ""
