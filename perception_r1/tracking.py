"""Metric sinks: the driver reduces each step's records into named scalars once and fans them out
here (mlflow, the console, the Ray dashboard). A sink that fails at start fails the run (it is
misconfigured); a sink that fails mid-run is a warning, counted, and the run goes on.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from pathlib import Path

from core.config import Config, TrackingConfig
from core.config_files import to_yaml
from core.seams import MetricsSink

log = logging.getLogger("perception_r1")
DEFAULT_MLFLOW_URI = "sqlite:///mlruns.db"


class _NoArtifacts:
    """The artifact methods of a sink that shows only metrics."""

    def log_dict(self, data: dict, *, artifact_file: str) -> None:
        pass

    def log_table(self, table: dict[str, list], *, artifact_file: str) -> None:
        pass

    def log_checkpoint(self, path: str, *, version: int) -> None:
        pass

    def close(self, *, status: str) -> None:
        pass


def mlflow_uri(cfg: TrackingConfig) -> str:
    return cfg.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_MLFLOW_URI


def use_experiment(tracking_uri: str, name: str) -> None:
    """Point mlflow at the store and the experiment, creating it if new. A new experiment in a sqlite
    store keeps its artifacts beside the database file (`<db folder>/mlruns`), not under whatever
    folder the process happens to run in (mlflow's default)."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    if tracking_uri.startswith("sqlite:///") and mlflow.get_experiment_by_name(name) is None:
        db = Path(tracking_uri.removeprefix("sqlite:///")).resolve()
        mlflow.create_experiment(name, artifact_location=(db.parent / "mlruns").as_uri())
    mlflow.set_experiment(name)


class MlflowSink:
    """One mlflow run per training job; a resumed job continues its run (id kept in the run folder)."""

    def __init__(self, cfg: Config, *, run_dir: Path, resume: bool) -> None:
        import mlflow

        self.mlflow = mlflow
        # a tracking server that stops answering mid-run costs a step's log line, not minutes of retries
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        use_experiment(mlflow_uri(cfg.tracking), cfg.tracking.experiment)
        id_file = run_dir / "mlflow_run_id"
        run_id = id_file.read_text().strip() if resume and id_file.is_file() else None
        self.run = mlflow.start_run(run_id=run_id, run_name=None if run_id else cfg.run.name)
        id_file.write_text(self.run.info.run_id)
        if run_id is None:
            mlflow.log_params(_flatten(cfg.model_dump(mode="json")))
            mlflow.log_text(to_yaml(cfg), "config.yaml")

    @property
    def run_id(self) -> str:
        return self.run.info.run_id

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.mlflow.log_metrics({_safe_key(k): float(v) for k, v in metrics.items()}, step=step)

    def log_checkpoint(self, path: str, *, version: int) -> None:
        """Checkpoints stay where they are written; the run references the newest one."""
        self.mlflow.set_tags({"checkpoint.latest": path, "checkpoint.version": str(version)})

    def log_dict(self, data: dict, *, artifact_file: str) -> None:
        self.mlflow.log_dict(data, artifact_file)

    def log_table(self, table: dict[str, list], *, artifact_file: str) -> None:
        self.mlflow.log_table(data=table, artifact_file=artifact_file)

    def close(self, *, status: str) -> None:
        self.mlflow.end_run(status=status)


class ConsoleSink(_NoArtifacts):
    """A one-line summary every `every` steps, and one per validation (the progress bar shows the rest)."""

    KEYS = ("reward/total", "reward/accuracy", "reward/format", "reward/visual", "staleness/mean",
            "learner/loss", "gen/tokens_per_s", "learner/step_seconds", "sync/seconds")
    VAL_KEYS = ("val/accuracy", "val/reward", "val/format", "val/visual", "val/repetition", "val/num_prompts",
                "val/errors", "val/seconds")

    def __init__(self, *, every: int = 1, write=None) -> None:
        if write is None:
            from tqdm import tqdm

            write = tqdm.write  # above the progress bar, not onto its line
        self.every, self.write = every, write

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        if is_validation(metrics):
            parts = [f"{k.removeprefix('val/')}={metrics[k]:.3g}" for k in self.VAL_KEYS if k in metrics]
            self.write(f"validation at step {step}: " + " ".join(parts))
        elif step % self.every == 0:
            parts = [f"{k.replace('reward/', '')}={metrics[k]:.3g}" for k in self.KEYS if k in metrics]
            self.write(f"step {step}: " + " ".join(parts))


class RayMetricsSink(_NoArtifacts):
    """The system's own metrics as `ray.util.metrics` gauges, exported as `ray_perception_r1_<name>` on each
    node's metrics export port (Prometheus; charted with Grafana, see docs/dashboard.md), per-actor series
    tagged `actor=<id>`."""

    def __init__(self, *, run_name: str) -> None:
        from ray.util.metrics import Gauge

        self.Gauge, self.run_name, self.gauges = Gauge, run_name, {}
        self.last: dict[bool, set[tuple[str, str]]] = {False: set(), True: set()}
        """Series set by the previous step's row and by the previous validation's (each keeps its own)."""

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """Every metric is a per-step value: a series the previous step set and this one does not (a
        staleness bin now empty, no skipped update) reads 0, not its old value. A validation's row leaves
        the step's series alone, and the other way round."""
        now = set()
        for key, value in metrics.items():
            name, actor = _gauge_name(key)
            gauge = self.gauges.get(name)
            if gauge is None:
                description = re.sub(r"/actor\d+/", "/actor<id>/", key)
                gauge = self.gauges[name] = self.Gauge(f"perception_r1_{name}", description=description,
                                                       tag_keys=("run", "actor"))
            gauge.set(float(value), tags={"run": self.run_name, "actor": actor})
            now.add((name, actor))
        kind = is_validation(metrics)
        for name, actor in self.last[kind] - now:
            self.gauges[name].set(0.0, tags={"run": self.run_name, "actor": actor})
        self.last[kind] = now


class FanOut:
    """Sends every record to every sink; a failing sink is warned about and counted, not fatal."""

    def __init__(self, sinks: list[MetricsSink]) -> None:
        self.sinks, self.failures = sinks, 0

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        for sink in self.sinks:
            self._guard(sink, "log_metrics", lambda: sink.log_metrics(step, metrics))

    def log_dict(self, data: dict, *, artifact_file: str) -> None:
        for sink in self.sinks:
            self._guard(sink, "log_dict", lambda: sink.log_dict(data, artifact_file=artifact_file))

    def log_table(self, table: dict[str, list], *, artifact_file: str) -> None:
        for sink in self.sinks:
            self._guard(sink, "log_table", lambda: sink.log_table(table, artifact_file=artifact_file))

    def log_checkpoint(self, path: str, *, version: int) -> None:
        for sink in self.sinks:
            self._guard(sink, "log_checkpoint", lambda: sink.log_checkpoint(path, version=version))

    def close(self, *, status: str) -> None:
        for sink in self.sinks:
            self._guard(sink, "close", lambda: sink.close(status=status))

    def _guard(self, sink: MetricsSink, what: str, call: Callable[[], None]) -> None:
        try:
            call()
        except Exception as e:  # noqa: BLE001 -- a metrics sink must never stop training
            self.failures += 1
            log.warning("metrics sink %s.%s failed (%d failures so far): %s", type(sink).__name__, what,
                        self.failures, e)


def is_validation(metrics: dict[str, float]) -> bool:
    """A validation's row (`val/*` only, perception_r1/validation.py) rather than a learner step's."""
    return bool(metrics) and all(k.startswith("val/") for k in metrics)


def _flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = str(value)[:500]
    return out


def _gauge_name(key: str) -> tuple[str, str]:
    """`gen/actor3/tokens_per_s` -> (`gen_tokens_per_s`, `3`); `learner/loss` -> (`learner_loss`, `all`)."""
    parts = key.split("/")
    actor = "all"
    if len(parts) == 3 and parts[1].startswith("actor") and parts[1][5:].isdigit():
        actor, parts = parts[1][5:], [parts[0], parts[2]]
    name = "_".join(parts)
    return re.sub(r"[^a-zA-Z0-9_]", "_", name), actor


def _safe_key(key: str) -> str:
    return key.replace(":", "_")
