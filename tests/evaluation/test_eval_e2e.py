"""`perception-r1 eval` end to end on CPU: synthetic problems answered by (a) a scripted
OpenAI-compatible policy on loopback and (b) the tiny random Qwen2.5-VL through the HF engine,
scored by a scripted judge; the run writes results.jsonl, the table and the chart, logs to mlflow,
and a rerun resumes without a single new request."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from core.config import FORMAT_PROMPT
from perception_r1.cli import main
from perception_r1.eval_sets import load_synthetic

NUM_PROBLEMS = 6


def policy_reply(question_to_answer: dict[str, int]):
    """Right on even problems, off by one on odd ones, and the last one without an answer block."""
    def reply(user: str) -> str:
        (index, answer), = [v for q, v in question_to_answer.items() if user.startswith(q)]
        given = answer if index % 2 == 0 else answer + 1
        if index == NUM_PROBLEMS - 1:
            return f"I think it is {given}"
        return f"<think>\nReading the figure.\n</think>\n<answer>\n\\boxed{{{given}}}\n</answer>"
    return reply


def judge_reply(seen) -> str:
    if "**Ground Truth Answer**" in seen.user:
        response, truth = re.fullmatch(r"\*\*Response\*\*: (.*)\n\*\*Ground Truth Answer\*\*: (.*)\n", seen.user,
                                       re.DOTALL).groups()
        return "true" if re.findall(r"\d+", response)[-1:] == [truth] else "false"
    if seen.user.startswith("Visual Key Information: "):  # the training judge's request
        items, response = seen.user.split("\nResponse:\n", 1)
        mark = 1 if "figure" in response else 0
        return "\n".join(f"<info{k}>{mark}</info{k}>" for k in range(1, len(re.findall(r"<info\d+>", items)) + 1))
    numbers = re.findall(r"[0-9]+", seen.user.split("Model response:")[-1])
    return f"<answer>{numbers[-1] if numbers else 'null'}</answer>"  # extraction: the response's last number


@pytest.fixture
def problems():
    items = load_synthetic(num_problems=NUM_PROBLEMS, seed=0)
    return {item.prompt.problem.removeprefix("<image>"): (k, int(item.prompt.answer)) for k, item in enumerate(items)}


def eval_args(out: Path, *extra: str) -> list[str]:
    return ["eval", "--benchmark", "synthetic", "--synthetic-num", str(NUM_PROBLEMS), "--output-dir", str(out),
            "--no-progress", "--batch-size", "4", *extra]


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_eval_openai_policy_scores_table_chart_and_resume(tmp_path, fake_chat_server, problems, capsys):
    reply = policy_reply(problems)
    server = fake_chat_server(lambda seen: reply(seen.user) if seen.model == "policy" else judge_reply(seen))
    out = tmp_path / "run"
    args = eval_args(out, "--policy-url", server.url, "--policy-model", "policy", "--max-tokens", "256",
                     "--judge-url", server.url, "--judge-model", "judge")
    assert main(args) == 0
    printed = capsys.readouterr().out

    # generation: one greedy multimodal request per problem, image first, question + " " + format prompt
    policy = [r for r in server.requests if r.model == "policy"]
    assert len(policy) == NUM_PROBLEMS
    assert all(len(r.image_urls) == 1 and r.image_urls[0].startswith("data:image/png;base64,") for r in policy)
    assert all(r.user.endswith(" " + FORMAT_PROMPT) and r.system == "" for r in policy)
    assert all(r.temperature == 0.0 and r.max_tokens == 256 for r in policy)

    rows = read_rows(out / "results.jsonl")
    by_index = {int(r["id"].rsplit("-", 1)[1]): r for r in rows}
    assert sorted(by_index) == list(range(NUM_PROBLEMS))
    assert [by_index[k]["correct_mathverify"] for k in range(NUM_PROBLEMS)] == [True, False, True, False, True, False]
    assert [by_index[k]["correct_llm"] for k in range(NUM_PROBLEMS)] == [True, False, True, False, True, False]
    assert [by_index[k]["extraction"] for k in range(NUM_PROBLEMS)] == ["span"] * 5 + ["llm"]
    assert by_index[0]["extracted"] == f"\n\\boxed{{{by_index[0]['answer']}}}\n"
    assert by_index[5]["extracted"] == str(int(by_index[5]["answer"]) + 1)
    # perception: every annotation reflected in the five worked responses, none in the bare answer
    assert [by_index[k]["perception"] for k in range(NUM_PROBLEMS)] == [True] * 5 + [False]
    assert all(len(r["perception_verdicts"]) == r["num_annotations"] > 0 for r in rows)
    assert server.count("judge") == 2 * NUM_PROBLEMS + 1  # 6 judgements + 6 perception labels + 1 extraction

    # the table (printed and saved), the summary and the chart
    assert re.search(r"synthetic\s+6\s+50\.0\s+50\.0\s+83\.3 \(6\)", printed)
    assert (out / "table.txt").read_text().startswith("benchmark")
    (summary,) = json.loads((out / "summary.json").read_text())
    assert summary["accuracy_llm"] == 50.0 and summary["num_items"] == NUM_PROBLEMS
    assert summary["perception_rate"] == pytest.approx(500 / 6) and summary["num_perception_labelled"] == 6
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # resume: a rerun sends nothing; dropping two finished lines redoes exactly those two
    num_requests = len(server.requests)
    assert main(args) == 0
    assert len(server.requests) == num_requests
    lines = (out / "results.jsonl").read_text().splitlines(keepends=True)
    (out / "results.jsonl").write_text("".join(lines[:-2]))
    assert main(args) == 0
    assert server.count("policy") == NUM_PROBLEMS + 2
    assert len(read_rows(out / "results.jsonl")) == NUM_PROBLEMS


def test_eval_refuses_to_resume_with_other_settings(tmp_path, fake_chat_server, problems, capsys):
    reply = policy_reply(problems)
    server = fake_chat_server(lambda seen: reply(seen.user))
    out = tmp_path / "run"
    assert main(eval_args(out, "--policy-url", server.url, "--policy-model", "policy", "--limit", "1")) == 0
    assert server.count("policy") == 1
    assert main(eval_args(out, "--policy-url", server.url, "--policy-model", "other", "--limit", "1")) == 2
    assert "started with other eval settings (changed: ['policy'])" in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["--model-path", "x", "--policy-url", "http://h/v1"], "exactly one policy"),
    (["--policy-url", "http://h/v1"], "--policy-url needs --policy-model"),
    (["--policy-url", "http://h/v1", "--policy-model", "m", "--judge-url", "http://j/v1"], "go together"),
    (["--policy-url", "http://h/v1", "--policy-model", "m", "--max-tokens", "0"], "--max-tokens must be >= 1"),
    (["--policy-url", "http://h/v1", "--policy-model", "m", "--perception", "llm"], "--perception llm needs a judge"),
])
def test_eval_argument_errors(tmp_path, args, message, capsys):
    assert main(["eval", "--benchmark", "synthetic", "--output-dir", str(tmp_path), *args]) == 2
    assert message in capsys.readouterr().err


def test_eval_benchmark_spec_errors(tmp_path, capsys):
    base = ["eval", "--output-dir", str(tmp_path), "--policy-url", "http://h/v1", "--policy-model", "m"]
    assert main([*base, "--benchmark", "mathvista"]) == 2
    assert "give the local file or folder" in capsys.readouterr().err
    assert main([*base, "--benchmark", "mmmu=x"]) == 2
    assert "unknown benchmark 'mmmu'" in capsys.readouterr().err
    assert main([*base, "--benchmark", f"wemath={tmp_path / 'missing.json'}"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_eval_tiny_model_on_cpu_with_mlflow(tmp_path, tiny_model_dir, fake_chat_server, monkeypatch, capsys):
    import mlflow

    monkeypatch.chdir(tmp_path)  # mlflow's default artifact folder goes under the working dir
    server = fake_chat_server(judge_reply)
    out, uri = tmp_path / "tiny", f"sqlite:///{tmp_path / 'mlruns.db'}"
    args = ["eval", "--benchmark", "synthetic", "--synthetic-num", "3", "--model-path", tiny_model_dir,
            "--max-tokens", "8", "--judge-url", server.url, "--judge-model", "judge", "--output-dir", str(out),
            "--no-progress", "--perception", "lexical", "--mlflow-uri", uri, "--experiment", "eval-test"]
    assert main(args) == 0
    rows = read_rows(out / "results.jsonl")
    assert sorted(r["id"] for r in rows) == ["synthetic-0-0", "synthetic-0-1", "synthetic-0-2"]  # in finishing order
    assert all(isinstance(r["response"], str) and isinstance(r["correct_llm"], bool) for r in rows)
    assert all(isinstance(r["perception"], bool) and len(r["perception_verdicts"]) == r["num_annotations"] for r in rows)
    assert (out / "accuracy.png").is_file() and "synthetic" in capsys.readouterr().out

    mlflow.set_tracking_uri(uri)
    (run,) = mlflow.search_runs(experiment_names=["eval-test"], output_format="list")
    assert run.data.metrics["synthetic/num_items"] == 3.0
    assert "synthetic/accuracy_llm" in run.data.metrics

    num_requests = len(server.requests)
    assert main(args) == 0  # resume: nothing generated, nothing judged
    assert len(server.requests) == num_requests and len(read_rows(out / "results.jsonl")) == 3
