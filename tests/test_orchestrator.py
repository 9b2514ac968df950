"""The driver's loop (perception_r1/orchestrator.py and session.py) without Ray: in-process fakes at the
seams of core/seams.py, the real replay buffer (its asyncio class, in this process) and a fake learner that
takes batches, publishes versions and reports as the real one does. Each case checks the run's outcome
and its ledger: every stream position ends trained at most once, and the counters say what happened."""

import asyncio
from pathlib import Path

import pytest
from driver_fakes import K, N, FakeGenerator, FakeScorer, _group, run_session, trained_ids

from core.records import Prompt
from perception_r1.stream import PromptStream


def test_every_prompt_is_trained_once_and_each_step_logged(tmp_path):
    session, ledger, stream, sink = run_session(tmp_path, generators=lambda v: [FakeGenerator(0, v), FakeGenerator(1, v)])
    seqs = [s for line in ledger for s in line["seqs"]]
    assert len(ledger) == 6 and len(seqs) == 12 and len(set(seqs)) == 12
    assert session.steps_logged == 6 and session.version == 6 and [step for step, _ in sink.rows] == list(range(6))
    assert not set(seqs) & stream.outstanding  # trained seqs are resolved
    assert dict(session.counters()) == {}


def test_an_actor_dying_mid_call_requeues_its_prompts(tmp_path):
    session, ledger, stream, _ = run_session(
        tmp_path, generators=lambda v: [FakeGenerator(0, v, die_on_calls={2}), FakeGenerator(1, v)])
    seqs = [s for line in ledger for s in line["seqs"]]
    assert session.counters()["lost_in_flight"] == 1
    assert len(seqs) == len(set(seqs)) == 12  # the lost prompt is trained once, later
    assert sorted(seqs)[:3] == [0, 1, 2]  # none skipped: the lost one came back


@pytest.mark.reliability(fault="a generation actor dies after streaming back part of a call",
                         outcome="the groups it returned are trained; only the others are requeued, each trained once")
def test_an_actor_dying_mid_stream_requeues_only_the_groups_it_had_not_returned(tmp_path):
    """Calls of 3 prompts stream their groups one by one; the second call's actor dies after returning one:
    that group is scored and trained, the other two are requeued (and trained later, once)."""
    session, ledger, _, _ = run_session(tmp_path, generators=lambda v: [FakeGenerator(0, v, die_after_groups={2: 1})],
                                        prompts_per_call=3, num_steps=8)
    assert session.counters()["lost_in_flight"] == 2
    seqs = [s for line in ledger for s in line["seqs"]]
    assert len(seqs) == len(set(seqs)) == 16
    assert {3, 4, 5} <= set(seqs)  # the second call's three prompts: one returned, two requeued


@pytest.mark.parametrize("target_prompts", [1, 3])
def test_the_dispatcher_keeps_each_actor_at_its_target_of_sequences_in_flight(tmp_path, target_prompts):
    """inflight_sequences_per_actor counts sequences (prompts x samples): with room in the buffer for 8
    prompts, the actor holds exactly the target's prompts at its busiest, never more."""
    gens = []

    def generators(v):
        gens.append(FakeGenerator(0, v))
        return gens

    session, ledger, _, _ = run_session(tmp_path, generators=generators, max_staleness=3,
                                        inflight_sequences=target_prompts * N)
    assert len(ledger) == 6 and gens[0].max_inflight == target_prompts


def test_a_refused_prompt_is_skipped_counted_and_its_reservation_released(tmp_path):
    session, ledger, stream, _ = run_session(
        tmp_path, generators=lambda v: [FakeGenerator(0, v, refuse={"p1", "p4"})], num_steps=8)
    assert session.counters()["skipped_prompts"] == 2
    assert not {"p1", "p4"} & set(trained_ids(ledger))
    assert len(ledger) == 8  # no stall: the two reservations went back


def test_a_refused_prompt_in_a_batched_call_skips_only_itself(tmp_path):
    """Calls of 2 prompts: the call holding p1 is refused whole, then split; p1 alone is skipped, its
    call-mate is trained."""
    session, ledger, _, _ = run_session(tmp_path, generators=lambda v: [FakeGenerator(0, v, refuse={"p1"})],
                                        prompts_per_call=2)
    assert session.counters()["skipped_prompts"] == 1 and session.counters()["refused_calls_split"] == 1
    trained = trained_ids(ledger)
    assert "p1" not in trained and "p0" in trained and len(ledger) == 6


def test_other_generation_errors_are_released_and_counted_by_kind(tmp_path):
    session, ledger, _, sink = run_session(tmp_path, generators=lambda v: [FakeGenerator(0, v, fail={"p2"})])
    assert session.counters()["generate_errors/TypeError"] == 1 and session.counters()["skipped_prompts"] == 1
    assert "p2" not in trained_ids(ledger) and len(ledger) == 6
    assert sink.rows[-1][1]["driver/generate_errors/TypeError"] == 1.0


@pytest.mark.parametrize("drop", [True, False])
def test_uniform_groups_are_dropped_only_when_configured(tmp_path, drop):
    session, ledger, _, _ = run_session(tmp_path, generators=lambda v: [FakeGenerator(0, v)],
                                        scorer=FakeScorer(uniform={"p0", "p3"}), drop_uniform=drop)
    trained = set(trained_ids(ledger))
    if drop:
        assert session.counters()["dropped_uniform"] == 2 and not {"p0", "p3"} & trained
    else:
        assert "dropped_uniform" not in session.counters() and {"p0", "p3"} <= trained


def test_groups_from_weights_too_old_are_evicted_never_trained(tmp_path):
    """Actor 1 never takes new weights: its groups are stamped version 0 and are evicted once the learner
    is past version max_staleness; actor 0 keeps the run going."""
    session, ledger, stream, _ = run_session(
        tmp_path, generators=lambda v: [FakeGenerator(0, v), FakeGenerator(1, v, stuck_at=0)], num_steps=8)
    evicted = session.counters()["evicted_at_put"]
    assert evicted > 0 and len(ledger) == 8
    seqs = [s for line in ledger for s in line["seqs"]]
    assert len(seqs) == len(set(seqs))
    assert not set(seqs) & stream.outstanding


def test_a_learner_restart_requeues_the_batch_it_had_taken(tmp_path):
    """The learner takes step 3's batch and dies; Ray Train restarts it from the checkpoint at version 2.
    The untrained batch goes back to the stream and is trained later, once; the restart is counted."""
    session, ledger, stream, _ = run_session(tmp_path, generators=lambda v: [FakeGenerator(0, v)], num_steps=6,
                                             die_at_step=3, restart_from=2)
    assert session.counters()["learner_restarts"] == 1 and session.counters()["lost_with_learner"] == K
    steps = [line["step"] for line in ledger]
    assert steps == [0, 1, 2, 2, 3, 4, 5]  # step 2 again: the update after the checkpoint was lost
    seqs = [s for line in ledger for s in line["seqs"]]
    assert len(seqs) == len(set(seqs))  # no group trained twice
    assert session.version == 6


def test_the_loop_imports_no_ray():
    import subprocess
    import sys

    code = ("import sys; import perception_r1.session, perception_r1.orchestrator, replay.buffer; "
            "sys.exit(1 if any(m == 'ray' or m.startswith('ray.') for m in sys.modules) else 0)")
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1]).returncode == 0


class _LongTailGenerator:
    """Each call's groups come back one by one, the last one much later than the others (a long completion):
    counts the calls open at once."""

    def __init__(self) -> None:
        self.open = self.max_open = 0

    async def stream(self, prompts):
        self.open += 1
        self.max_open = max(self.max_open, self.open)
        try:
            for i, p in enumerate(prompts):
                await asyncio.sleep(0.2 if i == len(prompts) - 1 else 0.001)
                yield i, _group(p, 0, 0, n=N)
        finally:
            self.open -= 1


class _Prompts:
    """A buffer that reserves `total` prompts then closes, and keeps nothing."""

    def __init__(self, total: int) -> None:
        self.left = total

    async def reserve(self, n):
        self.left -= n
        return self.left >= 0

    async def put(self, scored):
        return True


def test_the_actor_admits_every_call_the_dispatcher_can_hold_open():
    """Slots free group by group, so a call with one long group left stays open while new calls go out: the
    actor's concurrency (RolloutConfig.calls_per_actor) must cover one open call per unfinished group, or Ray
    queues calls that vLLM has room for."""
    from core.config_files import parse_config
    from perception_r1.orchestrator import DispatchSettings, Orchestrator

    cfg = parse_config({"rollout": {"samples_per_prompt": N, "prompts_per_call": 4,
                                    "inflight_sequences_per_actor": 16}})
    r, gen = cfg.rollout, _LongTailGenerator()
    prompts = [Prompt(id=f"p{i}", index=i, problem="<image>x", answer="1", image=b"") for i in range(48)]
    settings = DispatchSettings(prompts_per_call=r.prompts_per_call, inflight_sequences_per_actor=r.inflight_target,
                                samples_per_prompt=N, drop_uniform_groups=False)
    orchestrator = Orchestrator(stream=PromptStream(prompts, shuffle_seed=None), generators=[gen],
                                scorer=FakeScorer(), buffer=_Prompts(len(prompts)), settings=settings)

    async def run():
        await orchestrator.run()
        await orchestrator.drain(timeout_s=30)

    asyncio.run(run())
    assert gen.max_open > -(-r.inflight_target // r.sequences_per_call)  # more calls open than the target's full calls
    assert gen.max_open <= r.calls_per_actor - 1  # one is kept for validation
