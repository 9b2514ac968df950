"""Every YAML in configs/ passes the schema; bad configs fail with a message naming the field and the fix."""

from pathlib import Path

import pytest

from core.config import Config
from core.config_files import load_config, parse_config

CONFIGS = sorted(Path(__file__).resolve().parents[1].joinpath("configs").glob("*.yaml"))


def test_there_are_configs():
    assert len(CONFIGS) >= 2


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)


def test_reference_recipe_values():
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "qwen2_5_vl_7b_geo3k.yaml")
    assert (cfg.rollout.samples_per_prompt, cfg.learner.prompts_per_step, cfg.run.num_steps) == (8, 128, 275)
    assert cfg.learner.optimizer.lr == 1e-6 and cfg.learner.optimizer.warmup_steps == 13
    assert (cfg.learner.loss.clip_low, cfg.learner.loss.clip_high, cfg.learner.loss.dual_clip) == (0.2, 0.3, 3.0)
    r = cfg.judge.reward
    assert (r.accuracy_weight, r.format_weight, r.repetition_weight, r.visual_weight, r.mode) == (0.9, 0.1, 1.0, 0.7, "reference")


@pytest.mark.parametrize("raw,needle", [
    ({"buffer": {"max_stalenes": 1}}, "buffer.max_stalenes: unknown key"),
    ({"learner": {"prompts_per_step": 0}}, "learner.prompts_per_step"),
    ({"rollout": {"samples_per_prompt": 1}}, "rollout.samples_per_prompt"),
    ({"learner": {"prompts_per_step": 100}, "buffer": {"max_groups": 10}}, "raise buffer.max_groups"),
    ({"sync": {"backend": "nccl"}}, "sync.backend=nccl needs"),
    ({"learner": {"dtype": "bfloat16"}}, "use float32 on CPU"),
    ({"rollout": {"engine": {"type": "vllm"}}}, "rollout.engine.tensor_parallel_size=1 needs"),
    ({"rollout": {"engine": {"type": "sglang"}}}, "rollout.engine"),
    ({"model": {"type": "pretrained"}}, "model.pretrained.path"),
    ({"cluster": {"num_gpus": 1}, "rollout": {"num_actors": 2, "num_gpus_per_actor": 1, "engine": {"type": "hf"}}},
     "asks for 2 GPUs"),
    ({"sync": {"interval_steps": 3}, "buffer": {"max_staleness": 1}}, "lower sync.interval_steps"),
    ({"data": {"min_pixels": 10, "max_pixels": 5}}, "swap them"),
    ({"run": {"num_steps": 5}, "learner": {"optimizer": {"warmup_steps": 9}}}, "lower warmup_steps"),
])
def test_bad_config_names_field_and_fix(raw, needle):
    with pytest.raises(ValueError) as err:
        parse_config(raw, source="bad.yaml")
    assert needle in str(err.value), str(err.value)
    assert "bad.yaml" in str(err.value)


def test_bad_yaml_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: {name: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="must hold a mapping"):
        load_config(tmp_path / "list.yaml")


def test_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("run: {num_steps: 3}\n")
    cfg = load_config(f, ["run.num_steps=7", "buffer.max_staleness=0"])
    assert cfg.run.num_steps == 7 and cfg.buffer.max_staleness == 0
    with pytest.raises(ValueError, match="section.key=value"):
        load_config(f, ["nonsense"])


def test_missing_model_path_is_a_clear_error(tmp_path):
    from perception_r1.driver import resolve_model

    cfg = parse_config({"model": {"type": "pretrained", "path": str(tmp_path / "nowhere")}})
    with pytest.raises(ValueError, match=r"is not a model folder .* \(nothing is downloaded"):
        resolve_model(cfg)


# ----------------------------------------------------------------------- async needs a corrected loss
def test_the_default_loss_follows_the_schedule():
    assert Config().buffer.max_staleness == 1 and Config().learner.loss.type == "tis"  # async by default: corrected
    assert parse_config({"buffer": {"max_staleness": 0}}).learner.loss.type == "grpo"
    assert parse_config({"learner": {"loss": {"clip_low": 0.1}}}).learner.loss.type == "tis"
    assert parse_config({"learner": {"loss": {"type": "decoupled"}}}).learner.loss.type == "decoupled"
    repo = Path(__file__).resolve().parents[1] / "configs"
    assert load_config(repo / "demo-cpu.yaml").learner.loss.type == "tis"
    assert load_config(repo / "qwen2_5_vl_7b_geo3k.yaml").learner.loss.type == "grpo"  # synchronous, as the reference
    for bad in ({"learner": None}, {"learner": {"loss": None}}, {"learner": {"loss": 5}}):  # the schema's errors
        with pytest.raises(ValueError, match="Input should be a valid dictionary"):
            parse_config(bad)


def test_async_with_the_uncorrected_loss_is_refused_unless_allowed():
    recipe = Path(__file__).resolve().parents[1] / "configs" / "qwen2_5_vl_7b_geo3k.yaml"
    with pytest.raises(ValueError, match=r"buffer.max_staleness=2 with learner.loss.type=grpo.*set learner.loss.type: tis"):
        load_config(recipe, ["buffer.max_staleness=2"])
    assert load_config(recipe, ["buffer.max_staleness=2", "learner.loss.type=tis"]).learner.loss.type == "tis"
    allowed = load_config(recipe, ["buffer.max_staleness=2", "learner.loss.allow_uncorrected_staleness=true"])
    assert allowed.learner.loss.type == "grpo"


def test_a_resolved_config_round_trips():
    """The driver hands workers `model_dump`; the filled-in loss type must validate again unchanged."""
    cfg = parse_config({"buffer": {"max_staleness": 2}})
    assert parse_config(cfg.model_dump(mode="json")) == cfg


def test_vllm_gpus_must_equal_tensor_parallel_size():
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2 needs rollout.num_gpus_per_actor = 2 \(got 1\)"):
        parse_config({"rollout": {"engine": {"type": "vllm", "tensor_parallel_size": 2}, "num_gpus_per_actor": 1},
                      "learner": {"num_gpus_per_worker": 1}})
    ok = parse_config({"rollout": {"engine": {"type": "vllm", "tensor_parallel_size": 2}, "num_gpus_per_actor": 2}})
    assert ok.rollout.num_gpus_per_actor == 2
    with pytest.raises(ValueError, match=r"judge.llm.tensor_parallel_size=2 needs judge.llm.num_gpus_per_replica = 2"):
        parse_config({"judge": {"llm": {"type": "vllm", "model_path": "/j", "tensor_parallel_size": 2,
                                        "num_gpus_per_replica": 1}}})
