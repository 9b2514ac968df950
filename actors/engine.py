"""The generation-engine seam: what a generation actor needs from HF `generate` (CPU) or vLLM (GPU).

An engine samples n completions per prompt with the weights it holds and returns typed rollout
groups with behaviour logprobs. Weight updates come through the same seam, because where the
bytes land differs: the HF engine stages received tensors and swaps them in at the next safe point
(between generate calls); the vLLM engine receives inside its worker processes and pauses
scheduling for the swap, so in-flight requests carry both versions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

from replay.records import Prompt, RolloutGroup, WeightGroupSpec, WeightManifest


@dataclass(frozen=True, slots=True)
class Sampling:
    """How to sample; temperature 0 means greedy (evaluation)."""

    n: int
    temperature: float
    top_p: float
    max_new_tokens: int
    seed: int = 0


class Engine(Protocol):
    def generate(self, prompts: Sequence[Prompt], *, sampling: Sampling, actor_id: int) -> list[RolloutGroup]:
        """n rollouts per prompt, each stamped with the version(s) of the weights that produced it."""

    @property
    def version(self) -> int:
        """The policy_version of the weights that generate() uses now."""

    def join_weight_group(self, spec: WeightGroupSpec) -> None:
        """Join the learner's broadcast group (blocks until every rank joined)."""

    def receive_weights(self, manifest: WeightManifest) -> None:
        """Take part in one broadcast; may run concurrently with generate()."""

    def apply_staged_weights(self) -> bool:
        """At a safe point: swap in weights received since the last call. True if the version changed."""

    def weight_samples(self, suffixes: Sequence[str]) -> dict[str, list]:
        """`replay.weights.weight_corners` of the engine's weights by (HF) name suffix: after a sync
        they equal the learner's (health checks and tests)."""

    @property
    def sync_ranks(self) -> int:
        """Ranks this engine takes in the weight broadcast group (its tensor-parallel workers)."""
