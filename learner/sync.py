"""The sending end of weight sync: learner rank 0 and every generation actor form one broadcast
group (gloo on CPU, NCCL on GPU); all learner ranks gather full parameters from their FSDP shards
bucket by bucket, rank 0 broadcasts them, and the actors stage them for their next safe point.

A collective that does not finish in `timeout_s` raises an error naming the actors that did not
answer; a hung sync never hangs the run silently.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import ray
import torch
from torch.distributed.tensor import DTensor

from replay.records import WeightGroupSpec
from replay.weights import free_port, make_manifest, node_ip, open_group, send


class SyncTimeout(RuntimeError):
    pass


class WeightBroadcaster:
    """Created on every learner rank; only rank 0 talks to the actors."""

    def __init__(self, *, receivers: Sequence, rank: int, backend: str, timeout_s: float,
                 bucket_bytes: int, dtype: torch.dtype, device: torch.device) -> None:
        self.receivers, self.rank, self.backend = list(receivers), rank, backend
        self.timeout_s, self.bucket_bytes, self.dtype, self.device = timeout_s, bucket_bytes, dtype, device
        self.group = None

    def connect(self) -> float:
        """Form the broadcast group with every receiver (rank 0 only). Returns seconds taken."""
        if self.rank != 0 or not self.receivers:
            return 0.0
        start = time.perf_counter()
        host, port, world = node_ip(), free_port(), len(self.receivers) + 1
        refs = [r.join_weight_group.remote(WeightGroupSpec(host, port, i + 1, world, self.backend, self.timeout_s))
                for i, r in enumerate(self.receivers)]
        self.group = open_group(backend=self.backend, host=host, port=port, rank=0, world_size=world,
                                timeout_s=self.timeout_s)
        self._wait(refs, what="join the weight broadcast group")
        return time.perf_counter() - start

    def broadcast(self, model: torch.nn.Module, *, version: int) -> tuple[float, int]:
        """Every learner rank calls this (the FSDP all-gathers need them all); returns (seconds, bytes)."""
        start = time.perf_counter()
        state = model.state_dict()
        manifest = make_manifest(((n, _meta(t, self.dtype)) for n, t in state.items()),
                                 version=version, bucket_bytes=self.bucket_bytes)
        tensors = _full_tensors(state, self.dtype)
        if self.rank != 0 or not self.receivers:
            for _ in tensors:  # take part in the gathers, send nothing
                pass
            return time.perf_counter() - start, 0
        refs = [r.receive_weights.remote(manifest) for r in self.receivers]
        sent = send(self.group, manifest, tensors, device=self.device, timeout_s=self.timeout_s)
        self._wait(refs, what=f"receive weights of version {version}")
        return time.perf_counter() - start, sent

    def _wait(self, refs: list, *, what: str) -> None:
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=self.timeout_s)
        stuck = [i for i, ref in enumerate(refs) if ref not in ready]
        if stuck:
            raise SyncTimeout(
                f"generation actor(s) {stuck} did not {what} within sync.timeout_s={self.timeout_s:g}s; "
                "check those actors' logs (ray logs / the dashboard) for a crash or a hung engine")
        ray.get(refs)  # surface an actor's own error


def _meta(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A shape/dtype stand-in for the manifest (no data, no gather)."""
    return torch.empty(t.shape, dtype=dtype if t.is_floating_point() else t.dtype, device="meta")


def _full_tensors(state: dict[str, torch.Tensor], dtype: torch.dtype) -> Iterator[torch.Tensor]:
    for t in state.values():
        full = t.full_tensor() if isinstance(t, DTensor) else t
        yield full.to(dtype) if full.is_floating_point() else full
