"""The asynchronous dataflow of a training run, owned by the driver process (asyncio):

     PromptStream ──next()──> dispatch loop ──stream(prompts)──> Generators (N actors)
          ^                     │ waits on: buffer.reserve()  (staleness window + capacity)
          │ requeue(lost)       │           room on an actor (inflight_sequences_per_actor each)
          │                     v
          │              RolloutGroup ──scorer.score()──> ScoredGroup ──buffer.put()──> Buffer
          │                                  (judge app on Serve:                  │ bounded, FIFO,
          │                                   rules + judge LLM)                   │ staleness-checked
          │                                                                         v
     report loop <── LearnerReport (queue) <── learner (Ray Train workers) <── take(k)
       (session.py) reduces metrics once per step, fans out   │ publish_version() after each update
       to sinks, completes checkpoints, resolves trained seqs └─> unblocks buffer.reserve()

Who unblocks whom: the learner's publish_version() opens the staleness window, its take() frees
capacity; both wake reserve(), which wakes the dispatch loop. Generation never waits for learning
beyond the window `max_staleness` allows; learning waits only for admissible groups. Each call streams its
groups back as they finish, and each finished group frees its sequences on the actor at once: the
dispatcher keeps each engine at its target of sequences in flight, not at a number of calls, so one
long completion does not idle the slots of its call-mates.
Nothing is lost silently: a call whose actor died (GeneratorLost) releases the reservations of the prompts
it had not returned and requeues them; a call the engine refused (PromptsRefused: a prompt over
data.max_prompt_tokens, an image it cannot use) is split into one call per prompt not yet returned, and a prompt refused
alone, or a call that failed otherwise, releases its reservations and counts its prompts as skipped
(by kind); a dropped or evicted group is counted; every seq ends trained, dropped,
evicted, skipped or pending. When as many prompts in a row as the dataset holds are skipped and none
is generated, no step can ever come: `fatal` says so and dispatch stops (the session ends the run).

The loop talks only to the seams of `core/seams.py` (Ray handles come through perception_r1/adapters.py),
so tests drive it with in-process fakes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import Counter, deque
from dataclasses import dataclass

from core.records import RolloutGroup
from core.seams import Buffer, Generator, GeneratorLost, PeerLost, PromptsRefused, Scorer
from perception_r1.stream import PromptStream

log = logging.getLogger("perception_r1")
LOUD_SKIPS = 5
"""Skip warnings logged one by one per kind; after that, one in every QUIET_EVERY."""
QUIET_EVERY = 100


@dataclass(frozen=True)
class DispatchSettings:
    prompts_per_call: int
    inflight_sequences_per_actor: int
    """Sequences (prompts x samples) each actor holds in flight: a call goes out when one fits."""
    samples_per_prompt: int
    drop_uniform_groups: bool


class Orchestrator:
    def __init__(self, *, stream: PromptStream, generators: list[Generator], scorer: Scorer, buffer: Buffer,
                 settings: DispatchSettings) -> None:
        self.stream, self.generators, self.scorer, self.buffer = stream, generators, scorer, buffer
        self.settings = settings
        self.inflight = [0 for _ in generators]
        self.slot_freed = asyncio.Condition()
        self.counters: Counter[str] = Counter()
        self.tasks: set[asyncio.Task] = set()
        self.stopping = asyncio.Event()
        self.recent: deque = deque(maxlen=4)
        """The latest scored groups (sample rollout tables are drawn from them)."""
        self.calls: dict[int, tuple[int, float]] = {}
        """In-flight generate calls: call id -> (actor index, start time), for the watchdog's diagnosis."""
        self.num_scored = 0
        """Groups scored so far (for the watchdog's diagnosis)."""
        self.skipped_in_a_row = 0
        self.fatal = ""
        """Why no step can come (every prompt of the dataset skipped, an actor dispatch needs died under a
        call it spawned); empty while dispatch can go on."""

    async def run(self) -> None:
        """Dispatch until stop() or the buffer closes; in-flight work is left to finish or be cancelled."""
        m = self.settings.prompts_per_call
        while not self.stopping.is_set() and not self.fatal:
            if not await self.buffer.reserve(m):
                break  # closed
            idx = await self._free_actor(m * self.settings.samples_per_prompt)
            batch = [self.stream.next() for _ in range(m)]
            self._spawn(self._generate(idx, batch))

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

    async def _free_actor(self, num_sequences: int) -> int:
        """The least-busy actor with room for `num_sequences` more sequences in flight (waits for one)."""
        limit = self.settings.inflight_sequences_per_actor
        async with self.slot_freed:
            await self.slot_freed.wait_for(lambda: min(self.inflight) + num_sequences <= limit)
            idx = min(range(len(self.generators)), key=lambda i: self.inflight[i])
            self.inflight[idx] += num_sequences
            return idx

    def oldest_call(self) -> tuple[int, float] | None:
        """(actor index, start time) of the longest-running generate call, if any."""
        return min(self.calls.values(), key=lambda c: c[1], default=None)

    async def _generate(self, idx: int, batch: list) -> None:
        """One call's groups as they finish: each is scored and frees its sequences' slots at once."""
        call, n = id(batch), self.settings.samples_per_prompt
        self.calls[call] = (idx, time.monotonic())
        pending = dict(enumerate(batch))
        try:
            async for i, group in self.generators[idx].stream([p for _, p in batch]):
                seq, _ = pending.pop(i)
                await self._free(idx, n)
                self.skipped_in_a_row = 0
                self._spawn(self._score_and_put(dataclasses.replace(group, seq=seq)))
        except GeneratorLost as e:
            await self._lost(idx, [seq for seq, _ in pending.values()], e)
        except PromptsRefused as e:
            if len(pending) > 1:  # one bad prompt refuses the rest of the call: find it, each alone
                self.counters["refused_calls_split"] += 1
                for item in pending.values():
                    self._spawn(self._generate_alone(item))
            else:
                await self._skipped(idx, [seq for seq, _ in pending.values()], e)
        except Exception as e:  # noqa: BLE001 -- failed otherwise: counted by kind, never retried
            await self._skipped(idx, [seq for seq, _ in pending.values()], e)
        finally:
            self.calls.pop(call, None)
            await self._free(idx, n * len(pending))

    async def _free(self, idx: int, num_sequences: int) -> None:
        async with self.slot_freed:
            self.inflight[idx] -= num_sequences
            self.slot_freed.notify_all()

    async def _generate_alone(self, item: tuple) -> None:
        """One prompt of a refused call, on the next free actor (its reservation is already held)."""
        await self._generate(await self._free_actor(self.settings.samples_per_prompt), [item])

    async def _lost(self, idx: int, seqs: list[int], error: GeneratorLost) -> None:
        """The actor died mid-call: its prompts go back to the stream (Ray restarts the actor)."""
        self.counters["lost_in_flight"] += len(seqs)
        log.warning("generation actor %d failed with %d prompts in flight (%s); requeued them", idx, len(seqs), error)
        self.stream.requeue(seqs)
        await self.buffer.release(len(seqs))

    async def _skipped(self, idx: int, seqs: list[int], error: Exception) -> None:
        """The call was refused or failed: the same prompts would fail the same way, so they are skipped."""
        self.counters["skipped_prompts"] += len(seqs)
        kind = "refused_calls" if isinstance(error, PromptsRefused) else f"generate_errors/{type(error).__name__}"
        self.counters[kind] += 1
        n = self.counters[kind]
        if n <= LOUD_SKIPS or n % QUIET_EVERY == 0:
            log.warning("generation actor %d %s a call of %d prompts (%s: %s); skipped them%s", idx,
                        "refused" if isinstance(error, PromptsRefused) else "failed", len(seqs),
                        type(error).__name__, error,
                        f" [{n} such calls so far; logging one in {QUIET_EVERY}]" if n >= LOUD_SKIPS else "")
        self.stream.resolve(seqs)
        await self.buffer.release(len(seqs))
        self.skipped_in_a_row += len(seqs)
        if self.skipped_in_a_row >= len(self.stream.prompts) and not self.fatal:
            kinds = ", ".join(f"{k} {v}" for k, v in sorted(self.counters.items())
                              if k == "refused_calls" or k.startswith("generate_errors/"))
            self.fatal = (f"the last {self.skipped_in_a_row} prompts in a row (the dataset holds "
                          f"{len(self.stream.prompts)}) were refused or failed in generation, none generated "
                          f"({kinds}; the last: {type(error).__name__}: {error}); fix the data or the engine settings "
                          "named in the warnings above")
            log.error("%s", self.fatal)

    async def _score_and_put(self, group: RolloutGroup) -> None:
        try:
            scored = await self.scorer.score(group)
        except Exception as e:  # noqa: BLE001 -- the scorer failed outright (not a judge fallback): regenerate
            self.counters["score_errors"] += 1
            log.warning("scoring group of prompt %s failed (%s: %s); requeued it", group.prompt.id,
                        type(e).__name__, e)
            self.stream.requeue([group.seq])
            await self.buffer.release(1)
            return
        if self.settings.drop_uniform_groups and len(set(scored.totals().tolist())) == 1:
            self.counters["dropped_uniform"] += 1
            self.stream.resolve([group.seq])
            await self.buffer.release(1)
            return
        self.recent.append(scored)
        self.num_scored += 1
        if not await self.buffer.put(scored):
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
            if isinstance(task.exception(), PeerLost) and not self.fatal:  # e.g. the buffer died under a put
                self.fatal = f"{task.exception()}; the run stops"
