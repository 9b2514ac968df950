"""Checks a run makes before it starts anything (Ray included) or, for the cluster's resources, right
after connecting and before it asks for any: each failure is one `ValueError` naming the field or
the folder and the fix, instead of a wait that never ends or a traceback minutes in.
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

from core.config import Config, resources_requested
from core.os_errors import os_error_text, probe_write
from perception_r1 import memory_estimate, placement
from perception_r1.memory_estimate import MemoryEstimate, ModelShape

SUPPORTED_MODEL_TYPES = ("qwen2_5_vl",)
TRACKING_PROBE_S = 10.0


def check_model_type(path: Path) -> None:
    """The folder holds a Qwen2.5-VL (a text-only or other model would fail minutes in, deep in a worker)."""
    meta = json.loads((path / "config.json").read_text(encoding="utf-8"))
    model_type = meta.get("model_type", "")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model.path {path} holds a '{model_type or 'unknown'}' model "
                         f"({', '.join(meta.get('architectures') or ['no architectures listed'])}); perception-r1 trains "
                         "Qwen2.5-VL (model_type qwen2_5_vl): point model.path at a Qwen2.5-VL folder")


def check_writable(folder: Path, *, field: str) -> None:
    """Create `folder` and write a probe file in it; the OS's reason (no space, permission) named if not."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        error = probe_write(folder, name=f".write-probe-{os.getpid()}", size=4096)
    except OSError as e:
        error = e
    if error is not None:
        raise ValueError(f"{field}: cannot write to {folder}: {os_error_text(error)}; free space or pick a "
                         "writable folder") from None


def check_tracking(uri: str, *, timeout_s: float = TRACKING_PROBE_S) -> None:
    """A tracking server answers within `timeout_s` (mlflow itself would retry for minutes); a local
    store's folder is writable."""
    if uri.startswith(("http://", "https://")):
        _probe_http(uri.rstrip("/") + "/health", timeout_s=timeout_s)
    elif uri.startswith("sqlite:///"):
        check_writable(Path(uri.removeprefix("sqlite:///")).resolve().parent, field="tracking.mlflow_uri")
    elif uri.startswith("file:") or "://" not in uri:
        check_writable(Path(uri.removeprefix("file://").removeprefix("file:")).resolve(), field="tracking.mlflow_uri")


def _probe_http(url: str, *, timeout_s: float) -> None:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s):  # noqa: S310 -- the user's own tracking URI
            return
    except urllib.error.HTTPError:
        return  # it answered: a server is there (some proxies have no /health)
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise ValueError(f"tracking.mlflow_uri: no mlflow server answers at {url} within {timeout_s:.0f}s ({reason}); "
                         "start it, fix the URI, or leave tracking.mlflow_uri unset for the local sqlite store") from None


# ------------------------------------------------------------------------------------- resources
def check_resources(cfg: Config, total: dict[str, float]) -> None:
    """What the run asks for fits what the cluster has in total (Ray would otherwise wait forever)."""
    need = resources_requested(cfg)
    short = [k for k, v in need.items() if v > total.get(k, 0.0) + 1e-9]
    if short:
        have = ", ".join(f"{k} {total.get(k, 0.0):g}" for k in need)
        asked = ", ".join(f"{k} {v:g}" for k, v in need.items())
        raise ValueError(f"the run asks for {asked} but the Ray cluster has {have} in all; lower "
                         "learner.num_workers / learner.cpus_per_worker / rollout.num_actors / "
                         "rollout.num_gpus_per_actor / learner.num_gpus_per_worker, or give the cluster more "
                         "(cluster.num_cpus / cluster.num_gpus for a local one)")


def check_placement(cfg: Config, nodes: list[dict[str, float]]) -> None:
    """Every bundle of the placement plan finds a node with room (a bundle must land on one node)."""
    problems = placement.misfits(placement.plan(cfg), nodes)
    if problems:
        raise ValueError(problems[0])


# -------------------------------------------------------------------------------- learner memory
DEFAULT_GPU_GIB = 80.0
MEMORY_FIXES = ("lower learner.max_tokens_per_micro_batch, set learner.gradient_checkpointing: true (and "
                "learner.checkpoint_every: 1), raise learner.num_workers (FSDP shards parameters, gradients and "
                "AdamW state over them), on a GPU shared with the engine raise learner.gpu_memory_fraction (and lower "
                "rollout.engine.gpu_memory_utilization), or set cluster.gpu_memory_gib if your GPUs have more memory")
NVIDIA_SMI_TIMEOUT_S = 10.0


def gpu_memory_gib(cfg: Config) -> tuple[float, str]:
    """(GiB of one GPU, where the number comes from): cluster.gpu_memory_gib, else nvidia-smi, else 80."""
    if cfg.cluster.gpu_memory_gib is not None:
        return cfg.cluster.gpu_memory_gib, "cluster.gpu_memory_gib"
    mib = nvidia_smi("memory.total")
    if mib:
        return min(mib) / 1024, "nvidia-smi"
    return DEFAULT_GPU_GIB, "assumed: no GPU visible here; set cluster.gpu_memory_gib"


def nvidia_smi(query: str) -> list[float]:
    """One number per visible GPU, or [] when nvidia-smi is missing, fails or hangs."""
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S, check=True).stdout
        return [float(line) for line in out.split()]
    except (OSError, subprocess.SubprocessError, ValueError):
        return []


def learner_memory(cfg: Config, model_path: str | Path) -> MemoryEstimate:
    """The estimate for the model folder's config.json against the GPU's memory (the learner's share of it,
    learner.gpu_memory_fraction, when it shares the GPU with an engine)."""
    gib, _ = gpu_memory_gib(cfg)
    if cfg.colocated:
        gib *= cfg.learner.gpu_memory_fraction
    return memory_estimate.estimate(cfg, ModelShape.from_config_json(model_path), gpu_gib=gib)


def check_learner_memory(cfg: Config, model_path: str | Path) -> None:
    """A GPU learner's estimated peak fits its GPU (an out-of-memory error would come minutes in)."""
    if cfg.learner.num_gpus_per_worker == 0:
        return
    found = learner_memory(cfg, model_path)
    if not found.fits:
        raise ValueError("\n".join([*found.lines(), MEMORY_FIXES]))
