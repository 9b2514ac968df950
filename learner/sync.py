"""The sending end of weight sync: learner rank 0 and every generation actor form one broadcast
group; all learner ranks gather full parameters from their FSDP shards tensor by tensor, rank 0
broadcasts them in buckets, and each actor applies them (HF: at its next safe point; vLLM: pausing
scheduling for the swap). Two wires, one protocol:
- `torch`: core/weights.py over a standalone gloo (CPU) or NCCL process group, HF engines;
- `vllm`: vLLM's own NCCL weight-transfer group (core/vllm_compat.py), vLLM engines, whose
  tensor-parallel workers each take a rank.

A collective that does not finish in `timeout_s` raises an error naming the actors that did not
answer; a hung sync never hangs the run silently.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import ray
import torch
from torch.distributed.tensor import DTensor

from core.records import WeightGroupSpec, WeightManifest
from core.weights import free_port, make_manifest, node_ip, open_group, send


class SyncTimeout(RuntimeError):
    pass


class WeightBroadcaster:
    """Created on every learner rank; only rank 0 talks to the actors."""

    def __init__(self, *, receivers: Sequence, rank: int, backend: str, timeout_s: float,
                 bucket_bytes: int, dtype: torch.dtype, device: torch.device, transport: str = "torch") -> None:
        assert transport in ("torch", "vllm"), transport
        self.receivers, self.rank, self.backend, self.transport = list(receivers), rank, backend, transport
        self.timeout_s, self.bucket_bytes, self.dtype, self.device = timeout_s, bucket_bytes, dtype, device
        self.group = None
        self.port = 0

    def connect(self) -> float:
        """Form the broadcast group with every receiver (rank 0 only). Returns seconds taken."""
        if self.rank != 0 or not self.receivers:
            return 0.0
        start = time.perf_counter()
        ranks = ray.get([r.sync_ranks.remote() for r in self.receivers])
        offsets = [1 + sum(ranks[:i]) for i in range(len(ranks))]
        host, port, world = node_ip(), free_port(), 1 + sum(ranks)
        self.port = port
        refs = [r.join_weight_group.remote(WeightGroupSpec(host, port, offset, world, self.backend, self.timeout_s))
                for r, offset in zip(self.receivers, offsets)]
        if self.transport == "vllm":
            from core import vllm_compat

            self.group = vllm_compat.trainer_join_group(host=host, port=port, world_size=world)
        else:
            try:
                self.group = open_group(backend=self.backend, host=host, port=port, rank=0, world_size=world,
                                        timeout_s=self.timeout_s)
            except RuntimeError:  # the store timed out: say which actors never joined
                self._wait(refs, what="join the weight broadcast group", timeout_s=1.0)
                raise
        self._wait(refs, what="join the weight broadcast group")
        return time.perf_counter() - start

    def broadcast(self, model: torch.nn.Module, *, version: int,
                  after: torch.cuda.Event | None = None) -> tuple[float, int]:
        """Every learner rank calls this (the FSDP all-gathers need them all); returns (seconds, bytes).
        `after`: the optimizer's last update, waited for explicitly (the vLLM transport sends on a
        stream of its own, which nothing else orders after the optimizer's)."""
        start = time.perf_counter()
        if after is not None:
            after.synchronize()
        state = model.state_dict()
        manifest = make_manifest(((n, _meta(t, self.dtype)) for n, t in state.items()),
                                 version=version, bucket_bytes=self.bucket_bytes)
        tensors = _full_tensors(state, self.dtype)
        if self.rank != 0 or not self.receivers:
            for _ in tensors:  # take part in the gathers, send nothing
                pass
            return time.perf_counter() - start, 0
        self._ensure_members()
        refs = [r.receive_weights.remote(manifest) for r in self.receivers]
        if self.transport == "vllm":
            sent = self._send_vllm(manifest, tensors)
        else:
            sent = send(self.group, manifest, tensors, device=self.device, timeout_s=self.timeout_s)
        self._wait(refs, what=f"receive weights of version {version}")
        return time.perf_counter() - start, sent

    def _ensure_members(self) -> None:
        """Re-form the group when an actor was restarted (Ray restarts it bare: it is in no group);
        waits for restarting actors up to the sync timeout."""
        deadline = time.perf_counter() + self.timeout_s
        while True:
            try:
                ports = ray.get([r.weight_group_port.remote() for r in self.receivers], timeout=self.timeout_s)
                break
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
                if time.perf_counter() > deadline:
                    raise SyncTimeout(f"a generation actor did not come back within sync.timeout_s="
                                      f"{self.timeout_s:g}s ({type(e).__name__}); its restarts may be exhausted "
                                      "(rollout.max_restarts)") from e
                time.sleep(1.0)
        if any(p != self.port for p in ports):
            print(f"learner: generation actor(s) {[i for i, p in enumerate(ports) if p != self.port]} restarted; "
                  "re-forming the weight group", flush=True)
            self.connect()

    def _send_vllm(self, manifest: WeightManifest, tensors) -> int:
        from core import vllm_compat

        sent = 0

        def named():
            nonlocal sent
            for name, t in zip(manifest.names, tensors):
                sent += t.numel() * t.element_size()
                yield name, t.to(self.device)

        vllm_compat.trainer_send(self.group, named(), packed_buffer_bytes=manifest.bucket_bytes)
        return sent

    def _wait(self, refs: list, *, what: str, timeout_s: float | None = None) -> None:
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=self.timeout_s if timeout_s is None else timeout_s)
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
