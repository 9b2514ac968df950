"""Every call into vLLM's version-specific API, in one place, for the pinned vLLM (checked on import).

Used by the vLLM generation engine (actors/vllm_engine.py: engine construction, sampling, outputs,
pause/resume, the receiving side of a weight update) and by the learner's sender (the trainer side
of vLLM's NCCL weight-transfer group). When vLLM moves, this module is what changes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import torch

PINNED_VLLM = "0.26.0"


def check_version() -> str:
    import vllm

    if vllm.__version__ != PINNED_VLLM:
        raise RuntimeError(f"perception-r1 is built against vllm=={PINNED_VLLM}, found {vllm.__version__}; "
                           f"install the `gpu` extra (pip install -e '.[gpu]')")
    return vllm.__version__


# ------------------------------------------------------------------------------------- engine side
def make_async_engine(model_path: str, *, tensor_parallel_size: int, gpu_memory_utilization: float,
                      max_model_len: int, max_num_seqs: int = 1024, max_num_batched_tokens: int = 8192,
                      enforce_eager: bool, load_format: str, seed: int, kv_cache_memory_bytes: int | None = None,
                      weight_transfer: bool = True, multimodal: bool = True):
    """An AsyncLLM; for generation actors with vLLM's NCCL weight-transfer backend and logprobs of the
    processed (sampled) distribution; for the judge a plain text engine."""
    check_version()
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")  # avoids minutes of JIT at start (gpu notes)
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # collective_rpc of weight_corners (a function)
    from vllm.config import WeightTransferConfig
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    extra = {"kv_cache_memory_bytes": kv_cache_memory_bytes} if kv_cache_memory_bytes else {}
    if weight_transfer:
        extra |= {"weight_transfer_config": WeightTransferConfig(backend="nccl"), "logprobs_mode": "processed_logprobs"}
    if multimodal:
        extra["limit_mm_per_prompt"] = {"image": 1, "video": 0}
    args = AsyncEngineArgs(
        model=model_path, tensor_parallel_size=tensor_parallel_size, gpu_memory_utilization=gpu_memory_utilization,
        max_model_len=max_model_len, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
        enforce_eager=enforce_eager, load_format=load_format, seed=seed, dtype="bfloat16",
        enable_prefix_caching=True, **extra)
    return AsyncLLM.from_engine_args(args)


def text_sampling_params(*, n: int, temperature: float, max_tokens: int):
    from vllm import SamplingParams

    return SamplingParams(n=n, temperature=temperature, max_tokens=max_tokens)


def sampling_params(*, n: int, temperature: float, top_p: float, max_tokens: int, seed: int,
                    suppressed: list[int]):
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(n=n, temperature=temperature, top_p=top_p, top_k=-1 if temperature > 0 else 1,
                          max_tokens=max_tokens, seed=seed, logprobs=0, detokenize=True,
                          skip_special_tokens=True, logit_bias={t: -100.0 for t in suppressed},
                          output_kind=RequestOutputKind.FINAL_ONLY)


def multimodal_prompt(text: str, image) -> dict[str, Any]:
    """A chat-templated prompt with one `<|image_pad|>` placeholder; vLLM's processor expands it."""
    return {"prompt": text, "multi_modal_data": {"image": image}}


def completion_fields(output) -> tuple[list[int], list[float], str, str]:
    """(token ids, logprob of each sampled token, text, finish reason) of one CompletionOutput."""
    ids = list(output.token_ids)
    logprobs = [position[token].logprob for position, token in zip(output.logprobs, ids)]
    return ids, logprobs, output.text, "length" if output.finish_reason == "length" else "stop"


async def pause(engine) -> None:
    """Stop scheduling; running requests stay frozen with their KV cache and resume afterwards."""
    await engine.pause_generation(mode="keep", clear_cache=False)


async def resume(engine) -> None:
    await engine.reset_prefix_cache()  # no new prompt may reuse KV computed by the old weights
    await engine.resume_generation()


async def engine_join_group(engine, *, host: str, port: int, rank_offset: int, world_size: int) -> None:
    await engine.init_weight_transfer_engine(_init_request(
        {"master_address": host, "master_port": port, "rank_offset": rank_offset, "world_size": world_size}))


async def engine_receive(engine, *, names: list[str], dtype_names: list[str], shapes: list[list[int]],
                         packed_buffer_bytes: int) -> None:
    from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest

    await engine.start_weight_update()
    await engine.update_weights(WeightTransferUpdateRequest(update_info={
        "names": names, "dtype_names": dtype_names, "shapes": shapes, "packed": True,
        "packed_buffer_size_bytes": packed_buffer_bytes}))
    await engine.finish_weight_update()


async def worker_weight_corners(engine, suffixes: list[str]) -> dict[str, list]:
    """`weight_corners` of the first worker's weights whose vLLM names end with the suffixes (unfused ones map 1:1)."""
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # collective_rpc with a function

    def on_worker(worker, suffixes=suffixes):
        from core.weights import weight_corners

        return weight_corners(worker.model_runner.model.named_parameters(), suffixes)

    return (await engine.collective_rpc(on_worker))[0]


def _init_request(init_info: dict):
    from vllm.distributed.weight_transfer.base import WeightTransferInitRequest

    return WeightTransferInitRequest(init_info=init_info)


# ------------------------------------------------------------------------------------ trainer side
def trainer_join_group(*, host: str, port: int, world_size: int):
    """Rank 0 of the NCCL group vLLM's workers join (uses the current CUDA device)."""
    check_version()
    from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferEngine

    return NCCLWeightTransferEngine.trainer_init({"master_address": host, "master_port": port,
                                                  "world_size": world_size})


def trainer_send(group, named: Iterator[tuple[str, torch.Tensor]], *, packed_buffer_bytes: int) -> None:
    from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferEngine

    NCCLWeightTransferEngine.trainer_send_weights(
        named, {"group": group, "packed": True, "packed_buffer_size_bytes": packed_buffer_bytes})
