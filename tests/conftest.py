"""Shared fixtures: the tiny model (built once per session) and a local Ray cluster (one per module)."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory):
    """The default tiny Qwen2.5-VL, built once per test session (a Path)."""
    from perception_r1.config import TinyModel
    from perception_r1.tiny_model import build_tiny_model

    return build_tiny_model(TinyModel(cache_dir=str(tmp_path_factory.getbasetemp() / "tiny-model-cache")))


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_model_path) -> str:
    return str(tiny_model_path)


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
    yield ray
    ray.shutdown()


def pytest_collection_modifyitems(config, items):
    """`gpu` tests run only where CUDA is (the device machine), whatever -m says."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the device machine: pytest -m gpu tests/gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
