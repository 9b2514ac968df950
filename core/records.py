"""Typed records that cross process boundaries: prompt -> rollout group -> scored group -> train batch,
and what the roles report about themselves (learner reports, buffer, generation and judge counters);
also the type check every dataset and benchmark reader runs on a row's text fields (`text_field`).

Every record is a dataclass, frozen except the judge's counters. Token ids and logprobs are numpy
arrays (cheap to pickle into the Ray object store, encoded as raw bytes by `core.codec` where records
leave Ray). Every record that carries model output carries the `policy_version` of the weights that
produced it.

    Prompt ──(actors/)──> RolloutGroup ──(judge/)──> ScoredGroup ──(replay/)──> TrainBatch ──> learner/
    learner/ ──LearnerStarted | LearnerStep | CheckpointWritten | LearnerFinished──> driver (perception_r1/)
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from decimal import Decimal

import numpy as np

IMAGE_PLACEHOLDER = "<image>"
"""Where a prompt's image goes in its `problem` text (exactly once)."""


@dataclass(frozen=True, slots=True)
class Prompt:
    """One problem: an image, a question about it, the answer, and what the image shows."""

    id: str
    """Stable id, unique within the dataset (e.g. `geo3k-00017`); resume and McNemar pair by it."""
    index: int
    """Position in the dataset's canonical order (0-based); the data iterator's cursor refers to it."""
    problem: str
    """Question text with exactly one `<image>` placeholder where the image goes."""
    answer: str
    """Ground-truth final answer as the dataset stores it (raw string, e.g. `24` or `2\\sqrt{3}`)."""
    image: bytes
    """The image, encoded (PNG or JPEG bytes)."""
    annotations: tuple[str, ...] = ()
    """Visual annotations v_1..v_m: short sentences of what the image shows. Empty: no visual reward."""
    solution: str = ""
    """A worked solution in the method's format (SFT targets); empty when the dataset has none."""


def render_annotations(items: tuple[str, ...] | list[str]) -> str:
    """The reference's `visual_key_info` string: `<info1>a</info1>\n<info2>b</info2>` (docs/method.md §3.3, §8.5)."""
    return "\n".join(f"<info{k}>{item}</info{k}>" for k, item in enumerate(items, start=1))


def parse_annotations(text: str) -> tuple[str, ...]:
    """Inverse of `render_annotations`: the items of a `visual_key_info` string, in tag order.

    Reads <info1>, <info2>, ... and stops at the first missing number; text outside tags is ignored.
    """
    items = []
    for k in range(1, 10_000):
        m = re.search(rf"<info{k}>(.*?)</info{k}>", text, re.DOTALL)
        if m is None:
            break
        items.append(m.group(1).strip())
    return tuple(items)


class BadField(ValueError):
    """A dataset or benchmark row's field that cannot become a `Prompt` field. `reason` is the slug a
    loader counts the skipped row under, `detail` says what is wrong naming the field, `fix` what to do."""

    def __init__(self, reason: str, detail: str, fix: str) -> None:
        super().__init__(f"{detail}; {fix}")
        self.reason, self.detail, self.fix = reason, detail, fix


def text_field(value: object, name: str, *, numbers: bool = False) -> str:
    """A row's text field (`problem`, `answer`, an annotation, ...) as text, checked by type.

    A string as is; UTF-8 bytes decoded (parquet binary columns); None and NaN (pandas' null) as "".
    With `numbers`, an int, a decimal or a finite float becomes its text (`12`, `2.5`). Anything else, a
    list, an object, a boolean, raises BadField (`wrong_type`) rather than becoming its Python text
    (`['3']`, `True`), which no response would ever match.
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadField("not_utf8", f"{name} is not UTF-8 ({e.reason} at byte {e.start})",
                           "re-encode the text as UTF-8") from None
    if numbers and _is_finite_number(value):
        return str(value)
    wanted = "a string or a number" if numbers else "a string"
    raise BadField("wrong_type", f"{name} is {describe_type(value)}", f"{name} must be {wanted}")


def _is_finite_number(value: object) -> bool:
    if isinstance(value, bool):  # a subclass of int, but `True` is no answer
        return False
    if isinstance(value, int):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, Decimal) and value.is_finite()


def describe_type(value: object) -> str:
    """`a list (['3', '4'])`: a value's JSON kind and a short preview, for an error message."""
    kinds = {bool: "a boolean", list: "a list", tuple: "a list", dict: "an object", str: "a string",
             bytes: "bytes", int: "a number", float: "a number", Decimal: "a number"}
    preview = repr(value)
    preview = preview if len(preview) <= 40 else preview[:37] + "..."
    return f"{kinds.get(type(value), type(value).__name__)} ({preview})"


@dataclass(frozen=True, slots=True)
class Sampling:
    """How a generation call samples; temperature 0 means greedy (evaluation)."""

    n: int
    """Rollouts per prompt (the GRPO group size)."""
    temperature: float
    top_p: float
    max_new_tokens: int
    seed: int = 0


@dataclass(frozen=True, slots=True)
class Rollout:
    """One sampled completion of a prompt."""

    token_ids: np.ndarray
    """int32 [T]: completion tokens up to and including the first EOS (T <= max_new_tokens)."""
    logprobs: np.ndarray
    """float32 [T]: behaviour logprob of each token under the distribution it was sampled from."""
    text: str
    """The completion decoded with `skip_special_tokens=True` (what the rewards read)."""
    finish_reason: str
    """`stop` (ended with EOS) or `length` (hit max_new_tokens)."""
    min_version: int
    """Oldest policy_version whose weights produced any token of this rollout."""
    max_version: int
    """Newest policy_version whose weights produced any token (> min_version after an in-flight update)."""

    def __post_init__(self) -> None:
        assert self.token_ids.shape == self.logprobs.shape, (self.token_ids.shape, self.logprobs.shape)
        assert self.min_version <= self.max_version


@dataclass(frozen=True, slots=True)
class RolloutGroup:
    """The n rollouts of one prompt, sampled by one generation actor."""

    prompt: Prompt
    prompt_token_ids: np.ndarray
    """int32 [P]: the chat-templated prompt as the policy saw it (image placeholder expanded)."""
    rollouts: tuple[Rollout, ...]
    actor_id: int
    """Which generation actor produced the group."""
    generate_seconds: float
    """Wall time of the generate call that produced the group."""
    seq: int = -1
    """Position of this prompt in the training stream (epochs concatenated), set by the driver;
    exactly-once accounting and resume use it (-1 outside training, e.g. evaluation)."""

    @property
    def policy_version(self) -> int:
        """The oldest weights that produced any token of the group: staleness is measured from it."""
        return min(r.min_version for r in self.rollouts)

    @property
    def num_completion_tokens(self) -> int:
        return sum(len(r.token_ids) for r in self.rollouts)


@dataclass(frozen=True, slots=True)
class RewardBreakdown:
    """The reward of one rollout, component by component (`judge/` computes it)."""

    accuracy: float
    """r_a in {0,1}: math-verify of the answer against the ground truth."""
    format: float
    """r_f in {0,1}: the full-match think/answer/boxed format rule."""
    repetition: float
    """r_p in [-2,0]: the 20-gram repetition penalty."""
    visual: float
    """r_v in [0,1]: the judge's perception score (0 when the prompt has no annotations)."""
    total: float
    """The scalar the learner trains on: w_a*r_a + w_f*r_f + w_p*r_p + w_v*r_v."""
    overall: float
    """The reference's `overall` metric: the total without the repetition term."""
    verdicts: tuple[float, ...] = ()
    """The judge's per-item scores s_1..s_K in the order of its tags (K may differ from m)."""
    judge_failed: bool = False
    """The judgement failed (unreachable, timed out, unparseable) and the fallback was used."""
    judge_error: str = ""
    """Why the judgement failed, for the metrics; empty when it succeeded."""


@dataclass(frozen=True, slots=True)
class ScoredGroup:
    """A rollout group with one reward breakdown per rollout."""

    group: RolloutGroup
    rewards: tuple[RewardBreakdown, ...]
    judge_seconds: float
    """Wall time spent scoring the group (rules and judge calls, concurrent)."""

    def __post_init__(self) -> None:
        assert len(self.rewards) == len(self.group.rollouts)

    @property
    def policy_version(self) -> int:
        return self.group.policy_version

    def totals(self) -> np.ndarray:
        """float32 [n]: the scalar reward of each rollout."""
        return np.asarray([r.total for r in self.rewards], dtype=np.float32)


@dataclass(frozen=True, slots=True)
class TrainBatch:
    """The groups of one learner step, each with its staleness when the buffer released it."""

    step: int
    """The learner step this batch is for (== learner policy_version when taken)."""
    groups: tuple[ScoredGroup, ...]
    staleness: tuple[int, ...]
    """learner_version - group.policy_version, per group; each <= max_staleness."""

    def __post_init__(self) -> None:
        assert len(self.groups) == len(self.staleness)


@dataclass(frozen=True, slots=True)
class WeightManifest:
    """What a weight broadcast carries, in order: both ends bucket tensors from it identically."""

    version: int
    """The policy_version the weights will carry once applied."""
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]
    """torch dtype names without the `torch.` prefix, e.g. `float32`, `bfloat16`."""
    bucket_bytes: int
    """Tensors are packed into flat buckets of at most this many bytes (one tensor may exceed it)."""
    ipc: IPCWeights | None = None
    """Set when the weights are not broadcast but lie in the learner's CUDA-IPC buffer on the receiver's GPU."""
    load: str = "layerwise"
    """How a vLLM engine takes a broadcast (config: sync.nccl_load): `layerwise` (vLLM's packed NCCL consumer
    and layer-wise reload) or `direct` (each bucket received into one persistent buffer, the copies the model's
    loaders made from it the first time replayed after); `wire` receives and drops (the benchmark's floor)."""


@dataclass(frozen=True, slots=True)
class CudaIPCHandle:
    """A CUDA tensor shared between processes: the fields of torch's `reduce_tensor` (`rebuild_cuda_tensor`'s
    arguments) as plain values, no pickle: a plain `torch.Tensor` over a `TypedStorage`."""

    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    dtype: str
    device: int
    """The sender's device index (the receiver substitutes its own for the same GPU)."""
    handle: bytes
    storage_size_bytes: int
    storage_offset_bytes: int
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes | None
    event_sync_required: bool


@dataclass(frozen=True, slots=True)
class IPCWeights:
    """Where an engine on the learner's GPU reads a weight update: one flat buffer holding the manifest's
    tensors back to back (no padding), shared by CUDA IPC."""

    handles: tuple[tuple[str, CudaIPCHandle], ...]
    """(GPU UUID, the buffer on that GPU), one per learner rank."""
    tensor_bytes: tuple[int, ...]
    """Bytes of each manifest tensor in the buffer, in order."""
    load: str
    """`direct` or `layerwise` (config: sync.ipc_load)."""


@dataclass(frozen=True, slots=True)
class WeightGroupSpec:
    """Where and how a generation actor joins the learner's weight broadcast group."""

    host: str
    port: int
    rank: int
    """1..N for actors (the learner is rank 0)."""
    world_size: int
    backend: str
    """`gloo` or `nccl`; `ipc` for an engine on the learner's GPU (no group: `port` only names the connection)."""
    timeout_s: float


@dataclass(frozen=True, slots=True)
class GenerationStats:
    """What one generation actor did since it was last asked (reduced by the driver per step)."""

    actor_id: int
    num_groups: int
    num_tokens: int
    busy_seconds: float
    version: int
    num_weight_updates: int = 0
    weight_apply_seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class LearnerStarted:
    """The learner's first report after each (re)start, once its weights are on every actor."""

    version: int
    """The policy_version it starts from (0, or the restored checkpoint's)."""


@dataclass(frozen=True, slots=True)
class LearnerStep:
    """What the learner reports after each optimizer step; the driver logs it."""

    step: int
    """The step just taken; the learner's policy_version is now step + 1."""
    version: int
    metrics: dict[str, float] = field(default_factory=dict)
    """Named scalars for this step (loss, grad_norm, lr, ratio stats, step and sync seconds, ...)."""
    seqs: tuple[int, ...] = ()
    """Stream positions (`RolloutGroup.seq`) of the groups trained in this step, in batch order."""
    checkpoint_path: str = ""
    """Set when the learner took a checkpoint snapshot at this step: the `step_<N>.tmp` folder it is being
    written into; a `CheckpointWritten` report follows once it is whole (the driver completes it then)."""


@dataclass(frozen=True, slots=True)
class CheckpointWritten:
    """A checkpoint snapshot is whole on disk (every rank's shards and learner.json). It follows the
    `LearnerStep` that took it; the driver completes the folder with its own state as of that step."""

    version: int
    path: str
    """The `step_<N>.tmp` folder, as that step's `LearnerStep.checkpoint_path` named it."""
    seconds: float
    """From the snapshot to the write's end (the step loop went on meanwhile)."""
    nbytes: int
    """The folder's size on disk."""


@dataclass(frozen=True, slots=True)
class LearnerFinished:
    """The learner's last report: it stopped (step budget met, or the buffer closed) at `version`."""

    version: int
    checkpoint_path: str = ""
    """The checkpoint it wrote at shutdown, whole on disk (empty when the last step's checkpoint already covers it)."""


LearnerReport = LearnerStarted | LearnerStep | CheckpointWritten | LearnerFinished
"""What travels on the report queue from learner rank 0 to the driver, in order."""


@dataclass(frozen=True, slots=True)
class BufferStats:
    """The replay buffer's counters and state (the driver logs them every step)."""

    depth: int
    bytes: int
    reserved: int
    num_put: int
    num_taken: int
    num_evicted: int
    num_released: int
    learner_version: int
    synced_version: int
    taken_staleness: dict[int, int] = field(default_factory=dict)
    """Histogram {staleness: groups} of every group taken so far."""


_JUDGE_FLAGS = ("breaker_open", "latency_p50_s", "latency_p99_s")


@dataclass(slots=True)
class JudgeStats:
    """The judge's counters: one type for every part that counts. The judge client (requests, cache,
    fallbacks, latency), the verifier pool (verifications) and the group scorer (groups) each count into
    their own; `merge` sums them, a reward replica reports the merge of its parts and the service the
    merge of its replicas; the driver differences two snapshots per step. Counters are cumulative."""

    num_groups: int = 0
    num_requests: int = 0
    """Judge LLM requests sent (cache hits excluded)."""
    num_cache_hits: int = 0
    num_timeouts: int = 0
    num_errors: int = 0
    num_unparseable: int = 0
    num_breaker_rejections: int = 0
    num_k_mismatch: int = 0
    """Judgements whose tag count K differed from the number of annotations m."""
    num_verify_calls: int = 0
    num_verify_timeouts: int = 0
    """Accuracy verifications that overran the timeout (scored 0)."""
    num_verify_crashes: int = 0
    """Accuracy verifications whose worker process died (scored 0)."""
    num_verify_restarts: int = 0
    breaker_open: bool = False
    latency_p50_s: float = 0.0
    latency_p99_s: float = 0.0

    @property
    def num_failures(self) -> int:
        """Judgements that fell back (after retries): timeouts + errors + unparseable + breaker rejections."""
        return self.num_timeouts + self.num_errors + self.num_unparseable + self.num_breaker_rejections

    @staticmethod
    def merge(parts: Sequence[JudgeStats]) -> JudgeStats:
        """Counters summed; the breaker open if any part's is; latency percentiles the worst part's."""
        out = JudgeStats()
        for f in fields(JudgeStats):
            values = [getattr(p, f.name) for p in parts]
            if f.name == "breaker_open":
                setattr(out, f.name, any(values))
            elif f.name in _JUDGE_FLAGS:
                setattr(out, f.name, max(values, default=0.0))
            else:
                setattr(out, f.name, sum(values))
        return out
