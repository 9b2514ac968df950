"""The policy as the learner holds it: loading (fp32 master weights, optional frozen vision tower,
activation checkpointing, FSDP2 `fully_shard` per block with mixed precision) and the forward pass
that turns rollouts into per-token log-probabilities, in micro-batches bounded by a token budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from core.config import LearnerConfig


@dataclass(slots=True)
class Sequence:
    """One rollout ready for the forward pass (tensors on CPU until packed)."""

    prompt_ids: Tensor
    """int64 [P]: the prompt as the generation actor saw it."""
    completion_ids: Tensor
    """int64 [T]: the sampled completion."""
    pixel_values: Tensor
    """[N_patches, D]: the prompt's image patches."""
    image_grid_thw: Tensor
    """int64 [1, 3]."""
    behaviour_logprobs: Tensor
    """float32 [T]: logprobs under the sampling policy (from the actor)."""
    advantage: float

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


def micro_batches(seqs: list[Sequence], *, max_tokens: int) -> list[list[Sequence]]:
    """Consecutive sequences packed so that (longest length x count) <= max_tokens; never empty."""
    batches: list[list[Sequence]] = []
    longest = 0
    for s in seqs:
        if batches and max(longest, s.num_tokens) * (len(batches[-1]) + 1) <= max_tokens:
            batches[-1].append(s)
            longest = max(longest, s.num_tokens)
        else:
            batches.append([s])
            longest = s.num_tokens
    return batches


@dataclass(slots=True)
class PackedBatch:
    inputs: dict[str, Tensor]
    """Forward kwargs: input_ids, attention_mask, pixel_values, image_grid_thw, mm_token_type_ids, logits_to_keep."""
    completion_ids: Tensor
    """int64 [B, Tmax], right-padded with 0."""
    completion_mask: Tensor
    """float32 [B, Tmax]: 1 on real completion tokens."""
    behaviour_logprobs: Tensor
    advantages: Tensor
    """float32 [B]."""
    suppressed: Tensor
    """int64 [S]: token ids generation never samples (their logits are masked here too)."""


def pack(seqs: list[Sequence], *, pad_id: int, image_token_id: int, suppressed: list[int],
         device: torch.device) -> PackedBatch:
    """Prompts left-padded to a common end column Pmax, completions right-padded after it:

        row b = [pad x (Pmax - P_b), prompt_b, completion_b, pad x (Tmax - T_b)]

    so the logits predicting completion token t sit at column Pmax - 1 + t in every row, and the
    forward computes the LM head only there (`logits_to_keep`).
    """
    pmax = max(len(s.prompt_ids) for s in seqs)
    tmax = max(len(s.completion_ids) for s in seqs)
    shape = (len(seqs), pmax + tmax)
    input_ids, attention = torch.full(shape, pad_id, dtype=torch.long), torch.zeros(shape, dtype=torch.long)
    completion = torch.zeros((len(seqs), tmax), dtype=torch.long)
    mask, behaviour = torch.zeros((len(seqs), tmax)), torch.zeros((len(seqs), tmax))
    for b, s in enumerate(seqs):
        p, t = len(s.prompt_ids), len(s.completion_ids)
        input_ids[b, pmax - p: pmax + t] = torch.cat([s.prompt_ids, s.completion_ids])
        attention[b, pmax - p: pmax + t] = 1
        completion[b, :t], mask[b, :t], behaviour[b, :t] = s.completion_ids, 1.0, s.behaviour_logprobs
    inputs = {
        "input_ids": input_ids, "attention_mask": attention,
        "pixel_values": torch.cat([s.pixel_values for s in seqs]),
        "image_grid_thw": torch.cat([s.image_grid_thw for s in seqs]),
        "mm_token_type_ids": (input_ids == image_token_id).long(),
        "logits_to_keep": torch.arange(pmax - 1, pmax - 1 + tmax),
    }
    advantages = torch.tensor([s.advantage for s in seqs], dtype=torch.float32)
    move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
    return PackedBatch({k: move(v) for k, v in inputs.items()}, move(completion), move(mask), move(behaviour),
                       move(advantages), move(torch.tensor(suppressed, dtype=torch.long)))


def completion_logits(model: torch.nn.Module, batch: PackedBatch) -> Tensor:
    """[B, Tmax, V]: the logits that predict each completion token, suppressed tokens at -inf."""
    logits = model(**batch.inputs, use_cache=False).logits
    return logits.index_fill(-1, batch.suppressed, float("-inf"))


def load_policy(model_path: str, *, cfg: LearnerConfig, device: torch.device,
                random_weights: bool = False) -> torch.nn.Module:
    """The trainable policy: fp32 master weights, sharded with FSDP2 when torch.distributed is up."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    if random_weights:  # built on the device directly: a 7B init on CPU takes minutes
        config = AutoConfig.from_pretrained(model_path)
        config._attn_implementation = cfg.attn_implementation
        with torch.device(device):
            model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    else:
        model = AutoModelForImageTextToText.from_pretrained(
            model_path, dtype=torch.float32, attn_implementation=cfg.attn_implementation)
    model.to(device)
    if cfg.freeze_vision:
        for p in _vision_tower(model).parameters():
            p.requires_grad_(False)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    if torch.distributed.is_initialized():
        _shard(model, compute_dtype=getattr(torch, cfg.dtype))
    return model


def _vision_tower(model: torch.nn.Module) -> torch.nn.Module:
    return model.model.visual


def _shard(model: torch.nn.Module, *, compute_dtype: torch.dtype) -> None:
    """FSDP2: each vision block, each decoder layer, then the root; params in `compute_dtype` for compute."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for block in list(_vision_tower(model).blocks) + list(model.model.language_model.layers):
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
