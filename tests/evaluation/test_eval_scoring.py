"""Scoring pieces: the answer span, the extraction fallback, the judgement message layout and reply
parsing, math-verify on extracted answers, and option letters for multiple choice."""

from __future__ import annotations

import pytest

from core.records import Prompt
from evaluation.benchmarks import BenchmarkItem
from evaluation.scoring import (
    Extraction,
    answer_span,
    extraction_messages,
    judgement_messages,
    local_extraction,
    mathverify_correct,
    parse_extraction,
    parse_judgement,
    predicted_letter,
)

FORMATTED = "<think>\nThe sides are 3 and 4.\n</think>\n<answer>\n\\boxed{5}\n</answer>"


def item(answer: str, *, choices: str = "", options: tuple[str, ...] = (), context: str = "") -> BenchmarkItem:
    prompt = Prompt(id="t-1", index=0, problem="<image>q", answer=answer, image=b"")
    return BenchmarkItem("t", prompt, choices=choices, options=options, extraction_context=context)


def test_answer_span_spans_lines_and_takes_the_first():
    assert answer_span(FORMATTED) == "\n\\boxed{5}\n"
    assert answer_span("<answer>A</answer> then <answer>B</answer>") == "A"
    assert answer_span("no tags, the answer is 5") is None
    assert answer_span("<answer></answer>") is None  # .+? needs a character
    assert local_extraction(FORMATTED) == Extraction("\n\\boxed{5}\n", "span")
    assert local_extraction("it is 5") == Extraction("it is 5", "none")


def test_extraction_reply_without_tags_keeps_whole_response():
    assert parse_extraction("<answer>12</answer>", response="long response") == Extraction("12", "llm")
    assert parse_extraction("12", response="long response") == Extraction("long response", "llm_untagged")


def test_extraction_messages_put_context_before_response():
    system, user = extraction_messages(item("5", context="Question: how many?"), response="I count five, so 5.")
    assert system["role"] == "system" and "<answer>null</answer>" in system["content"]
    assert user == {"role": "user", "content": "Question: how many?\n\nModel response: I count five, so 5.\n\nExtracted answer: "}
    _, user = extraction_messages(item("5"), response="r")
    assert user["content"] == "Model response: r\n\nExtracted answer: "


def test_judgement_message_layout():
    _, user = judgement_messages(item("40°"), extracted="\\boxed{40}")
    assert user["content"] == "**Response**: \\boxed{40}\n**Ground Truth Answer**: 40°\n"
    _, user = judgement_messages(item("B", choices="A. 20\nB. 40"), extracted="B")
    assert user["content"] == "**Choices**: A. 20\nB. 40\n**Response**: B\n**Ground Truth Answer**: B\n"


@pytest.mark.parametrize("reply,expected", [
    ("true", True), ("False", False), ("'true'", True), ("**false**", False), (" True.\n", True),
    ("The response is correct: true", True), ("false, because 40 != 50", False),
    ("not sure", None), ("true or false?", True), ("it could be false or true", None), ("", None),
])
def test_parse_judgement(reply, expected):
    assert parse_judgement(reply) is expected


def test_mathverify_on_extracted_answers():
    assert mathverify_correct(item("5"), extracted="\n\\boxed{5}\n")
    assert not mathverify_correct(item("5"), extracted="\n\\boxed{6}\n")
    assert mathverify_correct(item("0.5"), extracted="\\boxed{\\frac{1}{2}}")
    assert mathverify_correct(item("24"), extracted="so the answer is 24")
    assert not mathverify_correct(item("24"), extracted="")


def test_mathverify_modes():
    # reference: the raw LaTeX ground truth is mis-parsed (docs/method.md §3.6.5); fixed wraps it so it parses
    assert not mathverify_correct(item("2\\sqrt{3}"), extracted="\\boxed{2\\sqrt{3}}", mode="reference")
    assert mathverify_correct(item("2\\sqrt{3}"), extracted="\\boxed{2\\sqrt{3}}", mode="fixed")
    # a letter answer without listed choices: only the fixed rule compares letters
    assert not mathverify_correct(item("B"), extracted="\\boxed{B}", mode="reference")
    assert mathverify_correct(item("B"), extracted="\\boxed{B}", mode="fixed")


def test_letters_compared_for_multiple_choice():
    mc = item("C", choices="A. 2\nB. 3\nC. 4")
    assert mathverify_correct(mc, extracted="\\boxed{C}")
    assert mathverify_correct(mc, extracted="(C) 4")
    assert not mathverify_correct(mc, extracted="\\boxed{B}")
    # MathVista stores the option text as the answer: a letter or the text itself both count
    mv = item("equal to", choices="A. larger than\nB. equal to", options=("larger than", "equal to"))
    assert mathverify_correct(mv, extracted="B")
    assert mathverify_correct(mv, extracted="\\boxed{equal to}")
    assert not mathverify_correct(mv, extracted="A. larger than")


def test_predicted_letter():
    assert predicted_letter("$B$") == "B"
    assert predicted_letter("D: 12 cm") == "D"
    assert predicted_letter("Because") is None
    assert predicted_letter("equal to", options=("larger than", "equal to")) == "B"
