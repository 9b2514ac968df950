"""Shared fixtures: the tiny model (built once per session) and one local Ray cluster shared by the
in-process tests (see `shared_ray`)."""

import os
import time
import warnings

import pytest
from ports import free_port

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


def shared_ray():
    """One local Ray cluster for every in-process test, started on first use and kept between tests
    (start-up is most of a short test's time on 2 cores). A test that needs a cluster of its own calls
    `ray.shutdown()` first; the next user starts a fresh shared one."""
    import ray

    from judge.service import SERVE_ENV

    if not ray.is_initialized():
        _shared["metrics_port"] = free_port()
        ray.init(num_cpus=2, include_dashboard=True,  # the state API (tests look up worker pids) needs it
                 _metrics_export_port=_shared["metrics_port"],
                 runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **SERVE_ENV}})
    return ray


_shared: dict[str, int] = {}
"""The shared cluster's Prometheus port (`metrics_port`), chosen when it starts."""


RAY_SINGLETONS = {"_AutoscalingCoordinatorActor"}
"""Ray's own detached actors that outlive a run by design (Ray Train starts this one)."""


WIND_DOWN_S = 20.0
"""How long a finished run's actors may take to end (Ray Train's helper actors outlive `fit()` by a few
seconds) before the cluster is restarted instead: a restart costs ~10-20 s of start-up on 2 cores."""


def leave_shared_ray_clean(*, keep_serve: bool = False) -> None:
    """After a test: Serve down (its proxy holds an HTTP port other tests' clusters need) unless `keep_serve`
    and no app of the test is left, and a fresh cluster next time if anything of the test is still alive
    after `WIND_DOWN_S` (e.g. a failed test's learner retrying)."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        return
    if not keep_serve or (serve_up() and serve.status().applications):
        serve.shutdown()
    kept = SERVE_ACTORS if serve_up() else set()
    deadline = time.monotonic() + WIND_DOWN_S
    while (left := _alive_actors(ray) - kept) and left != {"?"} and time.monotonic() < deadline:
        time.sleep(0.5)
    if left:
        warnings.warn(f"the shared Ray cluster restarts: still alive {WIND_DOWN_S:.0f}s after the test: {sorted(left)}",
                      stacklevel=1)
        ray.shutdown()


SERVE_ACTORS = {"ServeController", "ProxyActor"}
"""Serve's own actors, which stay up between in-process runs (`ray_local`)."""


def serve_up() -> bool:
    from judge.service import serve_running

    return serve_running()


def _alive_actors(ray) -> set[str]:
    """Class names of the cluster's live actors, Ray's own singletons left out ("?" without a state API)."""
    from ray.util.state import list_actors

    try:
        alive = {a.class_name for a in list_actors(address=ray.get_runtime_context().gcs_address,
                                                   filters=[("state", "=", "ALIVE")])}
    except Exception:  # noqa: BLE001 -- no state API: start over rather than guess
        return {"?"}
    return alive - RAY_SINGLETONS


@pytest.fixture(scope="module")
def ray_cluster():
    """The shared cluster for a module's tests (judge apps are started per module, Serve with them: one
    left running by `ray_local` tests is stopped first, so that the module's judge.http_port applies)."""
    ray = shared_ray()
    if serve_up():
        from ray import serve

        serve.shutdown()
    yield ray
    leave_shared_ray_clean()


@pytest.fixture
def ray_metrics_url(ray_cluster) -> str:
    """The shared cluster's Prometheus endpoint (its node's metrics agent), for a module using `ray_cluster`."""
    return f"http://127.0.0.1:{_shared['metrics_port']}/metrics"


@pytest.fixture
def ray_local(monkeypatch, tmp_path):
    """The shared cluster for one in-process training run, from the test's own folder. Serve runs on it from
    one such test to the next (its controller and HTTP proxy start once, not once per run: ~14 s of CPU each
    on 2 cores); a run finds it running and deploys its judge apps there, on its proxy's port."""
    monkeypatch.chdir(tmp_path)
    ray = shared_ray()
    if not serve_up():
        from ray import serve

        serve.start(http_options={"host": "127.0.0.1", "port": free_port()},
                    logging_config={"log_level": "WARNING", "enable_access_log": False})  # as the driver's
    yield ray
    leave_shared_ray_clean(keep_serve=True)


@pytest.fixture
def own_ray():
    """For a test that starts a cluster of its own (its own ports, a fresh session): the shared one is stopped."""
    import ray

    ray.shutdown()
    yield
    ray.shutdown()


def pytest_collection_modifyitems(config, items):
    """Tests with a cluster of their own (`own_ray`) run last, so that stopping the shared cluster for them does
    not make a later test start it again (~10-15 s on 2 cores); `gpu` tests run only where CUDA is (the device
    machine), whatever -m says."""
    import torch

    items.sort(key=lambda item: "own_ray" in getattr(item, "fixturenames", ()))  # stable: otherwise as collected
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the device machine: pytest -m gpu tests/gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


_reliability_rows: list[tuple[str, str, str, str]] = []


def pytest_runtest_logreport(report):
    """Collect the outcome of every `reliability`-marked test (the README's Reliability table). The marker
    travels in `user_properties`, which pytest-xdist carries from its workers to the controller."""
    if report.when != "call" and not (report.when == "setup" and report.outcome != "passed"):
        return
    marker = dict(report.user_properties).get("reliability")
    if marker is not None:
        _reliability_rows.append((marker["fault"], marker["outcome"], report.outcome, report.nodeid.split("::")[-1]))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    marker = item.get_closest_marker("reliability")
    report = outcome.get_result()
    if marker is not None and "reliability" not in dict(report.user_properties):
        report.user_properties.append(("reliability", dict(marker.kwargs)))


def pytest_sessionfinish(session, exitstatus):
    import sys

    if "ray" in sys.modules:
        sys.modules["ray"].shutdown()
    path = os.environ.get("PR1_RELIABILITY_REPORT")
    if not path or not _reliability_rows or hasattr(session.config, "workerinput"):  # the controller writes it
        return
    lines = ["| fault injected | what happens | prompts lost or trained twice | test | result |", "|---|---|---|---|---|"]
    for fault, outcome, result, name in sorted(_reliability_rows, key=lambda row: row[3]):
        lines.append(f"| {fault} | {outcome} | 0 | `{name}` | {result} |")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
