"""The seams where roles meet, as Protocols. Each is the interface its caller is typed against:
Ray actor handles fit them through thin adapters (`perception_r1/adapters.py` for the driver,
`learner/worker.py` for the learner), and tests drive the callers with in-process fakes.

    driver loop (perception_r1/)
      ├─ Prompt ──> Generator.stream ────> RolloutGroup ──> Scorer.score ──> ScoredGroup ──> Buffer.put
      │             (actors/: an Engine behind a Ray actor)  (judge/ on Serve)                 (replay/)
      └─ ReportSource.get <── LearnerReport <── ReportSink.put ── learner (learner/, rank 0)
                                                                   │ BatchSource.take / publish_version
                                                                   └─> WeightReceiver (each generation actor)
      └─ MetricsSink (mlflow, Ray dashboard, console): one row of metrics per learner step

Failures cross the seams as the exceptions below, not as Ray's: the driver's loop knows nothing of Ray.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Protocol

from core.records import (
    BufferStats,
    GenerationStats,
    JudgeStats,
    LearnerReport,
    Prompt,
    RolloutGroup,
    Sampling,
    ScoredGroup,
    TrainBatch,
    WeightGroupSpec,
    WeightManifest,
)


class PromptsRefused(ValueError):
    """The engine refused a call's prompts (over `data.max_prompt_tokens`, an image it cannot use):
    retrying cannot help, so they are skipped and counted."""


class GeneratorLost(RuntimeError):
    """The generation actor died or became unreachable during the call: its prompts are requeued."""


class PeerLost(RuntimeError):
    """An actor the run cannot go on without (the replay buffer, the learner's report queue) died; the
    message names it. The driver stops the run, keeping what is safe (see perception_r1/session.py)."""

    BUFFER, REPORTS = "replay buffer", "report queue"

    def __init__(self, peer: str, detail: str) -> None:
        super().__init__(f"the {peer} actor died ({detail})")
        self.peer = peer


# ------------------------------------------------------------------------------------ generation
class Engine(Protocol):
    """What a generation actor needs from HF `generate` (CPU) or vLLM (GPU). Weight updates come through
    the same seam, because where the bytes land differs: the HF engine stages received tensors and swaps
    them in at the next safe point (between generate calls); the vLLM engine receives inside its worker
    processes and pauses scheduling for the swap, so in-flight requests carry both versions."""

    def generate(self, prompts: Sequence[Prompt], *, sampling: Sampling, actor_id: int) -> list[RolloutGroup]:
        """n rollouts per prompt, each stamped with the version(s) of the weights that produced it.
        Raises ValueError for prompts it refuses."""

    def stream(self, prompts: Sequence[Prompt], *, sampling: Sampling,
               actor_id: int) -> Iterator[tuple[int, RolloutGroup]]:
        """`generate`'s groups as (index in `prompts`, group), each as soon as it is done (completion order).
        A refused prompt raises ValueError when its turn comes."""

    @property
    def version(self) -> int:
        """The policy_version of the weights that generate() uses now."""

    def join_weight_group(self, spec: WeightGroupSpec) -> None:
        """Join the learner's broadcast group (blocks until every rank joined)."""

    def receive_weights(self, manifest: WeightManifest) -> None:
        """Take part in one broadcast; may run concurrently with generate()."""

    def apply_staged_weights(self) -> bool:
        """At a safe point: swap in weights received since the last call. True if the version changed."""

    def weight_samples(self, suffixes: Sequence[str]) -> dict[str, list]:
        """`core.weights.weight_corners` of the engine's weights by (HF) name suffix: after a sync they
        equal the learner's (health checks and tests)."""

    @property
    def sync_ranks(self) -> int:
        """Ranks this engine takes in the weight broadcast group (its tensor-parallel workers)."""

    def gpu_uuids(self) -> list[str]:
        """The UUID of each GPU its workers run on ([] on CPU): a learner on one of them hands weights over
        by CUDA IPC."""


class Generator(Protocol):
    """A generation actor as the driver's loop calls it."""

    async def generate(self, prompts: Sequence[Prompt], *, sampling: Sampling | None = None) -> list[RolloutGroup]:
        """One group per prompt, in order; `sampling`: this call's (validation's greedy decoding), else the
        actor's own. Raises PromptsRefused or GeneratorLost."""

    def stream(self, prompts: Sequence[Prompt]) -> AsyncIterator[tuple[int, RolloutGroup]]:
        """(index in `prompts`, group) as each group finishes, with the actor's own sampling. Raises
        PromptsRefused or GeneratorLost when it happens: the prompts not yielded by then have no group."""

    async def stats(self) -> GenerationStats:
        """What the actor did since the previous call."""


class WeightReceiver(Protocol):
    """The receiving end of the weight broadcast: each generation actor, as the learner calls it."""

    def sync_ranks(self) -> int:
        """Ranks it takes in the broadcast group."""

    def gpu_uuids(self) -> list[str]:
        """The UUIDs of the GPUs its engine runs on."""

    def join_weight_group(self, spec: WeightGroupSpec) -> None:
        """Join the group (ranks spec.rank..); returns once every rank joined."""

    def weight_group_port(self) -> int:
        """The port of the group joined; 0 when none (an actor Ray just restarted)."""

    def receive_weights(self, manifest: WeightManifest) -> int:
        """Take part in one broadcast (or, with `manifest.ipc`, read the learner's buffer on this GPU); the
        weights apply at the next safe point. Returns the version staged."""


# --------------------------------------------------------------------------------------- scoring
class Scorer(Protocol):
    """Attaches rewards to a group: the judge app, through its Serve handle."""

    async def score(self, group: RolloutGroup) -> ScoredGroup:
        """Rule rewards and judge verdicts of every rollout; a failed judgement is a counted fallback."""

    async def stats(self) -> JudgeStats:
        """The judge's cumulative counters, summed over replicas."""


# ---------------------------------------------------------------------------------------- buffer
class Buffer(Protocol):
    """The replay buffer as the driver's loop sees it (`replay/buffer.py` states the rules)."""

    async def reserve(self, n: int) -> bool:
        """Wait for room for n groups (staleness window, capacity); False once the buffer is closed."""

    async def release(self, n: int) -> None:
        """Give back n reservations whose groups will never be put (failed, refused, dropped)."""

    async def put(self, scored: ScoredGroup) -> bool:
        """Admit a reserved group; False if it was already too stale (evicted, counted)."""

    async def close(self) -> None:
        """Wake every waiter: reserve() and take() return at once from now on."""

    async def stats(self) -> BufferStats: ...

    async def validated(self, version: int) -> None:
        """The validation of `version` ended: the learner may take its next batch (validation.py)."""

    async def pop_evicted_seqs(self) -> list[int]:
        """Stream positions evicted since the last call."""

    async def pop_lost_seqs(self) -> list[int]:
        """Stream positions a dead learner had taken, since the last call."""

    async def buffered(self) -> list[ScoredGroup]:
        """Every group still buffered, oldest first (a checkpoint's snapshot)."""


class BatchSource(Protocol):
    """The replay buffer as the learner sees it."""

    def take(self, k: int, *, step: int) -> TrainBatch | None:
        """The next k admissible groups (waits for them); None once the run is closing."""

    def publish_version(self, learner_version: int, synced_version: int) -> None:
        """The learner is at `learner_version`; the actors hold `synced_version` (opens the window)."""

    def learner_started(self, version: int) -> None:
        """A learner (re)started at `version`: a restart rewinds the buffer to it."""


# --------------------------------------------------------------------------------------- reports
class ReportSink(Protocol):
    """Where learner rank 0 sends its reports (a Ray queue; FIFO)."""

    def put(self, report: LearnerReport) -> None: ...


class ReportSource(Protocol):
    """The driver's end of the report queue."""

    async def get(self, *, timeout_s: float) -> LearnerReport | None:
        """The next report, or None when none came within timeout_s."""

    async def empty(self) -> bool: ...


# --------------------------------------------------------------------------------------- metrics
class MetricsSink(Protocol):
    """Where the driver sends each step's metrics and the run's artifacts (mlflow, the Ray dashboard,
    the console); a sink with no use for one of them implements it as a no-op."""

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None: ...

    def log_dict(self, data: dict, *, artifact_file: str) -> None: ...

    def log_table(self, table: dict[str, list], *, artifact_file: str) -> None: ...

    def log_checkpoint(self, path: str, *, version: int) -> None: ...

    def close(self, *, status: str) -> None: ...
