"""The rollout section of the config schema (`core/config.py` holds the whole and re-exports it): the
generation engine (HF on CPU, vLLM on GPU), sampling, and how many sequences dispatch keeps in flight."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field, model_validator

from core.config_base import Section


class HFEngineConfig(Section):
    type: Literal["hf"] = "hf"
    num_threads: int = Field(1, ge=1)
    """torch intra-op threads per actor (keep actors from fighting over few cores)."""


class VLLMEngineConfig(Section):
    type: Literal["vllm"] = "vllm"
    tensor_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: float = Field(0.7, gt=0.0, le=0.98)
    """The engine's share of its GPU's memory (weights, activations, KV cache). On a GPU shared with the
    learner, this plus learner.gpu_memory_fraction must leave room for both processes' CUDA contexts."""
    max_model_len: int = Field(8192, ge=256)
    max_num_seqs: int = Field(1024, ge=1)
    max_num_batched_tokens: int = Field(8192, ge=256)
    enforce_eager: bool = False
    """Skip torch.compile and CUDA graphs (starts in ~1.5 min instead of ~3 for 7B; slower decode)."""
    load_format: Literal["auto", "dummy", "safetensors"] = "auto"
    """`dummy`: random weights of the real architecture (benchmarks without real weights)."""


class RolloutConfig(Section):
    engine: Annotated[Union[HFEngineConfig, VLLMEngineConfig], Field(discriminator="type")] = HFEngineConfig()
    num_actors: int = Field(1, ge=1)
    num_gpus_per_actor: float = Field(0.0, ge=0.0)
    """GPUs each actor asks Ray for: the engine's tensor_parallel_size, or a fraction (e.g. 0.5) to share a
    GPU with a learner worker (one GPU for the whole system: README "One GPU")."""
    max_restarts: int = Field(3, ge=0)
    """How many times Ray restarts a crashed generation actor."""
    samples_per_prompt: int = Field(8, ge=2)
    """n: rollouts per prompt (a GRPO group); >= 2 so the group std exists."""
    temperature: float = Field(1.0, gt=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_new_tokens: int = Field(4096, ge=1)
    prompts_per_call: int = Field(1, ge=1)
    """Prompts an actor generates in one call (larger batches: better throughput, coarser versions)."""
    inflight_sequences_per_actor: int | None = Field(None, ge=1)
    """Sequences (prompts x samples_per_prompt) the dispatcher keeps in flight on each actor; a call of
    prompts_per_call prompts goes out as soon as it fits, and each group frees its place as it finishes.
    None: vLLM's engine.max_num_seqs plus one call (so its queue never runs dry); for HF two calls' worth."""

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data):
        if isinstance(data, dict) and "max_inflight_per_actor" in data:
            raise ValueError(
                "rollout.max_inflight_per_actor (calls) was replaced by rollout.inflight_sequences_per_actor "
                "(sequences: prompts x samples_per_prompt in flight on each actor; leave it out for the default, "
                "vLLM's max_num_seqs plus one call); remove max_inflight_per_actor")
        return data

    @property
    def sequences_per_call(self) -> int:
        return self.prompts_per_call * self.samples_per_prompt

    @property
    def inflight_target(self) -> int:
        """Sequences in flight per actor: the configured target, else the engine's own default."""
        if self.inflight_sequences_per_actor is not None:
            return self.inflight_sequences_per_actor
        if isinstance(self.engine, VLLMEngineConfig):
            return self.engine.max_num_seqs + self.sequences_per_call
        return 2 * self.sequences_per_call

    @property
    def calls_per_actor(self) -> int:
        """The actor's concurrency: every call the dispatcher can have open on it. Slots free group by group,
        so a call stays open while any of its groups runs: up to one call per unfinished group, at most
        inflight_target / samples_per_prompt of them (a cap by full calls queued calls in Ray while vLLM had
        room: on 1xH200 a late long prompt started ~20 s late). Plus one for validation's calls and one for a
        call whose last group is back but whose Ray task has not ended yet."""
        return self.inflight_target // self.samples_per_prompt + 2

    @model_validator(mode="after")
    def _inflight(self) -> RolloutConfig:
        if self.inflight_target < self.sequences_per_call:
            raise ValueError(
                f"rollout.inflight_sequences_per_actor ({self.inflight_target}) is below one call's sequences "
                f"(rollout.prompts_per_call x rollout.samples_per_prompt = {self.sequences_per_call}): no call "
                "could ever go out; raise it or lower prompts_per_call")
        return self

    @model_validator(mode="after")
    def _engine(self) -> RolloutConfig:
        tp = getattr(self.engine, "tensor_parallel_size", None)
        shares_a_gpu = tp == 1 and 0 < self.num_gpus_per_actor < 1  # colocated with the learner (Config.colocated)
        if isinstance(self.engine, VLLMEngineConfig) and self.num_gpus_per_actor != tp and not shares_a_gpu:
            raise ValueError(
                f"rollout.engine.tensor_parallel_size={tp} needs rollout.num_gpus_per_actor = {tp} (got "
                f"{self.num_gpus_per_actor:g}): vLLM runs one worker per GPU of the actor's tensor-parallel group "
                f"(fewer GPUs: it fails at start; more: Ray holds GPUs nobody uses); set rollout.num_gpus_per_actor: "
                f"{tp} or rollout.engine.tensor_parallel_size to the GPUs per actor (a fraction below 1 with "
                "tensor_parallel_size 1: the engine shares its GPU with a learner worker)")
        return self
