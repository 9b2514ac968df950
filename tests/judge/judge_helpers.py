"""Rollout groups for the judge tests, and the rewards they should get, computed in-process from the
pure rule functions and the lexical judge (the oracle the deployed app is compared with)."""

from __future__ import annotations

import numpy as np

from core.config import JudgeConfig
from core.records import Prompt, RewardBreakdown, Rollout, RolloutGroup
from judge.lexical import lexical_verdicts
from judge.rules import accuracy_reward, combine, format_reward, repetition_penalty
from judge.verdicts import parse_verdicts, render_verdicts

F = "<think>\n{t}\n</think>\n<answer>\n{a}\n</answer>"
ANNOTATIONS = ("AB = 7", "BC = {b}", "AC = 10")


def make_group(i: int, *, annotations: bool = True) -> RolloutGroup:
    """Prompt i: triangle AB = 7, BC = i, AC = 10, perimeter 17 + i; four different rollouts."""
    answer = str(17 + i)
    items = tuple(a.format(b=i) for a in ANNOTATIONS) if annotations else ()
    texts = (
        F.format(t=f"The diagram shows AB = 7, BC = {i}, AC = 10.\nSo 7 + {i} + 10 = {answer}.", a=rf"\boxed{{{answer}}}"),
        F.format(t=f"AB = 7 and AC = 10, guess BC = {i + 1}.", a=rf"\boxed{{{18 + i}}}"),
        f"the perimeter is {answer} " + "so so so " * 12,
        "",
    )
    rollouts = tuple(Rollout(np.arange(k + 1, dtype=np.int32), np.full(k + 1, -0.5, np.float32), t, "stop", 3, 3)
                     for k, t in enumerate(texts))
    prompt = Prompt(f"tri-{i}", i, "Find the perimeter. <image>", answer, b"\x89PNG", items)
    return RolloutGroup(prompt, np.arange(5, dtype=np.int32), rollouts, actor_id=0, generate_seconds=0.5, seq=i)


def expected_rewards(group: RolloutGroup, cfg: JudgeConfig) -> tuple[RewardBreakdown, ...]:
    """What scoring must give with a healthy lexical judge."""
    reward, prompt, out = cfg.reward, group.prompt, []
    for r in group.rollouts:
        verdicts = None
        if prompt.annotations and reward.use_visual_reward:
            verdicts = parse_verdicts(render_verdicts(lexical_verdicts(prompt.annotations, r.text)),
                                      num_items=len(prompt.annotations),
                                      strict=cfg.verdict_mode == "strict" or reward.mode == "fixed",
                                      finite=reward.mode == "fixed")
        out.append(combine(accuracy=accuracy_reward(r.text, prompt.answer, mode=reward.mode),
                           format=format_reward(r.text),
                           repetition=repetition_penalty(r.text, n=reward.ngram_size, penalty=reward.repetition_penalty),
                           visual=verdicts.visual if verdicts else 0.0, weights=reward,
                           verdicts=verdicts.scores if verdicts else ()))
    return tuple(out)
