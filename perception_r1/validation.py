"""Validation during training: held-out prompts, never trained on, decoded greedily (one sample per
prompt) by the generation actors and scored by the training judge; their accuracy and reward components
become the `val/*` metrics, stamped with the policy_version of the weights that produced them.

    split(prompts)   ──> training prompts (the stream, the SFT warm start), held-out prompts
                         (a seeded fraction of the dataset, or a file; same problem + image never in both)
    Validator.run()  held-out prompts ──generate(greedy)──> Generators ──> Scorer.score ──> Validation
                     (calls spread over the actors; its groups never enter the replay buffer, so it holds
                      no reservation and cannot wait on the buffer's back-pressure)

The session (session.py) says when: before the first step, every `validation.every_steps` and at the last
step, right after the learner's report (the learner broadcasts before it reports, so the actors hold that
step's weights). The replay buffer holds the learner at that version until the validation ends, so no newer
weights reach the actors meanwhile; a generate or scoring error is counted and leaves that prompt out.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from core.config import ValidationConfig, ValidationFileConfig
from core.records import Prompt, Sampling, ScoredGroup
from core.seams import Generator, Scorer
from dataprep.loaders import load_prompts
from learner.batch_metrics import reward_metrics

log = logging.getLogger("perception_r1")
REWARD_KEYS = ("accuracy", "format", "repetition", "visual", "overall", "judge_failed_frac")
"""Reward components logged as `val/<name>` (the total is `val/reward`)."""


# ------------------------------------------------------------------------------------------ the split
def split(prompts: list[Prompt], cfg: ValidationConfig) -> tuple[list[Prompt], list[Prompt]]:
    """(training prompts, held-out prompts); with validation off, every prompt trains."""
    if not cfg.every_steps:
        return prompts, []
    if isinstance(cfg.source, ValidationFileConfig):
        held = _read_file(cfg.source)
    else:
        held = _draw(prompts, fraction=cfg.source.fraction, seed=cfg.source.seed)
    keys = {content_key(p) for p in held}
    train = [p for p in prompts if content_key(p) not in keys]
    if not train:
        raise ValueError(f"every training prompt is also a validation prompt ({len(held)} held out); point "
                         "validation.source at other data, or lower validation.source.fraction")
    removed = len(prompts) - len(train)
    if removed and isinstance(cfg.source, ValidationFileConfig):
        log.warning("validation: %d training prompts also in %s were removed from training", removed, cfg.source.path)
    return train, held


def _draw(prompts: list[Prompt], *, fraction: float, seed: int) -> list[Prompt]:
    num = max(1, round(fraction * len(prompts)))
    if num >= len(prompts):
        raise ValueError(f"validation.source.fraction={fraction:g} holds out all {len(prompts)} prompts of the "
                         "dataset; lower it, or use a validation file (validation.source.type: file)")
    return [prompts[i] for i in random.Random(seed).sample(range(len(prompts)), num)]


def _read_file(source: ValidationFileConfig) -> list[Prompt]:
    if not Path(source.path).exists():
        raise ValueError(f"validation.source.path {source.path} does not exist; point it at a dataset file, or "
                         "hold out part of the training data instead (validation.source.type: fraction)")
    return load_prompts(source.path, on_bad_row=source.on_bad_row)


def content_key(prompt: Prompt) -> bytes:
    """What makes two prompts the same problem, whatever their ids: the text and the image's bytes."""
    return hashlib.sha256(prompt.problem.encode() + b"\0" + prompt.image).digest()


# ------------------------------------------------------------------------------------------ one run
@dataclass(frozen=True)
class Validation:
    """What one validation measured."""

    scored: list[ScoredGroup]
    num_errors: int
    """Prompts left out: their generate call or their scoring failed (counted by kind in the driver's counters)."""
    seconds: float

    def version(self, default: int) -> int:
        """The policy_version of the weights that decoded it (the oldest, if an update landed mid-call)."""
        return min((g.policy_version for g in self.scored), default=default)

    def metrics(self) -> dict[str, float]:
        out = {"val/num_prompts": float(len(self.scored)), "val/errors": float(self.num_errors),
               "val/seconds": self.seconds}
        if not self.scored:
            return out  # nothing measured: no accuracy rather than a made-up 0
        rewards = reward_metrics(self.scored)
        out["val/reward"] = rewards["reward/total"]
        out.update({f"val/{key}": rewards[f"reward/{key}"] for key in REWARD_KEYS})
        out["val/response_tokens_mean"] = rewards["rollout/response_tokens_mean"]
        out["val/truncated_frac"] = rewards["rollout/truncated_frac"]
        rollouts = [r for g in self.scored for r in g.group.rollouts]
        out["val/policy_version"] = float(self.version(0))
        out["val/mixed_version_frac"] = sum(r.min_version != r.max_version for r in rollouts) / len(rollouts)
        return out


class Validator:
    def __init__(self, *, prompts: Sequence[Prompt], generators: list[Generator], scorer: Scorer, sampling: Sampling,
                 prompts_per_call: int, counters: Counter[str]) -> None:
        assert sampling.n == 1 and sampling.temperature == 0, "validation decodes greedily, one sample per prompt"
        self.prompts, self.generators, self.scorer, self.sampling = list(prompts), generators, scorer, sampling
        self.prompts_per_call, self.counters = prompts_per_call, counters

    async def run(self) -> Validation:
        start = time.perf_counter()
        m = self.prompts_per_call
        calls = [self.prompts[i:i + m] for i in range(0, len(self.prompts), m)]
        results = await asyncio.gather(*[self._call(i % len(self.generators), chunk) for i, chunk in enumerate(calls)])
        scored = [s for result in results for s in result if s is not None]
        return Validation(scored=scored, num_errors=len(self.prompts) - len(scored),
                          seconds=time.perf_counter() - start)

    async def _call(self, idx: int, prompts: list[Prompt]) -> list[ScoredGroup | None]:
        try:
            groups = await self.generators[idx].generate(prompts, sampling=self.sampling)
        except Exception as e:  # noqa: BLE001 -- a validation error never stops training: counted by kind
            self._count("val_generate_errors", e, f"generation actor {idx} failed a call of {len(prompts)} prompts")
            return [None] * len(prompts)
        return list(await asyncio.gather(*[self._score(g) for g in groups]))

    async def _score(self, group) -> ScoredGroup | None:
        try:
            return await self.scorer.score(group)
        except Exception as e:  # noqa: BLE001 -- as above
            self._count("val_score_errors", e, f"scoring prompt {group.prompt.id} failed")
            return None

    def _count(self, kind: str, error: Exception, what: str) -> None:
        self.counters[f"{kind}/{type(error).__name__}"] += 1
        log.warning("validation: %s (%s: %s); left out of this validation", what, type(error).__name__, error)
