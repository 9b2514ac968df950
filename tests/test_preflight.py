"""What a run checks before it starts anything (perception_r1/preflight.py), one run per folder
(perception_r1/run_lock.py), and OS errors named as such (a full disk at checkpoint time)."""

import json
import os
import signal
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from threading import Thread

import pytest

from core.config_files import parse_config
from perception_r1 import preflight
from perception_r1.driver import check_job_paths
from perception_r1.run_lock import RunFolderBusy, RunLock

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ lock
@pytest.mark.reliability(fault="two runs started in one run folder",
                         outcome="the second is refused at once, naming the first (pid, host, start, command)")
def test_a_second_run_in_the_same_folder_is_refused_naming_the_first(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from perception_r1.run_lock import RunLock\n"
        f"RunLock(Path({str(tmp_path)!r})).acquire(); print('held', flush=True); time.sleep(60)")],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderBusy, match=rf"in use by another run \(pid {holder.pid} on .*, started "):
            RunLock(tmp_path).acquire()
        holder.send_signal(signal.SIGKILL)  # the kernel drops a dead holder's lock: no stale lock
        holder.wait(timeout=10)
        RunLock(tmp_path).acquire().release()
    finally:
        holder.kill()


def test_the_lock_is_released_and_reacquired_in_one_process(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(RunFolderBusy):
            RunLock(tmp_path).acquire()
    with RunLock(tmp_path):
        pass


# ----------------------------------------------------------------------------------------- model
@pytest.mark.reliability(fault="model.path holds a text-only (non Qwen2.5-VL) model",
                         outcome="refused before Ray starts, naming the model type found")
def test_a_text_only_model_folder_is_refused_before_anything_starts(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}))
    with pytest.raises(ValueError, match=r"holds a 'qwen2' model \(Qwen2ForCausalLM\).*Qwen2\.5-VL"):
        preflight.check_model_type(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    preflight.check_model_type(tmp_path)


# -------------------------------------------------------------------------------------- folders
@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_an_unwritable_output_folder_is_named_with_the_os_reason(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"run.output_dir: cannot write to .*file/runs: not a directory \(ENOTDIR\)"):
        preflight.check_writable(tmp_path / "file" / "runs", field="run.output_dir")
    full = tmp_path / "full"
    full.mkdir()
    os.symlink("/dev/full", full / f".write-probe-{os.getpid()}")  # every write there: no space left
    with pytest.raises(ValueError, match=r"no space left on device \(ENOSPC\)"):
        preflight.check_writable(full, field="run.output_dir")


@pytest.mark.reliability(fault="the disk fills up while a checkpoint is written",
                         outcome="the error says no space left (ENOSPC) and where, not torch's 'unexpected pos'")
def test_a_full_disk_at_checkpoint_time_is_named(tmp_path):
    from learner.checkpoint_writer import checkpoint_error

    path = tmp_path / "step_000004.tmp"
    path.mkdir()
    os.symlink("/dev/full", path / ".write-probe")  # the probe write after the failure hits a full device
    err = checkpoint_error(path, RuntimeError("unexpected pos 704 vs 598"))
    assert err.errno == 28 and "no space left on device (ENOSPC)" in str(err) and str(path) in str(err)
    # an OSError in the chain is named directly; an error with no OS cause is reported as it is
    chained = RuntimeError("write failed")
    chained.__cause__ = PermissionError(13, "Permission denied")
    assert "permission denied (EACCES)" in str(checkpoint_error(tmp_path, chained))
    assert "unexpected pos" in str(checkpoint_error(tmp_path / "ok", RuntimeError("unexpected pos 1 vs 2")))


# ------------------------------------------------------------------------------------- tracking
@pytest.mark.reliability(fault="tracking.mlflow_uri points at a server that does not answer",
                         outcome="refused before Ray starts, within 10 s, naming the URI")
def test_an_unreachable_tracking_server_is_refused_fast(tmp_path):
    import socket

    with socket.socket() as s:  # a port that accepts connections and never answers
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(ValueError, match=rf"no mlflow server answers at http://127.0.0.1:{port}/health within 1s"):
            preflight.check_tracking(f"http://127.0.0.1:{port}", timeout_s=1.0)
        assert time.monotonic() - started < 5
    with pytest.raises(ValueError, match="no mlflow server answers"):  # nothing listening at all
        preflight.check_tracking(f"http://127.0.0.1:{port}", timeout_s=1.0)


def test_a_tracking_server_that_answers_passes(tmp_path):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(404 if self.path != "/health" else 200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    Thread(target=server.serve_forever, daemon=True).start()
    try:
        preflight.check_tracking(f"http://127.0.0.1:{server.server_address[1]}")
        preflight.check_tracking(f"sqlite:///{tmp_path}/db/mlruns.db")
        assert (tmp_path / "db").is_dir()
    finally:
        server.shutdown()


# ------------------------------------------------------------------------------------ resources
@pytest.mark.reliability(fault="the learner asks for more CPUs than the cluster has",
                         outcome="refused at config check (local) or right after connecting (joined), naming the fields")
def test_more_cpus_than_the_cluster_has_is_refused():
    with pytest.raises(ValueError, match=r"learner asks for 4 CPUs .* cluster.num_cpus is 2"):
        parse_config({"cluster": {"num_cpus": 2}, "learner": {"cpus_per_worker": 4}})
    cfg = parse_config({"learner": {"num_workers": 2, "cpus_per_worker": 3}})
    with pytest.raises(ValueError, match=r"asks for CPU 6, GPU 0 but the Ray cluster has CPU 4, GPU 0"):
        preflight.check_resources(cfg, {"CPU": 4.0})
    preflight.check_resources(cfg, {"CPU": 6.0})


# -------------------------------------------------------------------------------- ray job submit
def test_relative_outputs_under_a_job_working_dir_are_refused(monkeypatch):
    cfg = parse_config({})
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    check_job_paths(cfg)  # not a job: relative paths are the user's working dir
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"working_dir": "gcs://x.zip"}}))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ValueError, match=r"run.output_dir=runs and tracking.mlflow_uri=sqlite:///mlruns.db .*"
                                         r"temporary copy.*--set run.output_dir=\$PWD/runs"):
        check_job_paths(cfg)
    check_job_paths(parse_config({"run": {"output_dir": "/data/runs"},
                                  "tracking": {"mlflow_uri": "sqlite:////data/mlruns.db"}}))
