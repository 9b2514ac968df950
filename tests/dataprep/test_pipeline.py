"""Data preparation end to end against scripted OpenAI-compatible servers on loopback: the exact
kept set, drop reasons and annotations, token counts, kill-and-rerun (in process and Ctrl-C on the
CLI) with no finished problem requested twice and the same output as an uninterrupted run."""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import io
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from core.config import FORMAT_PROMPT, SyntheticDataConfig
from core.openai_calls import Endpoint, FatalEndpointError
from core.progress_log import ProgressLog
from dataprep.annotate import InvalidAnnotations, parse_annotation_list
from dataprep.distill import DistillRecord
from dataprep.filter import accuracy
from dataprep.loaders import load_prompts, read_prompts
from dataprep.pipeline import STAGES, Settings, prepare
from dataprep.writer import write_dataset
from perception_r1.cli import main as cli_main

_spec = importlib.util.spec_from_file_location("dataprep_fake_openai", Path(__file__).with_name("fake_openai.py"))
fake_openai = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)  # a unique name: no clash with other tests' helpers
_spec.loader.exec_module(fake_openai)
FakeOpenAI, Reply = fake_openai.FakeOpenAI, fake_openai.Reply

REPO = Path(__file__).resolve().parents[2]


def png(k: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (16, 16), (k * 20 % 256, 100, 50)).save(out, format="PNG")
    return out.getvalue()


def write_input(path: Path, num: int, *, bad_row: bool = False) -> Path:
    """Problems `problem k` with answer 10+k, as a reference-format parquet (+ one row without image)."""
    rows = [{"id": f"p{k}", "problem": f"<image>Find x in problem {k}.", "answer": str(10 + k), "images": [{"bytes": png(k), "path": None}]} for k in range(num)]
    if bad_row:
        rows.append({"id": "bad", "problem": "<image>Find x in problem 99.", "answer": "1", "images": []})
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def cot(k: int, value: int) -> str:
    return f"<think>\nstep for problem {k}\n</think>\n<answer>\n\\boxed{{{value}}}\n</answer>"


def problem_of(request) -> int:
    return int(re.search(r"problem (\d+)", request.text).group(1))


class MixedScript:
    """A teacher right on some problems, wrong on others, failing or slow on some; an extractor
    that sometimes answers malformed JSON. Deterministic per problem and per request count."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()

    def __call__(self, request) -> Reply:
        k = problem_of(request)
        role = "teacher" if request.num_images else "text"
        self.counts[role, k] += 1
        n = self.counts[role, k]
        return self.teacher(k, n) if role == "teacher" else self.extractor(k, n)

    def teacher(self, k: int, n: int) -> Reply:
        if k == 1:
            return Reply(cot(k, 99))  # always wrong
        if k == 2 and n % 2 == 1:
            return Reply(cot(k, 98))  # odd requests wrong, even right
        if k == 3 and n == 1:
            return Reply(status=500)  # a transient server error, retried
        if k == 4 and n == 1:
            return Reply(cot(k, 14), delay_s=6.0)  # slower than the client's timeout, retried
        if k == 5:
            return Reply(status=500)  # never recovers
        return Reply(cot(k, 10 + k))

    def extractor(self, k: int, n: int) -> Reply:
        if k == 0:
            return Reply('["GE = 10", "GE  = 10", "ge = 10", "GE ⟂ DF at E", ""]')
        if k == 2:
            return Reply('Here you go:\n```json\n["AB = 3"]\n```')
        if k == 3:
            return Reply('["AB = 3",' if n == 1 else '["BC = 4", "B lies on circle O"]')
        return Reply("I think AB = 3.")  # k == 4: never JSON


def settings(out: Path, url: str, *, samples: int = 2, concurrency: int = 8, timeout_s: float = 2.0) -> Settings:
    """Fast retries; a timeout generous enough for a loaded test machine, short enough to wait out."""
    teacher = Endpoint(url, "teacher", max_attempts=2, backoff_s=0.01, timeout_s=timeout_s)
    extractor = Endpoint(url, "extractor", temperature=0.3, max_attempts=2, backoff_s=0.01, timeout_s=timeout_s)
    return Settings(out, teacher=teacher, extractor=extractor, samples=samples, concurrency=concurrency, show_progress=False)


def test_end_to_end_kept_set_reasons_annotations_and_tokens(tmp_path):
    data = write_input(tmp_path / "train.parquet", 6, bad_row=True)
    loaded = read_prompts(data)
    script = MixedScript()
    with FakeOpenAI(script) as server:
        report = asyncio.run(prepare(loaded, stages=STAGES, settings=settings(tmp_path / "out", server.url)))
        requests = list(server.requests)

    out = load_prompts(tmp_path / "out")
    assert [(p.id, p.index) for p in out] == [("p0", 0), ("p2", 1), ("p3", 2)]
    assert [p.annotations for p in out] == [("GE = 10", "GE ⟂ DF at E"), ("AB = 3",), ("BC = 4", "B lies on circle O")]
    assert [p.solution for p in out] == [cot(0, 10), cot(2, 12), cot(3, 13)]
    assert [p.image for p in out] == [png(0), png(2), png(3)]
    assert report["dropped"] == {"missing_image": 1, "no_correct_sample": 1, "distill_error": 1, "annotate_invalid": 1}
    assert {d["id"]: d["reason"] for d in report["dropped_items"]} == {
        "bad": "missing_image", "p1": "no_correct_sample", "p5": "distill_error", "p4": "annotate_invalid"}
    assert report["filter"] == {"num_kept": 4, "num_dropped": {"no_correct_sample": 1, "distill_error": 1}, "num_correct_samples": 7}
    assert report["output"]["num_rows"] == 3
    # usage is counted from replies that arrived: 10 teacher samples, 1+1+2+3 extractor replies
    assert report["distill"] | {} == {"num_ok": 5, "num_error": 1, "num_samples": 10, "num_failed_requests": 2, "prompt_tokens": 100, "completion_tokens": 200}
    assert (report["annotate"]["num_invalid"], report["annotate"]["completion_tokens"]) == (1, 140)
    assert report["tokens"] == {"prompt_tokens": 170, "completion_tokens": 340}
    assert json.loads((tmp_path / "out" / "report.json").read_text())["dropped"] == report["dropped"]
    # requests: 2 per problem, +1 retry for the 500 and the timeout, 2 samples x 2 attempts for p5
    teacher = Counter(problem_of(r) for r in requests if r.num_images)
    assert teacher == {0: 2, 1: 2, 2: 2, 3: 3, 4: 3, 5: 4}
    assert Counter(problem_of(r) for r in requests if not r.num_images) == {0: 1, 2: 1, 3: 2, 4: 3}
    # the teacher saw the image (as a data URL) and the method's format prompt
    first = next(r for r in requests if r.num_images and problem_of(r) == 0)
    assert first.image_urls == ("data:image/png;base64," + base64.b64encode(png(0)).decode(),)
    assert first.text == f"Find x in problem 0. {FORMAT_PROMPT}"


async def run_until(coro, path: Path, num_lines: int) -> None:
    """Run `coro` and cancel it (as Ctrl-C does) once `path` holds `num_lines` lines."""
    task = asyncio.ensure_future(coro)
    while not task.done():
        if path.exists() and path.read_text().count("\n") >= num_lines:
            task.cancel()
            break
        await asyncio.sleep(0.005)
    with pytest.raises(asyncio.CancelledError):
        await task


def all_right(request) -> Reply:
    k = problem_of(request)
    if request.num_images:
        return Reply(cot(k, 10 + k), delay_s=0.02)
    return Reply(json.dumps([f"AB = {k}", f"fact {k}"]), delay_s=0.02)


def test_kill_and_rerun_requests_nothing_twice_and_matches_uninterrupted_run(tmp_path):
    loaded = read_prompts(write_input(tmp_path / "train.parquet", 12))
    with FakeOpenAI(all_right) as server:
        asyncio.run(prepare(loaded, stages=STAGES, settings=settings(tmp_path / "baseline", server.url, concurrency=2)))
        server.requests.clear()
        out = tmp_path / "resumed"
        # 1st run: killed during distillation
        asyncio.run(run_until(prepare(loaded, stages=STAGES, settings=settings(out, server.url, concurrency=2)), out / "distill.jsonl", 4))
        distilled_first = set(json.loads(line)["id"] for line in (out / "distill.jsonl").read_text().splitlines())
        assert 4 <= len(distilled_first) < 12
        before = len(server.requests)
        # 2nd run: killed during annotation
        asyncio.run(run_until(prepare(loaded, stages=STAGES, settings=settings(out, server.url, concurrency=2)), out / "annotate.jsonl", 3))
        second = server.requests[before:]
        annotated_first = set(json.loads(line)["id"] for line in (out / "annotate.jsonl").read_text().splitlines())
        before = len(server.requests)
        # 3rd run: to the end
        report = asyncio.run(prepare(loaded, stages=STAGES, settings=settings(out, server.url, concurrency=2)))
        third = server.requests[before:]

    assert not {f"p{problem_of(r)}" for r in second if r.num_images} & distilled_first
    assert not [r for r in third if r.num_images]  # distillation had finished
    assert not {f"p{problem_of(r)}" for r in third} & annotated_first
    assert report["output"]["num_rows"] == 12 and report["dropped"] == {}
    assert load_prompts(out) == load_prompts(tmp_path / "baseline")
    assert pq.read_table(out / "dataset.parquet").equals(pq.read_table(tmp_path / "baseline" / "dataset.parquet"))


def test_ctrl_c_on_the_cli_then_rerun(tmp_path):
    """The teacher answers two problems, then holds every further request until the CLI got its SIGINT
    (so the run cannot finish first, however slow the machine); the rerun gets answers at once."""
    data = write_input(tmp_path / "train.parquet", 8)
    out = tmp_path / "out"
    interrupted = threading.Event()
    teacher_calls = itertools.count()

    def held(request) -> Reply:
        if request.num_images and next(teacher_calls) >= 2:
            interrupted.wait(60)
        return all_right(request)

    with FakeOpenAI(held) as server:
        command = [
            sys.executable, "-m", "perception_r1.cli", "prepare-data", "all", "--input", str(data), "--output-dir", str(out),
            "--teacher-url", server.url, "--teacher-model", "t", "--text-url", server.url, "--text-model", "x",
            "--samples", "1", "--concurrency", "1", "--timeout", "10", "--no-progress", "--teacher-key-env", "DATAPREP_TEST_KEY",
        ]
        env = os.environ | {"DATAPREP_TEST_KEY": "sk-secret-4711"}
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while not ((out / "distill.jsonl").exists() and (out / "distill.jsonl").read_text().count("\n") >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        try:
            _, stderr = proc.communicate(timeout=30)
        finally:
            interrupted.set()
        assert proc.returncode == 130, stderr
        assert "rerun the same command to resume" in stderr
        finished = {json.loads(line)["id"] for line in (out / "distill.jsonl").read_text().splitlines()}
        before = len(server.requests)
        rerun = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        assert rerun.returncode == 0, rerun.stderr
        second = server.requests[before:]

    assert "output    8 rows" in rerun.stdout
    # the key went to the teacher only, and nowhere on disk or in the console
    assert {r.authorization for r in second} == {"Bearer sk-secret-4711", "Bearer EMPTY"}
    assert not [f for f in out.rglob("*") if f.is_file() and b"sk-secret-4711" in f.read_bytes()]
    assert "sk-secret-4711" not in rerun.stdout + rerun.stderr + stderr
    assert not {f"p{problem_of(r)}" for r in second if r.num_images} & finished
    assert len(load_prompts(out)) == 8


def test_rerun_with_other_settings_or_input_is_refused(tmp_path):
    loaded = read_prompts(write_input(tmp_path / "train.parquet", 2))
    out = tmp_path / "out"
    with FakeOpenAI(all_right) as server:
        asyncio.run(prepare(loaded, stages=("distill",), settings=settings(out, server.url)))
        with pytest.raises(ValueError, match=r"other distill settings \(changed: \['samples'\]\)"):
            asyncio.run(prepare(loaded, stages=("distill",), settings=settings(out, server.url, samples=3)))
    changed = read_prompts(write_input(tmp_path / "other.parquet", 3))
    changed.prompts[0] = changed.prompts[0].__class__(**{**{f: getattr(changed.prompts[0], f) for f in changed.prompts[0].__slots__}, "answer": "77"})
    with pytest.raises(ValueError, match=r"started from another input: 1 problems changed \(e\.g\. \['p0'\]\)"):
        asyncio.run(prepare(changed, stages=("filter",), settings=settings(out, "http://unused")))


def test_auth_failure_stops_the_stage_at_once(tmp_path):
    loaded = read_prompts(write_input(tmp_path / "train.parquet", 5))
    with FakeOpenAI(lambda request: Reply(status=401)) as server:
        with pytest.raises(FatalEndpointError, match="refused the request"):
            asyncio.run(prepare(loaded, stages=("distill",), settings=settings(tmp_path / "out", server.url, concurrency=1)))
        assert len(server.requests) == 1


def test_synthetic_problems_pass_through(tmp_path):
    from dataprep.synthetic import make_problems

    prompts = make_problems(SyntheticDataConfig(num_problems=4, seed=3, image_size=64))
    path = write_dataset([p.__class__(p.id, p.index, p.problem, p.answer, p.image) for p in prompts], output_dir=tmp_path, fmt="jsonl")
    loaded = read_prompts(path)
    answers = {p.problem.replace("<image>", ""): p.answer for p in prompts}

    def script(request) -> Reply:
        if request.num_images:
            question = request.text.removesuffix(f" {FORMAT_PROMPT}")
            return Reply(f"<think>\nsolve\n</think>\n<answer>\n\\boxed{{{answers[question]}}}\n</answer>")
        return Reply('["a fact"]')

    with FakeOpenAI(script) as server:
        report = asyncio.run(prepare(loaded, stages=STAGES, settings=settings(tmp_path / "out", server.url, samples=1)))
    assert report["output"]["num_rows"] == 4
    assert [(p.id, p.answer) for p in load_prompts(tmp_path / "out")] == [(p.id, p.answer) for p in prompts]


def test_cli_validates_before_work(tmp_path, capsys, monkeypatch):
    data = write_input(tmp_path / "train.parquet", 1)
    base = ["prepare-data", "all", "--input", str(data), "--output-dir", str(tmp_path / "out")]
    assert cli_main(base + ["--text-url", "http://x/v1", "--text-model", "m"]) == 2
    assert "the distill stage needs --teacher-url and --teacher-model" in capsys.readouterr().err
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    teacher = ["--teacher-url", "http://x/v1", "--teacher-model", "m", "--teacher-key-env", "NO_SUCH_KEY_VAR"]
    assert cli_main(base + teacher + ["--text-url", "http://x/v1", "--text-model", "m"]) == 2
    assert "NO_SUCH_KEY_VAR, which is unset or empty" in capsys.readouterr().err
    assert cli_main(["prepare-data", "filter", "--input", str(tmp_path / "missing"), "--output-dir", "o"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli_main(["prepare-data", "filter", "--input", str(data), "--output-dir", str(tmp_path / "out")]) == 2
    assert "run the distill stage first" in capsys.readouterr().err
    assert not (tmp_path / "out" / "dataset.parquet").exists()


@pytest.mark.parametrize(
    ("reply", "facts"),
    [
        ('["AB = 3", " AB  =  3 ", "ab = 3", "BC ⟂ CD"]', ("AB = 3", "BC ⟂ CD")),
        ('```json\n["x"]\n```', ("x",)),
        ('Sure! ["P lies on circle O"] Hope this helps.', ("P lies on circle O",)),
        ('{"facts": ["AB = 3"]}', ("AB = 3",)),
        (json.dumps(["ok", "x" * 201, "<info1>bad</info1>", ""]), ("ok",)),
    ],
)
def test_annotation_replies_are_cleaned_and_deduplicated(reply, facts):
    assert parse_annotation_list(reply) == facts


@pytest.mark.parametrize(
    ("reply", "why"),
    [("AB = 3", "not JSON"), ('["AB = 3",', "not JSON"), ('["a", 3]', "not all strings"), ('"AB"', "not a list"), ('["", " "]', "no usable fact"), ('{"a": [], "b": []}', "object")],
)
def test_malformed_annotation_replies_are_rejected(reply, why):
    with pytest.raises(InvalidAnnotations, match=why):
        parse_annotation_list(reply)


def test_accuracy_follows_the_spec_rule():
    assert accuracy("<think>\nx\n</think>\n<answer>\n\\boxed{24}\n</answer>", ground_truth="24") == 1.0
    assert accuracy("<think>\n\\boxed{24}\n</think>\n<answer>\n\\boxed{25}\n</answer>", ground_truth="24") == 0.0  # last boxed wins
    assert accuracy("so the answer is 24", ground_truth="24") == 1.0
    assert accuracy("<answer>\\frac{1}{2}</answer>", ground_truth="0.5") == 1.0  # one-line answer tags are stripped
    assert accuracy("\\boxed{4\\sqrt{3}}", ground_truth="4\\sqrt{3}") == 0.0  # raw bare LaTeX parses as 4 (docs/method.md §3.2)
    assert accuracy("\\boxed{4\\sqrt{3}}", ground_truth="4\\sqrt{3}", mode="wrap") == 1.0
    assert accuracy("\\boxed{4}", ground_truth="4\\sqrt{3}", mode="wrap") == 0.0


def test_progress_log_drops_a_line_cut_short(tmp_path):
    path = tmp_path / "distill.jsonl"
    record = DistillRecord("a", "ok", ("s",), ("stop",), (), 1, 2)
    with ProgressLog(path, cls=DistillRecord) as log:
        log.append(record)
    with open(path, "a") as f:
        f.write('{"id": "b", "status": "o')  # a crash mid-write
    with ProgressLog(path, cls=DistillRecord) as log:
        assert log.records == {"a": record}
        log.append(DistillRecord("c", "error", (), (), ("timed out",), 0, 0))
    assert [json.loads(line)["id"] for line in path.read_text().splitlines()] == ["a", "c"]


def test_accuracy_works_off_the_main_thread():
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(accuracy, "<answer>\n\\boxed{24}\n</answer>", ground_truth="24").result() == 1.0


def test_nothing_kept_is_an_error_after_the_report_is_written(tmp_path):
    loaded = read_prompts(write_input(tmp_path / "train.parquet", 2))
    with FakeOpenAI(lambda request: Reply(cot(problem_of(request), 0))) as server:  # every answer wrong
        with pytest.raises(ValueError, match="no problem survived every stage"):
            asyncio.run(prepare(loaded, stages=STAGES, settings=settings(tmp_path / "out", server.url)))
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["dropped"] == {"no_correct_sample": 2} and "output" not in report
    assert not (tmp_path / "out" / "dataset.parquet").exists()


def test_geometry3k_folders_through_the_cli_to_jsonl(tmp_path, capsys):
    split = tmp_path / "geometry3k" / "train"
    problems = {0: ("Find x.", "B", ["5", "12", "13", "26"]), 1: ("Find the area.", "D", ["1", "2", "3", "4\\sqrt{3}"])}
    for pid, (text, letter, choices) in problems.items():
        (split / str(pid)).mkdir(parents=True)
        (split / str(pid) / "data.json").write_text(json.dumps({"problem_text": text, "choices": choices, "answer": letter}))
        (split / str(pid) / "img_diagram.png").write_bytes(png(pid))
    answers = {"Find x.": "12", "Find the area.": "4\\sqrt{3}"}

    def script(request) -> Reply:
        if request.num_images:
            answer = answers[request.text.removesuffix(f" {FORMAT_PROMPT}")]
            return Reply(f"<think>\nsolve\n</think>\n<answer>\n\\boxed{{{answer}}}\n</answer>")
        return Reply('["AB = 5", "AB ⟂ BC"]')

    with FakeOpenAI(script) as server:
        argv = ["prepare-data", "all", "--input", str(split), "--output-dir", str(tmp_path / "out"), "--format", "jsonl",
                "--teacher-url", server.url, "--teacher-model", "t", "--text-url", server.url, "--text-model", "x", "--no-progress"]
        assert cli_main(argv) == 0
        # the faithful rule (docs/method.md §3.2) mis-parses the bare-LaTeX ground truth 4\sqrt{3} as 4: dropped
        assert "output    1 rows" in capsys.readouterr().out
        assert [p.id for p in load_prompts(tmp_path / "out")] == ["geo3k-00000"]
        # filter again with the wrapping rule (docs/method.md §8.3), each stage alone: nothing is distilled again
        before = len(server.requests)
        common = ["--input", str(split), "--output-dir", str(tmp_path / "out"), "--no-progress"]
        assert cli_main(["prepare-data", "filter", "--answer-mode", "wrap"] + common) == 0
        assert cli_main(["prepare-data", "annotate", "--text-url", server.url, "--text-model", "x"] + common) == 0
        assert cli_main(["prepare-data", "write", "--format", "jsonl"] + common) == 0
        assert [r.num_images for r in server.requests[before:]] == [0]  # one extraction, for the newly kept problem
    assert "output    2 rows" in capsys.readouterr().out
    out = load_prompts(tmp_path / "out")
    assert [(p.id, p.problem, p.answer, p.annotations) for p in out] == [
        ("geo3k-00000", "<image>Find x.", "12", ("AB = 5", "AB ⟂ BC")),
        ("geo3k-00001", "<image>Find the area.", "4\\sqrt{3}", ("AB = 5", "AB ⟂ BC")),
    ]
    assert sorted(f.name for f in (tmp_path / "out" / "images").iterdir()) == ["geo3k-00000.png", "geo3k-00001.png"]
