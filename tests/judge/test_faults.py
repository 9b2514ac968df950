"""Fault tolerance of the deployed judge (Ray Serve, external judge = a fake server on loopback): the
judge refuses connections, stalls past the timeout, returns garbage, returns 5xx. Each time scoring
finishes within its deadline with counted fallbacks, the breaker opens, and once the judge is back
the breaker closes and scoring recovers."""

import asyncio
import time

import pytest
from fake_judge import FakeJudge
from judge_helpers import expected_rewards, make_group
from ports import free_port

from core.config import ExternalJudgeConfig, JudgeConfig

pytestmark = pytest.mark.slow

TIMEOUT_S, RETRIES, RESET_S, FAILURES = 0.5, 1, 1.5, 4
DEADLINE_S = (RETRIES + 1) * TIMEOUT_S + 0.5 + 1.0  # attempts + one backoff (<= 0.5 s) + Serve overhead


@pytest.fixture(scope="module")
def fake():
    server = FakeJudge().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def cfg(fake):
    return JudgeConfig(llm=ExternalJudgeConfig(base_url=fake.url, model="fake-judge"), http_port=free_port(),
                       timeout_s=TIMEOUT_S, max_retries=RETRIES, breaker_failures=FAILURES,
                       breaker_reset_s=RESET_S, fallback_visual=0.0)


@pytest.fixture(scope="module")
def service(ray_cluster, cfg):
    from judge.service import start_judge

    svc = start_judge(cfg)
    yield svc
    svc.stop()


class Run:
    """Scores one fresh group at a time (fresh: no cache hits) and tracks the stats."""

    def __init__(self, service, cfg):
        self.service, self.cfg, self.next, self.loop = service, cfg, 1000, asyncio.new_event_loop()

    def score(self):
        self.next += 1
        group = make_group(self.next)
        started = time.perf_counter()
        scored = self.loop.run_until_complete(self.service.score(group))
        return group, scored, time.perf_counter() - started

    def stats(self):
        async def settled():  # the replicas report after each group; wait for the last report
            for _ in range(50):
                s = await self.service.stats()
                if s.num_groups == self.next - 1000:
                    return s
                await asyncio.sleep(0.05)
            raise AssertionError(f"stats stuck at {s.num_groups} groups")

        return self.loop.run_until_complete(settled())

    def recover(self, fake):
        """Bring the judge back, wait out the breaker, and check scoring is exact again."""
        fake.mode = "ok"
        if fake._server is None:
            fake.start()
        time.sleep(RESET_S + 0.1)
        _, trial, _ = self.score()  # one judgement is the trial, the others are still rejected
        assert sum(not r.judge_failed for r in trial.rewards) >= 1
        group, scored, _ = self.score()
        assert scored.rewards == expected_rewards(group, self.cfg)
        assert not self.stats().breaker_open


def _assert_fallbacks(scored, error, *, elapsed):
    assert elapsed < DEADLINE_S, elapsed
    assert [r.judge_error for r in scored.rewards] == [error] * 4
    assert all(r.judge_failed and r.visual == 0.0 and r.verdicts == () for r in scored.rewards)
    assert scored.rewards[0].accuracy == 1.0 and scored.rewards[0].format == 1.0  # the rules still scored


def test_faults_fall_back_open_the_breaker_and_recover(service, cfg, fake):
    run = Run(service, cfg)
    group, scored, _ = run.score()
    assert scored.rewards == expected_rewards(group, cfg)

    faults = [("refuse", "connection", "num_errors"), ("stall", "timeout", "num_timeouts"),
              ("garbage", "bad_reply", "num_errors"), ("error", "http_500", "num_errors")]
    for mode, error, counter in faults:
        before = run.stats()
        if mode == "refuse":
            fake.stop()
        else:
            fake.mode, fake.stall_s = mode, 5.0
        _, scored, elapsed = run.score()
        _assert_fallbacks(scored, error, elapsed=elapsed)
        after = run.stats()
        assert getattr(after, counter) - getattr(before, counter) == 4, mode
        assert after.breaker_open, mode  # 4 consecutive failures = breaker_failures

        sent = fake.num_requests
        _, scored, elapsed = run.score()  # open: rejected at once, nothing sent
        assert elapsed < 1.0 and fake.num_requests == sent
        assert [r.judge_error for r in scored.rewards] == ["breaker_open"] * 4
        assert run.stats().num_breaker_rejections - before.num_breaker_rejections == 4
        run.recover(fake)

    final = run.stats()
    assert final.num_failures == (final.num_timeouts + final.num_errors + final.num_unparseable
                                  + final.num_breaker_rejections)
    assert not final.breaker_open
