"""The judge's Ray Serve deployments: the reward deployment (ingress of the `reward` application) and
the two judge-LLM deployments it can talk to over the OpenAI chat API.

    Serve HTTP proxy (JudgeConfig.http_host:http_port)
      ├─ /reward     RewardServer  score(group) for handle calls, POST /score (msgpack) for HTTP,
      │              stats(); rules in worker processes, judge calls concurrent (judge.scoring)
      │                 │ openai.AsyncOpenAI -> <judge base url>/chat/completions
      └─ /judge-llm  LexicalJudgeServer (CPU) or VLLMJudgeServer (GPU, vLLM's async engine)
                     POST /v1/chat/completions, GET /v1/models
    (an `external` judge is any OpenAI-compatible server; nothing is deployed for it)

Every replica takes `num_cpus=0` (the reward work runs in its verifier processes and the judge);
vLLM replicas take the GPUs the config gives them. vLLM is imported only inside its replica.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from typing import Any

import ray
from fastapi import FastAPI, HTTPException, Request, Response
from ray import serve

from core import codec
from core.config import JudgeConfig, VLLMJudgeConfig
from core.records import JudgeStats, RolloutGroup, ScoredGroup
from judge.client import JudgeClient, JudgeEndpoint
from judge.lexical import lexical_reply
from judge.scoring import GroupScorer
from judge.verdicts import SYSTEM_PROMPT
from judge.verifier import VerifierPool

MSGPACK = "application/msgpack"
_SHUTDOWN = {"graceful_shutdown_wait_loop_s": 0.2, "graceful_shutdown_timeout_s": 5.0}
"""Replicas drain for at most 5 s on `stop()` (Serve's default waits up to 20 s)."""
LEXICAL_MODEL = "lexical-judge"

reward_api = FastAPI(title="perception-r1 reward")
lexical_api = FastAPI(title="perception-r1 lexical judge")
vllm_api = FastAPI(title="perception-r1 vLLM judge")


def chat_completion(model: str, contents: list[str], *, finish_reason: str = "stop") -> dict[str, Any]:
    """An OpenAI `chat.completion` object with one choice per content."""
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": [{"index": i, "finish_reason": finish_reason, "logprobs": None,
                                         "message": {"role": "assistant", "content": c}}
                                        for i, c in enumerate(contents)]}


def model_list(model: str) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": 0, "owned_by": "perception-r1"}]}


def _num_choices(body: dict) -> int:
    n = body.get("n") or 1
    if not isinstance(n, int) or not 1 <= n <= 16:
        raise HTTPException(400, f"n={n!r} must be an integer in [1, 16]")
    return n


# ------------------------------------------------------------------------------------------ reward
@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024, **_SHUTDOWN)
@serve.ingress(reward_api)
class RewardServer:
    """Scores rollout groups. `board` (a Ray actor handle or None) receives this replica's stats after
    every group so the service can sum them over replicas."""

    def __init__(self, cfg: JudgeConfig, endpoint: JudgeEndpoint, *, board: Any = None, num_verify_workers: int = 2,
                 verify_timeout_s: float = 10.0, system_prompt: str = SYSTEM_PROMPT) -> None:
        self.replica = uuid.uuid4().hex
        self.board = board
        self.scorer = GroupScorer(cfg, verifier=VerifierPool(num_workers=num_verify_workers, timeout_s=verify_timeout_s),
                                  judge=JudgeClient(cfg, endpoint, backoff_s=cfg.retry_backoff_s,
                                                    backoff_max_s=cfg.retry_backoff_max_s, system_prompt=system_prompt))

    async def score(self, group: RolloutGroup) -> ScoredGroup:
        scored = await self.scorer.score(group)
        if self.board is not None:
            self.board.report.remote(self.replica, self.scorer.stats())  # fire and forget
        return scored

    @reward_api.post("/score")
    async def score_http(self, request: Request) -> Response:
        """msgpack `RolloutGroup` in, msgpack `ScoredGroup` out (`core.codec`)."""
        try:
            group = codec.decode(await request.body(), RolloutGroup)
        except Exception as e:  # noqa: BLE001 -- any undecodable body is the client's error
            raise HTTPException(400, f"body is not a msgpack RolloutGroup: {type(e).__name__}: {e}") from e
        return Response(codec.encode(await self.score(group)), media_type=MSGPACK)

    @reward_api.get("/stats")
    async def stats_http(self) -> dict[str, Any]:
        stats = self.scorer.stats()
        return dataclasses.asdict(stats) | {"num_failures": stats.num_failures}

    async def stats(self) -> JudgeStats:
        return self.scorer.stats()

    async def warm_up(self) -> None:
        """Start the verifier workers now (the first group would otherwise pay for it)."""
        await self.scorer.verifier.start()

    async def __del__(self) -> None:
        await self.scorer.close()


# ------------------------------------------------------------------------------------ judge LLMs
@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024, **_SHUTDOWN)
@serve.ingress(lexical_api)
class LexicalJudgeServer:
    """The lexical judge (`judge.lexical`) behind the OpenAI chat routes."""

    @lexical_api.post("/v1/chat/completions")
    async def chat(self, body: dict) -> dict[str, Any]:
        try:
            content = lexical_reply(body.get("messages") or [])
        except ValueError as e:
            raise HTTPException(400, str(e)) from e
        return chat_completion(body.get("model") or LEXICAL_MODEL, [content] * _num_choices(body))

    @lexical_api.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        return model_list(LEXICAL_MODEL)


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024, **_SHUTDOWN)
@serve.ingress(vllm_api)
class VLLMJudgeServer:
    """A judge LLM on vLLM's async engine (v1 `AsyncLLM`), chat template applied with the model's own
    tokenizer; greedy or sampled as the request says."""

    def __init__(self, llm: VLLMJudgeConfig) -> None:
        from transformers import AutoTokenizer

        from core import vllm_compat

        self.model = llm.model_path
        self.tokenizer = AutoTokenizer.from_pretrained(llm.model_path, local_files_only=True)
        self.engine = vllm_compat.make_async_engine(
            llm.model_path, tensor_parallel_size=llm.tensor_parallel_size,
            gpu_memory_utilization=llm.gpu_memory_utilization, max_model_len=llm.max_model_len,
            enforce_eager=llm.enforce_eager, load_format=llm.load_format, seed=0,
            kv_cache_memory_bytes=llm.kv_cache_memory_bytes, weight_transfer=None, multimodal=False)

    @vllm_api.post("/v1/chat/completions")
    async def chat(self, body: dict) -> dict[str, Any]:
        from core import vllm_compat

        prompt = self.tokenizer.apply_chat_template(body.get("messages") or [], tokenize=False,
                                                    add_generation_prompt=True)
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or 512
        params = vllm_compat.text_sampling_params(n=_num_choices(body), temperature=float(body.get("temperature", 1.0)),
                                                  max_tokens=int(max_tokens))
        final = None
        async for output in self.engine.generate(prompt, params, request_id=uuid.uuid4().hex):
            final = output
        assert final is not None
        return chat_completion(self.model, [o.text for o in final.outputs],
                               finish_reason=final.outputs[0].finish_reason or "stop")

    @vllm_api.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        return model_list(self.model)

    def __del__(self) -> None:
        self.engine.shutdown()


# ------------------------------------------------------------------------------------ stats board
@ray.remote(num_cpus=0, max_restarts=-1)
class StatsBoard:
    """The latest `JudgeStats` of each reward replica (counters are cumulative per replica). Metrics only:
    Ray restarts it if it dies, and each replica's next report refills it."""

    def __init__(self) -> None:
        self.latest: dict[str, JudgeStats] = {}

    def report(self, replica: str, stats: JudgeStats) -> None:
        self.latest[replica] = stats

    def all(self) -> list[JudgeStats]:
        return list(self.latest.values())
