"""perception_r1.tiny_model: the cached, deterministic tiny Qwen2.5-VL that loads like a real model."""

import json
import statistics
import time

import pytest
from transformers import AutoModelForImageTextToText, Qwen2_5_VLForConditionalGeneration

from core.config import FORMAT_PROMPT, TinyModelConfig
from core.vl import CpuQwen2_5_VLProcessor, build_messages, load_processor
from dataprep.synthetic import text_corpus
from perception_r1.cli import main
from perception_r1.tiny_model import MARKER, build_tiny_model, config_hash, model_config


def test_build_is_cached_and_atomic(tmp_path):
    cfg = TinyModelConfig(cache_dir=str(tmp_path))
    path = build_tiny_model(cfg)
    start = time.perf_counter()
    assert build_tiny_model(cfg) == path
    assert time.perf_counter() - start < 0.05
    assert json.loads((path / MARKER).read_text())["hash"] == config_hash(cfg)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no staging folder left behind


def test_build_is_deterministic_and_a_config_change_rebuilds(tmp_path, tiny_model_path):
    same = build_tiny_model(TinyModelConfig(cache_dir=str(tmp_path / "a")))
    assert same.name == tiny_model_path.name
    for name in ("model.safetensors", "tokenizer.json", "config.json", "processor_config.json"):
        assert (same / name).read_bytes() == (tiny_model_path / name).read_bytes(), name
    other = build_tiny_model(TinyModelConfig(cache_dir=str(tmp_path / "a"), seed=1))
    assert other != same and other.parent == same.parent
    assert (other / "model.safetensors").read_bytes() != (same / "model.safetensors").read_bytes()
    assert (other / "tokenizer.json").read_bytes() == (same / "tokenizer.json").read_bytes()


def test_loads_by_path_like_a_real_model(tiny_model_path):
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_path)
    processor = load_processor(tiny_model_path)
    assert isinstance(model, Qwen2_5_VLForConditionalGeneration) and isinstance(processor, CpuQwen2_5_VLProcessor)
    text = model.config.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads) == (128, 2, 4)  # head_dim 32
    assert text.rope_parameters["mrope_section"] == [4, 6, 6]  # sums to head_dim / 2
    assert text.vocab_size == len(processor.tokenizer) <= 1024
    assert model.generation_config.eos_token_id == processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert type(processor.image_processor).__name__ == "Qwen2VLImageProcessorPil"
    for name in ("processor_config.json", "tokenizer_config.json"):  # stock AutoProcessor where torchvision exists
        assert json.loads((tiny_model_path / name).read_text())["processor_class"] == "Qwen2_5_VLProcessor"


def test_chat_template_adds_the_default_system_turn(tiny_model_path):
    processor = load_processor(tiny_model_path)
    text = processor.apply_chat_template(build_messages("<image>Find x.", format_prompt=FORMAT_PROMPT),
                                         add_generation_prompt=True, tokenize=False)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    f"<|vision_start|><|image_pad|><|vision_end|>Find x. {FORMAT_PROMPT}<|im_end|>\n"
                    "<|im_start|>assistant\n")


def test_solutions_are_short_and_tags_are_single_tokens(tiny_model_path):
    tokenizer = load_processor(tiny_model_path).tokenizer
    for tag in ("<think>\n", "</think>\n", "<answer>\n", "\\boxed{", "</answer>"):
        assert len(tokenizer.tokenize(tag)) == 1, tag
    assert tokenizer.tokenize("127") == ["1", "2", "7"]  # digits one per token, as Qwen's tokenizer
    solutions = [text.split("\n", 1)[1] for text in text_corpus(seed=3, num_problems=200)]
    lengths = [len(tokenizer(s)["input_ids"]) for s in solutions]
    assert statistics.median(lengths) < 70 and max(lengths) < 90
    assert all(tokenizer.decode(tokenizer(s)["input_ids"]) == s for s in solutions)


def test_hidden_size_must_allow_whole_heads():
    with pytest.raises(ValueError, match="hidden_size=40 must be a multiple of 16"):
        model_config(TinyModelConfig(hidden_size=40), tokenizer=None)


def test_cli_builds_into_the_given_folder(tmp_path, capsys):
    assert main(["build-tiny-model", str(tmp_path)]) == 0
    path = capsys.readouterr().out.strip().splitlines()[-1]
    assert path.startswith(str(tmp_path)) and (tmp_path / path.split("/")[-1] / MARKER).is_file()
