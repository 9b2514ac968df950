"""Per-token log-probabilities (and optionally entropy) straight from the last hidden states and the
output projection, chunked over tokens, so the [tokens x vocab] logits never exist whole: forward and
backward each hold one chunk's logits at a time (torch only; no Ray, vLLM, FSDP).

For hidden states h [M, H], weight W [V, H], sampled tokens y [M], temperature tau and a set S of
suppressed vocabulary ids:

    z     = (h W^T) / tau,  z[:, S] = -inf              (the logits in W's dtype, then float32)
    logp  = z[y] - logsumexp(z)
    H     = logsumexp(z) - sum_v softmax(z)_v z_v        (only when asked for)
    dL/dz = g_logp (onehot(y) - p) - g_H p (z - sum_v p_v z_v),   p = softmax(z)

The values equal `token_logprobs(h W^T ...)` / `entropy_from_logits` in `learner/grpo.py` (the logits
are rounded to W's dtype before the float32 softmax, as the model's lm_head output is).
"""

from __future__ import annotations

import torch
from torch import Tensor

CHUNK_TOKENS = 2048
"""Tokens per chunk: 2,048 x 152k vocabulary is 1.2 GiB per float32 temporary."""


def linear_logprobs(hidden: Tensor, weight: Tensor, tokens: Tensor, *, temperature: float = 1.0,
                    suppressed: Tensor | None = None, with_entropy: bool = False,
                    chunk_tokens: int = CHUNK_TOKENS) -> tuple[Tensor, Tensor | None]:
    """(logp [M] float32, entropy [M] float32 or None) for hidden [M, H], weight [V, H], tokens [M]."""
    if hidden.dim() != 2 or tokens.shape != hidden.shape[:1]:
        raise ValueError(f"hidden must be [M, H] and tokens [M], got {tuple(hidden.shape)} and {tuple(tokens.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    empty = tokens.new_zeros(0) if suppressed is None else suppressed
    logp, entropy = _LinearLogprobs.apply(hidden, weight, tokens, empty, float(temperature), bool(with_entropy),
                                          int(chunk_tokens))
    return logp, (entropy if with_entropy else None)


def _chunk_logits(h: Tensor, weight: Tensor, suppressed: Tensor, temperature: float) -> Tensor:
    z = (h.to(weight.dtype) @ weight.t()).float()
    if temperature != 1.0:
        z = z / temperature
    if suppressed.numel():
        z.index_fill_(-1, suppressed, float("-inf"))
    return z


class _LinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, tokens, suppressed, temperature, with_entropy, chunk_tokens):
        logp = torch.empty(tokens.shape, dtype=torch.float32, device=hidden.device)
        entropy = torch.zeros_like(logp)
        for start in range(0, hidden.shape[0], chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            z = _chunk_logits(hidden[rows], weight, suppressed, temperature)
            lse = torch.logsumexp(z, dim=-1)
            logp[rows] = z.gather(-1, tokens[rows, None]).squeeze(-1) - lse
            if with_entropy:
                p = torch.exp(z - lse[:, None])
                entropy[rows] = lse - (p * z.clamp(min=torch.finfo(torch.float32).min)).sum(dim=-1)
        ctx.save_for_backward(hidden, weight, tokens, suppressed)
        ctx.temperature, ctx.with_entropy, ctx.chunk_tokens = temperature, with_entropy, chunk_tokens
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, tokens, suppressed = ctx.saved_tensors
        grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if ctx.needs_input_grad[1] else None
        for start in range(0, hidden.shape[0], ctx.chunk_tokens):
            rows = slice(start, start + ctx.chunk_tokens)
            grad_z = _grad_logits(hidden[rows], weight, tokens[rows], suppressed, ctx, grad_logp[rows],
                                  None if grad_entropy is None else grad_entropy[rows]).to(weight.dtype)
            if grad_hidden is not None:
                grad_hidden[rows] = (grad_z @ weight).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += (grad_z.t() @ hidden[rows].to(weight.dtype)).float()
        grad_weight = None if grad_weight is None else grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


def _grad_logits(h: Tensor, weight: Tensor, tokens: Tensor, suppressed: Tensor, ctx, g_logp: Tensor,
                 g_entropy: Tensor | None) -> Tensor:
    """dL/d(h W^T) for one chunk (the 1/tau of z = logits / tau applied)."""
    z = _chunk_logits(h, weight, suppressed, ctx.temperature)
    p = torch.softmax(z, dim=-1)
    grad = -p * g_logp[:, None]
    grad.scatter_add_(-1, tokens[:, None], g_logp[:, None])
    if ctx.with_entropy and g_entropy is not None:
        z = z.clamp(min=torch.finfo(torch.float32).min)
        mean_z = (p * z).sum(dim=-1, keepdim=True)
        grad -= g_entropy[:, None] * p * (z - mean_z)
    return grad if ctx.temperature == 1.0 else grad / ctx.temperature
