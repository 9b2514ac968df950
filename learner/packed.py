"""The padding-free micro-batch: its sequences (prompt + completion each) concatenated into one row,
each with its own 3-D mrope positions, attention bounded by `cu_seqlens` (learner/varlen.py), each
distinct prompt's image through the vision tower once and its embeddings reused by every rollout of
the group in the micro-batch, and the completion tokens' log-probs taken from the last hidden states
chunk by chunk (learner/fused_logprobs.py), never as [tokens x vocab] logits.

    row     = [prompt_0, completion_0, prompt_1, completion_1, ...]          N tokens, no padding
    targets = the row indices whose hidden state predicts a completion token  M = sum of T_b

Log-probs come back flat [M] and are laid out [B, Tmax] (`PackedRows.unflatten`) for the loss, which
stays `learner/grpo.py`'s.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from learner.fused_logprobs import linear_logprobs
from learner.policy import Sequence, prompt_runs


@dataclass(slots=True)
class PackedRows:
    input_ids: Tensor
    """int64 [N]: every sequence's prompt and completion, back to back."""
    position_ids: Tensor
    """int64 [3, N]: mrope (temporal, height, width) positions, restarting at each sequence."""
    cu_seqlens: Tensor
    """int32 [B+1]: sequence b is input_ids[cu_seqlens[b]:cu_seqlens[b+1]]."""
    max_seqlen: int
    pixel_values: Tensor
    """[patches, D]: the distinct prompts' images, once each."""
    image_grid_thw: Tensor
    """int64 [R, 3]: one row per distinct prompt."""
    image_positions: Tensor
    """int64 [I]: the row indices of image placeholder tokens."""
    image_rows: Tensor
    """int64 [I]: for each placeholder, its row in the vision tower's output."""
    targets: Tensor
    """int64 [M]: the row index whose hidden state predicts each completion token."""
    completion_ids: Tensor
    """int64 [M]: the completion tokens, flat."""
    token_seq: Tensor
    """int64 [M]: the sequence of each completion token."""
    token_pos: Tensor
    """int64 [M]: its position within the completion."""
    completion_mask: Tensor
    """float32 [B, Tmax]: 1 on real completion tokens (the loss's layout)."""
    behaviour_logprobs: Tensor
    """float32 [B, Tmax]."""
    advantages: Tensor
    """float32 [B]."""
    suppressed: Tensor
    """int64 [S]: token ids generation never samples (log-prob -inf there)."""
    vision_inputs: dict
    """The vision tower's index tensors and longest attention spans, computed on the host from
    `image_grid_thw` (transformers' `vision_utils`), so the tower's forward never waits on the GPU."""

    def unflatten(self, flat: Tensor) -> Tensor:
        """Flat [M] -> [B, Tmax], 0 on padding (differentiable)."""
        out = flat.new_zeros(self.completion_mask.shape)
        return out.index_put((self.token_seq, self.token_pos), flat)


def pack_rows(seqs: list[Sequence], *, rope_index: Callable, image_token_id: int, suppressed: list[int],
              vision_config, device: torch.device) -> PackedRows:
    """Build a micro-batch's packed row on the host (pinned when the device is a GPU), then move it."""
    runs = prompt_runs(seqs)
    prompt_pos = _prompt_positions(runs, rope_index=rope_index, image_token_id=image_token_id)
    ids, pos, lengths, image_positions, image_rows, targets = [], [], [], [], [], []
    offset, image_offset = 0, 0
    for run, (positions, delta) in zip(runs, prompt_pos):
        prompt = run[0].prompt_ids
        image_at = (prompt == image_token_id).nonzero().squeeze(-1)
        for s in run:
            p, t = len(prompt), len(s.completion_ids)
            ids += [prompt, s.completion_ids]
            pos += [positions, (p + delta + torch.arange(t)).expand(3, -1)]
            image_positions.append(offset + image_at)
            image_rows.append(image_offset + torch.arange(len(image_at)))
            targets.append(offset + p - 1 + torch.arange(t))
            lengths.append(p + t)
            offset += p + t
        image_offset += len(image_at)
    tensors = dict(
        input_ids=torch.cat(ids), position_ids=torch.cat(pos, dim=1),
        cu_seqlens=torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32),
        pixel_values=torch.cat([run[0].pixel_values for run in runs]),
        image_grid_thw=torch.cat([run[0].image_grid_thw for run in runs]),
        image_positions=torch.cat(image_positions), image_rows=torch.cat(image_rows), targets=torch.cat(targets),
        **_completion_layout(seqs), suppressed=torch.tensor(suppressed, dtype=torch.long))
    vision, spans = _vision_inputs(tensors["image_grid_thw"], vision_config)
    pin = device.type == "cuda"
    move = lambda t: (t.pin_memory() if pin else t).to(device, non_blocking=True)
    return PackedRows(max_seqlen=max(lengths), **{k: move(v) for k, v in tensors.items()},
                      vision_inputs={**{k: move(v) for k, v in vision.items()}, **spans})


def _vision_inputs(grid_thw: Tensor, config) -> tuple[dict[str, Tensor], dict[str, int]]:
    """The tower's position ids, window order and window/image boundaries (keys its forward pops
    from its kwargs), and the longest window and image (ints the varlen kernel sizes its grid by)."""
    from transformers import vision_utils

    merge, window, patch = config.spatial_merge_size, config.window_size, config.patch_size
    cu_seqlens = vision_utils.get_vision_cu_seqlens(grid_thw)
    window_index, cu_window = vision_utils.get_vision_window_index(
        grid_thw, spatial_merge_size=merge, window_size=window, patch_size=patch)
    tensors = {"position_ids": vision_utils.get_vision_position_ids(grid_thw, merge), "cu_seqlens": cu_seqlens,
               "window_index": window_index, "cu_window_seqlens": cu_window}
    longest = lambda cu: int((cu[1:] - cu[:-1]).max()) if len(cu) > 1 else 0
    return tensors, {"max_seqlen": longest(cu_seqlens), "max_window_seqlen": longest(cu_window)}


def _prompt_positions(runs: list[list[Sequence]], *, rope_index: Callable,
                      image_token_id: int) -> list[tuple[Tensor, int]]:
    """Each distinct prompt's mrope positions [3, P] and rope delta (text after it sits at P + delta)."""
    out = []
    for run in runs:
        ids = run[0].prompt_ids[None]
        positions, delta = rope_index(ids, mm_token_type_ids=(ids == image_token_id).long(),
                                      image_grid_thw=run[0].image_grid_thw, attention_mask=torch.ones_like(ids))
        out.append((positions[:, 0], int(delta.reshape(-1)[0])))
    return out


def _completion_layout(seqs: list[Sequence]) -> dict[str, Tensor]:
    tmax = max(len(s.completion_ids) for s in seqs)
    mask, behaviour = torch.zeros((len(seqs), tmax)), torch.zeros((len(seqs), tmax))
    seq_index, pos_index = [], []
    for b, s in enumerate(seqs):
        t = len(s.completion_ids)
        mask[b, :t], behaviour[b, :t] = 1.0, s.behaviour_logprobs
        seq_index.append(torch.full((t,), b, dtype=torch.long))
        pos_index.append(torch.arange(t))
    return {"completion_ids": torch.cat([s.completion_ids for s in seqs]), "token_seq": torch.cat(seq_index),
            "token_pos": torch.cat(pos_index), "completion_mask": mask, "behaviour_logprobs": behaviour,
            "advantages": torch.tensor([s.advantage for s in seqs], dtype=torch.float32)}


# ------------------------------------------------------------------------------------ the forward
def packed_logprobs(model: torch.nn.Module, rows: PackedRows, *, temperature: float,
                    with_entropy: bool) -> tuple[Tensor, Tensor | None]:
    """(log-probs [M], entropy [M] or None) of the completion tokens. Call through the root module
    (`model(packed=...)`, learner/varlen.py) so FSDP2 gathers the root's parameters."""
    lm = model.model.language_model
    hidden = lm.embed_tokens(rows.input_ids)
    if rows.image_positions.numel():
        images = _image_embeds(model.model.visual, rows)
        hidden = hidden.index_put((rows.image_positions,), images[rows.image_rows].to(hidden.dtype))
    hidden = hidden[None]
    position_embeddings = lm.rotary_emb(hidden, rows.position_ids[:, None, :])
    for layer in lm.layers:
        hidden = layer(hidden, attention_mask=None, position_ids=None, position_embeddings=position_embeddings,
                       use_cache=False, cu_seqlens=rows.cu_seqlens, max_seqlen=rows.max_seqlen)
    hidden = lm.norm(hidden)[0]
    return linear_logprobs(hidden[rows.targets], model.lm_head.weight, rows.completion_ids, temperature=temperature,
                           suppressed=rows.suppressed, with_entropy=with_entropy)


def _image_embeds(visual: torch.nn.Module, rows: PackedRows) -> Tensor:
    """The merged vision tokens of every distinct prompt, once each, [I_distinct, hidden]."""
    out = visual(rows.pixel_values, grid_thw=rows.image_grid_thw, **rows.vision_inputs)
    return out.pooler_output if hasattr(out, "pooler_output") else out[1]


# ----------------------------------------------------------------------------------- micro-batches
def token_micro_batches(seqs: list[Sequence], *, max_tokens: int) -> list[list[Sequence]]:
    """Consecutive sequences cut into the fewest parts of at most `max_tokens` tokens (sum, not
    longest x count: there is no padding), the cuts placed so the parts are near equal.

    The order is kept (a linear partition, not Karmarkar-Karp or LPT) because a group's rollouts are
    consecutive: kept together, a group's image goes through the vision tower once per micro-batch
    it lands in, usually one. Cut points: the running token count crossing k/K of the total.
    """
    if not seqs:
        return []
    total = sum(s.num_tokens for s in seqs)
    parts = -(-total // max_tokens)
    while True:
        batches = _cut(seqs, parts=parts, max_tokens=max_tokens)
        if batches is not None:
            return batches
        parts += 1


def _cut(seqs: list[Sequence], *, parts: int, max_tokens: int) -> list[list[Sequence]] | None:
    """`parts` near-equal consecutive parts, or None if one would exceed `max_tokens` (one long sequence
    alone may: a part is never empty)."""
    total = sum(s.num_tokens for s in seqs)
    batches: list[list[Sequence]] = [[]]
    seen = size = 0
    for s in seqs:
        target = total * len(batches) / parts
        if batches[-1] and (seen + s.num_tokens / 2 > target or size + s.num_tokens > max_tokens):
            batches.append([])
            size = 0
        batches[-1].append(s)
        seen += s.num_tokens
        size += s.num_tokens
    if len(batches) > parts and parts < len(seqs):
        return None
    return batches
