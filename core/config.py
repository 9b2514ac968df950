"""The one config schema: every YAML in `configs/` loads into `Config`, and each component gets its
own sub-config. Unknown keys, out-of-range values and impossible combinations fail here, at parse
time, with a message that names the field and the fix. Imports nothing heavy (`--help` stays fast).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import BaseModel, Field, model_validator

from core.config_base import Section
from core.config_colocation import colocation_problems
from core.config_judge import (  # noqa: F401 -- re-exported: the schema's judge sections live there
    ExternalJudgeConfig,
    JudgeConfig,
    LexicalJudgeConfig,
    RewardConfig,
    VLLMJudgeConfig,
)
from core.config_rollout import (  # noqa: F401 -- re-exported: the schema's rollout section lives there
    HFEngineConfig,
    RolloutConfig,
    VLLMEngineConfig,
)

FORMAT_PROMPT = (
    "You FIRST think about the reasoning process as an internal monologue and then provide the final answer. "
    "The reasoning process MUST BE enclosed within <think> </think> tags, and the answer process MUST BE "
    "enclosed within <answer> </answer> tags. The final answer MUST BE put in \\boxed{} in <answer> </answer> tags."
)
"""The reference's format prompt as the model sees it: one line (docs/method.md §2)."""


# ----------------------------------------------------------------------------------------------- run
class RunConfig(Section):
    name: str = "perception-r1"
    """Run name: the mlflow run name and the folder under `output_dir`."""
    seed: int = 0
    """Seed for data order, sampling and initialisation."""
    output_dir: str = "runs"
    """Where checkpoints, logs and the resolved config go (`<output_dir>/<name>/`)."""
    num_steps: int = Field(20, ge=1)
    """Learner steps (optimizer updates) to run."""
    startup_timeout_s: float = Field(900.0, gt=0)
    """The learner must be up (model loaded, first weights at the actors) within this; else the run stops
    naming the cause."""
    stall_timeout_s: float = Field(1800.0, gt=0)
    """The watchdog: when no learner step completes for this long, the run stops naming the cause (every
    prompt refused, a stalled generation actor, no admissible groups, the learner itself)."""
    stop_timeout_s: float = Field(600.0, gt=0)
    """After a stop request, the learner has this long to checkpoint and end before the driver gives up on it."""


class ClusterConfig(Section):
    address: str | None = None
    """Ray cluster to join (`auto`, `ray://…`, host:port). None: `RAY_ADDRESS` if set, else a local cluster."""
    num_cpus: int | None = Field(None, ge=1)
    """CPUs for a local cluster (None: all). Ignored when joining a running cluster."""
    num_gpus: int | None = Field(None, ge=0)
    """GPUs for a local cluster (None: all visible). Ignored when joining a running cluster."""
    dashboard_host: str = "127.0.0.1"
    """Where a local cluster's dashboard listens; loopback unless you mean to expose it."""
    include_dashboard: bool = True
    """Start the Ray dashboard with a local cluster (metrics at `/metrics`). It also serves Ray's state API:
    without it Ray Train's PlacementGroupCleaner (Ray 2.60) cannot watch the learner's controller and logs
    "Failed to query Ray Train Controller actor state" once a second for the whole run."""
    gpu_memory_gib: float | None = Field(None, gt=0)
    """Memory of one GPU, for the learner's memory estimate (perception_r1/memory_estimate.py). None: what
    nvidia-smi reports when a GPU is visible here, else 80 (an A100/H100 80 GB)."""


# --------------------------------------------------------------------------------------------- model
class TinyModelConfig(Section):
    type: Literal["tiny"] = "tiny"
    cache_dir: str = ".cache/tiny-qwen2_5_vl"
    """Where the tiny random Qwen2.5-VL is built once and then loaded by path like a real model."""
    hidden_size: int = Field(128, ge=16)
    num_layers: int = Field(2, ge=1)
    vocab_size: int = Field(1024, ge=300)
    """Upper bound on the BPE vocabulary trained on synthetic geometry text (the corpus needs ~555 tokens;
    the model's vocabulary equals the tokenizer's)."""
    seed: int = 0
    """Seed for the random weights."""


class PretrainedModelConfig(Section):
    type: Literal["pretrained"] = "pretrained"
    path: str
    """Local folder with config, weights, tokenizer and processor (nothing is downloaded at run time)."""
    random_weights: bool = False
    """Initialise from the folder's config with random weights instead of loading any (benchmarks at
    real scale without real weights; vLLM engines then use load_format `dummy`)."""


ModelConfig = Annotated[Union[TinyModelConfig, PretrainedModelConfig], Field(discriminator="type")]


# ---------------------------------------------------------------------------------------------- data
class SyntheticDataConfig(Section):
    type: Literal["synthetic"] = "synthetic"
    num_problems: int = Field(512, ge=1)
    seed: int = 0
    image_size: int = Field(224, ge=56, le=2048)
    """Side of the square diagram in pixels."""


class FileDataConfig(Section):
    type: Literal["file"] = "file"
    path: str
    """A parquet or JSONL file with `problem` (with `<image>`), `answer`, `images`, optional `visual_key_info`."""
    on_bad_row: Literal["skip", "raise"] = "skip"
    """Rows without an image or answer, undecodable images, bad text: skip and count them, or fail."""


class DataConfig(Section):
    dataset: Annotated[Union[SyntheticDataConfig, FileDataConfig], Field(discriminator="type")] = SyntheticDataConfig()
    format_prompt: str = FORMAT_PROMPT
    """Appended to each problem after one space (docs/method.md §2)."""
    min_pixels: int = Field(3136, ge=1)
    """Images smaller than this (w*h) are scaled up to it (docs/method.md §2)."""
    max_pixels: int = Field(1806336, ge=1)
    """Images larger than this (w*h) are scaled down to it (docs/method.md §2)."""
    max_prompt_tokens: int = Field(4096, ge=16)
    """Prompts longer than this are rejected with a counted skip."""
    shuffle_seed: int | None = 1
    """Shuffle the dataset with this seed each epoch (None: dataset order)."""

    @model_validator(mode="after")
    def _pixels(self) -> DataConfig:
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"data.min_pixels ({self.min_pixels}) exceeds data.max_pixels ({self.max_pixels}); swap them")
        return self


# -------------------------------------------------------------------------------------------- buffer
class BufferConfig(Section):
    max_staleness: int = Field(1, ge=0)
    """Train a group only while learner_version - group.policy_version <= this. 0: synchronous on-policy GRPO."""
    max_groups: int = Field(64, ge=1)
    """Scored groups held at most; producers wait (back-pressure) when full."""
    max_bytes: int = Field(1 << 30, ge=1 << 20)
    """Bytes of scored groups held at most; producers wait when over."""
    drop_uniform_groups: bool = False
    """Groups whose rewards are all equal (zero advantage) never enter the buffer: dropped and counted
    (`driver/dropped_uniform`), their prompts done, instead of being trained on."""


# ------------------------------------------------------------------------------------------- learner
class LossConfig(Section):
    type: Literal["grpo", "tis", "decoupled"] = "grpo"
    """`grpo`: on-policy clipped loss; `tis`: times a truncated behaviour importance weight;
    `decoupled`: clipped against the recomputed proximal policy, tokens over the behaviour cap masked (AReaL).
    Left out of a whole config: `tis` when `buffer.max_staleness > 0`, else `grpo` (`Config._async_loss_default`)."""
    allow_uncorrected_staleness: bool = False
    """Accept `grpo` with `buffer.max_staleness > 0`: stale samples then train with no correction (its ratio
    is taken against the learner's own recomputed log-probs, not the generator's)."""
    clip_low: float = Field(0.2, ge=0.0, lt=1.0)
    clip_high: float = Field(0.3, ge=0.0)
    dual_clip: float | None = Field(3.0, gt=1.0)
    """Dual-clip constant c for negative advantages (None disables)."""
    std_eps: float = Field(1e-6, gt=0.0)
    unbiased_std: bool = True
    """Group std with N-1 (the reference) or N."""
    normalize_std: bool = True
    """Divide advantages by the group std (False: Dr. GRPO style mean-centering only)."""
    aggregation: Literal["token_mean", "seq_mean"] = "token_mean"
    kl_coef: float = Field(0.0, ge=0.0)
    """KL(pi || ref) penalty weight (k3 estimator). > 0 loads a frozen reference model."""
    entropy_coef: float = Field(0.0, ge=0.0)
    tis_cap: float = Field(2.0, ge=1.0)
    """`tis`: importance weights pi_old/pi_behaviour are truncated at this value."""
    behaviour_cap: float = Field(5.0, ge=1.0)
    """`decoupled`: tokens whose pi_prox/pi_behaviour exceeds this are masked out."""


class OptimizerConfig(Section):
    lr: float = Field(1e-6, gt=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0.0)
    weight_decay: float = Field(1e-3, ge=0.0)
    grad_clip: float = Field(1.0, gt=0.0)
    warmup_steps: int = Field(0, ge=0)
    """Linear warmup from lr 0; the first update uses lr 0, as in the reference."""


class LearnerConfig(Section):
    num_workers: int = Field(1, ge=1)
    """Ray Train workers (FSDP2 ranks)."""
    num_gpus_per_worker: float = Field(0, ge=0, le=1)
    """0: CPU; 1: a GPU of its own; a fraction (e.g. 0.5): the worker shares its GPU with a vLLM generation
    actor (`rollout.num_gpus_per_actor` a fraction too), which receives weights through CUDA IPC."""
    gpu_memory_fraction: float | None = Field(None, gt=0.0, le=1.0)
    """The learner's share of its GPU's memory when it shares the GPU with a generation engine: torch's
    allocator is capped there, so the learner never takes the engine's part (an out-of-memory error names
    the fields instead). Needed with a fractional num_gpus_per_worker; None on a GPU of its own."""
    cpus_per_worker: float = Field(1.0, gt=0.0)
    """CPUs Ray reserves per worker (Ray Train needs a non-zero bundle; fractions are allowed)."""
    num_threads: int = Field(1, ge=1)
    """torch intra-op threads per worker on CPU."""
    prompts_per_step: int = Field(4, ge=1)
    """Groups per optimizer step (the reference: 128 prompts x 8 samples)."""
    max_restarts: int = Field(2, ge=0)
    """Ray Train restarts a failed learner worker group this many times, from the newest checkpoint."""
    num_minibatches: int = Field(1, ge=1)
    """Optimizer steps per batch (1 in the reference: one update per rollout)."""
    max_tokens_per_micro_batch: int = Field(16384, ge=64)
    """Sequences are packed into micro-batches of at most this many tokens (gradient accumulation)."""
    loss: LossConfig = LossConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    freeze_vision: bool = False
    """Freeze the vision tower (the reference trains it)."""
    gradient_checkpointing: bool = False
    """Recompute blocks' activations in the backward pass instead of keeping them (vision and text blocks)."""
    checkpoint_every: int = Field(1, ge=1)
    """With gradient_checkpointing: checkpoint every k-th block only (1: all; 2: half of them)."""
    compile_blocks: bool = False
    """torch.compile each vision and text block (dynamic shapes: packed rows vary in length)."""
    packing: Literal["auto", "always", "never"] = "auto"
    """Padding-free micro-batches (one packed row, varlen attention, log-probs from hidden states in
    chunks, one vision pass per prompt); `auto`: on GPUs, while on CPU a group's rollouts share one
    pass over the prompt (its KV cache) instead; `never`: the padded path everywhere."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Compute dtype (master weights and optimizer state stay fp32). bfloat16 needs GPUs."""
    attn_implementation: Literal["sdpa", "flash_attention_2", "eager"] = "sdpa"
    """Attention kernel; flash_attention_2 needs the `flash` extra."""


class SyncConfig(Section):
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """`auto`: nccl when the learner has GPUs, else gloo."""
    interval_steps: int = Field(1, ge=1)
    """Broadcast weights to the generation actors every this many learner steps."""
    timeout_s: float = Field(600.0, gt=0.0)
    """A collective that does not finish in this time fails the run naming the stuck peer."""
    bucket_mb: int = Field(512, ge=1)
    """Size of the flat buffers the weights are packed into for broadcast."""
    verify_every_steps: int = Field(0, ge=0)
    """Every this many steps, after the sync, compare a few tensors of each actor's weights with the learner's
    (a gather of three small tensors and one call per actor); a difference stops the run naming the actor.
    0: never."""
    ipc_load: Literal["direct", "layerwise"] = "direct"
    """How an engine sharing the learner's GPU loads weights from the learner's CUDA-IPC buffer: `direct`
    (the model's own weight loaders copy straight from the shared buffer into the live parameters) or
    `layerwise` (vLLM's IPC weight-transfer backend: a private copy, then vLLM's layer-wise reload, which also
    reprocesses quantized layers). Measured in benchmarks/README.md (weight_sync_colocated)."""
    nccl_load: Literal["direct", "layerwise"] = "layerwise"
    """How a vLLM engine on another GPU loads a broadcast: `layerwise` (vLLM's NCCL weight-transfer consumer
    and layer-wise reload: fresh tensors, ~800 loader calls, copied back) or `direct` (each bucket received
    into one persistent buffer; the model's loaders copy from it the first time, their copies are replayed in
    one `_foreach_copy_` a bucket after; unquantized models). `direct` has not run on two GPUs yet
    (benchmarks/README.md, weight_sync_7b); the same replay serves `ipc_load: direct` on one GPU."""


class SFTConfig(Section):
    """Supervised warm start on worked solutions (`Prompt.solution`) before GRPO; cached on disk."""

    enabled: bool = False
    """Run SFT first (the `train` command) and start GRPO from its weights."""
    num_steps: int = Field(100, ge=1)
    batch_size: int = Field(16, ge=1)
    """Solutions per optimizer step."""
    lr: float = Field(1e-3, gt=0.0)
    warmup_steps: int = Field(5, ge=0)
    weight_decay: float = Field(0.0, ge=0.0)
    train_fraction: float = Field(1.0, gt=0.0, le=1.0)
    """Fraction of the dataset's problems whose solutions are shown (the rest stay unseen until GRPO)."""
    output_dir: str | None = None
    """Where the warm-started model is saved (None: `<run.output_dir>/sft-<hash of model, data and sft>`)."""


class HeldOutFractionConfig(Section):
    type: Literal["fraction"] = "fraction"
    fraction: float = Field(0.05, gt=0.0, lt=1.0)
    """Share of the training prompts held out (at least one): never trained on (GRPO or the SFT warm start)."""
    seed: int = 0
    """Seed of the draw; the same seed and dataset hold out the same prompts (resume relies on it)."""


class ValidationFileConfig(Section):
    type: Literal["file"] = "file"
    path: str
    """A dataset file or folder read like `data.dataset.path`; training prompts with the same problem and
    image are removed from the training stream."""
    on_bad_row: Literal["skip", "raise"] = "skip"


class ValidationConfig(Section):
    """Greedy decoding (one sample per prompt) of held-out prompts, scored by the training judge and logged as
    `val/*` before the first step, every `every_steps` and at the last step (the reference: every 5 steps)."""

    every_steps: int = Field(5, ge=0)
    """Validate every k learner steps (a multiple of sync.interval_steps); 0 disables validation."""
    source: Annotated[Union[HeldOutFractionConfig, ValidationFileConfig], Field(discriminator="type")] = HeldOutFractionConfig()
    """Where the held-out prompts come from: a fraction of the training data, or a file."""
    max_prompts: int | None = Field(None, ge=1)
    """Validate on at most this many held-out prompts (the same ones each time); None: all of them."""
    max_new_tokens: int | None = Field(None, ge=1)
    """Response length cap for validation; None: rollout.max_new_tokens."""


class TrackingConfig(Section):
    mlflow_uri: str | None = None
    """mlflow tracking URI. None: `MLFLOW_TRACKING_URI` if set, else `sqlite:///mlruns.db` in the working dir."""
    experiment: str = "perception-r1"
    log_rollouts_every: int = Field(5, ge=0)
    """Log a table of sample rollouts (image, response, rewards, verdicts) every k steps; 0: never."""
    progress_bar: bool = True


class CheckpointConfig(Section):
    every_steps: int = Field(10, ge=0)
    """Checkpoint every k learner steps (and at shutdown); 0: only at shutdown."""
    keep: int = Field(3, ge=1)
    """Keep the newest k complete checkpoints."""
    background: bool = True
    """Write checkpoints in a background thread: the step loop is blocked only while a CPU copy of the
    state is taken (host memory: one copy of each rank's model and optimizer shards while a write runs).
    False: the step waits for the write."""
    write_timeout_s: float = Field(3600.0, gt=0)
    """How long a wait for a checkpoint write may last (the next checkpoint's wait for the one in flight,
    the final one at shutdown) before the learner fails naming the folder."""


class Config(Section):
    run: RunConfig = RunConfig()
    cluster: ClusterConfig = ClusterConfig()
    model: ModelConfig = TinyModelConfig()
    data: DataConfig = DataConfig()
    rollout: RolloutConfig = RolloutConfig()
    judge: JudgeConfig = JudgeConfig()
    buffer: BufferConfig = BufferConfig()
    learner: LearnerConfig = LearnerConfig()
    sync: SyncConfig = SyncConfig()
    sft: SFTConfig = SFTConfig()
    tracking: TrackingConfig = TrackingConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    validation: ValidationConfig = ValidationConfig()

    @model_validator(mode="before")
    @classmethod
    def _async_loss_default(cls, data):
        return async_loss_default(data)

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        for problem in _cross_field_problems(self):
            raise ValueError(problem)
        return self

    @model_validator(mode="after")
    def _validation_schedule(self) -> Config:
        every, interval = self.validation.every_steps, self.sync.interval_steps
        if every % interval:
            raise ValueError(f"validation.every_steps ({every}) is not a multiple of sync.interval_steps ({interval}): "
                             "the actors would not hold the weights of the step being validated; use a multiple")
        return self

    @property
    def colocated(self) -> bool:
        """The learner shares its GPU with the generation engines (fractional GPUs): weights go by CUDA IPC."""
        return 0 < self.learner.num_gpus_per_worker < 1

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name


def _cross_field_problems(cfg: Config) -> list[str]:
    problems = []
    if cfg.learner.prompts_per_step > cfg.buffer.max_groups:
        problems.append(
            f"learner.prompts_per_step ({cfg.learner.prompts_per_step}) exceeds buffer.max_groups "
            f"({cfg.buffer.max_groups}): a batch could never fill; raise buffer.max_groups")
    window = (cfg.buffer.max_staleness + 1) * cfg.learner.prompts_per_step
    if cfg.rollout.prompts_per_call > min(window, cfg.buffer.max_groups):
        problems.append(
            f"rollout.prompts_per_call ({cfg.rollout.prompts_per_call}) exceeds what the buffer lets one call reserve "
            f"(min of (buffer.max_staleness + 1) x learner.prompts_per_step = {window} and buffer.max_groups = "
            f"{cfg.buffer.max_groups}): generation would wait forever; lower rollout.prompts_per_call")
    if cfg.learner.num_minibatches > cfg.learner.prompts_per_step:
        problems.append(
            f"learner.num_minibatches ({cfg.learner.num_minibatches}) exceeds learner.prompts_per_step "
            f"({cfg.learner.prompts_per_step}): each minibatch needs a group; lower num_minibatches")
    if cfg.learner.optimizer.warmup_steps > cfg.run.num_steps:
        problems.append(
            f"learner.optimizer.warmup_steps ({cfg.learner.optimizer.warmup_steps}) exceeds run.num_steps "
            f"({cfg.run.num_steps}): the lr would never reach its value; lower warmup_steps")
    if cfg.sync.interval_steps > cfg.buffer.max_staleness + 1:
        problems.append(
            f"sync.interval_steps ({cfg.sync.interval_steps}) exceeds buffer.max_staleness + 1 "
            f"({cfg.buffer.max_staleness + 1}): actors would hold weights too old for any group to be trained; "
            "lower sync.interval_steps or raise buffer.max_staleness")
    gpus = cfg.learner.num_gpus_per_worker
    if cfg.sync.backend == "nccl" and gpus == 0:
        problems.append("sync.backend=nccl needs learner.num_gpus_per_worker=1; use gloo or auto on CPU")
    if cfg.learner.dtype == "bfloat16" and gpus == 0:
        problems.append("learner.dtype=bfloat16 needs GPUs (learner.num_gpus_per_worker=1); use float32 on CPU")
    if cfg.learner.attn_implementation == "flash_attention_2" and gpus == 0:
        problems.append("learner.attn_implementation=flash_attention_2 needs GPUs; use sdpa on CPU")
    engine = cfg.rollout.engine
    if (isinstance(cfg.model, PretrainedModelConfig) and cfg.model.random_weights and isinstance(engine, VLLMEngineConfig)
            and engine.load_format != "dummy"):
        problems.append("model.random_weights needs rollout.engine.load_format: dummy (vLLM would look for weights)")
    problems += _staleness_problems(cfg)
    problems += colocation_problems(cfg)  # core/config_colocation.py
    requested = resources_requested(cfg)["GPU"]
    cpus = resources_requested(cfg)["CPU"]
    if cfg.cluster.num_cpus is not None and cpus > cfg.cluster.num_cpus:
        problems.append(
            f"the learner asks for {cpus:g} CPUs (learner.num_workers {cfg.learner.num_workers} x "
            f"learner.cpus_per_worker {cfg.learner.cpus_per_worker:g}) but cluster.num_cpus is {cfg.cluster.num_cpus}; "
            "lower them or raise cluster.num_cpus (Ray would wait for the CPUs forever)")
    if cfg.cluster.num_gpus is not None and requested > cfg.cluster.num_gpus:
        judge = cfg.judge.llm
        judge_text = (f", judge.llm.num_replicas x judge.llm.num_gpus_per_replica = {judge.num_replicas}x"
                      f"{judge.num_gpus_per_replica:g}" if isinstance(judge, VLLMJudgeConfig) else "")
        problems.append(
            f"the config asks for {requested:g} GPUs (rollout.num_actors x rollout.num_gpus_per_actor = "
            f"{cfg.rollout.num_actors}x{cfg.rollout.num_gpus_per_actor:g}, learner.num_workers x "
            f"learner.num_gpus_per_worker = {cfg.learner.num_workers}x{gpus:g}{judge_text}) but cluster.num_gpus is "
            f"{cfg.cluster.num_gpus}; lower the counts or raise cluster.num_gpus")
    return problems


# ------------------------------------------------------------------------------ async loss default
def async_loss_default(data):
    """A config that leaves `learner.loss.type` out gets `tis` when `buffer.max_staleness > 0` (the default
    schedule is async), else `grpo`; a config that names a type keeps it (and `_staleness_problems` checks it)."""
    if not isinstance(data, dict) or _is_given(data.get("learner"), "loss", "type"):
        return data
    staleness = _value(data.get("buffer"), "max_staleness", BufferConfig.model_fields["max_staleness"].default)
    if not isinstance(staleness, int) or staleness <= 0:
        return data
    learner = data.get("learner", {})
    if isinstance(learner, BaseModel):
        return {**data, "learner": learner.model_copy(update={"loss": learner.loss.model_copy(update={"type": "tis"})})}
    loss = learner.get("loss", {}) if isinstance(learner, dict) else None
    if not isinstance(loss, (dict, BaseModel)):
        return data  # the schema's own error names it
    loss = loss.model_copy(update={"type": "tis"}) if isinstance(loss, BaseModel) else {**loss, "type": "tis"}
    return {**data, "learner": {**learner, "loss": loss}}


def _is_given(section, *keys: str) -> bool:
    """Whether the raw input (dicts, or models built by the caller) sets the field at `keys`."""
    for key in keys:
        if isinstance(section, BaseModel):
            if key not in section.model_fields_set:
                return False
            section = getattr(section, key)
        elif isinstance(section, dict) and key in section:
            section = section[key]
        else:
            return False
    return True


def _value(section, key: str, default):
    if isinstance(section, BaseModel):
        return getattr(section, key)
    return section.get(key, default) if isinstance(section, dict) else default


def _staleness_problems(cfg: Config) -> list[str]:
    loss = cfg.learner.loss
    if cfg.buffer.max_staleness == 0 or loss.type != "grpo" or loss.allow_uncorrected_staleness:
        return []
    return [f"buffer.max_staleness={cfg.buffer.max_staleness} with learner.loss.type=grpo: grpo's ratio is taken "
            "against the learner's own recomputed log-probs, so samples from older policies get no correction; set "
            "learner.loss.type: tis (or decoupled), or buffer.max_staleness: 0 for synchronous GRPO, or "
            "learner.loss.allow_uncorrected_staleness: true to accept it"]


def resources_requested(cfg: Config) -> dict[str, float]:
    """CPUs and GPUs a run asks Ray for: the learner workers' CPUs, and the GPUs of the generation actors,
    the learner and the judge LLM's replicas (every other actor of a run takes `num_cpus=0`)."""
    judge = cfg.judge.llm
    judge_gpus = judge.num_replicas * judge.num_gpus_per_replica if isinstance(judge, VLLMJudgeConfig) else 0.0
    gpus = (cfg.rollout.num_actors * cfg.rollout.num_gpus_per_actor
            + cfg.learner.num_workers * cfg.learner.num_gpus_per_worker + judge_gpus)
    return {"CPU": cfg.learner.num_workers * cfg.learner.cpus_per_worker, "GPU": gpus}

