"""`within(seconds)`: a test that runs over its bound fails with TimeoutError instead of stalling the suite
(SIGALRM; main thread only, as pytest runs tests)."""

import signal
from contextlib import contextmanager


@contextmanager
def within(seconds: int):
    def expire(signum, frame):
        raise TimeoutError(f"test ran over its {seconds} s bound")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
