"""The learner's memory estimate (perception_r1/memory_estimate.py): parameter counts from config.json
equal the real models', the estimate tracks what was measured on a GPU, and the recipes fit an 80 GB GPU."""

import json
import math
from pathlib import Path

import pytest

from core.config_files import load_config, parse_config
from perception_r1 import preflight
from perception_r1.memory_estimate import (
    ModelShape,
    estimate,
    num_params,
    stack_bytes,
    vision_params,
)

REPO = Path(__file__).resolve().parents[1]
FIXTURE_7B = REPO / "tests" / "fixtures" / "qwen2_5_vl_7b"
"""Qwen/Qwen2.5-VL-7B-Instruct's config.json as published (benchmarks/assets.py VL7B), no weights."""
GPU_LEARNER = {"num_gpus_per_worker": 1, "dtype": "bfloat16", "packing": "always"}


def test_parameter_count_of_the_7b_config_is_the_published_one():
    # 8,292,166,656: what transformers counts for this config.json built on the meta device
    assert num_params(ModelShape.from_config_json(FIXTURE_7B)) == 8_292_166_656


def test_parameter_counts_equal_the_tiny_models_real_ones(tiny_model_dir):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    shape = ModelShape.from_config_json(tiny_model_dir)
    assert num_params(shape) == sum(p.numel() for p in model.parameters())
    assert vision_params(shape) == sum(p.numel() for p in model.model.visual.parameters())


def test_a_config_without_a_size_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2", "hidden_size": 64}))
    with pytest.raises(ValueError, match="no integer num_attention_heads; is this a Qwen2.5-VL config.json"):
        ModelShape.from_config_json(tmp_path)
    with pytest.raises(ValueError, match="does not exist.*point model.path"):
        ModelShape.from_config_json(tmp_path / "nowhere")


def test_checkpointing_keeps_one_input_per_checkpointed_block_plus_one_recomputed():
    full = stack_bytes(100, items=10, depth=8, b=2, hidden=4, checkpoint_every=0)
    every = stack_bytes(100, items=10, depth=8, b=2, hidden=4, checkpoint_every=1)
    half = stack_bytes(100, items=10, depth=8, b=2, hidden=4, checkpoint_every=2)
    assert full == 10 * 8 * 100
    assert every == 10 * (8 * 2 * 4 + 100)
    assert half == 10 * (4 * 100 + 4 * 2 * 4 + 100)
    assert every < half < full


MEASURED = ["learner_packed_vl3b_1gpu", "learner_packed_vl3b_1gpu_micro_sweep", "learner_packed_vl3b_1gpu_settings"]


def measured_cases() -> dict[str, float]:
    """Peak allocated GiB of each `mfu` case benchmarks/bench_learner.py measured on one H200 (3B shape)."""
    out = {}
    for name in MEASURED:
        result = json.loads((REPO / "benchmarks" / "results" / f"{name}.json").read_text())
        out |= {c["case"]: c["peak_mem_gib"] for c in result["metrics"]["cases"] if c["case"].startswith("mfu:")}
    return out


def test_the_estimate_is_within_5_percent_of_every_peak_measured_on_the_gpu():
    from benchmarks.assets import VL3B

    shape = ModelShape.from_dict(VL3B)
    assert num_params(shape) == 3_754_622_976  # the benchmark's own count of the model it built
    cases = measured_cases()
    assert len(cases) >= 5
    for case, peak in cases.items():
        _, _, checkpointing, micro, *rest = case.split(":")
        every = {"all": 1, "every2": 2, "none": 0}[checkpointing]
        cfg = parse_config({"learner": GPU_LEARNER | {
            "gradient_checkpointing": every > 0, "checkpoint_every": max(every, 1), "compile_blocks": rest == ["compile"],
            "max_tokens_per_micro_batch": int(micro)}, "sync": {"backend": "nccl"}})
        # the benchmark's batch: 32 sequences, 49,848 tokens cut into near-equal micro-batches; 4 images of 256 patches
        tokens = math.ceil(49848 / math.ceil(49848 / int(micro)))
        found = estimate(cfg, shape, gpu_gib=141, tokens=tokens, patches=512)
        allocated = sum(found.parts.values()) / 2**30  # torch's counter leaves out the context and fragmentation
        assert abs(allocated / peak - 1) < 0.05, (case, allocated, peak)


@pytest.mark.parametrize("name", ["qwen2_5_vl_7b_geo3k.yaml", "qwen2_5_vl_7b_geo3k_1node.yaml"])
def test_the_7b_recipes_fit_an_80gb_gpu_and_65536_tokens_would_not(name):
    shape = ModelShape.from_config_json(FIXTURE_7B)
    cfg = load_config(REPO / "configs" / name)
    fits = estimate(cfg, shape, gpu_gib=80)
    assert fits.fits and fits.total_gib < 72, fits.lines()  # room for the estimate's error
    too_big = estimate(load_config(REPO / "configs" / name, ["learner.max_tokens_per_micro_batch=65536"]), shape,
                       gpu_gib=80)
    assert not too_big.fits
    no_checkpointing = estimate(load_config(REPO / "configs" / name, ["learner.gradient_checkpointing=false"]), shape,
                                gpu_gib=80)
    assert not no_checkpointing.fits
    more_workers = estimate(load_config(REPO / "configs" / name, ["learner.num_workers=8", "cluster.num_gpus=null"]),
                            shape, gpu_gib=80)
    assert more_workers.parts["optimizer"] == pytest.approx(fits.parts["optimizer"] / 2, rel=1e-6)


def test_the_start_up_check_refuses_a_learner_that_does_not_fit_naming_the_fixes():
    cfg = load_config(REPO / "configs" / "qwen2_5_vl_7b_geo3k_1node.yaml", ["learner.max_tokens_per_micro_batch=131072"])
    with pytest.raises(ValueError) as err:
        preflight.check_learner_memory(cfg, FIXTURE_7B)
    text = str(err.value)
    assert "DOES NOT FIT" in text and "of 80 GiB per GPU" in text
    assert "lower learner.max_tokens_per_micro_batch" in text and "cluster.gpu_memory_gib" in text
    preflight.check_learner_memory(load_config(REPO / "configs" / "qwen2_5_vl_7b_geo3k_1node.yaml"), FIXTURE_7B)
    # a CPU learner has no GPU memory to check (and the tiny model need not be read)
    preflight.check_learner_memory(load_config(REPO / "configs" / "demo-cpu.yaml"), "/nowhere")


def test_gpu_memory_comes_from_the_config_else_nvidia_smi_else_80(monkeypatch):
    assert preflight.gpu_memory_gib(parse_config({"cluster": {"gpu_memory_gib": 141}})) == (141, "cluster.gpu_memory_gib")
    monkeypatch.setattr(preflight, "nvidia_smi", lambda query: [81559.0, 81559.0])
    assert preflight.gpu_memory_gib(parse_config({})) == (pytest.approx(79.65, abs=0.01), "nvidia-smi")
    monkeypatch.setattr(preflight, "nvidia_smi", lambda query: [])
    assert preflight.gpu_memory_gib(parse_config({}))[0] == 80
