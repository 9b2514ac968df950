"""Complete checkpoints: the learner writes its shards into `step_<N>.tmp/`; the driver adds
`driver.msgpack` (the prompt stream's position and the buffer's groups) and renames the folder to
`step_<N>` -- an atomic rename, so a crash mid-write never leaves a broken newest checkpoint.
Resume picks the newest folder that loads; a corrupt one is skipped with a warning. A `.tmp`
folder nobody will complete (the run stopped, crashed or was killed mid-write) is removed at the end
of the run and before the next one starts in the folder.

When the learner's report queue dies, the learner writes the step reports it could not deliver into
its last checkpoint folder (`unreported.msgpack`); `unfinished_with_reports` finds it for the driver.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import msgpack

from core import codec
from core.records import LearnerStep, ScoredGroup
from learner.sharded_state import LEARNER_META, UNREPORTED_FILE
from perception_r1.stream import StreamState

log = logging.getLogger("perception_r1")
DRIVER_FILE = "driver.msgpack"


@dataclass
class DriverState:
    version: int
    stream: StreamState
    buffered: list[ScoredGroup] = field(default_factory=list)
    """Scored groups that were waiting in the buffer; re-admitted on resume (if still fresh enough)."""


def complete(tmp: Path, state: DriverState, *, keep: int) -> Path:
    """Add the driver's part to a learner checkpoint folder and publish it atomically."""
    assert tmp.name.endswith(".tmp"), tmp
    payload = {"version": state.version, "next_seq": state.stream.next_seq, "pending": state.stream.pending,
               "buffered": [codec.encode(g) for g in state.buffered]}
    _write_atomic(tmp / DRIVER_FILE, msgpack.packb(payload, use_bin_type=True))
    final = tmp.with_name(tmp.name.removesuffix(".tmp"))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    _prune(final.parent, keep=keep)
    return final


def load_latest(root: Path) -> tuple[Path, DriverState] | None:
    """The newest complete checkpoint that loads, or None; corrupt ones are skipped with a warning."""
    for path in sorted(root.glob("step_*[0-9]"), reverse=True):
        try:
            return path, read_driver_state(path)
        except (OSError, ValueError, KeyError, TypeError, msgpack.UnpackException, json.JSONDecodeError) as e:
            log.warning("checkpoint %s is unreadable (%s: %s); falling back to an older one", path,
                        type(e).__name__, e)
    return None


def set_aside_newer(root: Path, chosen: Path) -> list[Path]:
    """Rename the (unreadable) checkpoints newer than the one resumed from to `<name>.unreadable`: kept
    for inspection, but no learner worker restarted later may take one for this run's own."""
    newer = [p for p in sorted(root.glob("step_*[0-9]")) if p.name > chosen.name]
    for path in newer:
        path.rename(path.with_name(path.name + ".unreadable"))
        log.warning("set %s aside as %s.unreadable (resuming from %s)", path.name, path.name, chosen.name)
    return newer


def remove_unfinished(root: Path) -> list[Path]:
    """Delete `step_<N>.tmp` folders (call only while no learner of this folder can be writing one)."""
    removed = sorted(root.glob("step_*.tmp")) if root.is_dir() else []
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    if removed:
        log.info("removed %d interrupted checkpoint folder(s) under %s", len(removed), root)
    return removed


def unfinished_with_reports(root: Path) -> tuple[Path, list[LearnerStep]] | None:
    """The newest `.tmp` folder whose learner part is complete, with the step reports the learner could
    not deliver (oldest first)."""
    for path in sorted(root.glob("step_*.tmp"), reverse=True):
        if (path / LEARNER_META).is_file() and (path / UNREPORTED_FILE).is_file():
            raw = msgpack.unpackb((path / UNREPORTED_FILE).read_bytes(), raw=False)
            return path, [codec.decode(b, LearnerStep) for b in raw]
    return None


def read_driver_state(path: Path) -> DriverState:
    """The driver's part, after checking the learner's part is all there (metadata and shard index)."""
    json.loads((path / "learner.json").read_text(encoding="utf-8"))
    if not (path / "learner" / ".metadata").is_file():
        raise ValueError("learner/.metadata (the shard index) is missing")
    raw = msgpack.unpackb((path / DRIVER_FILE).read_bytes(), raw=False)
    stream = StreamState(next_seq=int(raw["next_seq"]), pending=[int(s) for s in raw["pending"]])
    return DriverState(version=int(raw["version"]), stream=stream,
                       buffered=[codec.decode(b, ScoredGroup) for b in raw["buffered"]])


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".part")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _prune(root: Path, *, keep: int) -> None:
    complete_ones = sorted(root.glob("step_*[0-9]"))
    for old in complete_ones[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
