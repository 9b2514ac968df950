"""`judge.prompt_file`: another wording of the judge's system message, the same protocol, reaching the judge."""

import asyncio
from pathlib import Path

from fake_judge import FakeJudge

from core.config import JudgeConfig
from core.config_files import parse_config
from judge.client import JudgeClient, JudgeEndpoint
from judge.lexical import lexical_reply
from judge.prompt_file import load_system_prompt
from judge.verdicts import SYSTEM_PROMPT, WORKED_EXAMPLES

REPO = Path(__file__).resolve().parents[2]


def test_our_prompt_written_as_a_file_is_our_prompt():
    assert load_system_prompt(str(REPO / "docs" / "judge-prompt.txt")) == SYSTEM_PROMPT
    assert load_system_prompt(None) == SYSTEM_PROMPT


def test_examples_placeholder_becomes_the_worked_examples(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("Judge each fact. Examples follow.\n{examples}Now the real one.", encoding="utf-8")
    prompt = load_system_prompt(str(path))
    assert prompt == f"Judge each fact. Examples follow.\n{WORKED_EXAMPLES}Now the real one."
    assert "{examples}" not in prompt and prompt.count("Judgement: <info1>") == 3


def test_the_config_names_the_file():
    cfg = parse_config({"judge": {"prompt_file": "prompts/judge.txt"}}, source="x.yaml")
    assert cfg.judge.prompt_file == "prompts/judge.txt"
    assert parse_config({}, source="x.yaml").judge.prompt_file is None


def test_the_client_sends_the_files_prompt_and_reads_verdicts_as_before(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("A different wording. Answer with <infoK>1</infoK> or <infoK>0</infoK> per fact.", encoding="utf-8")
    seen: list[list[dict]] = []
    fake = FakeJudge(reply=lambda messages: seen.append(messages) or lexical_reply(messages)).start()
    try:
        client = JudgeClient(JudgeConfig(), JudgeEndpoint(fake.url, "fake-judge"),
                             system_prompt=load_system_prompt(str(path)))
        judgement = asyncio.run(client.judge("The diagram shows AB = 7 and BC = 5.", ("AB = 7", "BC = 5")))
    finally:
        fake.stop()
    assert not judgement.failed and judgement.verdicts.scores == (1.0, 1.0)
    assert seen[-1][0] == {"role": "system", "content": path.read_text(encoding="utf-8")}
    assert seen[-1][1]["content"].startswith("Visual Key Information: <info1>AB = 7</info1>")
