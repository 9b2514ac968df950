"""Group scoring without Ray: the scorer's rewards equal the in-process oracle, annotation-less
prompts skip the judge, and a dead judge gives fallbacks while the rule rewards stay exact."""

import asyncio

import pytest
from judge_helpers import expected_rewards, make_group

from core.config import JudgeConfig, RewardConfig
from judge.client import JudgeClient, JudgeEndpoint
from judge.rules import combine
from judge.scoring import GroupScorer
from judge.verifier import VerifierPool


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def verifier(loop):
    pool = VerifierPool(num_workers=2, timeout_s=5.0)
    loop.run_until_complete(pool.start())
    yield pool
    loop.run_until_complete(pool.close())


def _scorer(cfg, verifier, fake):
    return GroupScorer(cfg, verifier=verifier, judge=JudgeClient(cfg, JudgeEndpoint(fake.url, "fake"), backoff_s=0.01))


@pytest.mark.parametrize("cfg", [JudgeConfig(), JudgeConfig(verdict_mode="strict"),
                                 JudgeConfig(reward=RewardConfig(mode="fixed", visual_weight=0.5))],
                         ids=["reference", "strict", "fixed"])
def test_scores_equal_the_oracle(loop, verifier, fake_judge, cfg):
    scorer = _scorer(cfg, verifier, fake_judge)
    groups = [make_group(i) for i in range(3, 6)]

    async def run():
        return await asyncio.gather(*[scorer.score(g) for g in groups])

    scored = loop.run_until_complete(run())
    for g, s in zip(groups, scored):
        assert s.group is g and s.judge_seconds > 0
        assert s.rewards == expected_rewards(g, cfg)
    first = scored[0].rewards
    assert (first[0].accuracy, first[0].format, first[0].verdicts) == (1.0, 1.0, (1.0, 1.0, 1.0))
    assert first[1].verdicts == (1.0, 0.0, 1.0) and first[2].repetition < -1.0
    assert scorer.stats().num_groups == 3 and fake_judge.num_requests == 12


def test_prompt_without_annotations_skips_the_judge(loop, verifier, fake_judge):
    scorer = _scorer(JudgeConfig(), verifier, fake_judge)
    g = make_group(4, annotations=False)
    s = loop.run_until_complete(scorer.score(g))
    assert fake_judge.num_requests == 0
    assert all(r.visual == 0.0 and not r.judge_failed and r.verdicts == () for r in s.rewards)
    assert s.rewards == expected_rewards(g, JudgeConfig())


def test_visual_reward_off_skips_the_judge(loop, verifier, fake_judge):
    cfg = JudgeConfig(reward=RewardConfig(use_visual_reward=False))
    s = loop.run_until_complete(_scorer(cfg, verifier, fake_judge).score(make_group(4)))
    assert fake_judge.num_requests == 0 and all(r.visual == 0.0 for r in s.rewards)


def test_dead_judge_gives_counted_fallbacks_and_exact_rules(loop, verifier, fake_judge):
    fake_judge.stop()
    cfg = JudgeConfig(timeout_s=0.5, max_retries=0, fallback_visual=0.5)
    scorer = _scorer(cfg, verifier, fake_judge)
    g = make_group(4)
    s = loop.run_until_complete(scorer.score(g))
    healthy = expected_rewards(g, cfg)
    for got, want in zip(s.rewards, healthy):
        assert got.judge_failed and got.judge_error == "connection" and got.visual == 0.5
        assert (got.accuracy, got.format, got.repetition) == (want.accuracy, want.format, want.repetition)
        assert got == combine(accuracy=want.accuracy, format=want.format, repetition=want.repetition, visual=0.5,
                              weights=cfg.reward, judge_failed=True, judge_error="connection")
    stats = scorer.stats()
    assert stats.num_failures == 4 and stats.num_errors == 4


def test_stats_merge_over_replicas_and_parts():
    from core.records import JudgeStats

    a = JudgeStats(num_groups=2, num_requests=10, num_timeouts=1, num_verify_crashes=2, latency_p50_s=0.1,
                   latency_p99_s=0.5)
    b = JudgeStats(num_groups=3, num_requests=4, num_cache_hits=6, num_unparseable=2, breaker_open=True,
                   latency_p50_s=0.2, latency_p99_s=0.3)
    m = JudgeStats.merge([a, b])
    assert (m.num_groups, m.num_requests, m.num_cache_hits, m.num_failures, m.num_timeouts) == (5, 14, 6, 3, 1)
    assert m.num_verify_crashes == 2
    assert m.breaker_open and (m.latency_p50_s, m.latency_p99_s) == (0.2, 0.5)
    assert JudgeStats.merge([]) == JudgeStats()
    assert a == JudgeStats(num_groups=2, num_requests=10, num_timeouts=1, num_verify_crashes=2, latency_p50_s=0.1,
                           latency_p99_s=0.5)  # merging leaves its parts as they were
