"""Property test of the buffer's rules with simulated generators of random speeds and a simulated
learner: thousands of steps, never a group over max_staleness, never one lost silently, never one
trained twice; max_staleness 0 trains only fresh groups."""

import random

import pytest

from replay.buffer import BufferCore, EntryMeta


def simulate(*, seed: int, max_staleness: int, k: int, num_actors: int, interval: int, max_groups: int,
             num_steps: int) -> tuple[BufferCore, dict]:
    rng = random.Random(seed)
    core = BufferCore(max_staleness=max_staleness, groups_per_step=k, max_groups=max_groups, max_bytes=1 << 30)
    actor_busy = [None] * num_actors  # (finish_time, seq, version)
    learner = {"version": 0, "synced": 0, "busy_until": None, "batch": None}
    status: dict[int, str] = {}
    trained: list[int] = []
    now, next_seq = 0.0, 0
    speeds = [rng.uniform(0.2, 3.0) for _ in range(num_actors)]
    while learner["version"] < num_steps:
        now += rng.expovariate(5.0)
        for i in rng.sample(range(num_actors), num_actors):  # generators, random order
            job = actor_busy[i]
            if job and job[0] <= now:
                _, seq, version = job
                admitted = core.put(f"ref{seq}", EntryMeta(prompt_id=str(seq), seq=seq, policy_version=version, nbytes=10))
                status[seq] = "buffered" if admitted else "evicted"
                actor_busy[i] = None
            if actor_busy[i] is None and core.can_reserve(1):
                core.reserve(1)
                actor_busy[i] = (now + rng.expovariate(1.0 / speeds[i]), next_seq, core.synced_version)
                status[next_seq] = "reserved"
                next_seq += 1
        if learner["busy_until"] is not None and learner["busy_until"] <= now:
            learner["version"] += 1
            if learner["version"] % interval == 0:
                learner["synced"] = learner["version"]
            core.publish_version(learner_version=learner["version"], synced_version=learner["synced"])
            learner["busy_until"] = None
        if learner["busy_until"] is None and learner["version"] < num_steps and core.can_take(k):
            for ref, meta, staleness in core.take(k):
                assert staleness <= max_staleness
                assert status[meta.seq] == "buffered", f"seq {meta.seq} taken while {status[meta.seq]}"
                status[meta.seq] = "trained"
                trained.append(meta.seq)
            learner["busy_until"] = now + rng.uniform(0.1, 4.0)
        for seq in core.evicted_seqs:
            status[seq] = "evicted"
        core.evicted_seqs.clear()
    return core, {"status": status, "trained": trained}


@pytest.mark.parametrize("max_staleness,k,interval", [(0, 1, 1), (0, 3, 1), (1, 2, 1), (1, 2, 2), (2, 3, 3), (3, 1, 2)])
def test_staleness_bound_and_no_group_lost_or_trained_twice(max_staleness, k, interval):
    for seed in range(5):
        core, out = simulate(seed=seed, max_staleness=max_staleness, k=k, num_actors=3, interval=interval,
                             max_groups=max(k, 6), num_steps=400)
        status, trained = out["status"], out["trained"]
        assert len(trained) == len(set(trained)), "a group was trained twice"
        counts = {s: list(status.values()).count(s) for s in ("trained", "evicted", "buffered", "reserved")}
        assert sum(counts.values()) == len(status), "a group ended in an unknown state"
        # the buffer's own counters agree with the ledger: nothing vanished
        assert core.num_taken == counts["trained"]
        assert core.num_evicted == counts["evicted"]
        assert len(core.entries) == counts["buffered"]
        assert core.reserved == counts["reserved"]
        assert max(core.taken_staleness) <= max_staleness
        assert core.num_taken == 400 * k


def test_zero_staleness_is_synchronous():
    core, out = simulate(seed=7, max_staleness=0, k=4, num_actors=4, interval=1, max_groups=8, num_steps=300)
    assert set(core.taken_staleness) == {0}
    assert core.num_evicted == 0  # the reservation window never lets a group go stale


def test_backpressure_when_full():
    core = BufferCore(max_staleness=5, groups_per_step=2, max_groups=3, max_bytes=1 << 30)
    for seq in range(3):
        core.reserve(1)
        core.put(seq, EntryMeta(prompt_id=str(seq), seq=seq, policy_version=0, nbytes=1))
    assert not core.can_reserve(1)  # full: producers wait
    core.take(2)
    assert core.can_reserve(1)  # take() frees room


def test_bytes_bound():
    core = BufferCore(max_staleness=5, groups_per_step=1, max_groups=100, max_bytes=100)
    core.reserve(1)
    core.put("a", EntryMeta(prompt_id="a", seq=0, policy_version=0, nbytes=150))
    assert not core.can_reserve(1)


def test_stale_groups_evicted_and_counted():
    core = BufferCore(max_staleness=1, groups_per_step=1, max_groups=10, max_bytes=1 << 30)
    core.reserve(2)
    core.put("a", EntryMeta(prompt_id="a", seq=0, policy_version=0, nbytes=1))
    core.put("b", EntryMeta(prompt_id="b", seq=1, policy_version=0, nbytes=1))
    core.publish_version(learner_version=2, synced_version=2)
    assert not core.can_take(1)
    assert core.num_evicted == 2 and core.evicted_seqs == [0, 1] and core.bytes == 0


def test_resumed_buffer_waits_for_first_publish():
    core = BufferCore(max_staleness=1, groups_per_step=2, max_groups=10, max_bytes=1 << 30, initial_version=5)
    assert not core.can_reserve(1)  # actors still hold the initial weights
    core.publish_version(learner_version=5, synced_version=5)
    assert core.can_reserve(4) and not core.can_reserve(5)  # window: (0 + 1 + 1) * 2 groups


def test_learner_restart_rewinds_versions_and_evicts_groups_of_lost_weights():
    core = BufferCore(max_staleness=1, groups_per_step=2, max_groups=10, max_bytes=1 << 30)
    core.publish_version(learner_version=5, synced_version=5)
    core.reserve(3)
    for seq, version in [(0, 4), (1, 5), (2, 5)]:
        core.put(seq, EntryMeta(prompt_id=str(seq), seq=seq, policy_version=version, nbytes=1))
    core.take(2)
    core.publish_version(learner_version=4, synced_version=4)  # restarted from the checkpoint at 4
    assert core.learner_version == 4 and core.evicted_seqs == [2]  # made by version-5 weights, now lost
    assert core.can_reserve(4) and not core.can_reserve(5)  # a fresh window from version 4


def test_learner_restart_at_the_same_version_returns_its_taken_batch_as_lost():
    core = BufferCore(max_staleness=1, groups_per_step=2, max_groups=10, max_bytes=1 << 30)
    core.learner_started(0)
    assert core.lost_seqs == []  # a first start loses nothing
    core.reserve(4)
    for seq in range(4):
        core.put(seq, EntryMeta(prompt_id=str(seq), seq=seq, policy_version=0, nbytes=1))
    core.take(2)
    core.publish_version(learner_version=1, synced_version=1)
    core.take(2)  # the learner dies training this batch; its newest checkpoint is version 1
    core.learner_started(1)
    assert core.lost_seqs == [2, 3] and core.learner_version == 1
    assert core.can_reserve(4) and not core.can_reserve(5)  # a fresh window from version 1
