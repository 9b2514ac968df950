"""The learner's part of a checkpoint: sharded model and optimizer state (torch.distributed.checkpoint,
each rank writes its own shard), the LR scheduler and the policy_version.

A checkpoint folder `step_<N>` is complete only once the driver has added its own part and renamed
it from `step_<N>.tmp` (see perception_r1/run_checkpoints.py); the learner never reads a `.tmp` folder.

Loading unpickles nothing arbitrary: DCP pickles its `.metadata` index and the non-tensor entries
(optimizer hyperparameters), and would unpickle them unrestricted on load. The index is checked first
with an unpickler that admits only DCP's metadata classes, and the entries go through
`torch.load(weights_only=True)`, so a tampered checkpoint fails with a ValueError instead of running code.
"""

from __future__ import annotations

import json
import pickle
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

LEARNER_DIR = "learner"
LEARNER_META = "learner.json"
UNREPORTED_FILE = "unreported.msgpack"
"""Step reports the learner could not deliver (its report queue died), saved beside its last checkpoint."""


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
    check_metadata(path / LEARNER_DIR)
    planner = _WeightsOnlyLoadPlanner()
    try:
        dcp.load(state, checkpoint_id=str(path / LEARNER_DIR), planner=planner)
    except CheckpointException:
        if not planner.refused:
            raise
        raise ValueError(f"{path / LEARNER_DIR} holds an entry that is not plain data ({planner.refused}); refusing "
                         "to unpickle it: resume only from checkpoints this trainer wrote") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    meta = json.loads(meta_file.read_text(encoding="utf-8"))
    scheduler.load_state_dict(meta["scheduler"])
    return int(meta["version"])


def read_model_state(path: Path, *, dtype: torch.dtype, max_bytes_per_read: int = 1 << 30) -> dict[str, torch.Tensor]:
    """The model part of a learner checkpoint on one process, no process group: {parameter name: tensor
    in `dtype`} (the names of the transformers model). Read in pieces of at most `max_bytes_per_read` of
    stored bytes, each cast at once, so host memory peaks near the model in `dtype`, not in fp32."""
    folder = path / LEARNER_DIR
    if not (folder / ".metadata").is_file():
        raise ValueError(f"{path} is not a learner checkpoint (no {LEARNER_DIR}/.metadata); pick a complete step_<N> folder")
    check_metadata(folder)
    with open(folder / ".metadata", "rb") as f:
        index = _MetadataUnpickler(f).load()
    out: dict[str, torch.Tensor] = {}
    for piece in _pieces(index.state_dict_metadata, max_bytes=max_bytes_per_read):
        state = {"model": {name: torch.empty(tuple(meta.size), dtype=meta.properties.dtype) for name, meta in piece}}
        planner = _WeightsOnlyLoadPlanner()
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
            try:
                dcp.load(state, checkpoint_id=str(folder), planner=planner, no_dist=True)
            except CheckpointException as e:
                why = planner.refused or str(e).strip().splitlines()[-1]
                raise ValueError(f"{folder} could not be read ({why}); the checkpoint is damaged or not this "
                                 "trainer's: use another checkpoint") from None
        out.update({name: t.to(dtype) for name, t in state["model"].items()})
    return out


def _pieces(entries: dict, *, max_bytes: int) -> list[list[tuple[str, object]]]:
    """The model's tensor entries ("model.<name>"), in runs of at most `max_bytes` (one larger tensor alone)."""
    pieces: list[list[tuple[str, object]]] = [[]]
    size = 0
    for key, meta in entries.items():
        if not key.startswith("model.") or not hasattr(meta, "size"):
            continue
        nbytes = meta.size.numel() * meta.properties.dtype.itemsize
        if pieces[-1] and size + nbytes > max_bytes:
            pieces.append([])
            size = 0
        pieces[-1].append((key.removeprefix("model."), meta))
        size += nbytes
    return [p for p in pieces if p]


# ------------------------------------------------------------------------------- safe unpickling
_METADATA_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
                     ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"),
                     ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("collections", "OrderedDict")}


class _MetadataUnpickler(pickle.Unpickler):
    """Admits DCP's metadata classes, torch dtypes and paths; anything else is refused."""

    def find_class(self, module: str, name: str):
        allowed = (module == "torch.distributed.checkpoint.metadata" or (module, name) in _METADATA_GLOBALS
                   or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)))
        if not allowed:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint index")
        return super().find_class(module, name)


def check_metadata(folder: Path) -> None:
    """Unpickle DCP's index files under `folder` with the restricted unpickler; ValueError if one is not an index."""
    for file in sorted(folder.glob("*.metadata")):
        try:
            with open(file, "rb") as f:
                _MetadataUnpickler(f).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, TypeError) as e:
            raise ValueError(f"{file} is not a checkpoint index ({type(e).__name__}: {e}); refusing to load it: "
                             "resume only from checkpoints this trainer wrote") from None


class _WeightsOnlyLoadPlanner(DefaultLoadPlanner):
    """DCP's planner, but non-tensor entries must pass `torch.load(weights_only=True)` (DCP uses False)."""

    refused = ""
    """Why an entry was refused (DCP wraps the error in a CheckpointException)."""

    def load_bytes(self, read_item, value) -> None:
        try:
            torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            lines = str(e).splitlines()
            self.refused = next((line for line in lines if "GLOBAL" in line), lines[0])
            raise
        value.seek(0)
        super().load_bytes(read_item, value)


def newest_complete(root: Path) -> Path | None:
    """The newest `step_<N>` folder (never a `.tmp`) holding the learner's part: where a restarted
    learner worker (Ray Train `FailureConfig`) resumes from."""
    found = sorted(p for p in root.glob("step_*[0-9]") if (p / LEARNER_META).is_file())
    return found[-1] if found else None


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0
