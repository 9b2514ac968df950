"""Weight updates without the loaders' Python: the first update into a live model runs the model's own weight
loaders over views of a persistent buffer and records the `Tensor.copy_` calls they make; later updates write
new values into the same buffer and replay those copies in one `torch._foreach_copy_`. A replay is used only
when it would redo the load exactly: every copy reads the buffer, writes a parameter's memory, and together
the copies cover every parameter once. Used by the vLLM engines (core/vllm_compat.py) for CUDA-IPC updates
from a learner on the same GPU (the buffer is the learner's, opened by handle) and for NCCL broadcasts from
another GPU (`BucketReceiver`: each bucket received into one persistent buffer, then loaded).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from core.records import WeightManifest
from core.weights import BucketLayout

Copies = list[tuple[torch.Tensor, torch.Tensor]]
"""(destination, source) pairs of `Tensor.copy_` calls, in order."""


def copies_made(load: Callable[[], object]) -> Copies:
    """Run `load()` and return the `Tensor.copy_` calls it made (each still done)."""
    calls: Copies = []
    original, own = torch.Tensor.copy_, "copy_" in vars(torch.Tensor)

    def spy(self, src, non_blocking=False):
        calls.append((self, src))
        return original(self, src, non_blocking)

    torch.Tensor.copy_ = spy
    try:
        load()
    finally:
        if own:
            torch.Tensor.copy_ = original
        else:
            del torch.Tensor.copy_  # torch's own method again (it lives on the C base class)
    return calls


def record_copy_plan(model: torch.nn.Module, load: Callable[[], object], *, source: torch.Tensor) -> Copies | None:
    """Run `load()` (the model's weight loaders over views of `source`) and return its copies to replay later;
    None when a replay would not redo the load (then every update runs the loaders): a copy from outside
    `source` (a loader transformed the weight), into something that is not a parameter's memory, or
    parameters not fully written by the copies (a loader that wrote another way)."""
    calls = copies_made(load)
    return calls if replayable(model, calls, source) else None


def replayable(model: torch.nn.Module, calls: Copies, source: torch.Tensor) -> bool:
    source_ptr = source.untyped_storage().data_ptr()
    params = {p.untyped_storage().data_ptr(): p.numel() for p in model.parameters()}
    written: dict[int, int] = {}
    for dst, src in calls:
        if not isinstance(src, torch.Tensor) or src.untyped_storage().data_ptr() != source_ptr:
            return False
        ptr = dst.untyped_storage().data_ptr()
        if ptr not in params:
            return False
        written[ptr] = written.get(ptr, 0) + dst.numel()
    return written == params


def replay_copy_plan(plan: Copies) -> None:
    if plan:
        torch._foreach_copy_([dst for dst, _ in plan], [src for _, src in plan])


class BucketReceiver:
    """A broadcast taken bucket by bucket (`core.weights.plan_buckets`, the sender's packing) into one
    persistent flat buffer and loaded into a live model after each bucket: the first update by the model's
    own loaders (their copies recorded per bucket), later ones by replaying those copies. The buffer holds
    one bucket (sync.bucket_mb), and a bucket is loaded before the next one is received into it."""

    def __init__(self, manifest: WeightManifest, *, device: torch.device | str) -> None:
        self.layout = BucketLayout.of(manifest)
        self.slot = torch.empty(max(self.layout.bucket_bytes, default=0), dtype=torch.uint8, device=device)
        self.plans: list[Copies] | None = None
        """Per bucket, the copies to replay; None until recorded, or when the loads are not replayable."""
        self.recorded = False

    def matches(self, manifest: WeightManifest) -> bool:
        """Whether `manifest` packs like the one this receiver was built for (its version aside)."""
        return self.layout.packs_like(manifest)

    def receive(self, model: torch.nn.Module, broadcast: Callable[[torch.Tensor], None], *, load: str) -> str:
        """`broadcast(tensor)` fills `tensor` with the sender's next bucket. `load`: `direct` (loaders, then
        replays) or `wire` (received and dropped: the wire's floor). Returns what it did: `recorded`,
        `replayed`, `loaders` (not replayable: the loaders every time) or `wire`."""
        sizes = self.layout.bucket_bytes
        if load == "wire":
            for nbytes in sizes:
                broadcast(self.slot[:nbytes])
            return "wire"
        if self.plans is not None:
            for plan, nbytes in zip(self.plans, sizes):
                broadcast(self.slot[:nbytes])
                replay_copy_plan(plan)
            return "replayed"
        plans = [self._load_bucket(model, broadcast, k) for k in range(len(sizes))]
        if self.recorded:
            return "loaders"
        self.recorded = True
        if replayable(model, [c for plan in plans for c in plan], self.slot):
            self.plans = plans
            return "recorded"
        return "loaders"

    def _load_bucket(self, model: torch.nn.Module, broadcast, k: int) -> Copies:
        layout = self.layout
        broadcast(self.slot[:layout.bucket_bytes[k]])
        named = list(zip([layout.manifest.names[i] for i in layout.buckets[k]], layout.views(self.slot, k)))
        if self.recorded:  # known not replayable: no spying
            model.load_weights(named)
            return []
        return copies_made(lambda: model.load_weights(named))
