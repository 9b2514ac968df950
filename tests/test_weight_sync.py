"""After a broadcast every generation actor holds exactly the learner's weights, with the new version."""

import functools
import time

import pytest
import torch

pytestmark = pytest.mark.slow


def test_broadcast_makes_actor_weights_equal_learner(ray_cluster, tiny_model_dir):
    from transformers import AutoModelForImageTextToText

    from actors.actor import remote_class
    from actors.engines import build_engine
    from core.config_files import parse_config
    from core.records import Sampling
    from core.weights import weight_corners
    from learner.sync import WeightBroadcaster

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
    for actor in actors:
        ray_cluster.kill(actor)


@pytest.mark.reliability(fault="a generation actor dies while a weight broadcast is on the wire (before, amid or "
                         "after its buckets; the first or the last receiver)",
                         outcome="the broadcast fails fast (the survivors' receive fails at once, they keep their "
                         "weights) and the learner goes on (no restart from its checkpoint): it retries the sync at "
                         "once, waiting for Ray to restart the actor, and the retry brings every actor to that "
                         "version (deaths at three tries in a row skip it)")
@pytest.mark.parametrize(("victim", "when"), [(1, "before"), (0, "mid")])  # "after" and (1, "mid") pass too (25 s each)
def test_an_actor_dying_during_a_sync_skips_that_sync_and_the_next_reforms_the_group(ray_cluster, tiny_model_dir,
                                                                                    tmp_path, victim, when):
    """The learner must not fail (and restart from its last checkpoint) because a generation actor died while
    weights were on the wire: Ray restarts the actor, the sync is skipped, the next one includes it."""
    from transformers import AutoModelForImageTextToText

    from actors.actor import remote_class
    from actors.engines import build_engine
    from core.config_files import parse_config
    from core.records import Sampling
    from core.weights import weight_corners
    from learner.sync import ReceiverLost, WeightBroadcaster

    cfg = parse_config({"model": {"type": "pretrained", "path": tiny_model_dir}})
    sampling = Sampling(n=2, temperature=1.0, top_p=1.0, max_new_tokens=4)
    plain = functools.partial(build_engine, cfg=cfg, model_path=tiny_model_dir)
    marker = str(tmp_path / "died-once")

    def dies_in_its_first_receive():
        """An engine whose first receive kills its process: before any bucket, after the first, or after all."""
        import os

        import actors.hf_engine as hf
        from actors.engines import build_engine

        engine = build_engine(cfg=cfg, model_path=tiny_model_dir)
        receive = hf.receive

        def receive_or_die(*args, **kwargs):
            first = not os.path.exists(marker)
            if first:
                open(marker, "w").close()
            if first and when == "before":
                os._exit(1)  # a crash with the broadcast under way
            for k, item in enumerate(receive(*args, **kwargs)):
                yield item
                if first and when == "mid" and k == 0:
                    os._exit(1)
            if first and when == "after":
                os._exit(1)

        hf.receive = receive_or_die
        return engine

    builds = [dies_in_its_first_receive if i == victim else plain for i in range(2)]
    actors = [remote_class().options(max_restarts=1).remote(actor_id=i, build_engine=build, sampling=sampling)
              for i, build in enumerate(builds)]
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32)
    sender = WeightBroadcaster(receivers=actors, rank=0, backend="gloo", timeout_s=60, bucket_bytes=1 << 16,
                               dtype=torch.float32, device=torch.device("cpu"))
    sender.connect()
    start = time.perf_counter()
    lost = rf"generation actor\(s\) \[{victim}\] died during the weight sync of version 1"
    with pytest.raises(ReceiverLost, match=lost):
        sender.broadcast(model, version=1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    seconds, _ = sender.broadcast(model, version=2)  # the restarted actor rejoins; both get version 2
    names = list(model.state_dict())
    expected = weight_corners(model.state_dict().items(), names)
    assert ray_cluster.get([a.weight_samples.remote(names) for a in actors]) == [(2, expected)] * 2
    # the survivor's pending receive failed at once, not at the group's timeout
    assert time.perf_counter() - start < 60, (seconds, time.perf_counter() - start)
    for actor in actors:
        ray_cluster.kill(actor)
