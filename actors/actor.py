"""The generation actor: one engine behind a Ray actor, with two concurrency groups so a weight
broadcast (`sync` group) is received while a generate call (`generate` group) runs; the new weights
apply at the next safe point, the start of a generate call. Counts what it did for the driver.

The learner calls it as a `core.seams.WeightReceiver`; the driver reaches `generate` and `stats` through
its `Generator` adapter (perception_r1/adapters.py). The engine behind it is a `core.seams.Engine`.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator, Sequence

import ray

from core.records import (
    GenerationStats,
    Prompt,
    RolloutGroup,
    Sampling,
    WeightGroupSpec,
    WeightManifest,
)
from actors.busy import BusyClock
from core.seams import Engine


def remote_class(*, generate_concurrency: int = 1):
    """The actor class with `generate_concurrency` concurrent generate calls (1 for HF; more for vLLM,
    whose engine batches across calls), one sync lane, and a control lane for cheap reads that must answer
    while a sync is stuck (is it alive, which group did it join)."""
    groups = {"generate": generate_concurrency, "sync": 1, "control": 1}
    return ray.remote(num_cpus=0, concurrency_groups=groups)(GenerationActor)


class GenerationActor:
    """Wraps an engine built in the actor's own process by `build_engine()` (a zero-arg callable)."""

    def __init__(self, *, actor_id: int, build_engine, sampling: Sampling) -> None:
        self.actor_id = actor_id
        self.sampling = sampling
        self.engine: Engine = build_engine()
        self.lock = threading.Lock()
        self.group_port = 0
        self.clock = BusyClock()
        self._reset_counters()

    def _reset_counters(self) -> None:
        self.num_groups = self.num_tokens = self.num_updates = 0
        self.apply_s = 0.0

    @ray.method(concurrency_group="generate")
    def generate(self, prompts: Sequence[Prompt], sampling: Sampling | None = None) -> list[RolloutGroup]:
        """Every prompt's group, in order (validation's calls, with their own sampling)."""
        self.clock.enter()
        try:
            groups = self.engine.generate(prompts, sampling=self._call_sampling(sampling, time.perf_counter()),
                                          actor_id=self.actor_id)
        finally:
            self.clock.leave()
        self._count(groups)
        return groups

    @ray.method(concurrency_group="generate")
    def stream(self, prompts: Sequence[Prompt]) -> Iterator[tuple[int, RolloutGroup]]:
        """(index in `prompts`, group) as each group finishes (a Ray streaming generator): a call's slowest
        group holds only its own place in the engine, the dispatcher refills the others as they come back."""
        self.clock.enter()
        try:
            sampling = self._call_sampling(None, time.perf_counter())
            for i, group in self.engine.stream(prompts, sampling=sampling, actor_id=self.actor_id):
                self._count([group])
                yield i, group
        finally:
            self.clock.leave()

    def _call_sampling(self, sampling: Sampling | None, start: float) -> Sampling:
        """Applies staged weights (the safe point) and seeds the call: the actor's sampling unless given."""
        if self.engine.apply_staged_weights():
            self.num_updates += 1
            self.apply_s += time.perf_counter() - start
        sampling = sampling or self.sampling
        call_seed = sampling.seed + 1_000_003 * self.actor_id + self.num_groups
        return Sampling(sampling.n, sampling.temperature, sampling.top_p, sampling.max_new_tokens, call_seed)

    def _count(self, groups: Sequence[RolloutGroup]) -> None:
        with self.lock:
            self.num_groups += len(groups)
            self.num_tokens += sum(g.num_completion_tokens for g in groups)

    @ray.method(concurrency_group="sync")
    def join_weight_group(self, spec: WeightGroupSpec) -> None:
        self.engine.join_weight_group(spec)  # replaces any group joined before
        self.group_port = spec.port

    @ray.method(concurrency_group="control")
    def weight_group_port(self) -> int:
        """The port of the broadcast group joined (0: none, e.g. just restarted by Ray)."""
        return self.group_port

    @ray.method(concurrency_group="sync")
    def receive_weights(self, manifest: WeightManifest) -> int:
        self.engine.receive_weights(manifest)
        return manifest.version

    @ray.method(concurrency_group="sync")
    def version(self) -> int:
        return self.engine.version

    @ray.method(concurrency_group="generate")
    def weight_samples(self, suffixes: Sequence[str]) -> tuple[int, dict[str, list]]:
        """(version, weight corners) after applying staged weights (a safe point)."""
        self.engine.apply_staged_weights()
        return self.engine.version, self.engine.weight_samples(suffixes)

    @ray.method(concurrency_group="sync")
    def sync_ranks(self) -> int:
        return self.engine.sync_ranks

    @ray.method(concurrency_group="sync")
    def gpu_uuids(self) -> list[str]:
        return self.engine.gpu_uuids()

    @ray.method(concurrency_group="control")
    def pid(self) -> int:
        return os.getpid()

    @ray.method(concurrency_group="sync")
    def stats(self) -> GenerationStats:
        """Counters since the previous call (then reset)."""
        with self.lock:
            out = GenerationStats(
                actor_id=self.actor_id, num_groups=self.num_groups, num_tokens=self.num_tokens,
                busy_seconds=self.clock.take(), version=self.engine.version, num_weight_updates=self.num_updates,
                weight_apply_seconds=self.apply_s)
            self._reset_counters()
        return out
