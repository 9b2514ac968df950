"""The pure parts of benchmarks/bench_vllm_actor.py (the GPU benchmark itself runs on the device machine)."""

from benchmarks.bench_vllm_actor import token_limits, token_times


def test_token_times_tell_a_slow_run_from_a_late_tail():
    steady = [(1.0, 100), (2.0, 100), (3.0, 100), (4.0, 100), (10.0, 100)]
    assert token_times(steady) == {"t50_s": 3.0, "t90_s": 10.0}
    assert token_times(list(reversed(steady))) == token_times(steady)  # order of arrival in the list is irrelevant


def test_token_limits_are_long_tailed_capped_and_reproducible():
    ids = [f"p{i}" for i in range(2000)]
    limits = token_limits(ids, median=300, sigma=0.8, cap=2048)
    values = sorted(limits.values())
    assert limits == token_limits(ids, median=300, sigma=0.8, cap=2048)
    assert 16 <= values[0] and values[-1] == 2048  # clipped both ways; the cap is reached
    assert 250 < values[len(values) // 2] < 350 and sum(values) / len(values) > values[len(values) // 2]  # right tail


def _stats(queued, scheduled, first, last, tokens):
    from types import SimpleNamespace

    return SimpleNamespace(queued_ts=queued, scheduled_ts=scheduled, first_token_ts=first, last_token_ts=last,
                           num_generation_tokens=tokens)


def test_timelines_separate_a_slower_engine_from_a_later_start():
    from benchmarks.bench_vllm_actor import request_timing, timeline_summary

    start = 100.0
    timings = [request_timing("a", _stats(100.0, 100.5, 101.0, 111.0, 201), received=111.01),  # 20 steps/s
               request_timing("b", _stats(100.0, 103.0, 103.5, 123.5, 401), received=123.6),   # the last: 20 steps/s
               request_timing("c", _stats(100.0, 100.1, 100.2, 100.2, 1), received=100.3),     # one token: no rate
               request_timing("d", None, received=1.0)]                                         # vLLM kept no stats
    summary = timeline_summary(timings, start)
    assert summary["steps_per_s_p50"] == 20.0 and summary["last_id"] == "b" and summary["last_tokens"] == 401
    assert summary["last_scheduled_s"] == 3.0 and summary["queue_wait_max_s"] == 3.0
    assert round(summary["lag_max_ms"]) == 100 and timeline_summary([None], start) == {}
