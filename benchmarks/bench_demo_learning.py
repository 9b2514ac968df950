"""Does the CPU demo learn? The real driver trains the demo config once per seed from a cold cache (the
tiny model, the SFT warm start and GRPO all inside the run's own folder), and this compares the mean
reward of the first and the last GRPO steps per seed, per reward component; staleness is checked
against its bound. The reward curves (per seed and their mean) go into a PNG.

    python -m benchmarks.bench_demo_learning configs/demo-cpu.yaml --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.common import RESULTS, print_table, write_result

WINDOW = 5
"""Steps averaged at each end of the curve."""
CURVES = ("reward/total", "reward/accuracy", "reward/visual", "reward/format", "staleness/max")


def run_seed(config: str, *, seed: int, overrides: list[str], out: Path) -> dict:
    """Train one seed from a cold cache (its own model cache folder under `out`); returns its curves,
    window means and wall time."""
    from core.config_files import load_config
    from perception_r1.driver import train

    sets = [f"run.seed={seed}", f"run.name=learn-s{seed}", f"run.output_dir={out}",
            f"model.cache_dir={out}/tiny-model-s{seed}", "tracking.progress_bar=false", *overrides]
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        sets.append(f"tracking.mlflow_uri=sqlite:///{out}/mlflow.db")
    cfg = load_config(config, sets)
    start = time.perf_counter()
    result = train(cfg)
    wall = time.perf_counter() - start
    curves = {key: [m.get(key, float("nan")) for _, m in result.history] for key in CURVES}
    row = {"seed": seed, "steps": len(result.history), "wall_s": wall,
           "grpo_s": result.history[-1][0] - result.history[0][0] if result.history else 0.0}
    row.update(window_means(curves))
    row["staleness_max"] = max(curves["staleness/max"], default=0.0)
    row["staleness_bound"] = cfg.buffer.max_staleness
    return {"row": row, "curves": curves}


def window_means(curves: dict[str, list[float]], *, window: int = WINDOW) -> dict[str, float]:
    """first/last/delta of the mean over the first and last `window` steps of each reward curve."""
    out = {}
    for key, values in curves.items():
        if not key.startswith("reward/") or len(values) < 2 * window:
            continue
        name = key.removeprefix("reward/")
        first, last = statistics.mean(values[:window]), statistics.mean(values[-window:])
        out |= {f"{name}_first": first, f"{name}_last": last, f"{name}_delta": last - first}
    return out


def summarise(rows: list[dict]) -> dict[str, float]:
    """Across seeds: mean, spread and worst case of each component's last-minus-first delta."""
    out: dict[str, float] = {}
    for name in ("total", "accuracy", "visual", "format"):
        deltas = [r[f"{name}_delta"] for r in rows if f"{name}_delta" in r]
        if not deltas:
            continue
        out[f"{name}_delta_mean"] = statistics.mean(deltas)
        out[f"{name}_delta_min"] = min(deltas)
        out[f"{name}_delta_std"] = statistics.stdev(deltas) if len(deltas) > 1 else 0.0
    out["wall_s_max"] = max(r["wall_s"] for r in rows)
    out["staleness_within_bound"] = float(all(r["staleness_max"] <= r["staleness_bound"] for r in rows))
    return out


SMOOTH = 8
"""Steps in the rolling mean of the plotted seed mean (the demo's 64 problems take 8 steps to go round)."""


def rolling_mean(values: list[float], n: int = SMOOTH) -> list[float]:
    """Mean of each value and up to n - 1 before it."""
    return [statistics.mean(values[max(0, i - n + 1):i + 1]) for i in range(len(values))]


def plot(runs: list[dict], path: Path, *, title: str) -> None:
    """Total, accuracy and visual reward per GRPO step: one thin line per seed, the seeds' mean (rolling
    over SMOOTH steps) thick."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ("reward/total", "reward/accuracy", "reward/visual")
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), constrained_layout=True)
    for ax, key in zip(axes, keys):
        curves = [r["curves"][key] for r in runs]
        for r, values in zip(runs, curves):
            ax.plot(range(1, len(values) + 1), values, lw=0.8, alpha=0.45, label=f"seed {r['row']['seed']}")
        n = min(len(c) for c in curves)
        mean = rolling_mean([statistics.mean(c[i] for c in curves) for i in range(n)])
        ax.plot(range(1, n + 1), mean, lw=2.2, color="black", label=f"mean of seeds, {SMOOTH}-step rolling")
        ax.set_title(key)
        ax.set_xlabel("GRPO step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--name", default="demo_learning", help="result name (JSON and `<name>`-curve PNG)")
    parser.add_argument("--plot", default="demo_reward_curve.png", help="PNG file name in the results folder")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--replot", action="store_true", help="only redraw the PNG from the saved JSON")
    args = parser.parse_args()
    if args.replot:
        saved = json.loads((args.results_dir / f"{args.name}.json").read_text())
        runs = [{"row": row, "curves": saved["metrics"]["curves"][str(row["seed"])]} for row in saved["metrics"]["seeds"]]
        seeds = saved["config"]["seeds"]
        plot(runs, args.results_dir / args.plot, title=f"{args.config}: GRPO reward per step, seeds {seeds}")
        return
    load = os.getloadavg()[0]
    root = Path(tempfile.mkdtemp(prefix="bench-learn-"))  # one mlflow store for every seed's run
    try:
        runs = [run_seed(args.config, seed=seed, overrides=args.overrides, out=root) for seed in args.seeds]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    rows = [r["row"] for r in runs]
    print_table(f"demo learning ({args.config}; mean of the first vs the last {WINDOW} GRPO steps)",
                [{k: v for k, v in r.items() if not k.startswith(("format", "staleness_b"))} for r in rows])
    summary = summarise(rows)
    print_table("across seeds", [summary])
    args.results_dir.mkdir(parents=True, exist_ok=True)
    plot(runs, args.results_dir / args.plot, title=f"{args.config}: GRPO reward per step, seeds {args.seeds}")
    metrics = {"seeds": rows, "summary": summary, "load_average_at_start": load,
               "curves": {str(r["row"]["seed"]): r["curves"] for r in runs}}
    print("wrote", write_result(args.name, config={"config": args.config, "seeds": args.seeds, "window": WINDOW,
                                                   "overrides": args.overrides}, metrics=metrics,
                                out_dir=args.results_dir),
          "and", args.results_dir / args.plot)


if __name__ == "__main__":
    main()
