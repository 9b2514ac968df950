"""Reductions of records into named scalars (metrics are data: the driver fans them out to sinks)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from replay.records import GenerationStats, JudgeStats, ScoredGroup


def reward_metrics(groups: Sequence[ScoredGroup], *, staleness: Sequence[int] = ()) -> dict[str, float]:
    """Means of each reward component over every rollout, as the reference logs them (spec §3.5):
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


def generation_metrics(stats: Sequence[GenerationStats], *, wall_seconds: float) -> dict[str, float]:
    """Tokens/s per actor and in total over a wall-clock window, and how busy the actors were."""
    out: dict[str, float] = {}
    for s in stats:
        out[f"gen/actor{s.actor_id}/tokens_per_s"] = s.num_tokens / max(s.busy_seconds, 1e-9)
        out[f"gen/actor{s.actor_id}/busy_frac"] = min(s.busy_seconds / max(wall_seconds, 1e-9), 1.0)
        out[f"gen/actor{s.actor_id}/version"] = float(s.version)
    out["gen/tokens_per_s"] = sum(s.num_tokens for s in stats) / max(wall_seconds, 1e-9)
    out["gen/groups"] = float(sum(s.num_groups for s in stats))
    out["gen/weight_apply_seconds"] = sum(s.weight_apply_seconds for s in stats)
    return out


def judge_metrics(now: JudgeStats, before: JudgeStats) -> dict[str, float]:
    """Judge counters over the window between two snapshots, plus its current state."""
    delta = lambda name: float(getattr(now, name) - getattr(before, name))  # noqa: E731
    return {
        "judge/requests": delta("num_requests"),
        "judge/cache_hits": delta("num_cache_hits"),
        "judge/failures": delta("num_failures"),
        "judge/timeouts": delta("num_timeouts"),
        "judge/errors": delta("num_errors"),
        "judge/unparseable": delta("num_unparseable"),
        "judge/breaker_rejections": delta("num_breaker_rejections"),
        "judge/k_mismatch": delta("num_k_mismatch"),
        "judge/verify_timeouts": delta("num_verify_timeouts"),
        "judge/breaker_open": float(now.breaker_open),
        "judge/latency_p50_s": now.latency_p50_s,
        "judge/latency_p99_s": now.latency_p99_s,
    }


def _mean(values) -> float:
    values = list(values)
    return float(np.mean(values)) if values else 0.0
