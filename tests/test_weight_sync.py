"""After a broadcast every generation actor holds exactly the learner's weights, with the new version."""

import functools

import pytest
import torch

pytestmark = pytest.mark.slow


def test_broadcast_makes_actor_weights_equal_learner(ray_cluster, tiny_model_dir):
    from transformers import AutoModelForImageTextToText

    from actors.actor import remote_class
    from core.config_files import parse_config
    from core.records import Sampling
    from core.weights import weight_corners
    from learner.sync import WeightBroadcaster
    from perception_r1.driver import build_engine

    cfg = parse_config({"model": {"type": "pretrained", "path": tiny_model_dir}})
    build = functools.partial(build_engine, cfg=cfg, model_path=tiny_model_dir)
    sampling = Sampling(n=2, temperature=1.0, top_p=1.0, max_new_tokens=4)
    actors = [remote_class().remote(actor_id=i, build_engine=build, sampling=sampling) for i in range(2)]
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32)
    sender = WeightBroadcaster(receivers=actors, rank=0, backend="gloo", timeout_s=60, bucket_bytes=1 << 16,
                               dtype=torch.float32, device=torch.device("cpu"))
    sender.connect()
    with torch.no_grad():  # the learner "trains": every tensor changes
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    names = list(model.state_dict())
    expected = weight_corners(model.state_dict().items(), names)
    assert len(expected) == len(names)  # every tensor is compared
    before = ray_cluster.get([a.weight_samples.remote(names) for a in actors])
    assert all(v == 0 and samples != expected for v, samples in before)

    seconds, nbytes = sender.broadcast(model, version=1)

    after = ray_cluster.get([a.weight_samples.remote(names) for a in actors])
    assert after == [(1, expected)] * 2
    assert nbytes == sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert seconds > 0

    # the health check (sync.verify_every_steps): equal now; a learner that moved on without a sync differs
    from learner.sync import VERIFY_SUFFIXES, SyncMismatch

    assert sum(any(n.endswith(s) for n in names) for s in VERIFY_SUFFIXES) == len(VERIFY_SUFFIXES)
    assert sender.verify(model, version=1) == 2
    with torch.no_grad():
        model.state_dict()[next(n for n in names if n.endswith(VERIFY_SUFFIXES[0]))].add_(1.0)
    with pytest.raises(SyncMismatch, match=r"actor 0 holds version 1 with different values for \['layers.0.self_attn"):
        sender.verify(model, version=1)
