"""The driver's learner thread: a run that stops while Ray Train's `fit()` still runs aborts it before Ray
shuts down (a `ray.shutdown()` under a thread inside `fit()` ends the driver: exit 1 here, SIGSEGV once in CI);
a `fit()` that ended, even one whose trainer is still referenced, leaves no Ray Train controller behind; a
learner cancelled while it starts (nothing to save) ends at once, its training worker with it."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import os, sys, time
    import ray
    from ray.train import ScalingConfig
    from perception_r1.learner_thread import AbortableTrainer, LearnerAborted, LearnerThread

    def loop(config):
        if config.get("pidfile"):
            open(config["pidfile"], "w").write(str(os.getpid()))
        time.sleep(600)

    def fails(config):
        time.sleep(2)
        raise RuntimeError("the learner's loop failed")

    def trainer(fn=loop, config=None):
        return AbortableTrainer(fn, train_loop_config=config or {}, own_cluster=True,  # as the driver's local Ray
                                scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}))

    def gone(pid, wait_s=20):
        deadline = time.monotonic() + wait_s
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.2)
        return pid is not None and not os.path.exists(f"/proc/{pid}")  # no pid read: not proven gone

    def controller_pid(thread):  # asked through the trainer's handle: no other handle is kept
        while thread.alive():
            with thread.trainer._lock:
                handle = thread.trainer._controller
            if handle is not None:
                return ray.get(handle.__ray_call__.remote(lambda self: os.getpid()), timeout=60)
            time.sleep(0.1)

    ray.init(num_cpus=2, include_dashboard=False)
    early = trainer()
    early.abort()  # before its controller exists: fit() never starts one
    thread = LearnerThread(early)
    thread.thread.join(timeout=60)
    print("early:", type(thread.error()).__name__, flush=True)
    running = LearnerThread(trainer())
    time.sleep(6)  # the controller up, its worker starting or sleeping
    start = time.monotonic()
    print("ended:", running.end(timeout_s=60), "in %.0fs" % (time.monotonic() - start), flush=True)
    # a fit() that ended by itself, its trainer kept (as an error's traceback keeps it)
    failed = LearnerThread(trainer(fails))
    pid = controller_pid(failed)
    failed.thread.join(timeout=120)
    print("failed:", type(failed.error()).__name__, "controller gone:", gone(pid), flush=True)
    # a learner still starting, cancelled: its controller is killed, its worker ends with it
    pidfile = sys.argv[1]
    cancelled = LearnerThread(trainer(config={"pidfile": pidfile}))
    while not os.path.exists(pidfile) and cancelled.alive():
        time.sleep(0.2)
    worker = int(open(pidfile).read() or 0)
    start = time.monotonic()
    cancelled.cancel()
    ended = cancelled.end(timeout_s=60)
    print("cancelled:", ended, "in %.0fs" % (time.monotonic() - start), type(cancelled.error()).__name__,
          "worker gone:", gone(worker), flush=True)
    ray.shutdown()
    print("driver survived the shutdown", flush=True)
""")


@pytest.fixture(scope="module")
def script(tmp_path_factory) -> subprocess.CompletedProcess:
    """The script above, run once for this module's tests (one Ray start instead of one per test)."""
    pidfile = tmp_path_factory.mktemp("learner-thread") / "worker.pid"
    return subprocess.run([sys.executable, "-c", SCRIPT, str(pidfile)], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.reliability(fault="a stop while Ray Train's fit() still runs in the driver (e.g. Ctrl-C during start-up)",
                         outcome="the learner's controller is aborted and its thread ends before Ray shuts down; "
                                 "the driver exits by its own code")
def test_an_aborted_learner_ends_before_ray_shuts_down(script):
    assert script.returncode == 0, script.stdout + script.stderr[-3000:]
    assert "early: LearnerAborted" in script.stdout
    assert "ended: True" in script.stdout and "driver survived the shutdown" in script.stdout
    # a fit() that failed by itself leaves no controller behind while its trainer is still referenced
    assert "controller gone: True" in script.stdout and "failed: None" not in script.stdout, script.stdout


@pytest.mark.reliability(fault="a stop while the learner is still starting (nothing to save)",
                         outcome="its controller is killed rather than asked to abort; the thread ends and the "
                                 "training worker ends with its owner")
def test_a_cancelled_learner_ends_at_once_and_its_worker_with_it(script):
    assert script.returncode == 0, script.stdout + script.stderr[-3000:]
    assert "cancelled: True" in script.stdout and "worker gone: True" in script.stdout, script.stdout


def trainer(*, own_cluster: bool):
    from ray.train import ScalingConfig

    from perception_r1.learner_thread import AbortableTrainer

    return AbortableTrainer(lambda config: None, own_cluster=own_cluster,
                            scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}))


def test_an_own_cluster_learner_starts_no_autoscaler_or_placement_group_helpers():
    """On a cluster the run started (no autoscaler, gone with the run) the learner leaves out Ray Train's
    placement-group cleaner and autoscaler requests; on any cluster, without Ray Datasets, the dataset manager."""
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    from ray.train.v2._internal.execution.scaling_policy import ResizeDecision

    from perception_r1.learner_thread import OwnClusterPolicy

    kinds = {own: {type(cb) for cb in trainer(own_cluster=own)._create_default_callbacks()} for own in (True, False)}
    assert PlacementGroupCleanerCallback in kinds[False] and PlacementGroupCleanerCallback not in kinds[True]
    assert DatasetsCallback not in kinds[False] | kinds[True]

    class Context:
        run_id = "r1"

    policy = OwnClusterPolicy(trainer(own_cluster=True).scaling_config)
    policy.after_controller_start(Context())  # without Ray: upstream's would create the coordinator actor
    decision = policy.make_decision_for_non_running_worker_group()
    assert isinstance(decision, ResizeDecision) and decision.num_workers == 1
    policy._cancel_resource_request()
    assert policy._coordinator_client is None
