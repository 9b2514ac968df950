"""Checkpoints written in the background, at most one in flight (learner/worker.py drives it, every rank):

    step N ends ─> start(step_N.tmp): the caller has waited for the write in flight, if any
                   snapshot: DCP stages a CPU copy of this rank's model and optimizer shards   (the step loop
                   is blocked only for this copy), the LR scheduler's state is copied too
                ─> a thread writes the copy (dcp.async_save over its own gloo group, so its collectives
                   never interleave with the step loop's)                         the step loop goes on
    a later step, or shutdown ─> finished(): the write is done; rank 0 writes learner.json (policy_version,
                   scheduler) last, so a folder holding learner.json holds every rank's shards; the worker
                   reports CheckpointWritten and the driver completes the folder (perception_r1/run_checkpoints.py)

A failed write surfaces at the next finished() as `checkpoint_error` (the OS's words: no space left,
permission denied); a write that does not end within `checkpoint.write_timeout_s` fails the same way.
"""

from __future__ import annotations

import errno
import json
import os
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter, StorageWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict

from core.os_errors import os_error_text, probe_write
from learner.sharded_state import LEARNER_DIR, LEARNER_META


@dataclass(frozen=True, slots=True)
class Written:
    """A checkpoint whose every shard is on disk."""

    path: Path
    version: int
    seconds: float
    """From the snapshot to the write's end."""
    nbytes: int
    """The folder's size on disk (every rank's shards), counted on rank 0; 0 on the other ranks."""


@dataclass(slots=True)
class _InFlight:
    path: Path
    version: int
    future: Future
    meta: str
    """learner.json's text, as of the snapshot."""
    started: float
    ended: list[float] = field(default_factory=list)
    """When the writer thread finished (set by the future's callback)."""


class CheckpointWriter:
    """One rank's checkpoint writes; every rank makes one at the same point (it forms a process group)."""

    def __init__(self, *, timeout_s: float,
                 storage_writer: Callable[[str], StorageWriter] = FileSystemWriter) -> None:
        self.timeout_s = timeout_s
        self.storage_writer = storage_writer
        """The seam the shards are written through (tests pass a slowed or failing one)."""
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        self.in_flight: _InFlight | None = None
        self.last_version: int | None = None
        """The version of the last snapshot this learner took (written or in flight)."""

    def start(self, path: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler,
              version: int) -> float:
        """Snapshot the state into `path` (a `step_<N>.tmp` folder) and write it in a thread; returns the
        seconds the caller was blocked for the snapshot. Nothing may be in flight (see `finished`)."""
        assert self.in_flight is None, "a checkpoint write is in flight; wait for it with finished(wait=True)"
        start = time.perf_counter()
        try:
            path.mkdir(parents=True, exist_ok=True)
            model_sd, optim_sd = get_state_dict(model, optimizer)
            with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
                warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
                future = dcp.async_save({"model": model_sd, "optimizer": optim_sd}, process_group=self.group,
                                        storage_writer=self.storage_writer(str(path / LEARNER_DIR)),
                                        no_dist=self.group is None)
        except (Exception, CheckpointException) as e:  # DCP's is a BaseException
            raise checkpoint_error(path, e) from e
        meta = json.dumps({"version": version, "scheduler": scheduler.state_dict()})
        job = _InFlight(path=path, version=version, future=future, meta=meta, started=start)
        future.add_done_callback(lambda _: job.ended.append(time.perf_counter()))
        self.in_flight, self.last_version = job, version
        return time.perf_counter() - start

    def finished(self, *, wait: bool) -> Written | None:
        """The write in flight once it is done (waiting for it if `wait`, up to the timeout); None while it
        runs or when none is. Raises the write's error, named by `checkpoint_error`."""
        job = self.in_flight
        if job is None or not (wait or job.future.done()):
            return None
        self.in_flight = None
        try:
            job.future.result(timeout=self.timeout_s)
        except FutureTimeout:
            raise TimeoutError(f"checkpoint {job.path} was not written within checkpoint.write_timeout_s="
                               f"{self.timeout_s:g}s (a stalled file system?); check the disk, or raise "
                               "checkpoint.write_timeout_s") from None
        except (Exception, CheckpointException) as e:
            raise checkpoint_error(job.path, e) from e
        nbytes = 0
        if _rank() == 0:  # rank 0's save ends after every rank's shards are written (DCP gathers their results)
            try:
                _write_atomic(job.path / LEARNER_META, job.meta)
            except OSError as e:
                raise checkpoint_error(job.path, e) from e
            nbytes = sum(f.stat().st_size for f in job.path.rglob("*") if f.is_file())
        seconds = (job.ended[0] if job.ended else time.perf_counter()) - job.started
        return Written(path=job.path, version=job.version, seconds=seconds, nbytes=nbytes)


def _write_atomic(path: Path, text: str) -> None:
    part = path.with_suffix(".part")
    part.write_text(text, encoding="utf-8")
    os.replace(part, path)


def checkpoint_error(path: Path, error: BaseException) -> OSError:
    """Why a checkpoint could not be written, in the OS's words: torch's writers often hide the cause
    (a full disk reads as 'unexpected pos 704 vs 598'), so a failed write is followed by a probe write."""
    cause = next((e for e in _chain(error) if isinstance(e, OSError) and e.errno), None) or probe_write(
        path if path.is_dir() else path.parent, name=".write-probe", size=1 << 20)
    if cause is None:
        return OSError(errno.EIO, f"writing checkpoint {path} failed ({type(error).__name__}: {error})")
    return OSError(cause.errno, f"cannot write checkpoint {path}: {os_error_text(cause)}; "
                                "free space there (or lower checkpoint.keep), or move run.output_dir")


def _chain(error: BaseException | None):
    """The error, its causes, and the ranks' errors a CheckpointException carries (DCP's save wraps them)."""
    seen: set[int] = set()
    todo = [error]
    while todo:
        error = todo.pop(0)
        if error is None or id(error) in seen:  # a context chain can loop
            continue
        seen.add(id(error))
        yield error
        todo.append(error.__cause__ or error.__context__)
        if isinstance(error, CheckpointException):
            todo.extend(exc for exc, _ in error.failures.values())


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0
