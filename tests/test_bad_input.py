"""Bad input, table-driven: each case writes one malformed input under a temporary folder, feeds it
to the real entry point that meets it first (the config loader, the CLI, the dataset reader, the
model resolver, the image and prompt encoders, the checkpoint finder), and expects either

- an error (`ValueError`, or exit code 2 and one `perception-r1 <cmd>: error:` line from the CLI)
  whose message names the input (file, row, field) and says how to fix it, or
- a counted skip: the reader reports the bad row under its reason and loads the good one.

A test below the table checks the run-time half of one skip: a prompt the engine refuses
(over `data.max_prompt_tokens`) is counted and released by the dispatch loop, never retried or leaked.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from core.config import DataConfig
from core.config_files import load_config, parse_config

GOOD_CONFIG = "run: {num_steps: 3}\ncluster: {num_cpus: 1, num_gpus: 0}\n"
SECRET = "sk-live-0123456789abcdef"


@dataclass
class Ctx:
    """What a case gets: its folder, and the tiny model's processor on demand (built once per session)."""

    tmp: Path
    request: Any

    def write(self, name: str, content: str | bytes) -> Path:
        path = self.tmp / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
        return path

    def processor(self):
        from core.vl import load_processor

        return load_processor(self.request.getfixturevalue("tiny_model_path"))


@dataclass(frozen=True)
class Case:
    id: str
    drive: Callable[[Ctx], Any]
    """Writes the bad input and feeds it to an entry point; returns what the entry point returned."""
    says: tuple[str, ...] = ()
    """An error is expected; its message contains each of these (what, where, and the fix)."""
    gives: dict | None = None
    """No error is expected: the entry point counted a skip and returned this."""
    never_says: tuple[str, ...] = ()
    """Text the message must not echo (a secret that was in the input)."""


@dataclass(frozen=True)
class Exit:
    code: int
    stderr: str


# ------------------------------------------------------------------------------------------ drivers
def config_file(text: str | bytes, name: str = "bad.yaml") -> Callable[[Ctx], Any]:
    return lambda ctx: load_config(ctx.write(name, text))


def config(raw: dict) -> Callable[[Ctx], Any]:
    return lambda ctx: parse_config(raw, source="bad.yaml")


def cli(*argv: str) -> Callable[[Ctx], Exit]:
    """`perception-r1 *argv` in-process; `{cfg}` stands for a valid config file."""

    def drive(ctx: Ctx) -> Exit:
        from perception_r1.cli import main

        good = ctx.write("good.yaml", GOOD_CONFIG)
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                code = main([a.replace("{cfg}", str(good)).replace("{tmp}", str(ctx.tmp)) for a in argv])
            except SystemExit as e:  # argparse's own usage errors
                code = e.code
        return Exit(code, err.getvalue())

    return drive


def judge_prompt(text: str | bytes) -> Callable[[Ctx], Any]:
    """A judge prompt file with `text`, read as `judge.prompt_file`."""
    from judge.prompt_file import load_system_prompt

    return lambda ctx: load_system_prompt(str(ctx.write("p.txt", text)))


def png(width: int = 32, height: int = 32, mode: str = "RGB") -> bytes:
    out = io.BytesIO()
    Image.new(mode, (width, height)).save(out, format="PNG")
    return out.getvalue()


GOOD_ROW = {"id": "good-0", "problem": "<image>Find x.", "answer": "3"}


def jsonl(*bad: dict | bytes, on_bad_row: str = "skip") -> Callable[[Ctx], Any]:
    """A JSONL dataset: one good row, then the bad ones (dicts, or raw bytes for a whole line); images by path."""

    def drive(ctx: Ctx) -> dict:
        ctx.write("img.png", png())
        lines = [json.dumps(GOOD_ROW | {"images": ["img.png"]}).encode()]
        for i, row in enumerate(bad, start=1):
            lines.append(row if isinstance(row, bytes) else json.dumps({"id": f"bad-{i}", "images": ["img.png"]} | row).encode())
        return load(ctx.write("rows.jsonl", b"\n".join(lines) + b"\n"), on_bad_row=on_bad_row)

    return drive


def parquet(*bad: dict, schema: pa.Schema | None = None) -> Callable[[Ctx], Any]:
    """A parquet dataset: one good row, then the bad ones; images as `[{bytes, path}]` like the reference file."""

    def drive(ctx: Ctx) -> dict:
        rows = [GOOD_ROW | {"images": [{"bytes": png(), "path": None}]}]
        rows += [GOOD_ROW | {"id": f"bad-{i}"} | row for i, row in enumerate(bad, start=1)]
        path = ctx.tmp / "rows.parquet"
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
        return load(path)

    return drive


def image_row(data: bytes) -> dict:
    return {"images": [{"bytes": data, "path": None}]}


def load(path: Path, *, on_bad_row: str = "skip") -> dict:
    from dataprep.loaders import read_prompts

    result = read_prompts(path, on_bad_row=on_bad_row)
    return {"loaded": len(result.prompts), **result.skip_counts()}


def image(data: bytes) -> Callable[[Ctx], Any]:
    def drive(ctx: Ctx):
        from core.vl import prepare_image

        return prepare_image(data, min_pixels=3136, max_pixels=1806336, source="prompt geo-7")

    return drive


def prompt(problem: str, *, max_prompt_tokens: int = 4096) -> Callable[[Ctx], Any]:
    def drive(ctx: Ctx):
        from core.records import Prompt
        from core.vl import encode_prompt

        p = Prompt(id="geo-7", index=0, problem=problem, answer="3", image=png(64, 64))
        return encode_prompt(ctx.processor(), p, data=DataConfig(max_prompt_tokens=max_prompt_tokens))

    return drive


def model_folder(files: dict[str, str] | None, *, check: str = "resolve") -> Callable[[Ctx], Any]:
    """A model folder with these files (None: no folder at all), given to the driver or the processor loader."""

    def drive(ctx: Ctx):
        from core.vl import load_processor
        from perception_r1.driver import resolve_model

        folder = ctx.tmp / "model"
        if files is not None:
            folder.mkdir()
            for name, text in files.items():
                (folder / name).write_text(text)
        if check == "processor":
            return load_processor(folder)
        return resolve_model(parse_config({"model": {"type": "pretrained", "path": str(folder)}}))

    return drive


def checkpoints(*folders: str) -> Callable[[Ctx], Any]:
    """A run's checkpoints: `good` folders are complete; `garbage` has an unreadable driver file;
    `no_learner` lacks the learner's part. Returns which one a resume picks and how many it skipped."""

    def drive(ctx: Ctx) -> dict:
        from perception_r1.run_checkpoints import DriverState, complete, load_latest
        from perception_r1.stream import StreamState

        root = ctx.tmp / "checkpoints"
        for step, kind in enumerate(folders, start=1):
            tmp = root / f"step_{step:06d}.tmp"
            (tmp / "learner").mkdir(parents=True)
            if kind != "no_learner":
                (tmp / "learner.json").write_text(json.dumps({"version": step, "scheduler": {}}))
                (tmp / "learner" / ".metadata").write_bytes(b"")
            final = complete(tmp, DriverState(version=step, stream=StreamState(next_seq=step)), keep=10)
            if kind == "garbage":
                (final / "driver.msgpack").write_bytes(b"\xc1 not msgpack")
        caplog = ctx.request.getfixturevalue("caplog")
        with caplog.at_level(logging.WARNING, logger="perception_r1"):
            found = load_latest(root)
        warned = [r.getMessage() for r in caplog.records if "is unreadable" in r.getMessage()]
        assert all("falling back to an older one" in w and "step_" in w for w in warned), warned
        return {"resumed_from": found[0].name if found else None, "skipped": len(warned)}

    return drive


def judge_request_of_row_without_annotations(ctx: Ctx):
    """Such a row loads (its prompt gets r_v = 0, docs/method.md §3.3); the judge's request builder refuses it."""
    from dataprep.loaders import read_prompts
    from judge.verdicts import judge_messages

    ctx.write("img.png", png())
    path = ctx.write("rows.jsonl", json.dumps(GOOD_ROW | {"images": ["img.png"]}))
    row = read_prompts(path).prompts[0]
    assert row.annotations == ()
    return judge_messages("a response", row.annotations)


# -------------------------------------------------------------------------------------------- table
GPU_HUNGRY = {"cluster": {"num_gpus": 2}, "rollout": {"engine": {"type": "vllm"}, "num_actors": 2, "num_gpus_per_actor": 1},
                 "learner": {"num_gpus_per_worker": 1}}
EXTERNAL = {"type": "external", "base_url": "http://127.0.0.1:9/v1", "model": "m"}

CASES = [
    # config files
    Case("yaml-malformed", config_file("run: {name: [unclosed\n"), says=("bad.yaml", "not valid YAML", "line 2")),
    Case("yaml-tab-indent", config_file("run:\n\tnum_steps: 3\n"), says=("bad.yaml", "not valid YAML", "line 2, column 1")),
    Case("yaml-not-utf8", config_file("run: {name: caf\xe9}\n".encode("latin-1")),
         says=("bad.yaml", "not UTF-8", "byte 0xe9", "re-save it as UTF-8")),
    Case("yaml-missing-file", lambda ctx: load_config(ctx.tmp / "nowhere.yaml"),
         says=("nowhere.yaml does not exist", "pass a YAML file")),
    Case("yaml-folder", lambda ctx: load_config(ctx.tmp), says=("is a folder", "pass a YAML file")),
    Case("yaml-list", config_file("- run\n- model\n"), says=("bad.yaml must hold a mapping of sections", "got list")),
    Case("yaml-duplicate-section", config_file("run: {num_steps: 3}\nrun: {seed: 1}\n"),
         says=("bad.yaml", "'run' appears twice", "keep one", "line 2")),
    Case("unknown-section", config_file("trainer: {lr: 1}\n"), says=("bad.yaml", "trainer: unknown key", "check its spelling")),
    Case("mistyped-key", config({"buffer": {"max_stalenes": 1}}), says=("buffer.max_stalenes: unknown key", "remove it")),
    Case("api-key-in-config", config({"judge": {"llm": EXTERNAL | {"api_key": SECRET}}}),
         says=("judge.llm.external.api_key: unknown key",), never_says=(SECRET,)),
    Case("wrong-type-int", config({"run": {"num_steps": "ten"}}), says=("run.num_steps", "valid integer", "'ten'")),
    Case("wrong-type-section", config({"learner": 5}), says=("learner", "valid dictionary", "got 5")),
    Case("wrong-type-pair", config({"learner": {"optimizer": {"betas": [0.9]}}}),
         says=("learner.optimizer.betas.1", "Field required")),
    Case("range-samples", config({"rollout": {"samples_per_prompt": 1}}),
         says=("rollout.samples_per_prompt", "greater than or equal to 2", "got 1")),
    Case("range-top-p", config({"rollout": {"top_p": 1.5}}), says=("rollout.top_p", "less than or equal to 1")),
    Case("range-port", config({"judge": {"http_port": 70000}}), says=("judge.http_port", "less than or equal to 65535")),
    Case("range-nan-lr", config({"learner": {"optimizer": {"lr": float("nan")}}}),
         says=("learner.optimizer.lr", "greater than 0", "nan")),
    Case("unknown-variant", config({"rollout": {"engine": {"type": "sglang"}}}), says=("rollout.engine", "'sglang'", "'hf', 'vllm'")),
    Case("variant-without-type", config({"model": {"path": "/models/qwen"}}), says=("model: `type:` is missing", "add it")),
    Case("pretrained-without-path", config({"model": {"type": "pretrained"}}), says=("model.pretrained.path", "Field required")),
    Case("more-gpus-than-cluster", config(GPU_HUNGRY),
         says=("asks for 3 GPUs", "cluster.num_gpus is 2", "lower the counts or raise cluster.num_gpus")),
    Case("judge-gpus-over-cluster",
         config({"cluster": {"num_gpus": 1}, "judge": {"llm": {"type": "vllm", "model_path": "/j", "num_replicas": 2}}}),
         says=("asks for 2 GPUs", "cluster.num_gpus is 1")),
    Case("vllm-engine-without-gpu", config({"rollout": {"engine": {"type": "vllm"}}}),
         says=("rollout.engine.tensor_parallel_size=1 needs rollout.num_gpus_per_actor = 1 (got 0)",)),
    Case("vllm-engine-gpus-over-tp", config({"rollout": {"engine": {"type": "vllm", "tensor_parallel_size": 2},
                                                         "num_gpus_per_actor": 4}}),
         says=("rollout.engine.tensor_parallel_size=2 needs rollout.num_gpus_per_actor = 2 (got 4)",
               "Ray holds GPUs nobody uses", "set rollout.num_gpus_per_actor: 2")),
    Case("judge-gpus-vs-tp", config({"judge": {"llm": {"type": "vllm", "model_path": "/j", "tensor_parallel_size": 2}}}),
         says=("judge.llm.tensor_parallel_size=2 needs judge.llm.num_gpus_per_replica = 2 (got 1)",)),
    Case("async-with-uncorrected-loss", config({"buffer": {"max_staleness": 2}, "learner": {"loss": {"type": "grpo"}}}),
         says=("buffer.max_staleness=2 with learner.loss.type=grpo", "set learner.loss.type: tis (or decoupled)",
               "learner.loss.allow_uncorrected_staleness: true")),
    Case("bf16-on-cpu", config({"learner": {"dtype": "bfloat16"}}), says=("learner.dtype=bfloat16 needs GPUs", "use float32 on CPU")),
    Case("pixels-swapped", config({"data": {"min_pixels": 10, "max_pixels": 5}}), says=("data.min_pixels (10) exceeds", "swap them")),
    Case("batch-never-fills", config({"learner": {"prompts_per_step": 100}, "buffer": {"max_groups": 10}}),
         says=("learner.prompts_per_step (100) exceeds buffer.max_groups (10)", "raise buffer.max_groups")),
    Case("call-never-reserves", config({"rollout": {"prompts_per_call": 4}, "learner": {"prompts_per_step": 2},
                                         "buffer": {"max_staleness": 0}}),
         says=("rollout.prompts_per_call (4) exceeds what the buffer lets one call reserve", "= 2",
               "lower rollout.prompts_per_call")),
    Case("inflight-below-a-call", config({"rollout": {"prompts_per_call": 4, "samples_per_prompt": 8,
                                                      "inflight_sequences_per_actor": 16}}),
         says=("rollout.inflight_sequences_per_actor (16) is below one call's sequences", "= 32",
               "raise it or lower prompts_per_call")),
    Case("inflight-in-calls", config({"rollout": {"max_inflight_per_actor": 4}}),
         says=("rollout.max_inflight_per_actor (calls) was replaced by rollout.inflight_sequences_per_actor",
               "remove max_inflight_per_actor")),
    Case("moved-key", config({"learner": {"loss": {"drop_uniform_groups": True}}}),
         says=("learner.loss.drop_uniform_groups: this key moved; write it as buffer.drop_uniform_groups",)),
    # command line
    Case("cli-override-no-equals", cli("train", "{cfg}", "--set", "run.num_steps"),
         says=("perception-r1 train: error:", "'run.num_steps' must look like section.key=value")),
    Case("cli-override-bad-yaml", cli("train", "{cfg}", "--set", "run.name=[x"),
         says=("perception-r1 train: error:", "not valid YAML", 'quote it: run.name="[x"')),
    Case("cli-override-python-tag", cli("train", "{cfg}", "--set", "run.name=!!python/object/apply:os.system [ls]"),
         says=("perception-r1 train: error:", "could not determine a constructor", "quote it")),
    Case("cli-override-unknown-key", cli("train", "{cfg}", "--set", "buffer.max_stalenes=1"),
         says=("perception-r1 train: error:", "good.yaml", "buffer.max_stalenes: unknown key")),
    Case("cli-override-into-value", cli("train", "{cfg}", "--set", "run.num_steps.x=1"), says=("num_steps is not a section",)),
    Case("cli-override-out-of-range", cli("sft", "{cfg}", "--set", "run.num_steps=0"),
         says=("perception-r1 sft: error:", "run.num_steps", "greater than or equal to 1")),
    Case("cli-unknown-flag", cli("train", "{cfg}", "--frobnicate"), says=("unrecognized arguments: --frobnicate",)),
    Case("cli-missing-config", cli("train"), says=("the following arguments are required: config",)),
    Case("cli-missing-dataset", cli("prepare-data", "write", "--input", "{tmp}/none", "--output-dir", "{tmp}/out"),
         says=("perception-r1 prepare-data: error:", "none does not exist")),
    # the judge's prompt file (judge.prompt_file; eval's --perception-prompt-file)
    Case("judge-prompt-file-missing", cli("train", "{cfg}", "--set", "run.output_dir={tmp}/runs",
                                          "--set", "judge.prompt_file={tmp}/nope.txt"),
         says=("perception-r1 train: error:", "judge.prompt_file=", "nope.txt: no such file", "built-in prompt")),
    Case("judge-prompt-file-empty", judge_prompt(" \n"), says=("judge.prompt_file=", "p.txt", "empty", "docs/judge-prompt.txt")),
    Case("judge-prompt-file-not-utf8", judge_prompt("Mark each <infoK> caf\xe9".encode("latin-1")),
         says=("p.txt", "not UTF-8", "save it as UTF-8")),
    Case("judge-prompt-file-without-tags", judge_prompt("Say whether the solution uses the diagram."),
         says=("p.txt", "<infoK>1</infoK>", "{examples}")),
    Case("eval-prompt-file-missing", cli("eval", "--benchmark", "synthetic", "--policy-url", "http://127.0.0.1:9/v1",
                                         "--policy-model", "m", "--perception", "lexical", "--perception-prompt-file",
                                         "{tmp}/nope.txt", "--output-dir", "{tmp}/eval"),
         says=("perception-r1 eval: error:", "--perception-prompt-file=", "no such file")),
    # model folders
    Case("model-path-missing", model_folder(None), says=("model.path", "not a model folder", "local copy of the model")),
    Case("model-without-config", model_folder({"README.md": "weights elsewhere"}), says=("no config.json", "local copy")),
    Case("model-without-processor", model_folder({"config.json": "{}"}, check="processor"),
         says=("model folder", "no loadable processor", "preprocessor_config.json")),
    Case("model-config-not-json", model_folder({"config.json": "{oops"}, check="processor"),
         says=("no loadable processor", "JSONDecodeError")),
    # dataset files
    Case("dataset-missing", lambda ctx: load(ctx.tmp / "train.parquet"), says=("train.parquet does not exist", "data.dataset.path")),
    Case("dataset-csv", lambda ctx: load(ctx.write("train.csv", "a,b\n")),
         says=("unknown dataset format '.csv'", "use a .parquet or .jsonl")),
    Case("dataset-empty", lambda ctx: load(ctx.write("rows.jsonl", "")), says=("rows.jsonl: no usable rows (0 skipped",)),
    Case("dataset-not-parquet", lambda ctx: load(ctx.write("rows.parquet", b"PAR1 but not really")),
         says=("rows.parquet: not a readable parquet file", "re-export it")),
    Case("dataset-missing-column", lambda ctx: load(_write_parquet(ctx, [{"problem": "<image>x", "images": [png()]}])),
         says=("missing columns ['answer']", "see docs/method.md §5")),
    Case("dataset-all-rows-bad", lambda ctx: load(ctx.write("rows.jsonl", b"[1]\n{]\n")),
         says=("rows.jsonl: no usable rows (2 skipped: {'invalid_json': 2})",)),
    Case("dataset-duplicate-id", jsonl({"id": "good-0", "problem": "<image>y", "answer": "1"}),
         says=("rows 0 and 1 share the id 'good-0'", "make ids unique")),
    Case("row-without-image", jsonl({"problem": "<image>x", "answer": "1", "images": []}), gives={"loaded": 1, "missing_image": 1}),
    Case("row-image-not-found", jsonl({"problem": "<image>x", "answer": "1", "images": ["gone.png"]}),
         gives={"loaded": 1, "missing_image": 1}),
    Case("row-two-images", jsonl({"problem": "<image>x", "answer": "1", "images": ["img.png", "img.png"]}),
         gives={"loaded": 1, "multiple_images": 1}),
    Case("row-without-answer", jsonl({"problem": "<image>x", "answer": "  "}), gives={"loaded": 1, "missing_answer": 1}),
    Case("row-without-problem", jsonl({"answer": "1"}), gives={"loaded": 1, "missing_problem": 1}),
    Case("row-problem-without-image-tag", jsonl({"problem": "Find x.", "answer": "1"}), gives={"loaded": 1, "bad_placeholder": 1}),
    Case("row-problem-two-image-tags", jsonl({"problem": "<image>a<image>b", "answer": "1"}),
         gives={"loaded": 1, "bad_placeholder": 1}),
    Case("row-not-utf8-line", jsonl(b'{"id": "x", "problem": "<image>caf\xe9", "answer": "1"}'), gives={"loaded": 1, "not_utf8": 1}),
    Case("row-not-json", jsonl(b"{not json"), gives={"loaded": 1, "invalid_json": 1}),
    Case("row-not-an-object", jsonl(b'["<image>x", "1"]'), gives={"loaded": 1, "invalid_json": 1}),
    Case("row-not-utf8-parquet", parquet({"problem": b"<image>caf\xe9", "answer": b"1"}, schema=pa.schema(
        [("id", pa.string()), ("problem", pa.binary()), ("answer", pa.binary()),
         ("images", pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())])))])),
         gives={"loaded": 1, "not_utf8": 1}),
    Case("row-corrupt-image", parquet(image_row(b"\x89PNG\r\n\x1a\n garbage")), gives={"loaded": 1, "undecodable_image": 1}),
    Case("row-truncated-image", parquet(image_row(png(64, 64)[:60])), gives={"loaded": 1, "undecodable_image": 1}),
    Case("row-huge-image", parquet(image_row(png(8001, 8001, "1"))), gives={"loaded": 1, "huge_image": 1}),
    Case("row-elongated-image", parquet(image_row(png(4000, 10, "L"))), gives={"loaded": 1, "elongated_image": 1}),
    Case("row-bad-under-raise", jsonl({"problem": "<image>x", "answer": "1", "images": []}, on_bad_row="raise"),
         says=("rows.jsonl: row 1 (bad-1): no image", "give every row one image", "on_bad_row='skip'")),
    Case("row-not-utf8-under-raise", jsonl(b'{"problem": "\xff"}', on_bad_row="raise"),
         says=("rows.jsonl: row 1", "not UTF-8", "re-encode the file as UTF-8")),
    Case("row-without-annotations", judge_request_of_row_without_annotations,
         says=("annotations is empty", "do not send it to the judge")),
    # images and prompts as the engines meet them
    Case("image-corrupt", image(b"GIF89a broken"), says=("image of prompt geo-7 cannot be decoded", "re-encode it as PNG or JPEG")),
    Case("image-empty", image(b""), says=("image of prompt geo-7 cannot be decoded", "drop the row")),
    Case("image-huge", image(png(8001, 8001, "1")), says=("8001x8001 pixels", "64,000,000-pixel limit", "downscale it")),
    Case("image-elongated", image(png(4000, 10, "L")), says=("4000x10", "more elongated than 200:1", "crop or pad it")),
    Case("prompt-without-image-tag", prompt("Find x."), says=("prompt geo-7", "exactly one <image> (found 0)", "put one <image>")),
    Case("prompt-two-image-tags", prompt("<image>a<image>b"), says=("prompt geo-7", "(found 2)")),
    Case("prompt-too-long", prompt("<image>" + "Find x. " * 40, max_prompt_tokens=64),
         says=("prompt geo-7 has", "over data.max_prompt_tokens=64", "raise it or lower data.max_pixels")),
    # checkpoints on --resume
    Case("checkpoint-newest-corrupt", checkpoints("good", "garbage"), gives={"resumed_from": "step_000001", "skipped": 1}),
    Case("checkpoint-newest-incomplete", checkpoints("good", "good", "no_learner"),
         gives={"resumed_from": "step_000002", "skipped": 1}),
    Case("checkpoint-all-unreadable", checkpoints("garbage", "garbage"), gives={"resumed_from": None, "skipped": 2}),
]


def _write_parquet(ctx: Ctx, rows: list[dict]) -> Path:
    path = ctx.tmp / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_the_table_is_big_and_ids_are_unique():
    assert len(CASES) >= 30
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input(case: Case, tmp_path: Path, request):
    ctx = Ctx(tmp_path, request)
    if case.gives is not None:
        assert case.drive(ctx) == case.gives
        return
    try:
        result = case.drive(ctx)
    except ValueError as e:
        message = str(e)
    else:
        assert isinstance(result, Exit), f"expected an error, got {result!r}"
        assert result.code == 2 and "Traceback" not in result.stderr, result
        message = result.stderr
    for needle in case.says:
        assert needle in message, f"{needle!r} not in:\n{message}"
    for secret in case.never_says:
        assert secret not in message


# ------------------------------------------------------------------ a refused prompt at run time
class _RemoteStream:
    """`handle.method.remote(*args)` of a Ray streaming generator (an async iterator of object refs, here
    awaitables), for in-process fakes of Ray handles: `fn` returns the values or raises as the actor would."""

    def __init__(self, fn: Callable) -> None:
        self.fn = fn

    def remote(self, *args):
        async def refs():
            for value in self.fn(*args):
                async def ref(value=value):
                    return value

                yield ref()

        return refs()


class _FakeBuffer:
    """Reservations as the replay buffer counts them (the driver's `core.seams.Buffer`): `capacity` at most;
    closes after `num_calls` reservations."""

    def __init__(self, *, capacity: int, num_calls: int) -> None:
        self.capacity, self.num_calls = capacity, num_calls
        self.reserved = self.num_reserved = 0
        self.stalled = False

    async def reserve(self, n: int) -> bool:
        if self.reserved + n > self.capacity:
            self.stalled = True  # the real buffer would block here forever
        if self.stalled or self.num_reserved == self.num_calls:
            return False
        self.reserved += n
        self.num_reserved += 1
        return True

    async def release(self, n: int) -> None:
        self.reserved -= n


def test_prompt_over_max_tokens_is_a_counted_skip_not_a_stall():
    """The engine's PromptTooLong reaches the dispatch loop as Ray delivers it (a RayTaskError that is also
    the cause's type), through the driver's adapter (PromptsRefused); the call's prompts are counted as
    skipped, resolved (not retried), and their buffer reservations released -- 30 refused calls through a
    buffer that holds 8 must not stall dispatch."""
    import ray

    from core.records import Prompt
    from core.vl import PromptTooLong
    from perception_r1.adapters import RayGenerator
    from perception_r1.orchestrator import DispatchSettings, Orchestrator
    from perception_r1.stream import PromptStream

    refused = []

    def stream(prompts):
        refused.extend(p.id for p in prompts)
        cause = PromptTooLong(f"prompt {prompts[0].id} has 5000 tokens, over data.max_prompt_tokens=4096")
        raise ray.exceptions.RayTaskError("generate", "traceback", cause).as_instanceof_cause()

    handle = type("Handle", (), {})()
    handle.stream = _RemoteStream(stream)
    prompts = [Prompt(id=f"p{i}", index=i, problem="<image>x", answer="1", image=b"") for i in range(100)]
    buffer = _FakeBuffer(capacity=8, num_calls=30)
    orchestrator = Orchestrator(stream=PromptStream(prompts, shuffle_seed=None), generators=[RayGenerator(handle)],
                                scorer=None, buffer=buffer,
                                settings=DispatchSettings(prompts_per_call=1, inflight_sequences_per_actor=2,
                                                          samples_per_prompt=1, drop_uniform_groups=False))

    async def run():
        await asyncio.wait_for(orchestrator.run(), timeout=30)
        await orchestrator.drain(timeout_s=5)

    asyncio.run(run())
    assert not buffer.stalled and buffer.num_reserved == 30 and buffer.reserved == 0
    assert orchestrator.counters == {"skipped_prompts": 30, "refused_calls": 30}
    assert refused == [f"p{i}" for i in range(30)]  # each prompt once: a refused prompt is not retried
