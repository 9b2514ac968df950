"""LR schedule: the reference's 13-step warmup from lr 0, and its LambdaLR checkpoint round trip."""

import pytest
import torch

from learner.schedule import lr_at, warmup_scheduler

BASE = 1e-6


def test_lr_at_warmup_13():
    assert lr_at(0, base_lr=BASE, warmup_steps=13) == 0.0  # the first update uses lr 0
    assert lr_at(1, base_lr=BASE, warmup_steps=13) == pytest.approx(BASE / 13)  # 7.6923e-8
    assert lr_at(12, base_lr=BASE, warmup_steps=13) == pytest.approx(BASE * 12 / 13)  # 9.2308e-7
    assert lr_at(13, base_lr=BASE, warmup_steps=13) == BASE
    assert lr_at(100, base_lr=BASE, warmup_steps=13) == BASE
    assert lr_at(0, base_lr=BASE, warmup_steps=0) == BASE
    with pytest.raises(ValueError, match="must be >= 0"):
        lr_at(-1, base_lr=BASE, warmup_steps=13)


def _optimizer():
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=BASE)


def test_scheduler_gives_each_update_lr_at_its_index():
    opt = _optimizer()
    sched = warmup_scheduler(opt, warmup_steps=13)
    used = []
    for _ in range(16):
        used.append(opt.param_groups[0]["lr"])  # the lr this update runs with
        opt.step()
        sched.step()
    assert used == pytest.approx([lr_at(k, base_lr=BASE, warmup_steps=13) for k in range(16)])
    assert used[0] == 0.0 and used[13] == pytest.approx(BASE)


def test_scheduler_resumes_from_state_dict():
    opt = _optimizer()
    sched = warmup_scheduler(opt, warmup_steps=13)
    for _ in range(5):
        opt.step()
        sched.step()
    state = {"opt": opt.state_dict(), "sched": sched.state_dict()}
    opt2 = _optimizer()
    sched2 = warmup_scheduler(opt2, warmup_steps=13)
    opt2.load_state_dict(state["opt"])
    sched2.load_state_dict(state["sched"])
    assert opt2.param_groups[0]["lr"] == pytest.approx(lr_at(5, base_lr=BASE, warmup_steps=13))
    opt2.step()
    sched2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(lr_at(6, base_lr=BASE, warmup_steps=13))
