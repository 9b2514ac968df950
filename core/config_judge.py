"""The judge's sections of the config schema (`core/config.py` holds the whole and re-exports these):
rewards, the judge LLM (lexical on CPU, an external endpoint, or vLLM in Serve) and the judge client."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field, model_validator

from core.config_base import Section


class RewardConfig(Section):
    mode: Literal["reference", "fixed"] = "reference"
    """`reference`: the upstream reward code's exact behaviour (docs/method.md §3.6); `fixed`: its bugs treated (docs/method.md §3.6)."""
    accuracy_weight: float = 0.9
    format_weight: float = 0.1
    repetition_weight: float = 1.0
    visual_weight: float = 0.7
    """The reference script's visual_reward_factor (docs/method.md §3.5)."""
    ngram_size: int = Field(20, ge=1)
    repetition_penalty: float = Field(-2.0, le=0.0)
    use_visual_reward: bool = True


class LexicalJudgeConfig(Section):
    type: Literal["lexical"] = "lexical"
    """CPU judge in the same Serve app: same OpenAI API, verdicts by matching each annotation's numbers and terms."""


class ExternalJudgeConfig(Section):
    type: Literal["external"] = "external"
    base_url: str
    """OpenAI-compatible endpoint, e.g. `http://judge-host:16657/v1`."""
    model: str
    api_key_env: str = "JUDGE_API_KEY"
    """Environment variable holding the API key (never put keys in configs)."""


class VLLMJudgeConfig(Section):
    type: Literal["vllm"] = "vllm"
    model_path: str
    """Local folder of the judge LLM (text-only, as in the reference)."""
    num_replicas: int = Field(1, ge=1)
    num_gpus_per_replica: float = Field(1.0, gt=0.0)
    tensor_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=0.98)
    max_model_len: int = Field(8192, ge=256)
    load_format: Literal["auto", "dummy", "safetensors"] = "auto"
    enforce_eager: bool = False
    kv_cache_memory_bytes: int | None = Field(None, ge=1 << 20)
    """Cap the KV cache (small judge models otherwise reserve millions of tokens)."""

    @model_validator(mode="after")
    def _gpus(self) -> VLLMJudgeConfig:
        if self.num_gpus_per_replica != self.tensor_parallel_size:
            raise ValueError(
                f"judge.llm.tensor_parallel_size={self.tensor_parallel_size} needs judge.llm.num_gpus_per_replica = "
                f"{self.tensor_parallel_size} (got {self.num_gpus_per_replica:g}): vLLM runs one worker per GPU of "
                f"the replica; set judge.llm.num_gpus_per_replica: {self.tensor_parallel_size}")
        return self


class JudgeConfig(Section):
    reward: RewardConfig = RewardConfig()
    llm: Annotated[Union[LexicalJudgeConfig, ExternalJudgeConfig, VLLMJudgeConfig], Field(discriminator="type")] = LexicalJudgeConfig()
    verdict_mode: Literal["reference", "strict"] = "reference"
    """`reference`: K counted from the judge's tags; `strict`: K = number of annotations, missing items 0.
    `reward.mode: fixed` always counts strictly (docs/method.md §8's treatment of the K bug)."""
    prompt_file: str | None = None
    """A text file holding the judge's system message: another wording, the same `<infoK>` answer tags;
    `{examples}` in it becomes our three worked examples (docs/judge-prompt.txt is ours, written so). Read
    on the driver at start-up (relative to where the run starts). None: the built-in prompt."""
    temperature: float = Field(0.0, ge=0.0)
    max_tokens: int = Field(512, ge=1)
    timeout_s: float = Field(60.0, gt=0.0)
    """Per-request timeout for the judge LLM."""
    max_retries: int = Field(2, ge=0)
    retry_backoff_s: float = Field(0.5, gt=0.0)
    """Base of the exponential backoff (full jitter) between retries."""
    retry_backoff_max_s: float = Field(8.0, gt=0.0)
    max_concurrency: int = Field(512, ge=1)
    """Judge requests in flight per reward replica."""
    fallback_visual: float = Field(0.0, ge=0.0, le=1.0)
    """r_v for a failed judgement (counted in metrics; never crashes training)."""
    breaker_failures: int = Field(20, ge=1)
    """Consecutive failures that open the circuit breaker (calls then fail fast)."""
    breaker_reset_s: float = Field(30.0, gt=0.0)
    """How long the breaker stays open before letting a trial request through."""
    cache_size: int = Field(10000, ge=0)
    """Judgements cached by (response, annotations); 0 disables the cache."""
    num_reward_replicas: int = Field(1, ge=1)
    num_verify_workers: int = Field(2, ge=1)
    """Accuracy-verification worker processes per reward replica (math-verify, killable)."""
    verify_timeout_s: float = Field(10.0, gt=0.0)
    """A verification running longer is killed and scores 0 (counted)."""
    http_host: str = "127.0.0.1"
    http_port: int = Field(8000, ge=1, le=65535)
