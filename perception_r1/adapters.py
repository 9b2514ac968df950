"""Ray handles as the seams the driver's loop is typed against (`core/seams.py`): the only place where
the loop's calls become `.remote()` calls and Ray's exceptions become the seams' own. The loop
(orchestrator.py, session.py) imports no Ray, so tests drive it with in-process fakes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence

import ray
from ray.util.queue import Empty, Queue

from core.records import (
    BufferStats,
    GenerationStats,
    LearnerReport,
    Prompt,
    RolloutGroup,
    Sampling,
    ScoredGroup,
)
from core.seams import GeneratorLost, PeerLost, PromptsRefused
from replay.buffer import entry_meta

_LOST = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)


class RayGenerator:
    """A generation actor handle as a `core.seams.Generator`."""

    def __init__(self, handle) -> None:
        self.handle = handle

    async def generate(self, prompts: Sequence[Prompt], *, sampling: Sampling | None = None) -> list[RolloutGroup]:
        with _as_seam_errors():
            args = (list(prompts),) if sampling is None else (list(prompts), sampling)  # None: the actor's own
            return await self.handle.generate.remote(*args)

    async def stream(self, prompts: Sequence[Prompt]) -> AsyncIterator[tuple[int, RolloutGroup]]:
        with _as_seam_errors():
            async for ref in self.handle.stream.remote(list(prompts)):  # a Ray streaming generator
                yield await ref

    async def stats(self) -> GenerationStats:
        return await self.handle.stats.remote()


@contextlib.contextmanager
def _as_seam_errors():
    """A dead or unreachable actor becomes GeneratorLost, a refusal (Ray keeps the cause's type) PromptsRefused;
    another failure of the call stays what it is (an instance of its cause's type too)."""
    try:
        yield
    except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
        raise GeneratorLost(type(e).__name__) from e
    except ray.exceptions.RayTaskError as e:
        if isinstance(e, ValueError):
            raise PromptsRefused(str(e.cause)) from e
        raise


class RayBuffer:
    """The replay buffer actor as a `core.seams.Buffer`: a group goes into the object store once
    (`ray.put`); the buffer holds only its ref, the learner fetches it. Its death reads as `PeerLost`."""

    def __init__(self, handle) -> None:
        self.handle = handle

    async def reserve(self, n: int) -> bool:
        return await self._call(self.handle.reserve, n)

    async def release(self, n: int) -> None:
        await self._call(self.handle.release, n)

    async def put(self, scored: ScoredGroup) -> bool:
        return await self._call(self.handle.put, [ray.put(scored)], entry_meta(scored))

    async def close(self) -> None:
        await self._call(self.handle.close)

    async def stats(self) -> BufferStats:
        return await self._call(self.handle.stats)

    async def validated(self, version: int) -> None:
        await self._call(self.handle.validated, version)

    async def pop_evicted_seqs(self) -> list[int]:
        return await self._call(self.handle.pop_evicted_seqs)

    async def pop_lost_seqs(self) -> list[int]:
        return await self._call(self.handle.pop_lost_seqs)

    async def buffered(self) -> list[ScoredGroup]:
        entries = await self._call(self.handle.buffered_refs)
        return list(await asyncio.gather(*[refs[0] for refs, _ in entries]))

    @staticmethod
    async def _call(method, *args):
        try:
            return await method.remote(*args)
        except _LOST as e:
            raise PeerLost(PeerLost.BUFFER, type(e).__name__) from e


class RayReports:
    """The driver's end of the learner's report queue (a `ray.util.queue.Queue`) as a `core.seams.ReportSource`."""

    def __init__(self, queue: Queue) -> None:
        self.queue = queue

    async def get(self, *, timeout_s: float) -> LearnerReport | None:
        try:
            return await self.queue.get_async(block=True, timeout=timeout_s)
        except Empty:
            return None
        except _LOST as e:
            raise PeerLost(PeerLost.REPORTS, type(e).__name__) from e

    async def empty(self) -> bool:
        try:
            return await self.queue.actor.empty.remote()
        except _LOST as e:
            raise PeerLost(PeerLost.REPORTS, type(e).__name__) from e
