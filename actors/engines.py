"""Which engine a generation actor runs, built in the actor's own process from the run's config.

Kept apart from the driver on purpose: the driver hands `build_engine` to each actor as a pickled function,
and unpickling it imports the module that defines it; from here that is the config schema only (the
engine's own module is imported inside), not the driver with Ray Train, Serve and the SFT stage (the actor's
process took 13.0 s of CPU in a 2-step run on 2 cores with the driver's copy, 11.0 s with this one)."""

from __future__ import annotations

from core.config import Config, HFEngineConfig


def build_engine(*, cfg: Config, model_path: str):
    """Runs inside the actor's process: the engine the config names."""
    engine = cfg.rollout.engine
    if isinstance(engine, HFEngineConfig):
        from actors.hf_engine import HFEngine  # imported in the actor's process: engines stay lazy

        device = "cuda" if cfg.rollout.num_gpus_per_actor > 0 else "cpu"
        return HFEngine(model_path, data=cfg.data, num_threads=engine.num_threads, device=device,
                        random_weights=getattr(cfg.model, "random_weights", False))
    from actors.vllm_engine import VLLMEngine

    # vLLM's backend names: the learner's `vllm` transport is its NCCL weight-transfer group
    return VLLMEngine(model_path, cfg=engine, data=cfg.data, seed=cfg.run.seed,
                      weight_transfer={"vllm": "nccl", "ipc": "ipc"}[weight_transport(cfg)])


def weight_transport(cfg: Config) -> str:
    """How weights reach the generation actors: `torch` (HF engines), `ipc` (vLLM engines on the learner's
    GPU), `vllm` (vLLM engines on other GPUs: vLLM's NCCL weight-transfer group)."""
    if isinstance(cfg.rollout.engine, HFEngineConfig):
        return "torch"
    return "ipc" if cfg.colocated else "vllm"
