"""The prepared training set on disk, in the reference's layout (docs/method.md §5) so that the released file
and ours are read the same way by `dataprep.loaders`:

- `dataset.parquet`: `id`, `problem` (with `<image>`), `answer`, `images` (list of one HF Image
  struct `{bytes, path}` with the encoded image), `visual_key_info` (`<info1>…</info1>\n…`),
  `annotations` (the same facts as a list), `solution` (the kept CoT); or
- `dataset.jsonl` + `images/<id>.png|jpg`: the same keys, `images` holding the relative path.

Files are written to a temporary name and renamed, so a crash never leaves half a dataset.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from core.records import Prompt, render_annotations


def write_dataset(prompts: list[Prompt], *, output_dir: Path, fmt: str = "parquet") -> Path:
    """Write the prompts (annotations and solution filled) as the training set; returns its path."""
    assert fmt in ("parquet", "jsonl"), fmt
    if fmt == "parquet":
        return _write_parquet(prompts, path=output_dir / "dataset.parquet")
    return _write_jsonl(prompts, output_dir=output_dir)


def _write_parquet(prompts: list[Prompt], *, path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema(
        [
            ("id", pa.string()),
            ("problem", pa.string()),
            ("answer", pa.string()),
            ("images", pa.list_(image)),
            ("visual_key_info", pa.string()),
            ("annotations", pa.list_(pa.string())),
            ("solution", pa.string()),
        ]
    )
    columns = {
        "id": [p.id for p in prompts],
        "problem": [p.problem for p in prompts],
        "answer": [p.answer for p in prompts],
        "images": [[{"bytes": p.image, "path": None}] for p in prompts],
        "visual_key_info": [render_annotations(p.annotations) for p in prompts],
        "annotations": [list(p.annotations) for p in prompts],
        "solution": [p.solution for p in prompts],
    }
    tmp = path.with_suffix(".parquet.tmp")
    pq.write_table(pa.table(columns, schema=schema), tmp)
    os.replace(tmp, path)
    return path


def _write_jsonl(prompts: list[Prompt], *, output_dir: Path) -> Path:
    images = output_dir / "images"
    images.mkdir(exist_ok=True)
    path = output_dir / "dataset.jsonl"
    tmp = path.with_suffix(".jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        used: set[str] = set()
        for k, p in enumerate(prompts):
            stem = _file_name(p.id) if _file_name(p.id) not in used else f"{_file_name(p.id)}-{k}"
            used.add(stem)
            name = f"{stem}.{_extension(p.image)}"
            (images / name).write_bytes(p.image)
            row = {
                "id": p.id,
                "problem": p.problem,
                "answer": p.answer,
                "images": [f"images/{name}"],
                "visual_key_info": render_annotations(p.annotations),
                "annotations": list(p.annotations),
                "solution": p.solution,
            }
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def _extension(image: bytes) -> str:
    return "jpg" if image[:3] == b"\xff\xd8\xff" else "png"


def _file_name(prompt_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", prompt_id)
