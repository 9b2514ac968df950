"""What makes data preparation and evaluation resumable: one append-only JSONL progress file per stage,
a line per finished item, written and flushed the moment the item finishes (so a crash or Ctrl-C
loses at most the requests in flight), plus a manifest that pins the input and the stage settings a
folder was started with, so a rerun never mixes results from different inputs or settings.

Progress lines are flat records (frozen dataclasses of str / int / float / tuple fields). The last
line for an id wins. A line cut short by a crash is dropped when the file is reopened.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Awaitable, Callable, Generic, TypeVar

from core.records import Prompt

R = TypeVar("R")
MANIFEST = "manifest.json"


class ProgressLog(Generic[R]):
    """Per-item records of one stage, loaded on open and appended as items finish."""

    def __init__(self, path: Path, *, cls: type[R]) -> None:
        self.path, self.cls = path, cls
        self.records: dict[str, R] = {}
        if path.exists():
            self._load()
        self._file = open(path, "a", encoding="utf-8")

    def _load(self) -> None:
        data = self.path.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]  # a trailing partial line is a write cut short
        if len(complete) != len(data):
            with open(self.path, "r+b") as f:
                f.truncate(len(complete))
        for number, line in enumerate(complete.decode("utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = _from_plain(self.cls, json.loads(line))
            except (json.JSONDecodeError, TypeError) as e:
                raise ValueError(
                    f"{self.path}:{number}: unreadable progress line ({e}); delete the line or the file to redo it"
                ) from None
            self.records[record.id] = record

    def append(self, record: R) -> None:
        self._file.write(json.dumps(dataclasses.asdict(record), ensure_ascii=False) + "\n")
        self._file.flush()
        self.records[record.id] = record

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> ProgressLog[R]:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _from_plain(cls: type[R], plain: dict) -> R:
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in plain.items() if k in names})


def read_records(path: Path, *, cls: type[R]) -> dict[str, R]:
    """The records of a finished stage's progress file (empty if the stage never ran)."""
    if not path.exists():
        return {}
    with ProgressLog(path, cls=cls) as progress:
        return dict(progress.records)


def write_records(path: Path, *, records: list[Any]) -> None:
    """Replace a progress file with these records at once (for the stages recomputed whole)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(dataclasses.asdict(r), ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    os.replace(tmp, path)


def write_json_atomic(path: Path, *, value: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------- manifest
def item_hash(prompt: Prompt) -> str:
    """A short hash of what a problem is (id, problem, answer, image): changes if the input does."""
    h = hashlib.sha256()
    for part in (prompt.id, prompt.problem, prompt.answer):
        h.update(part.encode("utf-8") + b"\0")
    h.update(prompt.image)
    return h.hexdigest()[:16]


def check_inputs(output_dir: Path, *, prompts: list[Prompt]) -> None:
    """Record the input's problems in the manifest, or raise if a recorded id now holds another problem.

    New ids are welcome (a run with `--limit 10` can grow into the full run in the same folder).
    """
    path = output_dir / MANIFEST
    manifest = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    recorded: dict[str, str] = manifest.get("inputs", {})
    hashes = {p.id: item_hash(p) for p in prompts}
    changed = [i for i, h in hashes.items() if recorded.get(i, h) != h]
    if changed:
        raise ValueError(
            f"{output_dir} was started from another input: {len(changed)} problems changed (e.g. {changed[:3]}); "
            f"use a new --output-dir for a new input"
        )
    manifest["inputs"] = recorded | hashes
    write_json_atomic(path, value=manifest)


def check_manifest(output_dir: Path, *, key: str, value: dict) -> None:
    """Record `value` under `key` in the folder's manifest, or raise if it differs from what is there."""
    path = output_dir / MANIFEST
    manifest = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    if key in manifest and manifest[key] != value:
        changed = sorted(k for k in set(value) | set(manifest[key]) if value.get(k) != manifest[key].get(k))
        raise ValueError(
            f"{output_dir} was started with other {key} settings (changed: {changed}); "
            f"rerun with the same settings to resume, or use a new --output-dir"
        )
    manifest[key] = value
    write_json_atomic(path, value=manifest)


# ------------------------------------------------------------------------------------ item runner
async def run_items(
    items: list[Any],
    *,
    work: Callable[[Any], Awaitable[R]],
    progress: ProgressLog[R],
    desc: str,
    total: int,
    show: bool,
) -> None:
    """Run `work` on every item concurrently (the endpoint's semaphore bounds the requests), append
    each record the moment its item finishes, and show a bar with throughput and ETA.

    The first exception from `work` cancels the rest and is re-raised (finished items stay saved);
    `work` itself decides which failures become a record instead.
    """
    from tqdm import tqdm

    bar = tqdm(
        total=total, initial=total - len(items), desc=desc, unit="problem", disable=not show, dynamic_ncols=True, smoothing=0.05
    )

    async def one(item: Any) -> None:
        progress.append(await work(item))
        bar.update(1)

    try:
        async with asyncio.TaskGroup() as group:
            for item in items:
                group.create_task(one(item))
    except BaseExceptionGroup as errors:
        raise _first_leaf(errors) from None
    finally:
        bar.close()


def _first_leaf(errors: BaseExceptionGroup) -> BaseException:
    first = errors.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first
