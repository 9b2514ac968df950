"""Where responses come from: the `Responder` seam and its implementations, all greedy (temperature 0)
with 4096 new tokens by default, as the reference evaluates (docs/method.md §6).

- `OpenAIResponder`: any OpenAI-compatible multimodal endpoint (vLLM, a hosted API). One user
  message, [image as a base64 data URL, question + " " + the format prompt], no system message.
- `EngineResponder`: a local generation engine (`core.seams.Engine`: the command wires the HF engine
  of `actors/` on a model folder), n = 1, greedy; the response is `group.rollouts[0].text`.

Note: the reference decodes with special tokens kept; engines here decode without them (what the
rewards read), so a trailing `<|im_end|>` never appears in our responses.
"""

from __future__ import annotations

import asyncio
from typing import Protocol, Sequence

from core.config import FORMAT_PROMPT
from core.records import Prompt, Sampling
from core.seams import Engine

DEFAULT_MAX_TOKENS = 4096


class Responder(Protocol):
    def respond(self, prompts: Sequence[Prompt]) -> list[str]:
        """One greedy response per prompt, in order."""


class OpenAIResponder:
    """Greedy chat completions from an OpenAI-compatible multimodal endpoint."""

    def __init__(self, endpoint, *, concurrency: int = 16, format_prompt: str = FORMAT_PROMPT) -> None:
        """`endpoint`: a `core.openai_calls.Endpoint` (its temperature should be 0)."""
        assert endpoint.temperature == 0.0, "evaluation decodes greedily"
        self.endpoint = endpoint
        self.concurrency = concurrency
        self.format_prompt = format_prompt
        self.num_requests = 0

    def respond(self, prompts: Sequence[Prompt]) -> list[str]:
        return asyncio.run(self._respond(prompts))

    async def _respond(self, prompts: Sequence[Prompt]) -> list[str]:
        from core.openai_calls import ChatClient, multimodal_content

        client = ChatClient(self.endpoint, concurrency=self.concurrency)
        try:
            replies = await asyncio.gather(*(
                client.chat([{"role": "user", "content": multimodal_content(p, suffix=self.format_prompt)}]) for p in prompts))
        finally:
            self.num_requests += client.num_requests
            await client.close()
        return [r.text for r in replies]


class EngineResponder:
    """Responses from a local engine: one greedy rollout per prompt."""

    def __init__(self, engine: Engine, *, max_tokens: int = DEFAULT_MAX_TOKENS) -> None:
        self.engine = engine
        self.sampling = Sampling(n=1, temperature=0.0, top_p=1.0, max_new_tokens=max_tokens)

    def respond(self, prompts: Sequence[Prompt]) -> list[str]:
        groups = self.engine.generate(list(prompts), sampling=self.sampling, actor_id=0)
        assert len(groups) == len(prompts), (len(groups), len(prompts))
        assert all(g.prompt.id == p.id for g, p in zip(groups, prompts)), "engine returned groups out of order"
        return [g.rollouts[0].text for g in groups]
