"""Operating a run: resume after SIGKILL continues exactly, a corrupt newest checkpoint falls back,
`ray job submit` against a running head node, SIGTERM and SIGINT stop it cleanly. (The system's own
metrics on the Ray metrics endpoint are checked on test_export.py's run.)"""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import msgpack
import pytest
from ports import free_port

REPO = Path(__file__).resolve().parents[1]
SMALL = ["sft.enabled=false", "rollout.samples_per_prompt=4", "rollout.max_new_tokens=24", "learner.prompts_per_step=2",
         "buffer.max_groups=8", "tracking.progress_bar=false", "tracking.log_rollouts_every=0",
         "data.dataset.num_problems=64"]


def overrides(tmp_path: Path, tiny_model: Path, *extra: str) -> list[str]:
    """A short CPU run in the test's folder, with its own Serve port (tests may run side by side), on the
    session's tiny model (`tiny_model_path`: built once, not once per run)."""
    return [*SMALL, f"judge.http_port={free_port()}", f"run.output_dir={tmp_path}", f"tracking.mlflow_uri=sqlite:///{tmp_path}/mlflow.db",
            f"model.cache_dir={tiny_model.parent}", *extra]


def cli(args: list[str], *, env=None, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "perception_r1.cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


# ------------------------------------------------------------------------------------------- checkpoints
def fake_checkpoint(root: Path, version: int) -> Path:
    path = root / f"step_{version:06d}"
    (path / "learner").mkdir(parents=True)
    (path / "learner" / ".metadata").write_bytes(b"x")
    (path / "learner.json").write_text(json.dumps({"version": version, "scheduler": {}}))
    payload = {"version": version, "next_seq": 10 * version, "pending": [3], "buffered": []}
    (path / "driver.msgpack").write_bytes(msgpack.packb(payload))
    return path


@pytest.mark.reliability(fault="newest checkpoint corrupt or half-written", outcome="resume falls back to the previous complete one, with a warning")
def test_corrupt_newest_checkpoint_falls_back_with_a_warning(tmp_path, caplog):
    from perception_r1.run_checkpoints import load_latest

    fake_checkpoint(tmp_path, 2)
    newest = fake_checkpoint(tmp_path, 4)
    (tmp_path / "step_000006.tmp").mkdir()  # an interrupted write is never a candidate
    assert load_latest(tmp_path)[1].version == 4
    (newest / "driver.msgpack").write_bytes(b"\x93garbage")
    with caplog.at_level(logging.WARNING, logger="perception_r1"):
        path, state = load_latest(tmp_path)
    assert path.name == "step_000002" and state.version == 2 and state.stream.next_seq == 20
    assert "step_000004 is unreadable" in caplog.text and "falling back" in caplog.text
    (tmp_path / "step_000002" / "learner" / ".metadata").unlink()  # a missing shard index is corrupt too
    assert load_latest(tmp_path) is None


# ------------------------------------------------------------------------------------------- resume
@pytest.mark.slow
@pytest.mark.reliability(fault="driver SIGKILLed mid-run, then `--resume`", outcome="continues from the newest complete checkpoint: every prompt trained exactly once, policy_version and AdamW state continue, one mlflow run")
def test_sigkill_then_resume_continues_exactly(tmp_path, tiny_model_path):
    args = ["train", "configs/demo-cpu.yaml", *sum((["--set", o] for o in overrides(
        tmp_path, tiny_model_path, "run.num_steps=8", "checkpoint.every_steps=2", "checkpoint.keep=5")), [])]
    run_dir = tmp_path / "demo-cpu"
    first = cli(args)
    deadline = time.time() + 300
    while not (run_dir / "checkpoints" / "step_000004").is_dir():
        assert first.poll() is None, first.stdout.read()[-3000:]
        assert time.time() < deadline, "no checkpoint at step 4 within 300 s"
        time.sleep(0.5)
    first.send_signal(signal.SIGKILL)  # no chance to checkpoint or clean up
    first.wait()
    second = cli(args + ["--resume"])
    out, _ = second.communicate(timeout=400)
    assert second.returncode == 0, out[-3000:]
    lines = [json.loads(x) for x in (run_dir / "trained.jsonl").read_text().splitlines()]
    sessions = list(dict.fromkeys(x["session"] for x in lines))
    assert len(sessions) == 2
    before = [x for x in lines if x["session"] == sessions[0] and x["version"] <= 4]
    after = [x for x in lines if x["session"] == sessions[1]]
    assert [x["version"] for x in before] == [1, 2, 3, 4] and [x["version"] for x in after] == [5, 6, 7, 8]
    trained = [seq for x in before + after for seq in x["seqs"]]
    assert len(trained) == len(set(trained)) == 16, "a prompt was trained twice"
    assert sorted(trained) == list(range(16)), "a prompt was skipped"
    # the optimizer's own state continued: AdamW's step count at version 5 is 5, not 1
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    history = mlflow.MlflowClient().get_metric_history(run_id, "learner/optimizer_steps")
    by_step = {m.step: m.value for m in history}
    assert by_step[4] == 5.0 and by_step[7] == 8.0
    assert sorted(by_step) == list(range(8))  # one mlflow run, every step logged


# ------------------------------------------------------------------------------------- ray job submit
@pytest.mark.slow
def test_ray_job_submit_against_a_running_head(tmp_path, tiny_model_path):
    from ray.job_submission import JobStatus

    dash = free_port()
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay short
    # Every agent port free-picked: a SIGKILLed driver's orphaned dashboard agent keeps the default 52365
    # for a minute or so, and a head whose agent cannot bind never accepts jobs ("No available agent").
    ports = {"port": free_port(), "dashboard-port": dash, "dashboard-agent-listen-port": free_port(),
             "dashboard-agent-grpc-port": free_port(), "runtime-env-agent-port": free_port(),
             "metrics-export-port": free_port()}
    head_log = tmp_path / "head.log"
    head = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--num-cpus=2", "--dashboard-host=127.0.0.1",
         *(f"--{k}={v}" for k, v in ports.items()), "--disable-usage-stats", f"--temp-dir={ray_tmp}"],
        stdout=head_log.open("w"), stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})  # as if run in the venv
    try:
        client = wait_for_jobs_api(f"http://127.0.0.1:{dash}")
        sets = " ".join(f"--set {o}" for o in overrides(tmp_path, tiny_model_path, "run.num_steps=2", "checkpoint.every_steps=0"))
        job = submit_when_ready(client, entrypoint=f"perception-r1 train configs/demo-cpu.yaml {sets}",
                                runtime_env={"working_dir": str(REPO)}, diagnose=lambda: head_diagnosis(head_log, ray_tmp))
        deadline = time.time() + 400
        while (status := client.get_job_status(job)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
            assert time.time() < deadline, client.get_job_logs(job)[-3000:]
            time.sleep(2)
        logs = client.get_job_logs(job)
        assert status == JobStatus.SUCCEEDED, logs[-3000:]
        assert "done: version 2" in logs
        import mlflow

        mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
        run_id = (tmp_path / "demo-cpu" / "mlflow_run_id").read_text().strip()
        run = mlflow.MlflowClient().get_run(run_id)
        assert run.info.status == "FINISHED" and "reward/total" in run.data.metrics
        assert f"run folder {tmp_path}/demo-cpu" in logs  # where the outputs are, said at start
        left, seen = actor_classes(f"http://127.0.0.1:{dash}")  # everything the job started is gone
        assert {"ServeController", "ReplayBuffer", "GenerationActor"} <= seen, seen  # (listed, as dead)
        assert not {"ServeController", "ProxyActor", "ReplayBuffer", "GenerationActor", "StatsBoard"} & left, left
    finally:
        head.send_signal(signal.SIGTERM)  # --block: stopping the command stops its Ray processes
        head.wait(timeout=60)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def actor_classes(dashboard: str) -> tuple[set[str], set[str]]:
    """Class names of the cluster's live actors and of all it has had, from the dashboard's state API (token auth)."""
    token = (Path.home() / ".ray" / "auth_token").read_text().strip()
    request = urllib.request.Request(f"{dashboard}/api/v0/actors?limit=1000", headers={"Authorization": f"Bearer {token}"})
    deadline = time.time() + 30
    while True:
        rows = json.loads(urllib.request.urlopen(request, timeout=10).read())["data"]["result"]["result"]
        alive = {row["class_name"] for row in rows if row["state"] == "ALIVE"}
        if not alive & {"ServeController", "ProxyActor"} or time.time() > deadline:  # Serve winds down in seconds
            return alive, {row["class_name"] for row in rows}
        time.sleep(1)


def submit_when_ready(client, *, diagnose, **job) -> str:
    """The head answers before its job agent is up ("No available agent to submit job"): retry a while."""
    deadline = time.time() + 120
    while True:
        try:
            return client.submit_job(**job)
        except RuntimeError as e:
            assert "No available agent" in str(e) and time.time() < deadline, f"{e}\n{diagnose()}"
            time.sleep(2)


def head_diagnosis(head_log: Path, ray_tmp: str) -> str:
    """The head's own output and its dashboard agent's log tail, for a head that never took a job."""
    agent_logs = sorted(Path(ray_tmp).glob("session_*/logs/dashboard_agent*.log"))
    tails = [f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in agent_logs]
    return "\n".join([f"--- ray start\n{head_log.read_text(errors='replace')[-3000:]}", *tails])


def wait_for_jobs_api(address: str):
    """A Jobs API client; token authentication stays on (Ray 2.60's default): the head wrote the token."""
    from ray.job_submission import JobSubmissionClient

    deadline = time.time() + 90
    while True:
        try:
            token = (Path.home() / ".ray" / "auth_token").read_text().strip()
            return JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"})
        except Exception:  # noqa: BLE001 -- the head is still starting
            assert time.time() < deadline, f"no Jobs API at {address}"
            time.sleep(1)


@pytest.mark.slow
@pytest.mark.reliability(fault="SIGTERM (`ray job stop`, Ctrl-C)", outcome="the buffer closes, the learner checkpoints, mlflow run KILLED, exit 130")
def test_sigterm_checkpoints_and_stops_cleanly(tmp_path, tiny_model_path):
    """What `ray job stop` (and Ctrl-C) does: the run closes the buffer, the learner checkpoints, exit 130."""
    args = ["train", "configs/demo-cpu.yaml", *sum((["--set", o] for o in overrides(
        tmp_path, tiny_model_path, "run.num_steps=200", "checkpoint.every_steps=0")), [])]
    run_dir = tmp_path / "demo-cpu"
    proc = cli(args)
    deadline = time.time() + 300
    while not (run_dir / "trained.jsonl").is_file() or len((run_dir / "trained.jsonl").read_text().splitlines()) < 3:
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 130, out[-3000:]
    steps = len((run_dir / "trained.jsonl").read_text().splitlines())
    from perception_r1.run_checkpoints import load_latest

    path, state = load_latest(run_dir / "checkpoints")
    assert state.version == steps and path.name == f"step_{steps:06d}"
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    run = mlflow.MlflowClient().get_run((run_dir / "mlflow_run_id").read_text().strip())
    assert run.info.status == "KILLED"
    assert run.data.tags["checkpoint.latest"] == str(path)


@pytest.mark.slow
@pytest.mark.reliability(fault="a second run started in a busy run folder; SIGINT seconds after Ray starts",
                         outcome="the second is refused at once (exit 2) naming the first; the first stops within "
                                 "seconds (exit 130, mlflow KILLED), nothing trained, no checkpoint")
def test_second_run_is_refused_and_an_early_sigint_stops_the_first(tmp_path, tiny_model_path):
    import threading

    args = ["train", "configs/demo-cpu.yaml", *sum((["--set", o] for o in overrides(tmp_path, tiny_model_path, "run.num_steps=50")), [])]
    first, lines = cli(args), []
    threading.Thread(target=lambda: lines.extend(first.stdout), daemon=True).start()

    def wait_for(text: str, timeout: float = 180) -> None:
        deadline = time.time() + timeout
        while not any(text in line for line in list(lines)):
            assert first.poll() is None and time.time() < deadline, "".join(lines)[-3000:]
            time.sleep(0.2)

    try:
        wait_for("INFO perception_r1: run folder")  # the lock is held from here on
        second = cli(args)
        out, _ = second.communicate(timeout=120)  # refused before torch and Ray load: seconds, unless 2 cores are busy
        assert second.returncode == 2, out[-2000:]
        assert f"is in use by another run (pid {first.pid} on" in out
        wait_for("start-up: actors, learner and judge starting")  # Ray is up; the learner is not
        first.send_signal(signal.SIGINT)
        stopped = time.time()
        first.wait(timeout=90)
        assert first.returncode == 130, "".join(lines)[-3000:]
        assert time.time() - stopped < 30  # 4-13 s measured idle; 32 s (63 s in CI) before the judge's wait
        # honoured the stop and the still-starting learner was killed rather than asked to abort
    finally:
        first.kill()
    run_dir = tmp_path / "demo-cpu"
    assert "perception-r1 train: stopped: SIGINT during start-up; nothing was trained" in "".join(lines)
    assert not (run_dir / "trained.jsonl").exists() and not list((run_dir / "checkpoints").glob("*"))
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    run = mlflow.MlflowClient().get_run((run_dir / "mlflow_run_id").read_text().strip())
    assert run.info.status == "KILLED"
