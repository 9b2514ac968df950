"""The learner's part of a checkpoint: sharded model and optimizer state (torch.distributed.checkpoint,
each rank writes its own shard), the LR scheduler and the policy_version.

A checkpoint folder `step_<N>` is complete only once the driver has added its own part and renamed
it from `step_<N>.tmp` (see perception_r1/checkpoints.py); the learner never reads a `.tmp` folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

LEARNER_DIR = "learner"
LEARNER_META = "learner.json"


def save_learner(path: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler, version: int) -> None:
    """Every rank calls this; rank 0 also writes the small metadata file."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(path / LEARNER_DIR))
    if _rank() == 0:
        meta = {"version": version, "scheduler": scheduler.state_dict()}
        (path / LEARNER_META).write_text(json.dumps(meta), encoding="utf-8")


def load_learner(path: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler) -> int:
    """Restore in place on every rank; returns the policy_version the weights carry."""
    meta_file = path / LEARNER_META
    if not meta_file.is_file():
        raise ValueError(f"{path} is not a learner checkpoint (no {LEARNER_META}); pick a complete step_<N> folder")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optimizer": optim_sd}
    dcp.load(state, checkpoint_id=str(path / LEARNER_DIR))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    meta = json.loads(meta_file.read_text(encoding="utf-8"))
    scheduler.load_state_dict(meta["scheduler"])
    return int(meta["version"])


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0
