"""The judge client against a fake judge on loopback: each fault ends in the configured fallback
within the deadline and is counted; the breaker opens and closes; cache and retries work."""

import asyncio
import logging
import time

import pytest

from core.config import JudgeConfig, RewardConfig
from judge.client import CircuitBreaker, JudgeClient, JudgeEndpoint

ITEMS = ("AB = 7", "BC = 5")
RESPONSE = "The diagram shows AB = 7 and BC = 5."
TIMEOUT, RETRIES, BACKOFF = 0.3, 1, 0.05
DEADLINE = (RETRIES + 1) * (TIMEOUT + 0.5) + BACKOFF


def _client(fake, **overrides) -> JudgeClient:
    cfg = JudgeConfig(**{"timeout_s": TIMEOUT, "max_retries": RETRIES, "breaker_failures": 100,
                         "breaker_reset_s": 0.5, **overrides})
    return JudgeClient(cfg, JudgeEndpoint(fake.url, "fake-judge"), backoff_s=BACKOFF, backoff_max_s=BACKOFF)


def _judge(client, response=RESPONSE, items=ITEMS):
    return asyncio.run(client.judge(response, items))


def test_ok_verdicts(fake_judge):
    client = _client(fake_judge)
    j = _judge(client)
    assert not j.failed and j.verdicts.scores == (1.0, 1.0)
    assert j.visual == pytest.approx(2 / (2 + 1e-6))
    s = client.stats()
    assert (s.num_requests, s.num_failures, s.breaker_open) == (1, 0, False)


@pytest.mark.parametrize("mode,error,counter,attempts", [
    ("stall", "timeout", "num_timeouts", RETRIES + 1),
    ("error", "http_500", "num_errors", RETRIES + 1),
    ("garbage", "bad_reply", "num_errors", 1),
    ("empty", "unparseable", "num_unparseable", 1),
])
def test_fault_falls_back_within_deadline_and_is_counted(fake_judge, mode, error, counter, attempts):
    fake_judge.mode, fake_judge.stall_s = mode, 5.0
    client = _client(fake_judge, fallback_visual=0.25)
    started = time.perf_counter()
    j = _judge(client)
    assert time.perf_counter() - started < DEADLINE
    assert (j.failed, j.error, j.visual, j.verdicts) == (True, error, 0.25, None)
    s = client.stats()
    assert getattr(s, counter) == 1 and s.num_failures == 1 and s.num_requests == 1
    assert fake_judge.num_requests == attempts


def test_refused_connection_is_retried_then_falls_back(fake_judge):
    fake_judge.stop()
    client = _client(fake_judge)
    j = _judge(client)
    assert (j.failed, j.error) == (True, "connection")
    assert client.stats().num_errors == 1


def test_judge_going_away_under_concurrent_calls_reads_as_connection_errors(fake_judge):
    """Concurrent calls that all lose the judge: the first connection error replaces the client's
    pool, but attempts still using the old one are not failed by its closing (they once read as
    `bad_reply`: 'Cannot send a request, as the client has been closed')."""
    client = _client(fake_judge)

    async def rounds():
        await asyncio.gather(*[client.judge(f"warm {i}", ITEMS) for i in range(4)])
        fake_judge.stop()
        errors = []
        for r in range(10):
            results = await asyncio.gather(*[client.judge(f"{r} {i}", ITEMS) for i in range(4)])
            errors += [j.error for j in results]
        await client.close()
        return errors

    errors = asyncio.run(rounds())
    assert errors == ["connection"] * 40
    assert client._client is None and client._retired == []


def test_client_errors_are_not_retried(fake_judge):
    fake_judge.mode, fake_judge.status = "error", 400
    client = _client(fake_judge, max_retries=3)
    assert _judge(client).error == "http_400"
    assert fake_judge.num_requests == 1


def test_breaker_opens_rejects_without_sending_then_closes(fake_judge):
    fake_judge.mode = "error"
    client = _client(fake_judge, breaker_failures=3, max_retries=0, breaker_reset_s=0.4)

    async def run():
        for _ in range(3):
            await client.judge(RESPONSE, ITEMS)
        assert client.breaker.is_open and fake_judge.num_requests == 3
        rejected = await client.judge(RESPONSE, ITEMS)
        assert rejected.error == "breaker_open" and fake_judge.num_requests == 3  # nothing sent
        fake_judge.mode = "ok"  # the judge comes back
        await asyncio.sleep(0.45)
        trial = await client.judge(RESPONSE, ITEMS)
        assert not trial.failed and not client.breaker.is_open

    asyncio.run(run())
    s = client.stats()
    assert (s.num_errors, s.num_breaker_rejections, s.num_failures, s.breaker_open) == (3, 1, 4, False)


def test_breaker_state_machine():
    now = [0.0]
    breaker = CircuitBreaker(failures=2, reset_s=10.0, clock=lambda: now[0])
    breaker.failure()
    assert breaker.allow() and not breaker.is_open
    breaker.failure()
    assert breaker.is_open and not breaker.allow()
    now[0] = 10.0
    assert breaker.allow()  # the trial
    assert not breaker.allow()  # one trial per reset period
    breaker.failure()  # the trial failed: open for another reset period
    now[0] = 15.0
    assert not breaker.allow()
    now[0] = 20.0
    assert breaker.allow()
    breaker.success()
    assert not breaker.is_open and breaker.allow() and breaker.consecutive == 0


def test_success_resets_the_consecutive_count():
    breaker = CircuitBreaker(failures=2, reset_s=1.0)
    breaker.failure()
    breaker.success()
    breaker.failure()
    assert not breaker.is_open


def test_cache_hits_and_lru_eviction(fake_judge):
    client = _client(fake_judge, cache_size=1)

    async def run():
        await client.judge(RESPONSE, ITEMS)
        await client.judge(RESPONSE, ITEMS)  # hit
        await client.judge("other response", ITEMS)  # evicts the first
        await client.judge(RESPONSE, ITEMS)  # miss again

    asyncio.run(run())
    s = client.stats()
    assert (s.num_requests, s.num_cache_hits, fake_judge.num_requests) == (3, 1, 3)


def test_cache_off_and_failures_not_cached(fake_judge):
    client = _client(fake_judge, cache_size=0)
    fake_judge.mode = "empty"

    async def run():
        await client.judge(RESPONSE, ITEMS)
        fake_judge.mode = "ok"
        await client.judge(RESPONSE, ITEMS)
        await client.judge(RESPONSE, ITEMS)

    asyncio.run(run())
    assert client.stats().num_cache_hits == 0 and fake_judge.num_requests == 3


def test_k_mismatch_counted_and_modes(fake_judge):
    fake_judge.reply = lambda messages: "<info1>nan</info1>"
    reference = _client(fake_judge)
    j = _judge(reference)
    assert j.verdicts.scores == (1.0,) and j.visual == pytest.approx(1 / (1 + 1e-6))  # K = 1 from the judge
    assert reference.stats().num_k_mismatch == 1
    strict = _client(fake_judge, verdict_mode="strict")
    assert _judge(strict).verdicts.scores == (1.0, 0.0) and strict.stats().num_k_mismatch == 1
    fixed = _client(fake_judge, reward=RewardConfig(mode="fixed"))
    j = _judge(fixed)
    assert j.verdicts.scores == (0.0, 0.0) and j.visual == 0.0  # nan -> 0, K = m


def test_api_key_from_environment_never_logged(fake_judge, monkeypatch, caplog):
    monkeypatch.setenv("TEST_JUDGE_KEY", "sk-secret-123")
    cfg = JudgeConfig(timeout_s=TIMEOUT)
    with caplog.at_level(logging.DEBUG):
        client = JudgeClient(cfg, JudgeEndpoint(fake_judge.url, "m", api_key_env="TEST_JUDGE_KEY"))
        assert not _judge(client).failed
    assert fake_judge.authorization == "Bearer sk-secret-123"
    assert "sk-secret-123" not in caplog.text


def test_concurrency_is_bounded(fake_judge):
    fake_judge.reply = lambda messages: (time.sleep(0.1), "<info1>1</info1><info2>1</info2>")[1]
    client = _client(fake_judge, max_concurrency=2, cache_size=0, timeout_s=5.0)

    async def run():
        started = time.perf_counter()
        await asyncio.gather(*[client.judge(f"r{i}", ITEMS) for i in range(6)])
        return time.perf_counter() - started

    assert asyncio.run(run()) >= 0.3  # 6 requests, 2 at a time, 0.1 s each
    assert client.stats().num_failures == 0
