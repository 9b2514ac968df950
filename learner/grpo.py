"""The GRPO math of the learner, as pure functions over tensors (torch only; no Ray, vLLM, FSDP).

Owns: group advantages (docs/method.md §4), completion masks, per-token log-probabilities and entropy from
logits, the k3 KL estimator, and the clipped policy loss in its three variants (`LossConfig.type`):

- `grpo`: the reference's loss (docs/method.md §4), asymmetric clip in log space plus dual clip;
- `tis`: the same per-token loss times a truncated importance weight min(pi_old/pi_behaviour, cap);
- `decoupled`: AReaL's decoupled PPO: clipped against the proximal policy the learner recomputed,
  times pi_prox/pi_behaviour, with tokens over the behaviour cap masked out.

Shapes: B sequences, T completion positions, V vocabulary, G groups of n samples. Token tensors
are [B, T] and aligned: `logp[b, t]` is the log-probability of completion token t of sequence b.

Normalizer semantics (how micro-batches add up to one batch): `policy_loss` divides by a
`normalizer` computed once over the WHOLE batch with `loss_normalizer`, so summing the losses (and
gradients) of the micro-batches gives exactly the batch loss. With `token_mean` that is a global
token mean over every sequence of the step: docs/method.md §8.11's documented approximation of the
reference's per-micro-batch token mean (which depends on its length-balanced reordering).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from core.config import LossConfig

LOG_RATIO_LIMIT = 20.0
"""Log-ratios are clamped to +-20 before exp, as the reference does, so one wild token cannot give inf."""


# ---------------------------------------------------------------------------------------- advantages
def uniform_groups(rewards: Tensor) -> Tensor:
    """Bool[G]: True for groups whose n rewards are all exactly equal (their advantages are 0)."""
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [num_groups, samples_per_prompt], got shape {tuple(rewards.shape)}")
    return (rewards == rewards[:, :1]).all(dim=1)


def group_advantages(rewards: Tensor, *, eps: float = 1e-6, unbiased: bool = True,
                     normalize_std: bool = True) -> Tensor:
    """GRPO advantages, [G, n] -> [G, n] float:

        A_gi = (R_gi - mean_g) / (std_g + eps)     std with N-1 if `unbiased` (the reference), else N
        A_gi = R_gi - mean_g                        if not `normalize_std` (Dr. GRPO mean-centering)

    Groups whose rewards are all equal get exactly 0. The plain formula does not guarantee it: in
    float32 the mean of eight 0.7s is off by one ulp, which divided by (std + 1e-6) gives -0.056.
    """
    uniform = uniform_groups(rewards)
    if unbiased and normalize_std and rewards.shape[1] < 2:
        raise ValueError("unbiased group std needs samples_per_prompt >= 2; sample more per prompt")
    rewards = rewards.float() if not rewards.is_floating_point() else rewards
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    if normalize_std:
        centered = centered / (rewards.std(dim=1, keepdim=True, correction=int(unbiased)) + eps)
    return torch.where(uniform[:, None], torch.zeros_like(centered), centered)


# ---------------------------------------------------------------------------------------------- masks
def completion_mask(token_ids: Tensor, *, lengths: Tensor | None = None, eos_token_id: int | None = None,
                    dtype: torch.dtype = torch.float32) -> Tensor:
    """Float [B, T] mask of the valid completion tokens of right-padded `token_ids` [B, T]:

        mask[b, t] = 1  iff  t < lengths[b]  and  no eos_token_id at any position < t

    so the first EOS itself is valid (docs/method.md §3: "up to and including the first EOS") and padding is
    not. Give `lengths`, `eos_token_id`, or both (both: the shorter wins).
    """
    if lengths is None and eos_token_id is None:
        raise ValueError("completion_mask needs lengths, eos_token_id or both to tell tokens from padding")
    positions = torch.arange(token_ids.shape[1], device=token_ids.device)
    valid = torch.ones(token_ids.shape, dtype=torch.bool, device=token_ids.device)
    if lengths is not None:
        if lengths.shape != token_ids.shape[:1]:
            raise ValueError(f"lengths must be [B]={tuple(token_ids.shape[:1])}, got {tuple(lengths.shape)}")
        valid &= positions[None, :] < lengths[:, None]
    if eos_token_id is not None:
        is_eos = (token_ids == eos_token_id).long()
        valid &= (is_eos.cumsum(dim=1) - is_eos) == 0
    return valid.to(dtype)


def loss_normalizer(mask: Tensor, *, aggregation: str) -> float:
    """The divisor `policy_loss` needs, computed over the WHOLE batch (all micro-batches at once):

        token_mean: number of valid tokens            = sum(mask)
        seq_mean:   number of sequences with a token  = sum(any(mask, dim=1))

    Sum it over micro-batches (and data-parallel ranks) when they are built separately.
    """
    if aggregation == "token_mean":
        return float(mask.sum())
    if aggregation == "seq_mean":
        return float((mask.sum(dim=1) > 0).sum())
    raise ValueError(f"aggregation must be 'token_mean' or 'seq_mean', got {aggregation!r}")


# --------------------------------------------------------------------------------- logits -> tokens
def token_logprobs(logits: Tensor, tokens: Tensor, *, temperature: float = 1.0, chunk_size: int = 1024) -> Tensor:
    """log pi(tokens) in float32, logits [..., V] and tokens [...] -> [...]:

        logp = z[token] - logsumexp(z),   z = logits / temperature

    Works `chunk_size` rows at a time in float32, so no full-size float32 log_softmax (or scaled
    copy of bf16 logits) is ever materialised; only the chunk's logits and the gathered values.
    """
    if logits.shape[:-1] != tokens.shape:
        raise ValueError(f"logits {tuple(logits.shape)} must be tokens {tuple(tokens.shape)} plus a vocab dim")
    rows, picked = logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1)
    out = []
    for chunk, chunk_tokens in zip(rows.split(chunk_size), picked.split(chunk_size)):
        z = _scaled_float(chunk, temperature)
        out.append(z.gather(-1, chunk_tokens[:, None]).squeeze(-1) - torch.logsumexp(z, dim=-1))
    if not out:
        return logits.new_zeros(tokens.shape, dtype=torch.float32)
    return torch.cat(out).reshape(tokens.shape)


def entropy_from_logits(logits: Tensor, *, temperature: float = 1.0, chunk_size: int = 1024) -> Tensor:
    """Entropy of softmax(logits / temperature) in float32, [..., V] -> [...]:

        H = logsumexp(z) - sum_v softmax(z)_v * z_v,   z = logits / temperature

    Chunked over rows like `token_logprobs`: only one chunk's probabilities exist at a time.
    Logits of -inf (masked vocabulary) count as probability 0 instead of giving NaN.
    """
    rows = logits.reshape(-1, logits.shape[-1])
    out = []
    for chunk in rows.split(chunk_size):
        lowest = torch.finfo(torch.float32).min
        z = _scaled_float(chunk, temperature).clamp(min=lowest)
        lse = torch.logsumexp(z, dim=-1)
        # masked entries are selected away: p * z there is 0 * -3.4e38, whose gradient overflows to NaN
        out.append(lse - torch.where(z > lowest, torch.exp(z - lse[:, None]) * z, 0.0).sum(dim=-1))
    if not out:
        return logits.new_zeros(logits.shape[:-1], dtype=torch.float32)
    return torch.cat(out).reshape(logits.shape[:-1])


def _scaled_float(chunk: Tensor, temperature: float) -> Tensor:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = chunk.float()
    return z if temperature == 1.0 else z / temperature


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token k3 estimator of KL(pi || ref) from samples of pi (Schulman 2020), always >= 0:

        k3 = exp(d) - d - 1,   d = clamp(ref_logp - logp, -20, 20)
    """
    d = (ref_logp - logp).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    return torch.exp(d) - d - 1.0


# ------------------------------------------------------------------------------------- the loss
def clip_ratios(logp: Tensor, *, old_logp: Tensor, clip_low: float, clip_high: float) -> tuple[Tensor, Tensor]:
    """(rho, rho_c): rho = exp(clamp(logp - old_logp, -20, 20)) and
    rho_c = exp(clamp(logp - old_logp, ln(1 - clip_low), ln(1 + clip_high))); old_logp is detached."""
    log_ratio = logp - old_logp.detach()
    rho = torch.exp(log_ratio.clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT))
    return rho, torch.exp(log_ratio.clamp(math.log(1.0 - clip_low), math.log(1.0 + clip_high)))


def clipped_token_loss(logp: Tensor, *, old_logp: Tensor, advantages: Tensor, clip_low: float,
                       clip_high: float, dual_clip: float | None) -> Tensor:
    """The reference's per-token loss (docs/method.md §4); advantages broadcast against logp:

        rho   = exp(logp - old_logp)
        rho_c = exp(clamp(logp - old_logp, ln(1 - clip_low), ln(1 + clip_high)))
        L_hi  = max(-A * rho, -A * rho_c)
        L     = min(L_hi, -dual_clip * A)  where A < 0 (and dual_clip is set), else L_hi

    The clamp acts in log space, so a bound that binds gives exactly zero gradient.
    """
    rho, rho_c = clip_ratios(logp, old_logp=old_logp, clip_low=clip_low, clip_high=clip_high)
    loss = torch.maximum(-advantages * rho, -advantages * rho_c)
    if dual_clip is not None:
        loss = torch.where(advantages < 0, torch.minimum(loss, -dual_clip * advantages), loss)
    return loss


def behaviour_weights(old_logp: Tensor, behaviour_logp: Tensor, *, cfg: LossConfig) -> tuple[Tensor, Tensor]:
    """(w, capped), detached [B, T], from the raw weight r = exp(old_logp - behaviour_logp):

        grpo:       w = 1                               capped = False
        tis:        w = min(r, tis_cap)                 capped = r > tis_cap       (truncated)
        decoupled:  w = r, or 0 where r > behaviour_cap capped = r > behaviour_cap (masked out)
    """
    log_r = (old_logp - behaviour_logp).detach().clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    r = torch.exp(log_r)
    if cfg.type == "tis":
        return r.clamp(max=cfg.tis_cap), r > cfg.tis_cap
    if cfg.type == "decoupled":
        capped = r > cfg.behaviour_cap
        return torch.where(capped, torch.zeros_like(r), r), capped
    return torch.ones_like(r), torch.zeros_like(r, dtype=torch.bool)


def aggregate(per_token: Tensor, *, mask: Tensor, aggregation: str, normalizer: float) -> Tensor:
    """Scalar loss from a per-token loss [B, T]:

        token_mean: sum_bt L_bt m_bt / normalizer                      (normalizer: valid tokens)
        seq_mean:   sum_b (sum_t L_bt m_bt / max(sum_t m_bt, 1)) / normalizer   (normalizer: sequences)

    `normalizer` comes from `loss_normalizer` over the whole batch, so micro-batch losses add up.
    Padded positions are selected away (not multiplied by 0), so garbage there cannot leak NaN.
    """
    masked = torch.where(mask > 0, per_token * mask, torch.zeros_like(per_token))
    if aggregation == "token_mean":
        return masked.sum() / normalizer
    if aggregation == "seq_mean":
        return (masked.sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)).sum() / normalizer
    raise ValueError(f"aggregation must be 'token_mean' or 'seq_mean', got {aggregation!r}")


def policy_loss(logp: Tensor, *, old_logp: Tensor, advantages: Tensor, mask: Tensor, cfg: LossConfig,
                normalizer: float, behaviour_logp: Tensor | None = None, ref_logp: Tensor | None = None,
                entropy: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """(scalar loss, detached stats) for one micro-batch; token tensors [B, T], advantages [B]:

        L_bt = w_bt * clipped_token_loss_bt + kl_coef * k3(logp, ref_logp)_bt - entropy_coef * H_bt
        loss = aggregate(L, mask, cfg.aggregation, normalizer)

    with w from `behaviour_weights` (1 for `grpo`). `old_logp` is the learner's recomputed log-prob
    (the proximal policy for `decoupled`); `behaviour_logp` is the generator's, needed by `tis` and
    `decoupled` and, when given to `grpo`, only logged. Masked-out decoupled tokens still count in
    `normalizer` (contributing 0), as in AReaL.
    """
    _check_loss_inputs(logp, old_logp=old_logp, advantages=advantages, mask=mask, cfg=cfg,
                       normalizer=normalizer, behaviour_logp=behaviour_logp, ref_logp=ref_logp, entropy=entropy)
    adv = advantages.detach().float()[:, None]
    mask = mask.float()
    pg = clipped_token_loss(logp.float(), old_logp=old_logp.float(), advantages=adv, clip_low=cfg.clip_low,
                            clip_high=cfg.clip_high, dual_clip=cfg.dual_clip)
    weight, capped = (None, None) if behaviour_logp is None else behaviour_weights(
        old_logp.float(), behaviour_logp.float(), cfg=cfg)
    per_token = pg if weight is None else pg * weight
    pg_loss = aggregate(per_token, mask=mask, aggregation=cfg.aggregation, normalizer=normalizer)
    loss = pg_loss
    if cfg.kl_coef > 0:
        kl = kl_k3(logp.float(), ref_logp.float())
        loss = loss + cfg.kl_coef * aggregate(kl, mask=mask, aggregation=cfg.aggregation, normalizer=normalizer)
    if cfg.entropy_coef > 0:
        ent = aggregate(entropy.float(), mask=mask, aggregation=cfg.aggregation, normalizer=normalizer)
        loss = loss - cfg.entropy_coef * ent
    stats = _loss_stats(logp, old_logp=old_logp, adv=adv, mask=mask, cfg=cfg, behaviour_logp=behaviour_logp,
                        capped=capped, ref_logp=ref_logp, entropy=entropy)
    stats["pg_loss"] = pg_loss.detach()
    return loss, stats


def _check_loss_inputs(logp: Tensor, *, old_logp: Tensor, advantages: Tensor, mask: Tensor, cfg: LossConfig,
                       normalizer: float, behaviour_logp: Tensor | None, ref_logp: Tensor | None,
                       entropy: Tensor | None) -> None:
    if logp.dim() != 2:
        raise ValueError(f"logp must be [B, T], got shape {tuple(logp.shape)}")
    for name, t in (("old_logp", old_logp), ("mask", mask), ("behaviour_logp", behaviour_logp),
                    ("ref_logp", ref_logp), ("entropy", entropy)):
        if t is not None and t.shape != logp.shape:
            raise ValueError(f"{name} must have logp's shape {tuple(logp.shape)}, got {tuple(t.shape)}")
    if advantages.shape != logp.shape[:1]:
        raise ValueError(f"advantages must be [B]={tuple(logp.shape[:1])} (one per sequence), "
                         f"got {tuple(advantages.shape)}")
    if cfg.type in ("tis", "decoupled") and behaviour_logp is None:
        raise ValueError(f"loss type {cfg.type!r} needs behaviour_logp (the generator's log-probs)")
    if cfg.kl_coef > 0 and ref_logp is None:
        raise ValueError("kl_coef > 0 needs ref_logp from the reference model; pass it or set kl_coef: 0")
    if cfg.entropy_coef > 0 and entropy is None:
        raise ValueError("entropy_coef > 0 needs the per-token entropy; pass it or set entropy_coef: 0")
    if not normalizer > 0:
        raise ValueError(f"normalizer must be > 0 (valid tokens or sequences of the batch), got {normalizer}")


@torch.no_grad()
def _loss_stats(logp: Tensor, *, old_logp: Tensor, adv: Tensor, mask: Tensor, cfg: LossConfig,
                behaviour_logp: Tensor | None, capped: Tensor | None, ref_logp: Tensor | None,
                entropy: Tensor | None) -> dict[str, Tensor]:
    """Token-weighted means over this micro-batch's valid tokens (weight them by `num_tokens` to
    combine micro-batches); `ratio_min`/`ratio_max` are +inf/-inf when there is no valid token."""
    valid = mask > 0
    rho, rho_c = clip_ratios(logp.float(), old_logp=old_logp.float(), clip_low=cfg.clip_low, clip_high=cfg.clip_high)
    clip_binds = -adv * rho_c > -adv * rho
    l_hi = torch.maximum(-adv * rho, -adv * rho_c)
    dual_binds = ((adv < 0) & (l_hi > -cfg.dual_clip * adv)) if cfg.dual_clip is not None else torch.zeros_like(valid)
    stats = {
        "num_tokens": mask.sum(),
        "ratio_mean": _masked_mean(rho, mask),
        "ratio_min": rho.masked_fill(~valid, math.inf).amin(),
        "ratio_max": rho.masked_fill(~valid, -math.inf).amax(),
        "clip_frac_low": _masked_mean((clip_binds & (adv < 0)).float(), mask),
        "clip_frac_high": _masked_mean((clip_binds & (adv > 0)).float(), mask),
        "dual_clip_frac": _masked_mean(dual_binds.float(), mask),
        "approx_kl_old": _masked_mean(kl_k3(logp.float(), old_logp.float()), mask),
    }
    if behaviour_logp is not None:
        raw = torch.exp((old_logp - behaviour_logp).float().clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT))
        stats["is_weight_mean"] = _masked_mean(raw, mask)
        stats["is_weight_max"] = raw.masked_fill(~valid, -math.inf).amax()
        stats["is_capped_frac"] = _masked_mean(capped.float(), mask)
        stats["num_is_capped"] = (capped & valid).sum().float()
    if ref_logp is not None:
        stats["kl_ref_mean"] = _masked_mean(kl_k3(logp.float(), ref_logp.float()), mask)
    if entropy is not None:
        stats["entropy_mean"] = _masked_mean(entropy.float(), mask)
    return stats


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask > 0, x * mask, torch.zeros_like(x)).sum() / mask.sum().clamp(min=1.0)
