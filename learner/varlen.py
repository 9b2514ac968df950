"""Variable-length attention over packed rows, and the three patches to transformers' Qwen2.5-VL that
let the learner run a padding-free micro-batch (quarantined here, one named function per patch):

- `patch_text_attention`: a decoder layer's attention takes `cu_seqlens`/`max_seqlen` and runs causal
  varlen attention, each packed sequence seeing only itself (transformers' SDPA path would attend
  across the whole packed row; its flash path needs the flash-attn package, which we do not ship);
- `patch_vision_attention`: the vision tower's attention runs one varlen call per block instead of a
  Python loop of one SDPA call per window (7,712 calls a step at the 3B shape);
- `patch_root_forward`: `model(packed=fn)` runs `fn(model)` inside the root module's forward, so that
  FSDP2 gathers the root's parameters (embeddings, final norm, lm_head, vision patch embed and merger)
  for a forward that calls the submodules directly.

Without `cu_seqlens` the text attention runs transformers' own forward, so the padded path is unchanged.
Kernels: torch's `varlen_attn` (flash) on CUDA in bf16/fp16; otherwise, and on CPU, SDPA once per
sequence, which is exact and is what the CPU tests compare against the padded path.
"""

from __future__ import annotations

import inspect
import itertools
import sys
import types

import torch
import torch.nn.functional as F
from torch import Tensor


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, *, cu_seqlens: Tensor, max_seqlen: int, causal: bool,
                     scale: float) -> Tensor:
    """Attention within each packed sequence: q [N, Hq, D], k/v [N, Hkv, D], cu_seqlens int32 [S+1] ->
    [N, Hq, D]. Grouped-query heads (Hq a multiple of Hkv) are shared as in the model."""
    if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
        return _flash_varlen(q, k, v, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, causal=causal, scale=scale)
    return _sdpa_per_sequence(q, k, v, cu_seqlens=cu_seqlens, causal=causal, scale=scale)


def _flash_varlen(q: Tensor, k: Tensor, v: Tensor, *, cu_seqlens: Tensor, max_seqlen: int, causal: bool,
                  scale: float) -> Tensor:
    from torch.nn.attention.varlen import varlen_attn

    kwargs = {"scale": scale, "window_size": (-1, 0) if causal else (-1, -1)}
    cu = cu_seqlens.to(torch.int32)
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in inspect.signature(varlen_attn).parameters:
            kwargs["enable_gqa"] = True
        elif not _GQA_NATIVE.get(q.device, False):  # torch 2.11: share the kv heads by copying them
            repeat = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    return varlen_attn(q.contiguous(), k.contiguous(), v.contiguous(), cu, cu, max_seqlen, max_seqlen, **kwargs)


_GQA_NATIVE: dict[torch.device, bool] = {}
"""Per device: whether this torch's varlen kernel takes fewer kv heads than query heads (flash supports
it; torch 2.11's wrapper has no `enable_gqa` flag), probed at load against the copied-heads result."""


def probe_native_gqa(device: torch.device) -> bool:
    """Run once at load (outside any forward: a probe inside a checkpointed block would change what
    the recomputation saves). Remembers and returns the answer."""
    if device.type != "cuda":
        return False
    if device not in _GQA_NATIVE:
        from torch.nn.attention.varlen import varlen_attn

        _GQA_NATIVE[device] = _native_gqa_agrees(varlen_attn, device)
    return _GQA_NATIVE[device]


def _native_gqa_agrees(varlen_attn, device: torch.device) -> bool:
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(96, h, 64, device=device, dtype=torch.bfloat16, generator=g) for h in (4, 2, 2))
    cu = torch.tensor([0, 40, 96], dtype=torch.int32, device=device)
    try:
        q_, k_, v_ = (t.clone().requires_grad_() for t in (q, k, v))
        out = varlen_attn(q_, k_, v_, cu, cu, 56, 56, window_size=(-1, 0))
        out.float().square().sum().backward()
    except (RuntimeError, ValueError):
        return False
    kr, vr = (t.repeat_interleave(2, dim=1).requires_grad_() for t in (k, v))
    qr = q.clone().requires_grad_()
    ref = varlen_attn(qr, kr, vr, cu, cu, 56, 56, window_size=(-1, 0))
    ref.float().square().sum().backward()
    same = torch.allclose(out.float(), ref.float(), atol=2e-2) and torch.allclose(q_.grad.float(), qr.grad.float(), atol=5e-2)
    if not same or k_.grad is None or k_.grad.shape != k.shape:
        return False
    return torch.allclose(k_.grad.float(), kr.grad.float().view(96, 2, 2, 64).sum(2), atol=5e-2)


def _sdpa_per_sequence(q: Tensor, k: Tensor, v: Tensor, *, cu_seqlens: Tensor, causal: bool, scale: float) -> Tensor:
    out = []
    bounds = cu_seqlens.tolist()
    gqa = q.shape[1] != k.shape[1]
    for start, end in itertools.pairwise(bounds):
        qs, ks, vs = (t[start:end].transpose(0, 1)[None] for t in (q, k, v))
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=scale, enable_gqa=gqa)
        out.append(o[0].transpose(0, 1))
    return torch.cat(out)


def max_seqlen_of(cu_seqlens: Tensor) -> int:
    """The longest sequence of `cu_seqlens`, read once per tensor (one host sync, memoised on the tensor)."""
    cached = getattr(cu_seqlens, "_learner_max_seqlen", None)
    if cached is None:
        cached = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        cu_seqlens._learner_max_seqlen = cached
    return cached


# ---------------------------------------------------------------------------------------- patches
def patch_text_attention(attn: torch.nn.Module) -> None:
    """Reason: transformers' SDPA attention has no varlen mode; packed rows need one (see module doc)."""
    attn.forward = types.MethodType(_text_attention_forward, attn)


def _text_attention_forward(self, hidden_states: Tensor, attention_mask=None, position_ids=None,
                            position_embeddings=None, *, cu_seqlens: Tensor | None = None,
                            max_seqlen: int | None = None, **kwargs):
    if cu_seqlens is None:
        return type(self).forward(self, hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                                  position_embeddings=position_embeddings, **kwargs)
    rotary = sys.modules[type(self).__module__].apply_rotary_pos_emb
    tokens = hidden_states.shape[1]  # [1, N, hidden]: one packed row
    q = self.q_proj(hidden_states[0]).view(tokens, -1, self.head_dim)
    k = self.k_proj(hidden_states[0]).view(tokens, -1, self.head_dim)
    v = self.v_proj(hidden_states[0]).view(tokens, -1, self.head_dim)
    cos, sin = position_embeddings
    q, k = rotary(q, k, cos[0], sin[0], unsqueeze_dim=1)
    out = varlen_attention(q, k, v, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, causal=True, scale=self.scaling)
    return self.o_proj(out.reshape(1, tokens, -1)), None


def patch_vision_attention(attn: torch.nn.Module) -> None:
    """Reason: without flash-attn, transformers runs the tower's window attention as one SDPA call per
    window; this runs each block's windows (or whole images) as one varlen call."""
    attn.forward = types.MethodType(_vision_attention_forward, attn)


def unpatch(module: torch.nn.Module) -> None:
    """Back to the class's own forward (the benchmark measures the unpatched path this way)."""
    module.__dict__.pop("forward", None)


def _vision_attention_forward(self, hidden_states: Tensor, cu_seqlens: Tensor, position_embeddings=None,
                              max_seqlen: int | None = None, **kwargs) -> Tensor:
    rotary = sys.modules[type(self).__module__].apply_rotary_pos_emb_vision
    tokens = hidden_states.shape[0]
    q, k, v = self.qkv(hidden_states).reshape(tokens, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    q, k = rotary(q, k, cos, sin)
    longest = max_seqlen if isinstance(max_seqlen, int) else max_seqlen_of(cu_seqlens)
    out = varlen_attention(q, k, v, cu_seqlens=cu_seqlens, max_seqlen=longest, causal=False, scale=self.scaling)
    return self.proj(out.reshape(tokens, -1))


def patch_root_forward(model: torch.nn.Module) -> None:
    """Reason: FSDP2 gathers the root's parameters only inside the root's forward; `model(packed=fn)`
    runs `fn(model)` there. Any other call is the model's own forward."""
    model.forward = types.MethodType(_root_forward, model)


def _root_forward(self, *args, packed=None, **kwargs):
    if packed is not None:
        return packed(self)
    return type(self).forward(self, *args, **kwargs)


def patch_policy(model: torch.nn.Module, *, device: torch.device) -> None:
    """All three patches on a Qwen2.5-VL policy (call before sharding)."""
    if device.type == "cuda":
        probe_native_gqa(torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index))
    for layer in model.model.language_model.layers:
        patch_text_attention(layer.self_attn)
    set_vision_varlen(model, enabled=True)
    patch_root_forward(model)


def set_vision_varlen(model: torch.nn.Module, *, enabled: bool) -> None:
    for block in model.model.visual.blocks:
        if enabled:
            patch_vision_attention(block.attn)
        else:
            unpatch(block.attn)
