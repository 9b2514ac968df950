"""The driver's learner thread: a run that stops while Ray Train's `fit()` still runs aborts it before Ray
shuts down (a `ray.shutdown()` under a thread inside `fit()` ends the driver: exit 1 here, SIGSEGV once in CI)."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import sys, time
    import ray
    from ray.train import ScalingConfig
    from perception_r1.learner_thread import AbortableTrainer, LearnerAborted, LearnerThread

    def loop(config):
        time.sleep(600)

    def trainer():
        return AbortableTrainer(loop, scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}))

    ray.init(num_cpus=2, include_dashboard=False)
    early = trainer()
    early.abort()  # before its controller exists: fit() never starts one
    thread = LearnerThread(early)
    thread.thread.join(timeout=60)
    print("early:", type(thread.error()).__name__, flush=True)
    running = LearnerThread(trainer())
    time.sleep(float(sys.argv[1]))  # the controller up, its worker starting or sleeping
    start = time.monotonic()
    ended = running.end(timeout_s=60) if sys.argv[2] == "end" else False
    print("ended:", ended, "in %.0fs" % (time.monotonic() - start), flush=True)
    ray.shutdown()
    print("driver survived the shutdown", flush=True)
""")


def run(delay_s: float, how: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SCRIPT, str(delay_s), how], cwd=REPO, capture_output=True,
                          text=True, timeout=240)


@pytest.mark.reliability(fault="a stop while Ray Train's fit() still runs in the driver (e.g. Ctrl-C during start-up)",
                         outcome="the learner's controller is aborted and its thread ends before Ray shuts down; "
                                 "the driver exits by its own code")
def test_an_aborted_learner_ends_before_ray_shuts_down():
    done = run(6, "end")
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert "early: LearnerAborted" in done.stdout
    assert "ended: True" in done.stdout and "driver survived the shutdown" in done.stdout
