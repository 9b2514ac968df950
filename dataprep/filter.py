"""Stage 2, accuracy filter: keep a problem if one of its distilled solutions math-verifies
against the ground truth under the reward's accuracy rule (docs/method.md §3.2, §8.12), and keep that
solution (the first correct one in the method's format, else the first correct one). The faithful
rule drops problems whose bare-LaTeX ground truth it mis-parses, which the reward could never score
as correct either; `--answer-mode wrap` keeps them (pair it with the same mode in training).

Pure CPU and deterministic, so it is recomputed from distill.jsonl on every run (seconds for
Geometry3K) and written whole to filter.jsonl.

"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from core.records import Prompt
from dataprep.distill import DistillRecord

PROGRESS_FILE = "filter.jsonl"
AnswerMode = Literal["faithful", "wrap"]


@dataclass(frozen=True, slots=True)
class FilterRecord:
    """The filter's verdict on one problem (a line of filter.jsonl)."""

    id: str
    kept: bool
    reason: str
    """Why it was dropped: `no_correct_sample`, `distill_error` or `not_distilled`; empty if kept."""
    solution: str
    """The kept solution (empty if dropped)."""
    num_correct: int
    num_samples: int


def accuracy(response: str, *, ground_truth: str, mode: AnswerMode = "faithful") -> float:
    """r_a of docs/method.md §3.2, the training reward's own rule (`judge.rules.accuracy_reward`), so the filter
    and the reward cannot drift: `faithful` is reward mode `reference` (the ground truth parsed raw, so
    `4\\sqrt{3}` reads as 4 and never matches); `wrap` is reward mode `fixed` (non-numeric ground
    truths wrapped in `$…$`, docs/method.md §8.3, plus the fixed mode's other treatments)."""
    from judge.rules import accuracy_reward

    return accuracy_reward(response, ground_truth, mode="reference" if mode == "faithful" else "fixed")


def well_formatted(response: str) -> bool:
    """r_f of docs/method.md §3.1 as a bool (used only to prefer well-formed solutions)."""
    from judge.rules import format_reward

    return format_reward(response) == 1.0


def filter_one(prompt: Prompt, *, record: DistillRecord | None, mode: AnswerMode = "faithful") -> FilterRecord:
    if record is None or record.status != "ok":
        reason = "not_distilled" if record is None else "distill_error"
        return FilterRecord(prompt.id, False, reason, "", 0, 0 if record is None else len(record.samples))
    correct = [s for s in record.samples if accuracy(s, ground_truth=prompt.answer, mode=mode) == 1.0]
    if not correct:
        return FilterRecord(prompt.id, False, "no_correct_sample", "", 0, len(record.samples))
    solution = next((s for s in correct if well_formatted(s)), correct[0])
    return FilterRecord(prompt.id, True, "", solution, len(correct), len(record.samples))


def filter_all(
    prompts: list[Prompt], *, distilled: dict[str, DistillRecord], mode: AnswerMode = "faithful"
) -> list[FilterRecord]:
    return [filter_one(p, record=distilled.get(p.id), mode=mode) for p in prompts]
