"""The rule rewards of docs/method.md §3 as pure functions: format r_f, accuracy r_a, the n-gram repetition
penalty r_p, and `combine`, which weighs them with the judge's r_v into a `RewardBreakdown`.

Two modes (`RewardConfig.mode`):
- `reference` reproduces the upstream reward code exactly, every edge of docs/method.md §3.6 included: the
  ground truth parsed raw (`2\\sqrt{3}` -> 2, `A` -> nothing), `45°` wrong against `45`, boxes merged
  into a set, the no-DOTALL `<answer>` search.
- `fixed` applies docs/method.md's treatment: a non-numeric ground truth is wrapped in `$...$` so it
  parses, degree notations (`°`, `\\degree`, `^ \\circ`) and full-width digits are normalised, and a
  multiple-choice letter is compared as a letter.
The format rule and the repetition penalty have no upstream bug to treat: both modes use them as is.

`accuracy_reward` runs math-verify with its signal-based timeouts off (they raise off the main
thread); callers that must bound it run it in a killable process (`judge.verifier`).
"""

from __future__ import annotations

import logging
import re
from typing import Literal

import numpy as np

from core.config import RewardConfig
from core.records import RewardBreakdown

Mode = Literal["reference", "fixed"]

FORMAT_PATTERN = re.compile(r"^<think>\n.*?\n</think>\n<answer>\n.*?\\boxed{.+?}.*?\n</answer>$", re.DOTALL)
"""The reference's format rule, used with `fullmatch` (docs/method.md §3.1)."""
ANSWER_PATTERN = re.compile(r"<answer>(.*?)</answer>")
"""The reference's answer extraction: no DOTALL, so a multi-line answer block does not match (docs/method.md §3.2)."""

_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")
_GOLD_LETTER = re.compile(r"\(?\s*([A-Z])\s*\)?\.?")
_PICKED_LETTER = re.compile(r"\(?\s*([A-Za-z])\s*\)?\.?")
_TEXT_WRAP = re.compile(r"^\\(?:text|textbf|mathrm)\{(.*)\}$", re.DOTALL)
_DEGREES = (
    (re.compile(r"\s*°"), r"^\\circ"),
    (re.compile(r"\s*\\degree\b"), r"^\\circ"),
    (re.compile(r"\s*\^\s*\{\s*\\circ\s*\}"), r"^\\circ"),
    (re.compile(r"\s*\^\s*\\circ"), r"^\\circ"),
)
_FULL_WIDTH = str.maketrans("０１２３４５６７８９．－＋", "0123456789.-+")

logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout is disabled" is deliberate here


def _check_mode(mode: str) -> None:
    if mode not in ("reference", "fixed"):
        raise ValueError(f"mode={mode!r} is not a reward mode; use 'reference' or 'fixed'")


# ------------------------------------------------------------------------------------------ format
def format_reward(text: str) -> float:
    """r_f = 1.0 iff the whole text fullmatches `^<think>\\n.*?\\n</think>\\n<answer>\\n.*?\\boxed{.+?}.*?\\n</answer>$`
    (DOTALL); a trailing newline, a leading space or `<think> x </think>` give 0.0 (docs/method.md §3.1, §3.6.3)."""
    return 1.0 if FORMAT_PATTERN.fullmatch(text) else 0.0


# ---------------------------------------------------------------------------------------- accuracy
def answer_text(text: str) -> str:
    """What gets scored: the first one-line `<answer>...</answer>` span, stripped, else the whole text
    stripped (a well-formatted multi-line answer block does not match, docs/method.md §3.2)."""
    m = ANSWER_PATTERN.search(text)
    return m.group(1).strip() if m else text.strip()


def accuracy_reward(text: str, ground_truth: str, *, mode: Mode) -> float:
    """r_a = 1.0 iff `verify(parse(gold), parse(answer_text(text)))`, gold first; any exception gives 0.0.

    `fixed` mode first compares multiple-choice letters as letters, then wraps a non-numeric gold in
    `$...$` and normalises degree notations and full-width digits on both sides.
    """
    _check_mode(mode)
    gold, given = ground_truth.strip(), answer_text(text)
    if mode == "fixed":
        letter = _choice_letter(gold)
        if letter is not None:
            return 1.0 if _predicted_letter(given) == letter else 0.0
        gold, given = _normalise(gold), _normalise(given)
        if not _NUMBER.fullmatch(gold) and "$" not in gold:
            gold = f"${gold}$"
    return _math_verify(gold, given)


def _math_verify(gold: str, given: str) -> float:
    from math_verify import parse, verify

    try:
        parsed_gold = parse(gold, parsing_timeout=None)
        return 1.0 if verify(parsed_gold, parse(given, parsing_timeout=None), timeout_seconds=None) else 0.0
    except Exception:  # noqa: BLE001 -- the reference scores any parse/verify failure as 0 (docs/method.md §3.2)
        return 0.0


def _normalise(text: str) -> str:
    text = text.translate(_FULL_WIDTH)
    for pattern, repl in _DEGREES:
        text = pattern.sub(repl, text)
    return text


def _choice_letter(gold: str) -> str | None:
    """The option letter of a multiple-choice ground truth (`A`, `(B)`, `C.`), else None."""
    m = _GOLD_LETTER.fullmatch(gold.strip().strip("$"))
    return m.group(1) if m else None


def _predicted_letter(given: str) -> str | None:
    """The letter a response picked: its last `\\boxed{...}` (else the answer text) as `C`, `(C)`, `\\text{C}`."""
    boxed = last_boxed(given)
    text = (boxed if boxed is not None else given).strip().strip("$").strip()
    unwrapped = _TEXT_WRAP.match(text)
    text = unwrapped.group(1).strip() if unwrapped else text
    m = _PICKED_LETTER.fullmatch(text)
    return m.group(1).upper() if m else None


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` with nested braces matched; None if there is none or it is cut off."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for k in range(begin, len(text)):
        depth += {"{": 1, "}": -1}.get(text[k], 0)
        if depth < 0:
            return text[begin:k]
    return None


# -------------------------------------------------------------------------------------- repetition
def repetition_penalty(text: str, *, n: int = 20, penalty: float = -2.0) -> float:
    """r_p = (1 - U/T) * penalty over the lower-cased whitespace words, T = #n-grams, U = #distinct
    n-grams; 0.0 for a blank text or fewer than n words (docs/method.md §3.4). 100 copies of a word: -1.975."""
    if n < 1:
        raise ValueError(f"n={n} must be >= 1")
    words = text.lower().split()
    if not text.strip() or len(words) < n:
        return 0.0
    grams = list(zip(*[words[i:] for i in range(n)]))
    return (1.0 - len(set(grams)) / len(grams)) * penalty


# ----------------------------------------------------------------------------------------- combine
def combine(
    *,
    accuracy: float,
    format: float,
    repetition: float,
    visual: float,
    weights: RewardConfig,
    verdicts: tuple[float, ...] = (),
    judge_failed: bool = False,
    judge_error: str = "",
) -> RewardBreakdown:
    """R = w_a*r_a + w_f*r_f + w_p*r_p + w_v*r_v, accumulated in float32 in the reference's order
    (rule part, then + penalty, then + visual: its reward tensor is float32, docs/method.md §3.6.6);
    `overall` = w_a*r_a + w_f*r_f + w_v*r_v in float64, without r_p (docs/method.md §3.5)."""
    rule = weights.accuracy_weight * accuracy + weights.format_weight * format
    visual_term = weights.visual_weight * visual if weights.use_visual_reward else 0.0
    total = np.float32(rule) + np.float32(weights.repetition_weight * repetition)
    total = np.float32(total + np.float32(visual_term))
    return RewardBreakdown(accuracy=float(accuracy), format=float(format), repetition=float(repetition),
                           visual=float(visual), total=float(total), overall=float(rule + visual_term),
                           verdicts=tuple(float(v) for v in verdicts), judge_failed=judge_failed,
                           judge_error=judge_error)
