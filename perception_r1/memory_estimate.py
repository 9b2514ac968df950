"""How much GPU memory one learner worker needs at its peak, estimated from the model folder's
config.json (no weights loaded, no torch imported) and the learner config: what the code of
learner/policy.py, learner/packed.py and learner/fused_logprobs.py allocates.

Per learner GPU, with P parameters (P_t trainable), W = learner.num_workers FSDP2 ranks, b bytes per
element of the compute dtype (2 for bfloat16, 4 for float32) and T tokens in a micro-batch:

    parameters      4 P / W                     fp32 master weights, sharded (and 4 P / W more for a frozen
                                                reference model when kl_coef > 0)
    gradients       4 P_t / W                   fp32, sharded
    optimizer       8 P_t / W                   AdamW's two fp32 moments, sharded (fused on CUDA: no temporaries)
    fsdp buffers    b (2 block + root) + (b + 4) block
                                                two gathered blocks (the current one and the prefetched one),
                                                the root's params (embeddings, lm_head) gathered for the whole
                                                step, one block's gradient in b and in fp32 for reduce-scatter
    activations     T x layers x per-token bytes of a decoder layer (below), or b h per layer for a
                    checkpointed one plus one layer recomputed; the vision tower alike per image patch
    ipc buffer      b P, when the learner shares its GPU with an engine (weights handed over by CUDA IPC)
    logits          packed: one chunk of C = 2,048 tokens at a time: 4 fp32 [C, V] temporaries in the
                    backward (z, p, -p, the gradient) plus lm_head's fp32 gradient [V, H], its matmul
                    product in b and fp32; padded: [T, V] logits in b, their fp32 copy and gradient

A decoder layer saves per token (eager, the HF Qwen2 layer): two RMSNorms that upcast to fp32
(4h + 2bh each: the fp32 input, the normalised value, the weighted output), attention's q, k, v and
output (b (2h + 2 kv)), the SwiGLU MLP's gate, activation, up and product (4 b I). Compiled blocks
fuse the norms and the activation: 2bh per norm and 3 b I for the MLP. The vision block is the same
with its own sizes. This is an estimate: the allocator's fragmentation and the CUDA context come on
top (`OVERHEAD_GIB`), and a batch of short sequences needs less than a full micro-batch.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from core.config import Config, SyntheticDataConfig

GIB = 2**30
LOGITS_CHUNK_TOKENS = 2048
"""learner/fused_logprobs.py's CHUNK_TOKENS (not imported: that module imports torch)."""
OVERHEAD_GIB = 2.0
"""CUDA context, NCCL buffers and allocator fragmentation: not in torch's allocated-bytes counter."""


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a Qwen2.5-VL that decide its memory, from its config.json."""

    vocab: int
    hidden: int
    intermediate: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tied_embeddings: bool
    vision_hidden: int
    vision_intermediate: int
    vision_depth: int
    vision_heads: int
    vision_out: int
    patch_volume: int
    """in_channels x temporal_patch_size x patch_size^2: the pixels of one patch."""
    merge: int
    """spatial_merge_size: merge^2 patches become one language-model token."""
    patch_size: int

    @classmethod
    def from_config_json(cls, path: str | Path) -> ModelShape:
        """Read `path` (a model folder or its config.json); a missing size raises ValueError naming it."""
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        try:
            raw = json.loads(file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ValueError(f"{file} does not exist: the estimate reads the model's sizes from its config.json; "
                             "point model.path at a model folder") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{file} is not valid JSON ({e}); re-copy the model folder") from None
        return cls.from_dict(raw, source=str(file))

    @classmethod
    def from_dict(cls, raw: dict, *, source: str = "config.json") -> ModelShape:
        text = {**raw, **(raw.get("text_config") or {})}  # transformers 5 nests the text sizes
        vision = raw.get("vision_config") or {}
        need = lambda d, k, where: _need(d, k, where=where, source=source)
        hidden, heads = need(text, "hidden_size", ""), need(text, "num_attention_heads", "")
        return cls(
            vocab=need(text, "vocab_size", ""), hidden=hidden, intermediate=need(text, "intermediate_size", ""),
            num_layers=need(text, "num_hidden_layers", ""), num_heads=heads,
            num_kv_heads=text.get("num_key_value_heads") or heads, head_dim=text.get("head_dim") or hidden // heads,
            tied_embeddings=bool(raw.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
            vision_hidden=need(vision, "hidden_size", "vision_config."),
            vision_intermediate=need(vision, "intermediate_size", "vision_config."),
            vision_depth=need(vision, "depth", "vision_config."), vision_heads=need(vision, "num_heads", "vision_config."),
            vision_out=vision.get("out_hidden_size") or hidden,
            patch_volume=(vision.get("in_channels") or vision.get("in_chans") or 3)
            * (vision.get("temporal_patch_size") or 2) * need(vision, "patch_size", "vision_config.") ** 2,
            merge=vision.get("spatial_merge_size") or 2, patch_size=need(vision, "patch_size", "vision_config."))


def _need(d: dict, key: str, *, where: str, source: str) -> int:
    if not isinstance(d.get(key), int):
        raise ValueError(f"{source}: no integer {where}{key}; is this a Qwen2.5-VL config.json?")
    return d[key]


# ------------------------------------------------------------------------------------- parameters
def text_layer_params(s: ModelShape) -> int:
    """One decoder layer: q, k, v (with biases), o, gate, up, down, two RMSNorms."""
    q, kv = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
    return s.hidden * (q + 2 * kv) + q + 2 * kv + q * s.hidden + 3 * s.hidden * s.intermediate + 2 * s.hidden


def vision_block_params(s: ModelShape) -> int:
    """One vision block: qkv and proj (with biases), gate, up, down (with biases), two RMSNorms."""
    h, i = s.vision_hidden, s.vision_intermediate
    return 3 * h * h + 3 * h + h * h + h + 2 * h * i + 2 * i + i * h + h + 2 * h


def vision_params(s: ModelShape) -> int:
    """The tower: patch embedding (no bias), blocks, the merger (RMSNorm, two linears with biases)."""
    merged = s.vision_hidden * s.merge**2
    merger = s.vision_hidden + merged * merged + merged + merged * s.vision_out + s.vision_out
    return s.patch_volume * s.vision_hidden + s.vision_depth * vision_block_params(s) + merger


def root_params(s: ModelShape) -> int:
    """What FSDP2's root unit holds gathered for the whole step: the embeddings and the output head."""
    return s.vocab * s.hidden * (1 if s.tied_embeddings else 2)


def num_params(s: ModelShape) -> int:
    return root_params(s) + s.num_layers * text_layer_params(s) + s.hidden + vision_params(s)


# ------------------------------------------------------------------------------------ activations
def text_layer_bytes_per_token(s: ModelShape, *, b: int, compiled: bool) -> int:
    """Bytes one decoder layer keeps for the backward pass, per token (module docstring)."""
    h, kv = s.hidden, s.num_kv_heads * s.head_dim
    norm = 2 * b * h if compiled else 4 * h + 2 * b * h
    return 2 * norm + b * (2 * s.num_heads * s.head_dim + 2 * kv) + (3 if compiled else 4) * b * s.intermediate


def vision_block_bytes_per_patch(s: ModelShape, *, b: int, compiled: bool) -> int:
    h = s.vision_hidden
    norm = 2 * b * h if compiled else 4 * h + 2 * b * h
    return 2 * norm + 4 * b * h + (3 if compiled else 4) * b * s.vision_intermediate


def stack_bytes(per_item: int, *, items: int, depth: int, b: int, hidden: int, checkpoint_every: int) -> int:
    """A stack of `depth` blocks over `items` tokens or patches; checkpoint_every k > 0 keeps only the
    input of every k-th block (and recomputes one block at a time); 0: no checkpointing."""
    if checkpoint_every == 0:
        return items * depth * per_item
    checkpointed = math.ceil(depth / checkpoint_every)
    kept = (depth - checkpointed) * per_item + checkpointed * b * hidden
    return items * (kept + (per_item if checkpointed else 0))


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per learner GPU at the step's peak, by part; `total_gib` against `gpu_gib`."""

    parts: dict[str, int]
    tokens: int
    """Tokens of the micro-batch the activations are counted for."""
    patches: int
    """Vision patches of that micro-batch (at most)."""
    num_params: int
    gpu_gib: float

    @property
    def total_gib(self) -> float:
        return sum(self.parts.values()) / GIB + OVERHEAD_GIB

    @property
    def fits(self) -> bool:
        return self.total_gib <= self.gpu_gib

    def lines(self) -> list[str]:
        rows = [f"  {name:<12} {value / GIB:8.1f} GiB" for name, value in self.parts.items()]
        return [f"learner memory per GPU ({self.num_params / 1e9:.2f} B parameters; a micro-batch of {self.tokens:,} "
                f"tokens, {self.patches:,} vision patches):", *rows,
                f"  {'overhead':<12} {OVERHEAD_GIB:8.1f} GiB  (CUDA context, NCCL, fragmentation)",
                f"  {'total':<12} {self.total_gib:8.1f} GiB of {self.gpu_gib:g} GiB per GPU: "
                + ("fits" if self.fits else "DOES NOT FIT")]


def estimate(cfg: Config, shape: ModelShape, *, gpu_gib: float, tokens: int | None = None,
             patches: int | None = None) -> MemoryEstimate:
    """The peak of one learner GPU for `cfg` (a full micro-batch unless `tokens` is given: the token budget,
    or one longest sequence, which a micro-batch holds alone when it is longer; at most
    `micro_batch_patches` vision patches unless `patches` is given)."""
    lc = cfg.learner
    b, w = (2 if lc.dtype == "bfloat16" else 4), lc.num_workers
    longest = cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens
    tokens = tokens if tokens is not None else max(lc.max_tokens_per_micro_batch, longest)
    patches = patches if patches is not None else micro_batch_patches(cfg, shape, tokens=tokens)
    p = num_params(shape)
    trainable = p - (vision_params(shape) if lc.freeze_vision else 0)
    parts = {"parameters": 4 * p // w, "gradients": 4 * trainable // w, "optimizer": 8 * trainable // w}
    if lc.loss.kl_coef > 0:
        parts["reference"] = 4 * p // w
    block = max(text_layer_params(shape), vision_block_params(shape))
    parts["fsdp buffers"] = b * (2 * block + root_params(shape)) + (b + 4) * block
    parts["activations"] = activation_bytes(cfg, shape, b=b, tokens=tokens, patches=patches)
    parts["logits"] = logits_bytes(cfg, shape, b=b, tokens=tokens)
    if cfg.colocated:  # the CUDA-IPC buffer the engine on the same GPU loads from (learner/ipc_weights.py)
        parts["ipc buffer"] = b * p
    return MemoryEstimate(parts=parts, tokens=tokens, patches=patches, num_params=p, gpu_gib=gpu_gib)


def micro_batch_patches(cfg: Config, shape: ModelShape, *, tokens: int) -> int:
    """Vision patches a micro-batch of `tokens` can hold at most. A distinct image is encoded once for
    the rollouts of its group in the micro-batch; a sequence holds at least its image's tokens, the
    format prompt (counted as len/4 tokens, fewer than it has) and one completion token, so at most
    tokens / (n x that) groups fit, plus one cut at each end. Images are data.max_pixels at most
    (synthetic diagrams: their size, scaled into [data.min_pixels, data.max_pixels])."""
    pixels = cfg.data.max_pixels
    if isinstance(cfg.data.dataset, SyntheticDataConfig):
        pixels = min(max(cfg.data.dataset.image_size**2, cfg.data.min_pixels), cfg.data.max_pixels)
    image_tokens = -(-pixels // shape.patch_size**2) // shape.merge**2
    shortest = image_tokens + len(cfg.data.format_prompt) // 4 + 1
    groups = -(-tokens // (cfg.rollout.samples_per_prompt * shortest)) + 2
    return min(groups * image_tokens, tokens) * shape.merge**2


def activation_bytes(cfg: Config, shape: ModelShape, *, b: int, tokens: int, patches: int) -> int:
    lc = cfg.learner
    every = lc.checkpoint_every if lc.gradient_checkpointing else 0
    text = stack_bytes(text_layer_bytes_per_token(shape, b=b, compiled=lc.compile_blocks), items=tokens,
                       depth=shape.num_layers, b=b, hidden=shape.hidden, checkpoint_every=every)
    vision = stack_bytes(vision_block_bytes_per_patch(shape, b=b, compiled=lc.compile_blocks), items=patches,
                         depth=shape.vision_depth, b=b, hidden=shape.vision_hidden, checkpoint_every=every)
    top = tokens * (4 * shape.hidden + 4 * b * shape.hidden)  # embeddings, final norm, the targets' hidden states
    return text + vision + top


def logits_bytes(cfg: Config, shape: ModelShape, *, b: int, tokens: int) -> int:
    """The packed path (GPUs unless learner.packing is never) holds one chunk's logits at a time; the
    padded path holds the micro-batch's."""
    packed = cfg.learner.packing == "always" or (cfg.learner.packing == "auto" and cfg.learner.num_gpus_per_worker > 0)
    head = shape.vocab * shape.hidden
    if not packed:
        return tokens * shape.vocab * (b + 8)
    chunk = min(tokens, LOGITS_CHUNK_TOKENS)
    # a chunk's backward: its fp32 temporaries, then lm_head's gradient product in b and fp32; beside them
    # lm_head's fp32 gradient and the hidden states' gradient for the whole micro-batch
    backward = max(4 * 4 * chunk * shape.vocab + b * chunk * shape.vocab, (b + 4) * head)
    return backward + 4 * head + tokens * shape.hidden * b
