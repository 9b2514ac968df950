"""Table-driven tests of the rule rewards against the reference's definitions (docs/method.md §3.1-3.6).

Every surprising expectation below (raw ground truths, merged boxes, degree notations) was checked
by running math-verify 0.9.0 / latex2sympy2_extended 1.11.0, the versions docs/method.md §3.6 was observed with.
"""

import pytest

from core.config import RewardConfig
from judge.rules import (
    accuracy_reward,
    answer_text,
    combine,
    format_reward,
    last_boxed,
    repetition_penalty,
)

F = "<think>\n{t}\n</think>\n<answer>\n{a}\n</answer>"
OK = F.format(t="AB = 7, BC = 7, AC = 10, so 7 + 7 + 10 = 24.", a=r"The perimeter is \boxed{24}.")

# ------------------------------------------------------------------------------------------ format
FORMAT_CASES = [
    ("canonical", OK, 1.0),
    ("box only in answer", F.format(t="x", a=r"\boxed{24}"), 1.0),
    ("trailing newline", OK + "\n", 0.0),
    ("trailing space", OK + " ", 0.0),
    ("leading space", " " + OK, 0.0),
    ("leading newline", "\n" + OK, 0.0),
    ("spaces instead of newlines", r"<think> x </think>\n<answer>\n\boxed{1}\n</answer>", 0.0),
    ("no box", F.format(t="x", a="24"), 0.0),
    ("empty box", F.format(t="x", a=r"\boxed{}"), 0.0),
    ("box with extra brace passes", F.format(t="x", a=r"\boxed{}}"), 1.0),
    ("blank lines inside think", "<think>\n\n\nx\n\n</think>\n<answer>\n\\boxed{1}\n</answer>", 1.0),
    ("blank lines inside answer", "<think>\nx\n</think>\n<answer>\n\n\\boxed{1}\n\n</answer>", 1.0),
    ("two newlines between blocks", "<think>\nx\n</think>\n\n<answer>\n\\boxed{1}\n</answer>", 0.0),
    ("no newline between blocks", "<think>\nx\n</think><answer>\n\\boxed{1}\n</answer>", 0.0),
    ("space after </think>", "<think>\nx\n</think> \n<answer>\n\\boxed{1}\n</answer>", 0.0),
    ("CRLF inside blocks", "<think>\nline1\r\nline2\r\n</think>\n<answer>\n\\boxed{3}\r\n</answer>", 1.0),
    ("CRLF after <think>", "<think>\r\nx\n</think>\n<answer>\n\\boxed{3}\n</answer>", 0.0),
    ("repeated blocks", F.format(t="a", a=r"\boxed{1}") + "\n" + F.format(t="b", a=r"\boxed{2}"), 1.0),
    ("whole response twice", OK + OK, 1.0),
    ("box spanning a newline", F.format(t="x", a="\\boxed{1\n2}"), 1.0),
    ("nested box content", F.format(t="x", a=r"\boxed{\frac{1}{2}}"), 1.0),
    ("box only in think", F.format(t=r"\boxed{24}", a="24"), 0.0),
    ("box glued to </answer>", "<think>\nx\n</think>\n<answer>\n\\boxed{1}</answer>", 0.0),
    ("empty think", "<think>\n\n</think>\n<answer>\n\\boxed{1}\n</answer>", 1.0),
    ("upper-case tags", OK.replace("think", "THINK"), 0.0),
    ("truncated in think", "<think>\nAB = 7, so the perim", 0.0),
    ("truncated before </answer>", "<think>\nx\n</think>\n<answer>\n\\boxed{24}\n", 0.0),
    ("text after </answer>", OK + " done", 0.0),
    ("answer block only", "<answer>\n\\boxed{1}\n</answer>", 0.0),
    ("nested think tags", "<think>\n<think>\nx\n</think>\n</think>\n<answer>\n\\boxed{1}\n</answer>", 1.0),
    ("tab instead of newline", "<think>\tx\n</think>\n<answer>\n\\boxed{1}\n</answer>", 0.0),
    ("space in \\boxed {", F.format(t="x", a=r"\boxed {24}"), 0.0),
    ("\\fbox", F.format(t="x", a=r"\fbox{24}"), 0.0),
    ("unicode content", F.format(t="角 ABC = 45°, ∠B = 90°", a=r"答案 \boxed{45°}"), 1.0),
    ("empty string", "", 0.0),
    ("repetition loop inside think", F.format(t="the the " * 200, a=r"\boxed{1}"), 1.0),
]


@pytest.mark.parametrize("name,text,expected", FORMAT_CASES, ids=[c[0] for c in FORMAT_CASES])
def test_format_reward(name, text, expected):
    assert format_reward(text) == expected


# ---------------------------------------------------------------------------------------- accuracy
def _boxed(answer: str) -> str:
    return F.format(t="x", a=rf"\boxed{{{answer}}}")


# (name, response, ground truth, reference r_a, fixed r_a)
ACCURACY_CASES = [
    ("formatted, right", OK, "24", 1.0, 1.0),
    ("think 24, answer 25", F.format(t=r"so \boxed{24}", a=r"\boxed{25}"), "24", 0.0, 0.0),
    ("unformatted text", "so the answer is 24", "24", 1.0, 1.0),
    ("gt 2\\sqrt{3} parses to 2: right answer", _boxed(r"2\sqrt{3}"), r"2\sqrt{3}", 0.0, 1.0),
    ("gt 2\\sqrt{3} parses to 2: answer 2", _boxed("2"), r"2\sqrt{3}", 1.0, 0.0),
    ("gt \\sqrt{3} parses to nothing", _boxed(r"\sqrt{3}"), r"\sqrt{3}", 0.0, 1.0),
    ("gt \\dfrac{1}{2} parses to nothing", _boxed(r"\frac{1}{2}"), r"\dfrac{1}{2}", 0.0, 1.0),
    ("gt \\frac{\\sqrt{3}}{2} parses to nothing", _boxed(r"\frac{\sqrt{3}}{2}"), r"\frac{\sqrt{3}}{2}", 0.0, 1.0),
    ("gt [1,2) parses to nothing", _boxed("[1,2)"), "[1,2)", 0.0, 1.0),
    ("gt 2 \\sqrt { 221 } parses to 221", _boxed("221"), r"2 \sqrt { 221 }", 1.0, 0.0),
    ("gt \\frac { 40 } { 3 } parses to 3", _boxed("3"), r"\frac { 40 } { 3 }", 1.0, 0.0),
    ("gt \\frac { 40 } { 3 }: right answer", _boxed(r"\frac{40}{3}"), r"\frac { 40 } { 3 }", 0.0, 1.0),
    ("gt 4\\pi parses to 4", _boxed("4"), r"4\pi", 1.0, 0.0),
    ("gt 3\\sqrt{2} vs \\sqrt{18}", _boxed(r"\sqrt{18}"), r"3\sqrt{2}", 0.0, 1.0),
    ("gt $2\\sqrt{3}$ already wrapped", _boxed(r"2\sqrt{3}"), r"$2\sqrt{3}$", 1.0, 1.0),
    ("multiple choice A", _boxed("A"), "A", 0.0, 1.0),
    ("multiple choice (A) vs A", _boxed("(A)"), "A", 0.0, 1.0),
    ("multiple choice \\text{C}", _boxed(r"\text{C}"), "C", 0.0, 1.0),
    ("multiple choice wrong letter", _boxed("A"), "B", 0.0, 0.0),
    ("degrees 45°", _boxed("45°"), "45", 0.0, 1.0),
    ("degrees 45 ^ \\circ", _boxed(r"45 ^ \circ"), "45", 0.0, 1.0),
    ("degrees 45\\degree", _boxed(r"45\degree"), "45", 0.0, 1.0),
    ("full-width digits", _boxed("４５"), "45", 0.0, 1.0),
    ("degrees 45^\\circ", _boxed(r"45^\circ"), "45", 1.0, 1.0),
    ("degrees 45^{\\circ}", _boxed(r"45^{\circ}"), "45", 1.0, 1.0),
    ("fraction vs decimal", _boxed("0.5"), r"\frac{1}{2}", 1.0, 1.0),
    ("decimal gt vs fraction", _boxed(r"\frac{1}{2}"), "0.5", 1.0, 1.0),
    ("\\dfrac in answer", _boxed(r"\dfrac{24}{2}"), "12", 1.0, 1.0),
    ("units \\text{ cm}", _boxed(r"24 \text{ cm}"), "24", 1.0, 1.0),
    ("units cm glued", _boxed("24cm"), "24", 1.0, 1.0),
    ("units \\mathrm{cm}^2", _boxed(r"24 \text{ cm}^2"), "24", 1.0, 1.0),
    ("percent", _boxed(r"50\%"), "50", 1.0, 1.0),
    ("x = 5", _boxed("x = 5"), "5", 1.0, 1.0),
    ("negative", _boxed("-3"), "-3", 1.0, 1.0),
    ("sign wrong", _boxed("3"), "-3", 0.0, 0.0),
    ("24.0 vs 24", _boxed("24.0"), "24", 1.0, 1.0),
    ("rounded to 6 places", _boxed("3.1415927"), "3.14159265", 1.0, 1.0),
    ("rounded to 2 places", _boxed("3.14"), "3.1416", 0.0, 0.0),
    ("unicode pi, gt 4\\pi", _boxed("4π"), r"4\pi", 0.0, 1.0),
    ("gt padded with whitespace", OK, "  24\n", 1.0, 1.0),
    ("boxes merged: gap ' so '", F.format(t="x", a=r"\boxed{12} so \boxed{13}"), "13", 0.0, 0.0),
    ("boxes merged: gap ', '", F.format(t="x", a=r"\boxed{12}, \boxed{13}"), "13", 0.0, 0.0),
    ("boxes not merged: 15-char plain gap", F.format(t="x", a=r"\boxed{12} then we find \boxed{13}"), "13", 1.0, 1.0),
    ("boxes merged: 50-char gap with 'and'", F.format(t="x", a=r"\boxed{12} and" + " x" * 23 + r" \boxed{13}"), "13", 0.0, 0.0),
    ("boxes not merged: 80-char gap with 'and'", F.format(t="x", a=r"\boxed{12} and" + " x" * 38 + r" \boxed{13}"), "13", 1.0, 1.0),
    ("think box merged across blocks via ';'", F.format(t=r"so \boxed{12}; check", a=r"\boxed{13}"), "13", 0.0, 0.0),
    ("think box not merged (no separator)", F.format(t=r"so \boxed{12}", a=r"\boxed{13}"), "13", 1.0, 1.0),
    ("think box beats box-less answer", F.format(t=r"we get \boxed{13}", a="the answer is above"), "13", 1.0, 1.0),
    ("nested \\boxed", _boxed(r"\boxed{24}"), "24", 1.0, 1.0),
    ("no box, bare number", F.format(t="x", a="24"), "24", 1.0, 1.0),
    ("no answer at all", "I don't know", "24", 0.0, 0.0),
    ("empty response", "", "24", 0.0, 0.0),
    ("truncated in think", "<think>\nFirst, AB = 7 and BC = 7, so the perim", "24", 0.0, 0.0),
    ("truncated inside box", "<think>\nx\n</think>\n<answer>\n\\boxed{2", "24", 0.0, 0.0),
    ("one-line answer block is scored", r"<answer>\boxed{24}</answer>", "24", 1.0, 1.0),
    ("first one-line answer (in think) wins", "<think>\nmaybe <answer>25</answer>\n</think>\n<answer>\n\\boxed{24}\n</answer>", "24", 0.0, 0.0),
    ("first one-line answer (in think) wins, gold 25", "<think>\nmaybe <answer>25</answer>\n</think>\n<answer>\n\\boxed{24}\n</answer>", "25", 1.0, 1.0),
    ("repetition loop, right box", F.format(t="7 " * 300, a=r"\boxed{24}"), "24", 1.0, 1.0),
]


@pytest.mark.parametrize("name,text,gt,reference,fixed", ACCURACY_CASES, ids=[c[0] for c in ACCURACY_CASES])
def test_accuracy_reward(name, text, gt, reference, fixed):
    assert accuracy_reward(text, gt, mode="reference") == reference
    assert accuracy_reward(text, gt, mode="fixed") == fixed


def test_accuracy_rejects_an_unknown_mode():
    with pytest.raises(ValueError, match="'reference' or 'fixed'"):
        accuracy_reward(OK, "24", mode="lenient")


def test_answer_text_uses_the_no_dotall_rule():
    assert answer_text(OK) == OK.strip()  # the multi-line answer block does not match
    assert answer_text("a <answer> 7 </answer> b <answer>8</answer>") == "7"


@pytest.mark.parametrize("text,expected", [(r"x \boxed{1} \boxed{\frac{a}{b}}", r"\frac{a}{b}"), ("none", None),
                                           (r"\boxed{2", None), (r"\boxed{}", "")])
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


# -------------------------------------------------------------------------------------- repetition
def _words(k: int, prefix: str = "w") -> str:
    return " ".join(f"{prefix}{i}" for i in range(k))


BLOCK60 = _words(60)
REPETITION_CASES = [
    ("empty", "", {}, 0.0),
    ("blank", "   \n\t ", {}, 0.0),
    ("19 words", _words(19), {}, 0.0),
    ("19 copies", "a " * 19, {}, 0.0),
    ("20 distinct words", _words(20), {}, 0.0),
    ("20 copies: one 20-gram", "a " * 20, {}, 0.0),
    ("21 copies", "a " * 21, {}, (1 - 1 / 2) * -2.0),
    ("25 copies", "a " * 25, {}, (1 - 1 / 6) * -2.0),
    ("39 copies", "a " * 39, {}, (1 - 1 / 20) * -2.0),
    ("100 copies of one word", " ".join(["word"] * 100), {}, -1.9753086419753085),
    ("60-word block twice", BLOCK60 + " " + BLOCK60, {}, -0.8118811881188119),
    ("60-word block three times", " ".join([BLOCK60] * 3), {}, (1 - 60 / 161) * -2.0),
    ("200 distinct words", _words(200), {}, 0.0),
    ("10-word phrase five times", " ".join([_words(10)] * 5), {}, (1 - 10 / 31) * -2.0),
    ("two alternating words", "a b " * 20, {}, (1 - 2 / 21) * -2.0),
    ("three-word cycle", "a b c " * 20, {}, (1 - 3 / 41) * -2.0),
    ("40 distinct then first 20 again", _words(40) + " " + _words(20), {}, (1 - 40 / 41) * -2.0),
    ("two different 30-word blocks", _words(30, "x") + " " + _words(30, "y"), {}, 0.0),
    ("case-insensitive", " ".join(["Word", "word", "WORD"] * 7), {}, (1 - 1 / 2) * -2.0),
    ("punctuation makes words distinct", " ".join(["a.", "a"] * 10) + " a.", {}, (1 - 2 / 2) * -2.0),
    ("newlines and tabs are whitespace", "a\n" * 10 + "a\t" * 11, {}, (1 - 1 / 2) * -2.0),
    ("unicode words", "角 " * 21, {}, (1 - 1 / 2) * -2.0),
    ("unicode without spaces is one word", "角" * 100, {}, 0.0),
    ("loop inside the format", F.format(t="so " * 100, a=r"\boxed{1}"), {}, None),
    ("n=3", "a b a b a", {"n": 3}, (1 - 2 / 3) * -2.0),
    ("n=1", "a a b", {"n": 1}, (1 - 2 / 3) * -2.0),
    ("penalty -1", "a " * 21, {"penalty": -1.0}, -0.5),
    ("penalty 0", "a " * 100, {"penalty": 0.0}, 0.0),
    ("n=5 below guard", "a a a a", {"n": 5}, 0.0),
    ("n=2 distinct", "a b c d", {"n": 2}, 0.0),
    ("trailing spaces do not count", _words(19) + "      ", {}, 0.0),
    ("truncated loop mid-phrase", " ".join([_words(10)] * 4) + " w0 w1 w2", {}, (1 - 10 / 24) * -2.0),
]


@pytest.mark.parametrize("name,text,kwargs,expected", REPETITION_CASES, ids=[c[0] for c in REPETITION_CASES])
def test_repetition_penalty(name, text, kwargs, expected):
    if expected is None:  # the formatted loop: words = think/answer tokens + 100 "so"
        words = text.lower().split()
        grams = list(zip(*[words[i:] for i in range(20)]))
        expected = (1 - len(set(grams)) / len(grams)) * -2.0
        assert expected < -1.5
    assert repetition_penalty(text, **kwargs) == pytest.approx(expected, abs=1e-12)


def test_repetition_penalty_spec_examples_rounded():
    assert round(repetition_penalty(" ".join(["x"] * 100)), 3) == -1.975
    assert round(repetition_penalty(BLOCK60 + " " + BLOCK60), 3) == -0.812


def test_repetition_rejects_n_zero():
    with pytest.raises(ValueError, match="n=0"):
        repetition_penalty("a b", n=0)


# ----------------------------------------------------------------------------------------- combine
def test_combine_weights_and_overall():
    b = combine(accuracy=1.0, format=1.0, repetition=-0.5, visual=0.5, weights=RewardConfig())
    assert b.overall == pytest.approx(0.9 + 0.1 + 0.35)  # excludes r_p
    assert b.total == pytest.approx(0.9 + 0.1 - 0.5 + 0.35, abs=1e-6)
    assert (b.accuracy, b.format, b.repetition, b.visual) == (1.0, 1.0, -0.5, 0.5)


@pytest.mark.parametrize("a,f", [(1.0, 1.0), (0.0, 1.0), (1.0, 0.0)])
def test_combine_sums_in_float32_like_the_reference_tensor(a, f):
    """The oracle is the reference's own accumulation: a float32 tensor cell, `=` then `+=` twice."""
    import torch

    v = 2 / (3 + 1e-6)  # <info1>1</info1><info2>0</info2><info3>1</info3>
    p = (1 - 1 / 81) * -2.0  # 100 copies of one word
    cell = torch.zeros(1, 4, dtype=torch.float32)
    cell[0, 3] = 0.9 * a + 0.1 * f
    cell[0, 3] += p
    cell[0, 3] += 0.7 * v
    b = combine(accuracy=a, format=f, repetition=p, visual=v, weights=RewardConfig())
    assert b.total == cell[0, 3].item()
    assert b.total != 0.9 * a + 0.1 * f + p + 0.7 * v  # the float64 sum differs in the 7th-8th digit
    assert abs(b.total - (0.9 * a + 0.1 * f + p + 0.7 * v)) < 1e-6
    assert b.overall == 0.9 * a + 0.1 * f + 0.7 * v


def test_combine_custom_weights_and_visual_off():
    cfg = RewardConfig(accuracy_weight=1.0, format_weight=0.5, repetition_weight=0.5, visual_weight=1.0,
                       use_visual_reward=False)
    b = combine(accuracy=1.0, format=1.0, repetition=-1.0, visual=0.8, weights=cfg)
    assert b.total == 1.0 and b.overall == 1.5


def test_combine_keeps_verdicts_and_failure():
    b = combine(accuracy=0.0, format=0.0, repetition=0.0, visual=0.0, weights=RewardConfig(), verdicts=(1, 0),
                judge_failed=True, judge_error="timeout")
    assert b.verdicts == (1.0, 0.0) and b.judge_failed and b.judge_error == "timeout"
