"""Where responses come from: the `Responder` seam and its implementations, all greedy (temperature 0)
with 4096 new tokens by default, as the reference evaluates (spec §6).

- `OpenAIResponder`: any OpenAI-compatible multimodal endpoint (vLLM, a hosted API). One user
  message, [image as a base64 data URL, question + " " + the format prompt], no system message.
- `EngineResponder`: a local generation engine behind the narrow callable
  `generate(prompts) -> list[RolloutGroup]`; the response is `group.rollouts[0].text`.
- `build_local_responder`: the CPU (or single-device) HF engine of `actors/` on a model folder.

Note: the reference decodes with special tokens kept; engines here decode without them (what the
rewards read), so a trailing `<|im_end|>` never appears in our responses.
"""

from __future__ import annotations

import asyncio
from typing import Callable, Protocol, Sequence

from perception_r1.config import FORMAT_PROMPT
from replay.records import Prompt, RolloutGroup

DEFAULT_MAX_TOKENS = 4096


class Responder(Protocol):
    def respond(self, prompts: Sequence[Prompt]) -> list[str]:
        """One greedy response per prompt, in order."""


class OpenAIResponder:
    """Greedy chat completions from an OpenAI-compatible multimodal endpoint."""

    def __init__(self, endpoint, *, concurrency: int = 16, format_prompt: str = FORMAT_PROMPT) -> None:
        """`endpoint`: a `dataprep.openai_calls.Endpoint` (its temperature should be 0)."""
        assert endpoint.temperature == 0.0, "evaluation decodes greedily"
        self.endpoint = endpoint
        self.concurrency = concurrency
        self.format_prompt = format_prompt
        self.num_requests = 0

    def respond(self, prompts: Sequence[Prompt]) -> list[str]:
        return asyncio.run(self._respond(prompts))

    async def _respond(self, prompts: Sequence[Prompt]) -> list[str]:
        from dataprep.openai_calls import ChatClient, multimodal_content

        client = ChatClient(self.endpoint, concurrency=self.concurrency)
        try:
            replies = await asyncio.gather(*(
                client.chat([{"role": "user", "content": multimodal_content(p, suffix=self.format_prompt)}]) for p in prompts))
        finally:
            self.num_requests += client.num_requests
            await client.close()
        return [r.text for r in replies]


class EngineResponder:
    """Responses from a local engine: `generate(prompts)` returns one group per prompt (n = 1, greedy)."""

    def __init__(self, generate: Callable[[list[Prompt]], list[RolloutGroup]]) -> None:
        self.generate = generate

    def respond(self, prompts: Sequence[Prompt]) -> list[str]:
        groups = self.generate(list(prompts))
        assert len(groups) == len(prompts), (len(groups), len(prompts))
        assert all(g.prompt.id == p.id for g, p in zip(groups, prompts)), "engine returned groups out of order"
        return [g.rollouts[0].text for g in groups]


def build_local_responder(model_path: str, *, device: str = "cpu", max_tokens: int = DEFAULT_MAX_TOKENS,
                          num_threads: int = 1) -> EngineResponder:
    """Greedy generation with the HF engine of `actors/` on the model folder at `model_path`."""
    from actors.engine import Sampling
    from actors.hf_engine import HFEngine
    from perception_r1.config import DataConfig

    engine = HFEngine(model_path, data=DataConfig(), num_threads=num_threads, device=device)
    sampling = Sampling(n=1, temperature=0.0, top_p=1.0, max_new_tokens=max_tokens)
    return EngineResponder(lambda prompts: engine.generate(prompts, sampling=sampling, actor_id=0))
