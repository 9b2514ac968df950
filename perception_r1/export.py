"""A model folder from a run's checkpoint: the learner's sharded weights (learner/sharded_state.py), cast
to bf16 (or another dtype), saved as safetensors with the config, generation config and processor files
of the model folder the learner started from, so transformers, vLLM and `perception-r1 eval` load it.

    RUN_DIR/config.yaml --(driver.resolve_model, sft_dir)--> the starting model folder: config, processor
    RUN_DIR/checkpoints/step_<N>/learner/ --read_model_state--> weights --save_pretrained--> OUT_DIR

OUT_DIR is written as `OUT_DIR.partial` and renamed when whole, so an interrupted export leaves no
folder that looks like a model. `export.json` in it records where the weights came from.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from core.config_files import load_config
from learner.sharded_state import LEARNER_DIR, LEARNER_META, read_model_state
from perception_r1.driver import resolve_model, sft_dir

log = logging.getLogger("perception_r1")
EXPORT_META = "export.json"
PROCESSOR_FILES = ("tokenizer*", "vocab*", "merges.txt", "*preprocessor_config.json", "processor_config.json",
                   "chat_template*", "special_tokens_map.json", "added_tokens.json", "generation_config.json")
"""Copied verbatim from the starting folder (the generation config too: transformers would derive one)."""


@dataclass(frozen=True)
class Export:
    out_dir: Path
    checkpoint: Path
    step: int
    policy_version: int
    base_model: Path


def export(run_dir: Path, out_dir: Path, *, step: int | None = None, dtype: torch.dtype = torch.bfloat16,
           force: bool = False) -> Export:
    """Write the model of `run_dir`'s checkpoint `step` (None: the newest complete one) into `out_dir`."""
    checkpoint = find_checkpoint(run_dir, step=step)
    base = base_model_dir(run_dir)
    _check_out_dir(out_dir, force=force)
    version = int(json.loads((checkpoint / LEARNER_META).read_text(encoding="utf-8"))["version"])
    done = Export(out_dir=out_dir, checkpoint=checkpoint, step=step_of(checkpoint), policy_version=version,
                  base_model=base)
    partial = out_dir.with_name(out_dir.name + ".partial")
    try:
        shutil.rmtree(partial, ignore_errors=True)
        _write(partial, done, dtype=dtype)
        if out_dir.exists():  # --force
            shutil.rmtree(out_dir)
        os.replace(partial, out_dir)
    except OSError as e:
        shutil.rmtree(partial, ignore_errors=True)
        raise ValueError(f"export to {out_dir} failed: {e.strerror or e} ({e.filename or out_dir}); "
                         "free space or pick another OUT_DIR") from None
    log.info("exported %s (policy_version %d) to %s", checkpoint, version, out_dir)
    return done


# ------------------------------------------------------------------------------------ finding
def step_of(path: Path) -> int:
    return int(path.name.removeprefix("step_"))


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """`step_<N>` folders holding the learner's part, oldest first; `.tmp` and `.unreadable` never count."""
    root = run_dir / "checkpoints"
    found = [p for p in root.glob("step_*") if p.name.removeprefix("step_").isdigit()] if root.is_dir() else []
    found = [p for p in found if (p / LEARNER_META).is_file() and (p / LEARNER_DIR / ".metadata").is_file()]
    return sorted(found, key=step_of)


def find_checkpoint(run_dir: Path, *, step: int | None) -> Path:
    if not (run_dir / "config.yaml").is_file():
        raise ValueError(f"{run_dir} is not a run folder (no config.yaml); give <run.output_dir>/<run.name>")
    found = complete_checkpoints(run_dir)
    if not found:
        raise ValueError(f"{run_dir} has no complete checkpoint under checkpoints/ (only step_<N> folders count, "
                         "not .tmp or .unreadable); train longer or set checkpoint.every_steps")
    if step is None:
        return found[-1]
    chosen = [p for p in found if step_of(p) == step]
    if not chosen:
        raise ValueError(f"--step {step}: no complete checkpoint step_{step:06d} in {run_dir / 'checkpoints'}; "
                         f"complete steps: {', '.join(str(step_of(p)) for p in found)}")
    return chosen[0]


def base_model_dir(run_dir: Path) -> Path:
    """The folder the run's learner loaded: the model of its config.yaml, or its SFT warm start."""
    cfg = load_config(run_dir / "config.yaml")
    if cfg.sft.enabled:
        path = sft_dir(cfg)
        if not (path / "config.json").is_file():
            raise ValueError(f"the run started from its SFT warm start {path}, which is gone (no config.json); "
                             "run the export from the folder the run was started in, or restore that folder")
        return path.resolve()
    try:
        return Path(resolve_model(cfg))
    except ValueError as e:
        raise ValueError(f"{run_dir / 'config.yaml'}: {e} (relative paths are read from the folder the run was "
                         "started in: run the export from there)") from None


def _check_out_dir(out_dir: Path, *, force: bool) -> None:
    if out_dir.is_file():
        raise ValueError(f"OUT_DIR {out_dir} is a file; give a folder path")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise ValueError(f"OUT_DIR {out_dir} is not empty; pick a new folder, or pass --force to replace it")


# ------------------------------------------------------------------------------------ writing
def _write(folder: Path, done: Export, *, dtype: torch.dtype) -> None:
    from transformers import AutoConfig, AutoModelForImageTextToText

    weights = read_model_state(done.checkpoint, dtype=dtype)
    config = AutoConfig.from_pretrained(done.base_model)
    with torch.device("meta"):  # no random init: every parameter comes from the checkpoint
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    _assign(model, weights)
    folder.mkdir(parents=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model.save_pretrained(folder, safe_serialization=True)
    for pattern in PROCESSOR_FILES:
        for file in done.base_model.glob(pattern):
            shutil.copyfile(file, folder / file.name)
    meta = {"run_dir": str(done.checkpoint.parents[1].resolve()), "checkpoint": done.checkpoint.name, "step": done.step,
            "policy_version": done.policy_version, "base_model": str(done.base_model), "dtype": str(dtype)}
    (folder / EXPORT_META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def _assign(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Put the checkpoint's tensors into the meta-device model; every parameter must be covered."""
    result = model.load_state_dict(weights, strict=False, assign=True)
    missing = [k for k in result.missing_keys if k not in _tied(model)]
    if missing or result.unexpected_keys:
        raise ValueError(f"the checkpoint does not match the run's model folder: missing {missing[:5]}, "
                         f"unexpected {result.unexpected_keys[:5]}; was the model folder changed after training?")
    model.tie_weights()


def _tied(model: torch.nn.Module) -> set[str]:
    """Names that alias another parameter (tied embeddings), which a state dict may leave out."""
    seen, tied = set(), set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add(name)
        seen.add(id(p))
    return tied
