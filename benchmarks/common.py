"""What every benchmark shares: the device description, the result file, the printed table."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path

RESULTS = Path(os.environ.get("PR1_RESULTS_DIR") or Path(__file__).resolve().parent / "results")
"""Where result files go: benchmarks/results, or PR1_RESULTS_DIR (run_gpu.sh: outside the working tree, which
the device tool replaces at each call, deleting files a benchmark left running across calls wrote there)."""


def device() -> str:
    """`<GPU name> x<count>` where CUDA is available, else the CPU model and core count."""
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    except ImportError:
        pass
    model = platform.processor() or "cpu"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), model)
    except OSError:
        pass
    import os

    return f"{model} ({os.cpu_count()} cores)"


def write_result(name: str, *, config: dict, metrics: dict, out_dir: Path | None = None) -> Path:
    out_dir = out_dir or RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "device": device(), "date": datetime.date.today().isoformat(),
               "config": config, "metrics": metrics}
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1, default=float) + "\n")
    return path


def print_table(title: str, rows: list[dict]) -> None:
    """A plain fixed-width table of dict rows (same keys)."""
    if not rows:
        print(f"{title}: no rows")
        return
    keys = list(rows[0])
    cells = [[_fmt(r.get(k)) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    print(f"\n{title}")
    print("  ".join(k.ljust(w) for k, w in zip(keys, widths)))
    print("  ".join("-" * w for w in widths))
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths)))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
