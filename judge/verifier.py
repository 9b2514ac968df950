"""Bounded accuracy scoring: a small pool of long-lived worker processes that run
`judge.rules.accuracy_reward` (math-verify with its signal timeouts off), so a pathological answer
costs at most `timeout_s` and a 0, and never blocks the caller's event loop or thread.

    caller (async) ──JSON line──> worker stdin        worker: `python -m judge.verifier`
                   <──JSON line── worker protocol fd  (math-verify imported once, then a loop)

Each worker serves one request at a time; idle workers wait in a queue. A request that overruns
`timeout_s`, or whose worker dies, scores 0.0 and is counted; its worker is killed and a fresh one
is started in the background. If fresh workers cannot be started, the pool is broken and every call
raises (the caller's scoring fails loudly instead of waiting forever).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from pathlib import Path

from core.records import JudgeStats

log = logging.getLogger(__name__)

_ROOT = str(Path(__file__).resolve().parent.parent)


class _Worker:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def call(self, request: dict) -> float:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(request).encode() + b"\n")
        await self.proc.stdin.drain()
        line = await self.proc.stdout.readline()
        if not line:
            raise ConnectionError(f"verifier worker {self.proc.pid} exited (code {self.proc.returncode})")
        return float(json.loads(line)["score"])

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
        await self.proc.wait()


class VerifierPool:
    """`await pool.accuracy(text, ground_truth, mode=...)`: r_a, bounded in time. Bound to the event loop
    it first runs on (workers start lazily there); `close()` ends the workers."""

    def __init__(self, *, num_workers: int = 2, timeout_s: float = 10.0, start_timeout_s: float = 120.0) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers={num_workers} must be >= 1")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s={timeout_s} must be > 0")
        self.num_workers, self.timeout_s, self.start_timeout_s = num_workers, timeout_s, start_timeout_s
        self.counters = JudgeStats()
        """Its part of the judge's counters: the num_verify_* fields."""
        self._idle: asyncio.Queue[_Worker | None] | None = None
        self._all: set[_Worker] = set()
        self._start_lock: asyncio.Lock | None = None
        self._broken: BaseException | None = None
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        """Start the workers now (otherwise the first call does); returns once all are ready."""
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self._idle is not None:
                return
            idle: asyncio.Queue[_Worker | None] = asyncio.Queue()
            for worker in await asyncio.gather(*[self._spawn() for _ in range(self.num_workers)]):
                idle.put_nowait(worker)
            self._idle = idle

    async def accuracy(self, text: str, ground_truth: str, *, mode: str) -> float:
        if self._idle is None:
            await self.start()
        assert self._idle is not None
        worker = await self._idle.get()
        if worker is None or self._broken is not None:
            self._idle.put_nowait(None)  # wake the next waiter too
            raise RuntimeError(f"the verifier pool is broken: {self._broken!r}")
        self.counters.num_verify_calls += 1
        request = {"text": text, "ground_truth": ground_truth, "mode": mode}
        try:
            score = await asyncio.wait_for(worker.call(request), self.timeout_s)
        except asyncio.TimeoutError:
            self.counters.num_verify_timeouts += 1
            log.warning("accuracy verification overran %.1f s; scored 0 (answer starts %r)", self.timeout_s, text[:80])
            self._replace(worker)
            return 0.0
        except (ConnectionError, BrokenPipeError, ValueError, KeyError) as e:
            self.counters.num_verify_crashes += 1
            log.warning("verifier worker failed (%s: %s); scored 0", type(e).__name__, e)
            self._replace(worker)
            return 0.0
        except asyncio.CancelledError:  # the caller gave up mid-request: the worker's state is unknown
            self._replace(worker)
            raise
        self._idle.put_nowait(worker)
        return score

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*[w.kill() for w in list(self._all)], return_exceptions=True)
        self._all.clear()

    async def _spawn(self) -> _Worker:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH")) if p)}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "judge.verifier", stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, env=env, limit=1 << 20)
        worker = _Worker(proc)
        self._all.add(worker)
        assert proc.stdout is not None
        try:
            ready = await asyncio.wait_for(proc.stdout.readline(), self.start_timeout_s)
        except asyncio.TimeoutError:
            ready = b""
        if json.loads(ready or b"{}").get("ready") is not True:
            await worker.kill()
            self._all.discard(worker)
            raise RuntimeError(f"verifier worker did not start (pid {proc.pid}, exit code {proc.returncode})")
        return worker

    def _replace(self, worker: _Worker) -> None:
        self.counters.num_verify_restarts += 1
        task = asyncio.get_running_loop().create_task(self._respawn(worker))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _respawn(self, old: _Worker) -> None:
        assert self._idle is not None
        await old.kill()
        self._all.discard(old)
        try:
            self._idle.put_nowait(await self._spawn())
        except Exception as e:  # noqa: BLE001 -- a pool that cannot start workers is broken; callers raise
            log.error("cannot restart a verifier worker: %r; the verifier pool is broken", e)
            self._broken = e
            self._idle.put_nowait(None)


# ------------------------------------------------------------------------------------- the worker
def _serve() -> None:
    """Worker loop: one JSON request per stdin line, one JSON reply per line on the protocol fd.

    fd 1 is pointed at stderr so stray prints (Python or C) cannot corrupt the protocol."""
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    from judge.rules import accuracy_reward

    accuracy_reward("\\boxed{1}", "1", mode="reference")  # import and warm math-verify before "ready"
    protocol.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        score = accuracy_reward(request["text"], request["ground_truth"], mode=request["mode"])
        protocol.write(json.dumps({"score": score}) + "\n")


if __name__ == "__main__":
    _serve()
