"""The shipped Grafana dashboard (docs/grafana/perception-r1.json) charts what the system exports: every
metric its panels query is one the code exports, every exported gauge has a panel, the labels it filters
on are the ones the sink sets, and every query goes through the templated Prometheus data source.

What is exported is derived from the code, not listed here: one step's metrics built the way the session
builds them (the learner's loss statistics through the trainer's own reduction, the batch's rewards, the
generation, judge and buffer reductions, and the keys the trainer, the learner worker and the session
write literally), passed through `RayMetricsSink` with a fake `Gauge` that records the names it creates.
A renamed, added or removed metric fails here until the dashboard follows."""

from __future__ import annotations

import dataclasses
import json
import re
from collections import defaultdict
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from time_bound import within

from core.config import LossConfig
from core.records import (
    BufferStats,
    GenerationStats,
    JudgeStats,
    Prompt,
    RewardBreakdown,
    Rollout,
    RolloutGroup,
    ScoredGroup,
)
from learner.batch_metrics import reward_metrics
from perception_r1.step_metrics import buffer_metrics, generation_metrics, judge_metrics
from perception_r1.tracking import RayMetricsSink

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "docs" / "grafana" / "perception-r1.json"
RAY_NAMESPACE = "ray"
"""Ray's Prometheus exporter prefixes every metric with its namespace (`NAMESPACE` in
ray/_private/telemetry/open_telemetry_metric_recorder.py, Ray 2.60) and writes names in lower case
(seen on Ray 2.60: `driver/generate_errors/TypeError` is served as `..._driver_generate_errors_typeerror`)."""


@pytest.fixture(autouse=True)
def time_bound():
    """Each test ends within 60 s (it imports torch): a hang fails it instead of stalling the suite."""
    with within(60):
        yield


# --------------------------------------------------------------------------------- what is exported
def learner_metrics() -> dict[str, float]:
    """The trainer's reduction of one micro-batch's loss statistics, with every optional term on."""
    import torch

    from learner.grpo import policy_loss
    from learner.trainer import _accumulate, _finish, _read_once

    logp, mask = torch.full((2, 3), -1.0), torch.ones(2, 3)
    loss, stats = policy_loss(logp, old_logp=logp, advantages=torch.tensor([1.0, -1.0]), mask=mask,
                              cfg=LossConfig(type="tis", kl_coef=0.1, entropy_coef=0.01), normalizer=6.0,
                              behaviour_logp=logp - 0.1, ref_logp=logp, entropy=torch.ones(2, 3))
    sums: dict = {}
    _accumulate(sums, loss.detach(), stats)
    totals: dict[str, float] = defaultdict(float)
    _read_once(sums, torch.tensor(1.0), totals)
    return _finish(totals)


def scored_group() -> ScoredGroup:
    prompt = Prompt(id="p", index=0, problem="<image>x", answer="1", image=b"", annotations=("AB = 3",))
    rollout = Rollout(token_ids=np.arange(3, dtype=np.int32), logprobs=np.zeros(3, np.float32), text="t",
                      finish_reason="stop", min_version=0, max_version=0)
    group = RolloutGroup(prompt=prompt, prompt_token_ids=np.arange(2, dtype=np.int32), rollouts=(rollout, rollout),
                         actor_id=0, generate_seconds=1.0)
    reward = RewardBreakdown(accuracy=1.0, format=1.0, repetition=0.0, visual=0.5, total=1.0, overall=1.0)
    return ScoredGroup(group, (reward, reward), judge_seconds=0.1)


def batch_metrics() -> dict[str, float]:
    return reward_metrics([scored_group()], staleness=[0, 1])


def validation_metrics() -> dict[str, float]:
    """A validation's row (it reaches the sinks on its own; merged here only to derive the names)."""
    from perception_r1.validation import Validation

    return Validation(scored=[scored_group()], num_errors=0, seconds=1.0).metrics()


def literal_keys() -> set[str]:
    """Keys the trainer, the learner worker and the session write literally: `metrics["a/b"] = ...`,
    `totals["a/b"] ...` and any `"a/b": ...` of a dict literal (`metrics.update({...})`, `return {...}`)."""
    keys = set()
    for path in [*(REPO / "learner").glob("*.py"), *(REPO / "perception_r1").glob("*.py")]:
        source = path.read_text(encoding="utf-8")
        keys |= set(re.findall(r'\b(?:metrics|totals)\["([a-z_]+/[a-z0-9_]+)"\]', source))
        keys |= set(re.findall(r'"([a-z_]+/[a-z0-9_]+)"\s*:', source))  # dict literals: update({...}), return {...}
    return keys


def driver_counters() -> set[str]:
    """The driver's counters named literally (`counters["x"]`, `counters()["x"]`), plus a generation error."""
    names = {"generate_errors/TypeError"}
    for path in (REPO / "perception_r1").glob("*.py"):
        names |= set(re.findall(r'counters(?:\(\))?\["([a-z_]+)"\]', path.read_text(encoding="utf-8")))
    return names


def one_step_metrics() -> dict[str, float]:
    """One step's metrics as the session assembles them (`Session._step_metrics`)."""
    metrics = learner_metrics() | batch_metrics()
    stats = GenerationStats(**{f.name: 1 for f in dataclasses.fields(GenerationStats)})
    metrics |= generation_metrics([stats], wall_seconds=2.0)
    metrics |= judge_metrics(JudgeStats(), JudgeStats())
    buffer = {f.name: 1 for f in dataclasses.fields(BufferStats) if f.name != "taken_staleness"}
    metrics |= buffer_metrics(BufferStats(**buffer))
    metrics |= {key: 1.0 for key in literal_keys()}
    metrics |= {f"driver/{name}": 1.0 for name in driver_counters()}
    return metrics | validation_metrics()


class RecordingGauge:
    """Stands in for `ray.util.metrics.Gauge`: records each gauge's name, tag keys and the tags it was set with."""

    made: ClassVar[dict[str, RecordingGauge]] = {}

    def __init__(self, name: str, *, description: str = "", tag_keys: tuple[str, ...] = ()) -> None:
        self.name, self.tag_keys, self.tags = name, tag_keys, []
        RecordingGauge.made[name] = self

    def set(self, value: float, *, tags: dict[str, str]) -> None:
        self.tags.append(tags)


@pytest.fixture(scope="module")
def exported() -> dict[str, RecordingGauge]:
    """Prometheus name -> the gauge RayMetricsSink made for it, from one step's metrics."""
    RecordingGauge.made = {}
    sink = RayMetricsSink(run_name="test")
    sink.Gauge = RecordingGauge
    sink.log_metrics(1, one_step_metrics())
    return {f"{RAY_NAMESPACE}_{name}".lower(): gauge for name, gauge in RecordingGauge.made.items()}


# ------------------------------------------------------------------------------- what the panels ask
def panels() -> list[dict]:
    found = []
    for p in json.loads(DASHBOARD.read_text(encoding="utf-8"))["panels"]:
        found += [p, *p.get("panels", [])]  # a collapsed row holds its panels
    return [p for p in found if p.get("type") != "row"]


def queries() -> list[str]:
    return [t["expr"] for p in panels() for t in p["targets"]]


FAMILY = re.compile(r'__name__=~"(ray_perception_r1_[a-z0-9_]*)\.\+"')


def named(expr: str) -> set[str]:
    """The metric names an expression queries by name (not through a `__name__` family)."""
    return set(re.findall(r"\bray_perception_r1_[a-z0-9_]+", FAMILY.sub("", expr)))


def families() -> set[str]:
    return {prefix for expr in queries() for prefix in FAMILY.findall(expr)}


# ------------------------------------------------------------------------------------------- tests
def test_the_derivation_sees_every_source_of_metrics(exported):
    """Guards the derivation itself: each part of a step's metrics contributed names."""
    for part in ("reward_total", "learner_loss", "learner_entropy_mean", "learner_kl_ref_mean", "learner_lr",
                 "learner_wait_seconds", "sync_seconds", "gen_tokens_per_s", "judge_latency_p99_s", "buffer_depth",
                 "throughput_samples_per_s", "staleness_groups_at_1", "driver_skipped_prompts", "val_accuracy",
                 "val_policy_version"):
        assert f"ray_perception_r1_{part}" in exported, part


def test_every_queried_metric_is_exported(exported):
    missing = sorted({name for expr in queries() for name in named(expr)} - set(exported))
    assert not missing, f"the dashboard queries metrics the code does not export: {missing}"
    empty = sorted(f for f in families() if not any(name.startswith(f) for name in exported))
    assert not empty, f"the dashboard queries families no exported metric belongs to: {empty}"


def test_every_exported_gauge_has_a_panel(exported):
    queried = {name for expr in queries() for name in named(expr)}
    orphans = sorted(n for n in exported if n not in queried and not any(n.startswith(f) for f in families()))
    assert not orphans, f"exported gauges with no panel in {DASHBOARD.name}: {orphans}"


def test_panels_filter_on_the_labels_the_sink_sets(exported):
    """`run` and `actor` are the sink's tag keys; an `actor="x"` filter names a value the sink sets."""
    tag_keys = {k for gauge in exported.values() for k in gauge.tag_keys}
    actors = {tags["actor"] for gauge in exported.values() for tags in gauge.tags}
    assert tag_keys == {"run", "actor"} and {"all", "1"} <= actors
    for p in panels():
        for target in p["targets"]:
            labels = set(re.findall(r"([A-Za-z_]+)\s*[!=]~?\s*\"", target["expr"]))
            labels |= set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target["legendFormat"]))
            assert labels <= tag_keys | {"__name__"}, (p["title"], target["expr"], labels)
            for value in re.findall(r'actor="([^"]*)"', target["expr"]):
                assert value in actors, (p["title"], value)


def test_every_query_uses_the_templated_prometheus_data_source():
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    templated = {"type": "prometheus", "uid": "${datasource}"}
    for p in panels():
        assert p["datasource"] == templated, p["title"]
        assert all(t["datasource"] == templated for t in p["targets"]), p["title"]
        assert p["targets"] and all('run=~"$run"' in t["expr"] for t in p["targets"]), p["title"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
