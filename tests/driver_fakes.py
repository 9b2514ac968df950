"""In-process fakes at the driver's seams (core/seams.py) for the tests of the driver's loop
(perception_r1/orchestrator.py, session.py): generators, a scorer, the real replay buffer in this process,
a report queue, a learner that takes batches, publishes versions and reports as the real one does, and
`run_session`, which runs a Session against them and returns what it did."""

import asyncio
import json
from pathlib import Path

import numpy as np

from core.config_files import parse_config
from core.records import (
    GenerationStats,
    JudgeStats,
    LearnerFinished,
    LearnerStarted,
    LearnerStep,
    Prompt,
    RewardBreakdown,
    Rollout,
    RolloutGroup,
    ScoredGroup,
)
from core.seams import GeneratorLost, PromptsRefused
from perception_r1.session import Session
from perception_r1.stream import PromptStream
from perception_r1.validation import split
from replay.buffer import ReplayBuffer, entry_meta

N = 2  # rollouts per prompt
K = 2  # groups per step


class FakeGenerator:
    """Groups stamped with the weights' version the fake actor holds; faults scripted by call or prompt id."""

    def __init__(self, actor_id: int, versions, *, die_on_calls=(), refuse=(), fail=(), stuck_at: int | None = None,
                 die_after_groups: dict[int, int] | None = None):
        self.actor_id, self.versions = actor_id, versions
        self.die_on_calls, self.refuse, self.fail, self.stuck_at = set(die_on_calls), set(refuse), set(fail), stuck_at
        self.die_after_groups = die_after_groups or {}
        """call number -> groups the call streams back before the actor dies."""
        self.calls = 0
        self.max_inflight = self.inflight = 0
        """Prompts in this actor's calls at once (the most, and now)."""
        self.validation_calls: list[tuple[list[str], int]] = []
        """(prompt ids, version) of each call with its own sampling (validation's greedy decoding)."""

    async def generate(self, prompts, *, sampling=None):
        self.calls += 1
        call = self.calls
        await asyncio.sleep(0.001)
        ids = {p.id for p in prompts}
        if call in self.die_on_calls:
            raise GeneratorLost("RayActorError")
        if ids & self.refuse:
            raise PromptsRefused(f"prompt {sorted(ids & self.refuse)[0]} is over data.max_prompt_tokens")
        if ids & self.fail:
            raise TypeError("a tokenizer choked on the text")
        version = self.versions.synced if self.stuck_at is None else self.stuck_at
        if sampling is not None:
            self.validation_calls.append(([p.id for p in prompts], version))
        return [_group(p, version, self.actor_id, n=sampling.n if sampling else N) for p in prompts]

    async def stream(self, prompts):
        """`generate`'s groups, last prompt first (completion order is not prompt order), one at a time."""
        remaining = len(prompts)
        self.inflight += remaining
        self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            groups = await self.generate(prompts)
            dies_after = self.die_after_groups.get(self.calls)
            for done, i in enumerate(reversed(range(len(groups)))):
                if done == dies_after:
                    raise GeneratorLost("RayActorError")
                await asyncio.sleep(0.001)
                remaining -= 1
                self.inflight -= 1
                yield i, groups[i]
        finally:
            self.inflight -= remaining

    async def stats(self) -> GenerationStats:
        return GenerationStats(actor_id=self.actor_id, num_groups=0, num_tokens=0, busy_seconds=0.0, version=0)


class FakeScorer:
    """Reward 1 for even rollouts and 0 for odd ones, or all 1 for the prompts in `uniform`."""

    def __init__(self, *, uniform=()):
        self.uniform = set(uniform)

    async def score(self, group: RolloutGroup) -> ScoredGroup:
        flat = group.prompt.id in self.uniform
        totals = [1.0 if flat or i % 2 == 0 else 0.0 for i in range(len(group.rollouts))]
        rewards = tuple(RewardBreakdown(accuracy=t, format=1.0, repetition=0.0, visual=0.0, total=t, overall=t)
                        for t in totals)
        return ScoredGroup(group=group, rewards=rewards, judge_seconds=0.0)

    async def stats(self) -> JudgeStats:
        return JudgeStats()


class LocalBuffer:
    """The real ReplayBuffer in this process, as the driver's `core.seams.Buffer` (groups stand for their refs)."""

    def __init__(self, buffer: ReplayBuffer):
        self.b = buffer

    async def reserve(self, n):
        return await self.b.reserve(n)

    async def release(self, n):
        await self.b.release(n)

    async def put(self, scored):
        return await self.b.put([scored], entry_meta(scored))

    async def close(self):
        await self.b.close()

    async def stats(self):
        return self.b.stats()

    async def validated(self, version):
        await self.b.validated(version)

    async def pop_evicted_seqs(self):
        return self.b.pop_evicted_seqs()

    async def pop_lost_seqs(self):
        return self.b.pop_lost_seqs()

    async def buffered(self):
        return [refs[0] for refs, _ in self.b.buffered_refs()]


class QueueReports:
    """The report queue as a `core.seams.ReportSource` (the fake learner puts, the session gets)."""

    def __init__(self):
        self.q: asyncio.Queue = asyncio.Queue()

    def put(self, report):
        self.q.put_nowait(report)

    async def get(self, *, timeout_s):
        """Waits at most 20 ms, whatever the session asks: the session polls again at once, and a test's run
        ends that much sooner after its learner (the session's own 0.5 s would add that to every test)."""
        try:
            return await asyncio.wait_for(self.q.get(), min(timeout_s, 0.02))
        except asyncio.TimeoutError:
            return None

    async def empty(self):
        return self.q.empty()


class Versions:
    synced = 0


class RecordingSink:
    def __init__(self):
        self.rows: list[tuple[int, dict]] = []

    def log_metrics(self, step, metrics):
        self.rows.append((step, metrics))

    def log_dict(self, data, *, artifact_file):
        pass

    def log_table(self, table, *, artifact_file):
        pass

    def log_checkpoint(self, path, *, version):
        pass

    def close(self, *, status):
        pass


async def fake_learner(buffer: ReplayBuffer, reports: QueueReports, versions: Versions, *, num_steps: int,
                       die_at_step: int | None = None, restart_from: int = 0) -> None:
    """Takes K groups per step, 'trains', publishes the version (the actors hold it at once) and reports.
    With die_at_step, it takes that step's batch and dies; the restarted one starts from `restart_from`."""
    version = 0
    for life in range(2 if die_at_step is not None else 1):
        version = restart_from if life else 0
        await buffer.learner_started(version)
        versions.synced = version
        reports.put(LearnerStarted(version=version))
        while version < num_steps:
            taken = await buffer.take(K)
            if taken is None:
                reports.put(LearnerFinished(version=version))
                return
            if life == 0 and version == die_at_step:
                break  # died holding the batch it took
            await asyncio.sleep(0.002)
            version += 1
            versions.synced = version
            await buffer.publish_version(version, version)
            reports.put(LearnerStep(step=version - 1, version=version, metrics={"learner/loss": 0.0},
                                    seqs=tuple(refs[0].group.seq for refs, _, _ in taken)))
    reports.put(LearnerFinished(version=version))


def run_session(tmp_path: Path, *, generators, scorer=None, num_steps=6, max_staleness=1, drop_uniform=False,
                die_at_step=None, restart_from=0, versions=None, num_prompts=40, prompts_per_call=1, run=None,
                learner=None, buffer_view=LocalBuffer, buffered=(), during=None, timeout_s=30.0, validation=None,
                inflight_sequences=None):
    """Run a Session against the fakes. `run`: extra `run.*` config; `learner(buffer, reports, versions)`: a
    learner coroutine in place of `fake_learner`; `buffer_view(buffer)`: the driver's view of the buffer;
    `during(session)`: a coroutine run beside the session (faults, stop requests); `validation`: the
    `validation` section (off unless given), its held-out prompts split off as the driver does;
    `inflight_sequences`: rollout.inflight_sequences_per_actor (two calls' worth unless given)."""
    cfg = parse_config({
        "run": {"num_steps": num_steps, "output_dir": str(tmp_path), **(run or {})},
        "rollout": {"samples_per_prompt": N, "prompts_per_call": prompts_per_call, "inflight_sequences_per_actor": inflight_sequences or 2 * N * prompts_per_call},
        "learner": {"prompts_per_step": K},
        "buffer": {"max_staleness": max_staleness, "max_groups": 8, "drop_uniform_groups": drop_uniform},
        "tracking": {"progress_bar": False, "log_rollouts_every": 0},
        "validation": validation or {"every_steps": 0},
    })
    prompts = [Prompt(id=f"p{i}", index=i, problem=f"<image>x{i}", answer="1", image=b"") for i in range(num_prompts)]
    prompts, held_out = split(prompts, cfg.validation)
    stream = PromptStream(prompts, shuffle_seed=None)
    versions = versions or Versions()
    sink = RecordingSink()

    async def main():
        buffer = ReplayBuffer(max_staleness=max_staleness, groups_per_step=K, max_groups=8, max_bytes=1 << 30,
                              validate_every=cfg.validation.every_steps)
        reports = QueueReports()
        session = Session(cfg, stream=stream, generators=generators(versions), scorer=scorer or FakeScorer(),
                          buffer=buffer_view(buffer), reports=reports, sinks=sink, start_version=0,
                          buffered=list(buffered), ledger=tmp_path / "trained.jsonl",
                          checkpoint_root=tmp_path / "checkpoints", validation_prompts=held_out)
        learn = (learner(buffer, reports, versions) if learner else
                 fake_learner(buffer, reports, versions, num_steps=num_steps, die_at_step=die_at_step,
                              restart_from=restart_from))
        task = asyncio.create_task(learn)
        side = asyncio.create_task(during(session)) if during else None
        await asyncio.wait_for(session.run(learner_alive=lambda: not task.done()), timeout=timeout_s)
        for t in (task, side):
            if t is not None:
                t.cancel()
                await asyncio.gather(t, return_exceptions=True)
        return session

    session = asyncio.run(main())
    path = tmp_path / "trained.jsonl"
    ledger = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    return session, ledger, stream, sink


def trained_ids(ledger) -> list[str]:
    return [pid for line in ledger for pid in line["prompt_ids"]]


def _group(prompt: Prompt, version: int, actor_id: int, n: int = N) -> RolloutGroup:
    rollouts = tuple(Rollout(token_ids=np.arange(3, dtype=np.int32), logprobs=np.zeros(3, np.float32), text=f"r{i}",
                             finish_reason="stop", min_version=version, max_version=version) for i in range(n))
    return RolloutGroup(prompt=prompt, prompt_token_ids=np.arange(4, dtype=np.int32), rollouts=rollouts,
                        actor_id=actor_id, generate_seconds=0.001)
