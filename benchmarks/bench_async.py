"""Async vs sync, end to end, same machine, one run: the real driver trains the same config with each
`buffer.max_staleness` in turn; samples/s is measured over the steps after warm-up, and on GPUs each
GPU's busy fraction is sampled with nvidia-smi during the measured window.

    python -m benchmarks.bench_async configs/demo-cpu.yaml --staleness 0 1 2 --steps 12      # CPU
    python -m benchmarks.bench_async configs/bench-2gpu-3b.yaml --staleness 0 2 --steps 8    # 2 GPUs
    python -m benchmarks.bench_async configs/gpu1-3b.yaml --staleness 0 --steps 10            # 1 GPU, then
    python -m benchmarks.bench_async configs/gpu1-3b.yaml --staleness 1 2 --steps 10 --merge  # the rest
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks.common import print_table, write_result

WARMUP_STEPS = 2


def run_one(config: str, *, staleness: int, steps: int, overrides: list[str], out: Path) -> dict:
    from core.config_files import load_config
    from perception_r1.driver import train

    sets = [f"buffer.max_staleness={staleness}", f"run.num_steps={steps}", f"run.name=bench-s{staleness}",
            f"run.output_dir={out}", "checkpoint.every_steps=0", "tracking.progress_bar=false",
            "tracking.log_rollouts_every=0",
            "sync.interval_steps=1", "validation.every_steps=0", *overrides]  # no pauses to validate
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        sets.append(f"tracking.mlflow_uri=sqlite:///{out}/mlflow.db")
    cfg = load_config(config, sets)
    gpu = GpuSampler() if cfg.learner.num_gpus_per_worker else None
    result = train(cfg)
    times = [t for t, _ in result.history]
    measured = times[WARMUP_STEPS:]
    samples_per_step = cfg.learner.prompts_per_step * cfg.rollout.samples_per_prompt
    window = measured[-1] - times[WARMUP_STEPS - 1]
    history = [m for _, m in result.history][WARMUP_STEPS:]
    tokens = sum(m.get("learner/num_tokens", 0.0) for m in history)
    row = {"max_staleness": staleness, "steps_measured": len(measured),
           "samples_per_s": len(measured) * samples_per_step / window,
           "train_tokens_per_s": tokens / window, "step_seconds": window / len(measured),
           "learner_step_s": statistics.mean(m["learner/step_seconds"] for m in history),
           "learner_wait_s": statistics.mean(m["learner/wait_seconds"] for m in history),
           "sync_s": statistics.mean(m["sync/seconds"] for m in history),
           "sync_s_median": statistics.median(m["sync/seconds"] for m in history),
           "sync_verified_steps": sum(m.get("sync/verified", 0.0) > 0 for m in history),
           "staleness_mean": statistics.mean(m.get("staleness/mean", 0.0) for m in history),
           "staleness_max": max(m.get("staleness/max", 0.0) for m in history)}
    row |= phase_fractions(row, history)
    if gpu is not None:
        row.update(gpu.busy_fractions(start=time.time() - (time.perf_counter() - times[WARMUP_STEPS - 1]),
                                      end=time.time() - (time.perf_counter() - measured[-1])))
    return row


def phase_fractions(row: dict, history: list[dict]) -> dict[str, float]:
    """The share of a step each phase holds (on one GPU: holds the GPU): the learner's update, the weight
    sync, and generation (the actors' busy time over the wall time, averaged over actors and steps)."""
    busy = [v for m in history for k, v in m.items() if k.startswith("gen/actor") and k.endswith("/busy_frac")]
    step = row["step_seconds"]
    return {"learner_frac": row["learner_step_s"] / step, "sync_frac": row["sync_s"] / step,
            "gen_busy_frac": statistics.mean(busy) if busy else 0.0}


def merged(name: str, rows: list[dict]) -> list[dict]:
    """`rows` after the rows of an earlier result of this name measured today on this device for other
    staleness values (one benchmark split over several calls of a time-limited machine)."""
    from benchmarks.common import RESULTS, device

    path = RESULTS / f"{name}.json"
    if not path.is_file():
        return rows
    earlier = json.loads(path.read_text())
    if earlier.get("device") != device() or earlier.get("date") != datetime.date.today().isoformat():
        return rows
    mine = {r["max_staleness"] for r in rows}
    kept = [r for k, r in earlier["metrics"].items() if k.startswith("staleness_") and r["max_staleness"] not in mine]
    return sorted(kept + rows, key=lambda r: r["max_staleness"])


class GpuSampler:
    """nvidia-smi sampling every 100 ms in the background: (wall time, utilization %) per GPU."""

    def __init__(self) -> None:
        self.file = tempfile.NamedTemporaryFile("w+", suffix=".csv", delete=False)
        self.proc = subprocess.Popen(
            ["nvidia-smi", "--query-gpu=timestamp,index,utilization.gpu,memory.used", "--format=csv,noheader,nounits",
             "-lms", "100"], stdout=self.file, stderr=subprocess.DEVNULL)

    def busy_fractions(self, *, start: float, end: float) -> dict[str, float]:
        self.proc.terminate()
        self.proc.wait()
        import datetime

        busy: dict[int, list[float]] = {}
        peak: dict[int, float] = {}
        for line in Path(self.file.name).read_text().splitlines():
            stamp, idx, util, mem = [x.strip() for x in line.split(",")]
            t = datetime.datetime.strptime(stamp, "%Y/%m/%d %H:%M:%S.%f").timestamp()
            peak[int(idx)] = max(peak.get(int(idx), 0.0), float(mem))
            if start <= t <= end:
                busy.setdefault(int(idx), []).append(float(util) / 100)
        out = {f"gpu{i}_busy": statistics.mean(v) for i, v in sorted(busy.items())}
        out.update({f"gpu{i}_peak_mem_gib": m / 1024 for i, m in sorted(peak.items())})
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config")
    parser.add_argument("--staleness", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--name", default=None, help="result name (default: async_sync_<config stem>)")
    parser.add_argument("--merge", action="store_true",
                        help="keep the other staleness rows of today's result of this name on this device")
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix="bench-async-"))
    name = args.name or f"async_sync_{Path(args.config).stem}"
    rows: list[dict] = []
    for staleness in args.staleness:  # written after each: a run cut short keeps what it measured
        rows.append(run_one(args.config, staleness=staleness, steps=args.steps, overrides=args.overrides, out=out))
        report(args, name, merged(name, rows) if args.merge else rows)
    shutil.rmtree(out, ignore_errors=True)


def report(args, name: str, rows: list[dict]) -> None:
    base = rows[0]["samples_per_s"]
    for row in rows:
        row["ratio_to_first"] = row["samples_per_s"] / base
    print_table(f"async vs sync ({args.config}, {args.steps} steps, first {WARMUP_STEPS} not measured)", rows)
    metrics = {f"staleness_{r['max_staleness']}": r for r in rows}
    metrics["async_sync_ratio"] = rows[-1]["samples_per_s"] / base
    print("wrote", write_result(name, config={"config": args.config, "steps": args.steps,
                                              "staleness": [r["max_staleness"] for r in rows], "overrides": args.overrides},
                                metrics=metrics), flush=True)

if __name__ == "__main__":
    main()
