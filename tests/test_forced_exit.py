"""The offline commands' Ctrl-C: a stop that cannot finish (a request or thread ignoring cancellation) still
ends the process, with exit 130 and the resume message, `grace_s` after the signal."""

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

STUCK = textwrap.dedent("""
    import sys, time
    from perception_r1.forced_exit import forced_exit_after_sigint
    try:
        with forced_exit_after_sigint("interrupted: rerun to resume", grace_s=float(sys.argv[1])):
            print("working", flush=True)
            time.sleep(60)
    except KeyboardInterrupt:
        if sys.argv[2] == "stuck":
            time.sleep(60)  # a stop that never finishes (e.g. a thread the interpreter joins at exit)
        print("interrupted: rerun to resume", file=sys.stderr)
        sys.exit(130)
""")


def run(how: str, grace_s: float = 1.0) -> tuple[subprocess.CompletedProcess, float]:
    proc = subprocess.Popen([sys.executable, "-c", STUCK, str(grace_s), how], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "working\n"
    start = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), time.monotonic() - start


def test_a_stop_that_cannot_finish_is_forced_after_the_grace():
    done, seconds = run("stuck")
    assert done.returncode == 130 and "(the stop did not finish within 1s: forced)" in done.stderr
    assert 0.9 <= seconds < 10


def test_a_stop_that_finishes_exits_by_itself():
    done, seconds = run("clean", grace_s=20)
    assert done.returncode == 130 and "forced" not in done.stderr and seconds < 10
