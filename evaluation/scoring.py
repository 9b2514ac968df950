"""Per-item scoring of a response, two ways:

1. The reference's scorer (docs/method.md §6): the extracted answer is the `<answer>(.+?)</answer>` span
   (DOTALL) when the response has one, else what a few-shot LLM extraction request returns between
   `<answer>` tags (an extraction reply without tags leaves the whole response, as upstream does);
   then a text LLM judges it against the ground truth and replies true/false. The judgement message
   is `**Choices**: ...\\n` (multiple choice only) + `**Response**: <extracted>\\n**Ground Truth Answer**: <gt>\\n`.
   Our instructions and examples are our own wording, with the reference's structure.
2. A free, deterministic score: math-verify, `verify(parse(gt), parse(extracted))`, through the
   training accuracy rule (`judge.rules.accuracy_reward`, timeouts disabled; `reference` or `fixed`
   mode). For multiple-choice items whose answer is an option letter (or an option's text) the
   option letters are compared instead, since math-verify parses no letters (docs/method.md §3.6.5).

Both endpoints are reached through `core.openai_calls.ChatClient` (bounded concurrency,
timeouts, retries); a request that still fails raises, and the run stops with finished items saved.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from evaluation.benchmarks import BenchmarkItem
from judge.rules import Mode, accuracy_reward, last_boxed

ANSWER_SPAN = re.compile(r"<answer>(.+?)</answer>", re.DOTALL)

EXTRACTION_INSTRUCTIONS = """\
You will see a model's response to a math problem. Find the final answer the response commits to and \
write only that answer between <answer> and </answer>. For a multiple-choice problem write only the \
option letter. If the response never gives an answer, write <answer>null</answer>. Do not explain.

Examples:
"""
EXTRACTION_EXAMPLES = (
    ("Adding the two known sides gives 7 + 5 = 12, so the perimeter is 12 cm.", "12"),
    ("The angle we computed is 45 degrees, which is option C.", "C"),
    ("With slope -3/4 and intercept 2 the line is y = -\\frac{3}{4}x + 2.", "y = -\\frac{3}{4}x + 2"),
    ("Rounded to one decimal place, the ladder reaches about 8.7 meters up the wall.", "8.7"),
    ("The figure does not show enough lengths to decide this.", "null"),
)
JUDGEMENT_INSTRUCTIONS = (
    "You grade answers to math problems. Decide whether the **Response** states the same answer as the "
    "**Ground Truth Answer**: equal values, equivalent expressions, or the same option count as the same. "
    "Reply with one word: 'true' if it does, otherwise 'false'. Give no explanation."
)


@dataclass(frozen=True, slots=True)
class Extraction:
    text: str
    """What the judge sees as **Response** and math-verify parses."""
    method: str
    """`span` (the response's answer block), `llm` (extraction request), `llm_untagged` (the extraction
    reply had no tags: the whole response, as upstream), `none` (no extractor configured: the whole response)."""


# ------------------------------------------------------------------------------------ extraction
def answer_span(response: str) -> str | None:
    """The first `<answer>...</answer>` span's content, across lines (None when there is none)."""
    found = ANSWER_SPAN.search(response)
    return found.group(1) if found else None


def extraction_messages(item: BenchmarkItem, *, response: str) -> list[dict]:
    """The few-shot extraction request: instructions + examples (system), the response (user)."""
    examples = "\n".join(f"{k}.\nModel response: {r}\nExtracted answer: <answer>{a}</answer>\n"
                         for k, (r, a) in enumerate(EXTRACTION_EXAMPLES, start=1))
    context = f"{item.extraction_context}\n\n" if item.extraction_context else ""
    return [{"role": "system", "content": EXTRACTION_INSTRUCTIONS + examples},
            {"role": "user", "content": f"{context}Model response: {response}\n\nExtracted answer: "}]


def parse_extraction(reply: str, *, response: str) -> Extraction:
    span = answer_span(reply)
    return Extraction(span, "llm") if span is not None else Extraction(response, "llm_untagged")


# ------------------------------------------------------------------------------------- judgement
def judgement_messages(item: BenchmarkItem, *, extracted: str) -> list[dict]:
    """The true/false request, with the reference's user-message layout (docs/method.md §6)."""
    choices = f"**Choices**: {item.choices}\n" if item.choices else ""
    user = f"{choices}**Response**: {extracted}\n**Ground Truth Answer**: {item.prompt.answer}\n"
    return [{"role": "system", "content": JUDGEMENT_INSTRUCTIONS}, {"role": "user", "content": user}]


def parse_judgement(reply: str) -> bool | None:
    """True/False from the judge's reply: its first word, else the only one of true/false it contains;
    None when it says neither or both (counted as unparseable and scored incorrect)."""
    words = re.findall(r"[a-z]+", reply.lower())
    if words and words[0] in ("true", "false"):
        return words[0] == "true"
    said = {w for w in words if w in ("true", "false")}
    return said.pop() == "true" if len(said) == 1 else None


class ReferenceScorer:
    """The reference's extraction + judgement through one OpenAI-compatible text endpoint."""

    def __init__(self, client) -> None:
        """`client`: a `core.openai_calls.ChatClient` (temperature 0, 128 max tokens, as upstream)."""
        self.client = client
        self.num_extractions = 0
        self.num_unparseable = 0

    async def extract(self, item: BenchmarkItem, response: str) -> Extraction:
        span = answer_span(response)
        if span is not None:
            return Extraction(span, "span")
        self.num_extractions += 1
        reply = await self.client.chat(extraction_messages(item, response=response))
        return parse_extraction(reply.text, response=response)

    async def judge(self, item: BenchmarkItem, extracted: str) -> tuple[bool, str]:
        """(correct, the judge's reply); an unparseable reply counts as incorrect."""
        reply = (await self.client.chat(judgement_messages(item, extracted=extracted))).text
        verdict = parse_judgement(reply)
        if verdict is None:
            self.num_unparseable += 1
        return bool(verdict), reply


def local_extraction(response: str) -> Extraction:
    """Extraction without an LLM: the answer span, else the whole response."""
    span = answer_span(response)
    return Extraction(span, "span") if span is not None else Extraction(response, "none")


# ----------------------------------------------------------------------------------- math-verify
def mathverify_correct(item: BenchmarkItem, *, extracted: str, mode: Mode = "reference") -> bool:
    """Option letters compared when the answer names an option, else the training accuracy rule
    `judge.rules.accuracy_reward` on the extracted answer (`reference`: verify(parse(gt), parse(extracted))
    exactly; `fixed`: degrees, full-width digits and LaTeX ground truths treated, docs/method.md §3.6)."""
    gold = gold_letter(item)
    if gold is not None:
        return predicted_letter(extracted, options=item.options) == gold
    return accuracy_reward(extracted, item.prompt.answer, mode=mode) == 1.0


def gold_letter(item: BenchmarkItem) -> str | None:
    """The correct option's letter for a multiple-choice item, when it can be named."""
    answer = item.prompt.answer.strip()
    if item.choices and re.fullmatch(r"[A-Z]", answer):
        return answer
    if answer in item.options:
        return chr(ord("A") + item.options.index(answer))
    return None


def predicted_letter(extracted: str, *, options: tuple[str, ...] = ()) -> str | None:
    """The option a response picked: `C`, `(C)`, `C. 45` (boxed or bare), or an option's exact text."""
    boxed = last_boxed(extracted)
    text = (boxed if boxed is not None else extracted).strip().strip("$").strip()
    found = re.fullmatch(r"\(?([A-Z])\)?(?:[.:)]\s*.*)?", text, re.DOTALL)
    if found:
        return found.group(1)
    return chr(ord("A") + options.index(text)) if text in options else None
