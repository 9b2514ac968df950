import argparse

from benchmarks.bench_weight_sync import summary


def _rows(load: str, seconds: list[float], equal) -> list[dict]:
    return [{"load": load, "seconds": s, "GB": 16.6, "equal": equal} for s in seconds]


def test_two_gpu_summary_takes_medians_after_the_first_round_and_the_floor_ratio():
    rows = (_rows("direct", [0.9, 0.08, 0.07, 0.09], True) + _rows("layerwise", [1.0, 0.3, 0.29, 0.31], True)
            + _rows("wire", [0.5, 0.06, 0.05, 0.07], None))
    name, _, metrics = summary(argparse.Namespace(colocated=False), rows, ["direct", "layerwise", "wire"])
    assert name == "weight_sync_7b" and metrics["best_load"] == "direct" and metrics["all_equal"] is True
    assert metrics["weight_sync_7b_s"] == 0.08 and metrics["wire_median_s"] == 0.06
    assert abs(metrics["weight_sync_floor_ratio"] - 0.08 / 0.06) < 1e-12


def test_a_round_that_differs_is_reported():
    rows = _rows("direct", [0.1, 0.1], True) + _rows("layerwise", [0.3, 0.3], False) + _rows("wire", [0.1, 0.1], None)
    assert summary(argparse.Namespace(colocated=False), rows, ["direct", "layerwise", "wire"])[2]["all_equal"] is False
