"""The GPU generation engine: vLLM's AsyncLLM on its own event-loop thread inside the generation actor.

Several calls run at once (the actor's `generate` concurrency group is sized for the dispatcher's
target of sequences in flight), so the engine batches across them, and `stream` hands back each
prompt's group as soon as it finishes: a call's long tail holds only its own slots. Prompt preparation
(image decoding, chat template) runs on a small thread pool, off the loop that handles vLLM's outputs.

A weight update does not drain the engine: it pauses scheduling and drops every cache the old weights
computed (running requests are preempted and recomputed after the update, keeping what they sampled;
prefix, multimodal and encoder caches are reset), receives the broadcast straight into the workers
through vLLM's NCCL weight-transfer API (on the learner's own GPU: loads from its CUDA-IPC buffer),
bumps the version and resumes; requests that spanned it carry min_version < max_version. All
vLLM-version-specific calls go through core/vllm_compat.py.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence

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
                 kv_cache_memory_bytes: int | None = None, weight_transfer: str = "nccl") -> None:
        self.data, self.cfg = data, cfg
        self.processor = vl.load_processor(model_path)
        self.suppressed = vl.suppressed_token_ids(self.processor.tokenizer)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="vllm-loop", daemon=True)
        self.thread.start()
        self.engine = self._call(_make(model_path, cfg, seed, kv_cache_memory_bytes, weight_transfer))
        self.prepare_pool = concurrent.futures.ThreadPoolExecutor(PREPARE_THREADS, thread_name_prefix="vllm-prepare")
        self._version = 0
        self._ids = itertools.count()
        self._timeout_s = DEFAULT_UPDATE_TIMEOUT_S

    @property
    def version(self) -> int:
        return self._version

    def _call(self, coro, timeout: float | None = None):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    # ------------------------------------------------------------------------------------ generate
    def generate(self, prompts: Sequence[Prompt], *, sampling: Sampling, actor_id: int) -> list[RolloutGroup]:
        groups = dict(self.stream(prompts, sampling=sampling, actor_id=actor_id))
        return [groups[i] for i in range(len(prompts))]

    def stream(self, prompts: Sequence[Prompt], *, sampling: Sampling,
               actor_id: int) -> Iterator[tuple[int, RolloutGroup]]:
        """(index in `prompts`, group) as each prompt's group finishes. A refused prompt raises ValueError
        when its turn comes; the prompts not yet yielded are then cancelled (as when the caller stops early)."""
        futures = {asyncio.run_coroutine_threadsafe(self._one(p, sampling, actor_id, sampling.seed + i), self.loop): i
                   for i, p in enumerate(prompts)}
        try:
            for future in concurrent.futures.as_completed(futures):
                yield futures[future], future.result()
        finally:
            for future in futures:
                future.cancel()  # cancels the request's task: vLLM aborts it

    async def _one(self, prompt: Prompt, sampling: Sampling, actor_id: int, seed: int) -> RolloutGroup:
        start, min_version = time.perf_counter(), self._version
        engine_prompt = await asyncio.get_running_loop().run_in_executor(self.prepare_pool, self._prepare, prompt)
        final = None
        async for out in self.engine.generate(engine_prompt, self.params(prompt, sampling, seed),
                                              request_id=f"p{next(self._ids)}"):
            final = out
        if len(final.prompt_token_ids) > self.data.max_prompt_tokens:
            raise vl.PromptTooLong(f"prompt {prompt.id} has {len(final.prompt_token_ids)} tokens, over "
                                   f"data.max_prompt_tokens={self.data.max_prompt_tokens}")
        rollouts = tuple(self._rollout(o, min_version) for o in final.outputs)
        return RolloutGroup(prompt=prompt, prompt_token_ids=np.asarray(final.prompt_token_ids, dtype=np.int32),
                            rollouts=rollouts, actor_id=actor_id, generate_seconds=time.perf_counter() - start)

    def _prepare(self, prompt: Prompt) -> dict:
        """The engine's input for a prompt: the decoded, resized image and the chat-templated text."""
        image = vl.prepare_image(prompt.image, min_pixels=self.data.min_pixels, max_pixels=self.data.max_pixels,
                                 source=prompt.id)
        text = self.processor.apply_chat_template(vl.build_messages(prompt.problem, format_prompt=self.data.format_prompt),
                                                  add_generation_prompt=True, tokenize=False)
        return vllm_compat.multimodal_prompt(text, image)

    def params(self, prompt: Prompt, sampling: Sampling, seed: int):
        """vLLM's sampling parameters of one prompt's request (benchmarks override it to vary lengths)."""
        return vllm_compat.sampling_params(n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
                                           max_tokens=sampling.max_new_tokens, seed=seed, suppressed=self.suppressed)

    def _rollout(self, output, min_version: int) -> Rollout:
        ids, logprobs, text, finish = vllm_compat.completion_fields(output)
        return Rollout(token_ids=np.asarray(ids, dtype=np.int32), logprobs=np.asarray(logprobs, dtype=np.float32),
                       text=text, finish_reason=finish, min_version=min_version, max_version=self._version)

    # ------------------------------------------------------------------------------------- weights
    @property
    def sync_ranks(self) -> int:
        return self.cfg.tensor_parallel_size

    def join_weight_group(self, spec: WeightGroupSpec) -> None:
        if spec.backend == "ipc":  # weights come through the learner's buffer on this GPU: no group to join
            self._call(vllm_compat.engine_forget_ipc(self.engine), timeout=spec.timeout_s)  # a dead learner's
            self._timeout_s = spec.timeout_s
            return
        self._call(vllm_compat.engine_join_group(self.engine, host=spec.host, port=spec.port, rank_offset=spec.rank,
                                                 world_size=spec.world_size), timeout=spec.timeout_s)
        self._timeout_s = spec.timeout_s

    def receive_weights(self, manifest: WeightManifest) -> None:
        """Pause (dropping the old weights' caches), receive into the workers, bump the version, resume."""
        self._call(self._receive(manifest), timeout=self._timeout_s)

    async def _receive(self, manifest: WeightManifest) -> None:
        if manifest.ipc is not None:
            ipc = manifest.ipc
            await self._update(manifest.version, lambda: vllm_compat.engine_receive_ipc(
                self.engine, names=list(manifest.names), dtype_names=list(manifest.dtypes),
                shapes=[list(s) for s in manifest.shapes], tensor_bytes=list(ipc.tensor_bytes), handles=ipc.handles,
                load=ipc.load))
            return
        if manifest.load != "layerwise":  # direct (or the benchmark's wire-only rounds)
            await self._update(manifest.version, lambda: vllm_compat.engine_receive_direct(
                self.engine, names=list(manifest.names), dtype_names=list(manifest.dtypes),
                shapes=[list(s) for s in manifest.shapes], bucket_bytes=manifest.bucket_bytes, load=manifest.load))
            return
        await self._update(manifest.version, lambda: vllm_compat.engine_receive(
            self.engine, names=list(manifest.names), dtype_names=list(manifest.dtypes),
            shapes=[list(s) for s in manifest.shapes], packed_buffer_bytes=manifest.bucket_bytes))

    def load_weights_from(self, model_dir: str, *, version: int) -> None:
        """Load a Hugging Face model folder's weights into the running engine as `version`, with the same
        pause / cache reset / resume as a broadcast (a checkpoint into live engines; the one-GPU tests)."""
        self._call(self._update(version, lambda: vllm_compat.engine_reload(self.engine, model_dir)),
                   timeout=self._timeout_s)

    async def _update(self, version: int, load: Callable[[], Awaitable[str | None]]) -> None:
        """Pause and drop the old weights' caches, load, stamp the version, resume (even if the load failed)."""
        start = time.perf_counter()
        try:
            await vllm_compat.pause(self.engine)
            paused = time.perf_counter()
            how = await load()
            loaded = time.perf_counter()
            self._version = version
        finally:
            await vllm_compat.resume(self.engine)
        end = time.perf_counter()
        print(f"vllm engine: weights of version {version} in: pause {1e3 * (paused - start):.1f} ms, load "
              f"{1e3 * (loaded - paused):.1f} ms{f' ({how})' if how else ''}, resume {1e3 * (end - loaded):.1f} ms",
              flush=True)

    def apply_staged_weights(self) -> bool:
        return False  # weights land in the workers during receive_weights

    def close(self) -> None:
        """Shut the engine down (its core process and GPU memory) and stop the loop thread."""
        self.engine.shutdown()
        self.prepare_pool.shutdown(wait=False, cancel_futures=True)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)

    def weight_samples(self, suffixes: Sequence[str]) -> dict[str, list]:
        return self._call(vllm_compat.worker_weight_corners(self.engine, list(suffixes)))

    def gpu_uuids(self) -> list[str]:
        return self._call(vllm_compat.worker_gpu_uuids(self.engine))


PREPARE_THREADS = 4
"""Threads decoding images and applying the chat template for new requests."""
DEFAULT_UPDATE_TIMEOUT_S = 600.0
"""Deadline of a weight update before a weight group is joined (which sets the group's own)."""


async def _make(model_path: str, cfg: VLLMEngineConfig, seed: int, kv_cache_memory_bytes: int | None,
                weight_transfer: str = "nccl"):
    return vllm_compat.make_async_engine(
        model_path, tensor_parallel_size=cfg.tensor_parallel_size, gpu_memory_utilization=cfg.gpu_memory_utilization,
        max_model_len=cfg.max_model_len, max_num_seqs=cfg.max_num_seqs,
        max_num_batched_tokens=cfg.max_num_batched_tokens, enforce_eager=cfg.enforce_eager,
        load_format=cfg.load_format, seed=seed, kv_cache_memory_bytes=kv_cache_memory_bytes,
        weight_transfer=weight_transfer)
