"""McNemar: the exact binomial test reproduces the reference's three published p-values from their
discordant counts, the asymptotic forms do not; pairing by id fails loudly on mismatched or repeated
ids; the command prints the table, the discordant counts and the p-value."""

from __future__ import annotations

import json
import math

import pytest

from evaluation.mcnemar import Table, exact_p_value, format_table, pair, table
from perception_r1.cli import main
from perception_r1.mcnemar_cmd import resolve_field

# (b, c) -> the p-value the reference reports (docs/method.md §6), and the exact value
PUBLISHED = {(1, 5): (0.22, 0.21875), (2, 4): (0.69, 0.6875), (2, 10): (0.04, 0.038574)}


def chi2_p(b: int, c: int, *, continuity: bool) -> float:
    """Asymptotic McNemar: chi-square with 1 df, optionally with Edwards' continuity correction."""
    stat = (abs(b - c) - (1 if continuity else 0)) ** 2 / (b + c)
    return math.erfc(math.sqrt(stat / 2))  # survival function of chi-square(1)


@pytest.mark.parametrize("b,c", list(PUBLISHED))
def test_exact_test_reproduces_published_p_values(b, c):
    reported, exact = PUBLISHED[(b, c)]
    p = exact_p_value(b, c)
    assert p == pytest.approx(exact, abs=5e-6)
    assert round(p, 2) == reported
    assert exact_p_value(c, b) == p  # two-sided: symmetric


def test_exact_values_by_hand():
    assert exact_p_value(2, 10) == 2 * (1 + 12 + 66) / 2**12  # 0.0385742
    assert exact_p_value(2, 4) == 2 * (1 + 6 + 15) / 2**6
    assert exact_p_value(1, 5) == 2 * (1 + 6) / 2**6
    assert exact_p_value(0, 0) == 1.0
    assert exact_p_value(3, 3) == 1.0  # 2 * 42/64 > 1, capped
    assert exact_p_value(0, 5) == 2 / 32


def test_asymptotic_forms_do_not_reproduce_published():
    # chi-square with continuity correction: 0.2207, 0.6831, 0.0433 — (2,4) rounds to 0.68, not the reported 0.69
    assert chi2_p(2, 4, continuity=True) == pytest.approx(0.6831, abs=1e-4)
    assert round(chi2_p(2, 4, continuity=True), 2) != PUBLISHED[(2, 4)][0]
    assert chi2_p(1, 5, continuity=True) == pytest.approx(0.2207, abs=1e-4)
    assert chi2_p(2, 10, continuity=True) == pytest.approx(0.0433, abs=1e-4)
    # plain chi-square: 0.1025, 0.4142, 0.0209 — wrong on all three
    for (b, c), (reported, _) in PUBLISHED.items():
        assert round(chi2_p(b, c, continuity=False), 2) != reported


def test_negative_counts_rejected():
    with pytest.raises(ValueError, match="must be >= 0"):
        exact_p_value(-1, 3)


def rows(values: dict[str, bool | None], field: str = "correct_llm") -> list[dict]:
    return [{"id": i, field: v} for i, v in values.items()]


def test_pair_and_table_count_cells():
    a = rows({"x1": True, "x2": True, "x3": False, "x4": False, "x5": True, "x6": None})
    b = rows({"x6": True, "x5": True, "x4": False, "x3": True, "x2": False, "x1": False})  # other order
    pairs = pair(a, b, "correct_llm")
    assert pairs == [(True, False), (True, False), (False, True), (False, False), (True, True), (None, True)]
    t = table(pairs)
    assert t == Table(both=1, only_a=2, only_b=1, neither=1, num_excluded=1)
    assert t.num_pairs == 5
    assert t.p_value == exact_p_value(2, 1) == 1.0


def test_pair_names_ids_missing_on_either_side():
    a = rows({"m-1": True, "m-2": True, "m-3": False})
    b = rows({"m-1": True, "m-4": False, "m-3": False})
    with pytest.raises(ValueError, match=r"1 ids only in A \[m-2\], 1 ids only in B \[m-4\]"):
        pair(a, b, "correct_llm")


def test_pair_names_duplicate_ids():
    a = rows({"m-1": True, "m-2": True}) + [{"id": "m-2", "correct_llm": False}]
    with pytest.raises(ValueError, match=r"A: 1 ids appear more than once \[m-2\]"):
        pair(a, rows({"m-1": True, "m-2": True}), "correct_llm")
    with pytest.raises(ValueError, match=r"B: 1 ids appear more than once \[m-1\]"):
        pair(rows({"m-1": True}), rows({"m-1": True}) * 2, "correct_llm")


def test_pair_names_missing_field():
    with pytest.raises(ValueError, match=r"B: row 2 has no 'perception' field"):
        pair(rows({"a": True}, "perception"), [{"id": "a", "perception": True}, {"id": "b"}], "perception")


def test_table_rejects_non_boolean_values():
    with pytest.raises(ValueError, match="true/false"):
        table([(1, 0)])


def test_format_table_shows_cells_and_p():
    text = format_table(Table(both=30, only_a=2, only_b=10, neither=8), field="perception")
    assert "50 paired items" in text
    assert "b = 2" in text and "c = 10" in text
    assert "p = 0.0386" in text


def test_resolve_field_prefers_llm_judgement_when_complete():
    full = [{"correct_llm": True, "correct_mathverify": False}]
    partial = [{"correct_llm": None, "correct_mathverify": True}]
    assert resolve_field("correct", full, full) == "correct_llm"
    assert resolve_field("correct", full, partial) == "correct_mathverify"
    assert resolve_field("perception", partial, partial) == "perception"


def write_jsonl(path, items):
    path.write_text("".join(json.dumps(r) + "\n" for r in items), encoding="utf-8")
    return str(path)


def test_command_reproduces_perception_r1_vs_qwen(tmp_path, capsys):
    # 50 geometry items: 2 perception-correct only for A, 10 only for B, 30 both, 8 neither
    flags = [(True, False)] * 2 + [(False, True)] * 10 + [(True, True)] * 30 + [(False, False)] * 8
    a = write_jsonl(tmp_path / "a.jsonl", [{"id": f"mathvista-{k}", "benchmark": "mathvista", "perception": x}
                                           for k, (x, _) in enumerate(flags)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"id": f"mathvista-{k}", "benchmark": "mathvista", "perception": y}
                                           for k, (_, y) in enumerate(flags)])
    assert main(["mcnemar", a, b, "--field", "perception"]) == 0
    out = capsys.readouterr().out
    assert "b = 2" in out and "c = 10" in out and "p = 0.0386" in out
    assert "50 paired items" in out


def test_command_error_names_mismatched_ids(tmp_path, capsys):
    a = write_jsonl(tmp_path / "a.jsonl", [{"id": "x", "correct_mathverify": True, "correct_llm": None}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"id": "y", "correct_mathverify": True, "correct_llm": None}])
    assert main(["mcnemar", a, b]) == 2
    err = capsys.readouterr().err
    assert "only in A [x]" in err and "only in B [y]" in err


def test_command_error_on_bad_json_line(tmp_path, capsys):
    a = tmp_path / "a.jsonl"
    a.write_text('{"id": "x", "correct_llm": true}\n{"id": \n', encoding="utf-8")
    assert main(["mcnemar", str(a), str(a)]) == 2
    assert "a.jsonl:2: not JSON" in capsys.readouterr().err
