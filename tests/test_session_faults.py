"""Hostile conditions at the driver's loop, without Ray (fakes of tests/driver_fakes.py): nothing waits
forever, a run that cannot progress says why and stops, a needed actor's death stops the run keeping
what is safe, and metrics-only peers never stop it. Each case is time-bounded (`run_session`'s timeout)."""

import asyncio
import dataclasses
import logging
import time

import msgpack
import pytest
from driver_fakes import K, FakeGenerator, FakeScorer, LocalBuffer, _group, run_session

from core import codec
from core.records import CheckpointWritten, JudgeStats, LearnerFinished, LearnerStarted, LearnerStep, Prompt
from core.seams import PeerLost
from learner.sharded_state import LEARNER_META, UNREPORTED_FILE
from perception_r1.run_checkpoints import read_driver_state
from perception_r1.watchdog import Deadlines, Watchdog

FAST = {"startup_timeout_s": 1.0, "stall_timeout_s": 1.0, "stop_timeout_s": 1.0}


def test_watchdog_rules():
    now = [0.0]
    dog = Watchdog(Deadlines(startup_s=10, stall_s=5, stop_s=3), clock=lambda: now[0])
    now[0] = 9.9
    assert dog.overdue(learner_up=False) == ""
    now[0] = 10.1
    assert dog.overdue(learner_up=False) == "startup"
    dog.progress()
    now[0] = 15.0
    assert dog.overdue(learner_up=True) == ""
    now[0] = 15.2
    assert dog.overdue(learner_up=True) == "stall"
    dog.stopping()
    assert dog.overdue(learner_up=True) == ""  # stopping: only the stop's own deadline counts
    now[0] = 18.3
    assert dog.overdue(learner_up=True) == "stop"


@pytest.mark.reliability(fault="every prompt of the dataset refused by the engine",
                         outcome="the run stops within one pass over the data, naming the cause; warnings rate-limited")
def test_every_prompt_refused_stops_the_run_with_the_cause(tmp_path, caplog):
    ids = {f"p{i}" for i in range(12)}
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="perception_r1"):
        session, ledger, _, _ = run_session(tmp_path, generators=lambda v: [FakeGenerator(0, v, refuse=ids)],
                                            num_prompts=12, timeout_s=20)
    assert time.monotonic() - started < 20
    assert "were refused or failed in generation" in session.fatal and "over data.max_prompt_tokens" in session.fatal
    assert ledger == [] and session.counters()["skipped_prompts"] >= 12
    skips = [r for r in caplog.records if "skipped them" in r.getMessage()]
    assert len(skips) <= 6  # 5 loud, then one in a hundred


def test_errors_of_every_kind_in_a_row_also_stop_the_run(tmp_path):
    ids = {f"p{i}" for i in range(8)}
    session, _, _, _ = run_session(tmp_path, generators=lambda v: [FakeGenerator(0, v, fail=ids)], num_prompts=8)
    assert "TypeError" in session.fatal and "generate_errors/TypeError" in session.fatal


def test_some_refused_prompts_do_not_stop_the_run(tmp_path):
    session, ledger, _, _ = run_session(tmp_path, generators=lambda v: [FakeGenerator(0, v, refuse={"p0", "p1", "p2"})],
                                        num_prompts=8, num_steps=8)
    assert not session.fatal and len(ledger) == 8


async def never_starts(buffer, reports, versions):
    await asyncio.sleep(3600)


@pytest.mark.reliability(fault="the learner never comes up (resources it cannot get, a hung model load)",
                         outcome="the run stops at run.startup_timeout_s naming the cause")
def test_a_learner_that_never_starts_is_a_named_failure(tmp_path):
    started = time.monotonic()
    session, _, _, _ = run_session(tmp_path, generators=lambda v: [FakeGenerator(0, v)], learner=never_starts,
                                   run=FAST, timeout_s=10)
    assert "did not come up within run.startup_timeout_s=1s" in session.fatal
    assert time.monotonic() - started < 5


async def stalls_after_start(buffer, reports, versions):
    await buffer.learner_started(0)
    reports.put(LearnerStarted(version=0))
    await asyncio.sleep(3600)  # never takes a batch, never reports


@pytest.mark.reliability(fault="no learner step for longer than run.stall_timeout_s",
                         outcome="the watchdog stops the run naming what it saw")
def test_a_stalled_learner_trips_the_watchdog(tmp_path):
    session, _, _, _ = run_session(tmp_path, generators=lambda v: [FakeGenerator(0, v)], learner=stalls_after_start,
                                   run=FAST, timeout_s=10)
    assert session.fatal.startswith("no learner step for") and "run.stall_timeout_s" in session.fatal
    assert "the learner did not end within run.stop_timeout_s" not in session.fatal  # the first cause is kept


class HangingGenerator(FakeGenerator):
    async def generate(self, prompts):
        await asyncio.sleep(3600)


def test_a_stalled_generation_actor_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr("perception_r1.session.DRAIN_S", 1.0)  # the hung call is cancelled after 1 s, not 10
    session, _, _, _ = run_session(tmp_path, generators=lambda v: [HangingGenerator(0, v)], learner=stalls_after_start,
                                   run=FAST, timeout_s=20)
    assert "generation actor 0 has had a call in flight" in session.fatal


@pytest.mark.reliability(fault="SIGINT/SIGTERM before the learner is up (start-up, resume re-admission)",
                         outcome="the run ends at once: nothing to save, nothing trained")
def test_a_stop_before_the_learner_is_up_ends_at_once(tmp_path):
    async def stop_soon(session):
        await asyncio.sleep(0.3)
        session.request_stop()

    started = time.monotonic()
    scored = _scored_groups(2)  # a resume's re-admitted groups: reserve() waits for the learner
    session, ledger, _, _ = run_session(tmp_path / "run", generators=lambda v: [FakeGenerator(0, v)],
                                        learner=never_starts, during=stop_soon, buffered=scored, timeout_s=10)
    assert session.stop_requested and not session.fatal and ledger == []
    assert time.monotonic() - started < 3


async def ignores_the_stop(buffer, reports, versions):
    await buffer.learner_started(0)
    reports.put(LearnerStarted(version=0))
    await asyncio.sleep(3600)


def test_a_learner_that_does_not_end_after_a_stop_is_given_up_on(tmp_path):
    async def stop_soon(session):
        await asyncio.sleep(0.3)
        session.request_stop()

    session, _, _, _ = run_session(tmp_path, generators=lambda v: [FakeGenerator(0, v)], learner=ignores_the_stop,
                                   during=stop_soon, run={**FAST, "stall_timeout_s": 60}, timeout_s=10)
    assert "did not end within run.stop_timeout_s=1s" in session.fatal


class DyingBuffer(LocalBuffer):
    """The driver's view of a buffer actor that dies after `calls` calls."""

    calls = 60

    def __getattribute__(self, name):
        attr = super().__getattribute__(name)
        if name in {"reserve", "release", "put", "close", "stats", "pop_evicted_seqs", "pop_lost_seqs", "buffered"}:
            async def call(*args, **kwargs):
                type(self).calls -= 1
                if type(self).calls < 0:
                    raise PeerLost(PeerLost.BUFFER, "RayActorError")
                return await attr(*args, **kwargs)
            return call
        return attr


@pytest.mark.reliability(fault="the replay buffer actor dies (driver side)",
                         outcome="the run stops with the cause named; no traceback, no hang")
def test_the_buffer_dying_stops_the_run_naming_it(tmp_path):
    session, ledger, _, _ = run_session(tmp_path, generators=lambda v: [FakeGenerator(0, v)], num_steps=40,
                                        buffer_view=DyingBuffer, run=FAST, timeout_s=15)
    assert session.fatal.startswith("the replay buffer actor died (RayActorError)")
    seqs = [s for line in ledger for s in line["seqs"]]
    assert len(seqs) == len(set(seqs)) and len(ledger) < 40


class FailingStats(FakeScorer):
    async def stats(self) -> JudgeStats:
        raise RuntimeError("the actor is dead because it was killed by `ray.kill`")


@pytest.mark.reliability(fault="the judge's statistics board dies (metrics only)",
                         outcome="training goes on; the step's judge metrics are the last known, counted")
def test_judge_statistics_failing_never_stops_the_run(tmp_path):
    session, ledger, _, sink = run_session(tmp_path, generators=lambda v: [FakeGenerator(0, v)], scorer=FailingStats())
    assert not session.fatal and len(ledger) == 6
    assert session.counters()["judge_stats_unavailable"] == 6


def _scored_groups(n):
    """n scored groups, as a checkpoint's buffer would hold them for re-admission."""
    prompts = [Prompt(id=f"b{i}", index=100 + i, problem="<image>x", answer="1", image=b"") for i in range(n)]
    return [asyncio.run(FakeScorer().score(dataclasses.replace(_group(p, 0, 0), seq=seq)))
            for seq, p in enumerate(prompts)]


def lost_queue_learner(tmp_path, *, deliver: int):
    """A learner whose report queue dies after `deliver` steps: it stops at once and leaves the checkpoint
    of its last step with the report it could not deliver, as learner/worker.py does."""

    async def learn(buffer, reports, versions):
        await buffer.learner_started(0)
        reports.put(LearnerStarted(version=0))
        version, undelivered = 0, []
        while True:
            taken = await buffer.take(K)
            version += 1
            versions.synced = version
            await buffer.publish_version(version, version)
            report = LearnerStep(step=version - 1, version=version, metrics={"learner/loss": 0.0},
                                 seqs=tuple(refs[0].group.seq for refs, _, _ in taken))
            if version <= deliver:
                reports.put(report)
                continue
            reports.lost = True
            undelivered.append(report)
            break
        tmp = tmp_path / "checkpoints" / f"step_{version:06d}.tmp"
        (tmp / "learner").mkdir(parents=True)
        (tmp / "learner" / ".metadata").write_bytes(b"x")
        (tmp / LEARNER_META).write_text('{"version": %d}' % version)
        (tmp / UNREPORTED_FILE).write_bytes(msgpack.packb([codec.encode(r) for r in undelivered]))

    return learn


class LosableReports:
    """The queue's driver end dies once the learner marks it lost."""

    lost = False

    def __init__(self, inner):
        self.inner = inner

    def put(self, report):
        self.inner.put(report)

    async def get(self, *, timeout_s):
        if self.lost:
            raise PeerLost(PeerLost.REPORTS, "RayActorError")
        return await self.inner.get(timeout_s=timeout_s)

    async def empty(self):
        if self.lost:
            raise PeerLost(PeerLost.REPORTS, "RayActorError")
        return await self.inner.empty()


@pytest.mark.reliability(fault="the learner's report queue actor dies",
                         outcome="the learner stops and checkpoints with its undelivered reports; the driver "
                                 "logs them and completes that checkpoint; run stops naming the cause")
def test_a_lost_report_queue_is_salvaged_into_a_complete_checkpoint(tmp_path, monkeypatch):
    import driver_fakes

    monkeypatch.setattr(driver_fakes, "QueueReports", _losable(driver_fakes.QueueReports))
    session, ledger, _, _ = run_session(tmp_path, generators=lambda v: [FakeGenerator(0, v)], num_steps=40,
                                        learner=lost_queue_learner(tmp_path, deliver=3), run=FAST, timeout_s=15)
    assert session.fatal.startswith("the report queue actor died")
    assert [line["step"] for line in ledger] == [0, 1, 2, 3]  # step 3 came from the salvaged reports
    final = tmp_path / "checkpoints" / "step_000004"
    assert final.is_dir() and not (tmp_path / "checkpoints" / "step_000004.tmp").exists()
    state = read_driver_state(final)
    trained = {s for line in ledger for s in line["seqs"]}
    assert state.version == 4 and not trained & set(state.stream.pending)


def _losable(queue_class):
    class Reports(LosableReports):
        def __init__(self):
            super().__init__(queue_class())

    return Reports


def test_learner_finished_report_still_ends_a_normal_run(tmp_path):
    """Control: with no fault, the new machinery changes nothing (the run ends at its step budget)."""
    session, ledger, _, _ = run_session(tmp_path, generators=lambda v: [FakeGenerator(0, v)], run=FAST)
    assert not session.fatal and len(ledger) == 6 and session.version == 6


def background_checkpoint_learner(tmp_path, *, every: int, num_steps: int):
    """A learner whose checkpoints are written in the background, as learner/worker.py does: the step that
    snapshots names the .tmp folder; CheckpointWritten follows a step later (the last one before LearnerFinished)."""

    async def learn(buffer, reports, versions):
        await buffer.learner_started(0)
        reports.put(LearnerStarted(version=0))
        version, in_flight = 0, None
        while version < num_steps:
            taken = await buffer.take(K)
            version += 1
            versions.synced = version
            await buffer.publish_version(version, version)
            if in_flight is not None:  # written while this step trained
                reports.put(in_flight)
                in_flight = None
            tmp = ""
            if version % every == 0:
                tmp = tmp_path / "checkpoints" / f"step_{version:06d}.tmp"
                (tmp / "learner").mkdir(parents=True)
                (tmp / "learner" / ".metadata").write_bytes(b"x")
                (tmp / LEARNER_META).write_text('{"version": %d}' % version)
                in_flight = CheckpointWritten(version=version, path=str(tmp), seconds=0.1, nbytes=2)
            reports.put(LearnerStep(step=version - 1, version=version, metrics={"learner/loss": 0.0},
                                    seqs=tuple(refs[0].group.seq for refs, _, _ in taken), checkpoint_path=str(tmp)))
        if in_flight is not None:  # shutdown waits for the write in flight
            reports.put(in_flight)
        reports.put(LearnerFinished(version=version))

    return learn


def test_background_checkpoints_are_completed_with_the_state_of_their_step(tmp_path, caplog):
    """The driver completes a checkpoint when it is written (steps later), storing its state as of the step
    that took the snapshot: a resume from it neither skips nor retrains a prompt; checkpoint.keep holds."""
    caplog.set_level(logging.INFO, logger="perception_r1")
    session, ledger, _, _ = run_session(tmp_path, generators=lambda v: [FakeGenerator(0, v)], num_steps=6,
                                        learner=background_checkpoint_learner(tmp_path, every=2, num_steps=6),
                                        run={"num_steps": 6}, timeout_s=15)
    assert not session.fatal and len(ledger) == 6 and not session.pending_checkpoints
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step_000002", "step_000004", "step_000006"]
    for path in root.iterdir():
        state = read_driver_state(path)
        version = int(path.name.removeprefix("step_"))
        assert state.version == version
        trained = {s for line in ledger if line["version"] <= version for s in line["seqs"]}
        later = {s for line in ledger if line["version"] > version for s in line["seqs"]}
        assert not trained & set(state.stream.pending) and all(s < state.stream.next_seq for s in trained)
        assert all(s in state.stream.pending or s >= state.stream.next_seq for s in later)  # none skipped
    assert "written in the background, 0.00 GiB in 0.1s" in caplog.text


def test_background_checkpoints_honour_keep(tmp_path):
    session, ledger, _, _ = run_session(tmp_path, generators=lambda v: [FakeGenerator(0, v)], num_steps=8,
                                        learner=background_checkpoint_learner(tmp_path, every=1, num_steps=8),
                                        run={"num_steps": 8}, timeout_s=15)
    assert not session.fatal and len(ledger) == 8
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step_000006", "step_000007", "step_000008"]  # checkpoint.keep = 3
