"""Perception labels: for an item with visual annotations, the training judge's request
(`judge.verdicts.judge_messages`: same prompt, same protocol) marks each annotation 0/1 for the
response, and the response is **perception-correct iff every one of its m annotations is judged 1**
(`parse_verdicts(strict=True)`: item k is read from `<infok>`, a missing item counts 0, so K = m is
required). The reference's r_v can never reach 1 (it divides by K + 1e-6) and counts K from the
judge's tags, so "r_v == 1" is not usable as a rule; the all-items rule is the strict mode's r_v == 1.

A reply with no usable tag at all is unparseable: the label is None (not a perception error), and
it is counted. Two judges: an OpenAI-compatible LLM endpoint, or the lexical CPU judge of
`judge.lexical` (no endpoint; the judge of the CPU training path).
"""

from __future__ import annotations

from evaluation.benchmarks import BenchmarkItem
from evaluation.evaluate import PerceptionLabel
from judge.verdicts import SYSTEM_PROMPT, judge_messages, parse_verdicts


def label_from_reply(reply: str, *, num_annotations: int) -> PerceptionLabel:
    """The label of one judge reply under the all-items rule (None when the reply has no tag)."""
    verdicts = parse_verdicts(reply, num_items=num_annotations, strict=True)
    if not verdicts.parsed:
        return PerceptionLabel(None, ())
    return PerceptionLabel(all(s == 1.0 for s in verdicts.scores), verdicts.scores)


class LLMLabeller:
    """Asks an OpenAI-compatible judge LLM (the training judge's prompt; temperature 0, 512 tokens)."""

    def __init__(self, client, *, system_prompt: str = SYSTEM_PROMPT) -> None:
        """`client`: a `core.openai_calls.ChatClient` for the judge endpoint; `system_prompt`: the training
        judge's (ours, or a `judge.prompt_file`'s)."""
        self.client, self.system_prompt = client, system_prompt
        self.num_unparseable = 0

    async def __call__(self, item: BenchmarkItem, response: str) -> PerceptionLabel:
        reply = await self.client.chat(judge_messages(response, item.prompt.annotations, system_prompt=self.system_prompt))
        label = label_from_reply(reply.text, num_annotations=len(item.prompt.annotations))
        self.num_unparseable += label.correct is None
        return label


class LexicalLabeller:
    """The lexical CPU judge answering the same request locally."""

    def __init__(self) -> None:
        self.num_unparseable = 0

    async def __call__(self, item: BenchmarkItem, response: str) -> PerceptionLabel:
        from judge.lexical import lexical_reply

        reply = lexical_reply(judge_messages(response, item.prompt.annotations))
        return label_from_reply(reply, num_annotations=len(item.prompt.annotations))
