"""Qwen2.5-VL inputs, built in one place: the processor factory, the image rule and chat messages of
the reference (docs/method.md §2), one prompt's tensors, and the forward kwargs that score G completions of it.

Generation actors, the learner and evaluation all go through these functions, so the tokens a
completion was sampled after are exactly the tokens the learner scores it after.

    Prompt --encode_prompt--> PromptInputs --model_inputs(+ G completions)--> forward kwargs
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image
from transformers import AutoProcessor, Qwen2_5_VLProcessor
from transformers.processing_utils import ProcessorMixin
from transformers.utils import is_torchvision_available

from core.images import MAX_ASPECT_RATIO, MAX_IMAGE_PIXELS
from core.records import IMAGE_PLACEHOLDER, Prompt

if TYPE_CHECKING:  # only attributes are read; keeps this module free of the config's dependencies
    from core.config import DataConfig

PROCESSOR_KEYS = {"input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw"}
"""What the transformers-5 processor returns for one text + one image; anything else fails loudly."""


class CpuQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
    """Qwen2.5-VL processor without the torchvision-only video processor (images and text only).

    `ProcessorMixin` derives the sub-processors from `__init__`'s signature, so leaving out
    `video_processor` is enough; it loads folders saved with or without a video processor.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


def load_processor(path: str | Path) -> Qwen2_5_VLProcessor:
    """The processor of the model folder at `path`: stock `AutoProcessor` where torchvision exists
    (GPU machines, the same class vLLM loads), else the CPU subclass with the PIL image processor."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"model folder {path} does not exist; build the tiny model "
                         "(`perception-r1 build-tiny-model`) or set model.path to a local model folder")
    try:
        if is_torchvision_available():
            return AutoProcessor.from_pretrained(path)
        return CpuQwen2_5_VLProcessor.from_pretrained(path)
    except (OSError, ValueError) as e:  # transformers: missing files (OSError), broken JSON (ValueError)
        raise ValueError(f"model folder {path} has no loadable processor ({type(e).__name__}: {e}); it needs the "
                         "processor and tokenizer files saved with the model (preprocessor_config.json, "
                         "tokenizer.json, tokenizer_config.json)") from None


# ------------------------------------------------------------------------------------------ image
def prepare_image(data: bytes, *, min_pixels: int, max_pixels: int, source: str = "") -> Image.Image:
    """Decode an encoded image and apply the reference's rule (docs/method.md §2): if w*h > max_pixels or
    < min_pixels, scale both sides by sqrt(limit / (w*h)), int-truncated, PIL's default resampling;
    then convert to RGB."""
    image = _decode(data, source=source)
    if image.width * image.height > max_pixels:
        image = _scale(image, math.sqrt(max_pixels / (image.width * image.height)))
    if image.width * image.height < min_pixels:
        image = _scale(image, math.sqrt(min_pixels / (image.width * image.height)))
    if max(image.size) > MAX_ASPECT_RATIO * min(image.size):
        raise ValueError(f"image of {source or 'a prompt'} is {image.width}x{image.height}, more elongated than "
                         f"{MAX_ASPECT_RATIO}:1, which the Qwen2.5-VL processor refuses; crop or pad it in the dataset")
    if image.mode != "RGB":
        image = image.convert("RGB")
    return image


def _decode(data: bytes, *, source: str) -> Image.Image:
    where = source or "a prompt"
    try:
        image = Image.open(io.BytesIO(data))
        if image.width * image.height > MAX_IMAGE_PIXELS:
            raise ValueError(f"image of {where} is {image.width}x{image.height} pixels, over the "
                             f"{MAX_IMAGE_PIXELS:,}-pixel limit for decoding; downscale it in the dataset")
        image.load()
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"image of {where} cannot be decoded ({type(e).__name__}: {e}); "
                         "re-encode it as PNG or JPEG or drop the row from the dataset") from None
    if image.width == 0 or image.height == 0:
        raise ValueError(f"image of {where} is empty ({image.width}x{image.height}); drop the row from the dataset")
    return image


def _scale(image: Image.Image, factor: float) -> Image.Image:
    size = (max(1, int(image.width * factor)), max(1, int(image.height * factor)))
    return image.resize(size)


def image_inputs(processor: Qwen2_5_VLProcessor, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixel_values [N, C*T*P*P] float, image_grid_thw [1, 3] long) of one prepared image."""
    out = processor.image_processor(images=[image], return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


# --------------------------------------------------------------------------------------- messages
def build_messages(problem: str, *, format_prompt: str) -> list[dict]:
    """The reference's chat: one user message of `problem + " " + format_prompt.strip()`, split on
    `<image>` with an image entry at the split point and text entries for non-empty pieces. No system
    message: the chat template adds its default one."""
    count = problem.count(IMAGE_PLACEHOLDER)
    if count != 1:
        raise ValueError(f"problem must contain exactly one {IMAGE_PLACEHOLDER} (found {count}): {problem[:80]!r}; "
                         f"put one {IMAGE_PLACEHOLDER} where the image goes")
    text = problem + " " + format_prompt.strip()
    content: list[dict] = []
    for i, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if i > 0:
            content.append({"type": "image"})
        if piece:
            content.append({"type": "text", "text": piece})
    return [{"role": "user", "content": content}]


# ---------------------------------------------------------------------------------------- tensors
class PromptTooLong(ValueError):
    """The templated prompt exceeds `data.max_prompt_tokens`; callers skip the prompt and count it."""


@dataclass(frozen=True)
class PromptInputs:
    """One prompt as the model sees it (image placeholder expanded to its vision tokens)."""

    input_ids: torch.Tensor
    """long [P]: the chat-templated prompt, ending with `<|im_start|>assistant\\n`."""
    mm_token_type_ids: torch.Tensor
    """int [P]: 1 at image tokens, 0 at text; transformers 5 computes the 3-D rope positions from it."""
    pixel_values: torch.Tensor
    """float [N, C*T*P*P]: the image's flattened patches, as the processor returns them."""
    image_grid_thw: torch.Tensor
    """long [1, 3]: the image's patch grid (temporal, height, width)."""

    @property
    def num_tokens(self) -> int:
        """P: completions start at this index in every sequence `model_inputs` builds."""
        return int(self.input_ids.shape[0])

    def generate_kwargs(self) -> dict[str, torch.Tensor]:
        """Batch-of-one kwargs for `model.generate` (or a forward over the prompt alone)."""
        return {"input_ids": self.input_ids[None], "attention_mask": torch.ones_like(self.input_ids)[None],
                "mm_token_type_ids": self.mm_token_type_ids[None], "pixel_values": self.pixel_values,
                "image_grid_thw": self.image_grid_thw}


def encode_prompt(processor: Qwen2_5_VLProcessor, prompt: Prompt, *, data: DataConfig) -> PromptInputs:
    """The prompt's tensors: docs/method.md §2 image rule, messages, chat template with the generation prompt."""
    try:
        messages = build_messages(prompt.problem, format_prompt=data.format_prompt)
    except ValueError as e:
        raise ValueError(f"prompt {prompt.id}: {e}") from None
    image = prepare_image(prompt.image, min_pixels=data.min_pixels, max_pixels=data.max_pixels, source=prompt.id)
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    out = processor(text=[text], images=[image], return_tensors="pt")
    assert set(out.keys()) == PROCESSOR_KEYS, f"processor returned {sorted(out.keys())}, expected {sorted(PROCESSOR_KEYS)}"
    num_tokens = out["input_ids"].shape[1]
    if num_tokens > data.max_prompt_tokens:
        raise PromptTooLong(f"prompt {prompt.id} has {num_tokens} tokens, over data.max_prompt_tokens="
                            f"{data.max_prompt_tokens}; raise it or lower data.max_pixels")
    return PromptInputs(input_ids=out["input_ids"][0].long(), mm_token_type_ids=out["mm_token_type_ids"][0],
                        pixel_values=out["pixel_values"], image_grid_thw=out["image_grid_thw"].long())


def model_inputs(prompt_inputs: PromptInputs, completions: list[torch.Tensor], *, pad_id: int) -> dict[str, torch.Tensor]:
    """Forward kwargs for G sequences `prompt + completion_i`, right-padded with `pad_id`.

    The image tensors are repeated once per sequence (the model pairs every image-token run with
    its own image). Completion token j of sequence i is at position P + j, so its logits are at
    `logits[i, P - 1 + j]` with P = `prompt_inputs.num_tokens`.
    """
    assert completions, "model_inputs needs at least one completion"
    num_seqs, prompt_len = len(completions), prompt_inputs.num_tokens
    length = prompt_len + max(len(c) for c in completions)
    input_ids = torch.full((num_seqs, length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((num_seqs, length), dtype=torch.long)
    mm_token_type_ids = torch.zeros((num_seqs, length), dtype=prompt_inputs.mm_token_type_ids.dtype)
    for i, completion in enumerate(completions):
        end = prompt_len + len(completion)
        input_ids[i, :prompt_len] = prompt_inputs.input_ids
        input_ids[i, prompt_len:end] = completion
        attention_mask[i, :end] = 1
        mm_token_type_ids[i, :prompt_len] = prompt_inputs.mm_token_type_ids
    return {"input_ids": input_ids, "attention_mask": attention_mask, "mm_token_type_ids": mm_token_type_ids,
            "pixel_values": prompt_inputs.pixel_values.repeat(num_seqs, 1),
            "image_grid_thw": prompt_inputs.image_grid_thw.repeat(num_seqs, 1)}


VISION_SPECIAL_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
"""Tokens a completion must never contain: an `<|image_pad|>` in a completion would be read as an
image placeholder when the learner scores it. Generation suppresses them and the learner masks the
same logits, so behaviour and learner distributions stay the same distribution."""


def suppressed_token_ids(tokenizer) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(t) for t in VISION_SPECIAL_TOKENS]
