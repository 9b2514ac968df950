"""The judge-LLM client: one judgement per (response, annotations), over any OpenAI-compatible chat
endpoint (`openai.AsyncOpenAI`), that never raises and never waits past its deadline.

    judge(response, annotations)
      ├─ LRU cache hit ───────────────────────────────> cached verdicts
      ├─ circuit breaker open ────────────────────────> fallback r_v (breaker_open)
      └─ semaphore (max_concurrency) ─> attempt ─ ok ─> parse verdicts ─ no tag ─> fallback (unparseable)
                                         │ timeout / connection / 408, 429, 5xx
                                         └─ backoff with full jitter, up to max_retries more attempts,
                                            then fallback (timeout or error) and a breaker failure

Each attempt is bounded by `timeout_s` (the openai client's timeout and an outer asyncio deadline,
which also catches a server that trickles bytes), so a judgement ends within about
`(max_retries + 1) * timeout_s + sum(backoffs)`. The breaker opens after `breaker_failures`
consecutive transport failures, rejects calls for `breaker_reset_s`, then lets one trial through per
reset period; a success closes it. Every fallback is counted (`JudgeStats`). The API key is read from
the environment variable the config names and is never logged.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import random
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Callable

import numpy as np

from core.config import JudgeConfig
from core.records import JudgeStats
from judge.verdicts import SYSTEM_PROMPT, Verdicts, judge_messages, parse_verdicts

log = logging.getLogger(__name__)

_RETRY_STATUS = frozenset({408, 409, 429})


@dataclass(frozen=True, slots=True)
class JudgeEndpoint:
    """Where the judge LLM answers."""

    base_url: str
    """OpenAI-compatible base URL, ending in `/v1`."""
    model: str
    api_key_env: str | None = None
    """Environment variable holding the API key; None for our own deployments (no key)."""


@dataclass(frozen=True, slots=True)
class Judgement:
    visual: float
    """r_v (the fallback when failed)."""
    verdicts: Verdicts | None = None
    failed: bool = False
    error: str = ""
    """`timeout`, `connection`, `http_<code>`, `bad_reply`, `unparseable` or `breaker_open`; empty if ok."""


class CircuitBreaker:
    """Opens after `failures` consecutive failures; while open, `allow()` is False except one trial
    per `reset_s`; a success closes it."""

    def __init__(self, *, failures: int, reset_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.failures, self.reset_s, self.clock = failures, reset_s, clock
        self.consecutive = 0
        self.opened_at: float | None = None

    @property
    def is_open(self) -> bool:
        return self.opened_at is not None

    def allow(self) -> bool:
        if self.opened_at is None:
            return True
        if self.clock() - self.opened_at >= self.reset_s:
            self.opened_at = self.clock()  # this caller is the trial; the next waits another reset_s
            return True
        return False

    def success(self) -> None:
        self.consecutive, self.opened_at = 0, None

    def failure(self) -> None:
        self.consecutive += 1
        if self.consecutive >= self.failures or self.opened_at is not None:
            if self.opened_at is None:
                log.warning("judge circuit breaker opened after %d consecutive failures", self.consecutive)
            self.opened_at = self.clock()


class _AttemptError(Exception):
    def __init__(self, kind: str, *, retry: bool) -> None:
        super().__init__(kind)
        self.kind, self.retry = kind, retry


class JudgeClient:
    """`await client.judge(response, annotations) -> Judgement`. Bound to the event loop of its first call."""

    def __init__(self, cfg: JudgeConfig, endpoint: JudgeEndpoint, *, backoff_s: float = 0.5,
                 backoff_max_s: float = 8.0, system_prompt: str = SYSTEM_PROMPT) -> None:
        self.cfg, self.endpoint, self.system_prompt = cfg, endpoint, system_prompt
        self.backoff_s, self.backoff_max_s = backoff_s, backoff_max_s
        self.strict = cfg.verdict_mode == "strict" or cfg.reward.mode == "fixed"
        self.finite = cfg.reward.mode == "fixed"
        self.breaker = CircuitBreaker(failures=cfg.breaker_failures, reset_s=cfg.breaker_reset_s)
        self.counters = JudgeStats()
        self.latencies: deque[float] = deque(maxlen=4096)
        self._cache: OrderedDict[tuple[str, tuple[str, ...]], Verdicts] = OrderedDict()
        self._client = None
        self._retired: list = []
        """Clients dropped after a connection error, closed once no attempt is using them."""
        self._in_flight = 0
        self._semaphore: asyncio.Semaphore | None = None

    async def judge(self, response: str, annotations: tuple[str, ...]) -> Judgement:
        key = (response, tuple(annotations))
        if key in self._cache:
            self._cache.move_to_end(key)
            self.counters.num_cache_hits += 1
            return Judgement(self._cache[key].visual, self._cache[key])
        if not self.breaker.allow():
            self.counters.num_breaker_rejections += 1
            return self._fallback("breaker_open")
        self.counters.num_requests += 1
        started = time.perf_counter()
        try:
            text = await self._request_with_retries(response, annotations)
        except _AttemptError as e:
            self.breaker.failure()
            if e.kind == "timeout":
                self.counters.num_timeouts += 1
            else:
                self.counters.num_errors += 1
            return self._fallback(e.kind)
        finally:
            self.latencies.append(time.perf_counter() - started)
        self.breaker.success()
        return self._verdicts(key, text, num_items=len(annotations))

    def stats(self) -> JudgeStats:
        """A snapshot of the client's counters, with the breaker's state and latency percentiles."""
        lat = np.asarray(self.latencies, dtype=np.float64)
        return dataclasses.replace(self.counters, breaker_open=self.breaker.is_open,
                                   latency_p50_s=float(np.percentile(lat, 50)) if lat.size else 0.0,
                                   latency_p99_s=float(np.percentile(lat, 99)) if lat.size else 0.0)

    async def close(self) -> None:
        if self._client is not None:
            self._retire(self._client)
        await self.close_retired()

    # ------------------------------------------------------------------------------------ internals
    def _fallback(self, error: str) -> Judgement:
        return Judgement(self.cfg.fallback_visual, None, failed=True, error=error)

    def _verdicts(self, key: tuple[str, tuple[str, ...]], text: str, *, num_items: int) -> Judgement:
        verdicts = parse_verdicts(text, num_items=num_items, strict=self.strict, finite=self.finite)
        if not verdicts.parsed:
            self.counters.num_unparseable += 1
            return self._fallback("unparseable")
        if verdicts.num_tags != num_items:
            self.counters.num_k_mismatch += 1
        if self.cfg.cache_size > 0:
            self._cache[key] = verdicts
            while len(self._cache) > self.cfg.cache_size:
                self._cache.popitem(last=False)
        return Judgement(verdicts.visual, verdicts)

    async def _request_with_retries(self, response: str, annotations: tuple[str, ...]) -> str:
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(self.cfg.max_concurrency)
        async with self._semaphore:
            for attempt in range(self.cfg.max_retries + 1):
                try:
                    return await self._attempt(response, annotations)
                except _AttemptError as e:
                    if not e.retry or attempt == self.cfg.max_retries:
                        raise
                await asyncio.sleep(random.uniform(0, min(self.backoff_max_s, self.backoff_s * 2 ** attempt)))
        raise AssertionError("unreachable")

    async def _attempt(self, response: str, annotations: tuple[str, ...]) -> str:
        import openai

        client = self._openai()
        self._in_flight += 1
        try:
            reply = await asyncio.wait_for(client.chat.completions.create(
                model=self.endpoint.model, messages=judge_messages(response, annotations, system_prompt=self.system_prompt),
                temperature=self.cfg.temperature, n=1, max_completion_tokens=self.cfg.max_tokens,
                timeout=self.cfg.timeout_s), self.cfg.timeout_s + 0.5)
        except (asyncio.TimeoutError, openai.APITimeoutError) as e:
            raise _AttemptError("timeout", retry=True) from e
        except openai.APIConnectionError as e:
            self._retire(client)  # a new pool: after an endpoint restart every kept-alive connection is dead
            raise _AttemptError("connection", retry=True) from e
        except openai.APIStatusError as e:
            raise _AttemptError(f"http_{e.status_code}", retry=e.status_code >= 500 or e.status_code in _RETRY_STATUS) from e
        except Exception as e:  # noqa: BLE001 -- a body the client cannot read: counted as an error, not retried
            raise _AttemptError("bad_reply", retry=False) from e
        finally:
            self._in_flight -= 1
            if self._in_flight == 0 and self._retired:
                await self.close_retired()
        content = _content(reply)
        if content is None:
            raise _AttemptError("bad_reply", retry=False)
        return content

    def _retire(self, client) -> None:
        """Stop handing out `client`; attempts still using it finish on it (closing it under them
        would fail them as if the judge had answered garbage)."""
        if self._client is client:
            self._client = None
        if client not in self._retired:
            self._retired.append(client)

    async def close_retired(self) -> None:
        retired, self._retired = self._retired, []
        for client in retired:
            await client.close()

    def _openai(self):
        if self._client is None:
            from openai import AsyncOpenAI

            self._client = AsyncOpenAI(base_url=self.endpoint.base_url, api_key=self._api_key(), max_retries=0,
                                       timeout=self.cfg.timeout_s)
        return self._client

    def _api_key(self) -> str:
        if self.endpoint.api_key_env is None:
            return "unused"
        key = os.environ.get(self.endpoint.api_key_env)
        if not key:
            log.warning("judge API key variable %s is unset; sending requests without a key", self.endpoint.api_key_env)
            return "EMPTY"
        return key


def _content(reply: object) -> str | None:
    """The first choice's message text, or None when the reply is not a chat completion."""
    try:
        content = reply.choices[0].message.content  # type: ignore[attr-defined]
    except (AttributeError, IndexError, TypeError):
        return None
    return content if isinstance(content, str) else None
