"""The lexical judge: a CPU judge backend that reads the same chat request a judge LLM gets and
answers in the same protocol (`<info1>1</info1>\\n<info2>0</info2>...`), deciding each item by
matching its key tokens against the response. Used on CPU (tests, the demo) and as a cheap baseline.

An item's key tokens are its numbers (`70°` -> 70, `3f - 6` -> 3, 6), its point names (`AB`,
`angle BAC`, `ABCD`, a lone `O`; order-insensitive as segments, angles and polygons are: BA = AB,
angle CAB = angle BAC only when the vertex letter stays in the middle) and its geometry words
(triangle, circle, parallel, radius, ...; LaTeX `\\angle`, `\\parallel`, `\\perp`, `\\triangle` read as
the words). The item is reflected (1) when one clause of the response (split at line breaks, `;`,
sentence ends and commas, not at "and") holds all its numbers and names and at least half of its
geometry words. It is a bag-of-tokens rule: "angle BAC is 60 and angle ABC is 70" in one clause also
reflects "angle BAC = 70"; a judge LLM is the real thing, this is the CPU stand-in and a baseline.
An item with no key tokens is reflected when at least half of its content words (4+ letters)
appear anywhere in the response.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

from judge.verdicts import read_user_message, render_verdicts

GEOMETRY_WORDS = frozenset("""
    acute adjacent alternate altitude angle arc area base bisect bisector center centre chord circle
    circumference complementary congruent corresponding cube cylinder degree diagonal diameter edge
    equilateral exterior height hexagon hypotenuse inscribed interior intersect isosceles kite leg line
    median midpoint obtuse octagon opposite parallel parallelogram pentagon perimeter perpendicular
    point polygon quadrilateral radius ray rectangle rhombus right secant sector segment semicircle side
    similar sphere square supplementary tangent transversal trapezoid triangle vertex vertical
""".split())
"""Shape and relation words (singular) that carry an item's meaning."""

_LATEX_WORDS = {r"\angle": " angle ", r"\measuredangle": " angle ", r"\triangle": " triangle ",
                r"\parallel": " parallel ", r"\perp": " perpendicular ", r"\odot": " circle ",
                r"\overline": " ", r"\overarc": " arc ", r"\widehat": " arc ", "∠": " angle ",
                "△": " triangle ", "∥": " parallel ", "⊥": " perpendicular ", "⊙": " circle "}
_PLURALS = {"vertices": "vertex", "radii": "radius", "centers": "center", "degrees": "degree"}
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_NAME = re.compile(r"(?<![A-Za-z])[A-Z]{1,6}(?![A-Za-z])")
_ARTICLE = re.compile(r"(?:^|(?<=[.!?:\n])\s*)(?:A|I)(?= [a-z])")
"""A sentence-initial `A` or `I` followed by a lower-case word is an article or pronoun, not a point."""
_WORD = re.compile(r"[a-z]+")
_CLAUSE_SPLIT = re.compile(r"\n|;|(?<=[.!?])\s+|,\s|\\\\")
_STOPWORDS = frozenset("that this with from have given shown which where there their these those into "
                       "than then when what also each only both such figure diagram image".split())


@dataclass(frozen=True, slots=True)
class KeyTokens:
    numbers: frozenset[str]
    names: frozenset[str]
    words: frozenset[str]


def _plain(text: str) -> str:
    for latex, word in _LATEX_WORDS.items():
        text = text.replace(latex, word)
    return text.replace("$", " ").replace("{", " ").replace("}", " ")


def _canonical_name(name: str) -> str:
    """AB = BA (segment), ABC = CBA (angle: the vertex stays in the middle), ABCD: its letters as a set."""
    if len(name) == 2:
        return "".join(sorted(name))
    if len(name) == 3:
        return min(name, name[::-1])
    return "".join(sorted(name)) if len(name) > 3 else name


def _number(text: str) -> str:
    value = float(text)
    return str(int(value)) if value.is_integer() else repr(value)


def key_tokens(text: str) -> KeyTokens:
    """The numbers, point names and geometry words of a piece of text."""
    plain = _ARTICLE.sub(" ", _plain(text))
    words = {_PLURALS.get(w, w[:-1] if w.endswith("s") and w[:-1] in GEOMETRY_WORDS else w)
             for w in _WORD.findall(plain.lower())}
    return KeyTokens(numbers=frozenset(_number(n) for n in _NUMBER.findall(plain)),
                     names=frozenset(_canonical_name(n) for n in _NAME.findall(plain)),
                     words=frozenset(words & GEOMETRY_WORDS))


def item_reflected(item: str, clauses: Sequence[KeyTokens], *, response: str) -> bool:
    """Whether one annotation item is reflected in a response already split into clause tokens."""
    want = key_tokens(item)
    if not (want.numbers or want.names or want.words):
        content = {w for w in _WORD.findall(item.lower()) if len(w) >= 4 and w not in _STOPWORDS}
        lowered = response.lower()
        return bool(content) and sum(w in lowered for w in content) >= math.ceil(len(content) / 2)
    need_words = math.ceil(len(want.words) / 2)
    for have in clauses:
        if want.numbers <= have.numbers and want.names <= have.names and len(want.words & have.words) >= need_words:
            return True
    return False


def lexical_verdicts(annotations: Sequence[str], response: str) -> tuple[int, ...]:
    """1 or 0 per annotation item, in order."""
    clauses = [key_tokens(c) for c in _CLAUSE_SPLIT.split(response) if c.strip()]
    return tuple(int(item_reflected(a, clauses, response=response)) for a in annotations)


def lexical_reply(messages: Sequence[dict]) -> str:
    """The judge's answer to a judge chat request: the verdicts of the last user message's items."""
    users = [m for m in messages if m.get("role") == "user"]
    if not users:
        raise ValueError("messages has no user message; send the judge request of judge.verdicts.judge_messages")
    content = users[-1].get("content")
    if isinstance(content, list):  # OpenAI content parts: join the text parts
        content = "".join(p.get("text", "") for p in content if p.get("type") == "text")
    if not isinstance(content, str):
        raise ValueError("the user message has no text content")
    items, response = read_user_message(content)
    if not items:
        raise ValueError("the judge request has no <info1> item")
    return render_verdicts(lexical_verdicts(items, response))
