"""Report: per-benchmark accuracies from rows, printed next to the reference's published Table 1
columns, and the bar chart."""

from __future__ import annotations

import re

from evaluation.evaluate import EvalRow
from evaluation.report import format_table, plot, summarize


def row(benchmark: str, k: int, *, llm: bool | None, mv: bool, perception: bool | None = None) -> EvalRow:
    return EvalRow(id=f"{benchmark}-{k}", benchmark=benchmark, answer="1", response="r", extracted="1",
                   extraction="span", correct_mathverify=mv, correct_llm=llm, judge_reply="",
                   perception=perception, perception_verdicts=(), num_annotations=0)


def test_summaries_and_table_with_published_columns(tmp_path):
    rows = [row("mathvista", 0, llm=True, mv=True), row("mathvista", 1, llm=True, mv=False),
            row("mathvista", 2, llm=False, mv=False), row("mathvista", 3, llm=True, mv=True, perception=True),
            row("synthetic", 0, llm=None, mv=True, perception=False), row("synthetic", 1, llm=None, mv=False)]
    vista, synthetic = summarize(rows)
    assert (vista.accuracy_llm, vista.accuracy_mathverify, vista.perception_rate) == (75.0, 50.0, 100.0)
    assert vista.published == (68.1, 74.2) and vista.headline == 75.0
    assert synthetic.accuracy_llm is None and synthetic.headline == 50.0 and synthetic.published is None
    assert synthetic.perception_rate == 0.0 and synthetic.num_perception_labelled == 1

    table = format_table([vista, synthetic], model_name="tiny")
    assert "Qwen2.5-VL-7B-IT (pub.)" in table and "Perception-R1-7B (pub.)" in table
    assert re.search(r"mathvista\s+4\s+75\.0\s+50\.0\s+100\.0 \(1\)\s+68\.1\s+74\.2", table)
    assert re.search(r"synthetic\s+2\s+-\s+50\.0\s+0\.0 \(1\)\s+-\s+-", table)

    path = plot([vista, synthetic], tmp_path / "chart.png", model_name="tiny")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
