"""`perception-r1 train CONFIG --dry-run`: the placement plan and the learner's memory estimate for a
config, from the config and the model folder's config.json alone: no Ray, no torch, no model built.
Prints both and the problems found; returns 0 when the run fits, 2 when it does not (or cannot be
checked: the problems say what to pass)."""

from __future__ import annotations

import os
from pathlib import Path

from core.config import Config, TinyModelConfig
from perception_r1 import placement, preflight


def dry_run(cfg: Config) -> int:
    problems: list[str] = []
    plan = placement.plan(cfg)
    node, where = node_shape(cfg)
    print("\n".join(plan.lines()))
    print(f"node: {{{', '.join(f'{k} {v:g}' for k, v in node.items())}}} ({where})")
    problems += placement.misfits(plan, [node])
    print()
    problems += memory_report(cfg)
    if problems:
        print("\nproblems:\n" + "\n".join(f"  - {p}" for p in problems))
        return 2
    print("\nthe run fits; nothing was started")
    return 0


def node_shape(cfg: Config) -> tuple[dict[str, float], str]:
    """The node the plan is checked against: cluster.num_cpus / cluster.num_gpus where set, else this machine's."""
    gpus = cfg.cluster.num_gpus
    cpus = cfg.cluster.num_cpus
    where = "cluster.num_cpus / cluster.num_gpus"
    if gpus is None:
        gpus, where = len(preflight.nvidia_smi("memory.total")), "this machine; set cluster.num_gpus to plan for another"
    if cpus is None:
        cpus, where = os.cpu_count() or 1, "this machine; set cluster.num_cpus and cluster.num_gpus to plan for another"
    return {"CPU": float(cpus), "GPU": float(gpus)}, where


def memory_report(cfg: Config) -> list[str]:
    """Print the estimate; return the problems (it does not fit, or the model's config.json is missing)."""
    if cfg.learner.num_gpus_per_worker == 0:
        print("learner memory: the learner runs on CPU (learner.num_gpus_per_worker: 0); no GPU memory to check")
        return []
    folder = model_folder(cfg)
    if not (folder / "config.json").is_file():
        return [f"model folder {folder} has no config.json: the memory estimate reads the model's sizes from it "
                "(no weights needed); copy the model's config.json there or pass --set model.path=DIR of a folder "
                "holding it"]
    gib, source = preflight.gpu_memory_gib(cfg)
    found = preflight.learner_memory(cfg, folder)
    print("\n".join(found.lines()) + f"  [GPU memory: {source}]")
    budget = (f"its share of the GPU, learner.gpu_memory_fraction {cfg.learner.gpu_memory_fraction:g} x {gib:g} GiB = "
              f"{found.gpu_gib:.1f} GiB" if cfg.colocated else f"the GPU's {gib:g} GiB")
    return [] if found.fits else [f"the learner's estimated peak ({found.total_gib:.1f} GiB) exceeds {budget}: "
                                  f"{preflight.MEMORY_FIXES}"]


def model_folder(cfg: Config) -> Path:
    if isinstance(cfg.model, TinyModelConfig):
        from perception_r1.tiny_model import tiny_model_folder

        return tiny_model_folder(cfg.model)
    return Path(cfg.model.path)
