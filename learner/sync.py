"""The sending end of weight sync: learner rank 0 and every generation actor form one broadcast
group; all learner ranks gather full parameters from their FSDP shards tensor by tensor, rank 0
broadcasts them in buckets, and each actor applies them (HF: at its next safe point; vLLM: pausing
scheduling for the swap). Three transports, one protocol:
- `torch`: core/weights.py over a standalone gloo (CPU) or NCCL process group, HF engines;
- `vllm`: vLLM's own NCCL weight-transfer group (core/vllm_compat.py), vLLM engines, whose
  tensor-parallel workers each take a rank;
- `ipc`: vLLM engines on the learner's own GPU (NCCL refuses two ranks on one GPU): every rank casts
  the weights into a persistent buffer the engines open through CUDA IPC (learner/ipc_weights.py); the
  group is only a check, at connect, that each engine runs on a learner rank's GPU.

A collective that does not finish in `timeout_s` raises an error naming the actors that did not
answer; a hung sync never hangs the run silently.
"""

from __future__ import annotations

import dataclasses
import gc
import secrets
import time
from collections.abc import Iterator, Sequence

import ray
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from core.records import WeightGroupSpec, WeightManifest
from core.ports import free_port
from core.weights import make_manifest, node_ip, open_group, send, weight_corners


class SyncTimeout(RuntimeError):
    pass


class ReceiverLost(SyncTimeout):
    """A generation actor died during a sync: the sync is skipped (the learner goes on), the next re-forms."""


_LOST = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)
LOST_CHECK_S = 30.0
"""How long a receiver may take to answer whether it is alive after a failed send."""


class SyncMismatch(RuntimeError):
    """An actor's weights differ from the learner's after a sync (sync.verify_every_steps)."""


VERIFY_SUFFIXES = ("layers.0.self_attn.o_proj.weight", "layers.0.mlp.down_proj.weight", "blocks.0.attn.proj.weight")
"""Tensors `verify` compares: unfused in vLLM (its names map one to one), in the text model and the vision tower."""


class WeightBroadcaster:
    """Created on every learner rank; only rank 0 talks to the actors."""

    def __init__(self, *, receivers: Sequence, rank: int, backend: str, timeout_s: float,
                 bucket_bytes: int, dtype: torch.dtype, device: torch.device, transport: str = "torch",
                 ipc_load: str = "direct", nccl_load: str = "layerwise") -> None:
        assert transport in ("torch", "vllm", "ipc"), transport
        self.receivers, self.rank, self.backend, self.transport = list(receivers), rank, backend, transport
        self.timeout_s, self.bucket_bytes, self.dtype, self.device = timeout_s, bucket_bytes, dtype, device
        self.group = None
        self.port = 0
        self.ipc_load, self.ipc_buffer, self.learner_gpus = ipc_load, None, []
        self.local_source: tuple | None = None  # (model, its storage, manifest, tensors): see _local_source
        self.nccl_load, self.send_layout, self.send_slot = nccl_load, None, None  # `direct` loads' buckets, buffer
        self.last_phases: dict[str, float] = {}
        """The IPC path's last update by phase: `cast_s` (into the buffer), `load_s` (the engines' part)."""

    def connect(self) -> float:
        """Form the broadcast group with every receiver (every rank calls it; rank 0 does the work). Returns
        seconds taken."""
        if self.transport == "ipc" and not self.learner_gpus:
            from learner.ipc_weights import gathered_uuids

            self.learner_gpus = gathered_uuids(self.device)  # a collective: every rank, once
        if self.rank != 0 or not self.receivers:
            return 0.0
        start = time.perf_counter()
        if self.transport == "ipc":
            self._connect_ipc()
            return time.perf_counter() - start
        ranks = self._get([r.sync_ranks.remote() for r in self.receivers], what="report their weight-group ranks")
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

    def _connect_ipc(self) -> None:
        """Check that every engine runs on a learner rank's GPU, and tell them weights come by IPC."""
        uuids = self._get([r.gpu_uuids.remote() for r in self.receivers], what="report their GPUs")
        for i, found in enumerate(uuids):
            if not found or not set(found) <= set(self.learner_gpus):
                raise RuntimeError(
                    f"generation actor {i} runs on GPU(s) {found or 'none'}, where no learner rank runs "
                    f"(learner GPUs {self.learner_gpus}): CUDA IPC needs every engine on a learner's GPU; give the "
                    "learner and the actors whole GPUs (learner.num_gpus_per_worker: 1, rollout.num_gpus_per_actor: 1)")
        self.port = 1 + secrets.randbelow(2**31 - 2)  # names this connection: a restarted actor reports 0
        spec = WeightGroupSpec("", self.port, 0, 0, "ipc", self.timeout_s)
        self._wait([r.join_weight_group.remote(spec) for r in self.receivers], what="take the IPC connection")

    def broadcast(self, model: torch.nn.Module, *, version: int,
                  after: torch.cuda.Event | None = None) -> tuple[float, int]:
        """Every learner rank calls this (the FSDP all-gathers need them all); returns (seconds, bytes).
        `after`: the optimizer's last update, waited for explicitly (the vLLM transport sends on a
        stream of its own, which nothing else orders after the optimizer's)."""
        start = time.perf_counter()
        if after is not None:
            after.synchronize()
        if self.transport == "ipc":
            nbytes = self._hand_over(*self._local_source(model, version))
            return time.perf_counter() - start, nbytes
        direct = self.transport == "vllm" and self.nccl_load != "layerwise"
        if direct and _one_rank():
            manifest, tensors = self._local_source(model, version)  # cast as they are packed
        else:
            state = model.state_dict()
            manifest, tensors = self._manifest(state, version), _full_tensors(state, self.dtype)
        if self.transport == "vllm":
            manifest = dataclasses.replace(manifest, load=self.nccl_load)
        if self.rank != 0 or not self.receivers:
            for _ in tensors:  # take part in the gathers, send nothing
                pass
            return time.perf_counter() - start, 0
        self._ensure_members()
        refs = [r.receive_weights.remote(manifest) for r in self.receivers]
        failure = None
        try:
            if direct:
                sent = self._send_direct(manifest, tensors)
            elif self.transport == "vllm":
                sent = self._send_vllm(manifest, tensors)
            else:
                sent = send(self.group, manifest, tensors, device=self.device, timeout_s=self.timeout_s)
            self._wait(refs, what=f"receive weights of version {version}")
        except (RuntimeError, *_LOST) as e:  # gloo's "connection closed", SyncTimeout, an actor's own error
            failure = e.with_traceback(None)  # its frames would keep the group (and its sockets) alive
        if failure is not None:
            for _ in tensors:  # the other ranks' gathers go on: take part in them
                pass
            self._after_failed_send(failure, version=version)
        return time.perf_counter() - start, sent

    def _after_failed_send(self, error: BaseException, *, version: int) -> None:
        """A send that failed because a receiver died is survivable: drop the group (its sockets close, so the
        surviving receivers' pending receive fails now instead of at its timeout), leave them on their weights,
        raise ReceiverLost; the next sync re-forms the group with the restarted actor. Anything else re-raises."""
        self.group, self.port = None, 0  # port 0: the next _ensure_members re-forms the group
        gc.collect()  # the process group's destructor closes its connections
        lost = self._lost_receivers()
        if not lost:
            raise error
        raise ReceiverLost(f"generation actor(s) {lost} died during the weight sync of version {version} "
                           f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); the others "
                           "keep their weights until the group is re-formed with the restarted actor") from error

    def _lost_receivers(self) -> list[int]:
        """Receivers that died or came back restarted (out of the group), by index."""
        lost = []
        for i, r in enumerate(self.receivers):
            try:
                ray.get(r.pid.remote(), timeout=LOST_CHECK_S)
                restarted = ray.get(r.weight_group_port.remote(), timeout=LOST_CHECK_S) == 0
            except (ray.exceptions.GetTimeoutError, *_LOST):
                restarted = True
            if restarted:
                lost.append(i)
        return lost

    def _ensure_members(self, asked: list | None = None) -> None:
        """Re-form the group when an actor was restarted (Ray restarts it bare: it is in no group);
        waits for restarting actors up to the sync timeout. `asked`: the ports already asked for."""
        deadline = time.perf_counter() + self.timeout_s
        while True:
            try:
                asked = asked or self._ask_ports()
                ports = ray.get(asked, timeout=self.timeout_s)
                break
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError,
                    ray.exceptions.GetTimeoutError) as e:
                if time.perf_counter() > deadline:
                    raise SyncTimeout(f"a generation actor did not come back within sync.timeout_s="
                                      f"{self.timeout_s:g}s ({type(e).__name__}); its restarts may be exhausted "
                                      "(rollout.max_restarts)") from e
                asked = None
                time.sleep(1.0)
        if self.port == 0:  # the last send failed: the group was dropped
            self.connect()
        elif any(p != self.port for p in ports):
            print(f"learner: generation actor(s) {[i for i, p in enumerate(ports) if p != self.port]} restarted; "
                  "re-forming the weight group", flush=True)
            self.connect()

    def _ask_ports(self) -> list:
        return [r.weight_group_port.remote() for r in self.receivers]

    def verify(self, model: torch.nn.Module, *, version: int, compare: bool = True) -> int:
        """Check that every actor now holds the learner's weights (a few tensors' corners, in the sync dtype).
        Every rank calls it (the gathers); rank 0 raises naming the actor and tensor that differ. `compare`
        False (rank 0's sync was skipped): take part in the gathers only. Returns the number of actors checked."""
        state = model.state_dict()
        picked = [(n, t) for n, t in state.items() if any(n.endswith(s) for s in VERIFY_SUFFIXES)]
        expected = weight_corners(zip([n for n, _ in picked], _full_tensors(dict(picked), self.dtype)), VERIFY_SUFFIXES)
        if self.rank != 0 or not self.receivers or not compare:
            return 0
        found = self._get([r.weight_samples.remote(list(expected)) for r in self.receivers],
                          what=f"report their weights after version {version}")
        for i, (got_version, corners) in enumerate(found):
            differ = [s for s in expected if corners.get(s) != expected[s]]
            if got_version != version or differ:
                raise SyncMismatch(f"after the weight sync of version {version}, generation actor {i} holds version "
                                   f"{got_version} with different values for {differ or 'none'}: the weight update "
                                   "did not land; check the actor's log for a load error")
        return len(found)

    def _local_source(self, model: torch.nn.Module, version: int) -> tuple[WeightManifest, list[torch.Tensor]]:
        """The manifest and the whole tensors to cast into the buffer. With one learner rank (every colocated
        run) both are taken once per model and kept while its parameters' storage stays where it was:
        FSDP2 keeps its sharded parameters, and the optimizer and a checkpoint's load update them in place,
        so the same local tensors hold each step's values. Taking them again (state_dict, ~825 manifest
        stand-ins, to_local) is host work: ~19 ms of the 51 ms a sync took on the H200 went before the cast;
        the same calls take 37-68 ms on a 2-core CPU machine, the storage check 4 ms."""
        cached, where = self.local_source, _storage(model)
        if cached is not None and cached[0] is model and cached[1] == where:
            return dataclasses.replace(cached[2], version=version), cached[3]
        state = model.state_dict()
        manifest, tensors = self._manifest(state, version), [_whole(t) for t in state.values()]
        if _one_rank():
            self.local_source = (model, where, manifest, tensors)
        return manifest, tensors

    def _manifest(self, state: dict[str, torch.Tensor], version: int) -> WeightManifest:
        return make_manifest(((n, _meta(t, self.dtype)) for n, t in state.items()), version=version,
                             bucket_bytes=self.bucket_bytes)

    def _hand_over(self, manifest: WeightManifest, tensors: list[torch.Tensor]) -> int:
        """Every rank fills its buffer (cast in the copy); rank 0 has the engines load from them."""
        from learner.ipc_weights import IPCBuffer

        if self.ipc_buffer is None or self.ipc_buffer.names != manifest.names:
            self.ipc_buffer = IPCBuffer(manifest, device=self.device)  # a collective
        asked = self._ask_ports() if self.rank == 0 and self.receivers else None  # answered while the GPU casts
        start = time.perf_counter()
        nbytes = self.ipc_buffer.fill(tensors)
        cast_s = time.perf_counter() - start
        if asked:
            self._ensure_members(asked)
            manifest = dataclasses.replace(manifest, ipc=self.ipc_buffer.record(load=self.ipc_load))
            self._wait([r.receive_weights.remote(manifest) for r in self.receivers],
                       what=f"load weights of version {manifest.version} from the learner's GPU")
        self.last_phases = {"cast_s": cast_s, "load_s": time.perf_counter() - start - cast_s}
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()  # no rank refills its buffer while an engine may still read it
        return nbytes if self.rank == 0 else 0

    def _get(self, refs: list, *, what: str) -> list:
        self._wait(refs, what=what)
        return ray.get(refs)

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

    def _send_direct(self, manifest: WeightManifest, tensors) -> int:
        """Each bucket packed into one persistent buffer (cast in the copy: one fused launch a bucket) and
        broadcast from it; the engines receive into theirs and load (`core.copy_plan.BucketReceiver`). The
        bucket layout is worked out once per manifest."""
        from core import vllm_compat
        from core.weights import BucketLayout

        if self.send_layout is None or not self.send_layout.packs_like(manifest):
            self.send_layout = BucketLayout.of(manifest)
            self.send_slot = torch.empty(max(self.send_layout.bucket_bytes), dtype=torch.uint8, device=self.device)
        layout, it = self.send_layout, iter(tensors)
        for k, (bucket, nbytes) in enumerate(zip(layout.buckets, layout.bucket_bytes)):
            with torch.no_grad():
                torch._foreach_copy_(layout.views(self.send_slot, k), [next(it) for _ in bucket])
            vllm_compat.trainer_broadcast(self.group, self.send_slot[:nbytes])  # same stream: after the copy
        return sum(layout.bucket_bytes)

    def _wait(self, refs: list, *, what: str, timeout_s: float | None = None) -> None:
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=self.timeout_s if timeout_s is None else timeout_s)
        stuck = [i for i, ref in enumerate(refs) if ref not in ready]
        if stuck:
            raise SyncTimeout(
                f"generation actor(s) {stuck} did not {what} within sync.timeout_s={self.timeout_s:g}s; "
                "check those actors' logs (ray logs / the dashboard) for a crash or a hung engine")
        ray.get(refs)  # surface an actor's own error


def _whole(t: torch.Tensor) -> torch.Tensor:
    """The full tensor: a one-rank mesh's local shard is already whole (no gather, no copy)."""
    if not isinstance(t, DTensor):
        return t
    return t.to_local() if t.device_mesh.size() == 1 else t.full_tensor()


def _one_rank() -> bool:
    return not dist.is_initialized() or dist.get_world_size() == 1


def _storage(model: torch.nn.Module) -> list[int]:
    """Where each parameter's local data lives (a DTensor's local shard read without to_local's dispatch)."""
    return [getattr(p, "_local_tensor", p).data_ptr() for p in model.parameters()]


def _meta(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A shape/dtype stand-in for the manifest (no data, no gather)."""
    return torch.empty(t.shape, dtype=dtype if t.is_floating_point() else t.dtype, device="meta")


def _full_tensors(state: dict[str, torch.Tensor], dtype: torch.dtype) -> Iterator[torch.Tensor]:
    """Each tensor whole, floating ones in the sync dtype: a shard is cast before its gather, so the gather
    moves bf16, half the bytes of the fp32 master weights (the cast is elementwise: the same values)."""
    for t in state.values():
        if t.is_floating_point():
            t = t.to(dtype)
        yield t.full_tensor() if isinstance(t, DTensor) else t
