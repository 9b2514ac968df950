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
import time
from dataclasses import dataclass
from pathlib import Path

import ray
from ray import serve
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig
from ray.util.queue import Queue

from actors.actor import remote_class
from actors.engines import build_engine, weight_transport
from core.config import Config, HFEngineConfig, TinyModelConfig
from core.config_files import to_yaml
from core.records import Sampling
from dataprep.loaders import load_prompts as load_file
from dataprep.synthetic import make_problems
from judge.prompt_file import load_system_prompt
from judge.service import SERVE_ENV, JudgeStartCancelled, JudgeStartFailed, JudgeStartTimedOut, start_judge
from learner.sft import SFTInterrupted, run_sft
from learner.wiring import LearnerWiring
from learner.worker import train_loop_per_worker
from perception_r1 import preflight, run_checkpoints
from perception_r1.adapters import RayBuffer, RayGenerator, RayReports
from perception_r1.learner_thread import AbortableTrainer, LearnerThread
from perception_r1.run_checkpoints import load_latest
from perception_r1.run_lock import RunLock
from perception_r1.session import Session
from perception_r1.stop_signals import Interrupted, StopSignals
from perception_r1.stream import PromptStream
from perception_r1.tiny_model import build_tiny_model
from perception_r1.tracking import ConsoleSink, FanOut, MlflowSink, RayMetricsSink, mlflow_uri
from perception_r1.validation import split
from replay.buffer import ReplayBuffer

log = logging.getLogger("perception_r1")
LEARNER_END_S = 60.0
"""How long the driver waits for an aborted learner before Ray shuts down."""


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
    validations: list[tuple[int, dict[str, float]]]
    """(step, val/* metrics) per validation."""


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
    preflight.check_model_type(path)
    if not (path / "preprocessor_config.json").is_file():
        raise ValueError(f"model.path {path} has no preprocessor_config.json (the Qwen2.5-VL image processor); "
                         "copy the model's processor files into the folder")
    return str(path.resolve())


def warm_start(cfg: Config, model_path: str, prompts: list, *, should_stop=lambda: False) -> str:
    """Run (or reuse) the SFT stage; returns the folder GRPO starts from."""
    out = sft_dir(cfg)
    summary = run_sft(model_path, cfg=cfg.sft, data=cfg.data, prompts=prompts, out=out, seed=cfg.run.seed,
                      max_tokens_per_micro_batch=cfg.learner.max_tokens_per_micro_batch,
                      progress=cfg.tracking.progress_bar, should_stop=should_stop)
    log.info("sft warm start %s: %d examples, loss %.3f -> %.3f", out, summary["num_examples"],
             summary["first_loss"], summary["final_loss"])
    return str(out.resolve())


def sft_dir(cfg: Config) -> Path:
    if cfg.sft.output_dir:
        return Path(cfg.sft.output_dir)
    parts = [cfg.model.model_dump(mode="json"), cfg.data.model_dump(mode="json"), cfg.sft.model_dump(mode="json"),
             cfg.run.seed]
    if cfg.validation.every_steps:  # held-out prompts are not in its training set
        parts.append(cfg.validation.source.model_dump(mode="json"))
    key = json.dumps(parts, sort_keys=True)
    return Path(cfg.run.output_dir) / f"sft-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def load_prompts(cfg: Config) -> list:
    source = cfg.data.dataset
    if source.type == "synthetic":
        return make_problems(source)
    return load_file(source.path, on_bad_row=source.on_bad_row)


def split_prompts(cfg: Config) -> tuple[list, list]:
    """(training prompts, held-out validation prompts): the held-out ones are never trained on, SFT included."""
    prompts, held_out = split(load_prompts(cfg), cfg.validation)
    if held_out:
        log.info("validation: %d held-out prompts (%d decoded each time), %d training prompts", len(held_out),
                 min(len(held_out), cfg.validation.max_prompts or len(held_out)), len(prompts))
    return prompts, held_out


def init_ray(cfg: Config) -> str:
    """Connect to Ray: `reused` (this process is already connected: a test, a notebook), `joined` (a
    running cluster: `cluster.address`, or `RAY_ADDRESS` as `ray job submit` sets it) or `local` (start one)."""
    if ray.is_initialized():
        return "reused"
    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS")
    env = {"env_vars": {"NCCL_NVLS_ENABLE": "0", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
                        "TRANSFORMERS_OFFLINE": "1", **SERVE_ENV}}
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
        concurrency = 1 if isinstance(r.engine, HFEngineConfig) else r.calls_per_actor
        actor_class = remote_class(generate_concurrency=concurrency)
        actors.append(actor_class.options(num_gpus=r.num_gpus_per_actor, max_restarts=r.max_restarts,
                                          name=f"{cfg.run.name}:generator-{i}", max_task_retries=0)
                      .remote(actor_id=i, build_engine=build, sampling=sampling))
    return actors


def build_buffer(cfg: Config, *, initial_version: int):
    b = cfg.buffer
    return ray.remote(num_cpus=0)(ReplayBuffer).options(name=f"{cfg.run.name}:replay-buffer").remote(
        max_staleness=b.max_staleness, groups_per_step=cfg.learner.prompts_per_step, max_groups=b.max_groups,
        max_bytes=b.max_bytes, initial_version=initial_version, validate_every=cfg.validation.every_steps)


def build_trainer(cfg: Config, wiring, run_dir: Path, *, own_cluster: bool = False):
    """The learner's Ray Train trainer; `own_cluster`: Ray is a local cluster this run started (see AbortableTrainer)."""
    lc = cfg.learner
    resources = {"CPU": lc.cpus_per_worker} | ({"GPU": lc.num_gpus_per_worker} if lc.num_gpus_per_worker else {})
    return AbortableTrainer(
        train_loop_per_worker, train_loop_config={"wiring": wiring},
        torch_config=TorchConfig(backend="nccl" if lc.num_gpus_per_worker else "gloo",
                                 timeout_s=int(cfg.sync.timeout_s)),
        scaling_config=ScalingConfig(num_workers=lc.num_workers, use_gpu=bool(lc.num_gpus_per_worker),
                                     resources_per_worker=resources),
        run_config=RunConfig(name="learner", storage_path=str((run_dir / "ray_train").resolve()),
                             failure_config=FailureConfig(max_failures=lc.max_restarts)),
        own_cluster=own_cluster)


def build_sinks(cfg: Config, mlflow_sink: MlflowSink) -> FanOut:
    console = ConsoleSink(every=1 if not cfg.tracking.progress_bar else max(1, cfg.run.num_steps // 10))
    return FanOut([mlflow_sink, RayMetricsSink(run_name=cfg.run.name), console])


# --------------------------------------------------------------------------------------------- run
class RunFailed(RuntimeError):
    """The run stopped because it could not go on; the message names the cause (and what was kept)."""


def train(cfg: Config, *, resume: bool = False) -> RunResult:
    """Run a training job end to end; returns what it did. Ctrl-C / SIGTERM at any moment: stop (with a
    checkpoint once training has begun). Raises `RunFailed` when the run cannot go on, `Interrupted` when
    stopped before training began, `ValueError` for bad input (each naming the fix)."""
    run_dir = cfg.run_dir
    check_job_paths(cfg)
    preflight.check_writable(run_dir, field="run.output_dir")
    load_system_prompt(cfg.judge.prompt_file)  # a bad judge prompt file fails now, not after Ray starts
    with RunLock(run_dir), StopSignals() as stop:
        log.info("run folder %s; mlflow %s", run_dir.resolve(), mlflow_uri(cfg.tracking))
        run_checkpoints.remove_unfinished(run_dir / "checkpoints")  # the lock says no learner writes them
        (run_dir / "config.yaml").write_text(to_yaml(cfg), encoding="utf-8")
        restored = _find_resume(run_dir, resume=resume)
        preflight.check_tracking(mlflow_uri(cfg.tracking))  # before the model and the SFT warm start: fail fast
        model_path, prompts, held_out = _prepare(cfg, stop)
        mlflow_sink = MlflowSink(cfg, run_dir=run_dir, resume=restored is not None)  # before Ray: fails fast
        status = "FAILED"
        try:
            connection = init_ray(cfg)
            stop.install()  # in case Ray installed its own handlers
            try:
                stop.check("Ray start-up")
                preflight.check_resources(cfg, ray.cluster_resources())
                preflight.check_placement(cfg, [node["Resources"] for node in ray.nodes() if node["Alive"]])
                result = _run(cfg, model_path=model_path, prompts=prompts, held_out=held_out, run_dir=run_dir,
                              restored=restored, mlflow_sink=mlflow_sink, stop=stop, own_cluster=connection == "local")
                status = "KILLED" if result.stopped_early else "FINISHED"
                return result
            except Interrupted:
                status = "KILLED"
                raise
            finally:
                _shutdown(connection)
                run_checkpoints.remove_unfinished(run_dir / "checkpoints")
        finally:
            mlflow_sink.close(status=status)


def check_job_paths(cfg: Config) -> None:
    """Under `ray job submit --working-dir`, the job runs in Ray's temporary copy of that folder: relative
    output paths would put checkpoints and the mlflow store where the user never finds them."""
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    if not (job.get("runtime_env") or {}).get("working_dir"):
        return
    relative = [f"run.output_dir={cfg.run.output_dir}"] if not Path(cfg.run.output_dir).is_absolute() else []
    uri = mlflow_uri(cfg.tracking)
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        relative.append(f"tracking.mlflow_uri={uri}")
    if relative:
        raise ValueError(f"under ray job submit --working-dir, {' and '.join(relative)} would be written inside Ray's "
                         "temporary copy of the working dir and lost with it; pass absolute paths, e.g. "
                         "--set run.output_dir=$PWD/runs --set tracking.mlflow_uri=sqlite:///$PWD/mlruns.db")


def _prepare(cfg: Config, stop: StopSignals) -> tuple[str, list, list]:
    """The model folder (built, checked, warm-started), the training prompts and the held-out ones (validation);
    each phase honours a stop."""
    model_path = resolve_model(cfg)
    preflight.check_learner_memory(cfg, model_path)  # before the SFT warm start and Ray
    stop.check("model preparation")
    prompts, held_out = split_prompts(cfg)
    stop.check("data loading")
    if cfg.sft.enabled:
        try:
            model_path = warm_start(cfg, model_path, prompts, should_stop=stop.requested.is_set)
        except SFTInterrupted as e:
            raise Interrupted(f"{stop.signal_name} during the SFT warm start: {e}") from None
    return model_path, prompts, held_out


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
    else:
        run_checkpoints.set_aside_newer(root, found[0])
    return found


def _run(cfg: Config, *, model_path: str, prompts: list, held_out: list, run_dir: Path, restored,
         mlflow_sink: MlflowSink, stop: StopSignals, own_cluster: bool = False) -> RunResult:
    """Start-up overlaps its slow parts: the actors load their engines and Ray Train brings the learner up
    (the slowest part) while the judge's Serve apps deploy; the loops start once the judge answers."""
    ckpt_path, state = restored if restored else (None, None)
    stream = PromptStream(prompts, shuffle_seed=cfg.data.shuffle_seed, state=state.stream if state else None)
    sinks = build_sinks(cfg, mlflow_sink)
    buffer = build_buffer(cfg, initial_version=state.version if state else 0)
    actors = build_actors(cfg, model_path)
    reports = Queue(actor_options={"num_cpus": 0})
    wiring = LearnerWiring(config=cfg.model_dump(mode="json"), model_path=model_path, buffer=buffer,
                           actors=actors, reports=reports, checkpoint_root=str((run_dir / "checkpoints").resolve()),
                           resume_from=str(ckpt_path) if ckpt_path else None,
                           weight_transport=weight_transport(cfg))
    judge, session, learner = None, None, None
    try:
        learner = LearnerThread(build_trainer(cfg, wiring, run_dir, own_cluster=own_cluster))
        log.info("start-up: actors, learner and judge starting")
        judge = _start_judge(cfg, stop)
        session = Session(cfg, stream=stream, generators=[RayGenerator(a) for a in actors], scorer=judge,
                          buffer=RayBuffer(buffer), reports=RayReports(reports), sinks=sinks,
                          start_version=state.version if state else 0, buffered=state.buffered if state else [],
                          ledger=run_dir / "trained.jsonl", checkpoint_root=run_dir / "checkpoints",
                          validation_prompts=held_out)
        stop.on_stop(session.request_stop)
        _run_until_done(session, learner)
    finally:
        if learner is not None and (session is None or not session.learner_starts):
            learner.cancel()  # not up yet, nothing to save: end it now (waited for below)
        for sink in sinks.sinks:
            if sink is not mlflow_sink:  # closed by train(), with the run's status
                sink.close(status="")
        if judge is not None:
            judge.stop()
        if learner is not None:
            learner.end(timeout_s=LEARNER_END_S)  # before Ray shuts down, which a thread inside fit() cannot survive
        for handle in [buffer, reports.actor, *actors]:  # a learner still starting fails on these and ends
            ray.kill(handle)
    if session.fatal:
        raise RunFailed(session.fatal)
    stopped = session.stop_requested
    if stopped and not session.learner_starts:
        raise Interrupted(f"{stop.signal_name or 'a stop request'} during start-up; nothing was trained")
    return RunResult(run_dir=run_dir, final_version=session.version, steps_logged=session.steps_logged,
                     mlflow_run_id=mlflow_sink.run_id, counters=dict(session.counters()), stopped_early=stopped,
                     history=session.history, validations=session.validations)


def _start_judge(cfg: Config, stop: StopSignals):
    """The judge, deployed while the learner comes up; a stop request ends the wait at once."""
    try:
        judge = start_judge(cfg.judge, cancel=stop.requested, deadline_s=cfg.run.startup_timeout_s)
    except JudgeStartCancelled:
        stop.check("start-up")
        raise
    except JudgeStartTimedOut as e:
        raise RunFailed(f"{e}; raise run.startup_timeout_s if it needs longer") from None
    except JudgeStartFailed as e:
        raise RunFailed(str(e)) from None
    stop.install()  # in case Serve installed its own handlers
    return judge


def _run_until_done(session: Session, learner: LearnerThread) -> None:
    """The loops on asyncio while the learner runs (stop requests arrive through `StopSignals`). A learner
    that failed becomes the session's `fatal` cause, in one line (the whole error goes to the log)."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    loop = asyncio.new_event_loop()
    try:
        with logging_redirect_tqdm():  # log lines above the progress bar, not onto its line
            loop.run_until_complete(session.run(learner_alive=learner.alive))
    finally:
        loop.close()
    if session.learner_starts and session.watchdog.overdue(learner_up=True) != "stop":
        learner.thread.join(timeout=30)  # it has ended or is ending: the session waited for it
    error = learner.error()
    if error is not None and not session.fatal:
        log.error("the learner failed: %s", error)
        session.fatal = f"the learner failed: {_last_line(error)}"


def _last_line(error: BaseException) -> str:
    """The innermost message of an error whose text carries a remote traceback (Ray Train's)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1] if lines else repr(error)


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
