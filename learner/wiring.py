"""What the driver hands every learner worker (through Ray Train's `train_loop_config`).

Kept apart from `learner/worker.py` on purpose: Ray Train's controller unpickles `train_loop_config` too, and
this module imports nothing heavy, so the controller's process does not import torch's models and transformers
for it (measured on 2 cores: the controller's CPU per run went from ~13 s to ~6-7 s)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from core.seams import ReportSink


@dataclass
class LearnerWiring:
    """Handles and paths the driver passes to every worker (through `train_loop_config`)."""

    config: dict
    model_path: str
    buffer: Any
    """The replay buffer's actor handle (rank 0 reaches it through `RayBatchSource`)."""
    actors: list
    """The generation actors' handles: the `core.seams.WeightReceiver`s of the weight broadcast."""
    reports: ReportSink
    """A `ray.util.queue.Queue` the driver reads LearnerReports from."""
    checkpoint_root: str
    resume_from: str | None = None
    weight_transport: str = "torch"
    """`vllm` when the generation actors run vLLM engines (their NCCL weight-transfer group), `ipc` when those
    share the learner's GPU (CUDA IPC), else `torch`."""
