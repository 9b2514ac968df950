"""What an evaluation reports: per-benchmark accuracy (LLM judge and math-verify) and perception rate,
printed next to the reference's published numbers (docs/method.md §6 Table 1), a bar chart PNG, a summary JSON,
and optional mlflow logging of all three.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from evaluation.benchmarks import PUBLISHED, PUBLISHED_MODELS
from evaluation.evaluate import EvalRow


@dataclass(frozen=True, slots=True)
class BenchmarkSummary:
    benchmark: str
    num_items: int
    accuracy_llm: float | None
    """% judged true by the reference's scorer; None when no row has an LLM judgement."""
    accuracy_mathverify: float
    """% correct by math-verify (option letters for multiple choice)."""
    num_perception_labelled: int
    perception_rate: float | None
    """% of labelled items marked perception-correct; None when none was labelled."""
    published: tuple[float, float] | None
    """The reference's accuracy (%) for PUBLISHED_MODELS, where it reports this benchmark."""

    @property
    def headline(self) -> float:
        """The accuracy comparable with the published numbers: the LLM judge's where present."""
        return self.accuracy_llm if self.accuracy_llm is not None else self.accuracy_mathverify


def summarize(rows: Sequence[EvalRow]) -> list[BenchmarkSummary]:
    """One summary per benchmark, in order of first appearance."""
    by_benchmark: dict[str, list[EvalRow]] = {}
    for row in rows:
        by_benchmark.setdefault(row.benchmark, []).append(row)
    return [_summary(name, group) for name, group in by_benchmark.items()]


def _summary(name: str, rows: list[EvalRow]) -> BenchmarkSummary:
    judged = [r.correct_llm for r in rows if r.correct_llm is not None]
    labelled = [r.perception for r in rows if r.perception is not None]
    return BenchmarkSummary(
        benchmark=name, num_items=len(rows),
        accuracy_llm=_percent(judged) if judged else None,
        accuracy_mathverify=_percent([r.correct_mathverify for r in rows]),
        num_perception_labelled=len(labelled), perception_rate=_percent(labelled) if labelled else None,
        published=PUBLISHED.get(name))


def _percent(flags: list[bool]) -> float:
    return 100.0 * sum(flags) / len(flags)


def format_table(summaries: Sequence[BenchmarkSummary], *, model_name: str = "ours") -> str:
    """Plain-text table: our accuracies next to the reference's published columns."""
    header = ("benchmark", "n", f"{model_name} (LLM judge)", "math-verify", "perception-correct",
              f"{PUBLISHED_MODELS[0]} (pub.)", f"{PUBLISHED_MODELS[1]} (pub.)")
    lines = [header]
    for s in summaries:
        perception = f"{s.perception_rate:.1f} ({s.num_perception_labelled})" if s.perception_rate is not None else "-"
        pub = [f"{v:.1f}" for v in s.published] if s.published else ["-", "-"]
        lines.append((s.benchmark, str(s.num_items), _fmt(s.accuracy_llm), _fmt(s.accuracy_mathverify),
                      perception, *pub))
    widths = [max(len(line[k]) for line in lines) for k in range(len(header))]
    text = ["  ".join(cell.ljust(w) if k == 0 else cell.rjust(w) for k, (cell, w) in enumerate(zip(line, widths)))
            for line in lines]
    text.insert(1, "-" * len(text[0]))
    return "\n".join(text) + "\naccuracies in %; the reference scores with an LLM judge (Qwen2.5-72B-Instruct)"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def plot(summaries: Sequence[BenchmarkSummary], path: Path, *, model_name: str = "ours") -> Path:
    """Grouped bars per benchmark: our headline accuracy and the two published columns where reported."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [s.benchmark for s in summaries]
    scorers = {"LLM judge" if s.accuracy_llm is not None else "math-verify" for s in summaries}
    series: list[tuple[str, list[float | None]]] = [(f"{model_name} ({' / '.join(sorted(scorers))})",
                                                     [s.headline for s in summaries])]
    for k, published in enumerate(PUBLISHED_MODELS):
        series.append((f"{published} (published)", [s.published[k] if s.published else None for s in summaries]))
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(names) + 2), 4))
    for k, (label, values) in enumerate(series):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(names))]
        bars = ax.bar(xs, [v or 0.0 for v in values], width, label=label)
        ax.bar_label(bars, labels=["" if v is None else f"{v:.1f}" for v in values], fontsize=7)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_summary(summaries: Sequence[BenchmarkSummary], path: Path) -> Path:
    path.write_text(json.dumps([asdict(s) for s in summaries], indent=2) + "\n", encoding="utf-8")
    return path


def log_mlflow(summaries: Sequence[BenchmarkSummary], *, tracking_uri: str, experiment: str, run_name: str,
               params: dict[str, str], artifacts: Sequence[Path]) -> str:
    """Log params, per-benchmark metrics and the artifacts to one mlflow run; returns its id."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=run_name) as run:
        mlflow.log_params(params)
        metrics = {f"{s.benchmark}/accuracy_mathverify": s.accuracy_mathverify for s in summaries}
        metrics |= {f"{s.benchmark}/accuracy_llm": s.accuracy_llm for s in summaries if s.accuracy_llm is not None}
        metrics |= {f"{s.benchmark}/perception_rate": s.perception_rate for s in summaries if s.perception_rate is not None}
        metrics |= {f"{s.benchmark}/num_items": float(s.num_items) for s in summaries}
        mlflow.log_metrics(metrics)
        for artifact in artifacts:
            mlflow.log_artifact(str(artifact))
        return run.info.run_id
