"""Datasets on disk into `Prompt` records: the one reader behind `data.dataset.type: file` and
`prepare-data --input`.

Formats, detected from the path:
- **parquet** (`.parquet`): the reference's released training file (`problem` with `<image>`,
  `answer`, `images` = list of one HF Image `{bytes, path}` / raw bytes / a path, optional
  `visual_key_info`), the common Geometry3K parquet (`hiyouga/geometry3k`: `images`, `problem`,
  `answer`), and what `prepare-data` writes (the same columns plus `id`, `annotations`, `solution`).
- **JSONL** (`.jsonl`): one object per line with the same keys; `images` (or `image`) holds paths
  relative to the file, or `{path}` dicts.
- **a `prepare-data` output folder**: the `dataset.parquet` or `dataset.jsonl` inside it.
- **Geometry3K as published** (lupantech/InterGPS, `data/geometry3k/{train,val,test}/<pid>/`):
  a split folder whose sub-folders each hold `data.json` (`problem_text`, `choices`, `answer` as
  a letter A-D) and `img_diagram.png`. The prompt is `<image>` + problem_text (as in the parquet
  form); the answer is the text of the chosen choice. Point the path at one split folder.

Annotations come from `visual_key_info` (a tagged string, or a list, docs/method.md §8.5) or else from an
`annotations` list; a non-empty `visual_key_info` without `<info1>` tags is kept as one annotation,
as the reference's judge would read it whole. The solution comes from a `solution` or `cot` column.

Bad rows (missing or unreadable image, empty answer, non-UTF-8 text, no single `<image>`, a field of
the wrong type, an image path outside the dataset's folder) raise a ValueError naming the file, row,
field and fix under `on_bad_row="raise"`, or are skipped and counted under `on_bad_row="skip"`.
Every format runs the same checks (`core.records.text_field`, `core.images`): `problem` a non-empty
string, `answer` a string or a number (never a list, object or boolean read as its Python text),
`annotations` a list of strings, `visual_key_info` a string or a list of strings, `id` a string or
a number; an image is bytes, a path or an HF Image dict, and a path (relative to the file, or
absolute) must resolve, symlinks followed, inside the dataset file's folder (a Geometry3K split
folder for its diagrams). Malformed files, missing columns and duplicate ids always raise, and so
does a file that yields no prompt. Nothing is unpickled: parquet is read through pyarrow, JSON by
the json module.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

from core.images import checked_image, image_entry, inside_folder, read_image_file
from core.records import (
    IMAGE_PLACEHOLDER,
    BadField,
    Prompt,
    describe_type,
    parse_annotations,
    text_field,
)

log = logging.getLogger(__name__)

BadRowPolicy = Literal["skip", "raise"]
OUTPUT_NAMES = ("dataset.parquet", "dataset.jsonl")
"""The dataset file names `prepare-data` writes into its output folder."""


@dataclass(frozen=True, slots=True)
class SkippedRow:
    """A row that did not become a prompt, and why."""

    row: int
    """0-based position in the file (line number - 1 for JSONL, folder order for Geometry3K)."""
    id: str
    reason: str
    """Short slug: missing_image, undecodable_image, missing_answer, missing_problem, not_utf8,
    bad_placeholder, multiple_images, invalid_json, huge_image, elongated_image, wrong_type,
    image_outside_dataset, unreadable_image."""
    detail: str


@dataclass(frozen=True, slots=True)
class LoadResult:
    prompts: list[Prompt]
    skipped: list[SkippedRow]
    source_format: str
    """`parquet`, `jsonl` or `geometry3k`."""

    def skip_counts(self) -> dict[str, int]:
        return dict(Counter(s.reason for s in self.skipped))


def load_prompts(path: str | Path, *, on_bad_row: BadRowPolicy = "skip") -> list[Prompt]:
    """The prompts of a dataset file or folder (see the module docstring); skips are logged."""
    result = read_prompts(path, on_bad_row=on_bad_row)
    if result.skipped:
        first = "; ".join(f"row {s.row} ({s.id}): {s.reason}" for s in result.skipped[:5])
        log.warning("%s: skipped %d bad rows %s, e.g. %s", path, len(result.skipped), result.skip_counts(), first)
    return result.prompts


def read_prompts(path: str | Path, *, on_bad_row: BadRowPolicy = "skip") -> LoadResult:
    """The prompts of a dataset and the rows skipped, with reasons."""
    if on_bad_row not in ("skip", "raise"):
        raise ValueError(f"on_bad_row={on_bad_row!r}: use 'skip' or 'raise'")
    path = Path(path)
    if not path.exists():
        raise ValueError(f"dataset {path} does not exist; check data.dataset.path / --input")
    source, fmt = _resolve(path)
    prompts: list[Prompt] = []
    skipped: list[SkippedRow] = []
    seen: dict[str, int] = {}
    for row, row_id, build in _rows(source, fmt):
        try:
            prompt = build(len(prompts))
        except BadField as bad:
            if on_bad_row == "raise":
                raise ValueError(
                    f"{source}: row {row} ({row_id}): {bad.detail}; {bad.fix}, or load with on_bad_row='skip'"
                ) from None
            skipped.append(SkippedRow(row, row_id, bad.reason, bad.detail))
            continue
        if prompt.id in seen:
            raise ValueError(f"{source}: rows {seen[prompt.id]} and {row} share the id {prompt.id!r}; make ids unique")
        seen[prompt.id] = row
        prompts.append(prompt)
    if not prompts:
        counts = dict(Counter(s.reason for s in skipped))
        raise ValueError(f"{source}: no usable rows ({len(skipped)} skipped: {counts}); check the file's format")
    return LoadResult(prompts, skipped, fmt)


# ------------------------------------------------------------------------------- format detection
def _resolve(path: Path) -> tuple[Path, str]:
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in (".parquet", ".jsonl"):
            return path, suffix[1:]
        raise ValueError(f"{path}: unknown dataset format {suffix!r}; use a .parquet or .jsonl file or a Geometry3K split folder")
    for name in OUTPUT_NAMES:
        if (path / name).is_file():
            return path / name, name.split(".")[1]
    if _is_geometry3k_split(path):
        return path, "geometry3k"
    splits = sorted(d.name for d in path.iterdir() if d.is_dir() and _is_geometry3k_split(d))
    if splits:
        raise ValueError(f"{path} holds the Geometry3K splits {splits}; point the path at one of them, e.g. {path / splits[0]}")
    raise ValueError(f"{path}: no dataset found (no {' or '.join(OUTPUT_NAMES)}, no Geometry3K problem folders with data.json)")


def _is_geometry3k_split(path: Path) -> bool:
    return any((d / "data.json").is_file() for d in path.iterdir() if d.is_dir())


def _rows(source: Path, fmt: str) -> Iterator[tuple[int, str, Any]]:
    """(row, id, build) per row; build(index) makes the Prompt or raises BadField."""
    if fmt == "parquet":
        yield from _parquet_rows(source)
    elif fmt == "jsonl":
        yield from _jsonl_rows(source)
    else:
        yield from _geometry3k_rows(source)


def _parquet_rows(source: Path) -> Iterator[tuple[int, str, Any]]:
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(source)
    except Exception as e:  # pyarrow raises several types for a non-parquet file
        raise ValueError(f"{source}: not a readable parquet file ({e}); re-export it") from None
    columns = set(file.schema_arrow.names)
    missing = {"problem", "answer", "images"} - columns
    if missing:
        raise ValueError(f"{source}: missing columns {sorted(missing)} (has {sorted(columns)}); see docs/method.md §5 for the layout")
    row = 0
    for batch in file.iter_batches(batch_size=64):
        for record in batch.to_pylist():
            yield _record_row(record, source, row)
            row += 1


def _jsonl_rows(source: Path) -> Iterator[tuple[int, str, Any]]:
    with open(source, "rb") as f:
        for row, raw in enumerate(f):
            if not raw.strip():
                continue
            fallback_id = f"{source.stem}-{row:05d}"
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                detail = f"line is not UTF-8 ({e.reason} at byte {e.start})"
                yield row, fallback_id, _raiser("not_utf8", detail, "re-encode the file as UTF-8")
                continue
            except json.JSONDecodeError as e:
                yield row, fallback_id, _raiser("invalid_json", f"line is not JSON ({e.msg})", "fix or remove the line")
                continue
            if not isinstance(record, dict):
                yield row, fallback_id, _raiser("invalid_json", "line is not a JSON object", "write one object per line")
                continue
            yield _record_row(record, source, row)


def _geometry3k_rows(split: Path) -> Iterator[tuple[int, str, Any]]:
    folders = [d for d in split.iterdir() if d.is_dir() and (d / "data.json").is_file()]
    folders.sort(key=lambda d: (0, int(d.name), "") if d.name.isdigit() else (1, 0, d.name))
    for row, folder in enumerate(folders):
        row_id = f"geo3k-{int(folder.name):05d}" if folder.name.isdigit() else f"geo3k-{folder.name}"
        yield row, row_id, _geometry3k_builder(folder, row_id)


# ---------------------------------------------------------------------------------- rows -> Prompt
def _record_row(record: dict, source: Path, row: int) -> tuple[int, str, Any]:
    """(row, id, build) of one parquet or JSONL record; its images are confined to the file's folder."""
    fallback_id = f"{source.stem}-{row:05d}"
    try:
        row_id = text_field(record.get("id"), "id", numbers=True).strip() or fallback_id
    except BadField as bad:
        return row, fallback_id, _raiser(bad.reason, bad.detail, bad.fix)
    return row, row_id, _builder(record, row_id, source.parent)


def _raiser(reason: str, detail: str, fix: str) -> Any:
    def build(index: int) -> Prompt:
        raise BadField(reason, detail, fix)

    return build


def _builder(record: dict, row_id: str, base: Path) -> Any:
    def build(index: int) -> Prompt:
        problem = text_field(record.get("problem"), "problem")
        answer = text_field(record.get("answer"), "answer", numbers=True)
        if not problem.strip():
            raise BadField("missing_problem", "empty problem", "give every row a problem with <image>")
        if not answer.strip():
            raise BadField("missing_answer", "empty answer", "give every row its ground-truth answer")
        _check_placeholder(problem)
        image = checked_image(_image_bytes(record, base))
        return Prompt(
            id=row_id,
            index=index,
            problem=problem,
            answer=answer,
            image=image,
            annotations=_annotations(record),
            solution=text_field(_first_present(record, "solution", "cot"), "solution"),
        )

    return build


def _first_present(record: dict, *names: str) -> Any:
    """The value under the first of `names` the record has (None if none)."""
    return next((record[name] for name in names if name in record), None)


def _geometry3k_builder(folder: Path, row_id: str) -> Any:
    def build(index: int) -> Prompt:
        try:
            data = json.loads((folder / "data.json").read_bytes().decode("utf-8"))
        except UnicodeDecodeError:
            raise BadField("not_utf8", "data.json is not UTF-8", "re-encode it as UTF-8") from None
        except json.JSONDecodeError as e:
            raise BadField("invalid_json", f"data.json is not JSON ({e.msg})", "restore the file") from None
        if not isinstance(data, dict):
            raise BadField("invalid_json", "data.json is not a JSON object", "restore the file")
        text = text_field(data.get("problem_text"), "problem_text").strip()
        if not text:
            raise BadField("missing_problem", "data.json has no problem_text", "restore the file")
        answer = _choice_answer(data)
        image_path = inside_folder(folder / "img_diagram.png", folder.parent)
        if not image_path.is_file():
            raise BadField("missing_image", "img_diagram.png is missing", "restore the diagram")
        image = checked_image(read_image_file(image_path))
        return Prompt(id=row_id, index=index, problem=IMAGE_PLACEHOLDER + text, answer=answer, image=image)

    return build


def _choice_answer(data: dict) -> str:
    """The text of the correct choice: Geometry3K stores the answer as a letter A-D into `choices`."""
    letter, choices = text_field(data.get("answer"), "answer").strip(), data.get("choices")
    if len(letter) != 1 or not isinstance(choices, list) or not 0 <= ord(letter.upper()) - 65 < len(choices):
        raise BadField("missing_answer", f"answer {letter!r} does not index choices {choices!r}", "restore data.json")
    answer = text_field(choices[ord(letter.upper()) - 65], f"choice {letter}", numbers=True).strip()
    if not answer:
        raise BadField("missing_answer", f"choice {letter} is empty", "restore data.json")
    return answer


def _check_placeholder(problem: str) -> None:
    count = problem.count(IMAGE_PLACEHOLDER)
    if count != 1:
        detail = f"problem has {count} {IMAGE_PLACEHOLDER} placeholders"
        raise BadField("bad_placeholder", detail, "put exactly one <image> where the image goes")


def _annotations(record: dict) -> tuple[str, ...]:
    """From `visual_key_info` (tagged text, or a list) when it has any, else from `annotations` (a list)."""
    info = record.get("visual_key_info")
    if isinstance(info, (bytes, str)):
        text = text_field(info, "visual_key_info")
        items = parse_annotations(text)
        return items if items or not text.strip() else (text.strip(),)
    if info is not None and not isinstance(info, (list, tuple)):
        raise BadField("wrong_type", f"visual_key_info is {describe_type(info)}",
                       "visual_key_info must be a string of <infoN> tags or a list of strings")
    if info:
        return _text_items(info, "visual_key_info")
    listed = record.get("annotations")
    if listed is not None and not isinstance(listed, (list, tuple)):
        raise BadField("wrong_type", f"annotations is {describe_type(listed)}", "annotations must be a list of strings")
    return _text_items(listed or (), "annotations")


def _text_items(values: list | tuple, name: str) -> tuple[str, ...]:
    """The non-blank strings of a list, stripped; an item of another type raises BadField."""
    items = (text_field(v, f"{name}[{k}]").strip() for k, v in enumerate(values))
    return tuple(item for item in items if item)


# ------------------------------------------------------------------------------------------ images
def _image_bytes(record: dict, base: Path) -> bytes:
    """The encoded bytes of the one image a row holds (`images` or `image`: a list of one, or a bare
    entry); a path is read only from inside `base`, the dataset file's folder."""
    name = "images" if "images" in record else "image"
    images = record.get(name)
    if isinstance(images, (list, tuple)):
        if len(images) > 1:
            raise BadField("multiple_images", f"{len(images)} images", "keep one image per problem")
        images, name = (images[0], f"{name}[0]") if images else (None, name)
    entry = image_entry(images, name)
    if isinstance(entry, bytes):
        return entry
    if entry is None:
        raise BadField("missing_image", "no image", "give every row one image (bytes or a path)")
    path = inside_folder(base / entry, base)
    if not path.is_file():
        raise BadField("missing_image", f"image file {base / entry} not found", "fix the image path")
    return read_image_file(path)
