"""bench_async's bookkeeping: a run split over calls of a time-limited GPU machine merges today's rows of
this device and no others; the phase shares come from the step metrics."""

import datetime
import json

import pytest

from benchmarks import bench_async, common


def _row(staleness: int, samples: float) -> dict:
    return {"max_staleness": staleness, "samples_per_s": samples}


def test_merge_keeps_todays_rows_of_this_device_for_other_staleness_values(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(common, "device", lambda: "GPU x1")
    earlier = {"device": "GPU x1", "date": datetime.date.today().isoformat(),
               "metrics": {"staleness_0": _row(0, 2.0), "staleness_2": _row(2, 9.0), "async_sync_ratio": 4.5}}
    (tmp_path / "one.json").write_text(json.dumps(earlier))
    assert bench_async.merged("one", [_row(2, 3.0)]) == [_row(0, 2.0), _row(2, 3.0)]  # the rerun replaces its row
    assert bench_async.merged("other", [_row(1, 3.0)]) == [_row(1, 3.0)]
    (tmp_path / "one.json").write_text(json.dumps({**earlier, "date": "2020-01-01"}))
    assert bench_async.merged("one", [_row(2, 3.0)]) == [_row(2, 3.0)]  # another day: not one run
    (tmp_path / "one.json").write_text(json.dumps({**earlier, "device": "GPU x2"}))
    assert bench_async.merged("one", [_row(2, 3.0)]) == [_row(2, 3.0)]


def test_phase_shares_of_a_step():
    history = [{"gen/actor0/busy_frac": 0.5, "gen/actor1/busy_frac": 1.0}, {"gen/actor0/busy_frac": 0.9}]
    got = bench_async.phase_fractions({"step_seconds": 10.0, "learner_step_s": 6.0, "sync_s": 0.2}, history)
    assert got == pytest.approx({"learner_frac": 0.6, "sync_frac": 0.02, "gen_busy_frac": 0.8})
