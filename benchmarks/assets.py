"""Model folders for GPU tests and benchmarks at real scale, written offline: the published
Qwen2.5-VL-3B/7B-Instruct configs (random or vLLM-dummy weights), a tiny model of the same
architecture with saved random weights, a byte-level tokenizer with Qwen's special-token ids and
chat template, and the Qwen2.5-VL image-processor config; and text-only judge LLM folders (the published
Qwen2.5-7B-Instruct and Qwen2.5-32B-Instruct-AWQ configs, no weights: vLLM's `load_format="dummy"`).
Nothing is downloaded.

    python -m benchmarks.assets DIR      # DIR/tiny-vl (weights), DIR/vl3b, DIR/vl7b (config only)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from perception_r1.tiny_model import CHAT_TEMPLATE

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                 "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                 "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
FIRST_SPECIAL = 151643
VISION_7B = {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
             "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2,
             "spatial_patch_size": 14, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
             "tokens_per_second": 2, "temporal_patch_size": 2}
VL7B = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu",
    "hidden_size": 3584, "initializer_range": 0.02, "intermediate_size": 18944, "max_position_embeddings": 128000,
    "max_window_layers": 28, "model_type": "qwen2_5_vl", "num_attention_heads": 28, "num_hidden_layers": 28,
    "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False,
    "vision_config": VISION_7B, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vocab_size": 152064,
}
"""Qwen/Qwen2.5-VL-7B-Instruct's config.json as published."""
VL3B = dict(VL7B, hidden_size=2048, intermediate_size=11008, num_attention_heads=16, num_hidden_layers=36,
            num_key_value_heads=2, max_window_layers=70, tie_word_embeddings=True, vocab_size=151936,
            vision_config=dict(VISION_7B, out_hidden_size=2048))
"""Qwen/Qwen2.5-VL-3B-Instruct's published shape (the same vision tower, a smaller language model)."""
TINY = dict(VL7B, hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
            num_hidden_layers=2, max_window_layers=2, max_position_embeddings=8192,
            rope_scaling={"type": "mrope", "mrope_section": [8, 12, 12]},
            vision_config=dict(VISION_7B, depth=2, hidden_size=128, intermediate_size=256, num_heads=2,
                               out_hidden_size=256, fullatt_block_indexes=[1]))
"""The real architecture, tiny (head_dim 64, which every attention kernel supports)."""
PREPROCESSOR = {"min_pixels": 3136, "max_pixels": 1280 * 28 * 28, "patch_size": 14, "temporal_patch_size": 2,
                "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711],
                "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor"}
SHAPES = {"tiny-vl": TINY, "vl3b": VL3B, "vl7b": VL7B}
JUDGE7B = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
    "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02, "intermediate_size": 18944,
    "max_position_embeddings": 32768, "max_window_layers": 28, "model_type": "qwen2", "num_attention_heads": 28,
    "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": 131072, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
    "use_sliding_window": False, "vocab_size": 152064,
}
"""Qwen/Qwen2.5-7B-Instruct's config.json as published (a text-only judge)."""
JUDGE32B_AWQ = dict(JUDGE7B, hidden_size=5120, intermediate_size=27648, num_attention_heads=40, num_hidden_layers=64,
                    num_key_value_heads=8, max_window_layers=64, torch_dtype="float16",
                    quantization_config={"bits": 4, "group_size": 128, "modules_to_not_convert": None,
                                         "quant_method": "awq", "version": "gemm", "zero_point": True})
"""Qwen/Qwen2.5-32B-Instruct-AWQ's config.json (the reference recipe's judge): 4-bit AWQ, fp16."""
JUDGE_SHAPES = {"judge7b": JUDGE7B, "judge32b_awq": JUDGE32B_AWQ}


def byte_tokenizer():
    """Byte-level BPE without merges (one token per byte), Qwen's special tokens at Qwen's ids."""
    from transformers import AddedToken
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs, n = bs[:], 0
    for b in range(256):  # GPT-2's bytes_to_unicode
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    vocab = {chr(c): i for i, c in enumerate(cs)}
    for i in range(len(vocab), FIRST_SPECIAL):
        vocab[f"<fill{i}>"] = i
    for j, token in enumerate(QWEN_SPECIALS):
        vocab[token] = FIRST_SPECIAL + j
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None)
    tok.add_special_tokens({"additional_special_tokens": [AddedToken(t, special=True) for t in QWEN_SPECIALS[1:]]})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def write_model_dir(path: Path, config: dict, *, weights: bool, seed: int = 0) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    tok = byte_tokenizer()
    tok.save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=1))
    (path / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    (path / "config.json").write_text(json.dumps(config, indent=1))
    if weights:
        import torch
        from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration._from_config(AutoConfig.from_pretrained(path), dtype=torch.bfloat16)
        model.generation_config.eos_token_id = config["eos_token_id"]
        model.save_pretrained(path)
        (path / "config.json").write_text(json.dumps(config, indent=1))  # keep the hub layout
    return path


def write_judge_dir(path: Path, config: dict) -> Path:
    """A text-only judge LLM folder without weights (for vLLM's `load_format="dummy"`): config.json and the
    byte-level tokenizer with Qwen's special tokens and chat template."""
    path.mkdir(parents=True, exist_ok=True)
    byte_tokenizer().save_pretrained(path)
    (path / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    (path / "config.json").write_text(json.dumps(config, indent=1))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dir", type=Path)
    args = parser.parse_args()
    for name, config in SHAPES.items():
        print(write_model_dir(args.dir / name, config, weights=name == "tiny-vl"))


if __name__ == "__main__":
    main()
