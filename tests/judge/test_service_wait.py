"""Waiting for the judge's Serve applications (`judge.service._wait_running`), against a fake `serve.status`:
it returns once every app runs, and a stop request, a failed deployment or the deadline each end the wait
with an error naming the cause."""

import threading
import time
from types import SimpleNamespace

import pytest
from ray import serve
from ray.serve.schema import ApplicationStatus

from judge.service import JudgeStartCancelled, JudgeStartFailed, JudgeStartTimedOut, _wait_running

APPS = ("judge-llm", "reward")


def status_sequence(monkeypatch, *states: dict) -> list:
    """serve.status() answers each of `states` in turn (app -> (status, message)), then the last forever."""
    calls = []

    def status():
        now = states[min(len(calls), len(states) - 1)]
        calls.append(now)
        return SimpleNamespace(applications={app: SimpleNamespace(status=s, message=m) for app, (s, m) in now.items()})

    monkeypatch.setattr(serve, "status", status)
    return calls


DEPLOYING = {app: (ApplicationStatus.DEPLOYING, "") for app in APPS}
RUNNING = {app: (ApplicationStatus.RUNNING, "") for app in APPS}


def test_returns_once_every_app_runs(monkeypatch):
    half = {"judge-llm": (ApplicationStatus.RUNNING, ""), "reward": (ApplicationStatus.DEPLOYING, "")}
    calls = status_sequence(monkeypatch, DEPLOYING, half, RUNNING)
    _wait_running(APPS, cancel=threading.Event(), until=time.monotonic() + 30, deadline_s=30)
    assert len(calls) == 3


@pytest.mark.reliability(fault="SIGINT/SIGTERM while the judge's Serve applications deploy",
                         outcome="the wait ends within its poll (0.25 s); what was deployed is deleted")
def test_a_stop_request_ends_the_wait_at_once(monkeypatch):
    status_sequence(monkeypatch, DEPLOYING)
    cancel = threading.Event()
    threading.Timer(0.3, cancel.set).start()
    start = time.monotonic()
    with pytest.raises(JudgeStartCancelled):
        _wait_running(APPS, cancel=cancel, until=time.monotonic() + 30, deadline_s=30)
    assert time.monotonic() - start < 2


def test_a_failed_deployment_is_named_with_serves_message(monkeypatch):
    failed = {"judge-llm": (ApplicationStatus.DEPLOY_FAILED, "replica constructor raised: no GPU"),
              "reward": (ApplicationStatus.DEPLOYING, "")}
    status_sequence(monkeypatch, DEPLOYING, failed)
    with pytest.raises(JudgeStartFailed, match="'judge-llm' failed to deploy: replica constructor raised: no GPU") as e:
        _wait_running(APPS, cancel=None, until=None, deadline_s=None)
    assert not isinstance(e.value, JudgeStartTimedOut)


@pytest.mark.reliability(fault="the judge's applications never come up (e.g. a vLLM judge asking for a GPU no node has)",
                         outcome="the run fails at run.startup_timeout_s naming each app still waiting and Serve's "
                                 "message")
def test_the_deadline_names_what_is_still_waiting(monkeypatch):
    stuck = {"judge-llm": (ApplicationStatus.DEPLOYING, "Deployment 'VLLMJudgeServer' has 1 replica that cannot be "
                                                        "scheduled: no node has {'GPU': 1}"),
             "reward": (ApplicationStatus.RUNNING, "")}
    status_sequence(monkeypatch, stuck)
    start = time.monotonic()
    with pytest.raises(JudgeStartTimedOut) as e:
        _wait_running(APPS, cancel=threading.Event(), until=time.monotonic() + 0.5, deadline_s=0.5)
    assert time.monotonic() - start < 5
    assert str(e.value).startswith("the judge did not come up within 0.5s: judge-llm DEPLOYING: Deployment")
    assert "reward" not in str(e.value)
