"""The learning-rate schedule (docs/method.md §4): linear warmup from 0, then constant, no decay.

The scheduler steps after each optimizer update, so update k (0-based) uses `lr_at(k)` and the
first update uses lr 0, as the reference does (docs/method.md §8.9). With the recipe's 275 steps the warmup
is int(0.05 * 275) = 13 updates: lr_at(0) = 0, lr_at(1) = base/13, ..., lr_at(13) = base.
"""

from __future__ import annotations

import functools

import torch
from torch.optim.lr_scheduler import LambdaLR


def lr_at(step: int, *, base_lr: float, warmup_steps: int) -> float:
    """Learning rate of update `step` (0-based):

        lr = base_lr * min(step / warmup_steps, 1)    (base_lr when warmup_steps == 0)
    """
    if step < 0 or warmup_steps < 0:
        raise ValueError(f"step ({step}) and warmup_steps ({warmup_steps}) must be >= 0")
    if warmup_steps == 0:
        return base_lr
    return base_lr * min(step / warmup_steps, 1.0)


def warmup_scheduler(optimizer: torch.optim.Optimizer, *, warmup_steps: int) -> LambdaLR:
    """A `LambdaLR` following `lr_at` with the optimizer's lr as base_lr; call `.step()` after each
    `optimizer.step()`. Its `state_dict` (the step count) goes into checkpoints next to the optimizer's."""
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    return LambdaLR(optimizer, functools.partial(lr_at, base_lr=1.0, warmup_steps=warmup_steps))
