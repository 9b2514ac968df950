"""Every call into vLLM's version-specific API, in one place, for the pinned vLLM (checked on import).

Used by the vLLM generation engine (actors/vllm_engine.py: engine construction, sampling, outputs,
pause/resume with the cache resets a weight update needs, the receiving side of a weight update, a reload
from a model folder) and by the learner's sender (the trainer side
of vLLM's NCCL weight-transfer group). When vLLM moves, this module is what changes.
"""

from __future__ import annotations

import base64
import dataclasses
import os
import pickle
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
                      weight_transfer: str | None = "nccl", multimodal: bool = True):
    """An AsyncLLM; for generation actors with a vLLM weight-transfer backend (`nccl`, or `ipc` for an engine
    on the learner's GPU) and logprobs of the processed (sampled) distribution; for the judge (None) a plain
    text engine."""
    check_version()
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")  # avoids minutes of JIT at start (gpu notes)
    # vLLM forks its engine-core process unless it sees CUDA already initialised; a caller that touched CUDA
    # in a way vLLM does not detect then dies with "Cannot re-initialize CUDA in forked subprocess". Spawn
    # always, so the engine never depends on how the calling process started.
    os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # collective_rpc of weight_corners (a function)
    from vllm.config import WeightTransferConfig
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    extra = {"kv_cache_memory_bytes": kv_cache_memory_bytes} if kv_cache_memory_bytes else {}
    if weight_transfer:
        extra |= {"weight_transfer_config": WeightTransferConfig(backend=weight_transfer),
                  "logprobs_mode": "processed_logprobs"}
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
                          max_tokens=max_tokens, seed=seed, logprobs=0, flat_logprobs=True, detokenize=True,
                          skip_special_tokens=True, logit_bias={t: -100.0 for t in suppressed},
                          output_kind=RequestOutputKind.FINAL_ONLY)


def multimodal_prompt(text: str, image) -> dict[str, Any]:
    """A chat-templated prompt with one `<|image_pad|>` placeholder; vLLM's processor expands it."""
    return {"prompt": text, "multi_modal_data": {"image": image}}


def completion_fields(output) -> tuple[list[int], list[float], str, str]:
    """(token ids, logprob of each sampled token, text, finish reason) of one CompletionOutput."""
    ids = list(output.token_ids)
    return ids, sampled_logprobs(output.logprobs, ids), output.text, "length" if output.finish_reason == "length" else "stop"


def sampled_logprobs(logprobs, ids: list[int]) -> list[float]:
    """The logprob of each sampled token. With `logprobs=0` and `flat_logprobs=True` vLLM keeps exactly one
    entry per position, the sampled token's, in one flat list (no per-token dicts); the per-position dict
    form (`list[dict[int, Logprob]]`) is read too."""
    flat = getattr(logprobs, "logprobs", None)
    if flat is not None and len(flat) == len(ids) and list(logprobs.token_ids) == ids:
        return list(flat)
    return [position[token].logprob for position, token in zip(logprobs, ids)]


async def pause(engine) -> None:
    """Stop scheduling for a weight update, and drop every cache the old weights computed: running requests
    are preempted (their KV freed; they are recomputed with the new weights after `resume`, keeping the
    tokens and logprobs sampled so far), then the prefix cache, the multimodal processor cache and the
    encoder cache (the vision tower's outputs) are reset. vLLM raises if the prefix cache cannot be reset.
    Nothing is scheduled between this and `resume`, so no KV or image embedding of the old weights survives.

    These are the two steps of `AsyncLLM.pause_generation(mode="keep", clear_cache=True)` without its closing
    `asyncio.sleep(0.02)`, which vLLM documents as "not required for correctness" (it orders the outputs of
    requests that finished just before the pause ahead of the caller): 20 of the 30 ms a pause took on the
    H200 (the one-GPU runs' engine log, 2026-12-02). A request whose last output is processed after the
    version bump is stamped max_version = the new version: an upper bound, as the stamp means."""
    await engine.renderer.clear_mm_cache_async()
    await engine.engine_core.pause_scheduler_async(mode="keep", clear_cache=True)


async def resume(engine) -> None:
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


async def engine_receive_ipc(engine, *, names: list[str], dtype_names: list[str], shapes: list[list[int]],
                             tensor_bytes: list[int], handles: tuple, load: str) -> str:
    """Load an update from the learner's CUDA-IPC buffer (`handles`: (GPU UUID, `CudaIPCHandle`) per GPU).
    `layerwise`: vLLM's IPC weight-transfer backend (the engine built with `weight_transfer="ipc"`): a private
    copy of each tensor, then the layer-wise reload. `direct`: each worker opens the buffer and the model's
    own weight loaders copy from it into the live parameters (no copy, no reload; unquantized models).
    Returns how the first worker loaded: `layerwise`, `recorded`, `replayed` or `loaders` (no replay possible)."""
    handles = [(uuid, dataclasses.asdict(h)) for uuid, h in handles]  # plain values across vLLM's RPC
    if load == "layerwise":
        from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest

        await engine.start_weight_update()
        await engine.update_weights(WeightTransferUpdateRequest(update_info={
            "names": names, "dtype_names": dtype_names, "shapes": shapes, "packed": True, "tensor_sizes": tensor_bytes,
            # vLLM's own transport form: it unpickles this in its workers (VLLM_ALLOW_INSECURE_SERIALIZATION)
            "ipc_handles_pickled": base64.b64encode(pickle.dumps(
                {uuid: rebuild_args(h, h["device"]) for uuid, h in handles})).decode()}))
        await engine.finish_weight_update()
        return "layerwise"
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # collective_rpc with a function
    return (await engine.collective_rpc(_load_from_ipc, kwargs={
        "names": names, "dtype_names": dtype_names, "shapes": shapes, "tensor_bytes": tensor_bytes,
        "handles": handles}))[0]


def _load_from_ipc(worker, *, names, dtype_names, shapes, tensor_bytes, handles) -> str:
    """On an engine worker: the learner's buffer, opened on this worker's GPU, into the live model. The first
    update runs the model's weight loaders and records the copies they make (`record_copy_plan`); the buffer
    stays open (the learner's is persistent, its handle the same every time), so later updates replay those
    copies in one `torch._foreach_copy_` instead of ~800 Python loader calls."""
    device = worker.device.index
    model = worker.model_runner.model
    from core.copy_plan import replay_copy_plan

    cached = getattr(worker, "_pr1_ipc", None)
    if cached is not None and cached[0] == handles and cached[2] is not None:
        replay_copy_plan(cached[2])
        how = "replayed"
    else:
        from core.copy_plan import record_copy_plan
        from core.weights import flat_views

        flat = _open_ipc_buffer(handles, device)
        views = flat_views(flat, tensor_bytes, dtype_names, shapes)
        plan = record_copy_plan(model, lambda: model.load_weights(zip(names, views)), source=flat)
        worker._pr1_ipc = (handles, flat, plan)  # a new learner buffer (a restarted learner) replaces the old
        how = "recorded" if plan is not None else "loaders"
    torch.cuda.synchronize(device)  # the learner writes the buffer again once this call returns
    return how


async def engine_receive_direct(engine, *, names: list[str], dtype_names: list[str], shapes: list[list[int]],
                                bucket_bytes: int, load: str) -> str:
    """Take a broadcast on the weight-transfer group without vLLM's consumer: every worker receives each
    bucket into one persistent buffer and loads it (`core.copy_plan.BucketReceiver`: the model's loaders the
    first time, their copies replayed after). `load`: `direct`, or `wire` (received and dropped). Returns
    how the first worker loaded."""
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # collective_rpc with a function
    return (await engine.collective_rpc(_receive_direct, kwargs={
        "names": names, "dtype_names": dtype_names, "shapes": shapes, "bucket_bytes": bucket_bytes,
        "load": load}))[0]


def _receive_direct(worker, *, names, dtype_names, shapes, bucket_bytes, load) -> str:
    from core.copy_plan import BucketReceiver
    from core.records import WeightManifest

    manifest = WeightManifest(version=0, names=tuple(names), shapes=tuple(tuple(s) for s in shapes),
                              dtypes=tuple(dtype_names), bucket_bytes=bucket_bytes)
    receiver = getattr(worker, "_pr1_direct", None)
    if receiver is None or not receiver.matches(manifest):
        receiver = worker._pr1_direct = BucketReceiver(manifest, device=worker.device)
    group, stream = worker.weight_transfer_engine.model_update_group, torch.cuda.current_stream()
    how = receiver.receive(worker.model_runner.model, lambda t: group.broadcast(t, src=0, stream=stream), load=load)
    torch.cuda.synchronize(worker.device)
    return how


async def engine_forget_ipc(engine) -> None:
    """Close every worker's mapping of a learner's IPC buffer (at a learner's connect): the mapping keeps a
    learner's buffer alive after its process died, which would hold that GPU memory (the model in bf16)
    while a restarted learner allocates its own."""
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # collective_rpc with a function

    def on_worker(worker):
        import gc

        if getattr(worker, "_pr1_ipc", None) is not None:
            worker._pr1_ipc = None  # the buffer and the copy plan's views of it
            gc.collect()

    await engine.collective_rpc(on_worker)


def _open_ipc_buffer(handles: tuple, device: int) -> torch.Tensor:
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    found = dict(handles)
    uuid = str(torch.cuda.get_device_properties(device).uuid)
    if uuid not in found:
        raise ValueError(f"no learner buffer on this engine's GPU {uuid} (buffers on {sorted(found)})")
    return rebuild_cuda_tensor(*rebuild_args(found[uuid], device))  # the device index as this process numbers it


def rebuild_args(h: dict, device: int) -> tuple:
    """torch's `rebuild_cuda_tensor` arguments of a `core.records.CudaIPCHandle` (as a dict), opened on `device`."""
    return (torch.Tensor, torch.Size(h["size"]), tuple(h["stride"]), h["offset"], torch.storage.TypedStorage,
            getattr(torch, h["dtype"]), device, h["handle"], h["storage_size_bytes"], h["storage_offset_bytes"], False,
            h["ref_counter_handle"], h["ref_counter_offset"], h["event_handle"], h["event_sync_required"])


async def worker_gpu_uuids(engine) -> list[str]:
    """The GPU UUID of each engine worker (tensor-parallel rank)."""
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # collective_rpc with a function

    def on_worker(worker):
        return str(torch.cuda.get_device_properties(worker.device.index).uuid)

    return list(await engine.collective_rpc(on_worker))


async def engine_reload(engine, model_dir: str) -> None:
    """Every worker loads a Hugging Face model folder's safetensors into its live model (vLLM's layer-wise
    reload, the path a weight-transfer update takes, names mapped by the model's `load_weights`)."""
    await engine.collective_rpc("reload_weights", kwargs={"weights_path": model_dir})


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


def trainer_broadcast(group, tensor: torch.Tensor) -> None:
    """One tensor from the trainer (rank 0) to every worker of the weight-transfer group, on the current stream."""
    group.broadcast(tensor, src=0, stream=torch.cuda.current_stream() if tensor.is_cuda else None)
