"""The whole system on one GPU (README "One GPU"): the config rules of a learner sharing its GPU with the
engines, the learner's budget in the memory estimate, the IPC buffer's layout, and the connection check
that every engine runs on a learner rank's GPU (the GPU half is tests/gpu/test_gpu.py)."""

import pickle
import re
from pathlib import Path

import pytest
import ray

from actors.engines import weight_transport
from core.config_files import load_config, parse_config
from core.records import WeightManifest
from perception_r1 import preflight

REPO = Path(__file__).resolve().parents[1]
FIXTURE_7B = REPO / "tests" / "fixtures" / "qwen2_5_vl_7b"
ONE_GPU = REPO / "configs" / "gpu1-3b.yaml"


def test_the_one_gpu_config_colocates_and_sends_weights_by_ipc():
    cfg = load_config(ONE_GPU)
    assert cfg.colocated and weight_transport(cfg) == "ipc"
    assert not load_config(REPO / "configs" / "bench-2gpu-3b.yaml").colocated
    assert weight_transport(load_config(REPO / "configs" / "bench-2gpu-3b.yaml")) == "vllm"
    assert weight_transport(load_config(REPO / "configs" / "demo-cpu.yaml")) == "torch"


@pytest.mark.parametrize(("sets", "named"), [
    (["learner.gpu_memory_fraction=0.8"], "learner.gpu_memory_fraction (0.8) + rollout.engine.gpu_memory_utilization"),
    (["learner.gpu_memory_fraction=null"], "needs learner.gpu_memory_fraction"),
    (["rollout.num_gpus_per_actor=1"], "rollout.num_gpus_per_actor a fraction too"),
    (["rollout.num_gpus_per_actor=0.6"], "exceed one GPU"),
    (["learner.num_gpus_per_worker=1"], "give the actor a whole GPU"),
    (["sync.backend=gloo"], "weights go by CUDA IPC"),
    (["learner.num_workers=2", "cluster.num_gpus=2"], "colocation runs one learner worker"),
])
def test_a_colocation_that_cannot_work_is_refused_naming_the_fields(sets, named):
    with pytest.raises(ValueError, match=re.escape(named)):
        load_config(ONE_GPU, sets)


def test_a_vllm_engine_on_a_fraction_of_a_gpu_needs_tensor_parallel_1():
    with pytest.raises(ValueError, match="tensor_parallel_size=2 needs rollout.num_gpus_per_actor = 2"):
        load_config(ONE_GPU, ["rollout.engine.tensor_parallel_size=2"])


def test_the_learner_is_checked_against_its_share_of_the_gpu_with_the_ipc_buffer():
    cfg = load_config(ONE_GPU, ["model.path=" + str(FIXTURE_7B), "cluster.gpu_memory_gib=140"])
    found = preflight.learner_memory(cfg, FIXTURE_7B)
    assert found.gpu_gib == pytest.approx(140 * 0.7)
    assert found.parts["ipc buffer"] == 2 * found.num_params  # bf16 copy of every weight
    assert not found.fits  # 7B full fine-tuning does not fit one 141 GB GPU beside an engine (README "One GPU")
    with pytest.raises(ValueError, match="raise learner.gpu_memory_fraction"):
        preflight.check_learner_memory(cfg, FIXTURE_7B)
    alone = preflight.learner_memory(load_config(REPO / "configs" / "bench-2gpu-3b.yaml",
                                                 ["cluster.gpu_memory_gib=140"]), FIXTURE_7B)
    assert "ipc buffer" not in alone.parts and alone.gpu_gib == 140


def test_the_ipc_buffer_packs_tensors_back_to_back_and_refuses_a_misaligned_one():
    from learner.ipc_weights import tensor_bytes

    manifest = WeightManifest(version=1, names=("a", "b", "c"), shapes=((3, 2), (5,), (1,)),
                              dtypes=("bfloat16", "bfloat16", "float32"), bucket_bytes=1)
    with pytest.raises(ValueError, match="weight c .float32. would sit at byte 22"):
        tensor_bytes(manifest)
    aligned = WeightManifest(version=1, names=("a", "c"), shapes=((3, 2), (2,)), dtypes=("bfloat16", "float32"),
                             bucket_bytes=1)
    assert tensor_bytes(aligned) == [12, 8]


class _Remote:
    def __init__(self, fn) -> None:
        self.fn = fn

    def remote(self, *args):
        return ray.put(self.fn(*args))


class _FakeEngineActor:
    """A generation actor as the learner's connect sees it: its GPUs, and the connection it took."""

    def __init__(self, uuids: list[str]) -> None:
        self.joined = []
        self.gpu_uuids = _Remote(lambda: uuids)
        self.join_weight_group = _Remote(self.joined.append)
        self.weight_group_port = _Remote(lambda: self.joined[-1].port if self.joined else 0)


def test_connect_checks_every_engine_runs_on_a_learner_gpu(ray_cluster):
    import torch

    from learner.sync import WeightBroadcaster

    def sender(actors):
        s = WeightBroadcaster(receivers=actors, rank=0, backend="nccl", timeout_s=30, bucket_bytes=1 << 20,
                              dtype=torch.bfloat16, device=torch.device("cpu"), transport="ipc")
        s.learner_gpus = ["GPU-a"]  # what every rank's GPU is (gathered on the GPU)
        return s

    near = _FakeEngineActor(["GPU-a"])
    s = sender([near])
    s.connect()
    assert [(spec.backend, spec.port) for spec in near.joined] == [("ipc", s.port)] and s.port > 0
    s._ensure_members()  # no restart: no new connection
    assert len(near.joined) == 1
    far = _FakeEngineActor(["GPU-b"])
    with pytest.raises(RuntimeError, match=r"generation actor 1 runs on GPU\(s\) \['GPU-b'\], where no learner rank"):
        sender([near, far]).connect()
    assert far.joined == []


def test_an_ipc_handle_is_a_typed_record_that_rebuilds_torchs_arguments_in_order():
    import dataclasses
    import inspect

    import torch
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    from core.records import CudaIPCHandle, IPCWeights
    from core.vllm_compat import rebuild_args

    h = CudaIPCHandle(size=(4,), stride=(1,), offset=0, dtype="bfloat16", device=3, handle=b"h", storage_size_bytes=8,
                      storage_offset_bytes=0, ref_counter_handle=b"r", ref_counter_offset=1, event_handle=None,
                      event_sync_required=True)
    args = dict(zip(inspect.signature(rebuild_cuda_tensor).parameters, rebuild_args(dataclasses.asdict(h), 0),
                    strict=True))
    assert args["tensor_cls"] is torch.Tensor and args["storage_cls"] is torch.storage.TypedStorage
    assert args["tensor_size"] == torch.Size([4]) and args["dtype"] is torch.bfloat16
    assert args["storage_device"] == 0 and args["storage_handle"] == b"h" and args["ref_counter_handle"] == b"r"
    assert args["ref_counter_offset"] == 1 and args["event_sync_required"] is True and args["requires_grad"] is False
    manifest = WeightManifest(version=3, names=("a", "c"), shapes=((3, 2), (2,)), dtypes=("bfloat16", "float32"),
                              bucket_bytes=1, ipc=IPCWeights(handles=(("GPU-a", h),), tensor_bytes=(12, 8), load="direct"))
    assert pickle.loads(pickle.dumps(manifest)) == manifest  # as Ray carries it
    assert parse_config({"sync": {"ipc_load": "layerwise"}}).sync.ipc_load == "layerwise"
