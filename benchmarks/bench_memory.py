"""Memory over a long run: the RSS of every process of a CPU demo run (driver and each Ray actor,
from /proc) sampled every few seconds over N learner steps; the slope per process after warm-up.

    python -m benchmarks.bench_memory configs/demo-cpu.yaml --steps 200
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from benchmarks.common import print_table, write_result


def processes() -> dict[int, str]:
    """pid -> name of this process and its descendants (the local Ray cluster it started: `ray::<Class>`)."""
    parent: dict[int, int] = {}
    names: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        parent[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
        # `ray::Class.method` while a task runs, `ray::Class` when idle: one name per process
        names[int(entry.name)] = cmd.split(" ")[0].split(".")[0] if cmd.startswith("ray::") else Path(cmd).name
    mine, frontier = {os.getpid()}, [os.getpid()]
    while frontier:
        pid = frontier.pop()
        children = [c for c, p in parent.items() if p == pid and c not in mine]
        mine.update(children)
        frontier.extend(children)
    return {pid: ("driver" if pid == os.getpid() else names.get(pid, "?")) for pid in mine}


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class Sampler(threading.Thread):
    def __init__(self, every_s: float) -> None:
        super().__init__(daemon=True)
        self.every_s, self.stop = every_s, threading.Event()
        self.samples: dict[tuple[int, str], list[tuple[float, float]]] = defaultdict(list)

    def run(self) -> None:
        while not self.stop.is_set():
            now = time.time()
            for pid, name in processes().items():
                rss = rss_mib(pid)
                if rss is not None:
                    self.samples[(pid, name)].append((now, rss))
            self.stop.wait(self.every_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every-s", type=float, default=2.0)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    from core.config_files import load_config
    from perception_r1.driver import train

    out = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    cfg = load_config(args.config, [f"run.num_steps={args.steps}", f"run.output_dir={out}", "checkpoint.every_steps=50",
                                    f"tracking.mlflow_uri=sqlite:///{out}/mlflow.db", "tracking.progress_bar=false",
                                    *args.overrides])
    sampler = Sampler(args.every_s)
    sampler.start()
    result = train(cfg)
    sampler.stop.set()
    sampler.join()
    times = [t for t, _ in result.history]
    start_wall, end_wall = time.time() - (time.perf_counter() - times[min(10, len(times) - 1)]), time.time()
    seconds_per_step = (times[-1] - times[0]) / max(len(times) - 1, 1)
    rows = []
    for (pid, name), series in sorted(result_series(sampler.samples, start_wall, end_wall).items(), key=lambda x: x[0][1]):
        t, rss = np.array([s[0] for s in series]), np.array([s[1] for s in series])
        slope_per_s = np.polyfit(t - t[0], rss, 1)[0] if len(t) > 2 else 0.0
        rows.append({"process": name, "pid": pid, "samples": len(t), "rss_start_mib": rss[0], "rss_end_mib": rss[-1],
                     "slope_mib_per_100_steps": slope_per_s * seconds_per_step * 100})
    print_table(f"RSS over {args.steps} steps (after 10 warm-up steps)", rows)
    worst = max(rows, key=lambda r: abs(r["slope_mib_per_100_steps"]))
    print("wrote", write_result("memory_demo_cpu", config=vars(args), metrics={
        "steps": result.final_version, "seconds_per_step": seconds_per_step, "processes": rows,
        "worst_slope_mib_per_100_steps": worst["slope_mib_per_100_steps"], "worst_process": worst["process"]}))


def result_series(samples, start: float, end: float) -> dict:
    """Samples inside the measured window, for processes seen at least 5 times in it."""
    out = {}
    for key, series in samples.items():
        inside = [x for x in series if start <= x[0] <= end]
        if len(inside) >= 5:
            out[key] = inside
    return out


if __name__ == "__main__":
    main()
