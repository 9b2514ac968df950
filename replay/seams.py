"""The seams where roles meet, as Protocols. Ray actor handles, Serve handles and in-process fakes all
fit them, so tests swap a cluster for a function and the CPU and GPU engines are interchangeable.

    driver ──Prompt──> GenerationService ──RolloutGroup──> Scorer ──ScoredGroup──> BatchSource
                              ^                                                      │ TrainBatch
                              └────── WeightReceiver <── learner (rank 0) <──────────┘
"""

from __future__ import annotations

from typing import Protocol, Sequence

from replay.records import (
    GenerationStats,
    Prompt,
    RolloutGroup,
    ScoredGroup,
    TrainBatch,
    WeightManifest,
)


class GenerationService(Protocol):
    """A generation actor: n rollouts per prompt with the weights it holds now."""

    def generate(self, prompts: Sequence[Prompt]) -> list[RolloutGroup]: ...

    def stats(self) -> GenerationStats: ...

    def version(self) -> int: ...


class WeightReceiver(Protocol):
    """The receiving end of a weight broadcast (a generation actor)."""

    def join_weight_group(self, *, host: str, port: int, rank: int, world_size: int, backend: str) -> None:
        """Join the broadcast group (rank >= 1); blocks until every rank joined."""

    def receive_weights(self, manifest: WeightManifest) -> int:
        """Take part in one broadcast; the weights apply at the next safe point. Returns the version staged."""


class Scorer(Protocol):
    """Attaches rewards to a group (the judge app, through its Serve handle or over HTTP)."""

    async def score(self, group: RolloutGroup) -> ScoredGroup: ...


class BatchSource(Protocol):
    """The replay buffer as the learner sees it."""

    async def take(self, step: int, learner_version: int) -> TrainBatch | None:
        """The next batch, whose groups all satisfy the staleness bound; None once the run is closing."""

    def publish_version(self, version: int) -> None:
        """The learner's weights (now on every actor) carry this version: staleness is measured from it."""
