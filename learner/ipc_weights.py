"""The learner's side of a weight update to engines on its own GPU: no wire, no group. The full tensors
are cast into one persistent flat buffer, back to back in manifest order, and the engine opens that
buffer through CUDA IPC (core/vllm_compat.py `engine_receive_ipc`) and loads from it.

The buffer is allocated once, at the first update (the model's size in the sync dtype: a GPU's learner
budget must hold it, perception_r1/memory_estimate.py counts it), and its IPC handle is taken once: the
engine opens the same memory every time. With several learner ranks each rank would fill a buffer on its
own GPU and rank 0 hand every engine the handles of all of them (each engine picks its GPU's); colocation
runs one learner worker for now (core/config_colocation.py: Ray could pack two on one GPU).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist

from core.records import CudaIPCHandle, IPCWeights, WeightManifest
from core.weights import flat_views, tensor_nbytes


def gpu_uuid(device: torch.device) -> str:
    return str(torch.cuda.get_device_properties(device).uuid)


def tensor_bytes(manifest: WeightManifest) -> list[int]:
    """Bytes of each manifest tensor; a tensor whose offset would not be a multiple of its element size
    (a wider dtype after an odd count of narrower elements) cannot be viewed in place: refused, named."""
    sizes, offset = tensor_nbytes(manifest), 0
    for name, dtype, nbytes in zip(manifest.names, manifest.dtypes, sizes):
        itemsize = getattr(torch, dtype).itemsize
        if offset % itemsize:
            raise ValueError(f"weight {name} ({dtype}) would sit at byte {offset} of the IPC buffer, not a multiple "
                             f"of {itemsize}; the buffer packs tensors without padding")
        offset += nbytes
    return sizes


class IPCBuffer:
    """One rank's flat buffer of the manifest's tensors, shared through CUDA IPC."""

    def __init__(self, manifest: WeightManifest, *, device: torch.device) -> None:
        self.sizes = tensor_bytes(manifest)
        self.flat = torch.empty(sum(self.sizes), dtype=torch.uint8, device=device)
        self.views = flat_views(self.flat, self.sizes, manifest.dtypes, manifest.shapes)
        self.device = device
        self.handles = tuple(item for part in every_rank([(gpu_uuid(device), share(self.flat))]) for item in part)
        """(GPU UUID, handle) of every rank's buffer (rank 0 sends them; the others' copy is unused)."""
        self.names = manifest.names

    def fill(self, tensors: Iterable[torch.Tensor]) -> int:
        """Copy (and cast) the tensors in; returns once the copies are done (the engine reads next)."""
        tensors = list(tensors)
        if len(tensors) != len(self.views):
            raise ValueError(f"{len(tensors)} tensors for a buffer of {len(self.views)}")
        with torch.no_grad():
            torch._foreach_copy_(self.views, tensors)  # one fused launch where dtypes allow, casting otherwise
        torch.cuda.current_stream(self.device).synchronize()
        return self.flat.numel()

    def record(self, *, load: str) -> IPCWeights:
        """What the engines are sent; `load`: sync.ipc_load."""
        return IPCWeights(handles=self.handles, tensor_bytes=tuple(self.sizes), load=load)


def every_rank(value) -> list:
    """`value` of every learner rank, in rank order (all ranks call it; one rank: [value])."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [value]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def share(t: torch.Tensor) -> CudaIPCHandle:
    """torch's own CUDA-IPC export of a plain tensor (`reduce_tensor`), as a typed record."""
    from torch.multiprocessing.reductions import reduce_tensor

    _, (tensor_cls, size, stride, offset, storage_cls, dtype, device, handle, storage_size, storage_offset,
        _requires_grad, ref_counter_handle, ref_counter_offset, event_handle, event_sync) = reduce_tensor(t)
    assert tensor_cls is torch.Tensor and storage_cls is torch.storage.TypedStorage, (tensor_cls, storage_cls)
    return CudaIPCHandle(size=tuple(size), stride=tuple(stride), offset=offset, dtype=str(dtype).removeprefix("torch."),
                         device=device, handle=handle, storage_size_bytes=storage_size,
                         storage_offset_bytes=storage_offset, ref_counter_handle=ref_counter_handle,
                         ref_counter_offset=ref_counter_offset, event_handle=event_handle,
                         event_sync_required=event_sync)


def gathered_uuids(device: torch.device) -> list[str]:
    """Every learner rank's GPU UUID (all ranks call it)."""
    return every_rank(gpu_uuid(device))
