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
from core.ports import free_port
from core.weights import digest, make_manifest, open_group, send
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


def test_a_batch_of_prompts_decodes_as_each_prompt_alone(engine):
    """Left-padding several prompts of different lengths into one batch changes nothing a row sees:
    greedy tokens are equal and behaviour logprobs equal within float error."""
    prompts = make_problems(SyntheticDataConfig(num_problems=3, seed=11))
    greedy = Sampling(n=1, temperature=0.0, top_p=1.0, max_new_tokens=12)
    lengths = {int(engine.generate([p], sampling=greedy, actor_id=0)[0].prompt_token_ids.shape[0]) for p in prompts}
    assert len(lengths) > 1  # the batch really is padded
    together = engine.generate(prompts, sampling=greedy, actor_id=0)
    for prompt, batched in zip(prompts, together):
        (alone,) = engine.generate([prompt], sampling=greedy, actor_id=0)
        assert batched.prompt.id == prompt.id
        for a, b in zip(alone.rollouts, batched.rollouts):
            assert a.token_ids.tolist() == b.token_ids.tolist() and a.finish_reason == b.finish_reason
            assert abs(a.logprobs - b.logprobs).max() < 1e-4


def test_sampled_batch_logprobs_are_what_the_learner_recomputes(engine):
    """Behaviour logprobs of a sampled, padded batch equal the log-softmax of one unpadded forward of
    [prompt, completion] (temperature 1, vision tokens suppressed), as the learner computes them."""
    from core import vl

    prompts = make_problems(SyntheticDataConfig(num_problems=3, seed=4))
    groups = engine.generate(prompts, sampling=Sampling(n=2, temperature=1.0, top_p=1.0, max_new_tokens=10, seed=3),
                             actor_id=0)
    for prompt, group in zip(prompts, groups):
        inputs = vl.encode_prompt(engine.processor, prompt, data=engine.data)
        completions = [torch.as_tensor(r.token_ids, dtype=torch.long) for r in group.rollouts]
        with torch.no_grad():
            logits = engine.model(**vl.model_inputs(inputs, completions, pad_id=engine.pad_id)).logits
        logits[..., engine.suppressed] = float("-inf")
        for i, (rollout, completion) in enumerate(zip(group.rollouts, completions)):
            start = inputs.num_tokens - 1
            steps = logits[i, start:start + len(completion)].log_softmax(-1)
            recomputed = steps.gather(-1, completion[:, None]).squeeze(-1)
            assert abs(recomputed.numpy() - rollout.logprobs).max() < 1e-4
