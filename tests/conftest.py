"""Shared fixtures: the tiny model (built once per session) and a local Ray cluster (one per module)."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory):
    """The default tiny Qwen2.5-VL, built once per test session (a Path)."""
    from core.config import TinyModelConfig
    from perception_r1.tiny_model import build_tiny_model

    return build_tiny_model(TinyModelConfig(cache_dir=str(tmp_path_factory.getbasetemp() / "tiny-model-cache")))


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


_reliability_rows: list[tuple[str, str, str, str]] = []


def pytest_runtest_logreport(report):
    """Collect the outcome of every `reliability`-marked test (the README's Reliability table)."""
    if report.when != "call" and not (report.when == "setup" and report.outcome != "passed"):
        return
    marker = next((m for m in getattr(report, "reliability", ())), None)
    if marker is not None:
        _reliability_rows.append((marker["fault"], marker["outcome"], report.outcome, report.nodeid.split("::")[-1]))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    marker = item.get_closest_marker("reliability")
    if marker is not None:
        outcome.get_result().reliability = [marker.kwargs]


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("PR1_RELIABILITY_REPORT")
    if not path or not _reliability_rows:
        return
    lines = ["| fault injected | what happens | prompts lost or trained twice | test | result |", "|---|---|---|---|---|"]
    for fault, outcome, result, name in _reliability_rows:
        lines.append(f"| {fault} | {outcome} | 0 | `{name}` | {result} |")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
