"""Benchmark loaders: each published local layout (parquet with embedded images, JSON / JSONL with
image folders) into BenchmarkItems with the reference's question text, the judge's choices and
prefixed ids; malformed files fail naming the file, the row and the fix. Fixtures are written here."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from evaluation.benchmarks import (
    check_unique_ids,
    load_mathverse,
    load_mathvision,
    load_mathvista,
    load_wemath,
)
from perception_r1.eval_sets import load_geometry3k, load_synthetic


def png(color: int, size: int = 32) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (size, size), (color, 0, 0)).save(out, format="PNG")
    return out.getvalue()


def gif(color: int) -> bytes:
    out = io.BytesIO()
    Image.new("P", (16, 16), color).save(out, format="GIF")
    return out.getvalue()


def write_parquet(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def hf_image(data: bytes, path: str = "x.png") -> dict:
    return {"bytes": data, "path": path}


# --------------------------------------------------------------------------------------- MathVista
def mathvista_row(pid: str, **overrides) -> dict:
    row = {"pid": pid, "question": "q", "image": f"images/{pid}.jpg", "decoded_image": hf_image(png(int(pid))),
           "choices": None, "unit": None, "precision": None, "answer": "5", "question_type": "free_form",
           "answer_type": "integer", "query": f"Hint: answer with an integer.\nQuestion: how many {pid}?"}
    return row | overrides


def test_mathvista_parquet_uses_query_and_letters_choices(tmp_path):
    write_parquet(tmp_path / "data" / "testmini-00000-of-00001.parquet", [
        mathvista_row("1"),
        mathvista_row("2", choices=["larger than", "equal to", "smaller than"], answer="equal to",
                      question_type="multi_choice", answer_type="text"),
    ])
    items = load_mathvista(tmp_path)  # the folder as downloaded
    assert [i.prompt.id for i in items] == ["mathvista-1", "mathvista-2"]
    first, second = items
    assert first.prompt.problem == "<image>Hint: answer with an integer.\nQuestion: how many 1?"
    assert first.prompt.answer == "5" and first.prompt.image == png(1)
    assert first.choices == "" and first.options == ()
    assert first.extraction_context == "Hint: answer with an integer.\nQuestion: how many 1?"
    assert second.choices == "A. larger than\nB. equal to\nC. smaller than"
    assert second.options == ("larger than", "equal to", "smaller than")
    assert [i.prompt.index for i in items] == [0, 1]


def test_mathvista_json_keyed_by_pid_reads_image_folder(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "7.jpg").write_bytes(png(7))
    record = {k: v for k, v in mathvista_row("7").items() if k not in ("decoded_image", "pid")}
    (tmp_path / "testmini.json").write_text(json.dumps({"7": record}), encoding="utf-8")
    (item,) = load_mathvista(tmp_path / "testmini.json")
    assert item.prompt.id == "mathvista-7" and item.prompt.image == png(7)


def test_mathvista_missing_query_names_file_and_row(tmp_path):
    path = write_parquet(tmp_path / "t.parquet", [mathvista_row("1"), mathvista_row("2", query=None)])
    with pytest.raises(ValueError, match=r"t\.parquet row 1: missing field 'query'"):
        load_mathvista(path)


def test_missing_image_file_names_row_and_fix(tmp_path):
    record = {k: v for k, v in mathvista_row("3").items() if k != "decoded_image"}
    (tmp_path / "testmini.json").write_text(json.dumps([record]), encoding="utf-8")
    with pytest.raises(ValueError, match=r"testmini\.json row 0: image 'images/3\.jpg' not found.*unpack"):
        load_mathvista(tmp_path)


def test_undecodable_image_and_empty_answer_rejected(tmp_path):
    bad = write_parquet(tmp_path / "bad.parquet", [mathvista_row("1", decoded_image=hf_image(b"not an image"))])
    with pytest.raises(ValueError, match=r"bad\.parquet row 0: image does not decode"):
        load_mathvista(bad)
    empty = write_parquet(tmp_path / "empty.parquet", [mathvista_row("1", answer="")])
    with pytest.raises(ValueError, match="empty answer"):
        load_mathvista(empty)


def test_folder_without_benchmark_file_says_what_was_looked_for(tmp_path):
    with pytest.raises(ValueError, match=r"no benchmark file in .*testmini\.json"):
        load_mathvista(tmp_path)
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unknown format '.csv'"):
        load_mathvista(tmp_path / "x.csv")


# --------------------------------------------------------------------------------------- MathVerse
def mathverse_row(index: str, **overrides) -> dict:
    row = {"sample_index": index, "problem_index": "1", "problem_version": "Text Lite",
           "question": "As shown, find the angle.", "image": hf_image(png(40)), "answer": "40°",
           "question_type": "free-form", "metadata": {"split": "testmini"}, "query_wo": "...", "query_cot": "...",
           "question_for_eval": "As shown, find the angle."}
    return row | overrides


def test_mathverse_parquet_takes_choices_from_question_for_eval(tmp_path):
    mc_question = "Find x.\nChoices:\nA:20\nB:40\nC:50\nD:80"
    write_parquet(tmp_path / "testmini.parquet", [
        mathverse_row("1"),
        mathverse_row("2", question="Find x.", question_type="multi-choice", answer="B",
                      question_for_eval=mc_question),
    ])
    free, mc = load_mathverse(tmp_path)
    assert free.prompt.id == "mathverse-1" and free.prompt.problem == "<image>As shown, find the angle."
    assert free.choices == "" and free.prompt.answer == "40°"
    assert mc.prompt.problem == "<image>Find x."  # the question field, as the reference prompts it
    assert mc.choices == "\nA:20\nB:40\nC:50\nD:80" and mc.prompt.answer == "B"


def test_mathverse_json_with_image_paths(tmp_path):
    (tmp_path / "images_version_1-4").mkdir()
    (tmp_path / "images_version_1-4" / "image_1.png").write_bytes(png(9))
    row = mathverse_row("5", image="images_version_1-4/image_1.png")
    (tmp_path / "testmini.json").write_text(json.dumps([row]), encoding="utf-8")
    (item,) = load_mathverse(tmp_path)
    assert item.prompt.image == png(9) and item.prompt.id == "mathverse-5"


# -------------------------------------------------------------------------------------- MathVision
def mathvision_row(pid: str, options: list[str], answer: str, **overrides) -> dict:
    row = {"id": pid, "question": "<image1>\nWhich shape is shaded?", "options": options,
           "image": f"images/{pid}.jpg", "answer": answer, "solution": None, "level": 2, "subject": "metric geometry"}
    return row | overrides


def test_mathvision_jsonl_appends_lettered_choices_when_more_than_one(tmp_path):
    (tmp_path / "images").mkdir()
    for pid in ("1", "2"):
        (tmp_path / "images" / f"{pid}.jpg").write_bytes(png(int(pid)))
    (tmp_path / "data").mkdir()
    lines = [mathvision_row("1", ["2", "3", "4", "5", "6"], "C"), mathvision_row("2", [], "12")]
    (tmp_path / "data" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines), encoding="utf-8")
    mc, free = load_mathvision(tmp_path)  # data/test.jsonl, images/ beside data/
    assert mc.prompt.problem == "<image><image1>\nWhich shape is shaded?\nChoices:\nA. 2\nB. 3\nC. 4\nD. 5\nE. 6"
    assert mc.choices == "A. 2\nB. 3\nC. 4\nD. 5\nE. 6" and mc.options == ("2", "3", "4", "5", "6")
    assert mc.extraction_context == "<image1>\nWhich shape is shaded?"
    assert free.prompt.problem == "<image><image1>\nWhich shape is shaded?"
    assert free.choices == "" and free.prompt.image == png(2)


def test_mathvision_parquet_reencodes_other_image_formats(tmp_path):
    path = write_parquet(tmp_path / "data" / "test-00000-of-00001.parquet",
                         [mathvision_row("9", ["a"], "a", decoded_image=hf_image(gif(3)))])
    (item,) = load_mathvision(path)
    assert item.prompt.image[:8] == b"\x89PNG\r\n\x1a\n"  # GIF re-encoded as PNG
    assert item.choices == "A. a"  # one option: shown to the judge, not appended to the question
    assert item.prompt.problem == "<image><image1>\nWhich shape is shaded?"


def test_mathvision_options_must_be_a_list(tmp_path):
    (tmp_path / "test.jsonl").write_text(json.dumps(mathvision_row("1", "ABCD", "A", image=None,
                                                                   decoded_image=None)) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"test\.jsonl row 0: 'options' should be a list"):
        load_mathvision(tmp_path / "test.jsonl")


# ---------------------------------------------------------------------- field types and image folders
@pytest.mark.parametrize("field, value, says", [
    ("answer", ["C"], "'answer' is a list (['C']); 'answer' must be a string or a number"),
    ("answer", {"value": "C"}, "'answer' is an object ({'value': 'C'})"),
    ("answer", True, "'answer' is a boolean (True)"),
    ("question", ["Which?"], "'question' is a list (['Which?'])"),
    ("options", ["2", {"text": "3"}], "options[1] is an object ({'text': '3'})"),
    ("image", {"bytes": "iVBORw0KGgo=", "path": None}, "'image'.bytes is a string ('iVBORw0KGgo='), not image bytes"),
    ("image", 5, "'image' is a number (5), not image bytes or a path"),
], ids=["answer-list", "answer-object", "answer-bool", "question-list", "option-object", "image-text-bytes", "image-number"])
def test_field_of_another_type_is_refused_naming_file_row_and_field(tmp_path, field, value, says):
    """The training loaders' type checks: an answer list would otherwise be scored as its Python text."""
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "1.jpg").write_bytes(png(1))
    rows = [mathvision_row("1", ["2", "3"], "A"), mathvision_row("2", ["2", "3"], "A", image="images/1.jpg") | {field: value}]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    with pytest.raises(ValueError) as e:
        load_mathvision(tmp_path / "test.jsonl")
    assert f"{tmp_path / 'test.jsonl'} row 1: {says}" in str(e.value)


def test_parquet_image_struct_with_text_bytes_is_refused_not_read_as_a_path(tmp_path):
    path = write_parquet(tmp_path / "t.parquet", [mathvista_row("1", decoded_image={"bytes": "x.png", "path": None})])
    (tmp_path / "x.png").write_bytes(png(1))  # the text names a real file: it must still not be read as one
    with pytest.raises(ValueError, match=r"t\.parquet row 0: 'decoded_image'\.bytes is a string \('x\.png'\), not image bytes"):
        load_mathvista(path)


@pytest.mark.parametrize("escape", ["../secret.png", "../../secret.png", "ABSOLUTE", "images/link.png"])
def test_image_path_outside_the_benchmark_folder_is_refused(tmp_path, escape):
    """The file is `bench/data/test.jsonl`; images are looked up in `bench/data` and `bench`; `secret.png` lies above."""
    bench = tmp_path / "bench"
    (bench / "data").mkdir(parents=True)
    (bench / "images").mkdir()
    (tmp_path / "secret.png").write_bytes(png(200))
    (bench / "images" / "link.png").symlink_to(tmp_path / "secret.png")
    image = str(tmp_path / "secret.png") if escape == "ABSOLUTE" else escape
    (bench / "data" / "test.jsonl").write_text(json.dumps(mathvision_row("1", [], "5", image=image)) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"test\.jsonl row 0: image path .* resolves to .*secret\.png, outside the "
                                         r"dataset folder .*; keep the images inside"):
        load_mathvision(bench / "data" / "test.jsonl")


# ------------------------------------------------------------------------------------------ WeMath
def test_wemath_json_question_plus_options(tmp_path):
    (tmp_path / "2steps" / "image").mkdir(parents=True)
    (tmp_path / "2steps" / "image" / "1-1.png").write_bytes(png(5))
    row = {"ID": "2steps_1", "split": "testmini", "knowledge concept": "Length units",
           "question": "OA = ( ) m, AB = ( ) m", "option": "A. 300, 400;B. 400, 300;C. 3000, 4000",
           "answer": "C", "image_path": "2steps/image/1-1.png", "key": "2steps_1", "question number": 1}
    (tmp_path / "testmini.json").write_text(json.dumps([row]), encoding="utf-8")
    (item,) = load_wemath(tmp_path)
    assert item.prompt.id == "wemath-2steps_1"
    assert item.prompt.problem == "<image>OA = ( ) m, AB = ( ) m\nChoices:\nA. 300, 400;B. 400, 300;C. 3000, 4000"
    assert item.choices == "A. 300, 400;B. 400, 300;C. 3000, 4000"
    assert item.prompt.answer == "C" and item.prompt.image == png(5)


def test_wemath_parquet_with_embedded_image(tmp_path):
    path = write_parquet(tmp_path / "testmini.parquet", [
        {"ID": "3steps_4", "question": "q?", "option": "A. 1;B. 2", "answer": "B",
         "image_path": hf_image(png(6), "3steps/image/4.png")}])
    (item,) = load_wemath(path)
    assert item.prompt.image == png(6) and item.prompt.id == "wemath-3steps_4"


# -------------------------------------------------------------------------------------- Geometry3K
def test_geometry3k_intergps_split_folder(tmp_path):
    for pid, answer in (("2401", "B"), ("2402", "A")):
        folder = tmp_path / "test" / pid
        folder.mkdir(parents=True)
        (folder / "img_diagram.png").write_bytes(png(int(pid) % 255))
        (folder / "data.json").write_text(json.dumps(
            {"problem_text": f"Find x in {pid}.", "choices": ["3", "7", "9", "12"], "answer": answer}), encoding="utf-8")
    first, second = load_geometry3k(tmp_path / "test")
    assert first.prompt.id == "geo3k-02401" and first.benchmark == "geometry3k"
    assert first.prompt.problem == "<image>Find x in 2401." and first.prompt.answer == "7"
    assert second.prompt.answer == "3"


def test_geometry3k_parquet(tmp_path):
    path = write_parquet(tmp_path / "test.parquet", [
        {"images": [hf_image(png(1))], "problem": "<image>Find y.", "answer": "14"}])
    (item,) = load_geometry3k(path)
    assert item.prompt.id == "geo3k-test-00000" and item.prompt.answer == "14"


# --------------------------------------------------------------------------------------- synthetic
def test_synthetic_generated_keeps_annotations():
    items = load_synthetic(num_problems=3, seed=5)
    assert [i.prompt.id for i in items] == ["synthetic-5-0", "synthetic-5-1", "synthetic-5-2"]
    assert all(i.prompt.annotations and i.prompt.problem.startswith("<image>") for i in items)
    assert all(i.benchmark == "synthetic" and i.choices == "" for i in items)


def test_duplicate_ids_across_files_named():
    items = load_synthetic(num_problems=2, seed=0)
    with pytest.raises(ValueError, match="id synthetic-0-0 appears at items 0 and 2"):
        check_unique_ids(items + items)
