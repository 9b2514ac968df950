"""GPU tier for the packed learner path: in bf16 on CUDA it runs torch's flash varlen kernel (the CPU
tests cover the exact SDPA fallback), so it should agree with the padded path up to bf16 rounding,
and a packed step with the optimizer changes the weights and gives a finite loss."""

import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def tiny_vl(tmp_path_factory) -> str:
    from benchmarks.assets import TINY, write_model_dir

    return str(write_model_dir(tmp_path_factory.mktemp("assets") / "tiny-vl", TINY, weights=True))


def _learner(model_dir: str, *, packing: str, lr: float = 1e-30):
    from core.config import DataConfig, LearnerConfig
    from learner.trainer import Learner

    cfg = LearnerConfig(packing=packing, max_tokens_per_micro_batch=2048, gradient_checkpointing=True,
                        optimizer={"lr": lr, "warmup_steps": 0})
    lrn = Learner(model_dir, cfg=cfg, data=DataConfig(), temperature=1.0, device=torch.device("cuda"))
    lrn.model.to(torch.bfloat16)  # bf16 compute without FSDP: the flash varlen kernel needs it
    return lrn


def test_packed_flash_path_matches_padded_path_in_bf16(tiny_vl):
    from tests.learner.test_packed import scored_groups

    groups = scored_groups(tiny_vl, num_groups=3, n=4, seed=4)
    padded, packed = _learner(tiny_vl, packing="never"), _learner(tiny_vl, packing="always")
    seqs = padded.sequences(groups)
    expected, got = torch.cat(padded.logprobs(seqs)), torch.cat(packed.logprobs(seqs))
    diff = (got - expected).abs()
    assert diff.mean() < 0.02 and diff.max() < 0.25, (diff.mean(), diff.max())


def test_packed_step_learns_in_bf16(tiny_vl):
    from tests.learner.test_packed import scored_groups

    lrn = _learner(tiny_vl, packing="always", lr=1e-3)
    before = {n: p.detach().clone() for n, p in lrn.model.named_parameters()}
    metrics = lrn.step(scored_groups(tiny_vl, num_groups=2, n=4, seed=5))
    assert torch.isfinite(torch.tensor(metrics["learner/loss"])) and metrics["learner/grad_norm"] > 0
    changed = sum(not torch.equal(p.detach(), before[n]) for n, p in lrn.model.named_parameters())
    assert changed > 10
