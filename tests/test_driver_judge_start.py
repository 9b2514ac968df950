"""How the driver reads the judge's start-up outcomes (`perception_r1.driver._start_judge`, with a fake
`start_judge`): a stop request is the run's `Interrupted`, a deadline is a `RunFailed` naming the knob that
sets it, a failed deployment a `RunFailed` with Serve's message; the config's start-up deadline is passed on."""

import pytest

from core.config_files import parse_config
from judge.service import JudgeStartCancelled, JudgeStartFailed, JudgeStartTimedOut
from perception_r1 import driver
from perception_r1.stop_signals import Interrupted, StopSignals


def start_with(monkeypatch, error: Exception | None):
    seen = {}

    def fake_start_judge(cfg, *, cancel, deadline_s):
        seen.update(cancel=cancel, deadline_s=deadline_s)
        if error is not None:
            raise error
        return "judge"

    monkeypatch.setattr(driver, "start_judge", fake_start_judge)
    return seen


def test_the_judge_gets_the_stop_event_and_the_startup_deadline(monkeypatch):
    seen = start_with(monkeypatch, None)
    with StopSignals() as stop:  # the handlers it (re)installs are put back after
        assert driver._start_judge(parse_config({"run": {"startup_timeout_s": 123}}), stop) == "judge"
    assert seen == {"cancel": stop.requested, "deadline_s": 123}


def test_a_stop_while_the_judge_starts_is_an_interruption(monkeypatch):
    start_with(monkeypatch, JudgeStartCancelled("a stop request came while the judge was starting"))
    stop = StopSignals()
    stop.request("SIGINT")
    with pytest.raises(Interrupted, match="SIGINT during start-up; nothing was trained"):
        driver._start_judge(parse_config({}), stop)


@pytest.mark.parametrize("error, message", [
    (JudgeStartTimedOut("the judge did not come up within 900s: judge-llm DEPLOYING"),
     "the judge did not come up within 900s: judge-llm DEPLOYING; raise run.startup_timeout_s if it needs longer"),
    (JudgeStartFailed("the judge's Serve application 'judge-llm' failed to deploy: no GPU"),
     "the judge's Serve application 'judge-llm' failed to deploy: no GPU")])
def test_a_judge_that_cannot_start_fails_the_run_naming_why(monkeypatch, error, message):
    start_with(monkeypatch, error)
    with pytest.raises(driver.RunFailed) as e:
        driver._start_judge(parse_config({}), StopSignals())
    assert str(e.value) == message
