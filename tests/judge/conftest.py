"""Fixtures of the judge tests: a controllable fake judge LLM on loopback."""

import pytest
from fake_judge import FakeJudge  # noqa: F401 -- re-exported for the test modules


@pytest.fixture
def fake_judge():
    server = FakeJudge().start()
    yield server
    server.stop()
