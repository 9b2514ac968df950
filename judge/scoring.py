"""Scoring one rollout group: the rule rewards and the judge's verdicts of all n rollouts at once,
combined per rollout into `RewardBreakdown`s (docs/method.md §3.5). Plain asyncio, no Ray: the reward
deployment (`judge.app`) wraps it, tests drive it directly.

    group ─┬─ format, repetition (inline, microseconds)
           ├─ accuracy x n ──> VerifierPool (worker processes, each bounded by its timeout)   ─┐ gather
           └─ judge x n ─────> JudgeClient (cache, breaker, retries; only annotated prompts) ─┘
"""

from __future__ import annotations

import asyncio
import time

from core.config import JudgeConfig
from core.records import JudgeStats, RewardBreakdown, RolloutGroup, ScoredGroup
from judge.client import JudgeClient, Judgement
from judge.rules import combine, format_reward, repetition_penalty
from judge.verifier import VerifierPool

_NO_JUDGEMENT = Judgement(visual=0.0)
"""A prompt without annotations (or the visual reward off): r_v = 0, not a failure (docs/method.md §3.3)."""


class GroupScorer:
    """`await scorer.score(group) -> ScoredGroup`; `scorer.stats()` counts what the judge did."""

    def __init__(self, cfg: JudgeConfig, *, verifier: VerifierPool, judge: JudgeClient) -> None:
        self.cfg, self.verifier, self.judge = cfg, verifier, judge
        self.num_groups = 0

    async def score(self, group: RolloutGroup) -> ScoredGroup:
        started = time.perf_counter()
        prompt, texts = group.prompt, [r.text for r in group.rollouts]
        mode = self.cfg.reward.mode
        accuracy = [self.verifier.accuracy(t, prompt.answer, mode=mode) for t in texts]
        judged = self.cfg.reward.use_visual_reward and bool(prompt.annotations)
        judgements = [self.judge.judge(t, prompt.annotations) for t in texts] if judged else []
        results = await asyncio.gather(*accuracy, *judgements)
        scores, verdicts = results[:len(texts)], results[len(texts):] or [_NO_JUDGEMENT] * len(texts)
        rewards = tuple(self._breakdown(t, a, j) for t, a, j in zip(texts, scores, verdicts))
        self.num_groups += 1
        return ScoredGroup(group=group, rewards=rewards, judge_seconds=time.perf_counter() - started)

    def stats(self) -> JudgeStats:
        """The judge client's and the verifier's counters merged, with the groups scored."""
        return JudgeStats.merge([self.judge.stats(), self.verifier.counters, JudgeStats(num_groups=self.num_groups)])

    async def close(self) -> None:
        await asyncio.gather(self.verifier.close(), self.judge.close())

    def _breakdown(self, text: str, accuracy: float, judgement: Judgement) -> RewardBreakdown:
        reward = self.cfg.reward
        return combine(accuracy=accuracy, format=format_reward(text),
                       repetition=repetition_penalty(text, n=reward.ngram_size, penalty=reward.repetition_penalty),
                       visual=judgement.visual, weights=reward,
                       verdicts=judgement.verdicts.scores if judgement.verdicts else (),
                       judge_failed=judgement.failed, judge_error=judgement.error)
