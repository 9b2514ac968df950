"""The tiny-model kit: a tiny random Qwen2.5-VL built offline, once, and cached on disk.

`build_tiny_model(cfg)` returns a folder that loads exactly like a real model folder
(`AutoModelForImageTextToText.from_pretrained(path)`, `core.vl.load_processor(path)`):
- a `Qwen2_5_VLForConditionalGeneration` with random weights (seeded) from a tiny config;
- a byte-level BPE tokenizer trained on the spot on synthetic geometry text, with Qwen's special
  tokens, Qwen's chat template and digits split one per token like Qwen's; whole words and the
  format tags (`<think>\\n`, `</think>\\n`, `\\boxed{` ...) become single tokens, so a worked
  solution is short (~55 tokens) and a small model can learn the format;
- the Qwen2.5-VL processor with the PIL image processor and a small pixel budget (an image becomes
  4 to 16 vision tokens).

The folder is `<cache_dir>/<hash of the config and builder version>`; it is written into a temporary
folder and renamed into place, so a crash never leaves a half-built model, and concurrent builders
(several actors) at worst build twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from core.config import FORMAT_PROMPT, TinyModelConfig

BUILDER_VERSION = 1
"""Bump when the builder's output changes, so cached folders built by older code are not reused."""
MARKER = "tiny_model.json"
"""Written last into a finished folder: the config it was built from and its hash."""
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
"""Qwen2.5-VL's special tokens, in its id order."""
PATCH_SIZE, MERGE_SIZE, TEMPORAL_PATCH_SIZE = 14, 2, 2
MIN_PIXELS, MAX_PIXELS = 56 * 56, 112 * 112
"""The tiny processor's pixel budget: 4 to 16 vision tokens per image (the real model: up to 12845056)."""
CORPUS_SEED, CORPUS_PROBLEMS = 20_251_124, 3000
"""The tokenizer's training text: this many synthetic problems of a fixed seed (any dataset seed reuses them)."""
PRETOKENIZE_PATTERN = (
    r"</?(?:think|answer)>\n?|\\boxed\{"  # the format's tags as whole pieces
    r"|(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
"""Qwen2's pre-tokenizer pattern (words, single digits, punctuation runs) with the format tags in front."""
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: "
    "{% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
"""Qwen2.5-VL-Instruct's chat template (default system turn `You are a helpful assistant.`)."""


def build_tiny_model(cfg: TinyModelConfig) -> Path:
    """The folder of the tiny model for `cfg`, building it first if no finished build exists."""
    digest = config_hash(cfg)
    target = tiny_model_folder(cfg)
    if (target / MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        _build_into(staging, cfg)
        (staging / MARKER).write_text(json.dumps({"hash": digest, "config": cfg.model_dump()}, indent=2))
        _make_readable(staging)
        os.rename(staging, target)
    except OSError:
        if not (target / MARKER).is_file():  # not a concurrent builder that finished first
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def tiny_model_folder(cfg: TinyModelConfig) -> Path:
    """Where `build_tiny_model(cfg)` puts (or finds) the folder; built or not."""
    return Path(cfg.cache_dir) / f"tiny-qwen2_5_vl-{config_hash(cfg)[:16]}"


def _make_readable(folder: Path) -> None:
    """mkdtemp (and safetensors) create owner-only modes; a model folder is for every local user."""
    folder.chmod(0o755)
    for path in folder.iterdir():
        path.chmod(0o644)


def config_hash(cfg: TinyModelConfig) -> str:
    """sha256 of everything that determines the build (the cache folder is not part of it)."""
    spec = {"builder": BUILDER_VERSION, **cfg.model_dump(exclude={"cache_dir"})}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def _build_into(folder: Path, cfg: TinyModelConfig) -> None:
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    from core.vl import CpuQwen2_5_VLProcessor

    tokenizer = _train_tokenizer(cfg.vocab_size)
    image_processor = Qwen2VLImageProcessorPil(patch_size=PATCH_SIZE, merge_size=MERGE_SIZE,
                                               temporal_patch_size=TEMPORAL_PATCH_SIZE,
                                               min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    processor = CpuQwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)
    torch.manual_seed(cfg.seed)
    model = Qwen2_5_VLForConditionalGeneration(model_config(cfg, tokenizer))
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.pad_token_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    _make_stock_loadable(folder)


def _train_tokenizer(vocab_size: int):
    """Byte-level BPE on synthetic geometry text + the format prompt + the chat template's words."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from dataprep.synthetic import text_corpus

    corpus = text_corpus(seed=CORPUS_SEED, num_problems=CORPUS_PROBLEMS)
    corpus += [FORMAT_PROMPT, "system\nYou are a helpful assistant.\n", "user\n", "assistant\n"] * 100
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=SPECIAL_TOKENS[1:], chat_template=CHAT_TEMPLATE,
                                   model_max_length=32768)


def model_config(cfg: TinyModelConfig, tokenizer):
    """A Qwen2.5-VL config of the tiny sizes: head_dim 32 (16 when hidden is not a multiple of 32)."""
    from transformers import Qwen2_5_VLConfig

    if cfg.hidden_size % 16:
        raise ValueError(f"model.hidden_size={cfg.hidden_size} must be a multiple of 16 (attention heads of 16 or 32)")
    head_dim = 32 if cfg.hidden_size % 32 == 0 else 16
    num_heads = cfg.hidden_size // head_dim
    half = head_dim // 2  # mrope splits the rotary half-dimension into (temporal, height, width)
    mrope_section = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text_config = dict(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=4 * cfg.hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_heads // 2 if num_heads % 2 == 0 else num_heads, max_position_embeddings=8192,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope_section},
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    vision_config = dict(
        depth=2, hidden_size=64, intermediate_size=128, num_heads=2, patch_size=PATCH_SIZE,
        spatial_merge_size=MERGE_SIZE, temporal_patch_size=TEMPORAL_PATCH_SIZE, window_size=2 * PATCH_SIZE * MERGE_SIZE,
        out_hidden_size=cfg.hidden_size, fullatt_block_indexes=[1])
    return Qwen2_5_VLConfig(
        text_config=text_config, vision_config=vision_config, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"])


def _make_stock_loadable(folder: Path) -> None:
    """Name the stock processor class and nest a video processor config, so that stock `AutoProcessor`
    (and vLLM) load the folder where torchvision exists; the CPU subclass ignores both."""
    for name in ("processor_config.json", "tokenizer_config.json"):
        path = folder / name
        data = json.loads(path.read_text())
        data["processor_class"] = "Qwen2_5_VLProcessor"
        if name == "processor_config.json":
            data["video_processor"] = {
                "video_processor_type": "Qwen2VLVideoProcessor", "patch_size": PATCH_SIZE, "merge_size": MERGE_SIZE,
                "temporal_patch_size": TEMPORAL_PATCH_SIZE,
                "size": {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}}
        path.write_text(json.dumps(data, indent=2, sort_keys=True))
