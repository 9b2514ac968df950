"""The CPU engine (actors/hf_engine.py) on the tiny model: rollouts with one behaviour logprob per token,
cut at EOS, stamped with the weights' version; weights broadcast over a gloo group (the learner's wire,
here from a thread of this process) are staged while the engine keeps its own, and apply at the safe point
bit for bit; a prompt over data.max_prompt_tokens is refused with a ValueError."""

import threading

import pytest
import torch

from actors.hf_engine import HFEngine
from core.config import DataConfig, SyntheticDataConfig
from core.records import Sampling, WeightGroupSpec
from core.weights import digest, free_port, make_manifest, open_group, send
from dataprep.synthetic import make_problems


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return HFEngine(tiny_model_dir, data=DataConfig())


def test_rollouts_carry_logprobs_versions_and_finish_reasons(engine):
    prompt = make_problems(SyntheticDataConfig(num_problems=1, seed=2))[0]
    (group,) = engine.generate([prompt], sampling=Sampling(n=3, temperature=1.0, top_p=1.0, max_new_tokens=6, seed=1),
                               actor_id=4)
    assert group.actor_id == 4 and len(group.rollouts) == 3 and group.policy_version == engine.version
    for r in group.rollouts:
        assert 1 <= len(r.token_ids) <= 6 and r.token_ids.shape == r.logprobs.shape
        assert (r.logprobs <= 0).all() and r.finish_reason in ("stop", "length")
        assert (r.finish_reason == "length") == (len(r.token_ids) == 6 and r.token_ids[-1] != engine.eos_id)


def test_broadcast_weights_are_staged_then_applied_bit_for_bit(engine, tiny_model_dir):
    from transformers import AutoModelForImageTextToText

    learner = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        for p in learner.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    state = learner.state_dict()
    manifest = make_manifest(state.items(), version=engine.version + 1, bucket_bytes=1 << 16)
    port, before = free_port(), engine.weights_digest()
    spec = WeightGroupSpec("127.0.0.1", port, 1, 2, "gloo", 30.0)
    joined = threading.Thread(target=engine.join_weight_group, args=(spec,))
    joined.start()
    group = open_group(backend="gloo", host="127.0.0.1", port=port, rank=0, world_size=2, timeout_s=30)
    joined.join(30)
    receiver = threading.Thread(target=engine.receive_weights, args=(manifest,))
    receiver.start()
    send(group, manifest, state.values(), device=torch.device("cpu"), timeout_s=30)
    receiver.join(30)
    assert engine.weights_digest() == before and engine.version == manifest.version - 1  # staged only
    assert engine.apply_staged_weights() and engine.version == manifest.version
    assert engine.weights_digest() == digest(state.items())
    assert not engine.apply_staged_weights()  # nothing new staged


def test_a_prompt_over_the_token_limit_is_refused(tiny_model_dir):
    engine = HFEngine(tiny_model_dir, data=DataConfig(max_prompt_tokens=16))
    prompt = make_problems(SyntheticDataConfig(num_problems=1, seed=0))[0]
    with pytest.raises(ValueError, match="max_prompt_tokens"):
        engine.generate([prompt], sampling=Sampling(n=2, temperature=1.0, top_p=1.0, max_new_tokens=4), actor_id=0)
