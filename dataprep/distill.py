"""Stage 1, CoT distillation: k step-by-step solutions per problem from a multimodal teacher.

The teacher sees what the policy will see (docs/method.md §2): the problem split on `<image>` with the image
(a base64 data URL) at the split point, then the method's one-line format prompt, so a correct
solution comes back in the `<think>…</think>\n<answer>…\boxed{}…</answer>` form and can serve as
an SFT target. A problem whose k requests all fail is recorded as an error (dropped from this
run's output, retried by the next run); partial failures keep the samples that came back.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from core.config import FORMAT_PROMPT
from core.openai_calls import ChatClient, ChatReply, RequestFailed, multimodal_content
from core.progress_log import ProgressLog, run_items
from core.records import Prompt

PROGRESS_FILE = "distill.jsonl"


@dataclass(frozen=True, slots=True)
class DistillRecord:
    """The teacher's samples for one problem (a line of distill.jsonl)."""

    id: str
    status: str
    """`ok` (at least one sample came back) or `error` (every request failed; retried on rerun)."""
    samples: tuple[str, ...]
    """The teacher's replies, in request order."""
    finish_reasons: tuple[str, ...]
    errors: tuple[str, ...]
    """Why each failed request failed (empty when all succeeded)."""
    prompt_tokens: int
    completion_tokens: int


def teacher_messages(prompt: Prompt, *, instruction: str = FORMAT_PROMPT) -> list[dict]:
    return [{"role": "user", "content": multimodal_content(prompt, suffix=instruction)}]


async def distill_one(prompt: Prompt, *, client: ChatClient, samples: int) -> DistillRecord:
    """k independent requests for one problem; failures are recorded, fatal endpoint errors raised."""
    messages = teacher_messages(prompt)

    async def sample() -> ChatReply | RequestFailed:
        try:
            return await client.chat(messages)
        except RequestFailed as e:  # recorded; anything else (fatal endpoint, cancel) stops the stage
            return e

    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(sample()) for _ in range(samples)]
    results = [t.result() for t in tasks]
    replies = [r for r in results if isinstance(r, ChatReply)]
    return DistillRecord(
        id=prompt.id,
        status="ok" if replies else "error",
        samples=tuple(r.text for r in replies),
        finish_reasons=tuple(r.finish_reason for r in replies),
        errors=tuple(str(r) for r in results if isinstance(r, RequestFailed)),
        prompt_tokens=sum(r.prompt_tokens for r in replies),
        completion_tokens=sum(r.completion_tokens for r in replies),
    )


async def distill(
    prompts: list[Prompt], *, client: ChatClient, progress: ProgressLog[DistillRecord], samples: int, show: bool
) -> int:
    """Distil every problem not already `ok` in `progress`; returns how many were requested."""
    done = progress.records
    todo = [p for p in prompts if p.id not in done or done[p.id].status != "ok"]

    async def work(prompt: Prompt) -> DistillRecord:
        return await distill_one(prompt, client=client, samples=samples)

    await run_items(todo, work=work, progress=progress, desc="distill", total=len(prompts), show=show)
    return len(todo)

