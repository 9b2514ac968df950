"""The evaluation loop: responses for every item not yet in the results file, each scored (reference
scorer, math-verify, perception label) and appended to the JSONL the moment it is done, so a rerun
of the same command resumes where the last one stopped (ids already present are skipped; the file
keeps the last line written per id; a line cut short by a crash is dropped).

    items ─(skip ids in results.jsonl)─> chunks of batch_size ─> Responder.respond (greedy)
        ─> per item, concurrently: extract ─> judge true/false ─┐
                                   math-verify ────────────────┼─> EvalRow ─> append + flush
                                   perception label ───────────┘
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable, Sequence

from evaluation.benchmarks import BenchmarkItem
from evaluation.responders import Responder
from evaluation.scoring import (
    Extraction,
    ReferenceScorer,
    local_extraction,
    mathverify_correct,
)
from judge.rules import Mode


@dataclass(frozen=True, slots=True)
class PerceptionLabel:
    correct: bool | None
    """Perception-correct (see `evaluation.perception` for the rule); None: the judge's reply was unparseable."""
    verdicts: tuple[float, ...]
    """The judge's per-annotation scores, in tag order."""


Labeller = Callable[[BenchmarkItem, str], Awaitable[PerceptionLabel]]
"""Marks a response perception-correct or not (only called for items with annotations)."""


@dataclass(frozen=True, slots=True)
class EvalRow:
    """One line of results.jsonl."""

    id: str
    benchmark: str
    answer: str
    """The ground truth."""
    response: str
    extracted: str
    """The answer the scorers compared (see `evaluation.scoring.Extraction`)."""
    extraction: str
    """How it was extracted: span, llm, llm_untagged or none."""
    correct_mathverify: bool
    correct_llm: bool | None
    """The reference's LLM judgement; None when no judge endpoint was given."""
    judge_reply: str
    perception: bool | None
    """Perception-correct; None when the item has no annotations or no perception judge was given."""
    perception_verdicts: tuple[float, ...]
    num_annotations: int


async def score_item(item: BenchmarkItem, response: str, *, scorer: ReferenceScorer | None,
                     labeller: Labeller | None, mathverify_mode: Mode = "reference") -> EvalRow:
    """Every score of one response; the answer judgement and the perception label run concurrently."""

    async def judged() -> tuple[Extraction, bool | None, str]:
        if scorer is None:
            return local_extraction(response), None, ""
        extraction = await scorer.extract(item, response)
        return extraction, *(await scorer.judge(item, extraction.text))

    async def labelled() -> PerceptionLabel | None:
        if labeller is None or not item.prompt.annotations:
            return None
        return await labeller(item, response)

    (extraction, correct_llm, reply), label = await asyncio.gather(judged(), labelled())
    return EvalRow(
        id=item.prompt.id, benchmark=item.benchmark, answer=item.prompt.answer, response=response,
        extracted=extraction.text, extraction=extraction.method,
        correct_mathverify=mathverify_correct(item, extracted=extraction.text, mode=mathverify_mode),
        correct_llm=correct_llm, judge_reply=reply,
        perception=label.correct if label else None, perception_verdicts=label.verdicts if label else (),
        num_annotations=len(item.prompt.annotations))


async def evaluate(items: Sequence[BenchmarkItem], responder: Responder, *, results_path: Path,
                   scorer: ReferenceScorer | None = None, labeller: Labeller | None = None,
                   mathverify_mode: Mode = "reference", batch_size: int = 64,
                   show_progress: bool = True) -> list[EvalRow]:
    """Evaluate the items not yet in `results_path`; returns the rows of all `items`, in their order.

    Generation runs in a worker thread (a local engine blocks; a remote responder runs its own event
    loop there), scoring in this loop. The first failure stops the run; finished items stay saved.
    """
    from tqdm import tqdm

    from core.progress_log import ProgressLog

    with ProgressLog(results_path, cls=EvalRow) as log:
        todo = [item for item in items if item.prompt.id not in log.records]
        bar = tqdm(total=len(items), initial=len(items) - len(todo), desc="eval", unit="problem",
                   disable=not show_progress, dynamic_ncols=True)

        async def one(item: BenchmarkItem, response: str) -> None:
            log.append(await score_item(item, response, scorer=scorer, labeller=labeller, mathverify_mode=mathverify_mode))
            bar.update(1)

        try:
            for start in range(0, len(todo), batch_size):
                chunk = todo[start:start + batch_size]
                responses = await asyncio.to_thread(responder.respond, [item.prompt for item in chunk])
                async with asyncio.TaskGroup() as group:  # a failure cancels the chunk's other items
                    for item, response in zip(chunk, responses, strict=True):
                        group.create_task(one(item, response))
        except BaseExceptionGroup as errors:
            raise _first_leaf(errors) from None
        finally:
            bar.close()
        return [log.records[item.prompt.id] for item in items]


def _first_leaf(errors: BaseExceptionGroup) -> BaseException:
    first = errors.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first
