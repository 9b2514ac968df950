"""Stage 2, accuracy filter: keep a problem if one of its distilled solutions math-verifies
against the ground truth under the reward's accuracy rule (spec §3.2, §8.12), and keep that
solution (the first correct one in the method's format, else the first correct one). The faithful
rule drops problems whose bare-LaTeX ground truth it mis-parses, which the reward could never score
as correct either; `--answer-mode wrap` keeps them (pair it with the same mode in training).

Pure CPU and deterministic, so it is recomputed from distill.jsonl on every run (seconds for
Geometry3K) and written whole to filter.jsonl.

NOTE: `accuracy` follows spec §3.2 directly with math-verify. When the judge role's
`judge.rules.accuracy_reward` lands, this should call it instead so the two cannot drift.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from typing import Literal

from dataprep.distill import DistillRecord
from replay.records import Prompt

PROGRESS_FILE = "filter.jsonl"
AnswerMode = Literal["faithful", "wrap"]
_ANSWER = re.compile(r"<answer>(.*?)</answer>")  # no DOTALL, as upstream (spec §3.2, §8.2)
_FORMAT = re.compile(r"^<think>\n.*?\n</think>\n<answer>\n.*?\\boxed{.+?}.*?\n</answer>$", re.DOTALL)


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
    """r_a of spec §3.2: 1.0 iff math-verify accepts the answer; any exception gives 0.

    mode `faithful` parses the ground truth raw, as upstream, so a bare-LaTeX answer is mis-parsed
    (`4\\sqrt{3}` reads as 4) and never matches; `wrap` parses it inside `$…$` (spec §8.3).
    """
    from math_verify import parse, verify

    gt = ground_truth.strip()
    if mode == "wrap" and "$" not in gt:
        gt = f"${gt}$"
    m = _ANSWER.search(response)
    given = m.group(1).strip() if m else response.strip()
    # math-verify's timeouts use signal.alarm, which raises outside the main thread (and the
    # exception would silently score 0): off the main thread, call it without them.
    main = threading.current_thread() is threading.main_thread()
    parse_timeout, verify_timeout = (5, 5) if main else (None, None)
    try:
        gold, target = parse(gt, parsing_timeout=parse_timeout), parse(given, parsing_timeout=parse_timeout)
        return float(verify(gold, target, timeout_seconds=verify_timeout))
    except Exception:  # the spec's rule: a parse or verify failure scores 0
        return 0.0


def well_formatted(response: str) -> bool:
    """r_f of spec §3.1 as a bool (used only to prefer well-formed solutions)."""
    return _FORMAT.fullmatch(response) is not None


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
