"""McNemar's test between two evaluations of the same items: pairing by id, the 2x2 table and the
exact two-sided binomial p-value, the form that reproduces the reference's published results
(docs/method.md §6: (2,10) -> 0.0386, (2,4) -> 0.6875, (1,5) -> 0.2188; chi-square with continuity correction
gives 0.6831 for (2,4) and does not).

    rows of A ─┐                     B yes   B no
               ├─ pair(id) ─> A yes [  a   |  b  ]   b, c: discordant pairs
    rows of B ─┘              A no  [  c   |  d  ]   p = min(1, 2 * sum_{i<=min(b,c)} C(b+c, i) / 2^(b+c))
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable

MAX_LISTED_IDS = 10
"""Error messages name at most this many offending ids."""


@dataclass(frozen=True, slots=True)
class Table:
    """The paired 2x2 table of one boolean field (True = correct, or perception-correct)."""

    both: int
    """a: True in A and in B."""
    only_a: int
    """b: True in A, False in B (discordant)."""
    only_b: int
    """c: False in A, True in B (discordant)."""
    neither: int
    """d: False in both."""
    num_excluded: int = 0
    """Pairs left out because either row has no value (null) for the field."""

    @property
    def num_pairs(self) -> int:
        return self.both + self.only_a + self.only_b + self.neither

    @property
    def p_value(self) -> float:
        return exact_p_value(self.only_a, self.only_b)


def exact_p_value(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value from the discordant counts:
    p = min(1, 2 * sum_{i=0}^{min(b,c)} C(b+c, i) / 2^(b+c)); 1.0 when there is no discordant pair."""
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
    n = b + c
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2**n)


def pair(a_rows: Iterable[dict[str, Any]], b_rows: Iterable[dict[str, Any]], field: str) -> list[tuple[Any, Any]]:
    """(value in A, value in B) of `field` for every id, in A's order.

    Raises ValueError naming the ids when either side repeats an id or the two id sets differ
    (McNemar needs the same items on both sides), or when a row lacks `id` or `field`.
    """
    a_by_id = _by_id(list(a_rows), "A", field)
    b_by_id = _by_id(list(b_rows), "B", field)
    only_a = [i for i in a_by_id if i not in b_by_id]
    only_b = [i for i in b_by_id if i not in a_by_id]
    if only_a or only_b:
        raise ValueError(
            f"the two files cover different items: {len(only_a)} ids only in A {_listed(only_a)}, "
            f"{len(only_b)} ids only in B {_listed(only_b)}; evaluate both models on the same benchmark files")
    return [(a_by_id[i], b_by_id[i]) for i in a_by_id]


def _by_id(rows: list[dict[str, Any]], side: str, field: str) -> dict[str, Any]:
    for n, row in enumerate(rows, start=1):
        if "id" not in row or field not in row:
            missing = "id" if "id" not in row else field
            raise ValueError(f"{side}: row {n} has no {missing!r} field; pass evaluation JSONL written by `perception-r1 eval`")
    counts = Counter(row["id"] for row in rows)
    repeated = [i for i, k in counts.items() if k > 1]
    if repeated:
        raise ValueError(f"{side}: {len(repeated)} ids appear more than once {_listed(repeated)}; "
                         "keep one row per item (a file mixing two runs?)")
    return {row["id"]: row[field] for row in rows}


def _listed(ids: list[Any]) -> str:
    shown = ", ".join(map(str, ids[:MAX_LISTED_IDS]))
    return f"[{shown}{', ...' if len(ids) > MAX_LISTED_IDS else ''}]"


def table(pairs: Iterable[tuple[Any, Any]]) -> Table:
    """Count the pairs into the 2x2 table; pairs with a None on either side are counted as excluded."""
    counts: Counter[tuple[bool, bool]] = Counter()
    excluded = 0
    for a, b in pairs:
        if a is None or b is None:
            excluded += 1
            continue
        if not isinstance(a, bool) or not isinstance(b, bool):
            raise ValueError(f"McNemar needs true/false values, got {a!r} and {b!r}; pick a boolean field")
        counts[(a, b)] += 1
    return Table(both=counts[(True, True)], only_a=counts[(True, False)], only_b=counts[(False, True)],
                 neither=counts[(False, False)], num_excluded=excluded)


def format_table(t: Table, *, field: str, names: tuple[str, str] = ("A", "B")) -> str:
    """The 2x2 table, the discordant counts and the p-value, as printed by `perception-r1 mcnemar`."""
    a, b = names
    width = max(len(a), 6) + 6
    lines = [
        f"McNemar's test on {field!r}: {t.num_pairs} paired items"
        + (f" ({t.num_excluded} excluded: no value)" if t.num_excluded else ""),
        f"{'':<{width}}{b + ' yes':>14}{b + ' no':>14}",
        f"{a + ' yes':<{width}}{t.both:>14}{t.only_a:>14}",
        f"{a + ' no':<{width}}{t.only_b:>14}{t.neither:>14}",
        f"discordant: b = {t.only_a} ({a} yes, {b} no), c = {t.only_b} ({a} no, {b} yes)",
        f"exact two-sided binomial p = {t.p_value:.4f}",
    ]
    return "\n".join(lines)
