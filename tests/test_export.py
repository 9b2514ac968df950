"""`perception-r1 export` and `eval` on a run: one 2-step run of the tiny model through the real driver,
exported, loaded with transformers (its weights are the checkpoint's, cast to bf16, and no longer the
initial model's) and evaluated on the synthetic set from the run folder and from the export; the
errors name the fix. The same run's system metrics are on the cluster's Prometheus endpoint."""

import json
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from ports import free_port

from perception_r1.cli import main

REPO = Path(__file__).resolve().parents[1]
RUN_NAME = "export-run"
"""The run's name, which tags its metrics (other modules' runs on the shared cluster are `demo-cpu`)."""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_path, ray_cluster):
    """A finished 2-step run with a checkpoint at each step (module-scoped: one training run for all tests)."""
    from core.config_files import load_config
    from perception_r1.driver import train

    tmp = tmp_path_factory.mktemp("export-run")
    overrides = [f"judge.http_port={free_port()}", "sft.enabled=false", "rollout.samples_per_prompt=4",
                 "rollout.max_new_tokens=24", "learner.prompts_per_step=2", "buffer.max_groups=8",
                 "tracking.progress_bar=false", "tracking.log_rollouts_every=0", "data.dataset.num_problems=64",
                 f"run.name={RUN_NAME}", f"run.output_dir={tmp}", f"tracking.mlflow_uri=sqlite:///{tmp}/mlflow.db",
                 f"model.cache_dir={tiny_model_path.parent}", "run.num_steps=2", "checkpoint.every_steps=1",
                 "validation.every_steps=1",
                 # the random tiny model earns no reward without the SFT warm start (zero advantages, zero
                 # gradients): weight decay at a large lr is what moves its weights, enough to show in bf16
                 "learner.optimizer.warmup_steps=0", "learner.optimizer.lr=0.02", "learner.optimizer.weight_decay=0.5"]
    cfg = load_config(REPO / "configs/demo-cpu.yaml", overrides)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        result = train(cfg)
    assert result.final_version == 2
    return result.run_dir


@pytest.mark.slow
def test_the_run_validated_before_its_first_step_and_after_each(run_dir):
    """Validation on the whole system: held-out prompts decoded greedily by the generation actor, scored by
    the judge app, in mlflow as val/* at step 0 (before the first update) and at each version after."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{run_dir.parent}/mlflow.db")
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    history = {key: sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
               for key in ("val/accuracy", "val/reward", "val/visual", "val/num_prompts", "val/policy_version")}
    assert [m.step for m in history["val/accuracy"]] == [0, 1, 2]
    assert [m.value for m in history["val/policy_version"]] == [0.0, 1.0, 2.0]
    assert all(m.value == 3 for m in history["val/num_prompts"])  # 5% of 64 problems, never trained on
    assert all(-2.0 <= m.value <= 1.7 for m in history["val/reward"]) and history["val/visual"]
    from core.config_files import load_config
    from perception_r1.driver import split_prompts

    held = {p.id for p in split_prompts(load_config(run_dir / "config.yaml"))[1]}
    lines = (run_dir / "trained.jsonl").read_text().splitlines()
    assert len(held) == 3 and not held & {pid for line in lines for pid in json.loads(line)["prompt_ids"]}


def checkpoint_weights(checkpoint: Path, base: Path) -> dict[str, torch.Tensor]:
    """The learner's model state, restored the way a resumed learner does (load_learner), independently
    of the export's reader."""
    from transformers import AutoModelForImageTextToText

    from learner.schedule import warmup_scheduler
    from learner.sharded_state import load_learner

    model = AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters())
    version = load_learner(checkpoint, model=model, optimizer=optimizer, scheduler=warmup_scheduler(optimizer, warmup_steps=1))
    assert version == int(checkpoint.name.removeprefix("step_"))
    return model.state_dict()


@pytest.mark.slow
def test_export_holds_the_checkpoints_weights_in_bf16(run_dir, tmp_path, capsys):
    from transformers import AutoModelForImageTextToText

    from core.vl import load_processor
    from perception_r1.export import base_model_dir

    out = tmp_path / "model"
    assert main(["export", str(run_dir), str(out)]) == 0
    assert "step 2, policy_version 2" in capsys.readouterr().out
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "export.json"} <= {
        p.name for p in out.iterdir()}
    assert not out.with_name("model.partial").exists()
    meta = json.loads((out / "export.json").read_text())
    base = base_model_dir(run_dir)
    assert meta["step"] == 2 and meta["policy_version"] == 2 and meta["base_model"] == str(base)

    exported = AutoModelForImageTextToText.from_pretrained(out).state_dict()
    trained = checkpoint_weights(run_dir / "checkpoints" / "step_000002", base)
    initial = AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32).state_dict()
    assert exported.keys() == trained.keys()
    assert all(t.dtype == torch.bfloat16 for t in exported.values())
    assert all(torch.equal(exported[k], trained[k].to(torch.bfloat16)) for k in trained)
    assert any(not torch.equal(exported[k], initial[k].to(torch.bfloat16)) for k in trained)  # two steps moved them
    load_processor(out)  # the processor files came along

    older = tmp_path / "step1"
    assert main(["export", str(run_dir), "--step", "1", str(older), "--dtype", "float32"]) == 0
    first = AutoModelForImageTextToText.from_pretrained(older, dtype=torch.float32).state_dict()
    assert all(torch.equal(first[k], v) for k, v in checkpoint_weights(run_dir / "checkpoints" / "step_000001", base).items())


@pytest.mark.slow
def test_eval_takes_a_run_folder_or_an_export(run_dir, tmp_path, capsys):
    def evaluate(model_path: Path, out: Path) -> list[dict]:
        args = ["eval", "--benchmark", "synthetic", "--synthetic-num", "2", "--model-path", str(model_path),
                "--max-tokens", "8", "--perception", "none", "--no-progress", "--output-dir", str(out)]
        assert main(args) == 0
        return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]

    from_run = evaluate(run_dir, tmp_path / "eval-run")
    export = run_dir / "export" / "step_000002"
    assert (export / "model.safetensors").is_file() and "exported" in capsys.readouterr().out
    from_export = evaluate(export, tmp_path / "eval-export")
    assert len(from_run) == len(from_export) == 2
    assert sorted(r["response"] for r in from_run) == sorted(r["response"] for r in from_export)  # greedy, same weights
    evaluate(run_dir, tmp_path / "eval-again")
    assert "exported" not in capsys.readouterr().out  # the run's export is reused


@pytest.mark.slow
def test_export_errors_on_a_run_name_the_fix(run_dir, tmp_path, capsys):
    assert main(["export", str(run_dir), "--step", "7", str(tmp_path / "m")]) == 2
    assert "no complete checkpoint step_000007" in (err := capsys.readouterr().err) and "complete steps: 1, 2" in err
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("mine")
    assert main(["export", str(run_dir), str(full)]) == 2
    assert "is not empty" in capsys.readouterr().err and (full / "notes.txt").is_file()
    assert main(["export", str(run_dir), str(full), "--force"]) == 0
    assert not (full / "notes.txt").exists() and (full / "model.safetensors").is_file()
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["export", str(run_dir), str(blocker / "model")]) == 2  # a disk error, in the OS's words
    assert "Not a directory" in capsys.readouterr().err and not (blocker.parent / "model.partial").exists()


def test_export_without_a_complete_checkpoint_names_the_fix(tmp_path, capsys):
    assert main(["export", str(tmp_path / "missing"), str(tmp_path / "m")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    run = tmp_path / "run"
    run.mkdir()
    assert main(["export", str(run), str(tmp_path / "m")]) == 2
    assert "no config.yaml" in capsys.readouterr().err
    (run / "config.yaml").write_text("run: {name: run}\n")
    for name in ("step_000003.tmp", "step_000004.unreadable"):  # never used, even when they look whole
        (run / "checkpoints" / name / "learner").mkdir(parents=True)
        (run / "checkpoints" / name / "learner.json").write_text('{"version": 3, "scheduler": {}}')
        (run / "checkpoints" / name / "learner" / ".metadata").write_bytes(b"x")
    assert main(["export", str(run), str(tmp_path / "m")]) == 2
    assert "has no complete checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "ran"))


def test_model_state_is_read_in_pieces_and_never_unpickled_freely(tmp_path):
    import pickle
    import shutil

    from learner.sharded_state import read_model_state, save_learner

    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters())
    good = tmp_path / "step_000001"
    good.mkdir()
    save_learner(good, model=model, optimizer=optimizer, scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
                 version=1)
    state = read_model_state(good, dtype=torch.bfloat16, max_bytes_per_read=64)  # one or two tensors per read
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v.to(torch.bfloat16)) for k, v in model.state_dict().items())

    marker = tmp_path / "payload-ran"
    tampered = tmp_path / "step_000002"
    shutil.copytree(good, tampered)
    (tampered / "learner" / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(ValueError, match=r"\.metadata is not a checkpoint index"):
        read_model_state(tampered, dtype=torch.bfloat16)
    assert not marker.exists()


def test_a_damaged_shard_is_a_clear_error(tmp_path):
    from learner.sharded_state import read_model_state, save_learner

    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    path = tmp_path / "step_000001"
    path.mkdir()
    save_learner(path, model=model, optimizer=optimizer,
                 scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0), version=1)
    for shard in (path / "learner").glob("*.distcp"):
        shard.write_bytes(shard.read_bytes()[:10])  # truncated, as by a full disk
    with pytest.raises(ValueError, match=r"could not be read .*use another checkpoint"):
        read_model_state(path, dtype=torch.bfloat16)


@pytest.mark.slow
def test_system_metrics_on_the_ray_metrics_endpoint(run_dir, ray_metrics_url):
    """The run's system gauges (last values kept after the run) are on the node's Prometheus endpoint,
    tagged with the run's name; per-actor series are tagged with the actor."""
    wanted = [f"perception_r1_{name}" for name in ("reward_total", "gen_tokens_per_s", "buffer_depth",
                                                     "learner_step_seconds", "sync_seconds", "judge_latency_p50_s",
                                                     "judge_failures")]
    ours, deadline = [], time.time() + 60  # exported every metrics_report_interval_ms (10 s by default)
    while time.time() < deadline and not all(any(name in line for line in ours) for name in wanted):
        time.sleep(1)
        try:
            found = urllib.request.urlopen(ray_metrics_url, timeout=5).read().decode()
        except OSError:
            found = ""
        ours = [line for line in found.splitlines() if f'run="{RUN_NAME}"' in line]
    for name in wanted:
        assert any(name in line for line in ours), (name, ours[-20:])
    assert any("perception_r1_gen_tokens_per_s" in line and 'actor="0"' in line for line in ours), ours[-20:]
