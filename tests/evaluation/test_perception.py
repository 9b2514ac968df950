"""Perception labels: perception-correct iff every annotation is judged 1 (strict parsing, a missing
item counts 0); a reply without any tag is unparseable (None); the lexical CPU judge answers the
training judge's request locally."""

from __future__ import annotations

import asyncio

import pytest

from evaluation.benchmarks import BenchmarkItem
from evaluation.perception import LexicalLabeller, LLMLabeller, label_from_reply
from perception_r1.eval_sets import load_synthetic


@pytest.mark.parametrize("reply,correct,verdicts", [
    ("<info1>1</info1>\n<info2>1</info2>\n<info3>1</info3>", True, (1.0, 1.0, 1.0)),
    ("<info1>1</info1>\n<info2>0</info2>\n<info3>1</info3>", False, (1.0, 0.0, 1.0)),
    ("<info1>1</info1>\n<info2>1</info2>", False, (1.0, 1.0, 0.0)),  # the judge skipped item 3: not all judged 1
    ("<info1>1</info1>\n<info3>1</info3>\n<info2>1</info2>", True, (1.0, 1.0, 1.0)),  # order of tags is free
    ("<info1>0.9</info1>\n<info2>1</info2>\n<info3>1</info3>", False, (0.9, 1.0, 1.0)),
    ("all items are present", None, ()),  # unparseable: no label, not a perception error
])
def test_label_rule(reply, correct, verdicts):
    label = label_from_reply(reply, num_annotations=3)
    assert label.correct is correct and label.verdicts == verdicts


class ScriptedClient:
    def __init__(self, text: str) -> None:
        self.text, self.messages = text, []

    async def chat(self, messages):
        self.messages.append(messages)
        return type("Reply", (), {"text": self.text})()


def synthetic_item() -> BenchmarkItem:
    return load_synthetic(num_problems=1, seed=3)[0]


def test_llm_labeller_sends_the_training_judge_request_and_counts_unparseable():
    from judge.verdicts import SYSTEM_PROMPT

    item = synthetic_item()
    client = ScriptedClient("no tags here")
    labeller = LLMLabeller(client)
    label = asyncio.run(labeller(item, "some response"))
    assert label.correct is None and labeller.num_unparseable == 1
    system, user = client.messages[0]
    assert system == {"role": "system", "content": SYSTEM_PROMPT}
    assert user["content"].startswith("Visual Key Information: <info1>")
    assert user["content"].count("</info") == len(item.prompt.annotations)


def test_lexical_labeller_on_worked_solution_and_on_bare_answer():
    item = synthetic_item()
    worked = asyncio.run(LexicalLabeller()(item, item.prompt.solution))  # the solution restates every fact
    assert worked.correct is True and worked.verdicts == (1.0,) * len(item.prompt.annotations)
    bare = asyncio.run(LexicalLabeller()(item, f"\\boxed{{{item.prompt.answer}}}"))
    assert bare.correct is False
