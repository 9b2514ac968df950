"""GRPO math against hand-computed values: advantages, masks, the three loss variants, KL, entropy."""

import math

import pytest
import torch

from core.config import LossConfig
from learner.grpo import (
    completion_mask,
    entropy_from_logits,
    group_advantages,
    kl_k3,
    loss_normalizer,
    policy_loss,
    token_logprobs,
    uniform_groups,
)

# ------------------------------------------------------------------------------------- advantages


def test_advantages_unbiased_and_biased_std():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    # mean 0.5, deviations +-0.5, sum of squares 1.0
    # unbiased: var = 1/3, std = 0.5773503 -> A = 0.5 / (0.5773503 + 1e-6) = 0.8660239
    unbiased = group_advantages(rewards)
    expected = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    assert expected == pytest.approx(0.8660239, abs=1e-7)
    torch.testing.assert_close(unbiased, torch.tensor([[-expected, -expected, expected, expected]]))
    # biased: var = 1/4, std = 0.5 -> A = 0.5 / 0.500001 = 0.999998
    biased = group_advantages(rewards, unbiased=False)
    torch.testing.assert_close(biased, torch.tensor([[-0.999998, -0.999998, 0.999998, 0.999998]]))


def test_advantages_eps_and_mean_centering():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 1.0], [1.0, 2.0, 3.0, 4.0]])
    # biased std of group 0 is 0.5; eps 0.5 -> A = 0.5 / (0.5 + 0.5) = 0.5
    big_eps = group_advantages(rewards, eps=0.5, unbiased=False)
    torch.testing.assert_close(big_eps[0], torch.tensor([-0.5, -0.5, 0.5, 0.5]))
    # normalize_std=False: R - mean; group 1 mean 2.5
    centered = group_advantages(rewards, normalize_std=False)
    torch.testing.assert_close(centered, torch.tensor([[-0.5, -0.5, 0.5, 0.5], [-1.5, -0.5, 0.5, 1.5]]))


def test_all_equal_group_is_exactly_zero():
    # float32 mean of eight 0.7s is one ulp off 0.7; the plain formula would give -0.056
    rewards = torch.tensor([[0.7] * 8, [0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0], [-1.975] * 8])
    naive = (rewards[0] - rewards[0].mean()) / (rewards[0].std() + 1e-6)
    assert naive.abs().max() > 0.01  # the bug being guarded against is real
    for kwargs in ({}, {"unbiased": False}, {"normalize_std": False}):
        adv = group_advantages(rewards, **kwargs)
        assert not adv.isnan().any()
        assert (adv[0] == 0).all() and (adv[2] == 0).all()
        assert (adv[1] != 0).all()
    assert uniform_groups(rewards).tolist() == [True, False, True]


def test_advantages_reject_bad_shapes():
    with pytest.raises(ValueError, match="num_groups"):
        group_advantages(torch.zeros(8))
    with pytest.raises(ValueError, match="samples_per_prompt >= 2"):
        group_advantages(torch.tensor([[1.0], [2.0]]))


# ------------------------------------------------------------------------------------------- masks


def test_completion_mask_from_lengths_and_eos():
    tokens = torch.tensor([[5, 7, 2, 9, 0], [2, 4, 4, 0, 0], [3, 3, 3, 3, 3]])
    by_length = completion_mask(tokens, lengths=torch.tensor([3, 0, 5]))
    assert by_length.tolist() == [[1, 1, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]]
    # the first EOS (2) is valid, everything after it is not
    by_eos = completion_mask(tokens, eos_token_id=2)
    assert by_eos.tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]
    both = completion_mask(tokens, lengths=torch.tensor([2, 5, 4]), eos_token_id=2)
    assert both.tolist() == [[1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0]]
    assert by_eos.dtype == torch.float32
    with pytest.raises(ValueError, match="lengths, eos_token_id"):
        completion_mask(tokens)


def test_loss_normalizer_counts_tokens_or_sequences():
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    assert loss_normalizer(mask, aggregation="token_mean") == 5.0
    assert loss_normalizer(mask, aggregation="seq_mean") == 2.0  # the empty sequence is not counted


# -------------------------------------------------------------------------------------------- loss
# The shared 2x3 example: clip 0.2/0.3, dual clip 3, old_logp = -1, logp = old + ln(rho).
#   row 0, A = +1, rho = [1.5, 1.0, 0.5]:
#     1.5 > 1.3 -> L = max(-1.5, -1.3) = -1.3   (high clip binds)
#     1.0       -> L = -1.0
#     0.5       -> L = max(-0.5, -0.8) = -0.5   (no clip for A > 0 below 1)
#   row 1, A = -1, rho = [0.5, 4.0, 1.2], last token masked out:
#     0.5 < 0.8 -> L = max(0.5, 0.8) = 0.8      (low clip binds)
#     4.0       -> L = min(max(4, 1.3), 3) = 3   (dual clip binds)
#     1.2       -> masked
#   token sum = -1.3 - 1 - 0.5 + 0.8 + 3 = 1.0 over 5 tokens
RHO = torch.tensor([[1.5, 1.0, 0.5], [0.5, 4.0, 1.2]])
ADV = torch.tensor([1.0, -1.0])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
OLD = torch.full((2, 3), -1.0)


def _logp(rho=RHO):
    return (OLD + torch.log(rho)).requires_grad_()


def test_grpo_loss_clips_token_mean_and_stats():
    logp = _logp()
    loss, stats = policy_loss(logp, old_logp=OLD, advantages=ADV, mask=MASK, cfg=LossConfig(), normalizer=5.0)
    assert loss.item() == pytest.approx(1.0 / 5)
    assert stats["clip_frac_high"].item() == pytest.approx(1 / 5)
    assert stats["clip_frac_low"].item() == pytest.approx(1 / 5)
    assert stats["dual_clip_frac"].item() == pytest.approx(1 / 5)
    assert stats["ratio_mean"].item() == pytest.approx((1.5 + 1 + 0.5 + 0.5 + 4) / 5)  # 1.5
    assert stats["ratio_min"].item() == pytest.approx(0.5) and stats["ratio_max"].item() == pytest.approx(4.0)
    # k3 to old, d = -ln(rho): 1/rho + ln(rho) - 1 = 0.0721, 0, 0.3069, 0.3069, 0.6363 -> mean 0.26444
    assert stats["approx_kl_old"].item() == pytest.approx(0.26444, abs=1e-4)
    assert stats["num_tokens"].item() == 5.0 and not stats["pg_loss"].requires_grad


def test_grpo_loss_without_dual_clip():
    # row 1 token 1 is no longer capped at 3: sum = 1.0 - 3 + 4 = 2.0
    loss, stats = policy_loss(_logp(), old_logp=OLD, advantages=ADV, mask=MASK,
                              cfg=LossConfig(dual_clip=None), normalizer=5.0)
    assert loss.item() == pytest.approx(2.0 / 5)
    assert stats["dual_clip_frac"].item() == 0.0


def test_padding_garbage_does_not_leak():
    logp = _logp().detach().clone()
    logp[1, 2] = math.nan  # a padded position
    loss, stats = policy_loss(logp, old_logp=OLD, advantages=ADV, mask=MASK, cfg=LossConfig(), normalizer=5.0)
    assert loss.item() == pytest.approx(1.0 / 5)
    assert stats["ratio_mean"].item() == pytest.approx(1.5)


def test_grpo_gradient_is_zero_where_clipping_binds():
    logp = _logp()
    loss, _ = policy_loss(logp, old_logp=OLD, advantages=ADV, mask=MASK, cfg=LossConfig(), normalizer=5.0)
    loss.backward()
    # dL/dlogp = -A * rho / 5 where unclipped: row 0 tokens 1, 2 -> -1/5, -0.5/5; the high, low
    # and dual clips zero the other row-0 and row-1 tokens; the masked token has no gradient.
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -0.2, -0.1], [0.0, 0.0, 0.0]]))


def test_seq_mean_averages_per_sequence():
    # row 0 mean = -2.8 / 3, row 1 mean = 3.8 / 2; sum = 0.966667 over 2 sequences
    loss, _ = policy_loss(_logp(), old_logp=OLD, advantages=ADV, mask=MASK,
                          cfg=LossConfig(aggregation="seq_mean"), normalizer=2.0)
    assert loss.item() == pytest.approx((-2.8 / 3 + 3.8 / 2) / 2)  # 0.483333


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean"])
def test_micro_batches_sum_to_the_batch_loss(aggregation):
    gen = torch.Generator().manual_seed(0)
    old = -torch.rand(4, 6, generator=gen) * 3
    logp = (old + 0.3 * torch.randn(4, 6, generator=gen)).requires_grad_()
    adv = torch.tensor([1.2, -0.7, 0.4, -1.5])
    mask = completion_mask(torch.zeros(4, 6, dtype=torch.long), lengths=torch.tensor([6, 2, 4, 1]))
    cfg = LossConfig(aggregation=aggregation)
    normalizer = loss_normalizer(mask, aggregation=aggregation)  # over the whole batch: 13 tokens or 4 seqs
    whole, _ = policy_loss(logp, old_logp=old, advantages=adv, mask=mask, cfg=cfg, normalizer=normalizer)
    (whole_grad,) = torch.autograd.grad(whole, logp)
    parts = sum(policy_loss(logp[i:i + 2], old_logp=old[i:i + 2], advantages=adv[i:i + 2], mask=mask[i:i + 2],
                            cfg=cfg, normalizer=normalizer)[0] for i in (0, 2))
    (parts_grad,) = torch.autograd.grad(parts, logp)
    torch.testing.assert_close(parts, whole)
    torch.testing.assert_close(parts_grad, whole_grad)


@pytest.mark.parametrize("loss_type", ["grpo", "tis", "decoupled"])
def test_ratio_is_exactly_one_on_policy(loss_type):
    gen = torch.Generator().manual_seed(1)
    logp = (-torch.rand(3, 5, generator=gen) * 4).requires_grad_()
    same = logp.detach().clone()
    adv = torch.tensor([0.5, -1.0, 2.0])
    mask = completion_mask(torch.zeros(3, 5, dtype=torch.long), lengths=torch.tensor([5, 3, 4]))
    loss, stats = policy_loss(logp, old_logp=same, behaviour_logp=same, advantages=adv, mask=mask,
                              cfg=LossConfig(type=loss_type), normalizer=12.0)
    # rho = 1 everywhere, nothing clipped: loss = -sum_b A_b * len_b / 12 = -(2.5 - 3 + 8) / 12
    assert loss.item() == pytest.approx(-7.5 / 12)
    # d loss / d logp = -A_b / 12 on valid tokens (the tie rho == rho_c still passes the full gradient)
    (grad,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(grad, -adv[:, None] * mask / 12)
    for key in ("ratio_mean", "ratio_min", "ratio_max", "is_weight_mean", "is_weight_max"):
        assert stats[key].item() == 1.0, key
    for key in ("clip_frac_low", "clip_frac_high", "dual_clip_frac", "is_capped_frac", "approx_kl_old"):
        assert stats[key].item() == 0.0, key


def test_tis_truncates_the_behaviour_weight():
    # raw w = exp(old - behaviour): row 0 [1, 3, 0.5] -> truncated at 2 -> [1, 2, 0.5]; row 1 [1, 1, 1]
    raw = torch.tensor([[1.0, 3.0, 0.5], [1.0, 1.0, 1.0]])
    behaviour = OLD - torch.log(raw)
    loss, stats = policy_loss(_logp(), old_logp=OLD, behaviour_logp=behaviour, advantages=ADV, mask=MASK,
                              cfg=LossConfig(type="tis", tis_cap=2.0), normalizer=5.0)
    # -1.3*1 - 1*2 - 0.5*0.5 + 0.8*1 + 3*1 = 0.25
    assert loss.item() == pytest.approx(0.25 / 5)
    assert stats["is_weight_mean"].item() == pytest.approx((1 + 3 + 0.5 + 1 + 1) / 5)  # raw, before truncation
    assert stats["is_capped_frac"].item() == pytest.approx(1 / 5)
    assert stats["num_is_capped"].item() == 1.0


def test_decoupled_masks_tokens_over_the_behaviour_cap():
    # w = exp(prox - behaviour): row 0 [1, 6, 0.5] (6 > 5 masked); row 1 [2, 1, 10] (10 is on a padded token)
    raw = torch.tensor([[1.0, 6.0, 0.5], [2.0, 1.0, 10.0]])
    behaviour = OLD - torch.log(raw)
    logp = _logp()
    loss, stats = policy_loss(logp, old_logp=OLD, behaviour_logp=behaviour, advantages=ADV, mask=MASK,
                              cfg=LossConfig(type="decoupled", behaviour_cap=5.0), normalizer=5.0)
    # -1.3*1 + 0 - 0.5*0.5 + 0.8*2 + 3*1 = 3.05; the masked token still counts in the 5
    assert loss.item() == pytest.approx(3.05 / 5)
    assert stats["num_is_capped"].item() == 1.0
    assert stats["is_capped_frac"].item() == pytest.approx(1 / 5)
    loss.backward()
    # gradient of row 0: token 1 masked out (0), token 2 -A*rho*w/5 = -0.5*0.5/5
    torch.testing.assert_close(logp.grad[0], torch.tensor([0.0, 0.0, -0.05]))


def test_kl_and_entropy_terms():
    logp = _logp(torch.ones(2, 3))  # on-policy: pg part = -(1*3 - 1*2)/5 = -0.2
    ref = OLD + math.log(2.0)  # ref - logp = ln 2 -> k3 = 2 - ln 2 - 1 = 0.306853 per token
    entropy = torch.full((2, 3), 1.5)
    cfg = LossConfig(kl_coef=0.1, entropy_coef=0.01)
    loss, stats = policy_loss(logp, old_logp=OLD, advantages=ADV, mask=MASK, cfg=cfg, normalizer=5.0,
                              ref_logp=ref, entropy=entropy)
    assert loss.item() == pytest.approx(-0.2 + 0.1 * 0.306853 - 0.01 * 1.5, abs=1e-6)
    assert stats["kl_ref_mean"].item() == pytest.approx(0.306853, abs=1e-6)
    assert stats["entropy_mean"].item() == pytest.approx(1.5)
    assert stats["pg_loss"].item() == pytest.approx(-0.2)
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(logp, old_logp=OLD, advantages=ADV, mask=MASK, cfg=cfg, normalizer=5.0, entropy=entropy)


def test_policy_loss_rejects_bad_inputs():
    logp = _logp()
    with pytest.raises(ValueError, match="behaviour_logp"):
        policy_loss(logp, old_logp=OLD, advantages=ADV, mask=MASK, cfg=LossConfig(type="tis"), normalizer=5.0)
    with pytest.raises(ValueError, match="advantages must be"):
        policy_loss(logp, old_logp=OLD, advantages=ADV[:, None], mask=MASK, cfg=LossConfig(), normalizer=5.0)
    with pytest.raises(ValueError, match="normalizer"):
        policy_loss(logp, old_logp=OLD, advantages=ADV, mask=MASK, cfg=LossConfig(), normalizer=0.0)


# ------------------------------------------------------------------------------ KL, entropy, logp


def test_k3_is_nonnegative_and_zero_at_equality():
    gen = torch.Generator().manual_seed(2)
    a, b = torch.randn(1000, generator=gen) * 5, torch.randn(1000, generator=gen) * 5
    assert (kl_k3(a, b) >= 0).all()
    assert (kl_k3(a, a) == 0).all()
    # ref - logp = ln 2: 2 - ln 2 - 1 = 0.306853
    assert kl_k3(torch.tensor(0.0), torch.tensor(math.log(2.0))).item() == pytest.approx(0.306853, abs=1e-6)


def test_entropy_hand_values():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, math.log(3.0), -math.inf, -math.inf]], requires_grad=True)
    # uniform over 4: ln 4 = 1.386294; p = [0.25, 0.75, 0, 0]: 0.25 ln 4 + 0.75 ln(4/3) = 0.562335
    ent = entropy_from_logits(logits, chunk_size=1)
    torch.testing.assert_close(ent, torch.tensor([1.386294, 0.562335]))
    (grad,) = torch.autograd.grad(ent.sum(), logits)
    assert torch.isfinite(grad).all()


def test_token_logprobs_match_log_softmax_gather():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, 7, generator=gen, requires_grad=True)
    tokens = torch.randint(0, 7, (2, 5), generator=gen)
    ours = token_logprobs(logits, tokens, temperature=0.7, chunk_size=3)  # chunks cross row boundaries
    ref = torch.log_softmax(logits / 0.7, dim=-1).gather(-1, tokens[..., None]).squeeze(-1)
    torch.testing.assert_close(ours, ref)
    (g_ours,) = torch.autograd.grad(ours.sum(), logits)
    (g_ref,) = torch.autograd.grad(ref.sum(), logits)
    torch.testing.assert_close(g_ours, g_ref)
    bf16 = token_logprobs(logits.detach().bfloat16(), tokens)
    assert bf16.dtype == torch.float32
    ent = entropy_from_logits(logits.detach(), temperature=0.7, chunk_size=4)
    p = torch.softmax(logits.detach() / 0.7, dim=-1)
    torch.testing.assert_close(ent, -(p * p.log()).sum(-1))
