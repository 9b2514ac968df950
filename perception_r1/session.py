"""One training session in the driver: runs the dispatch loop (perception_r1/orchestrator.py) and the
report loop, which turns each learner report into one row of metrics for every sink, keeps the
prompt-stream ledger, completes checkpoints, and shows progress. Stops at the step budget, when
the learner ends, or on request (Ctrl-C / SIGTERM: the buffer closes, the learner checkpoints).

Nothing waits forever (perception_r1/watchdog.py): the learner must come up, steps must keep coming,
and a stop must end, each within its deadline; when one passes, or dispatch finds no usable prompt,
or an actor the run needs dies (`PeerLost`), `fatal` names the cause and the run stops keeping what
is safe. A stop before the learner is up ends at once (nothing to save). Metrics-only peers (the
judge's statistics, the actors' counters) never stop the run.

Validation (perception_r1/validation.py) runs beside the report loop, as a task: before the first step, after
each report whose version is a multiple of `validation.every_steps`, and after the last step. The buffer holds
the learner at those versions until `buffer.validated(version)` (replay/buffer.py), so the actors keep exactly
the weights being validated; generation goes on. Its metrics go to every sink at the policy_version it decoded
with. It ends at its deadline (`run.stall_timeout_s`, not counted as a stall) or on a stop; its errors are
counted and never stop the run.

Fates of the run's actors, as the driver sees them:
    generation actor   restarted by Ray; its in-flight prompts requeued           (orchestrator.py)
    learner worker     restarted by Ray Train from the newest checkpoint; its taken batch requeued
    replay buffer      lost: the learner checkpoints (buffered groups regenerate on resume), run stops
    report queue       lost: the learner stops, checkpoints with the reports it could not deliver; the
                       driver completes that checkpoint from them (`salvage`), the run stops
    judge stats board  restarted by Ray; the replicas' cumulative counters refill it

Like the orchestrator it talks only to the seams of `core/seams.py`, so tests drive it with fakes.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from core.config import Config
from core.records import (
    CheckpointWritten,
    JudgeStats,
    LearnerFinished,
    LearnerReport,
    LearnerStarted,
    LearnerStep,
    Prompt,
    Sampling,
    ScoredGroup,
)
from core.seams import Buffer, Generator, MetricsSink, PeerLost, ReportSource, Scorer
from perception_r1 import run_checkpoints
from perception_r1.orchestrator import DispatchSettings, Orchestrator
from perception_r1.step_metrics import buffer_metrics, generation_metrics, judge_metrics
from perception_r1.stream import PromptStream
from perception_r1.validation import Validation, Validator
from perception_r1.watchdog import Deadlines, Watchdog

log = logging.getLogger("perception_r1")
DRAIN_S = 10.0
"""How long a stopping run waits for its in-flight generation calls (and their scoring) before cancelling them."""


class Session:
    def __init__(self, cfg: Config, *, stream: PromptStream, generators: list[Generator], scorer: Scorer,
                 buffer: Buffer, reports: ReportSource, sinks: MetricsSink, start_version: int,
                 buffered: list[ScoredGroup], ledger: Path, checkpoint_root: Path | None = None,
                 validation_prompts: list[Prompt] = ()) -> None:
        self.cfg, self.stream, self.generators, self.scorer, self.buffer = cfg, stream, generators, scorer, buffer
        self.reports, self.sinks, self.version, self.buffered = reports, sinks, start_version, buffered
        self.ledger = ledger
        """`trained.jsonl`: one line per learner step, the stream positions and prompt ids it trained (audit, resume checks)."""
        self.checkpoint_root = checkpoint_root
        self.pending_checkpoints: dict[str, run_checkpoints.DriverState] = {}
        """Snapshots the learner is writing in the background: this driver's state as of each one's step."""
        self.session_id = f"{os.getpid()}-{int(time.time())}"
        settings = DispatchSettings(prompts_per_call=cfg.rollout.prompts_per_call,
                                    inflight_sequences_per_actor=cfg.rollout.inflight_target,
                                    samples_per_prompt=cfg.rollout.samples_per_prompt,
                                    drop_uniform_groups=cfg.buffer.drop_uniform_groups)
        self.orchestrator = Orchestrator(stream=stream, generators=generators, scorer=scorer, buffer=buffer,
                                         settings=settings)
        self.stop_requested = False
        self.fatal = ""
        """Why the run cannot go on (a deadline passed, no usable prompt, a needed actor died); empty if it can."""
        self.reports_lost = False
        self.watchdog = Watchdog(Deadlines(startup_s=cfg.run.startup_timeout_s, stall_s=cfg.run.stall_timeout_s,
                                           stop_s=cfg.run.stop_timeout_s))
        self.steps_logged = 0
        self.learner_starts = 0
        self.history: list[tuple[float, dict[str, float]]] = []
        """(wall time, metrics) of every logged step, for benchmarks and the run summary."""
        self.judge_before = JudgeStats()
        self.window_start = time.perf_counter()
        self.progress = None
        self.buffer_closed = False
        self.validator = self._validator(validation_prompts)
        self.validating: tuple[asyncio.Task, int] | None = None
        """The latest validation: (its task, the step it validates)."""
        self.validations: list[tuple[int, dict[str, float]]] = []
        """(step, val/* metrics) of every validation logged."""

    def _validator(self, prompts: list[Prompt]) -> Validator | None:
        v, r = self.cfg.validation, self.cfg.rollout
        if not v.every_steps:
            return None
        assert prompts, "validation.every_steps > 0 needs held-out prompts (validation.split): the buffer holds for them"
        sampling = Sampling(n=1, temperature=0.0, top_p=1.0, max_new_tokens=v.max_new_tokens or r.max_new_tokens,
                            seed=self.cfg.run.seed)
        return Validator(prompts=prompts[:v.max_prompts], generators=self.generators, scorer=self.scorer,
                         sampling=sampling, prompts_per_call=r.prompts_per_call, counters=self.counters())

    def request_stop(self) -> None:
        if not self.stop_requested:
            log.warning("stop requested: closing the buffer; the learner checkpoints and exits"
                        if self.learner_starts else "stop requested before the learner is up: ending now")
        self.stop_requested = True
        self.watchdog.stopping()

    def fail(self, cause: str) -> None:
        """Stop the run for `cause` (kept: the first cause is the one reported)."""
        if not self.fatal:
            self.fatal = cause
            log.error("%s", cause)
        self.request_stop()

    def counters(self) -> Counter[str]:
        return self.orchestrator.counters

    async def run(self, *, learner_alive: Callable[[], bool]) -> None:
        dispatch = asyncio.get_running_loop().create_task(self._dispatch())
        dispatch.add_done_callback(self._dispatch_ended)
        try:
            await self._report_loop(learner_alive)
        finally:
            self.orchestrator.stop()
            await self._close_down(dispatch)

    async def _dispatch(self) -> None:
        await self._readmit()  # waits for the learner's first version: under the report loop's deadlines
        await self.orchestrator.run()

    def _dispatch_ended(self, task: asyncio.Task) -> None:
        if not task.cancelled() and isinstance(task.exception(), PeerLost):
            self.fail(f"{task.exception()}; the run stops")

    async def _close_down(self, dispatch: asyncio.Task) -> None:
        await self._end_validation(wait=True)
        stats = await self._peer(self.buffer.stats(), None)
        if stats is not None:
            self.sinks.log_dict({str(k): v for k, v in sorted(stats.taken_staleness.items())},
                                artifact_file="staleness_histogram.json")
        await self._close_buffer()
        dispatch.cancel()
        (outcome,) = await asyncio.gather(dispatch, return_exceptions=True)
        if isinstance(outcome, Exception) and not isinstance(outcome, PeerLost):
            log.error("the dispatch loop failed: %r", outcome)
        await self.orchestrator.drain(timeout_s=DRAIN_S)
        if self.progress is not None:
            self.progress.close()

    async def _readmit(self) -> None:
        """Groups that waited in the buffer at the checkpoint go back in first (still fresh ones only)."""
        for scored in self.buffered:
            if not await self.buffer.reserve(1):
                break  # closed: the run is stopping
            if await self.buffer.put(scored):
                self.stream.claim(scored.group.seq)
        self.buffered = []

    async def _report_loop(self, learner_alive: Callable[[], bool]) -> None:
        while True:
            self._watch()
            if self.stop_requested:
                await self._close_buffer()  # first: the learner must not train on once a validation's hold ends
                await self._end_validation()
                if not self.learner_starts or self.watchdog.overdue(learner_up=True) == "stop":
                    return  # nothing to save yet, or the learner had its time
            if self.reports_lost:  # no report can come: wait for the learner to end, then salvage
                if not learner_alive():
                    return await self._salvage()
                await asyncio.sleep(0.5)
                continue
            try:
                report = await self.reports.get(timeout_s=0.5)
                if report is None:
                    if not learner_alive() and await self.reports.empty():
                        return
                    continue
                await self._on_report(report)
            except PeerLost as e:
                self.reports_lost = self.reports_lost or e.peer == PeerLost.REPORTS
                self.fail(f"{e}; the run stops")

    def _watch(self) -> None:
        if self.orchestrator.fatal:
            self.fail(self.orchestrator.fatal)
        phase = self.watchdog.overdue(learner_up=self.learner_starts > 0)
        if phase == "stall" and self._validation_running():
            phase = ""  # the validation holds the learner back; it has its own deadline
        if phase == "startup":
            self.fail(f"the learner did not come up within run.startup_timeout_s={self.cfg.run.startup_timeout_s:g}s "
                      "(Ray Train could not place or start its workers, or the model load hangs; see the learner's "
                      "log lines above); fix that, or raise run.startup_timeout_s")
        elif phase == "stall":
            self.fail(self._stall_cause())
        elif phase == "stop" and not self.fatal:
            self.fatal = (f"the learner did not end within run.stop_timeout_s={self.cfg.run.stop_timeout_s:g}s of the "
                          "stop; the steps since the last complete checkpoint are lost")
            log.error("%s", self.fatal)

    def _stall_cause(self) -> str:
        waited = f"no learner step for {self.watchdog.since_progress():.0f}s (run.stall_timeout_s)"
        oldest = self.orchestrator.oldest_call()
        if oldest is not None and time.monotonic() - oldest[1] > self.cfg.run.stall_timeout_s / 2:
            return (f"{waited}: generation actor {oldest[0]} has had a call in flight for "
                    f"{time.monotonic() - oldest[1]:.0f}s (a stalled engine); the run stops")
        c = self.orchestrator.counters
        if c["skipped_prompts"] and not self.orchestrator.num_scored:
            return f"{waited}: every generate call was refused or failed ({c['skipped_prompts']} prompts skipped)"
        return (f"{waited}: the learner holds no step's worth of admissible groups or does not finish its step "
                f"(groups scored so far {self.orchestrator.num_scored}, dropped uniform {c['dropped_uniform']}, "
                f"evicted {c['evicted_at_put']}); see the learner's log lines above")

    async def _close_buffer(self) -> None:
        if not self.buffer_closed:
            self.buffer_closed = True
            await self._peer(self.buffer.close(), None)

    async def _peer(self, call, default):
        """`await call`, or `default` (and the run stops) when the peer is gone."""
        try:
            return await call
        except PeerLost as e:
            self.fail(f"{e}; the run stops")
            return default

    async def _on_report(self, report: LearnerReport) -> None:
        self.watchdog.progress()
        if isinstance(report, LearnerStarted):
            await self._on_learner_start(report.version)
            return
        if isinstance(report, CheckpointWritten):
            await self._on_checkpoint_written(report)
            return
        self.stream.resolve(await self._peer(self.buffer.pop_evicted_seqs(), []))
        if isinstance(report, LearnerStep):
            await self._on_step(report)
            if report.checkpoint_path:  # being written: complete it with this state once CheckpointWritten comes
                self.pending_checkpoints[report.checkpoint_path] = await self._driver_state(report.version)
        else:
            assert isinstance(report, LearnerFinished), type(report)
            if report.checkpoint_path:  # written before the report
                await self._complete_checkpoint(Path(report.checkpoint_path), version=report.version)

    async def _on_checkpoint_written(self, report: CheckpointWritten) -> None:
        state = self.pending_checkpoints.pop(report.path, None)
        if state is None:
            log.error("the learner wrote checkpoint %s, which no step report of this learner announced; not "
                      "completing it", report.path)
            return
        await self._complete(Path(report.path), state,
                             note=f"; written in the background, {report.nbytes / 2**30:.2f} GiB in {report.seconds:.1f}s")

    async def _on_step(self, report: LearnerStep) -> None:
        self._append_ledger(report)
        self.stream.resolve(report.seqs)
        self.version = report.version
        metrics = await self._step_metrics(report)
        self.sinks.log_metrics(report.step, metrics)
        self.history.append((time.perf_counter(), metrics))
        self.steps_logged += 1
        every = self.cfg.tracking.log_rollouts_every
        if every and report.step % every == 0 and self.orchestrator.recent:
            self.sinks.log_table(rollout_table(self.orchestrator.recent[-1]),
                                 artifact_file=f"rollouts/step_{report.step:06d}.json")
        if self._validation_due(report.version):
            await self._start_validation(report.version)
        if self.progress is not None:
            self.progress.update(1)
            self._show_progress(metrics)

    def _show_progress(self, metrics: dict[str, float]) -> None:
        postfix = {"reward": f"{metrics.get('reward/total', 0):.3f}",
                   "samples_s": f"{metrics.get('throughput/samples_per_s', 0):.2f}"}
        if self.validations:
            postfix["val_acc"] = f"{self.validations[-1][1].get('val/accuracy', float('nan')):.3f}"
        self.progress.set_postfix(postfix)

    async def _on_learner_start(self, version: int) -> None:
        """The learner's first report after each (re)start. The queue is FIFO, so every report of a dead
        learner is in the ledger by now: of the batch it had taken, the seqs not trained go back to the stream."""
        self.learner_starts += 1
        if self.learner_starts == 1:
            self.window_start = time.perf_counter()  # start-up is not part of the first step's time
            log.info("start-up done: the learner is up at version %d; training", version)
            self.progress = _progress(self.cfg, version)
            if self._validation_due(version, first=True):
                await self._start_validation(version)
            return
        lost = [seq for seq in await self._peer(self.buffer.pop_lost_seqs(), []) if seq in self.stream.outstanding]
        self.stream.requeue(lost)
        self.pending_checkpoints.clear()  # a dead learner's snapshots are never reported written
        self.counters()["learner_restarts"] += 1
        self.counters()["lost_with_learner"] += len(lost)
        log.warning("the learner restarted from its newest checkpoint at version %d (was at %d); %d groups it had "
                    "taken but not trained were requeued", version, self.version, len(lost))
        self.version = version

    # ------------------------------------------------------------------------------------- validation
    def _validation_due(self, version: int, *, first: bool = False) -> bool:
        """Before the first step (of this session), every `every_steps` versions and at the last step."""
        if self.validator is None or self.stop_requested:
            return False
        return first or version % self.cfg.validation.every_steps == 0 or version == self.cfg.run.num_steps

    def _validation_running(self) -> bool:
        return self.validating is not None and not self.validating[0].done()

    async def _start_validation(self, step: int) -> None:
        if self._validation_running():
            self.counters()["val_skipped_busy"] += 1
            log.warning("validation of step %d skipped: the one of step %d still runs", step, self.validating[1])
            await self._peer(self.buffer.validated(step), None)
            return
        task = asyncio.get_running_loop().create_task(self._validate(step))
        task.add_done_callback(self._validation_ended)
        self.validating = (task, step)

    def _validation_ended(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:  # a bug, not a validation error: counted
            self.counters()["val_task_errors"] += 1
            log.error("the validation failed: %r; training goes on", task.exception())

    async def _validate(self, step: int) -> None:
        try:
            result = await asyncio.wait_for(self.validator.run(), timeout=self.cfg.run.stall_timeout_s)
        except asyncio.TimeoutError:
            self.counters()["val_timeouts"] += 1
            log.warning("the validation of step %d did not end within run.stall_timeout_s=%gs (a stalled generation "
                        "actor or judge?); skipped, training goes on", step, self.cfg.run.stall_timeout_s)
            return
        finally:
            self.watchdog.progress()  # the learner was held back until now: its stall clock starts over
            if not self.stop_requested:  # stopping: the buffer is closed, the learner checkpoints and ends
                await self._peer(self.buffer.validated(step), None)
        self._log_validation(result, step=step)

    def _log_validation(self, result: Validation, *, step: int) -> None:
        version = result.version(default=step)
        if version != step:
            log.warning("the validation of step %d decoded with the weights of version %d (the learner moved on); "
                        "logged at step %d", step, version, version)
        metrics = result.metrics()
        self.sinks.log_metrics(version, metrics)
        self.validations.append((version, metrics))
        if self.progress is not None:
            self._show_progress(self.history[-1][1] if self.history else {})

    async def _end_validation(self, *, wait: bool = False) -> None:
        """Cancel the running validation; `wait`: let it finish first (the run's last one), unless a stop comes
        or `run.stop_timeout_s` passes."""
        if self.validating is None:
            return
        task = self.validating[0]
        deadline = time.monotonic() + self.cfg.run.stop_timeout_s
        while wait and not task.done() and not self.stop_requested and time.monotonic() < deadline:
            await asyncio.wait({task}, timeout=0.5)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    def _append_ledger(self, report: LearnerStep) -> None:
        line = {"session": self.session_id, "step": report.step, "version": report.version, "seqs": list(report.seqs),
                "prompt_ids": [self.stream.prompt_at(seq).id for seq in report.seqs]}
        with open(self.ledger, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")

    async def _step_metrics(self, report: LearnerStep) -> dict[str, float]:
        now = time.perf_counter()
        wall, self.window_start = now - self.window_start, now
        gen = await asyncio.gather(*[g.stats() for g in self.generators], return_exceptions=True)
        judge_now = await self._judge_stats()
        metrics = dict(report.metrics)
        metrics.update(generation_metrics([g for g in gen if not isinstance(g, BaseException)], wall_seconds=wall))
        metrics.update(judge_metrics(judge_now, self.judge_before))
        buffer = await self._peer(self.buffer.stats(), None)
        if buffer is not None:
            metrics.update(buffer_metrics(buffer))
        metrics.update({f"driver/{k}": float(v) for k, v in self.orchestrator.counters.items()})
        n = self.cfg.learner.prompts_per_step * self.cfg.rollout.samples_per_prompt
        metrics["throughput/samples_per_s"] = n / max(wall, 1e-9)
        metrics["throughput/step_wall_seconds"] = wall
        self.judge_before = judge_now
        return metrics

    async def _judge_stats(self) -> JudgeStats:
        """The judge's counters; on failure (its statistics board restarting) the last ones: metrics only."""
        try:
            return await self.scorer.stats()
        except Exception as e:  # noqa: BLE001 -- metrics-only: never stops the run
            self.counters()["judge_stats_unavailable"] += 1
            log.warning("judge statistics unavailable this step (%s: %s); training goes on", type(e).__name__, e)
            return self.judge_before

    async def _salvage(self) -> None:
        """The report queue died: the learner stopped and checkpointed with the step reports it could not
        deliver. Log those steps, then complete that checkpoint, so nothing trained is lost or trained twice."""
        found = run_checkpoints.unfinished_with_reports(self.checkpoint_root) if self.checkpoint_root else None
        if found is None:
            log.error("no checkpoint of the learner's last steps to salvage; the steps since the last complete "
                      "checkpoint are lost")
            return
        tmp, reports = found
        if any(r.step != v for r, v in zip(reports, range(self.version, self.version + len(reports)))):
            log.error("checkpoint %s does not follow version %d; not completing it", tmp, self.version)
            return
        for report in reports:
            await self._on_step(report)
        await self._complete_checkpoint(tmp, version=self.version)

    async def _complete_checkpoint(self, tmp: Path, *, version: int) -> None:
        await self._complete(tmp, await self._driver_state(version))

    async def _driver_state(self, version: int) -> run_checkpoints.DriverState:
        """What a checkpoint of `version` stores of the driver: the stream's position, the buffered groups."""
        buffered = await self._peer(self.buffer.buffered(), [])
        return run_checkpoints.DriverState(version=version, stream=self.stream.state(), buffered=buffered)

    async def _complete(self, tmp: Path, state: run_checkpoints.DriverState, *, note: str = "") -> None:
        final = run_checkpoints.complete(tmp, state, keep=self.cfg.checkpoint.keep)
        self.sinks.log_checkpoint(str(final), version=state.version)
        log.info("checkpoint %s complete (version %d, %d buffered groups%s)", final, state.version,
                 len(state.buffered), note)


def _progress(cfg: Config, start: int):
    if not cfg.tracking.progress_bar:
        return None
    from tqdm import tqdm

    return tqdm(total=cfg.run.num_steps, initial=start, desc="train", unit="step", dynamic_ncols=True)


def rollout_table(scored: ScoredGroup) -> dict[str, list]:
    """One group's rollouts as an mlflow table: the image, the response, each reward and the verdicts."""
    from PIL import Image

    group = scored.group
    image = Image.open(io.BytesIO(group.prompt.image)).convert("RGB")
    rows = list(zip(group.rollouts, scored.rewards))
    return {
        "image": [image] * len(rows), "prompt_id": [group.prompt.id] * len(rows),
        "problem": [group.prompt.problem] * len(rows), "answer": [group.prompt.answer] * len(rows),
        "annotations": ["\n".join(group.prompt.annotations)] * len(rows),
        "response": [r.text for r, _ in rows], "policy_version": [r.min_version for r, _ in rows],
        "accuracy": [b.accuracy for _, b in rows], "format": [b.format for _, b in rows],
        "repetition": [b.repetition for _, b in rows], "visual": [b.visual for _, b in rows],
        "total": [b.total for _, b in rows], "verdicts": [" ".join(f"{v:g}" for v in b.verdicts) for _, b in rows],
        "judge_failed": [b.judge_failed for _, b in rows],
    }
