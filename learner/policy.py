"""The policy as the learner holds it: loading (fp32 master weights in training mode, optional frozen
vision tower, activation checkpointing on every k-th block, the varlen patches of learner/varlen.py,
FSDP2 `fully_shard` per block with mixed precision on the meta device, then each rank reading only its
shards from the folder (learner/sharded_load.py), optionally compiled blocks) and the padded
forward pass that turns rollouts into per-token log-probabilities, in micro-batches bounded by a
token budget. On CPU a group's rollouts share one pass over their prompt and image (its KV cache),
which halves the demo's learner step (prompts are ~60% of its tokens). GPUs take the padding-free
path of learner/packed.py (`LearnerConfig.packing`); this padded one stays as its reference.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import Tensor

from core.config import LearnerConfig
from learner.sharded_load import LoadStats, build_on_meta, file_names, load_weights
from learner.varlen import patch_policy


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


def prompt_runs(seqs: list[Sequence]) -> list[list[Sequence]]:
    """Consecutive sequences of one prompt: the rollouts of a group, which share its prompt tensors."""
    runs: list[list[Sequence]] = []
    for s in seqs:
        if runs and s.prompt_ids is runs[-1][0].prompt_ids and s.pixel_values is runs[-1][0].pixel_values:
            runs[-1].append(s)
        else:
            runs.append([s])
    return runs


@dataclass(slots=True)
class PackedBatch:
    inputs: dict[str, Tensor]
    """Forward kwargs of the distinct prompts, one row each, left-padded to Pmax: input_ids,
    attention_mask, pixel_values, image_grid_thw, mm_token_type_ids."""
    prompt_row: Tensor
    """int64 [B]: the row of `inputs` that holds sequence b's prompt."""
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
    """Each distinct prompt once, left-padded to a common end column Pmax, and the completions
    right-padded to Tmax; sequence b is the prompt row `prompt_row[b]` followed by completion b:

        prompt row r = [pad x (Pmax - P_r), prompt_r]        completion b = [completion_b, 0 x (Tmax - T_b)]
    """
    runs = prompt_runs(seqs)
    pmax = max(len(run[0].prompt_ids) for run in runs)
    tmax = max(len(s.completion_ids) for s in seqs)
    input_ids = torch.full((len(runs), pmax), pad_id, dtype=torch.long)
    attention = torch.zeros((len(runs), pmax), dtype=torch.long)
    for r, run in enumerate(runs):
        p = len(run[0].prompt_ids)
        input_ids[r, pmax - p:], attention[r, pmax - p:] = run[0].prompt_ids, 1
    completion = torch.zeros((len(seqs), tmax), dtype=torch.long)
    mask, behaviour = torch.zeros((len(seqs), tmax)), torch.zeros((len(seqs), tmax))
    for b, s in enumerate(seqs):
        t = len(s.completion_ids)
        completion[b, :t], mask[b, :t], behaviour[b, :t] = s.completion_ids, 1.0, s.behaviour_logprobs
    inputs = {
        "input_ids": input_ids, "attention_mask": attention,
        "pixel_values": torch.cat([run[0].pixel_values for run in runs]),
        "image_grid_thw": torch.cat([run[0].image_grid_thw for run in runs]),
        "mm_token_type_ids": (input_ids == image_token_id).long(),
    }
    prompt_row = torch.tensor([r for r, run in enumerate(runs) for _ in run], dtype=torch.long)
    advantages = torch.tensor([s.advantage for s in seqs], dtype=torch.float32)
    move = lambda t: t.to(device, non_blocking=True)
    return PackedBatch({k: move(v) for k, v in inputs.items()}, move(prompt_row), move(completion), move(mask),
                       move(behaviour), move(advantages), move(torch.tensor(suppressed, dtype=torch.long)))


def completion_logits(model: torch.nn.Module, batch: PackedBatch) -> Tensor:
    """[B, Tmax, V]: the logits that predict each completion token, suppressed tokens at -inf.

    On CPU each distinct prompt (and its image) goes through the model once and its completions run
    on top of its KV cache, so a group's n rollouts pay for the prompt once instead of n times.
    Otherwise (GPU with `packing: never`; activation checkpointing, which drops the cache) every
    sequence runs whole, `[prompt, completion]` as one row. The logits are the same either way: the
    completions get the rope positions that follow their prompt in both.
    """
    checkpointing = any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
    if (batch.completion_ids.device.type != "cpu" or batch.completion_ids.shape[1] < 2
            or (checkpointing and model.training and torch.is_grad_enabled())):  # transformers' rule for no cache
        logits = _whole_sequence_logits(model, batch)
    else:
        logits = _shared_prompt_logits(model, batch)
    return logits.index_fill(-1, batch.suppressed, float("-inf"))


def _shared_prompt_logits(model: torch.nn.Module, batch: PackedBatch) -> Tensor:
    prompts, row = batch.inputs, batch.prompt_row
    positions, deltas = model.model.get_rope_index(
        prompts["input_ids"], mm_token_type_ids=prompts["mm_token_type_ids"],
        image_grid_thw=prompts["image_grid_thw"], attention_mask=prompts["attention_mask"])
    cache_name = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    head = model(**prompts, position_ids=positions, use_cache=True, logits_to_keep=1)  # predicts token 0
    cache = getattr(head, cache_name)
    if cache is None or cache.get_seq_length() != prompts["input_ids"].shape[1]:
        raise RuntimeError("the prompt forward returned no KV cache; the completions cannot attend to the prompt")
    cache.batch_select_indices(row)  # differentiable: gradients of all completions flow back to one prompt pass
    tmax = batch.completion_ids.shape[1]
    # text after the prompt: position = index among the prompt's tokens + the prompt's rope delta
    first = prompts["attention_mask"].sum(dim=1) + deltas.reshape(-1).to(positions.device)
    positions = (first[row, None] + torch.arange(tmax, device=row.device)).expand(3, -1, -1)
    attention = torch.cat([prompts["attention_mask"][row], batch.completion_mask.long()], dim=1)
    tail = model(input_ids=batch.completion_ids, attention_mask=attention, position_ids=positions,
                 use_cache=True, logits_to_keep=torch.arange(tmax - 1, device=row.device), **{cache_name: cache})
    return torch.cat([head.logits[row], tail.logits], dim=1)


def _whole_sequence_logits(model: torch.nn.Module, batch: PackedBatch) -> Tensor:
    prompts, row = batch.inputs, batch.prompt_row
    pmax, tmax = prompts["input_ids"].shape[1], batch.completion_ids.shape[1]
    images = prompts["pixel_values"].split(prompts["image_grid_thw"].prod(dim=-1).tolist())
    inputs = {
        "input_ids": torch.cat([prompts["input_ids"][row], batch.completion_ids], dim=1),
        "attention_mask": torch.cat([prompts["attention_mask"][row], batch.completion_mask.long()], dim=1),
        "mm_token_type_ids": torch.cat([prompts["mm_token_type_ids"][row], torch.zeros_like(batch.completion_ids)], 1),
        "pixel_values": torch.cat([images[r] for r in row.tolist()]),
        "image_grid_thw": prompts["image_grid_thw"][row],
    }
    keep = torch.arange(pmax - 1, pmax - 1 + tmax, device=row.device)  # the columns predicting completion tokens
    return model(**inputs, use_cache=False, logits_to_keep=keep).logits


def load_policy(model_path: str, *, cfg: LearnerConfig, device: torch.device,
                random_weights: bool = False) -> tuple[torch.nn.Module, LoadStats | None]:
    """The trainable policy: fp32 master weights, sharded with FSDP2 when torch.distributed is up, and what
    loading it cost this rank (None for random weights). Built on the meta device and sharded first, so
    each rank reads only its own shards from the folder (learner/sharded_load.py)."""
    if random_weights:  # built on the device directly: a 7B init on CPU takes minutes
        model = _random_model(model_path, cfg=cfg, device=device)
    else:
        model = build_on_meta(model_path, attn_implementation=cfg.attn_implementation)
        names = file_names(model, model_path)
    # training mode: transformers checkpoints a block only when `self.training` (from_pretrained returns
    # eval mode, so `gradient_checkpointing` did nothing before). Qwen2.5-VL has no dropout to turn on.
    model.train()
    if cfg.freeze_vision:
        for p in _vision_tower(model).parameters():
            p.requires_grad_(False)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        _checkpoint_every(model, k=cfg.checkpoint_every)
    model.config.use_cache = False
    patch_policy(model, device=device)
    if torch.distributed.is_initialized():
        _shard(model, compute_dtype=getattr(torch, cfg.dtype))
    stats = None if random_weights else load_weights(model, model_path, names=names, device=device)
    if cfg.compile_blocks:  # after sharding, as measured (dynamo runs FSDP2's hooks eagerly)
        for block in _blocks(model):
            block.compile(dynamic=True)
    return model, stats


def _random_model(model_path: str, *, cfg: LearnerConfig, device: torch.device) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(model_path)
    config._attn_implementation = cfg.attn_implementation
    with torch.device(device):
        return AutoModelForImageTextToText.from_config(config, dtype=torch.float32)


def _blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    return list(_vision_tower(model).blocks) + list(model.model.language_model.layers)


def _checkpoint_every(model: torch.nn.Module, *, k: int) -> None:
    """Keep checkpointing on every k-th block of the tower and of the language model only."""
    for blocks in (_vision_tower(model).blocks, model.model.language_model.layers):
        for i, block in enumerate(blocks):
            block.gradient_checkpointing = i % k == 0


def _vision_tower(model: torch.nn.Module) -> torch.nn.Module:
    return model.model.visual


def _shard(model: torch.nn.Module, *, compute_dtype: torch.dtype) -> None:
    """FSDP2: each vision block, each decoder layer, then the root; params in `compute_dtype` for compute."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for block in _blocks(model):
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
