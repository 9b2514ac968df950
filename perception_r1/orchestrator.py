"""The asynchronous dataflow of a training run, owned by the driver process (asyncio):

     PromptStream ──next()──> dispatch loop ──generate.remote(prompts)──> generation actors (N)
          ^                     │ waits on: buffer.reserve()  (staleness window + capacity)
          │ requeue(lost)       │           a free actor slot  (max_inflight_per_actor calls each)
          │                     v
          │              RolloutGroup ──scorer.score()──> ScoredGroup ──ray.put──> buffer.put()
          │                                  (judge app on Serve:                  │ bounded, FIFO,
          │                                   rules + judge LLM)                   │ staleness-checked
          │                                                                         v
     report loop <── LearnerStepRecord (queue) <── learner (Ray Train workers) <── buffer.take(k)
       reduces metrics once per step, fans out to sinks,    │ publish_version() after each update
       completes checkpoints, resolves trained seqs         └─> unblocks buffer.reserve()

Who unblocks whom: the learner's publish_version() opens the staleness window, its take() frees
capacity; both wake reserve(), which wakes the dispatch loop. Generation never waits for learning
beyond the window `max_staleness` allows; learning waits only for admissible groups.
Nothing is lost silently: a failed generate call releases its reservations and requeues its
prompts; a call the engine refuses (ValueError: a prompt over data.max_prompt_tokens, an image it
cannot use) releases them and counts its prompts as skipped; a dropped or evicted group is counted;
every seq ends trained, dropped, evicted, skipped or pending.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections import Counter, deque
from dataclasses import dataclass

import ray

from perception_r1.stream import PromptStream
from replay.buffer import entry_meta
from replay.records import RolloutGroup

log = logging.getLogger("perception_r1")


@dataclass(frozen=True)
class DispatchSettings:
    prompts_per_call: int
    max_inflight_per_actor: int
    drop_uniform_groups: bool


class Orchestrator:
    def __init__(self, *, stream: PromptStream, actors: list, scorer, buffer, settings: DispatchSettings) -> None:
        self.stream, self.actors, self.scorer, self.buffer, self.settings = stream, actors, scorer, buffer, settings
        self.slots = [asyncio.Semaphore(settings.max_inflight_per_actor) for _ in actors]
        self.inflight = [0 for _ in actors]
        self.counters: Counter[str] = Counter()
        self.tasks: set[asyncio.Task] = set()
        self.stopping = asyncio.Event()
        self.recent: deque = deque(maxlen=4)
        """The latest scored groups (sample rollout tables are drawn from them)."""

    async def run(self) -> None:
        """Dispatch until stop() or the buffer closes; in-flight work is left to finish or be cancelled."""
        m = self.settings.prompts_per_call
        while not self.stopping.is_set():
            if not await self.buffer.reserve.remote(m):
                break  # closed
            actor = await self._free_actor()
            batch = [self.stream.next() for _ in range(m)]
            self._spawn(self._generate(actor, batch))

    def stop(self) -> None:
        self.stopping.set()

    async def drain(self, *, timeout_s: float) -> None:
        """Wait for in-flight calls, and for the scoring they spawn as they finish (bounded); cancel what remains."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.tasks and loop.time() < deadline:
            await asyncio.wait(set(self.tasks), timeout=deadline - loop.time())
        pending = set(self.tasks)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def _free_actor(self) -> int:
        while True:
            idx = min(range(len(self.actors)), key=lambda i: self.inflight[i])
            if not self.slots[idx].locked():
                await self.slots[idx].acquire()
                self.inflight[idx] += 1
                return idx
            await asyncio.sleep(0.005)

    async def _generate(self, idx: int, batch: list) -> None:
        seqs = [seq for seq, _ in batch]
        try:
            groups = await self.actors[idx].generate.remote([p for _, p in batch])
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
            self.counters["lost_in_flight"] += len(batch)
            log.warning("generation actor %d failed with %d prompts in flight (%s); requeued them", idx,
                        len(batch), type(e).__name__)
            self.stream.requeue(seqs)
            await self.buffer.release.remote(len(batch))
            return
        except ray.exceptions.RayTaskError as e:
            if not isinstance(e, ValueError):  # Ray keeps the cause's type; ValueError: the engine refused a prompt
                raise
            self.counters["skipped_prompts"] += len(batch)
            log.warning("generation actor %d refused a call of %d prompts (%s); skipped them", idx, len(batch), e.cause)
            self.stream.resolve(seqs)  # never retried: the same prompt would fail the same way
            await self.buffer.release.remote(len(batch))
            return
        finally:
            self.inflight[idx] -= 1
            self.slots[idx].release()
        for seq, group in zip(seqs, groups):
            self._spawn(self._score_and_put(dataclasses.replace(group, seq=seq)))

    async def _score_and_put(self, group: RolloutGroup) -> None:
        try:
            scored = await self.scorer.score(group)
        except Exception as e:  # noqa: BLE001 -- the scorer failed outright (not a judge fallback): regenerate
            self.counters["score_errors"] += 1
            log.warning("scoring group of prompt %s failed (%s: %s); requeued it", group.prompt.id,
                        type(e).__name__, e)
            self.stream.requeue([group.seq])
            await self.buffer.release.remote(1)
            return
        if self.settings.drop_uniform_groups and len(set(scored.totals().tolist())) == 1:
            self.counters["dropped_uniform"] += 1
            self.stream.resolve([group.seq])
            await self.buffer.release.remote(1)
            return
        self.recent.append(scored)
        admitted = await self.buffer.put.remote([ray.put(scored)], entry_meta(scored))
        if not admitted:
            self.counters["evicted_at_put"] += 1
            self.stream.resolve([group.seq])

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.counters["task_errors"] += 1
            log.error("orchestrator task failed: %r", task.exception())
