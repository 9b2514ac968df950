"""The composition root of a training run: resolves the model and data, starts (or joins) Ray, builds
the judge app, the buffer, the generation actors and the learner group with their resources, wires
handles into constructors, runs the loops (perception_r1/orchestrator.py) until the step budget is
met or a stop is requested, and shuts everything down. The only module that imports every role.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import ray
from ray import serve
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from ray.util.queue import Queue

from actors.actor import remote_class
from core.config import Config, HFEngineConfig, TinyModelConfig
from core.config_files import to_yaml
from core.records import Sampling
from dataprep.loaders import load_prompts as load_file
from dataprep.synthetic import make_problems
from judge.service import start_judge
from learner.sft import run_sft
from learner.worker import LearnerWiring, train_loop_per_worker
from perception_r1.adapters import RayBuffer, RayGenerator, RayReports
from perception_r1.run_checkpoints import load_latest
from perception_r1.session import Session
from perception_r1.stream import PromptStream
from perception_r1.tiny_model import build_tiny_model
from perception_r1.tracking import ConsoleSink, FanOut, MlflowSink, RayMetricsSink
from replay.buffer import ReplayBuffer

log = logging.getLogger("perception_r1")


@dataclass
class RunResult:
    run_dir: Path
    final_version: int
    steps_logged: int
    mlflow_run_id: str
    counters: dict[str, int]
    stopped_early: bool
    history: list[tuple[float, dict[str, float]]]
    """(wall time, metrics) per logged step."""


# ------------------------------------------------------------------------------------------- build
def resolve_model(cfg: Config) -> str:
    if isinstance(cfg.model, TinyModelConfig):
        return str(build_tiny_model(cfg.model).resolve())  # workers may run in another directory
    path = Path(cfg.model.path)
    if not (path / "config.json").is_file():
        raise ValueError(f"model.path {path} is not a model folder (no config.json); point it at a local "
                         "copy of the model (nothing is downloaded at run time)")
    try:
        json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"model.path {path}: config.json is not valid JSON ({e}); re-copy the model folder") from None
    if not (path / "preprocessor_config.json").is_file():
        raise ValueError(f"model.path {path} has no preprocessor_config.json (the Qwen2.5-VL image processor); "
                         "copy the model's processor files into the folder")
    return str(path.resolve())


def warm_start(cfg: Config, model_path: str, prompts: list) -> str:
    """Run (or reuse) the SFT stage; returns the folder GRPO starts from."""
    out = sft_dir(cfg)
    summary = run_sft(model_path, cfg=cfg.sft, data=cfg.data, prompts=prompts, out=out, seed=cfg.run.seed,
                      max_tokens_per_micro_batch=cfg.learner.max_tokens_per_micro_batch,
                      progress=cfg.tracking.progress_bar)
    log.info("sft warm start %s: %d examples, loss %.3f -> %.3f", out, summary["num_examples"],
             summary["first_loss"], summary["final_loss"])
    return str(out.resolve())


def sft_dir(cfg: Config) -> Path:
    if cfg.sft.output_dir:
        return Path(cfg.sft.output_dir)
    key = json.dumps([cfg.model.model_dump(mode="json"), cfg.data.model_dump(mode="json"),
                      cfg.sft.model_dump(mode="json"), cfg.run.seed], sort_keys=True)
    return Path(cfg.run.output_dir) / f"sft-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def load_prompts(cfg: Config) -> list:
    source = cfg.data.dataset
    if source.type == "synthetic":
        return make_problems(source)
    return load_file(source.path, on_bad_row=source.on_bad_row)


def init_ray(cfg: Config) -> str:
    """Connect to Ray: `reused` (this process is already connected: a test, a notebook), `joined` (a
    running cluster: `cluster.address`, or `RAY_ADDRESS` as `ray job submit` sets it) or `local` (start one)."""
    if ray.is_initialized():
        return "reused"
    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS")
    env = {"env_vars": {"NCCL_NVLS_ENABLE": "0", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
                        "TRANSFORMERS_OFFLINE": "1"}}
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=True)
        return "joined"
    ray.init(num_cpus=cfg.cluster.num_cpus, num_gpus=cfg.cluster.num_gpus, runtime_env=env,
             include_dashboard=cfg.cluster.include_dashboard, dashboard_host=cfg.cluster.dashboard_host)
    return "local"


def build_actors(cfg: Config, model_path: str) -> list:
    r = cfg.rollout
    sampling = Sampling(n=r.samples_per_prompt, temperature=r.temperature, top_p=r.top_p,
                        max_new_tokens=r.max_new_tokens, seed=cfg.run.seed)
    actors = []
    for i in range(r.num_actors):
        build = functools.partial(build_engine, cfg=cfg, model_path=model_path)
        concurrency = 1 if isinstance(r.engine, HFEngineConfig) else r.max_inflight_per_actor
        actor_class = remote_class(generate_concurrency=concurrency)
        actors.append(actor_class.options(num_gpus=r.num_gpus_per_actor, max_restarts=r.max_restarts,
                                          name=f"{cfg.run.name}:generator-{i}", max_task_retries=0)
                      .remote(actor_id=i, build_engine=build, sampling=sampling))
    return actors


def build_engine(*, cfg: Config, model_path: str):
    """Runs inside the actor's process: the engine the config names."""
    engine = cfg.rollout.engine
    if isinstance(engine, HFEngineConfig):
        from actors.hf_engine import (
            HFEngine,  # imported in the actor's process: engines stay lazy
        )

        device = "cuda" if cfg.rollout.num_gpus_per_actor > 0 else "cpu"
        return HFEngine(model_path, data=cfg.data, num_threads=engine.num_threads, device=device,
                      random_weights=getattr(cfg.model, "random_weights", False))
    from actors.vllm_engine import VLLMEngine

    return VLLMEngine(model_path, cfg=engine, data=cfg.data, seed=cfg.run.seed)


def build_buffer(cfg: Config, *, initial_version: int):
    b = cfg.buffer
    return ray.remote(num_cpus=0)(ReplayBuffer).options(name=f"{cfg.run.name}:replay-buffer").remote(
        max_staleness=b.max_staleness, groups_per_step=cfg.learner.prompts_per_step, max_groups=b.max_groups,
        max_bytes=b.max_bytes, initial_version=initial_version)


def build_trainer(cfg: Config, wiring, run_dir: Path):
    lc = cfg.learner
    resources = {"CPU": lc.cpus_per_worker} | ({"GPU": 1} if lc.num_gpus_per_worker else {})
    return TorchTrainer(
        train_loop_per_worker, train_loop_config={"wiring": wiring},
        torch_config=TorchConfig(backend="nccl" if lc.num_gpus_per_worker else "gloo",
                                 timeout_s=int(cfg.sync.timeout_s)),
        scaling_config=ScalingConfig(num_workers=lc.num_workers, use_gpu=bool(lc.num_gpus_per_worker),
                                     resources_per_worker=resources),
        run_config=RunConfig(name="learner", storage_path=str((run_dir / "ray_train").resolve()),
                             failure_config=FailureConfig(max_failures=lc.max_restarts)))


def build_sinks(cfg: Config, run_dir: Path, *, resume: bool):
    mlflow_sink = MlflowSink(cfg, run_dir=run_dir, resume=resume)  # a bad URI fails here, at start
    console = ConsoleSink(every=1 if not cfg.tracking.progress_bar else max(1, cfg.run.num_steps // 10))
    return FanOut([mlflow_sink, RayMetricsSink(run_name=cfg.run.name), console]), mlflow_sink


# --------------------------------------------------------------------------------------------- run
def train(cfg: Config, *, resume: bool = False) -> RunResult:
    """Run a training job end to end; returns what it did. Ctrl-C / SIGTERM: checkpoint, then stop."""
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg), encoding="utf-8")
    model_path = resolve_model(cfg)
    prompts = load_prompts(cfg)
    if cfg.sft.enabled:
        model_path = warm_start(cfg, model_path, prompts)
    restored = _find_resume(run_dir, resume=resume)
    connection = init_ray(cfg)
    try:
        return _run(cfg, model_path=model_path, prompts=prompts, run_dir=run_dir, restored=restored)
    finally:
        _shutdown(connection)


def _find_resume(run_dir: Path, *, resume: bool):
    """The checkpoint to resume from; refuses to start over silently on top of an earlier run's checkpoints."""
    root = run_dir / "checkpoints"
    existing = sorted(root.glob("step_*[0-9]")) if root.is_dir() else []
    if not resume:
        if existing:
            raise ValueError(f"{root} already holds {len(existing)} checkpoint(s) of an earlier run; pass --resume "
                             "to continue it, or pick another run.name / run.output_dir")
        return None
    found = load_latest(root)
    if found is None and existing:
        raise ValueError(f"--resume: none of the {len(existing)} checkpoints under {root} loads (see the warnings "
                         "above); move them away to start over")
    if found is None:
        log.warning("--resume: no checkpoint under %s yet; starting from scratch", root)
    return found


def _run(cfg: Config, *, model_path: str, prompts: list, run_dir: Path, restored) -> RunResult:
    """Start-up overlaps its slow parts: the actors load their engines and Ray Train brings the learner up
    (the slowest part) while the judge's Serve apps deploy; the loops start once the judge answers."""
    ckpt_path, state = restored if restored else (None, None)
    stream = PromptStream(prompts, shuffle_seed=cfg.data.shuffle_seed, state=state.stream if state else None)
    sinks, mlflow_sink = build_sinks(cfg, run_dir, resume=restored is not None)  # fail fast on a bad URI
    buffer = build_buffer(cfg, initial_version=state.version if state else 0)
    actors = build_actors(cfg, model_path)
    reports = Queue(actor_options={"num_cpus": 0})
    wiring = LearnerWiring(config=cfg.model_dump(mode="json"), model_path=model_path, buffer=buffer,
                           actors=actors, reports=reports, checkpoint_root=str((run_dir / "checkpoints").resolve()),
                           resume_from=str(ckpt_path) if ckpt_path else None,
                           weight_transport="torch" if isinstance(cfg.rollout.engine, HFEngineConfig) else "vllm")
    status, judge, session = "FAILED", None, None
    try:
        learner = LearnerThread(build_trainer(cfg, wiring, run_dir))
        judge = start_judge(cfg.judge)
        session = Session(cfg, stream=stream, generators=[RayGenerator(a) for a in actors], scorer=judge,
                          buffer=RayBuffer(buffer), reports=RayReports(reports), sinks=sinks,
                          start_version=state.version if state else 0, buffered=state.buffered if state else [],
                          ledger=run_dir / "trained.jsonl")
        stopped = _run_until_done(session, learner)
        status = "KILLED" if stopped else "FINISHED"
    finally:
        sinks.close(status=status)
        if judge is not None:
            judge.stop()
        for handle in [buffer, reports.actor, *actors]:  # a learner still starting fails on these and ends
            ray.kill(handle)
    return RunResult(run_dir=run_dir, final_version=session.version, steps_logged=session.steps_logged,
                     mlflow_run_id=mlflow_sink.run_id, counters=dict(session.counters()), stopped_early=stopped,
                     history=session.history)


class LearnerThread:
    """Ray Train's blocking `fit()` in a daemon thread, started at once; `error()` is what it raised."""

    def __init__(self, trainer: TorchTrainer) -> None:
        self.result: dict = {}
        self.thread = threading.Thread(target=lambda: self.result.update(out=_fit(trainer)), name="learner-fit",
                                       daemon=True)
        self.thread.start()

    def alive(self) -> bool:
        return self.thread.is_alive()

    def error(self) -> BaseException | None:
        out = self.result.get("out")
        return out if isinstance(out, BaseException) else None


def _run_until_done(session: Session, learner: LearnerThread) -> bool:
    """The loops on asyncio while the learner runs; SIGINT/SIGTERM request a stop."""
    loop = asyncio.new_event_loop()
    signals = (signal.SIGINT, signal.SIGTERM) if threading.current_thread() is threading.main_thread() else ()
    for sig in signals:  # a caller running train() in a thread keeps its own signal handling
        loop.add_signal_handler(sig, session.request_stop)
    try:
        loop.run_until_complete(session.run(learner_alive=learner.alive))
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        loop.close()
    learner.thread.join(timeout=120)
    if learner.error() is not None:
        raise RuntimeError(f"the learner failed: {learner.error()}") from learner.error()
    return session.stop_requested


def _fit(trainer: TorchTrainer) -> BaseException | None:
    try:
        trainer.fit()
        return None
    except BaseException as e:  # noqa: BLE001 -- handed to the main thread, which re-raises it
        return e


def _shutdown(connection: str) -> None:
    """Leave a cluster we joined or reused running (our own apps and actors are already gone)."""
    if connection == "reused":
        return
    start = time.perf_counter()
    if connection == "local":
        try:
            serve.shutdown()
        except Exception as e:  # noqa: BLE001 -- shutting down: report and go on
            log.warning("serve.shutdown failed: %s", e)
    ray.shutdown()
    log.info("Ray %s in %.1fs", "shut down" if connection == "local" else "disconnected", time.perf_counter() - start)
