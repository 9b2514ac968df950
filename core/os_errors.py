"""OS errors as a user reads them, and the probe write that finds one: the run's start-up checks
(perception_r1/preflight.py) and the learner's checkpoint writer (learner/worker.py) name a full disk or
a permission problem the same way."""

from __future__ import annotations

import errno
import os
from pathlib import Path


def os_error_text(e: OSError) -> str:
    """'no space left on device (ENOSPC)'."""
    code = errno.errorcode.get(e.errno or 0, "")
    reason = (e.strerror or str(e)).lower()
    return f"{reason} ({code})" if code else reason


def probe_write(folder: Path, *, name: str, size: int) -> OSError | None:
    """Write (and fsync) `size` bytes into `folder/name`, then remove it: the OS's error, or None."""
    probe = folder / name
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * size)
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
        return None
    except OSError as e:
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass
        return e
