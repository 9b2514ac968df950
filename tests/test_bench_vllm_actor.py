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
