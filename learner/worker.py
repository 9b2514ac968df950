"""The learner loop, run by every Ray Train worker (an FSDP rank):

    restore (newest complete checkpoint, if any) ─> broadcast weights to the actors, publish version
    loop:  rank 0 takes a TrainBatch from the buffer (waits for admissible groups) and scatters it
           every rank: one GRPO update on its share                 policy_version += 1
           every `sync.interval_steps`: gather + broadcast weights   actors stage them
           rank 0: publish the version to the buffer (unblocks producers), report the step record
           every `checkpoint.every_steps`: wait for the write in flight (at most one), snapshot the state
             into step_<N>.tmp, written in the background (learner/checkpoint_writer.py); once written,
             rank 0 reports CheckpointWritten and the driver completes the folder
    until num_steps, or until the buffer closes (the driver is stopping: wait for the write in flight,
    write the final checkpoint and wait for it, then report LearnerFinished).

The learner outlives the driver's helpers: when the buffer actor dies, take() reads as closed (the
learner checkpoints and returns; the buffered groups were not trained and regenerate on resume);
when the report queue dies, the learner stops at once and checkpoints with the step reports it could
not deliver (`unreported.msgpack`), which the driver turns into a complete checkpoint. A checkpoint
that cannot be written says why in the OS's words (no space left, permission denied).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import ray
import torch
import torch.distributed as dist

from core import codec
from core.config import Config
from core.records import (
    CheckpointWritten,
    LearnerFinished,
    LearnerStarted,
    LearnerStep,
    ScoredGroup,
    TrainBatch,
)
from core.seams import BatchSource, ReportSink
from learner.batch_metrics import reward_metrics
from learner.checkpoint_writer import CheckpointWriter, Written
from learner.sharded_state import UNREPORTED_FILE, load_learner, newest_complete
from learner.sync import ReceiverLost, WeightBroadcaster
from learner.trainer import Learner
from learner.wiring import LearnerWiring

_LOST = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)


def train_loop_per_worker(loop_config: dict) -> None:
    wiring: LearnerWiring = loop_config["wiring"]
    cfg = Config.model_validate(wiring.config)
    rank = dist.get_rank() if dist.is_initialized() else 0
    device = _device(cfg)
    torch.manual_seed(cfg.run.seed + rank)
    sync = WeightBroadcaster(
        receivers=wiring.actors, rank=rank, backend=_backend(cfg, device), timeout_s=cfg.sync.timeout_s,
        bucket_bytes=cfg.sync.bucket_mb << 20, dtype=getattr(torch, cfg.learner.dtype), device=device,
        transport=wiring.weight_transport, ipc_load=cfg.sync.ipc_load, nccl_load=cfg.sync.nccl_load)
    connect_s = _share_gpu(cfg, sync, device) if cfg.colocated else 0.0
    learner = Learner(wiring.model_path, cfg=cfg.learner, data=cfg.data, temperature=cfg.rollout.temperature,
                      device=device, random_weights=getattr(cfg.model, "random_weights", False))
    load_metrics = _load_metrics(learner, rank=rank)
    version = _restore(learner, restore_point(Path(wiring.checkpoint_root), wiring.resume_from))
    if not cfg.colocated:
        connect_s = sync.connect()
    sync_s = _sync(sync, learner, version=version)[0] or 0.0
    source, reports = RayBatchSource(wiring.buffer), Reports(wiring.reports)
    if rank == 0:
        source.learner_started(version)
        reports.put(LearnerStarted(version=version))
        print(f"learner: version {version}, weight group formed in {connect_s:.1f}s, first sync {sync_s:.2f}s",
              flush=True)
    _loop(cfg, wiring, learner, sync, source, reports, rank=rank, version=version, first_metrics=load_metrics)


def _share_gpu(cfg: Config, sync: WeightBroadcaster, device: torch.device) -> float:
    """On a GPU shared with the engines: wait for them to be up first (vLLM sizes its KV cache from the memory
    it sees while it starts: a learner allocating meanwhile would skew it), then cap this process's
    allocator at learner.gpu_memory_fraction, so the learner never takes the engine's memory."""
    connect_s = sync.connect()  # returns once every engine answered: they are built
    if dist.is_initialized():
        dist.barrier()
    torch.cuda.set_per_process_memory_fraction(cfg.learner.gpu_memory_fraction, device)
    return connect_s


SYNC_ATTEMPTS = 3
"""Tries of one weight sync when generation actors die during it (each death costs one, bounded by restarts)."""


def _sync(sync: WeightBroadcaster, learner: Learner, *, version: int) -> tuple[float | None, int]:
    """Broadcast the weights as `version`: (seconds, bytes), or (None, 0) when generation actors died during
    each of SYNC_ATTEMPTS tries. A death is retried at once: the retry waits for Ray to restart the actor (up to
    sync.timeout_s) and re-forms the group with it. Skipping instead would leave every actor a version behind,
    and at `buffer.max_staleness` 0 no group could then be started for the next step (the run would wait on
    itself until run.stall_timeout_s). Every rank calls it; rank 0 alone sees the failure and tells the others
    (one flag, all-reduced)."""
    start = time.perf_counter()
    for attempt in range(1, SYNC_ATTEMPTS + 1):
        try:
            seconds, nbytes = sync.broadcast(learner.model, version=version, after=learner.optimizer_done)
        except ReceiverLost as e:
            last = attempt == SYNC_ATTEMPTS
            print(f"learner: {e}; {'this sync is skipped' if last else 'retrying now'}", flush=True)
            seconds, nbytes = None, 0
        if not _any_rank(seconds is None, learner.device):
            return time.perf_counter() - start, nbytes
    return None, 0


def _any_rank(flag: bool, device: torch.device) -> bool:
    """Whether `flag` is set on any rank (this rank's alone outside a multi-rank group)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _load_metrics(learner: Learner, *, rank: int) -> dict[str, float]:
    """This rank's load in a log line; the largest seconds, peak host memory and bytes read over the ranks
    as metrics (rank 0 reports them with the first step)."""
    if not learner.load_stats:  # random weights
        return {}
    seconds = sum(s.seconds for s in learner.load_stats)
    peak_gib = max(s.peak_host_bytes for s in learner.load_stats) / 2**30
    read_gib = sum(s.read_bytes for s in learner.load_stats) / 2**30
    print(f"learner rank {rank}: weights loaded in {seconds:.1f}s, {read_gib:.2f} GiB read from the model files, "
          f"peak host memory {peak_gib:.2f} GiB", flush=True)
    values = torch.tensor([seconds, peak_gib, read_gib], dtype=torch.float64, device=learner.device)
    if dist.is_initialized():
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    seconds, peak_gib, read_gib = values.tolist()
    return {"learner/load_s": seconds, "learner/load_peak_host_gib": peak_gib, "learner/load_read_gib": read_gib}


class Reports:
    """The report queue (rank 0's end), keeping what it could not deliver once the queue is gone."""

    def __init__(self, queue: ReportSink) -> None:
        self.queue, self.undelivered = queue, []
        self.lost = False

    def put(self, report) -> bool:
        """True once the report is on the queue."""
        if not self.lost:
            try:
                self.queue.put(report, timeout=60)
                return True
            except _LOST as e:
                print(f"learner: the report queue is gone ({type(e).__name__}); stopping to checkpoint", flush=True)
                self.lost = True
        if isinstance(report, LearnerStep):
            self.undelivered.append(report)
        return False


class RayBatchSource:
    """The buffer's actor handle as a `core.seams.BatchSource`: take() fetches the groups of the refs
    the buffer hands out (group data never passes through the buffer)."""

    def __init__(self, handle) -> None:
        self.handle = handle
        self.lost = False

    def take(self, k: int, *, step: int) -> TrainBatch | None:
        """The next batch; None once the buffer is closed or gone (both mean: checkpoint and end)."""
        try:
            taken = ray.get(self.handle.take.remote(k))
            if taken is None:
                return None
            groups = ray.get([refs[0] for refs, _, _ in taken])
        except _LOST as e:
            self._lose(e)
            return None
        return TrainBatch(step=step, groups=tuple(groups), staleness=tuple(s for _, _, s in taken))

    def publish_version(self, learner_version: int, synced_version: int) -> None:
        if self.lost:
            return
        try:
            ray.get(self.handle.publish_version.remote(learner_version, synced_version))
        except _LOST as e:
            self._lose(e)

    def _lose(self, e: BaseException) -> None:
        if not self.lost:
            print(f"learner: the replay buffer is gone ({type(e).__name__}); checkpointing and ending", flush=True)
        self.lost = True

    def learner_started(self, version: int) -> None:
        ray.get(self.handle.learner_started.remote(version))


def _loop(cfg: Config, wiring: LearnerWiring, learner: Learner, sync: WeightBroadcaster, source: BatchSource,
          reports: Reports, *, rank: int, version: int, first_metrics: dict[str, float]) -> None:
    synced = version
    checkpoints = CheckpointWriter(timeout_s=cfg.checkpoint.write_timeout_s)
    while version < cfg.run.num_steps:
        wait_start = time.perf_counter()
        shared = _take(source, cfg.learner.prompts_per_step, step=version, rank=rank, stop=reports.lost)
        if shared is None:  # the driver is stopping the run (or cannot hear us)
            break
        batch, mine = shared
        wait_s = time.perf_counter() - wait_start
        metrics = learner.step(mine)
        step, version = version, version + 1
        sync_s = sync_bytes = verified = 0
        if version % cfg.sync.interval_steps == 0 or version == cfg.run.num_steps:
            sync_s, sync_bytes = _sync(sync, learner, version=version)
            landed = sync_s is not None  # rank 0 alone can see a sync skipped (ReceiverLost)
            synced = version if landed else synced
            if cfg.sync.verify_every_steps and version % cfg.sync.verify_every_steps == 0:
                verified = sync.verify(learner.model, version=version, compare=landed)  # every rank: it gathers
            sync_s = sync_s or 0.0
        ckpt = _periodic_checkpoint(cfg, wiring, learner, checkpoints, version=version)
        if rank == 0:
            source.publish_version(version, synced)
            metrics.update(reward_metrics(batch.groups, staleness=batch.staleness))
            metrics.update(first_metrics)
            first_metrics = {}
            metrics.update({"learner/wait_seconds": wait_s, "sync/seconds": sync_s, "sync/verified": float(verified),
                            "sync/gbytes_per_s": sync_bytes / max(sync_s, 1e-9) / 1e9 if sync_bytes else 0.0})
            metrics.update(ckpt.metrics)
            _report_written(reports, ckpt.earlier)
            reports.put(LearnerStep(step=step, version=version, metrics=metrics,
                                    seqs=tuple(g.group.seq for g in batch.groups), checkpoint_path=ckpt.started))
            _report_written(reports, ckpt.now)
    _shutdown(cfg, wiring, learner, checkpoints, reports, rank=rank, version=version)


@dataclass
class CheckpointStep:
    """What a step boundary did about checkpoints."""

    earlier: Written | None = None
    """A background write that ended since the last step (reported before this step's LearnerStep)."""
    started: str = ""
    """The `.tmp` folder of this step's snapshot, if one was taken."""
    now: Written | None = None
    """This step's own write, when `checkpoint.background` is off (reported after this step's LearnerStep)."""
    metrics: dict[str, float] = field(default_factory=dict)


def _periodic_checkpoint(cfg: Config, wiring: LearnerWiring, learner: Learner, checkpoints: CheckpointWriter, *,
                         version: int) -> CheckpointStep:
    """Collect a background write that ended; every `checkpoint.every_steps`, wait for the one in flight
    (at most one: the wait is logged) and snapshot this step's state into step_<N>.tmp."""
    every = cfg.checkpoint.every_steps
    due = every > 0 and version % every == 0
    wait_start = time.perf_counter()
    out = CheckpointStep(earlier=checkpoints.finished(wait=due))
    waited = time.perf_counter() - wait_start if due else 0.0
    if out.earlier is not None:
        out.metrics.update(_written_metrics(out.earlier))
    if not due:
        return out
    if waited > 0.1:
        print(f"learner: checkpoint {version} waited {waited:.1f}s for the previous write to end", flush=True)
    path = Path(wiring.checkpoint_root) / f"step_{version:06d}.tmp"
    blocked = waited + checkpoints.start(path, model=learner.model, optimizer=learner.optimizer,
                                         scheduler=learner.scheduler, version=version)
    out.started = str(path)
    if not cfg.checkpoint.background:
        out.now = checkpoints.finished(wait=True)
        blocked = time.perf_counter() - wait_start
        out.metrics.update(_written_metrics(out.now))
    out.metrics.update({"checkpoint/blocked_seconds": blocked, "checkpoint/wait_seconds": waited})
    return out


def _written_metrics(written: Written) -> dict[str, float]:
    return {"checkpoint/seconds": written.seconds, "checkpoint/gib": written.nbytes / 2**30}


def _report_written(reports: Reports, written: Written | None) -> bool:
    """Rank 0: tell the driver a checkpoint is whole on disk; True if the report reached the queue."""
    if written is None:
        return False
    print(f"learner: checkpoint {written.path.name} written: {written.nbytes / 2**30:.2f} GiB in "
          f"{written.seconds:.1f}s", flush=True)
    return reports.put(CheckpointWritten(version=written.version, path=str(written.path),
                                         seconds=written.seconds, nbytes=written.nbytes))


def _shutdown(cfg: Config, wiring: LearnerWiring, learner: Learner, checkpoints: CheckpointWriter,
              reports: Reports, *, rank: int, version: int) -> None:
    """Wait for the write in flight, write the final checkpoint if this version has none (waited for), and
    only then report final; with the report queue gone, save the undelivered step reports beside it."""
    announced = _report_written(reports, checkpoints.finished(wait=True)) if rank == 0 else False
    needed = _final_checkpoint_needed(cfg, version=version, last=checkpoints.last_version, lost=reports.lost,
                                      announced=announced)
    if dist.is_initialized():  # rank 0 alone knows about the report queue: every rank follows its decision
        decision = [needed]
        dist.broadcast_object_list(decision, src=0)
        needed = decision[0]
    path = Path(wiring.checkpoint_root) / f"step_{version:06d}.tmp"
    if needed:
        checkpoints.start(path, model=learner.model, optimizer=learner.optimizer, scheduler=learner.scheduler,
                          version=version)
        written = checkpoints.finished(wait=True)
        if rank == 0:
            print(f"learner: final checkpoint {path.name} written: {written.nbytes / 2**30:.2f} GiB in "
                  f"{written.seconds:.1f}s", flush=True)
    if rank == 0:
        reports.put(LearnerFinished(version=version, checkpoint_path=str(path) if needed else ""))
        if reports.lost:
            _save_undelivered(path, reports.undelivered)


def _final_checkpoint_needed(cfg: Config, *, version: int, last: int | None, lost: bool, announced: bool) -> bool:
    """Whether to write a checkpoint at shutdown. Not when this learner's last snapshot is of this version,
    unless the report queue is gone after that snapshot was announced (the driver may be completing that
    folder: the undelivered reports need one of their own). Not when the run ended at a periodic checkpoint's
    version it was restored from (that checkpoint is complete already)."""
    if last == version:
        return lost and announced
    every = cfg.checkpoint.every_steps
    restored_complete = version == cfg.run.num_steps and every > 0 and version % every == 0
    return lost or not restored_complete


def _save_undelivered(path: Path, undelivered: list[LearnerStep]) -> None:
    """The step reports the driver never got, beside the checkpoint they lead to (the driver completes it)."""
    data = msgpack.packb([codec.encode(r) for r in undelivered], use_bin_type=True)
    (path / UNREPORTED_FILE).with_suffix(".part").write_bytes(data)
    os.replace((path / UNREPORTED_FILE).with_suffix(".part"), path / UNREPORTED_FILE)
    print(f"learner: {len(undelivered)} undelivered step report(s) saved in {path}", flush=True)


def _take(source: BatchSource, k: int, *, step: int, rank: int,
          stop: bool = False) -> tuple[TrainBatch, list[ScoredGroup]] | None:
    """Rank 0 takes the batch and scatters it round-robin; returns (the batch, this rank's share of its groups).
    Ranks other than 0 get the batch without groups (only rank 0 reports on it). `stop`: take nothing, all end."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    shares: list = [None] * world
    if rank == 0 and not stop:
        batch = source.take(k, step=step)
        if batch is not None:
            empty = TrainBatch(step=step, groups=(), staleness=())
            shares = [(batch if r == 0 else empty, list(batch.groups[r::world])) for r in range(world)]
    if world == 1:
        return shares[0]
    received: list = [None]
    dist.scatter_object_list(received, shares if rank == 0 else None, src=0)
    return received[0]


def restore_point(root: Path, resume_from: str | None) -> Path | None:
    """What this worker restores: the checkpoint the driver chose (`--resume`, or none), or a newer complete
    one, which only this run can have written (its folder is locked, and a run without --resume refuses a
    folder holding checkpoints): where a worker restarted by Ray Train picks up."""
    newest = newest_complete(root)
    if resume_from is None:
        return newest
    chosen = Path(resume_from)
    return newest if newest is not None and newest.name > chosen.name else chosen


def _restore(learner: Learner, resume_from: str | Path | None) -> int:
    """From the newest complete checkpoint (a resumed run, or this worker restarted by Ray Train)."""
    if not resume_from:
        return 0
    print(f"learner: restoring {resume_from}", flush=True)
    return load_learner(Path(resume_from), model=learner.model, optimizer=learner.optimizer,
                        scheduler=learner.scheduler)


def _device(cfg: Config) -> torch.device:
    if cfg.learner.num_gpus_per_worker:
        import ray.train.torch

        # before CUDA's allocator starts: the packed micro-batches vary in size, and with fixed segments
        # the fragments they leave cost the headroom the measured recipe needs (benchmarks/README.md)
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
        device = ray.train.torch.get_device()
        torch.cuda.set_device(device)
        return device
    torch.set_num_threads(cfg.learner.num_threads)
    return torch.device("cpu")


def _backend(cfg: Config, device: torch.device) -> str:
    if cfg.sync.backend != "auto":
        return cfg.sync.backend
    return "nccl" if device.type == "cuda" else "gloo"
