"""The cross-field rules of a learner sharing its GPU with the generation engines (the whole system on
one GPU, README "One GPU"): a fractional `learner.num_gpus_per_worker` means colocation (`Config.colocated`),
and the engine's and the learner's memory budgets must fit one GPU together. Checked by core/config.py."""

from __future__ import annotations

from core.config_rollout import VLLMEngineConfig

CUDA_CONTEXTS_FRACTION = 0.03
"""What a GPU shared by the learner and an engine keeps free of both budgets: two CUDA contexts (~0.5 GiB
each), NCCL's and the allocators' slack (~4 GiB of a 141 GB H200)."""


def colocation_problems(cfg) -> list[str]:
    """A learner sharing its GPU (fractional learner.num_gpus_per_worker) needs vLLM engines on fractions of
    GPUs beside it, and the two memory budgets must fit one GPU together."""
    lc, r = cfg.learner, cfg.rollout
    actor_shares = 0 < r.num_gpus_per_actor < 1
    if not cfg.colocated:
        if actor_shares and lc.num_gpus_per_worker >= 1:
            return [f"rollout.num_gpus_per_actor={r.num_gpus_per_actor:g} shares a GPU but the learner has GPUs of its "
                    "own (learner.num_gpus_per_worker=1): give the actor a whole GPU (rollout.num_gpus_per_actor: 1), "
                    "or colocate both (learner.num_gpus_per_worker: 0.5 with learner.gpu_memory_fraction)"]
        return []
    problems = []
    if not isinstance(r.engine, VLLMEngineConfig) or not actor_shares:
        problems.append(f"learner.num_gpus_per_worker={lc.num_gpus_per_worker:g} shares a GPU with the generation "
                        "engine: that needs rollout.engine.type: vllm with rollout.num_gpus_per_actor a fraction too "
                        "(e.g. 0.5 each; weights go by CUDA IPC); or give the learner a GPU of its own "
                        "(learner.num_gpus_per_worker: 1)")
    elif r.num_gpus_per_actor + lc.num_gpus_per_worker > 1:
        problems.append(f"rollout.num_gpus_per_actor ({r.num_gpus_per_actor:g}) + learner.num_gpus_per_worker "
                        f"({lc.num_gpus_per_worker:g}) exceed one GPU: Ray would place them on different GPUs and "
                        "CUDA IPC needs one; lower them (e.g. 0.5 each)")
    if lc.num_workers > 1:
        problems.append(f"learner.num_workers={lc.num_workers} with a learner sharing its GPU: Ray could place two "
                        "learner workers on one GPU (half a GPU each), where NCCL refuses two ranks; colocation runs one "
                        "learner worker: set learner.num_workers: 1, or give the workers whole GPUs")
    if lc.gpu_memory_fraction is None:
        problems.append("a learner sharing its GPU (learner.num_gpus_per_worker < 1) needs learner.gpu_memory_fraction "
                        "(its share of the GPU's memory, beside rollout.engine.gpu_memory_utilization)")
    elif isinstance(r.engine, VLLMEngineConfig):
        total = lc.gpu_memory_fraction + r.engine.gpu_memory_utilization
        if total > 1 - CUDA_CONTEXTS_FRACTION:
            problems.append(
                f"learner.gpu_memory_fraction ({lc.gpu_memory_fraction:g}) + rollout.engine.gpu_memory_utilization "
                f"({r.engine.gpu_memory_utilization:g}) = {total:g} of one GPU leaves less than "
                f"{CUDA_CONTEXTS_FRACTION:g} for the two processes' CUDA contexts; lower one of them")
    if cfg.sync.backend == "gloo":
        problems.append("sync.backend=gloo with a learner sharing its GPU: weights go by CUDA IPC; use sync.backend: auto")
    return problems
