"""GPU tier (`pytest -m gpu tests/gpu`, on the device machine): the vLLM engine, a learner step that
learns, NCCL weight sync into a running engine, and two steps of the whole system on 2 GPUs."""

import functools
import math
import time

import numpy as np

import pytest
import ray
import torch

pytestmark = pytest.mark.gpu
SUFFIXES = ["embed_tokens.weight", "lm_head.weight", "layers.1.self_attn.o_proj.weight",
            "layers.0.mlp.down_proj.weight", "blocks.1.mlp.down_proj.weight"]


@pytest.fixture(scope="module")
def tiny_vl(tmp_path_factory) -> str:
    from benchmarks.assets import TINY, write_model_dir

    return str(write_model_dir(tmp_path_factory.mktemp("assets") / "tiny-vl", TINY, weights=True))


def test_vllm_engine_groups_match_learner_encoding(tiny_vl):
    from actors.vllm_engine import VLLMEngine
    from core.config import (
        DataConfig,
        LearnerConfig,
        SyntheticDataConfig,
        VLLMEngineConfig as VLLMCfg,
    )
    from core.records import RewardBreakdown, Sampling, ScoredGroup
    from dataprep.synthetic import make_problems
    from learner.trainer import Learner

    data = DataConfig()
    engine = VLLMEngine(tiny_vl, cfg=VLLMCfg(enforce_eager=True, max_model_len=4096, gpu_memory_utilization=0.3),
                        data=data, seed=0, kv_cache_memory_bytes=2 << 30)
    groups = engine.generate(make_problems(SyntheticDataConfig(num_problems=3))[:3],
                             sampling=Sampling(n=4, temperature=1.0, top_p=1.0, max_new_tokens=16), actor_id=0)
    engine.close()
    assert [len(g.rollouts) for g in groups] == [4, 4, 4]
    for g in groups:
        for r in g.rollouts:
            assert 0 < len(r.token_ids) <= 16 and (r.logprobs <= 0).all() and r.min_version == 0
    learner = Learner(tiny_vl, cfg=LearnerConfig(), data=data, temperature=1.0, device=torch.device("cuda"))
    scored = [ScoredGroup(g, tuple(RewardBreakdown(0, 0, 0, 0, float(i), float(i)) for i in range(4)), 0.0)
              for g in groups]
    seqs = learner.sequences(scored)  # raises if vLLM's prompt tokens differ from the learner's encoding
    learner_logp = torch.cat(learner.logprobs(seqs))
    behaviour = torch.cat([s.behaviour_logprobs for s in seqs])
    # bf16 engine vs fp32 learner on random weights: close, not equal
    assert (learner_logp - behaviour).abs().mean() < 0.1, (learner_logp - behaviour).abs().mean()


def test_a_weight_update_drops_the_old_weights_caches(tiny_vl, tmp_path):
    """After an update, a request for a prompt the engine has seen (its prefix KV and image embeddings were
    cached under the old weights) gets exactly what an engine freshly loaded with the new weights gives; a
    request in flight across the update finishes, stamped with both versions."""
    from concurrent.futures import ThreadPoolExecutor

    from actors.vllm_engine import VLLMEngine
    from core.config import DataConfig, SyntheticDataConfig, VLLMEngineConfig as VLLMCfg
    from core.records import Sampling
    from dataprep.synthetic import make_problems

    new_weights = _perturbed_copy(tiny_vl, tmp_path / "new-weights")
    data, prompt = DataConfig(), make_problems(SyntheticDataConfig(num_problems=1))[0]
    probe = Sampling(n=1, temperature=1.0, top_p=1.0, max_new_tokens=32, seed=7)

    def engine_on(path):
        return VLLMEngine(path, cfg=VLLMCfg(enforce_eager=True, max_model_len=4096, gpu_memory_utilization=0.3),
                          data=data, seed=0, kv_cache_memory_bytes=1 << 30)

    def probe_rollout(engine):
        return engine.generate([prompt], sampling=probe, actor_id=0)[0].rollouts[0]

    engine = engine_on(tiny_vl)
    before = probe_rollout(engine)  # fills the prefix and encoder caches under the old weights
    with ThreadPoolExecutor(1) as pool:
        long = pool.submit(engine.generate, [prompt], sampling=Sampling(2, 1.0, 1.0, 3000, seed=1), actor_id=0)
        time.sleep(1.0)
        assert not long.done(), "the long request must still be running when the update comes"
        engine.load_weights_from(new_weights, version=1)
        spanning = long.result(timeout=600)[0]
    after = probe_rollout(engine)
    engine.close()
    fresh_engine = engine_on(new_weights)
    fresh = probe_rollout(fresh_engine)
    fresh_engine.close()

    assert [(r.min_version, r.max_version) for r in spanning.rollouts] == [(0, 1), (0, 1)]
    assert (before.min_version, after.min_version, after.max_version) == (0, 1, 1)
    assert not np.allclose(before.logprobs[:8], fresh.logprobs[:8], atol=0.05)  # the new weights do differ
    assert after.token_ids.tolist() == fresh.token_ids.tolist()
    np.testing.assert_allclose(after.logprobs, fresh.logprobs, atol=0.02)


def _perturbed_copy(model_dir: str, out) -> str:
    """The model folder with every weight moved by noise of its own scale (a different policy)."""
    import shutil

    from transformers import AutoModelForImageTextToText

    shutil.copytree(model_dir, out)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * (p.std() if p.numel() > 1 else 0.1))
    model.save_pretrained(out)
    return str(out)


def test_learner_step_on_gpu_learns(tiny_vl):
    from actors.hf_engine import HFEngine
    from core.config import DataConfig, LearnerConfig, SyntheticDataConfig
    from core.records import RewardBreakdown, Sampling, ScoredGroup
    from dataprep.synthetic import make_problems
    from learner.trainer import Learner

    data = DataConfig()
    groups = HFEngine(tiny_vl, data=data, device="cuda").generate(
        make_problems(SyntheticDataConfig(num_problems=2)), sampling=Sampling(4, 1.0, 1.0, 12), actor_id=0)
    scored = [ScoredGroup(g, tuple(RewardBreakdown(0, 0, 0, 0, float(i % 2), float(i % 2)) for i in range(4)), 0.0)
              for g in groups]
    cfg = LearnerConfig(optimizer={"lr": 1e-3, "weight_decay": 0.0})
    learner = Learner(tiny_vl, cfg=cfg, data=data, temperature=1.0, device=torch.device("cuda"))
    before = {n: p.detach().clone() for n, p in learner.model.named_parameters()}
    metrics = learner.step(scored)
    assert math.isfinite(metrics["learner/loss"]) and metrics["learner/grad_norm"] > 0
    changed = sum(not torch.equal(before[n], p) for n, p in learner.model.named_parameters())
    assert changed > len(before) // 2


@pytest.mark.parametrize("load", ["layerwise", "direct"])
def test_nccl_sync_into_running_vllm_engine(tiny_vl, load):
    """Two syncs (a `direct` load records the loaders' copies, then replays them); equal after each."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    from actors.actor import remote_class
    from actors.engines import build_engine
    from core.config_files import parse_config
    from core.records import Sampling

    ray.init(num_gpus=2, include_dashboard=False, runtime_env={"env_vars": {"NCCL_NVLS_ENABLE": "0"}})
    try:
        cfg = parse_config({"model": {"type": "pretrained", "path": tiny_vl},
                            "rollout": {"engine": {"type": "vllm", "enforce_eager": True, "max_model_len": 4096,
                                                   "gpu_memory_utilization": 0.3}, "num_gpus_per_actor": 1}})
        actor = remote_class(generate_concurrency=2).options(num_gpus=1).remote(
            actor_id=0, build_engine=functools.partial(build_engine, cfg=cfg, model_path=tiny_vl),
            sampling=Sampling(2, 1.0, 1.0, 8))
        probe = SenderProbe.options(num_gpus=1).remote(tiny_vl, [actor], load)
        for v in (1, 2):
            want = ray.get(probe.sync.remote(version=v))
            version, got = ray.get(actor.weight_samples.remote(SUFFIXES))
            assert version == v and set(got) == set(SUFFIXES)
            assert got == want
    finally:
        ray.shutdown()


@ray.remote
class SenderProbe:
    """The learner's sending side alone: a bf16 model on its own GPU and the vLLM wire."""

    def __init__(self, model_path, receivers, load="layerwise"):
        from transformers import AutoModelForImageTextToText

        from learner.sync import WeightBroadcaster

        self.model = AutoModelForImageTextToText.from_pretrained(model_path, dtype=torch.bfloat16).cuda()
        self.sender = WeightBroadcaster(receivers=receivers, rank=0, backend="nccl", timeout_s=120,
                                        bucket_bytes=64 << 20, dtype=torch.bfloat16, device=torch.device("cuda"),
                                        transport="vllm", nccl_load=load)
        self.sender.connect()

    def sync(self, version):
        from core.weights import weight_corners

        with torch.no_grad():
            for p in self.model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        self.sender.broadcast(self.model, version=version)
        return weight_corners(self.model.state_dict().items(), SUFFIXES)


def _whole_system(tiny_vl, tmp_path, monkeypatch, *, name: str, gpus: int, share: float, **sections):
    """The config of a 3-step run of the whole system on `gpus` GPUs (actor and learner `share` a GPU each),
    its mlflow store a file store in `tmp_path`; `sections` add to or replace sections."""
    from core.config_files import parse_config

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the GPU bundle carries mlflow-skinny (no sqlite)
    return parse_config({
        "run": {"name": name, "num_steps": 3, "output_dir": str(tmp_path)},
        "cluster": {"num_gpus": gpus, "include_dashboard": False},
        "model": {"type": "pretrained", "path": tiny_vl},
        "data": {"dataset": {"type": "synthetic", "num_problems": 32}},
        "rollout": {"engine": {"type": "vllm", "enforce_eager": True, "max_model_len": 4096,
                               "gpu_memory_utilization": 0.3}, "num_gpus_per_actor": share, "samples_per_prompt": 4,
                    "max_new_tokens": 32, "prompts_per_call": 2},
        "learner": {"num_gpus_per_worker": share, "prompts_per_step": 2, "dtype": "bfloat16"},
        "buffer": {"max_staleness": 1, "max_groups": 8},
        "checkpoint": {"every_steps": 0},
        "tracking": {"mlflow_uri": f"file://{tmp_path}/mlruns", "progress_bar": False, "log_rollouts_every": 0},
        **sections,
    })


def test_two_steps_of_the_whole_system_on_two_gpus(tiny_vl, tmp_path, monkeypatch):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    from perception_r1.driver import train

    cfg = _whole_system(tiny_vl, tmp_path, monkeypatch, name="gpu-e2e", gpus=2, share=1)
    result = train(cfg)
    assert result.final_version == 3 and result.steps_logged == 3


def test_three_steps_of_the_whole_system_on_one_gpu(tiny_vl, tmp_path, monkeypatch):
    """Engine and learner share GPU 0 (half a GPU each for Ray), weights by CUDA IPC; after every sync the
    learner checks the engine's weights (sync.verify_every_steps: 1, a mismatch fails the run)."""
    from mlflow.tracking import MlflowClient

    from perception_r1.driver import train

    cfg = _whole_system(tiny_vl, tmp_path, monkeypatch, name="gpu1-e2e", gpus=1, share=0.5,
                        learner={"num_gpus_per_worker": 0.5, "gpu_memory_fraction": 0.5, "prompts_per_step": 2,
                                 "dtype": "bfloat16"},
                        sync={"verify_every_steps": 1})
    assert cfg.colocated
    result = train(cfg)
    assert result.final_version == 3 and result.steps_logged == 3
    client = MlflowClient(tracking_uri=f"file://{tmp_path}/mlruns")
    verified = client.get_metric_history(result.mlflow_run_id, "sync/verified")
    assert [m.value for m in sorted(verified, key=lambda m: m.step)] == [1.0, 1.0, 1.0]
    synced = client.get_metric_history(result.mlflow_run_id, "sync/seconds")
    assert len(synced) == 3 and all(m.value > 0 for m in synced)
    assert len(client.get_metric_history(result.mlflow_run_id, "learner/step_seconds")) == 3
