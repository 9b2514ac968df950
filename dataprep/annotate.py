"""Stage 3, annotation extraction: a text LLM lists the atomic visual facts a kept solution relies
on (docs/method.md §5, §8.12: given lengths and angles, shapes, perpendicular / parallel / tangent relations,
incidence), as a JSON list of short sentences.

Each reply is validated (a JSON list of strings, code fences tolerated), cleaned (whitespace
collapsed, empty, over-long and tag-breaking items dropped) and deduplicated. A reply with no
usable fact is asked again, up to `attempts` times; after that the problem is recorded `invalid`
(dropped, not re-asked on rerun). Failed requests are recorded `error` and retried on rerun.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from core.openai_calls import ChatClient, RequestFailed
from core.progress_log import ProgressLog, run_items
from core.records import Prompt

PROGRESS_FILE = "annotate.jsonl"
MAX_FACT_CHARS = 200
MAX_FACTS = 30

EXTRACTION_PROMPT = """\
Below are a geometry problem, which comes with a diagram, and a correct worked solution to it.

Problem:
{problem}

Solution:
{solution}

List the atomic facts about the diagram that this solution relies on: given lengths and angle \
measures, shapes (e.g. "ABCD is a rectangle"), perpendicular, parallel and tangent relations, and \
incidence (a point on a line or a circle, lines meeting at a point). Use the diagram's labels. \
Include facts read off the diagram or stated in the problem, and simple facts they immediately \
imply, but not results the solution computes. One fact per item, each a short sentence, e.g. \
"GE = 10", "GE ⟂ DF at E", "GE bisects chord DF, so DE = EF".

Reply with only a JSON list of strings."""


@dataclass(frozen=True, slots=True)
class AnnotateRecord:
    """The extracted annotations of one problem (a line of annotate.jsonl)."""

    id: str
    status: str
    """`ok`, `invalid` (no reply held a usable JSON list) or `error` (requests failed)."""
    annotations: tuple[str, ...]
    detail: str
    """Why the last reply was rejected or the request failed; empty when ok."""
    num_attempts: int
    prompt_tokens: int
    completion_tokens: int


class InvalidAnnotations(ValueError):
    """A reply that is not a JSON list of usable facts."""


def parse_annotation_list(text: str) -> tuple[str, ...]:
    """The facts of a reply: a JSON list of strings (or an object holding one list), cleaned and
    deduplicated (case- and whitespace-insensitive, first kept), at most MAX_FACTS."""
    value = _json_value(text)
    if isinstance(value, dict):
        lists = [v for v in value.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise InvalidAnnotations("a JSON object, not a list")
        value = lists[0]
    if not isinstance(value, list):
        raise InvalidAnnotations(f"JSON {type(value).__name__}, not a list")
    if not all(isinstance(v, str) for v in value):
        raise InvalidAnnotations("list items are not all strings")
    facts, seen = [], set()
    for item in value:
        fact = " ".join(item.split())
        key = fact.casefold()
        if fact and len(fact) <= MAX_FACT_CHARS and "<info" not in key and "</info" not in key and key not in seen:
            seen.add(key)
            facts.append(fact)
    if not facts:
        raise InvalidAnnotations("no usable fact (empty, too long or duplicate items)")
    return tuple(facts[:MAX_FACTS])


def _json_value(text: str) -> object:
    candidates = [text.strip()]
    fenced = re.search(r"```(?:json)?\s*(.*?)```", text, re.DOTALL)
    if fenced:
        candidates.append(fenced.group(1).strip())
    start, end = text.find("["), text.rfind("]")
    if 0 <= start < end:
        candidates.append(text[start : end + 1])
    for candidate in candidates:
        try:
            return json.loads(candidate)
        except json.JSONDecodeError:
            continue
    raise InvalidAnnotations("reply is not JSON")


def extraction_messages(prompt: Prompt, *, solution: str) -> list[dict]:
    problem = prompt.problem.replace("<image>", " ").strip()
    return [{"role": "user", "content": EXTRACTION_PROMPT.format(problem=problem, solution=solution)}]


async def annotate_one(prompt: Prompt, *, solution: str, client: ChatClient, attempts: int) -> AnnotateRecord:
    messages = extraction_messages(prompt, solution=solution)
    tokens = [0, 0]
    for attempt in range(1, attempts + 1):
        try:
            reply = await client.chat(messages)
        except RequestFailed as e:
            return AnnotateRecord(prompt.id, "error", (), str(e), attempt, *tokens)
        tokens = [tokens[0] + reply.prompt_tokens, tokens[1] + reply.completion_tokens]
        try:
            facts = parse_annotation_list(reply.text)
        except InvalidAnnotations as e:
            detail = str(e)
            continue
        return AnnotateRecord(prompt.id, "ok", facts, "", attempt, *tokens)
    return AnnotateRecord(prompt.id, "invalid", (), detail, attempts, *tokens)


async def annotate(
    items: list[tuple[Prompt, str]], *, client: ChatClient, progress: ProgressLog[AnnotateRecord], attempts: int, show: bool
) -> int:
    """Annotate every (prompt, solution) not finished in `progress` (errors are redone); returns how many."""
    done = progress.records
    todo = [(p, s) for p, s in items if p.id not in done or done[p.id].status == "error"]

    async def work(item: tuple[Prompt, str]) -> AnnotateRecord:
        return await annotate_one(item[0], solution=item[1], client=client, attempts=attempts)

    await run_items(todo, work=work, progress=progress, desc="annotate", total=len(items), show=show)
    return len(todo)
