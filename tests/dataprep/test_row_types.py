"""Rows taken for what they are: a field of the wrong type (an answer given as a list, an object or a
boolean; an image field holding text where bytes belong) and an image path leading out of the dataset's
folder refuse that row alone, counted under its reason with `on_bad_row="skip"`, or raised naming the
file, the row, the field and the fix with `on_bad_row="raise"`; in every format the loader reads."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from time_bound import within

from dataprep.loaders import read_prompts

GOOD = {"id": "good", "problem": "<image>Find x.", "answer": "3"}


@pytest.fixture(autouse=True)
def time_bound():
    """Each test ends within 30 s: a loader that hangs fails its test instead of stalling the suite."""
    with within(30):
        yield


def png(color: int = 10) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (12, 10), (color, 40, 90)).save(out, format="PNG")
    return out.getvalue()


def jsonl_dataset(folder: Path, bad: dict) -> Path:
    """A JSONL dataset in `folder`: one good row, then `bad` (a good row with some fields replaced)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "img.png").write_bytes(png())
    rows = [GOOD | {"images": ["img.png"]}, GOOD | {"id": "bad", "images": ["img.png"]} | bad]
    path = folder / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def parquet_dataset(folder: Path, rows: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "rows.parquet"
    pq.write_table(pa.Table.from_pylist([{"images": [{"bytes": png(), "path": None}]} | r for r in rows]), path)
    return path


def assert_refused(path: Path, *, row: int, reason: str, says: tuple[str, ...], loaded: int = 1) -> None:
    """Skipped and counted under `reason` (the other rows load); raised naming file, row and `says`."""
    if loaded:
        result = read_prompts(path, on_bad_row="skip")
        assert [p.id for p in result.prompts] == ["good"] * loaded
        assert [(s.row, s.reason) for s in result.skipped] == [(row, reason)]
    else:  # a parquet column has one type: every row is bad, so the file has none to give
        with pytest.raises(ValueError, match=rf"no usable rows \(\d+ skipped: \{{'{reason}': \d+\}}\)"):
            read_prompts(path, on_bad_row="skip")
    with pytest.raises(ValueError) as e:
        read_prompts(path, on_bad_row="raise")
    message = str(e.value)
    assert f"{path}: row {row} " in message and "on_bad_row='skip'" in message, message
    for text in says:
        assert text in message, message


# ------------------------------------------------------------------------------------- text fields
WRONG_ANSWERS = {
    "list": (["3", "4"], "answer is a list (['3', '4'])"),
    "object": ({"value": 3}, "answer is an object ({'value': 3})"),
    "true": (True, "answer is a boolean (True)"),
    "false": (False, "answer is a boolean (False)"),
    "infinite": (float("inf"), "answer is a number (inf)"),
}


@pytest.mark.parametrize("kind", WRONG_ANSWERS)
def test_answer_of_another_type_is_refused_not_trained_as_its_python_text(tmp_path, kind):
    value, says = WRONG_ANSWERS[kind]
    fix = "answer must be a string or a number"
    assert_refused(jsonl_dataset(tmp_path, {"answer": value}), row=1, reason="wrong_type", says=(says, fix))
    path = parquet_dataset(tmp_path / "pq", [{"id": f"r{k}", "problem": "<image>x", "answer": value} for k in range(2)])
    assert_refused(path, row=0, reason="wrong_type", says=(says, fix), loaded=0)


@pytest.mark.reliability(fault="dataset rows whose answer is a list, an object or a boolean, among good rows",
                         outcome="those rows refused and counted (or an error naming file, row, field and fix); "
                                 "none trained as its Python text; the good rows load")
def test_one_file_of_mixed_answer_types_loads_only_the_good_rows(tmp_path):
    (tmp_path / "img.png").write_bytes(png())
    answers = {"text": "3", "int": 12, "list": ["3"], "object": {"value": 3}, "true": True, "false": False}
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(GOOD | {"id": k, "answer": v, "images": ["img.png"]}) + "\n"
                            for k, v in answers.items()))
    result = read_prompts(path)
    assert [(p.id, p.answer) for p in result.prompts] == [("text", "3"), ("int", "12")]
    assert result.skip_counts() == {"wrong_type": 4}


def test_null_answer_is_a_missing_answer_and_numbers_are_their_text(tmp_path):
    assert_refused(jsonl_dataset(tmp_path, {"answer": None}), row=1, reason="missing_answer", says=("empty answer",))
    numbers = [GOOD | {"id": "int", "answer": 12}, GOOD | {"id": "float", "answer": 2.5}]
    prompts = read_prompts(parquet_dataset(tmp_path / "pq", numbers[:1]), on_bad_row="raise").prompts
    assert [p.answer for p in prompts] == ["12"]
    (tmp_path / "js").mkdir()
    (tmp_path / "js" / "img.png").write_bytes(png())
    path = tmp_path / "js" / "n.jsonl"
    path.write_text("".join(json.dumps(row | {"images": ["img.png"]}) + "\n" for row in numbers))
    assert [p.answer for p in read_prompts(path, on_bad_row="raise").prompts] == ["12", "2.5"]


@pytest.mark.parametrize("value", [["<image>x"], {"text": "<image>x"}, True, 7], ids=["list", "object", "bool", "number"])
def test_problem_must_be_a_string(tmp_path, value):
    says = ("problem is a", "problem must be a string")
    assert_refused(jsonl_dataset(tmp_path, {"problem": value}), row=1, reason="wrong_type", says=says)
    path = parquet_dataset(tmp_path / "pq", [{"id": f"r{k}", "problem": value, "answer": "1"} for k in range(2)])
    assert_refused(path, row=0, reason="wrong_type", says=says, loaded=0)


WRONG_FIELDS = {
    "annotations-string": ("annotations", "AB = 3", "annotations is a string ('AB = 3'); annotations must be a list of strings"),
    "annotations-object": ("annotations", {"AB": 3}, "annotations is an object ({'AB': 3}); annotations must be a list of strings"),
    "annotations-item-object": ("annotations", ["AB = 3", {"BC": 4}], "annotations[1] is an object ({'BC': 4}); annotations[1] must be a string"),
    "annotations-item-bool": ("annotations", [True], "annotations[0] is a boolean (True)"),
    "visual_key_info-object": ("visual_key_info", {"AB": 3}, "visual_key_info is an object ({'AB': 3}); visual_key_info must be a string"),
    "visual_key_info-number": ("visual_key_info", 3, "visual_key_info is a number (3)"),
    "visual_key_info-item-list": ("visual_key_info", ["AB = 3", ["BC = 4"]], "visual_key_info[1] is a list (['BC = 4'])"),
    "solution-list": ("solution", ["step 1"], "solution is a list (['step 1']); solution must be a string"),
    "id-list": ("id", ["a"], "id is a list (['a']); id must be a string or a number"),
    "id-bool": ("id", True, "id is a boolean (True)"),
}


@pytest.mark.parametrize("kind", WRONG_FIELDS)
def test_annotations_solution_and_id_of_another_type_are_refused(tmp_path, kind):
    field, value, says = WRONG_FIELDS[kind]
    assert_refused(jsonl_dataset(tmp_path, {field: value}), row=1, reason="wrong_type", says=(says,))


def test_geometry3k_answer_and_problem_are_type_checked(tmp_path):
    """The InterGPS folders go through the same check: a choice or problem_text of another type."""
    split = tmp_path / "test"
    problems = {
        1: {"problem_text": "Find x.", "choices": ["5", "12", "13", "26"], "answer": "B"},
        2: {"problem_text": "Find y.", "choices": [["5"], "12", "13", "26"], "answer": "A"},
        3: {"problem_text": ["Find z."], "choices": ["5", "12", "13", "26"], "answer": "A"},
    }
    for pid, data in problems.items():
        (split / str(pid)).mkdir(parents=True)
        (split / str(pid) / "data.json").write_text(json.dumps(data))
        (split / str(pid) / "img_diagram.png").write_bytes(png(pid))
    result = read_prompts(split)
    assert [(p.id, p.answer) for p in result.prompts] == [("geo3k-00001", "12")]
    assert [(s.id, s.reason) for s in result.skipped] == [("geo3k-00002", "wrong_type"), ("geo3k-00003", "wrong_type")]
    with pytest.raises(ValueError, match=r"row 1 \(geo3k-00002\): choice A is a list \(\['5'\]\); choice A must be a string or a number"):
        read_prompts(split, on_bad_row="raise")


# ------------------------------------------------------------------------------------------ images
WRONG_IMAGES = {
    "text-as-bytes": ({"bytes": "iVBORw0KGgoAAAANSUhEUg==", "path": None}, "images[0].bytes is a string ('iVBORw0KGgoAAAANSUhEUg==')"),
    "list-as-bytes": ({"bytes": [137, 80, 78, 71]}, "images[0].bytes is a list ([137, 80, 78, 71])"),
    "number-as-path": ({"path": 5}, "images[0].path is a number (5), not image bytes or a path"),
    "number": (5, "images[0] is a number (5), not image bytes or a path"),
    "bool": (True, "images[0] is a boolean (True)"),
    "nested-list": (["img.png"], "images[0] is a list (['img.png'])"),
}


@pytest.mark.parametrize("kind", WRONG_IMAGES)
def test_image_field_of_another_type_refuses_only_its_row(tmp_path, kind):
    value, says = WRONG_IMAGES[kind]
    assert_refused(jsonl_dataset(tmp_path, {"images": [value]}), row=1, reason="wrong_type", says=(says,))


@pytest.mark.reliability(fault="a dataset image field holding text where bytes belong",
                         outcome="that row alone refused, naming the field; the rest of the dataset loads")
def test_parquet_image_struct_with_text_bytes_refuses_only_its_row(tmp_path):
    """The reported case: a parquet `images` struct whose `bytes` is a string column. The good row gives a path."""
    (tmp_path / "img.png").write_bytes(png())
    path = tmp_path / "rows.parquet"
    rows = [GOOD | {"images": [{"bytes": None, "path": "img.png"}]},
            GOOD | {"id": "bad", "images": [{"bytes": "not bytes, text", "path": None}]}]
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert pa.types.is_string(pq.read_schema(path).field("images").type.value_type.field("bytes").type)
    assert_refused(path, row=1, reason="wrong_type",
                   says=("images[0].bytes is a string ('not bytes, text'), not image bytes", "JSON cannot hold bytes"))


# ----------------------------------------------------------------------------------- image folders
def outside_layout(tmp_path: Path) -> tuple[Path, Path]:
    """`tmp/data/` is the dataset's folder; `tmp/secret.png` (a valid image) and `tmp/elsewhere/` lie outside it."""
    data, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    data.mkdir()
    elsewhere.mkdir()
    (tmp_path / "secret.png").write_bytes(png(200))
    (elsewhere / "a.png").write_bytes(png(201))
    os.symlink(tmp_path / "secret.png", data / "link.png")
    os.symlink(elsewhere, data / "linked_dir")
    return data, tmp_path / "secret.png"


ESCAPES = ["../secret.png", "ABSOLUTE", "sub/../../secret.png", "link.png", "linked_dir/a.png"]


@pytest.mark.parametrize("how", ["path", "hf-dict"])
@pytest.mark.parametrize("escape", ESCAPES)
def test_image_path_outside_the_dataset_folder_is_refused(tmp_path, escape, how):
    data, secret = outside_layout(tmp_path)
    value = str(secret) if escape == "ABSOLUTE" else escape
    entry = value if how == "path" else {"bytes": None, "path": value}
    says = ("outside the dataset folder", str(data.resolve()), "keep the images inside the dataset's folder")
    assert_refused(jsonl_dataset(data, {"images": [entry]}), row=1, reason="image_outside_dataset", says=says)


@pytest.mark.parametrize("escape", ESCAPES)
def test_parquet_image_path_outside_the_dataset_folder_is_refused(tmp_path, escape):
    data, secret = outside_layout(tmp_path)
    value = str(secret) if escape == "ABSOLUTE" else escape
    (data / "img.png").write_bytes(png())
    path = data / "rows.parquet"
    rows = [GOOD | {"images": [{"bytes": None, "path": "img.png"}]},
            GOOD | {"id": "bad", "images": [{"bytes": None, "path": value}]}]
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert_refused(path, row=1, reason="image_outside_dataset", says=("outside the dataset folder",))


@pytest.mark.reliability(fault="dataset image paths leading out of its folder (`..`, absolute, symlinks)",
                         outcome="those rows refused and counted, the files never read; the good row loads")
def test_one_file_of_escaping_paths_reads_none_of_them(tmp_path, monkeypatch):
    data, secret = outside_layout(tmp_path)
    (data / "img.png").write_bytes(png())
    rows = [GOOD | {"images": ["img.png"]}]
    rows += [GOOD | {"id": f"escape-{k}", "images": [str(secret) if e == "ABSOLUTE" else e]} for k, e in enumerate(ESCAPES)]
    path = data / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    read, read_bytes = [], Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: read.append(self.resolve()) or read_bytes(self))
    result = read_prompts(path)
    assert [p.id for p in result.prompts] == ["good"]
    assert result.skip_counts() == {"image_outside_dataset": len(ESCAPES)}
    assert all(p.is_relative_to(data.resolve()) for p in read), read


def test_geometry3k_diagram_linked_outside_the_split_is_refused(tmp_path):
    split = tmp_path / "test"
    (tmp_path / "secret.png").write_bytes(png(200))
    for pid in (1, 2):
        (split / str(pid)).mkdir(parents=True)
        (split / str(pid) / "data.json").write_text(json.dumps({"problem_text": "Find x.", "choices": ["1", "2"], "answer": "A"}))
    (split / "1" / "img_diagram.png").write_bytes(png(1))
    os.symlink(tmp_path / "secret.png", split / "2" / "img_diagram.png")
    result = read_prompts(split)
    assert [p.id for p in result.prompts] == ["geo3k-00001"]
    assert [(s.id, s.reason) for s in result.skipped] == [("geo3k-00002", "image_outside_dataset")]


def test_paths_that_stay_inside_the_folder_still_load(tmp_path):
    """Absolute paths into the folder, `..` that stays inside, and symlinks between its own files are fine."""
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "images" / "a.png").write_bytes(png(1))
    os.symlink(data / "images" / "a.png", data / "alias.png")
    entries = [str(data / "images" / "a.png"), "images/../images/a.png", "alias.png", {"path": "images/a.png"}]
    path = data / "rows.jsonl"
    path.write_text("".join(json.dumps(GOOD | {"id": f"r{k}", "images": [e]}) + "\n" for k, e in enumerate(entries)))
    result = read_prompts(path, on_bad_row="raise")
    assert [p.image for p in result.prompts] == [png(1)] * 4


def test_unreadable_image_file_refuses_only_its_row(tmp_path, monkeypatch):
    """An OS error reading the file (here a faked permission error: the suite may run as root) is named as such."""
    path = jsonl_dataset(tmp_path, {"images": ["locked.png"]})
    (tmp_path / "locked.png").write_bytes(png())
    read_bytes = Path.read_bytes

    def locked(self: Path) -> bytes:
        if self.name == "locked.png":
            raise PermissionError(13, "Permission denied", str(self))
        return read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", locked)
    says = ("locked.png cannot be read (Permission denied)", "check the file and its permissions")
    assert_refused(path, row=1, reason="unreadable_image", says=says)


def test_image_path_with_a_nul_byte_refuses_only_its_row(tmp_path):
    path = jsonl_dataset(tmp_path, {"images": ["img\u0000.png"]})
    assert_refused(path, row=1, reason="missing_image", says=("is not a path (embedded null byte)", "fix the image path"))
