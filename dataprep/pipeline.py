"""Data preparation from raw problems to the training set, stage by stage, each resumable:

    input ──> distill ──distill.jsonl──> filter ──filter.jsonl──> annotate ──annotate.jsonl──> write
    (loaders) teacher: k CoTs            math-verify: keep        text LLM: JSON list        dataset.parquet
              per problem                a correct CoT            of visual facts            + report.json

Every stage reads the previous stage's file in the output folder, so each also runs alone. The
network stages (distill, annotate) append one line per finished problem and skip finished
problems on rerun; filter and write are recomputed whole from those files. `report.json` counts
what every stage kept and dropped (with each dropped id and why) and the tokens each used.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from core.openai_calls import ChatClient, Endpoint
from core.progress_log import (
    ProgressLog,
    check_inputs,
    check_manifest,
    read_records,
    write_json_atomic,
    write_records,
)
from core.records import Prompt
from dataprep import (
    annotate as annotate_mod,
    distill as distill_mod,
    filter as filter_mod,
)
from dataprep.annotate import AnnotateRecord
from dataprep.distill import DistillRecord
from dataprep.filter import AnswerMode, FilterRecord
from dataprep.loaders import LoadResult
from dataprep.writer import write_dataset

STAGES = ("distill", "filter", "annotate", "write")
REPORT_FILE = "report.json"


@dataclass(frozen=True)
class Settings:
    """How to run the stages (the CLI builds it from its flags)."""

    output_dir: Path
    teacher: Endpoint | None = None
    """The multimodal teacher (distill); None when that stage does not run."""
    extractor: Endpoint | None = None
    """The text LLM (annotate); None when that stage does not run."""
    samples: int = 4
    """Teacher solutions per problem (k)."""
    concurrency: int = 32
    """Requests in flight per endpoint."""
    attempts: int = 3
    """Extraction requests per problem until a reply holds a valid JSON list."""
    answer_mode: AnswerMode = "faithful"
    """How the filter parses ground truths (`dataprep.filter.accuracy`)."""
    output_format: str = "parquet"
    show_progress: bool = True


async def prepare(loaded: LoadResult, *, stages: Sequence[str], settings: Settings, input_path: str = "") -> dict:
    """Run `stages` (in STAGES order) on the loaded input; returns the report (also in report.json)."""
    unknown = set(stages) - set(STAGES)
    assert not unknown, unknown
    out = settings.output_dir
    out.mkdir(parents=True, exist_ok=True)
    check_inputs(out, prompts=loaded.prompts)
    this_run: dict[str, dict] = {}
    if "distill" in stages:
        this_run["distill"] = await run_distill(loaded.prompts, settings=settings)
    if "filter" in stages:
        run_filter(loaded.prompts, settings=settings)
        this_run["filter"] = {"answer_mode": settings.answer_mode}
    if "annotate" in stages:
        this_run["annotate"] = await run_annotate(loaded.prompts, settings=settings)
    report = build_report(loaded, out=out, input_path=input_path) | {"this_run": this_run}
    rows = final_rows(loaded.prompts, out=out) if "write" in stages else []
    if rows:
        path = write_dataset(rows, output_dir=out, fmt=settings.output_format)
        report["output"] = {"path": str(path), "num_rows": len(rows)}
    write_json_atomic(out / REPORT_FILE, value=report)
    if "write" in stages and not rows:
        raise ValueError(f"no problem survived every stage; {out / REPORT_FILE} says why each was dropped")
    return report


async def run_distill(prompts: list[Prompt], *, settings: Settings) -> dict:
    ep = _required(settings.teacher, "distill", "--teacher-url and --teacher-model")
    pinned = {"model": ep.model, "samples": settings.samples, "temperature": ep.temperature, "max_tokens": ep.max_tokens}
    check_manifest(settings.output_dir, key="distill", value=pinned)
    client = ChatClient(ep, concurrency=settings.concurrency)
    try:
        with ProgressLog(settings.output_dir / distill_mod.PROGRESS_FILE, cls=DistillRecord) as progress:
            num = await distill_mod.distill(
                prompts, client=client, progress=progress, samples=settings.samples, show=settings.show_progress
            )
    finally:
        await client.close()
    return {"num_problems": num, "num_http_requests": client.num_requests, "num_retries": client.num_retries}


def run_filter(prompts: list[Prompt], *, settings: Settings) -> list[FilterRecord]:
    distilled = read_records(settings.output_dir / distill_mod.PROGRESS_FILE, cls=DistillRecord)
    if not distilled:
        raise ValueError(f"{settings.output_dir} has no {distill_mod.PROGRESS_FILE}; run the distill stage first")
    records = filter_mod.filter_all(prompts, distilled=distilled, mode=settings.answer_mode)
    write_records(settings.output_dir / filter_mod.PROGRESS_FILE, records=records)
    return records


async def run_annotate(prompts: list[Prompt], *, settings: Settings) -> dict:
    ep = _required(settings.extractor, "annotate", "--text-url and --text-model")
    filtered = read_records(settings.output_dir / filter_mod.PROGRESS_FILE, cls=FilterRecord)
    if not filtered:
        raise ValueError(f"{settings.output_dir} has no {filter_mod.PROGRESS_FILE}; run the filter stage first")
    pinned = {"model": ep.model, "attempts": settings.attempts, "temperature": ep.temperature, "max_tokens": ep.max_tokens}
    check_manifest(settings.output_dir, key="annotate", value=pinned)
    items = [(p, filtered[p.id].solution) for p in prompts if p.id in filtered and filtered[p.id].kept]
    client = ChatClient(ep, concurrency=settings.concurrency)
    try:
        with ProgressLog(settings.output_dir / annotate_mod.PROGRESS_FILE, cls=AnnotateRecord) as progress:
            num = await annotate_mod.annotate(
                items, client=client, progress=progress, attempts=settings.attempts, show=settings.show_progress
            )
    finally:
        await client.close()
    return {"num_problems": num, "num_http_requests": client.num_requests, "num_retries": client.num_retries}


def _required(endpoint: Endpoint | None, stage: str, flags: str) -> Endpoint:
    if endpoint is None:
        raise ValueError(f"the {stage} stage needs an endpoint: pass {flags}")
    return endpoint


# ------------------------------------------------------------------------------- output and report
def final_rows(prompts: list[Prompt], *, out: Path) -> list[Prompt]:
    """The kept problems in input order, with their solution and annotations."""
    filtered = read_records(out / filter_mod.PROGRESS_FILE, cls=FilterRecord)
    annotated = read_records(out / annotate_mod.PROGRESS_FILE, cls=AnnotateRecord)
    rows = []
    for p in prompts:
        f, a = filtered.get(p.id), annotated.get(p.id)
        if f is not None and f.kept and a is not None and a.status == "ok":
            rows.append(dataclasses.replace(p, index=len(rows), solution=f.solution, annotations=a.annotations))
    return rows


def build_report(loaded: LoadResult, *, out: Path, input_path: str = "") -> dict:
    """Counts per stage from the progress files (so they cover every run into this folder)."""
    ids = [p.id for p in loaded.prompts]
    distilled = read_records(out / distill_mod.PROGRESS_FILE, cls=DistillRecord)
    filtered = read_records(out / filter_mod.PROGRESS_FILE, cls=FilterRecord)
    annotated = read_records(out / annotate_mod.PROGRESS_FILE, cls=AnnotateRecord)
    d = [distilled[i] for i in ids if i in distilled]
    f = [filtered[i] for i in ids if i in filtered]
    a = [annotated[i] for i in ids if i in annotated]
    dropped = _dropped_items(loaded, filtered=filtered, annotated=annotated)
    report = {
        "input": {
            "path": input_path,
            "format": loaded.source_format,
            "num_rows": len(ids) + len(loaded.skipped),
            "num_loaded": len(ids),
            "skipped": loaded.skip_counts(),
        },
        "distill": {
            "num_ok": sum(r.status == "ok" for r in d),
            "num_error": sum(r.status == "error" for r in d),
            "num_samples": sum(len(r.samples) for r in d),
            "num_failed_requests": sum(len(r.errors) for r in d),
            "prompt_tokens": sum(r.prompt_tokens for r in d),
            "completion_tokens": sum(r.completion_tokens for r in d),
        },
        "filter": {
            "num_kept": sum(r.kept for r in f),
            "num_dropped": dict(Counter(r.reason for r in f if not r.kept)),
            "num_correct_samples": sum(r.num_correct for r in f),
        },
        "annotate": {
            "num_ok": sum(r.status == "ok" for r in a),
            "num_invalid": sum(r.status == "invalid" for r in a),
            "num_error": sum(r.status == "error" for r in a),
            "num_annotations": sum(len(r.annotations) for r in a),
            "prompt_tokens": sum(r.prompt_tokens for r in a),
            "completion_tokens": sum(r.completion_tokens for r in a),
        },
        "dropped": dict(Counter(item["reason"] for item in dropped)),
        "dropped_items": dropped,
    }
    report["tokens"] = {k: report["distill"][k] + report["annotate"][k] for k in ("prompt_tokens", "completion_tokens")}
    return report


def _dropped_items(
    loaded: LoadResult, *, filtered: dict[str, FilterRecord], annotated: dict[str, AnnotateRecord]
) -> list[dict]:
    """Every input row that is not in the output, with the stage and reason that dropped it."""
    items = [{"id": s.id, "stage": "load", "reason": s.reason, "detail": s.detail} for s in loaded.skipped]
    for p in loaded.prompts:
        f, a = filtered.get(p.id), annotated.get(p.id)
        if f is None:
            items.append({"id": p.id, "stage": "filter", "reason": "not_filtered", "detail": ""})
        elif not f.kept:
            stage = "filter" if f.reason == "no_correct_sample" else "distill"
            items.append({"id": p.id, "stage": stage, "reason": f.reason, "detail": f"{f.num_samples} samples"})
        elif a is None:
            items.append({"id": p.id, "stage": "annotate", "reason": "not_annotated", "detail": ""})
        elif a.status != "ok":
            items.append({"id": p.id, "stage": "annotate", "reason": f"annotate_{a.status}", "detail": a.detail})
    return items
