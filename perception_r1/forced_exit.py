"""Ctrl-C for the offline commands (prepare-data, eval): a stop that cannot finish still ends the process.

Ctrl-C raises KeyboardInterrupt; asyncio cancels the command's requests and the command says where its
finished items are (their progress logs flush each record as it finishes). A request, thread or library
that does not honour the cancellation would keep the process alive; so the first Ctrl-C also arms a
timer, and a process still running `grace_s` later prints the same message and exits with 130.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Iterator

GRACE_S = 15.0


@contextmanager
def forced_exit_after_sigint(message: str, *, grace_s: float = GRACE_S) -> Iterator[None]:
    """Within the block, SIGINT raises KeyboardInterrupt as usual and arms the forced exit."""
    timers: list[threading.Timer] = []

    def force() -> None:
        print(f"{message} (the stop did not finish within {grace_s:g}s: forced)", file=sys.stderr, flush=True)
        os._exit(130)

    def on_sigint(signum, frame) -> None:
        if not timers:
            timers.append(threading.Timer(grace_s, force))
            timers[0].daemon = True
            timers[0].start()
        signal.default_int_handler(signum, frame)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)  # an armed timer stays: the process is on its way out
