"""The padding-free path (learner/packed.py) computes the same function as the padded path on the tiny
model: per-token log-probs within 1e-5 (absolute), loss within 1e-6 and every parameter's gradient
within rtol 1e-4 / atol 1e-6 (fp32 on CPU; the two paths differ only in summation order). Also the
chunked log-prob head against plain logits, and the token-balanced micro-batches."""

import numpy as np
import pytest
import torch

from core import vl
from core.config import DataConfig, LearnerConfig, SyntheticDataConfig
from core.records import RewardBreakdown, Rollout, RolloutGroup, ScoredGroup
from dataprep.synthetic import make_problems
from learner.fused_logprobs import linear_logprobs
from learner.grpo import entropy_from_logits, token_logprobs
from learner.packed import token_micro_batches
from learner.trainer import Learner


def scored_groups(model_dir: str, *, num_groups: int, n: int, seed: int) -> list[ScoredGroup]:
    """Random completions of varied lengths (1 to 40 tokens) on synthetic image prompts."""
    processor, data = vl.load_processor(model_dir), DataConfig()
    vocab = len(processor.tokenizer)
    rng = np.random.default_rng(seed)
    out = []
    for prompt in make_problems(SyntheticDataConfig(num_problems=num_groups, seed=seed)):
        ids = vl.encode_prompt(processor, prompt, data=data).input_ids.numpy().astype(np.int32)
        lengths = rng.integers(1, 41, n)
        rollouts = tuple(Rollout(rng.integers(20, vocab - 20, t, dtype=np.int32),
                                 rng.uniform(-3.0, -0.1, t).astype(np.float32), "", "length", 0, 0) for t in lengths)
        rewards = tuple(RewardBreakdown(0, 0, 0, 0, float(r), 0.0) for r in rng.uniform(0, 1, n))
        out.append(ScoredGroup(RolloutGroup(prompt, ids, rollouts, 0, 0.0), rewards, 0.0))
    return out


def learner(model_dir: str, *, packing: str, entropy_coef: float = 0.0, loss_type: str = "grpo",
            temperature: float = 1.0) -> Learner:
    cfg = LearnerConfig(max_tokens_per_micro_batch=400, packing=packing,
                        loss={"entropy_coef": entropy_coef, "type": loss_type},
                        optimizer={"lr": 1e-30, "weight_decay": 0.0, "grad_clip": 1e9})
    return Learner(model_dir, cfg=cfg, data=DataConfig(), temperature=temperature, device=torch.device("cpu"))


def step_grads(lrn: Learner, groups: list[ScoredGroup]) -> tuple[dict, dict]:
    metrics = lrn.step(groups)
    return metrics, {n: p.grad.clone() for n, p in lrn.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(("entropy_coef", "loss_type", "temperature"),
                         [(0.0, "grpo", 1.0), (0.01, "tis", 0.7)])
def test_packed_step_equals_padded_step(tiny_model_dir, entropy_coef, loss_type, temperature):
    groups = scored_groups(tiny_model_dir, num_groups=3, n=4, seed=1)
    padded = learner(tiny_model_dir, packing="never", entropy_coef=entropy_coef, loss_type=loss_type,
                     temperature=temperature)
    packed = learner(tiny_model_dir, packing="always", entropy_coef=entropy_coef, loss_type=loss_type,
                     temperature=temperature)
    assert packed.packed and not padded.packed
    expected, expected_grads = step_grads(padded, groups)
    got, grads = step_grads(packed, groups)
    assert got["learner/loss"] == pytest.approx(expected["learner/loss"], abs=1e-6)
    assert got["learner/num_tokens"] == expected["learner/num_tokens"]
    assert grads.keys() == expected_grads.keys() and len(grads) > 10
    for name, g in expected_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def test_packed_logprobs_equal_padded_logprobs(tiny_model_dir):
    groups = scored_groups(tiny_model_dir, num_groups=2, n=3, seed=2)
    padded, packed = learner(tiny_model_dir, packing="never"), learner(tiny_model_dir, packing="always")
    seqs = padded.sequences(groups)
    expected, got = padded.logprobs(seqs), packed.logprobs(seqs)
    assert [len(x) for x in got] == [len(s.completion_ids) for s in seqs]
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_linear_logprobs_match_plain_logits(temperature):
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    tokens, suppressed = torch.randint(0, 45, (37,)), torch.tensor([45, 47, 49])
    logits = (hidden @ weight.t()).index_fill(-1, suppressed, float("-inf"))
    g1, g2 = torch.randn(37, dtype=torch.float64), torch.randn(37, dtype=torch.float64)
    ref_logp = token_logprobs(logits, tokens, temperature=temperature).double()
    ref_ent = entropy_from_logits(logits, temperature=temperature).double()
    ref_h, ref_w = torch.autograd.grad((ref_logp * g1 + ref_ent * g2).sum(), (hidden, weight))
    logp, ent = linear_logprobs(hidden, weight, tokens, temperature=temperature, suppressed=suppressed,
                                with_entropy=True, chunk_tokens=8)
    got_h, got_w = torch.autograd.grad((logp.double() * g1 + ent.double() * g2).sum(), (hidden, weight))
    for got, ref in ((logp, ref_logp), (ent, ref_ent), (got_h, ref_h), (got_w, ref_w)):
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4)  # both in float32
    assert linear_logprobs(hidden, weight, tokens, suppressed=suppressed)[1] is None


class _Seq:
    def __init__(self, num_tokens: int) -> None:
        self.num_tokens = num_tokens


def test_token_micro_batches_keep_order_and_balance():
    rng = np.random.default_rng(0)
    seqs = [_Seq(int(t)) for t in rng.integers(100, 4600, 64)]
    batches = token_micro_batches(seqs, max_tokens=16384)
    assert [s for b in batches for s in b] == seqs  # order kept: a group's rollouts stay together
    sizes = [sum(s.num_tokens for s in b) for b in batches]
    assert max(sizes) <= 16384 and all(b for b in batches)
    assert len(batches) <= -(-sum(sizes) // 16384) + 1
    long = _Seq(900)
    assert token_micro_batches([long], max_tokens=500) == [[long]]  # a sequence over the budget runs alone
    assert [len(b) for b in token_micro_batches([_Seq(900), _Seq(10)], max_tokens=500)] == [1, 1]
