"""The driver's per-step reductions of what the roles report (metrics are data: the session fans the
result out to every sink): generation counters, judge counters and the buffer's state, as named scalars."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from core.records import BufferStats, GenerationStats, JudgeStats


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
        "judge/verify_crashes": delta("num_verify_crashes"),
        "judge/breaker_open": float(now.breaker_open),
        "judge/latency_p50_s": now.latency_p50_s,
        "judge/latency_p99_s": now.latency_p99_s,
    }


def buffer_metrics(stats: BufferStats) -> dict[str, float]:
    """The buffer's counters and state (its staleness histogram goes to the run's artifacts instead)."""
    flat = dataclasses.asdict(stats)
    flat.pop("taken_staleness")
    return {f"buffer/{k}": float(v) for k, v in flat.items()}
