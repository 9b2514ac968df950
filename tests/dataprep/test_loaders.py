"""Loaders: every input format into Prompt records, bad rows skipped with reasons or raised with
file, row and fix, and our own output read back identically. Fixtures are built here."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from core.records import Prompt, render_annotations
from dataprep.loaders import load_prompts, read_prompts
from dataprep.writer import write_dataset


def image_bytes(color: int, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (12, 10), (color, 40, 90)).save(out, format=fmt)
    return out.getvalue()


def hf_image(data: bytes | None, path: str | None = None) -> list[dict]:
    return [{"bytes": data, "path": path}]


def write_parquet(path: Path, columns: dict) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


REFERENCE_INFO = "<info1>GE = 10</info1>\n<info2>GE ⟂ DF at E</info2>\n<info3>GE bisects chord DF, so DE = EF</info3>"


def test_reference_parquet_reads_every_field(tmp_path):
    png = image_bytes(1)
    path = write_parquet(
        tmp_path / "geo3k_with_visual_key_info.parquet",
        {
            "problem": ["<image>Find DE.", "In the figure <image>, find x."],
            "answer": ["5", "2\\sqrt{3}"],
            "images": [hf_image(png), hf_image(image_bytes(2))],
            "visual_key_info": [REFERENCE_INFO, ""],
            "cot": ["<think>\nDE = EF = 5\n</think>\n<answer>\n\\boxed{5}\n</answer>", None],
        },
    )
    prompts = load_prompts(path)
    assert [p.id for p in prompts] == ["geo3k_with_visual_key_info-00000", "geo3k_with_visual_key_info-00001"]
    assert [p.index for p in prompts] == [0, 1]
    first = prompts[0]
    assert first.problem == "<image>Find DE." and first.answer == "5" and first.image == png
    assert first.annotations == ("GE = 10", "GE ⟂ DF at E", "GE bisects chord DF, so DE = EF")
    assert first.solution.startswith("<think>\nDE = EF")
    assert prompts[1].annotations == () and prompts[1].solution == "" and prompts[1].answer == "2\\sqrt{3}"


def test_visual_key_info_as_list_or_untagged_text(tmp_path):
    path = write_parquet(
        tmp_path / "a.parquet",
        {
            "problem": ["<image>a", "<image>b"],
            "answer": ["1", "2"],
            "images": [hf_image(image_bytes(1)), hf_image(image_bytes(2))],
            "visual_key_info": [["AB = 3", " ", "BC = 4"], None],
        },
    )
    untagged = write_parquet(
        tmp_path / "b.parquet",
        {"problem": ["<image>c"], "answer": ["3"], "images": [hf_image(image_bytes(3))], "visual_key_info": ["AB = 3 and BC = 4"]},
    )
    assert [p.annotations for p in load_prompts(path)] == [("AB = 3", "BC = 4"), ()]
    assert load_prompts(untagged)[0].annotations == ("AB = 3 and BC = 4",)


def test_hf_geometry3k_parquet_with_jpeg_and_gif(tmp_path):
    jpeg, gif = image_bytes(5, "JPEG"), image_bytes(6, "GIF")
    path = write_parquet(
        tmp_path / "train-00000-of-00001.parquet",
        {
            "images": [hf_image(jpeg), hf_image(gif)],
            "problem": ["<image>Find x.", "<image>Find y."],
            "answer": ["3", "4"],
        },
    )
    raw = write_parquet(tmp_path / "raw.parquet", {"images": [[image_bytes(7)]], "problem": ["<image>Find z."], "answer": ["5"]})
    assert load_prompts(raw)[0].image == image_bytes(7)  # a list of raw bytes
    prompts = load_prompts(path)
    assert [p.answer for p in prompts] == ["3", "4"]
    assert prompts[0].image == jpeg  # JPEG kept as is
    assert prompts[1].image[:8] == b"\x89PNG\r\n\x1a\n"  # GIF re-encoded as PNG
    assert Image.open(io.BytesIO(prompts[1].image)).size == (12, 10)
    assert all(p.annotations == () for p in prompts)


def test_image_given_as_path_in_hf_dict(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(image_bytes(9))
    path = write_parquet(tmp_path / "p.parquet", {"problem": ["<image>q"], "answer": ["1"], "images": [hf_image(None, "img/a.png")]})
    assert load_prompts(path)[0].image == image_bytes(9)


def bad_rows_parquet(tmp_path: Path) -> Path:
    good = image_bytes(1)
    return write_parquet(
        tmp_path / "bad.parquet",
        {
            "id": ["ok-1", "no-image", "no-answer", "corrupt", "not-utf8", "two-placeholders", "ok-2"],
            "problem": [b"<image>a", b"<image>b", b"<image>c", b"<image>d", b"<image>\xff\xfe", b"<image><image>f", b"<image>g"],
            "answer": ["1", "2", "  ", "4", "5", "6", "7"],
            "images": [hf_image(good), [], hf_image(good), hf_image(good[:40]), hf_image(good), hf_image(good), hf_image(good)],
        },
    )


def test_bad_rows_are_skipped_and_counted(tmp_path):
    result = read_prompts(bad_rows_parquet(tmp_path), on_bad_row="skip")
    assert [p.id for p in result.prompts] == ["ok-1", "ok-2"]
    assert [p.index for p in result.prompts] == [0, 1]
    assert [(s.row, s.id, s.reason) for s in result.skipped] == [
        (1, "no-image", "missing_image"),
        (2, "no-answer", "missing_answer"),
        (3, "corrupt", "undecodable_image"),
        (4, "not-utf8", "not_utf8"),
        (5, "two-placeholders", "bad_placeholder"),
    ]
    assert result.skip_counts() == {"missing_image": 1, "missing_answer": 1, "undecodable_image": 1, "not_utf8": 1, "bad_placeholder": 1}


def test_bad_row_raises_naming_file_row_and_fix(tmp_path):
    path = bad_rows_parquet(tmp_path)
    with pytest.raises(ValueError) as e:
        read_prompts(path, on_bad_row="raise")
    message = str(e.value)
    assert str(path) in message and "row 1 (no-image)" in message and "give every row one image" in message


def test_jsonl_with_paths_and_bad_lines(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(image_bytes(1))
    (tmp_path / "images" / "b.png").write_bytes(image_bytes(2))
    lines = [
        json.dumps({"id": "a", "problem": "<image>Find x.", "answer": 12, "images": ["images/a.png"], "visual_key_info": "<info1>AB = 3</info1>"}).encode(),
        b'{"id": "broken", "problem": "<image>\xff", "answer": "1", "images": ["images/a.png"]}',
        b"{not json",
        b"",
        json.dumps({"id": "b", "problem": "<image>Find y.", "answer": "7", "image": {"path": "images/b.png"}, "annotations": ["CD = 4"]}).encode(),
        json.dumps({"id": "c", "problem": "<image>Find z.", "answer": "1", "images": ["images/missing.png"]}).encode(),
    ]
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    result = read_prompts(path)
    assert [(p.id, p.answer, p.annotations) for p in result.prompts] == [("a", "12", ("AB = 3",)), ("b", "7", ("CD = 4",))]
    assert result.prompts[1].image == image_bytes(2)
    assert [(s.row, s.reason) for s in result.skipped] == [(1, "not_utf8"), (2, "invalid_json"), (5, "missing_image")]
    with pytest.raises(ValueError, match=r"data\.jsonl: row 1 \(data-00001\): line is not UTF-8"):
        read_prompts(path, on_bad_row="raise")


def write_geometry3k(split: Path, problems: dict[int, dict], *, with_image: set[int]) -> None:
    for pid, data in problems.items():
        folder = split / str(pid)
        folder.mkdir(parents=True)
        (folder / "data.json").write_text(json.dumps(data))
        if pid in with_image:
            (folder / "img_diagram.png").write_bytes(image_bytes(pid % 200))


def g3k(text: str, answer: str, choices: list[str]) -> dict:
    return {"id": 0, "problem_text": text, "choices": choices, "answer": answer, "precise_value": [1.0, 2.0, 3.0, 4.0]}


def test_geometry3k_folders(tmp_path):
    split = tmp_path / "geometry3k" / "train"
    problems = {
        10: g3k("Find x.", "B", ["5", "12", "13", "26"]),
        2: g3k("Find the area.", "D", ["1", "2", "3", "4\\sqrt{3}"]),
        7: g3k("Find y.", "A", ["8", "9", "10", "11"]),  # its diagram is missing
        3: g3k("Find z.", "E", ["1", "2", "3", "4"]),  # answer letter out of range
    }
    write_geometry3k(split, problems, with_image={10, 2, 3})
    result = read_prompts(split)
    assert result.source_format == "geometry3k"
    assert [(p.id, p.problem, p.answer) for p in result.prompts] == [
        ("geo3k-00002", "<image>Find the area.", "4\\sqrt{3}"),
        ("geo3k-00010", "<image>Find x.", "12"),
    ]
    assert result.prompts[1].image == image_bytes(10)
    assert [(s.id, s.reason) for s in result.skipped] == [("geo3k-00003", "missing_answer"), ("geo3k-00007", "missing_image")]
    with pytest.raises(ValueError, match=r"holds the Geometry3K splits \['train'\]; point the path at one of them"):
        read_prompts(tmp_path / "geometry3k")


def test_empty_inputs_are_errors_naming_the_file(tmp_path):
    empty_jsonl = tmp_path / "empty.jsonl"
    empty_jsonl.write_text("")
    with pytest.raises(ValueError, match=r"empty\.jsonl: no usable rows"):
        load_prompts(empty_jsonl)
    empty_parquet = write_parquet(
        tmp_path / "empty.parquet",
        {"problem": pa.array([], pa.string()), "answer": pa.array([], pa.string()), "images": pa.array([], pa.list_(pa.binary()))},
    )
    with pytest.raises(ValueError, match=r"empty\.parquet: no usable rows \(0 skipped"):
        load_prompts(empty_parquet)
    all_bad = write_parquet(tmp_path / "all_bad.parquet", {"problem": ["<image>a"], "answer": ["1"], "images": [[b"not an image"]]})
    with pytest.raises(ValueError, match=r"all_bad\.parquet: no usable rows \(1 skipped: \{'undecodable_image': 1\}\)"):
        load_prompts(all_bad)


def test_file_level_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_prompts(tmp_path / "nope.parquet")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unknown dataset format '.csv'"):
        load_prompts(tmp_path / "x.csv")
    (tmp_path / "fake.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ValueError, match="not a readable parquet file"):
        load_prompts(tmp_path / "fake.parquet")
    no_images = write_parquet(tmp_path / "cols.parquet", {"problem": ["<image>a"], "answer": ["1"]})
    with pytest.raises(ValueError, match=r"missing columns \['images'\]"):
        load_prompts(no_images)
    dup = write_parquet(tmp_path / "dup.parquet", {"id": ["a", "a"], "problem": ["<image>a"] * 2, "answer": ["1"] * 2, "images": [hf_image(image_bytes(1))] * 2})
    with pytest.raises(ValueError, match="rows 0 and 1 share the id 'a'"):
        load_prompts(dup)
    with pytest.raises(ValueError, match="on_bad_row='maybe'"):
        load_prompts(dup, on_bad_row="maybe")  # type: ignore[arg-type]


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_prepared_output_reads_back_identically(tmp_path, fmt):
    prompts = [
        Prompt(id="geo3k-00001", index=0, problem="<image>Find x.", answer="12", image=image_bytes(1), annotations=("AB = 3", "AB ⟂ BC"), solution="<think>\na\n</think>"),
        Prompt(id="weird/id", index=1, problem="<image>Find y.", answer="4", image=image_bytes(2, "JPEG"), annotations=("CD = 4",)),
    ]
    path = write_dataset(prompts, output_dir=tmp_path, fmt=fmt)
    assert load_prompts(path) == prompts
    assert load_prompts(tmp_path) == prompts  # the output folder itself
    if fmt == "parquet":
        table = pq.read_table(path)
        assert table.column("visual_key_info").to_pylist()[0] == render_annotations(("AB = 3", "AB ⟂ BC"))
        assert table.column("images").to_pylist()[1] == [{"bytes": image_bytes(2, "JPEG"), "path": None}]
