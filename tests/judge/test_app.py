"""The judge as a Ray Serve service on a local cluster: handle and HTTP (msgpack) scoring equal the
in-process oracle, the lexical judge answers the OpenAI routes, and 200 concurrent HTTP scoring
requests all come back right (p50/p99 latency printed)."""

import asyncio
import time

import numpy as np
import pytest
import requests
from judge_helpers import expected_rewards, make_group
from ports import free_port

from core import codec
from core.config import JudgeConfig
from core.records import ScoredGroup

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cfg() -> JudgeConfig:
    return JudgeConfig(http_port=free_port(), timeout_s=10.0)


@pytest.fixture(scope="module")
def service(ray_cluster, cfg):
    from judge.service import start_judge

    svc = start_judge(cfg)
    yield svc
    svc.stop()


def test_handle_scores_equal_the_oracle(service, cfg):
    groups = [make_group(i) for i in (2, 3)] + [make_group(4, annotations=False)]

    async def run():
        return await asyncio.gather(*[service.score(g) for g in groups])

    for g, s in zip(groups, asyncio.run(run())):
        assert isinstance(s, ScoredGroup) and s.group.prompt.id == g.prompt.id
        assert s.rewards == expected_rewards(g, cfg)
        assert np.array_equal(s.group.rollouts[1].token_ids, g.rollouts[1].token_ids)


def test_http_score_round_trip(service, cfg):
    g = make_group(7)
    reply = requests.post(service.url, data=codec.encode(g), headers={"content-type": "application/msgpack"}, timeout=30)
    assert reply.status_code == 200 and reply.headers["content-type"] == "application/msgpack"
    s = codec.decode(reply.content, ScoredGroup)
    assert s.rewards == expected_rewards(g, cfg) and s.group.seq == 7
    assert s.rewards[0].total == pytest.approx(0.9 + 0.1 + 0.7 * 3 / (3 + 1e-6), abs=1e-6)


def test_http_rejects_a_bad_body(service):
    reply = requests.post(service.url, data=b"\x01not msgpack", timeout=30)
    assert reply.status_code == 400 and "not a msgpack RolloutGroup" in reply.text


def test_serve_already_running_keeps_its_proxy_port(service, cfg, caplog):
    """A judge started where Serve already runs is reached at that proxy, not at judge.http_port (which
    serve.start cannot change then); the mismatch is logged."""
    import logging

    from judge.service import _proxy_base

    with caplog.at_level(logging.WARNING, logger="judge.service"):
        assert _proxy_base(JudgeConfig(http_port=free_port())) == f"http://127.0.0.1:{cfg.http_port}"
    assert "Serve was already running with its HTTP proxy on 127.0.0.1:" in caplog.text
    assert service.url == f"http://127.0.0.1:{cfg.http_port}/reward/score"


def test_lexical_judge_speaks_openai(service, cfg):
    from openai import OpenAI

    from judge.verdicts import judge_messages

    client = OpenAI(base_url=f"http://127.0.0.1:{cfg.http_port}/judge-llm/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["lexical-judge"]
    reply = client.chat.completions.create(model="lexical-judge", temperature=0.0, n=2, max_completion_tokens=512,
                                           messages=judge_messages("AB = 7 and BC = 3", ("AB = 7", "BC = 4")))
    assert [c.message.content for c in reply.choices] == ["<info1>1</info1>\n<info2>0</info2>"] * 2


def test_200_concurrent_http_requests(service, cfg):
    import aiohttp

    groups = [make_group(100 + i) for i in range(200)]
    bodies = [codec.encode(g) for g in groups]

    async def post(session, body):
        started = time.perf_counter()
        async with session.post(service.url, data=body, headers={"content-type": "application/msgpack"}) as reply:
            assert reply.status == 200, await reply.text()
            return codec.decode(await reply.read(), ScoredGroup), time.perf_counter() - started

    async def run():
        connector = aiohttp.TCPConnector(limit=200)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
            return await asyncio.gather(*[post(session, b) for b in bodies])

    started = time.perf_counter()
    results = asyncio.run(run())
    wall = time.perf_counter() - started
    latencies = np.array([t for _, t in results])
    print(f"\n200 concurrent scoring requests (4 rollouts each) over HTTP: wall {wall:.2f} s, "
          f"p50 {np.percentile(latencies, 50):.3f} s, p99 {np.percentile(latencies, 99):.3f} s")
    for g, (s, _) in zip(groups, results):
        assert s.group.prompt.id == g.prompt.id and s.rewards == expected_rewards(g, cfg)
    assert not any(r.judge_failed for s, _ in results for r in s.rewards)


def test_stats_count_every_group(service):
    async def stats():
        for _ in range(50):
            s = await service.stats()
            if s.num_groups >= 204:
                return s
            await asyncio.sleep(0.1)
        return s

    s = asyncio.run(stats())
    assert s.num_groups == 204 and s.num_failures == 0 and not s.breaker_open
    assert s.num_requests + s.num_cache_hits == 4 * 203  # one group had no annotations
    assert 0 < s.latency_p50_s <= s.latency_p99_s
