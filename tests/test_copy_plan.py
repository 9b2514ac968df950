"""core/copy_plan.py: loads recorded and replayed from a persistent buffer (CUDA-IPC and NCCL `direct` weight
updates of vLLM engines), on CPU with a vLLM-like model; and the learner's `direct` packing received bucket
by bucket by `BucketReceiver`."""

import torch

from core.copy_plan import BucketReceiver
from core.weights import make_manifest


class _StackedModel:
    """A vLLM-like model: a fused qkv parameter filled by shards through its weight loader, a plain one, and
    `load_weights` taking Hugging Face names (what vLLM's models do)."""

    def __init__(self, *, assign_plain: bool = False) -> None:
        import torch

        self.module = torch.nn.Module()
        self.module.qkv = torch.nn.Parameter(torch.zeros(6, 2), requires_grad=False)
        self.module.norm = torch.nn.Parameter(torch.zeros(3), requires_grad=False)
        self.assign_plain = assign_plain

    def parameters(self):
        return self.module.parameters()

    def load_weights(self, weights):
        for name, w in weights:
            if name in ("q", "k", "v"):
                row = "qkv".index(name) * 2
                self.module.qkv.data.narrow(0, row, 2).copy_(w)
            elif self.assign_plain:
                self.module.norm.data[:] = w * 1  # a loader that transforms the weight first
            else:
                self.module.norm.data.copy_(w)


def _buffer(values: dict):


    flat = torch.cat([t.reshape(-1) for t in values.values()]).view(torch.uint8)
    views, offset = {}, 0
    for name, t in values.items():
        n = t.numel() * t.element_size()
        views[name] = flat[offset:offset + n].view(t.dtype).view(t.shape)
        offset += n
    return flat, views


def test_the_copy_plan_replays_the_loaders_copies_from_the_shared_buffer():


    from core.copy_plan import record_copy_plan, replay_copy_plan

    model = _StackedModel()
    flat, views = _buffer({"q": torch.ones(2, 2), "k": torch.full((2, 2), 2.0), "v": torch.full((2, 2), 3.0),
                           "norm": torch.arange(3.0)})
    plan = record_copy_plan(model, lambda: model.load_weights(views.items()), source=flat)
    assert plan is not None and len(plan) == 4
    assert model.module.qkv[:, 0].tolist() == [1, 1, 2, 2, 3, 3] and model.module.norm.tolist() == [0, 1, 2]
    for view in views.values():  # the learner writes the next version into the same buffer
        view.mul_(10)
    replay_copy_plan(plan)
    assert model.module.qkv[:, 0].tolist() == [10, 10, 20, 20, 30, 30] and model.module.norm.tolist() == [0, 10, 20]


def test_a_load_the_copies_do_not_cover_gets_no_plan():


    from core.copy_plan import record_copy_plan

    values = {"q": torch.ones(2, 2), "k": torch.ones(2, 2), "v": torch.ones(2, 2), "norm": torch.arange(3.0)}
    assert "copy_" not in vars(torch.Tensor)
    transformed = _StackedModel(assign_plain=True)  # norm written from a temporary, not from the buffer
    flat, views = _buffer(values)
    assert record_copy_plan(transformed, lambda: transformed.load_weights(views.items()), source=flat) is None
    partial = _StackedModel()  # v never sent: qkv is not fully written
    flat, views = _buffer(values)
    assert record_copy_plan(partial, lambda: partial.load_weights((n, views[n]) for n in ("q", "k", "norm")),
                            source=flat) is None
    assert "copy_" not in vars(torch.Tensor)  # torch's own copy_ again


class _Wire:
    """The weight-transfer group on CPU: rank 0's broadcasts are queued; a receiver's take the next one."""

    def __init__(self) -> None:
        self.sent: list[torch.Tensor] = []

    def broadcast(self, tensor, src, stream=None):  # vLLM's PyNcclCommunicator.broadcast, as the trainer calls it
        assert src == 0 and stream is None
        self.sent.append(tensor.clone())

    def receive_into(self, tensor):
        tensor.copy_(self.sent.pop(0))


def _values(scale: float) -> dict:
    return {"q": torch.full((2, 2), 1.0 * scale), "k": torch.full((2, 2), 2.0 * scale),
            "v": torch.full((2, 2), 3.0 * scale), "norm": torch.arange(3.0) * scale}


def _send(wire: _Wire, manifest, values: dict) -> int:
    from learner.sync import WeightBroadcaster

    sender = WeightBroadcaster(receivers=[], rank=0, backend="gloo", timeout_s=5, bucket_bytes=manifest.bucket_bytes,
                               dtype=torch.float32, device=torch.device("cpu"), transport="vllm", nccl_load="direct")
    sender.group = wire
    return sender._send_direct(manifest, list(values.values()))


def test_direct_buckets_record_then_replay_and_equal_what_was_sent():
    values = _values(1.0)
    manifest = make_manifest(values.items(), version=1, bucket_bytes=40)  # 16+16 | 16+12: two buckets
    wire, model = _Wire(), _StackedModel()
    receiver = BucketReceiver(manifest, device="cpu")
    assert len(receiver.layout.buckets) == 2 and receiver.slot.numel() == 32
    assert _send(wire, manifest, values) == 60
    assert receiver.receive(model, wire.receive_into, load="direct") == "recorded"
    assert model.module.qkv[:, 0].tolist() == [1, 1, 2, 2, 3, 3] and model.module.norm.tolist() == [0, 1, 2]
    _send(wire, manifest, _values(10.0))
    assert receiver.receive(model, wire.receive_into, load="direct") == "replayed"
    assert model.module.qkv[:, 0].tolist() == [10, 10, 20, 20, 30, 30] and model.module.norm.tolist() == [0, 10, 20]
    assert not wire.sent  # every bucket taken


def test_wire_rounds_take_every_bucket_and_leave_the_model_alone():
    values = _values(1.0)
    manifest = make_manifest(values.items(), version=1, bucket_bytes=16)  # one tensor a bucket
    wire, model = _Wire(), _StackedModel()
    receiver = BucketReceiver(manifest, device="cpu")
    _send(wire, manifest, values)
    assert receiver.receive(model, wire.receive_into, load="wire") == "wire"
    assert not wire.sent and model.module.norm.tolist() == [0, 0, 0]


def test_a_load_that_cannot_be_replayed_runs_the_loaders_every_time():
    manifest = make_manifest(_values(1.0).items(), version=1, bucket_bytes=1 << 10)
    wire, model = _Wire(), _StackedModel(assign_plain=True)
    receiver = BucketReceiver(manifest, device="cpu")
    for scale, how in ((1.0, "loaders"), (5.0, "loaders")):
        _send(wire, manifest, _values(scale))
        assert receiver.receive(model, wire.receive_into, load="direct") == how
        assert model.module.norm.tolist() == [0, scale, 2 * scale] and model.module.qkv[0, 0] == scale
    assert receiver.matches(make_manifest(_values(2.0).items(), version=9, bucket_bytes=1 << 10))
    assert not receiver.matches(make_manifest(_values(2.0).items(), version=9, bucket_bytes=16))
