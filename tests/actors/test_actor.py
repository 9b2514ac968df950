"""The generation actor (actors/actor.py) in this process, around a fake engine at the `core.seams.Engine`
seam: weights received in the sync lane apply at the next generate call (the safe point), every call
gets its own seed, the counters cover what was done since they were last read."""

import threading

import numpy as np

from actors.actor import GenerationActor
from core.records import (
    Prompt,
    Rollout,
    RolloutGroup,
    Sampling,
    WeightGroupSpec,
    WeightManifest,
)
from core.seams import WeightReceiver

SAMPLING = Sampling(n=2, temperature=1.0, top_p=1.0, max_new_tokens=4, seed=7)


class FakeEngine:
    def __init__(self):
        self.version, self.staged, self.seeds, self.joined = 0, None, [], []
        self.sync_ranks = 1

    def generate(self, prompts, *, sampling, actor_id):
        self.seeds.append(sampling.seed)
        rollout = Rollout(np.zeros(3, np.int32), np.zeros(3, np.float32), "x", "stop", self.version, self.version)
        return [RolloutGroup(p, np.zeros(2, np.int32), (rollout,) * sampling.n, actor_id, 0.0) for p in prompts]

    def join_weight_group(self, spec):
        self.joined.append(spec)

    def receive_weights(self, manifest):
        self.staged = manifest.version

    def apply_staged_weights(self):
        staged, self.staged = self.staged, None
        if staged is None:
            return False
        self.version = staged
        return True

    def weight_samples(self, suffixes):
        return {}


def prompts(n: int) -> list[Prompt]:
    return [Prompt(id=f"p{i}", index=i, problem="<image>x", answer="1", image=b"") for i in range(n)]


def manifest(version: int) -> WeightManifest:
    return WeightManifest(version=version, names=(), shapes=(), dtypes=(), bucket_bytes=1)


def test_weights_apply_at_the_next_generate_call_and_stamp_its_rollouts():
    engine = FakeEngine()
    actor = GenerationActor(actor_id=3, build_engine=lambda: engine, sampling=SAMPLING)
    assert actor.generate(prompts(1))[0].policy_version == 0
    assert actor.receive_weights(manifest(5)) == 5
    assert actor.version() == 0  # staged, not applied: a call in flight keeps its weights
    (group,) = actor.generate(prompts(1))
    assert group.policy_version == 5 and actor.version() == 5
    stats = actor.stats()
    assert (stats.num_groups, stats.num_weight_updates, stats.version, stats.actor_id) == (2, 1, 5, 3)
    assert stats.num_tokens == 2 * 2 * 3
    assert actor.stats().num_groups == 0  # counters restart after each read


def test_every_call_gets_its_own_seed_distinct_across_actors():
    engines = [FakeEngine(), FakeEngine()]
    actors = [GenerationActor(actor_id=i, build_engine=lambda e=e: e, sampling=SAMPLING) for i, e in enumerate(engines)]
    for actor in actors:
        actor.generate(prompts(2))
        actor.generate(prompts(1))
    seeds = engines[0].seeds + engines[1].seeds
    assert len(set(seeds)) == 4
    assert engines[0].seeds[1] - engines[0].seeds[0] == 2  # advanced by the groups already made


def test_join_records_the_group_and_a_fresh_actor_has_none():
    engine = FakeEngine()
    actor: WeightReceiver = GenerationActor(actor_id=0, build_engine=lambda: engine, sampling=SAMPLING)
    assert actor.weight_group_port() == 0 and actor.sync_ranks() == 1
    actor.join_weight_group(WeightGroupSpec("127.0.0.1", 29999, 1, 2, "gloo", 5.0))
    assert actor.weight_group_port() == 29999 and engine.joined[0].rank == 1


def test_generate_and_receive_run_concurrently():
    """The sync lane does not wait for a generate call: a receive completes while generate is blocked."""
    release, entered = threading.Event(), threading.Event()

    class SlowEngine(FakeEngine):
        def generate(self, prompts, *, sampling, actor_id):
            entered.set()
            assert release.wait(10)
            return super().generate(prompts, sampling=sampling, actor_id=actor_id)

    actor = GenerationActor(actor_id=0, build_engine=SlowEngine, sampling=SAMPLING)
    worker = threading.Thread(target=actor.generate, args=(prompts(1),))
    worker.start()
    assert entered.wait(10)
    assert actor.receive_weights(manifest(1)) == 1  # returns while generate is still running
    release.set()
    worker.join(10)
    assert actor.generate(prompts(1))[0].policy_version == 1


def test_stream_yields_each_group_as_the_engine_finishes_it_counted_once():
    """`stream` passes the engine's (index, group) pairs through in completion order, applies staged weights
    at the call's start (the safe point) and counts each group once."""

    class StreamingEngine(FakeEngine):
        def stream(self, prompts, *, sampling, actor_id):
            groups = self.generate(prompts, sampling=sampling, actor_id=actor_id)
            yield from reversed(list(enumerate(groups)))  # the last prompt finished first

    actor = GenerationActor(actor_id=0, build_engine=StreamingEngine, sampling=SAMPLING)
    actor.receive_weights(manifest(2))
    out = list(actor.stream(prompts(3)))
    assert [i for i, _ in out] == [2, 1, 0] and [g.prompt.id for _, g in out] == ["p2", "p1", "p0"]
    assert {g.policy_version for _, g in out} == {2}
    stats = actor.stats()
    assert (stats.num_groups, stats.num_weight_updates, stats.num_tokens) == (3, 1, 3 * 2 * 3)


def test_sampled_logprobs_read_vllm_flat_and_per_position_forms():
    """vLLM's flat logprobs (one entry per position with `logprobs=0`) and its per-position dicts give the
    same sampled-token logprobs."""
    from types import SimpleNamespace

    from core.vllm_compat import sampled_logprobs

    ids = [5, 9, 5]
    flat = SimpleNamespace(token_ids=[5, 9, 5], logprobs=[-0.5, -1.25, -2.0])
    per_position = [{5: SimpleNamespace(logprob=-0.5)}, {9: SimpleNamespace(logprob=-1.25), 3: SimpleNamespace(logprob=-9.0)},
                    {5: SimpleNamespace(logprob=-2.0)}]
    assert sampled_logprobs(flat, ids) == sampled_logprobs(per_position, ids) == [-0.5, -1.25, -2.0]
