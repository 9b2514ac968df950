"""`perception-r1 mcnemar A.jsonl B.jsonl [--field correct|perception]`: the exact McNemar test
between two evaluation results files (`perception-r1 eval`'s results.jsonl), paired by item id.

`--field correct` uses `correct_llm` (the reference's LLM judgement) when every row of both files
has one, else `correct_mathverify`; `correct_llm` and `correct_mathverify` pick one explicitly.
`--field perception` compares the perception labels; items without one (no annotations) are
excluded and counted. `--benchmark NAME` restricts both files to one benchmark first.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

FIELDS = ("correct", "perception", "correct_llm", "correct_mathverify")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("a", help="results.jsonl of model A")
    parser.add_argument("b", help="results.jsonl of model B")
    parser.add_argument("--field", choices=FIELDS, default="correct",
                        help="correct: correct_llm where both files have it, else correct_mathverify")
    parser.add_argument("--benchmark", help="only rows of this benchmark (e.g. mathvista)")


def run(args: argparse.Namespace) -> int:
    from evaluation.mcnemar import format_table, pair, table

    a_rows = _filtered(read_rows(Path(args.a)), args.benchmark, args.a)
    b_rows = _filtered(read_rows(Path(args.b)), args.benchmark, args.b)
    field = resolve_field(args.field, a_rows, b_rows)
    result = table(pair(a_rows, b_rows, field))
    print(f"A = {args.a}\nB = {args.b}")
    print(format_table(result, field=field))
    return 0


def read_rows(path: Path) -> list[dict]:
    """The JSON objects of a JSONL file; ValueError naming the file and line when one is not JSON."""
    if not path.is_file():
        raise ValueError(f"{path} does not exist; pass the results.jsonl written by `perception-r1 eval`")
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not JSON ({e.msg}); fix or delete the line") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object per line")
            rows.append(row)
    return rows


def _filtered(rows: list[dict], benchmark: str | None, source: str) -> list[dict]:
    if benchmark is None:
        return rows
    kept = [r for r in rows if r.get("benchmark") == benchmark]
    if not kept:
        names = sorted({str(r.get("benchmark")) for r in rows})
        raise ValueError(f"{source} has no rows of benchmark {benchmark!r} (it has {names})")
    return kept


def resolve_field(field: str, a_rows: list[dict], b_rows: list[dict]) -> str:
    """The column `--field` means: `correct` is `correct_llm` if present in every row, else `correct_mathverify`."""
    if field != "correct":
        return field
    rows = a_rows + b_rows
    return "correct_llm" if rows and all(r.get("correct_llm") is not None for r in rows) else "correct_mathverify"
