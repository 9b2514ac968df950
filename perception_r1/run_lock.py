"""One run per folder: `RunLock(run_dir)` holds an exclusive `flock` on `<run_dir>/.lock` for the
life of the driver, and records who holds it (pid, host, start time, command) in the file. A second
driver on the same folder is refused with that record in its message. The kernel drops the lock
when the holder exits, however it exits (SIGKILL included), so a stale file never blocks a rerun.

`fcntl.flock` (stdlib) rather than a lock library: it is all the job needs, and the `filelock`
package's soft fallback would silently allow two runs on file systems without flock support.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

LOCK_FILE = ".lock"


class RunFolderBusy(ValueError):
    """Another driver holds the run folder (a user error: answered with one clear line)."""


class RunLock:
    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunFolderBusy(f"{self.path.parent} is in use by another run ({holder}); wait for it to end, "
                                "or give this run another run.name / run.output_dir") from None
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        self._fd = fd
        return self

    def check_free(self) -> None:
        """Refuse now if another run holds the folder (the CLI calls this before its slow imports; the
        run itself still takes the lock). A folder it cannot create is left to the run's own checks."""
        try:
            self.acquire().release()
        except RunFolderBusy:
            raise
        except OSError:
            pass

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        raw = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {raw['pid']} on {raw['host']}, started {raw['started']}: {raw['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"
