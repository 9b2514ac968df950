"""With max_staleness 0 the learner's update is plain synchronous GRPO: one step on the tiny model gives
the same loss and gradients (fp32 tolerance) as a single-process reference written out here."""

import numpy as np
import torch

from actors.hf_engine import HFEngine
from core import vl
from core.config import DataConfig, LearnerConfig, SyntheticDataConfig
from core.records import RewardBreakdown, Sampling, ScoredGroup
from dataprep.synthetic import make_problems
from learner.trainer import Learner


def reference_grpo_loss(model, processor, scored: list[ScoredGroup], data: DataConfig, *, suppressed: list[int]):
    """Plain GRPO, docs/method.md's formulas, one unpadded sequence at a time, global token mean."""
    terms, num_tokens = [], 0
    for sg in scored:
        r = torch.tensor([x.total for x in sg.rewards])
        adv = (r - r.mean()) / (r.std(unbiased=True) + 1e-6)
        inputs = vl.encode_prompt(processor, sg.group.prompt, data=data)
        for a, rollout in zip(adv, sg.group.rollouts):
            completion = torch.from_numpy(rollout.token_ids.astype(np.int64))
            kwargs = vl.model_inputs(inputs, [completion], pad_id=0)
            logits = model(**kwargs).logits[0, inputs.num_tokens - 1: inputs.num_tokens - 1 + len(completion)]
            logits = logits.index_fill(-1, torch.tensor(suppressed), float("-inf"))
            logp = torch.log_softmax(logits.float(), -1).gather(-1, completion[:, None]).squeeze(-1)
            ratio = torch.exp(logp - logp.detach())
            clipped = torch.clamp(ratio, 0.8, 1.3)
            loss = torch.maximum(-a * ratio, -a * clipped)
            if a < 0:
                loss = torch.minimum(loss, -3.0 * a)
            terms.append(loss.sum())
            num_tokens += len(completion)
    return torch.stack(terms).sum() / num_tokens


def test_learner_step_equals_plain_grpo(tiny_model_dir):
    torch.manual_seed(0)
    data = DataConfig()
    engine = HFEngine(tiny_model_dir, data=data)
    prompts = make_problems(SyntheticDataConfig(num_problems=2, seed=3))
    groups = engine.generate(prompts, sampling=Sampling(n=4, temperature=1.0, top_p=1.0, max_new_tokens=12, seed=5),
                             actor_id=0)
    scored = [ScoredGroup(g, tuple(RewardBreakdown(0, 0, 0, 0, float(v), float(v)) for v in values), 0.0)
              for g, values in zip(groups, ([1.0, 0.0, 0.5, 0.2], [0.0, 0.3, 0.3, 1.0]))]
    cfg = LearnerConfig(max_tokens_per_micro_batch=300)  # several micro-batches: accumulation must add up
    # lr ~ 0 and no clipping: the step leaves the weights and the raw gradients in .grad for comparison
    cfg = cfg.model_copy(update={"optimizer": cfg.optimizer.model_copy(update={"lr": 1e-30, "weight_decay": 0.0, "grad_clip": 1e9})})
    learner = Learner(tiny_model_dir, cfg=cfg, data=data, temperature=1.0, device=torch.device("cpu"))
    metrics = learner.step(scored)
    grads = {n: p.grad.clone() for n, p in learner.model.named_parameters() if p.grad is not None}

    learner.model.zero_grad()
    expected = reference_grpo_loss(learner.model, learner.processor, scored, data, suppressed=learner.suppressed)
    expected.backward()
    assert abs(metrics["learner/loss"] - expected.item()) < 1e-6
    assert metrics["learner/ratio_mean"] == 1.0
    for name, p in learner.model.named_parameters():
        if p.grad is not None and p.grad.abs().max() > 0:
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert len(grads) > 10
