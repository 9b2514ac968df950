"""The GPU generation engine: vLLM's AsyncLLM on its own event-loop thread inside the generation actor.

Several generate() calls run at once (the actor's `generate` concurrency group is sized for it), so
the engine batches across them. A weight update does not drain the engine: it pauses scheduling
(running requests keep their KV cache), receives the broadcast straight into the workers through
vLLM's NCCL weight-transfer API, bumps the version and resumes; requests that spanned it carry
min_version < max_version. All vLLM-version-specific calls go through core/vllm_compat.py.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Sequence

import numpy as np

from core import vl, vllm_compat
from core.config import DataConfig, VLLMEngineConfig
from core.records import (
    Prompt,
    Rollout,
    RolloutGroup,
    Sampling,
    WeightGroupSpec,
    WeightManifest,
)


class VLLMEngine:
    def __init__(self, model_path: str, *, cfg: VLLMEngineConfig, data: DataConfig, seed: int,
                 kv_cache_memory_bytes: int | None = None) -> None:
        self.data, self.cfg = data, cfg
        self.processor = vl.load_processor(model_path)
        self.suppressed = vl.suppressed_token_ids(self.processor.tokenizer)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="vllm-loop", daemon=True)
        self.thread.start()
        self.engine = self._call(_make(model_path, cfg, seed, kv_cache_memory_bytes))
        self._version = 0
        self._ids = itertools.count()
        self._packed_bytes = 1 << 30

    @property
    def version(self) -> int:
        return self._version

    def _call(self, coro, timeout: float | None = None):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    # ------------------------------------------------------------------------------------ generate
    def generate(self, prompts: Sequence[Prompt], *, sampling: Sampling, actor_id: int) -> list[RolloutGroup]:
        return self._call(self._generate(prompts, sampling, actor_id))

    async def _generate(self, prompts: Sequence[Prompt], sampling: Sampling, actor_id: int) -> list[RolloutGroup]:
        return list(await asyncio.gather(*[self._one(p, sampling, actor_id, sampling.seed + i)
                                           for i, p in enumerate(prompts)]))

    async def _one(self, prompt: Prompt, sampling: Sampling, actor_id: int, seed: int) -> RolloutGroup:
        start, min_version = time.perf_counter(), self._version
        image = vl.prepare_image(prompt.image, min_pixels=self.data.min_pixels, max_pixels=self.data.max_pixels,
                                 source=prompt.id)
        text = self.processor.apply_chat_template(vl.build_messages(prompt.problem, format_prompt=self.data.format_prompt),
                                                  add_generation_prompt=True, tokenize=False)
        params = vllm_compat.sampling_params(n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
                                             max_tokens=sampling.max_new_tokens, seed=seed, suppressed=self.suppressed)
        final = None
        async for out in self.engine.generate(vllm_compat.multimodal_prompt(text, image), params,
                                              request_id=f"p{next(self._ids)}"):
            final = out
        if len(final.prompt_token_ids) > self.data.max_prompt_tokens:
            raise vl.PromptTooLong(f"prompt {prompt.id} has {len(final.prompt_token_ids)} tokens, over "
                                   f"data.max_prompt_tokens={self.data.max_prompt_tokens}")
        rollouts = tuple(self._rollout(o, min_version) for o in final.outputs)
        return RolloutGroup(prompt=prompt, prompt_token_ids=np.asarray(final.prompt_token_ids, dtype=np.int32),
                            rollouts=rollouts, actor_id=actor_id, generate_seconds=time.perf_counter() - start)

    def _rollout(self, output, min_version: int) -> Rollout:
        ids, logprobs, text, finish = vllm_compat.completion_fields(output)
        return Rollout(token_ids=np.asarray(ids, dtype=np.int32), logprobs=np.asarray(logprobs, dtype=np.float32),
                       text=text, finish_reason=finish, min_version=min_version, max_version=self._version)

    # ------------------------------------------------------------------------------------- weights
    @property
    def sync_ranks(self) -> int:
        return self.cfg.tensor_parallel_size

    def join_weight_group(self, spec: WeightGroupSpec) -> None:
        self._call(vllm_compat.engine_join_group(self.engine, host=spec.host, port=spec.port, rank_offset=spec.rank,
                                                 world_size=spec.world_size), timeout=spec.timeout_s)
        self._timeout_s = spec.timeout_s

    def receive_weights(self, manifest: WeightManifest) -> None:
        """Pause (requests keep their state), receive into the workers, bump the version, resume."""
        self._call(self._receive(manifest), timeout=self._timeout_s)

    async def _receive(self, manifest: WeightManifest) -> None:
        await vllm_compat.pause(self.engine)
        try:
            await vllm_compat.engine_receive(self.engine, names=list(manifest.names), dtype_names=list(manifest.dtypes),
                                             shapes=[list(s) for s in manifest.shapes],
                                             packed_buffer_bytes=manifest.bucket_bytes)
            self._version = manifest.version
        finally:
            await vllm_compat.resume(self.engine)

    def apply_staged_weights(self) -> bool:
        return False  # weights land in the workers during receive_weights

    def weight_samples(self, suffixes: Sequence[str]) -> dict[str, list]:
        return self._call(vllm_compat.worker_weight_corners(self.engine, list(suffixes)))


async def _make(model_path: str, cfg: VLLMEngineConfig, seed: int, kv_cache_memory_bytes: int | None):
    return vllm_compat.make_async_engine(
        model_path, tensor_parallel_size=cfg.tensor_parallel_size, gpu_memory_utilization=cfg.gpu_memory_utilization,
        max_model_len=cfg.max_model_len, max_num_seqs=cfg.max_num_seqs,
        max_num_batched_tokens=cfg.max_num_batched_tokens, enforce_eager=cfg.enforce_eager,
        load_format=cfg.load_format, seed=seed, kv_cache_memory_bytes=kv_cache_memory_bytes)
