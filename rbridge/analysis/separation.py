"""Which neighbours in a ranking the scores separate, given each score's bootstrap interval.

Every score the planner records carries a 95% percentile-bootstrap interval over the
benchmark's traces (``BenchmarkScore.interval``: the traces resampled with replacement,
seed 0). Two candidates next to each other in a ranking are *not separated* when their
difference is within either one's interval half-width: resampling the benchmark's
traces could swap them, so the order is a tie, not a decision (the default plan's
second and third candidates in stage ``rank`` have swapped between runs that differed
only in float rounding). This is deliberately conservative: the candidates are scored on
the same traces, and a paired bootstrap of their difference would separate more pairs.

Pure Python (no numpy): `rbridge status` imports it.
"""

from __future__ import annotations

from typing import Callable, Sequence


def half_width(low: float | None, high: float | None) -> float | None:
    if low is None or high is None:
        return None
    return (high - low) / 2.0


def separated(a: float, a_ci: tuple[float | None, float | None], b: float,
              b_ci: tuple[float | None, float | None]) -> bool | None:
    """Whether scores ``a`` and ``b`` are further apart than either interval's half-width; None when
    neither has an interval."""
    widths = [w for w in (half_width(*a_ci), half_width(*b_ci)) if w is not None]
    if not widths:
        return None
    return abs(a - b) > max(widths)


def mark_neighbours(rows: Sequence[dict], value: str = "value", low: str = "ci_low", high: str = "ci_high",
                    key: str = "separated_from_next") -> None:
    """Set ``row[key]`` on rows in ranking order: whether each is separated from the next (None for the
    last row, a row without a score, or scores without intervals)."""
    for i, row in enumerate(rows):
        nxt = rows[i + 1] if i + 1 < len(rows) else None
        if nxt is None or row.get(value) is None or nxt.get(value) is None:
            row[key] = None
            continue
        row[key] = separated(row[value], (row.get(low), row.get(high)), nxt[value], (nxt.get(low), nxt.get(high)))


def mark_ties(rows: Sequence[dict], group: Callable[[dict], object], value: str = "value") -> None:
    """``mark_neighbours`` within each group of rows (in their order), e.g. one benchmark at one token
    count: a candidate stopped at an earlier rung is no neighbour of one trained further."""
    groups: dict[object, list[dict]] = {}
    for row in rows:
        groups.setdefault(group(row), []).append(row)
    for members in groups.values():
        mark_neighbours(members, value=value)
