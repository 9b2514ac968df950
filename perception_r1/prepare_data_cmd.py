"""`perception-r1 prepare-data STAGE`: raw problems to the training set (see `dataprep.pipeline`).

    perception-r1 prepare-data all --input geometry3k/train --output-dir data/geo3k-prepared \\
        --teacher-url https://teacher.example/v1 --teacher-model gemini-2.5-pro --teacher-key-env TEACHER_KEY \\
        --text-url http://localhost:8000/v1 --text-model Qwen2.5-72B-Instruct --samples 4 --concurrency 32

Stages: `distill`, `filter`, `annotate`, `write` (each alone, reading the previous one's files in
--output-dir), or `all`. Rerunning the same command resumes; Ctrl-C loses only requests in flight.
Arguments are validated before any heavy import; API keys are read only from the environment
variables named by the --*-key-env flags and are never printed or written.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

STAGE_CHOICES = {
    "all": ("distill", "filter", "annotate", "write"),
    "distill": ("distill",),
    "filter": ("filter",),
    "annotate": ("annotate",),
    "write": ("write",),
}
NEXT_STAGE = {"distill": "filter", "filter": "annotate", "annotate": "write"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("stage", choices=list(STAGE_CHOICES), help="which stage to run (all: every stage in order)")
    parser.add_argument("--input", required=True, help="dataset: .parquet, .jsonl, or a Geometry3K split folder")
    parser.add_argument("--output-dir", required=True, help="progress files, dataset and report go here (reuse it to resume)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N problems (a trial; grow it later in the same folder)")
    parser.add_argument("--on-bad-row", choices=["skip", "raise"], default="skip", help="skip bad input rows (reported) or stop at the first")
    parser.add_argument("--format", choices=["parquet", "jsonl"], default="parquet", help="dataset.parquet, or dataset.jsonl + images/")
    parser.add_argument(
        "--answer-mode", choices=["faithful", "wrap"], default="faithful",
        help="filter: parse ground truths raw as upstream (faithful), or inside $...$ so bare LaTeX like 4\\sqrt{3} verifies (wrap)",
    )
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight per endpoint")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    parser.add_argument("--max-attempts", type=int, default=4, help="tries per request (timeouts, 5xx, 429, connection errors)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    teacher = parser.add_argument_group("teacher (distill)")
    teacher.add_argument("--teacher-url", help="OpenAI-compatible base URL of the multimodal teacher, e.g. https://host/v1")
    teacher.add_argument("--teacher-model", help="teacher model name")
    teacher.add_argument("--teacher-key-env", help="environment variable holding the teacher's API key (omit: no key)")
    teacher.add_argument("--samples", type=int, default=4, help="solutions per problem (k)")
    teacher.add_argument("--teacher-temperature", type=float, default=1.0)
    teacher.add_argument("--teacher-max-tokens", type=int, default=8192)
    text = parser.add_argument_group("text LLM (annotate)")
    text.add_argument("--text-url", help="OpenAI-compatible base URL of the text LLM that extracts annotations")
    text.add_argument("--text-model", help="text model name")
    text.add_argument("--text-key-env", help="environment variable holding its API key (omit: no key)")
    text.add_argument("--text-temperature", type=float, default=0.3)
    text.add_argument("--text-max-tokens", type=int, default=2048)
    text.add_argument("--json-attempts", type=int, default=3, help="extraction requests per problem until the reply is a valid JSON list")


def run(args: argparse.Namespace) -> int:
    stages = STAGE_CHOICES[args.stage]
    _validate(args, stages)
    settings = _settings(args, stages)
    import asyncio

    from core.openai_calls import FatalEndpointError
    from dataprep.loaders import LoadResult, read_prompts
    from dataprep.pipeline import prepare
    from perception_r1.forced_exit import forced_exit_after_sigint

    loaded = read_prompts(args.input, on_bad_row=args.on_bad_row)
    if args.limit is not None:
        loaded = LoadResult(loaded.prompts[: args.limit], loaded.skipped, loaded.source_format)
    stopped = f"\ninterrupted: finished problems are saved in {args.output_dir}; rerun the same command to resume"
    try:
        with forced_exit_after_sigint(stopped):
            report = asyncio.run(prepare(loaded, stages=stages, settings=settings, input_path=str(args.input)))
    except FatalEndpointError as e:
        print(f"perception-r1 prepare-data: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(stopped, file=sys.stderr)
        return 130
    print(summary(report))
    if args.stage in NEXT_STAGE:
        print(f"next: perception-r1 prepare-data {NEXT_STAGE[args.stage]} --input {args.input} --output-dir {args.output_dir} ...")
    return 0


def _validate(args: argparse.Namespace, stages: tuple[str, ...]) -> None:
    if not Path(args.input).exists():
        raise ValueError(f"--input {args.input} does not exist")
    for flag in ("limit", "concurrency", "max_attempts", "samples", "json_attempts", "teacher_max_tokens", "text_max_tokens"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    if args.timeout <= 0:
        raise ValueError(f"--timeout must be positive, got {args.timeout}")
    needs = [("teacher", "distill"), ("text", "annotate")]
    for prefix, stage in needs:
        if stage not in stages:
            continue
        url, model, key_env = (getattr(args, f"{prefix}_{k}") for k in ("url", "model", "key_env"))
        if not url or not model:
            raise ValueError(f"the {stage} stage needs --{prefix}-url and --{prefix}-model")
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"--{prefix}-url {url!r} is not an http(s) URL; pass the base URL, e.g. http://localhost:8000/v1")
        if key_env and not os.environ.get(key_env):
            raise ValueError(f"--{prefix}-key-env names {key_env}, which is unset or empty; export the key there")


def _settings(args: argparse.Namespace, stages: tuple[str, ...]):
    from core.openai_calls import Endpoint
    from dataprep.pipeline import Settings

    def endpoint(prefix: str) -> Endpoint:
        return Endpoint(
            base_url=getattr(args, f"{prefix}_url"),
            model=getattr(args, f"{prefix}_model"),
            key_env=getattr(args, f"{prefix}_key_env"),
            temperature=getattr(args, f"{prefix}_temperature"),
            max_tokens=getattr(args, f"{prefix}_max_tokens"),
            timeout_s=args.timeout,
            max_attempts=args.max_attempts,
        )

    return Settings(
        output_dir=Path(args.output_dir),
        teacher=endpoint("teacher") if "distill" in stages else None,
        extractor=endpoint("text") if "annotate" in stages else None,
        samples=args.samples,
        concurrency=args.concurrency,
        attempts=args.json_attempts,
        answer_mode=args.answer_mode,
        output_format=args.format,
        show_progress=not args.no_progress,
    )


def summary(report: dict) -> str:
    """A few lines for the console; report.json has everything."""
    i, d, f, a = report["input"], report["distill"], report["filter"], report["annotate"]
    lines = [
        f"input     {i['num_rows']} rows, {i['num_loaded']} loaded, skipped {i['skipped'] or 0}",
        f"distill   {d['num_ok']} ok, {d['num_error']} failed, {d['num_samples']} samples, "
        f"tokens {d['prompt_tokens']} in / {d['completion_tokens']} out",
        f"filter    {f['num_kept']} kept, dropped {f['num_dropped'] or 0}",
        f"annotate  {a['num_ok']} ok, {a['num_invalid']} invalid, {a['num_error']} failed, {a['num_annotations']} annotations, "
        f"tokens {a['prompt_tokens']} in / {a['completion_tokens']} out",
    ]
    if "output" in report:
        lines.append(f"output    {report['output']['num_rows']} rows in {report['output']['path']}")
    return "\n".join(lines)
