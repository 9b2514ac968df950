"""The weight-broadcast wire protocol, shared by the learner (sender, rank 0) and the generation actors
(receivers, ranks 1..N): one standalone process group, a manifest, and flat buckets in manifest order.

The group is a torch ProcessGroup built on its own TCPStore, outside `torch.distributed`'s default
group, so it can span a Ray Train worker (which already has an FSDP default group) and plain Ray
actors. Gloo on CPU, NCCL on GPU: one code path. Every wait has a timeout.
"""

from __future__ import annotations

import datetime
import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from core.records import WeightManifest


def node_ip() -> str:
    """This host's address as other processes of the cluster reach it."""
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # outside Ray: single-host tests
        return "127.0.0.1"


def open_group(*, backend: str, host: str, port: int, rank: int, world_size: int, timeout_s: float) -> dist.ProcessGroup:
    """Join the broadcast group; rank 0 hosts the store. Blocks until all ranks joined (or times out)."""
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, world_size, rank == 0, timeout=timeout, wait_for_workers=True)
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, world_size, timeout)
    assert backend == "nccl", backend
    options = dist.ProcessGroupNCCL.Options()
    options._timeout = timeout
    return dist.ProcessGroupNCCL(store, rank, world_size, options)


def make_manifest(named: Iterable[tuple[str, torch.Tensor]], *, version: int, bucket_bytes: int) -> WeightManifest:
    items = list(named)
    return WeightManifest(
        version=version,
        names=tuple(n for n, _ in items),
        shapes=tuple(tuple(t.shape) for _, t in items),
        dtypes=tuple(str(t.dtype).removeprefix("torch.") for _, t in items),
        bucket_bytes=bucket_bytes,
    )


def tensor_nbytes(manifest: WeightManifest) -> list[int]:
    """Bytes of each manifest tensor, in order."""
    return [_numel(shape) * _dtype(dtype).itemsize for shape, dtype in zip(manifest.shapes, manifest.dtypes)]


def flat_views(flat: torch.Tensor, sizes: list[int], dtypes: Iterable[str],
               shapes: Iterable[Iterable[int]]) -> list[torch.Tensor]:
    """Typed, shaped views of a flat uint8 buffer holding tensors of `sizes` bytes back to back (no copy)."""
    return [piece.view(_dtype(dtype)).view(*shape)
            for piece, dtype, shape in zip(flat[:sum(sizes)].split(sizes), dtypes, shapes)]


def plan_buckets(manifest: WeightManifest) -> list[list[int]]:
    """Consecutive manifest indices grouped into buckets of one dtype and at most bucket_bytes each."""
    buckets: list[list[int]] = []
    size = 0
    for i, (nbytes, dtype) in enumerate(zip(tensor_nbytes(manifest), manifest.dtypes)):
        same_dtype = buckets and manifest.dtypes[buckets[-1][0]] == dtype
        if same_dtype and size + nbytes <= manifest.bucket_bytes:
            buckets[-1].append(i)
            size += nbytes
        else:
            buckets.append([i])
            size = nbytes
    return buckets


@dataclass(frozen=True)
class BucketLayout:
    """How `plan_buckets` packs a manifest into flat uint8 buckets, worked out once: each bucket's tensors
    back to back from the start of a buffer (one dtype a bucket, so every view is aligned)."""

    manifest: WeightManifest
    buckets: list[list[int]]
    sizes: list[int]
    """Bytes of each manifest tensor (`tensor_nbytes`)."""
    bucket_bytes: list[int]

    @classmethod
    def of(cls, manifest: WeightManifest) -> BucketLayout:
        buckets, sizes = plan_buckets(manifest), tensor_nbytes(manifest)
        return cls(manifest, buckets, sizes, [sum(sizes[i] for i in bucket) for bucket in buckets])

    def packs_like(self, manifest: WeightManifest) -> bool:
        """Whether `manifest` packs the same way (its version aside)."""
        m = self.manifest
        return (m.names, m.shapes, m.dtypes, m.bucket_bytes) == (
            manifest.names, manifest.shapes, manifest.dtypes, manifest.bucket_bytes)

    def views(self, slot: torch.Tensor, k: int) -> list[torch.Tensor]:
        """Typed, shaped views of bucket `k`'s tensors in `slot` (no copy)."""
        bucket, m = self.buckets[k], self.manifest
        return flat_views(slot, [self.sizes[i] for i in bucket], [m.dtypes[i] for i in bucket],
                          [m.shapes[i] for i in bucket])


def send(group: dist.ProcessGroup, manifest: WeightManifest, tensors: Iterable[torch.Tensor], *,
         device: torch.device, timeout_s: float) -> int:
    """Broadcast tensors (in manifest order) from rank 0, bucket by bucket. Returns bytes sent."""
    it = iter(tensors)
    sent = 0
    for bucket in plan_buckets(manifest):
        parts = [next(it).detach().to(device).reshape(-1) for _ in bucket]
        flat = torch.cat(parts) if len(parts) > 1 else parts[0].contiguous()
        _broadcast(group, flat, timeout_s)
        sent += flat.numel() * flat.element_size()
    assert next(it, None) is None, "more tensors than the manifest names"
    return sent


def receive(group: dist.ProcessGroup, manifest: WeightManifest, *, device: torch.device,
            timeout_s: float) -> Iterator[tuple[str, torch.Tensor]]:
    """Receive the broadcast of `send`, yielding (name, tensor) views into each bucket."""
    for bucket in plan_buckets(manifest):
        dtype = _dtype(manifest.dtypes[bucket[0]])
        sizes = [_numel(manifest.shapes[i]) for i in bucket]
        flat = torch.empty(sum(sizes), dtype=dtype, device=device)
        _broadcast(group, flat, timeout_s)
        for i, piece in zip(bucket, torch.split(flat, sizes)):
            yield manifest.names[i], piece.view(manifest.shapes[i])


def digest(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """A hash of names and exact bytes: equal digests mean bit-identical weights (tests, health checks)."""
    h = hashlib.sha256()
    for name, t in sorted(named, key=lambda item: item[0]):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def weight_corners(named: Iterable[tuple[str, torch.Tensor]], suffixes: Iterable[str]) -> dict[str, list]:
    """{suffix: first and last 16 values} of the one tensor whose name ends with each suffix (skipped
    when none or several match): cheap to compare across processes after a sync."""
    items = list(named)
    out = {}
    for suffix in suffixes:
        hits = [t for n, t in items if n.endswith(suffix)]
        if len(hits) == 1:
            flat = hits[0].detach().reshape(-1).float().cpu()
            out[suffix] = torch.cat([flat[:16], flat[-16:]]).tolist()
    return out


def _broadcast(group: dist.ProcessGroup, flat: torch.Tensor, timeout_s: float) -> None:
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    work = group.broadcast([flat], opts)
    work.wait(datetime.timedelta(seconds=timeout_s))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name)
    assert isinstance(dtype, torch.dtype), name
    return dtype
