"""Benchmark files, in their published local layouts, into `BenchmarkItem`s: a `Prompt` (id, problem
with one `<image>`, answer, image bytes, annotations) plus what the reference's scorer needs (the
choices shown to the judge, the text shown to the answer extractor).

The question text follows the reference's evaluation scripts (spec §6); the problem is `<image>` +
that text, so the policy sees [image, text + " " + format prompt] as the reference's do.

| benchmark  | files read                                                        | question text |
|------------|-------------------------------------------------------------------|---------------|
| mathvista  | `data/testmini-*.parquet` (`decoded_image` bytes), or `testmini.json` / `annot_testmini.json` (a dict keyed by pid, or a list) with `image` paths | `query` |
| mathverse  | `testmini.parquet` (`image` bytes) or `testmini.json` + image folders | `question` |
| mathvision | `data/test-*.parquet` (`decoded_image`) or `data/test.jsonl` + `images/` | `question` + `\\nChoices:\\nA. ..\\nB. ..` when > 1 option |
| wemath     | `testmini.json` (`image_path` relative to it) or a parquet with `image_path`/`image` bytes | `question` + `\\nChoices:\\n` + `option` |
| geometry3k | the InterGPS `test/` split folder or a `problem`/`answer`/`images` parquet (`dataprep.loaders`) | `problem_text` |
| synthetic  | generated (`dataprep.synthetic`), or a `prepare-data` output file     | the question |

A path may be a file or a folder holding one of the files above. Image paths are resolved against
the file's folder, its parent, and an `images/` folder in either. Ids are prefixed with the
benchmark (`mathvista-12`), so one results file can hold several benchmarks and McNemar pairs by id.
Malformed rows raise a ValueError naming the file, the row and the fix; nothing is unpickled.
"""

from __future__ import annotations

import dataclasses
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from replay.records import Prompt

IMAGE_PLACEHOLDER = "<image>"


@dataclass(frozen=True, slots=True)
class BenchmarkItem:
    """One benchmark problem with what the reference's scorer shows its judge and extractor."""

    benchmark: str
    prompt: Prompt
    choices: str = ""
    """The `**Choices**` text of the judgement message; empty for free-form problems."""
    options: tuple[str, ...] = ()
    """Option texts in letter order (A, B, ...) when the benchmark lists them (deterministic scoring)."""
    extraction_context: str = ""
    """Text put before the response in the extraction request (the question, where the reference does)."""


@dataclass(frozen=True, slots=True)
class _Source:
    """One row of a benchmark file and where it came from (for error messages and image paths)."""

    where: str
    """`<file> row <n>`."""
    record: dict[str, Any]
    bases: tuple[Path, ...]


# -------------------------------------------------------------------------------------- reading
def _find_files(path: Path, patterns: tuple[str, ...], benchmark: str) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ValueError(f"{benchmark}: {path} does not exist; pass the benchmark file or its folder")
    for pattern in patterns:
        found = sorted(p for p in path.glob(pattern) if p.is_file())
        if found:
            return found
    raise ValueError(f"{benchmark}: no benchmark file in {path} (looked for {', '.join(patterns)}); pass the file itself")


def _sources(files: list[Path]) -> Iterator[_Source]:
    for file in files:
        bases = (file.parent, file.parent.parent)
        for row, record in _records(file):
            yield _Source(f"{file} row {row}", record, bases)


def _records(file: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    suffix = file.suffix.lower()
    if suffix == ".parquet":
        yield from _parquet_records(file)
    elif suffix == ".jsonl":
        yield from _jsonl_records(file)
    elif suffix == ".json":
        yield from _json_records(file)
    else:
        raise ValueError(f"{file}: unknown format {suffix!r}; pass a .parquet, .json or .jsonl benchmark file")


def _parquet_records(file: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    import pyarrow.parquet as pq

    try:
        reader = pq.ParquetFile(file)
    except Exception as e:  # pyarrow raises several types for a file that is not parquet
        raise ValueError(f"{file}: not a readable parquet file ({e}); download it again") from None
    row = 0
    for batch in reader.iter_batches(batch_size=64):
        for record in batch.to_pylist():
            yield row, record
            row += 1


def _jsonl_records(file: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with open(file, encoding="utf-8") as f:
        for row, line in enumerate(f):
            if line.strip():
                yield row, _object(_loads(line, f"{file} line {row + 1}"), f"{file} line {row + 1}")


def _json_records(file: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    data = _loads(file.read_text(encoding="utf-8"), str(file))
    if isinstance(data, dict):  # MathVista's annotation files: {pid: record}
        data = [{"pid": key, **_object(value, f"{file} key {key}")} for key, value in data.items()]
    if not isinstance(data, list):
        raise ValueError(f"{file}: expected a JSON list of problems or an object keyed by id, got {type(data).__name__}")
    for row, record in enumerate(data):
        yield row, _object(record, f"{file} row {row}")


def _loads(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg} at line {e.lineno}); download the file again") from None


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected a JSON object per problem, got {type(value).__name__}")
    return value


# --------------------------------------------------------------------------------------- fields
def _text(src: _Source, *names: str, required: bool = True) -> str:
    """The first present, non-null of `names` as a string."""
    for name in names:
        value = src.record.get(name)
        if value is not None and not (isinstance(value, float) and value != value):  # NaN: pandas' null
            return value if isinstance(value, str) else str(value)
    if required:
        raise ValueError(f"{src.where}: missing field {' or '.join(repr(n) for n in names)} "
                         f"(has {sorted(src.record)}); is this the right benchmark file?")
    return ""


def _image(src: _Source, *names: str) -> bytes:
    """Encoded image bytes from the first usable of `names`: HF Image dict, raw bytes or a path."""
    for name in names:
        value = src.record.get(name)
        if isinstance(value, dict):
            value = value.get("bytes") or value.get("path")
        if isinstance(value, (bytes, bytearray)) and value:
            return _checked_image(bytes(value), src)
        if isinstance(value, str) and value.strip():
            return _checked_image(_read_image_path(value, src), src)
    raise ValueError(f"{src.where}: no image in {' or '.join(repr(n) for n in names)}; "
                     "use the benchmark file with embedded images, or keep its image folder next to it")


def _read_image_path(value: str, src: _Source) -> bytes:
    relative = Path(value.removeprefix("file://"))
    candidates = [relative] if relative.is_absolute() else [
        b / sub / name for b in src.bases for sub in (".", "images") for name in (relative, Path(relative.name))]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.read_bytes()
    raise ValueError(f"{src.where}: image {value!r} not found next to the file (tried {candidates[0]} and "
                     f"{len(candidates) - 1} other places); unpack the benchmark's images beside it")


def _checked_image(data: bytes, src: _Source) -> bytes:
    """PNG/JPEG bytes as they are; any other format PIL reads re-encoded as PNG."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if image.format in ("PNG", "JPEG"):
                return data
            out = io.BytesIO()
            image.save(out, format="PNG")
            return out.getvalue()
    except Exception as e:  # PIL raises OSError, SyntaxError, DecompressionBombError, ...
        raise ValueError(f"{src.where}: image does not decode ({type(e).__name__}: {e}); replace the file") from None


def _options(src: _Source, name: str) -> tuple[str, ...]:
    value = src.record.get(name)
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{src.where}: {name!r} should be a list of option texts, got {type(value).__name__}")
    return tuple(str(v) for v in value)


def lettered(options: tuple[str, ...]) -> str:
    """`A. first\\nB. second`: how the reference writes a list of options (spec §6)."""
    return "\n".join(f"{chr(ord('A') + k)}. {text}" for k, text in enumerate(options))


def _prompt(benchmark: str, raw_id: str, index: int, question: str, answer: str, image: bytes, src: _Source) -> Prompt:
    if not answer.strip():
        raise ValueError(f"{src.where}: empty answer; this split has no ground truth (use testmini/test with answers)")
    if IMAGE_PLACEHOLDER in question:
        raise ValueError(f"{src.where}: the question already contains {IMAGE_PLACEHOLDER}; remove it from the file")
    return Prompt(id=f"{benchmark}-{raw_id}", index=index, problem=IMAGE_PLACEHOLDER + question,
                  answer=answer.strip(), image=image)


# ------------------------------------------------------------------------------------ benchmarks
def load_mathvista(path: str | Path) -> list[BenchmarkItem]:
    """MathVista testmini: question = `query`; choices (a list of texts) lettered for the judge."""
    files = _find_files(Path(path), ("data/testmini-*.parquet", "testmini-*.parquet", "testmini.json",
                                     "annot_testmini.json", "data/testmini.json"), "mathvista")
    items = []
    for index, src in enumerate(_sources(files)):
        options = _options(src, "choices")
        prompt = _prompt("mathvista", _text(src, "pid"), index, _text(src, "query"), _text(src, "answer"),
                         _image(src, "decoded_image", "image"), src)
        items.append(BenchmarkItem("mathvista", prompt, choices=lettered(options), options=options,
                                   extraction_context=_text(src, "query")))
    return items


def load_mathverse(path: str | Path) -> list[BenchmarkItem]:
    """MathVerse testmini: question = `question`; for `multi-choice` items the judge's choices are the
    text after `Choices:` in `question_for_eval` (or `question` in older files without it)."""
    files = _find_files(Path(path), ("testmini.parquet", "testmini.json", "data/testmini*.parquet"), "mathverse")
    items = []
    for index, src in enumerate(_sources(files)):
        prompt = _prompt("mathverse", _text(src, "sample_index"), index, _text(src, "question"),
                         _text(src, "answer"), _image(src, "image"), src)
        choices = ""
        if _text(src, "question_type", required=False) == "multi-choice":
            found = re.search(r"(?:Choices|Choice):(.+)", _text(src, "question_for_eval", "question"), re.DOTALL)
            choices = found.group(1) if found else ""  # choices printed only in the image: free-form judgement
        items.append(BenchmarkItem("mathverse", prompt, choices=choices))
    return items


def load_mathvision(path: str | Path) -> list[BenchmarkItem]:
    """MathVision test: question = `question`, plus the lettered options when there are more than one."""
    files = _find_files(Path(path), ("data/test-*.parquet", "test-*.parquet", "data/test.jsonl", "test.jsonl"), "mathvision")
    items = []
    for index, src in enumerate(_sources(files)):
        options = _options(src, "options")
        question = _text(src, "question")
        shown = question + "\nChoices:\n" + lettered(options) if len(options) > 1 else question
        prompt = _prompt("mathvision", _text(src, "id"), index, shown, _text(src, "answer"),
                         _image(src, "decoded_image", "image"), src)
        items.append(BenchmarkItem("mathvision", prompt, choices=lettered(options), options=options,
                                   extraction_context=question))
    return items


def load_wemath(path: str | Path) -> list[BenchmarkItem]:
    """WeMath testmini: question = `question` + `\\nChoices:\\n` + `option`; the judge sees `option`."""
    files = _find_files(Path(path), ("testmini.json", "data/testmini.json", "testmini*.parquet",
                                     "data/testmini*.parquet"), "wemath")
    items = []
    for index, src in enumerate(_sources(files)):
        option = _text(src, "option")
        prompt = _prompt("wemath", _text(src, "ID", "id"), index, _text(src, "question") + "\nChoices:\n" + option,
                         _text(src, "answer"), _image(src, "image_path", "image"), src)
        items.append(BenchmarkItem("wemath", prompt, choices=option if option.strip() else ""))
    return items


def load_geometry3k(path: str | Path) -> list[BenchmarkItem]:
    """Geometry3K test through the training-data reader (InterGPS split folder or parquet); bad rows raise."""
    from dataprep.loaders import load_prompts

    items = []
    for prompt in load_prompts(path, on_bad_row="raise"):
        pid = prompt.id if prompt.id.startswith("geo3k-") else f"geo3k-{prompt.id}"
        items.append(BenchmarkItem("geometry3k", dataclasses.replace(prompt, id=pid)))
    return items


def load_synthetic(path: str | Path | None = None, *, num_problems: int = 64, seed: int = 0) -> list[BenchmarkItem]:
    """Our synthetic geometry set: generated (`num_problems`, `seed`), or read from a prepare-data file."""
    if path is not None:
        from dataprep.loaders import load_prompts

        prompts = load_prompts(path, on_bad_row="raise")
    else:
        from dataprep.synthetic import make_problems
        from perception_r1.config import SyntheticData

        prompts = make_problems(SyntheticData(num_problems=num_problems, seed=seed))
    return [BenchmarkItem("synthetic", p) for p in prompts]


LOADERS: dict[str, Callable[[str | Path], list[BenchmarkItem]]] = {
    "mathvista": load_mathvista,
    "mathverse": load_mathverse,
    "mathvision": load_mathvision,
    "wemath": load_wemath,
    "geometry3k": load_geometry3k,
    "synthetic": load_synthetic,
}

PUBLISHED_MODELS = ("Qwen2.5-VL-7B-IT", "Perception-R1-7B")
PUBLISHED = {
    "mathvista": (68.1, 74.2),
    "mathverse": (47.4, 54.3),
    "mathvision": (25.1, 28.6),
    "wemath": (61.4, 72.0),
}
"""The reference's Table 1 accuracies (%) for the benchmarks we load (spec §6), per PUBLISHED_MODELS."""


def check_unique_ids(items: list[BenchmarkItem]) -> None:
    """Resume and McNemar pair by id: a repeated id is an error naming it."""
    seen: dict[str, int] = {}
    for k, item in enumerate(items):
        if item.prompt.id in seen:
            raise ValueError(f"{item.benchmark}: id {item.prompt.id} appears at items {seen[item.prompt.id]} and {k}; "
                             "each problem needs its own id (was a file passed twice?)")
        seen[item.prompt.id] = k
