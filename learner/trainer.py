"""One GRPO update from scored groups: advantages, micro-batched forward/backward with the configured
loss, gradient clipping, a skipped step on a non-finite gradient norm, the LR schedule. Runs on
every FSDP rank over that rank's share of the groups; ranks agree on the loss normalizer and on
the number of forward passes (FSDP's collectives need every rank in every pass).
"""

from __future__ import annotations

import math
import time
from collections import defaultdict

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from core import vl
from core.config import DataConfig, LearnerConfig
from core.records import ScoredGroup
from learner.grpo import (
    entropy_from_logits,
    group_advantages,
    loss_normalizer,
    policy_loss,
    token_logprobs,
)
from learner.packed import PackedRows, pack_rows, packed_logprobs, token_micro_batches
from learner.policy import Sequence, completion_logits, load_policy, micro_batches, pack
from learner.schedule import warmup_scheduler


class Learner:
    def __init__(self, model_path: str, *, cfg: LearnerConfig, data: DataConfig, temperature: float,
                 device: torch.device, random_weights: bool = False) -> None:
        self.cfg, self.data, self.temperature, self.device = cfg, data, temperature, device
        self.model, stats = load_policy(model_path, cfg=cfg, device=device, random_weights=random_weights)
        self.load_stats = [stats] if stats else []
        """What loading cost this rank: the policy's load, then the KL reference model's (none for random weights)."""
        self.ref_model = None
        if cfg.loss.kl_coef > 0:
            ref, ref_stats = load_policy(model_path, cfg=cfg, device=device, random_weights=random_weights)
            self.ref_model = _frozen(ref)
            self.load_stats += [ref_stats] if ref_stats else []
        self.processor = vl.load_processor(model_path)
        tokenizer = self.processor.tokenizer
        self.pad_id = tokenizer.pad_token_id
        self.image_token_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
        self.suppressed = vl.suppressed_token_ids(tokenizer)
        opt = cfg.optimizer
        self.optimizer = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad], lr=opt.lr, betas=opt.betas, eps=opt.eps,
            weight_decay=opt.weight_decay, fused=device.type == "cuda")
        self.scheduler = warmup_scheduler(self.optimizer, warmup_steps=opt.warmup_steps)
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.packed = cfg.packing == "always" or (cfg.packing == "auto" and device.type == "cuda")
        """Padding-free micro-batches (learner/packed.py), else the padded path (learner/policy.py)."""
        self.optimizer_done: torch.cuda.Event | None = None
        """Recorded on the optimizer's stream after each update: the weight broadcast waits on it."""

    # ------------------------------------------------------------------------------------ the step
    def step(self, groups: list[ScoredGroup]) -> dict[str, float]:
        """One optimizer update per minibatch over this rank's groups; returns this rank's metrics."""
        start = time.perf_counter()
        seqs = self.sequences(groups)
        normalizer = self._global_normalizer(seqs)
        minibatches = np.array_split(np.arange(len(seqs)), self.cfg.num_minibatches)
        old = self.logprobs(seqs) if self.cfg.num_minibatches > 1 else None
        totals: dict[str, float] = defaultdict(float)
        for idx in minibatches:
            mb = [seqs[i] for i in idx]
            mb_old = None if old is None else [old[i] for i in idx]
            self._update(mb, mb_old, normalizer=normalizer / self.cfg.num_minibatches, totals=totals)
        metrics = _finish(totals)
        metrics["learner/step_seconds"] = time.perf_counter() - start
        metrics["learner/optimizer_steps"] = float(self._optimizer_steps())
        return metrics

    def _optimizer_steps(self) -> int:
        """AdamW's own step count (it lives in the optimizer state, so a resumed run continues it)."""
        for state in self.optimizer.state.values():
            if "step" in state:
                return int(state["step"])
        return 0

    def sequences(self, groups: list[ScoredGroup]) -> list[Sequence]:
        """Rollouts with their group-normalised advantages and re-encoded images."""
        seqs = []
        for scored in groups:
            adv = group_advantages(torch.from_numpy(scored.totals())[None], eps=self.cfg.loss.std_eps,
                                   unbiased=self.cfg.loss.unbiased_std, normalize_std=self.cfg.loss.normalize_std)[0]
            inputs = vl.encode_prompt(self.processor, scored.group.prompt, data=self.data)
            prompt_ids = torch.from_numpy(scored.group.prompt_token_ids.astype(np.int64))
            if not torch.equal(inputs.input_ids.cpu(), prompt_ids):
                raise RuntimeError(
                    f"prompt {scored.group.prompt.id}: the learner's encoding differs from the generation "
                    "actor's; both must load the same processor and data settings")
            for rollout, a in zip(scored.group.rollouts, adv.tolist()):
                seqs.append(Sequence(
                    prompt_ids=prompt_ids, completion_ids=torch.from_numpy(rollout.token_ids.astype(np.int64)),
                    pixel_values=inputs.pixel_values, image_grid_thw=inputs.image_grid_thw,
                    behaviour_logprobs=torch.from_numpy(rollout.logprobs.astype(np.float32)), advantage=a))
        return seqs

    @torch.no_grad()
    def logprobs(self, seqs: list[Sequence]) -> list[torch.Tensor]:
        """Per-sequence logprobs under the current weights (the proximal policy), no gradient."""
        out = []
        for micro in self._padded_micro_batches(seqs):
            logp = self._forward_logprobs(self.model, micro or seqs[:1], with_entropy=False)[0]
            out.extend(logp[b, : len(s.completion_ids)].float().cpu() for b, s in enumerate(micro))
        return out

    def _forward_logprobs(self, model: torch.nn.Module, seqs: list[Sequence], *, with_entropy: bool):
        """(batch, logp [B, T], entropy [B, T] or None): the packed or the padded path."""
        if self.packed:
            rows = pack_rows(seqs, rope_index=model.model.get_rope_index, image_token_id=self.image_token_id,
                             suppressed=self.suppressed, vision_config=model.config.vision_config,
                             device=self.device)
            return (*_packed_logprobs(model, rows, temperature=self.temperature, with_entropy=with_entropy), rows)
        batch = self._pack(seqs)
        logits = completion_logits(model, batch)
        logp = token_logprobs(logits, batch.completion_ids, temperature=self.temperature)
        entropy = entropy_from_logits(logits if with_entropy else logits.detach(), temperature=self.temperature)
        return logp, entropy, batch

    def _update(self, seqs: list[Sequence], old: list[torch.Tensor] | None, *, normalizer: float,
                totals: dict[str, float]) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        offset = 0
        sums: dict[str, torch.Tensor] = {}
        micros = self._padded_micro_batches(seqs)
        for i, micro in enumerate(micros):
            _accumulating(self.model, last=i == len(micros) - 1)
            dummy = not micro  # this rank has fewer passes than another: run one with zero weight
            micro_old = None if old is None or dummy else old[offset: offset + len(micro)]
            offset += len(micro)
            loss, stats = self._micro_loss(micro or seqs[:1], micro_old, normalizer=normalizer)
            (loss * (0.0 if dummy else self.world)).backward()  # FSDP averages gradients over ranks
            if not dummy:
                _accumulate(sums, loss.detach(), stats)
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optimizer.grad_clip)
        norm = norm.full_tensor() if isinstance(norm, DTensor) else norm  # FSDP2: a DTensor
        grad_norm = _read_once(sums, norm, totals)  # the step's one host synchronisation
        totals["learner/lr"] = self.scheduler.get_last_lr()[0]
        totals["learner/grad_norm"] = grad_norm
        if math.isfinite(grad_norm):
            self.optimizer.step()
            if self.device.type == "cuda":
                self.optimizer_done = torch.cuda.Event()
                self.optimizer_done.record(torch.cuda.current_stream(self.device))
        else:  # the reference skips the update on a non-finite gradient norm
            totals["learner/skipped_updates"] += 1
        self.scheduler.step()

    def _micro_loss(self, micro: list[Sequence], old: list[torch.Tensor] | None, *, normalizer: float):
        loss_cfg = self.cfg.loss
        logp, entropy, batch = self._forward_logprobs(self.model, micro, with_entropy=loss_cfg.entropy_coef > 0)
        old_logp = logp.detach() if old is None else _pad_rows(old, logp.shape).to(self.device)
        ref = None
        if self.ref_model is not None:
            with torch.no_grad():
                ref = self._forward_logprobs(self.ref_model, micro, with_entropy=False)[0]
        return policy_loss(logp, old_logp=old_logp, advantages=batch.advantages, mask=batch.completion_mask,
                           cfg=loss_cfg, normalizer=normalizer, behaviour_logp=batch.behaviour_logprobs,
                           ref_logp=ref, entropy=entropy)

    def _pack(self, seqs: list[Sequence]):
        return pack(seqs, pad_id=self.pad_id, image_token_id=self.image_token_id, suppressed=self.suppressed,
                    device=self.device)

    def _padded_micro_batches(self, seqs: list[Sequence]) -> list[list[Sequence]]:
        """Micro-batches, padded with empty ones so every rank runs the same number of passes."""
        split = token_micro_batches if self.packed else micro_batches
        micro = split(seqs, max_tokens=self.cfg.max_tokens_per_micro_batch) if seqs else []
        count = _all_reduce(float(len(micro)), op=dist.ReduceOp.MAX) if self.world > 1 else len(micro)
        return micro + [[] for _ in range(int(count) - len(micro))]

    def _global_normalizer(self, seqs: list[Sequence]) -> float:
        agg = self.cfg.loss.aggregation
        local = sum(loss_normalizer(torch.ones(1, len(s.completion_ids)), aggregation=agg) for s in seqs)
        return _all_reduce(local, op=dist.ReduceOp.SUM) if self.world > 1 else local

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}


def _all_reduce(value: float, *, op) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=op)
    return float(t.item())


def _pad_rows(rows: list[torch.Tensor], shape: torch.Size) -> torch.Tensor:
    out = torch.zeros(shape, dtype=torch.float32)
    for b, row in enumerate(rows):
        out[b, : len(row)] = row
    return out


def _frozen(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _accumulating(model: torch.nn.Module, *, last: bool) -> None:
    """FSDP2 between micro-batches: keep parameters gathered and gradients unsharded (accumulated in
    float32, the reduce dtype) until the last micro-batch, so each step gathers and reduces once
    instead of once per micro-batch. A no-op without FSDP."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(last)
        model.set_reshard_after_backward(last)


def _packed_logprobs(model: torch.nn.Module, rows: PackedRows, *, temperature: float, with_entropy: bool):
    """(logp [B, T], entropy [B, T] or None) through the root module (FSDP2 gathers its parameters)."""
    def run(m: torch.nn.Module):
        return packed_logprobs(m, rows, temperature=temperature, with_entropy=with_entropy)

    logp, entropy = model(packed=run)
    return rows.unflatten(logp), None if entropy is None else rows.unflatten(entropy)


def _accumulate(sums: dict[str, torch.Tensor], loss: torch.Tensor, stats: dict[str, torch.Tensor]) -> None:
    """Token-weighted sums of the micro-batch stats, kept on the device (means are restored in `_finish`)."""
    n = stats["num_tokens"].float()
    _add(sums, "learner/loss", loss.float(), torch.add)
    _add(sums, "learner/num_tokens", n, torch.add)
    for key, value in stats.items():
        v = value.float()
        if key.endswith("_min"):
            _add(sums, f"learner/{key}", v, torch.minimum)
        elif key.endswith("_max"):
            _add(sums, f"learner/{key}", v, torch.maximum)
        elif key.startswith("num_"):
            if key != "num_tokens":
                _add(sums, f"learner/{key}", v, torch.add)
        else:
            _add(sums, f"learner/{key}:wsum", v * n, torch.add)


def _add(sums: dict[str, torch.Tensor], key: str, value: torch.Tensor, op) -> None:
    sums[key] = value if key not in sums else op(sums[key], value)


def _read_once(sums: dict[str, torch.Tensor], norm: torch.Tensor, totals: dict[str, float]) -> float:
    """Copy the micro-batch sums and the gradient norm to the host in one transfer; fold the sums into
    `totals` (min/max/sum by key, as `_accumulate` built them). Returns the gradient norm."""
    keys = list(sums)
    values = torch.stack([norm.float().reshape(()), *(sums[k].reshape(()).to(norm.device) for k in keys)]).tolist()
    for key, v in zip(keys, values[1:]):
        if key.endswith("_min"):
            totals[key] = min(totals.get(key, math.inf), v)
        elif key.endswith("_max"):
            totals[key] = max(totals.get(key, -math.inf), v)
        else:
            totals[key] += v
    return values[0]


def _finish(totals: dict[str, float]) -> dict[str, float]:
    n = max(totals.get("learner/num_tokens", 0.0), 1.0)
    out = {}
    for key, value in totals.items():
        if key.endswith(":wsum"):
            out[key.removesuffix(":wsum")] = value / n
        else:
            out[key] = value
    return out
