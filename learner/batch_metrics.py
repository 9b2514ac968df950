"""The batch a learner step trained on, reduced to named scalars: reward components as the reference
logs them, response lengths, truncation, uniform groups and the staleness histogram."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from core.records import ScoredGroup


def reward_metrics(groups: Sequence[ScoredGroup], *, staleness: Sequence[int] = ()) -> dict[str, float]:
    """Means of each reward component over every rollout, as the reference logs them (docs/method.md §3.5):
    `overall` excludes the repetition term; `visual` averages only prompts with annotations."""
    rewards = [r for g in groups for r in g.rewards]
    if not rewards:
        return {}
    annotated = [r.visual for g in groups if g.group.prompt.annotations for r in g.rewards]
    lengths = [len(r.token_ids) for g in groups for r in g.group.rollouts]
    out = {
        "reward/total": _mean(r.total for r in rewards),
        "reward/overall": _mean(r.overall for r in rewards),
        "reward/accuracy": _mean(r.accuracy for r in rewards),
        "reward/format": _mean(r.format for r in rewards),
        "reward/repetition": _mean(r.repetition for r in rewards),
        "reward/visual": float(np.mean(annotated)) if annotated else 0.0,
        "reward/judge_failed_frac": _mean(float(r.judge_failed) for r in rewards),
        "rollout/response_tokens_mean": float(np.mean(lengths)),
        "rollout/truncated_frac": _mean(float(r.finish_reason == "length") for g in groups for r in g.group.rollouts),
        "rollout/uniform_group_frac": _mean(float(len(set(g.totals().tolist())) == 1) for g in groups),
    }
    if staleness:
        out["staleness/mean"] = float(np.mean(staleness))
        out["staleness/max"] = float(np.max(staleness))
        for value, count in zip(*np.unique(np.asarray(staleness), return_counts=True)):
            out[f"staleness/groups_at_{int(value)}"] = float(count)  # this step's histogram
    return out


def _mean(values) -> float:
    values = list(values)
    return float(np.mean(values)) if values else 0.0
