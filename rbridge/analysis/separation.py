"""Which neighbours in a ranking the scores separate, given each score's bootstrap interval.

Every score the planner records carries a 95% percentile-bootstrap interval over the
benchmark's traces (``BenchmarkScore.interval``: the traces resampled with replacement,
seed 0). Two candidates next to each other in a ranking are *not separated* when their
difference is within either one's interval half-width: resampling the benchmark's
traces could swap them, so the order is a tie, not a decision (the default plan's
second and third candidates in stage ``rank`` have swapped between runs that differed
only in float rounding).

Where the store has both candidates' per-trace values (``evaluation_items``, store schema
6), the rule is the paired bootstrap instead: both are scored on the same traces, so the
traces are resampled together and the 95% interval of the *difference* of the scores
decides (separated when it excludes 0). It separates more pairs than the unpaired rule,
rightly: a trace that is hard for one candidate is hard for the other. Older rows without
items keep the unpaired rule.

Pure Python at import (numpy only inside :func:`paired_separated`): `rbridge status` imports it.
"""

from __future__ import annotations

import json
from typing import Callable, Sequence

PAIRED_RESAMPLES = 1000


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


def paired_separated(a: Sequence[Sequence[float | None]], b: Sequence[Sequence[float | None]],
                     level: float = 0.95, resamples: int = PAIRED_RESAMPLES, seed: int = 0) -> bool | None:
    """Whether two candidates' scores differ beyond the paired bootstrap interval of their difference.

    ``a`` and ``b``: per benchmark, each candidate's per-trace values in the traces' order (None where a
    trace has none). A score is the mean over benchmarks of the mean over traces; one resample draws each
    benchmark's traces with replacement, the same draw for both. None when no benchmark has two traces
    valued for both.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    diffs = []
    for xa, xb in zip(a, b):
        if len(xa) != len(xb):
            return None
        d = np.array([p - q for p, q in zip(xa, xb) if p is not None and q is not None], dtype=float)
        if len(d) < 2:
            return None
        draws = rng.integers(0, len(d), size=(resamples, len(d)))
        diffs.append(d[draws].mean(axis=1))
    if not diffs:
        return None
    lo, hi = np.quantile(np.mean(diffs, axis=0), [(1 - level) / 2, (1 + level) / 2])
    return not (lo <= 0.0 <= hi)


def mark_neighbours(rows: Sequence[dict], value: str = "value", low: str = "ci_low", high: str = "ci_high",
                    key: str = "separated_from_next", items: Callable[[dict], list | None] | None = None) -> None:
    """Set ``row[key]`` on rows in ranking order: whether each is separated from the next (None for the
    last row, a row without a score, or scores without intervals). With ``items`` (a row's per-benchmark
    per-trace values, or None), neighbours that both have them are judged by :func:`paired_separated`."""
    for i, row in enumerate(rows):
        nxt = rows[i + 1] if i + 1 < len(rows) else None
        if nxt is None or row.get(value) is None or nxt.get(value) is None:
            row[key] = None
            continue
        ia, ib = (items(row), items(nxt)) if items is not None else (None, None)
        paired = paired_separated(ia, ib) if ia and ib and len(ia) == len(ib) else None
        row[key] = paired if paired is not None else separated(
            row[value], (row.get(low), row.get(high)), nxt[value], (nxt.get(low), nxt.get(high)))
        row[key + "_paired"] = paired is not None


def mark_ties(rows: Sequence[dict], group: Callable[[dict], object], value: str = "value",
              items: Callable[[dict], list | None] | None = None) -> None:
    """``mark_neighbours`` within each group of rows (in their order), e.g. one benchmark at one token
    count: a candidate stopped at an earlier rung is no neighbour of one trained further."""
    groups: dict[object, list[dict]] = {}
    for row in rows:
        groups.setdefault(group(row), []).append(row)
    for members in groups.values():
        mark_neighbours(members, value=value, items=items)


_STAGE_ITEMS = """
SELECT c.name, e.benchmark, e.rung, i.item_values
FROM evaluations e
JOIN evaluation_items i ON i.evaluation_id = e.id
JOIN runs r ON r.id = e.run_id
JOIN candidates c ON c.id = r.candidate_id
WHERE r.plan_id = :p AND r.stage = :stage AND r.superseded_by = 0 AND e.metric = :metric
ORDER BY e.id
"""


def stage_items(rows_fn, plan_id: int, stage: str, metric: str) -> dict[tuple[str, int], dict[str, list]]:
    """{(candidate, rung): {benchmark: per-trace values}} of one stage's ``metric`` (``rows_fn``: a store's
    ``rows``, or the function ``Store.reading`` yields). Empty for a store without per-trace values."""
    from rbridge.store.sqlite_read import database_errors

    try:
        found = rows_fn(_STAGE_ITEMS, p=plan_id, stage=stage, metric=metric)
    except database_errors():  # a store of schema < 6 (no evaluation_items): the unpaired rule
        return {}
    out: dict[tuple[str, int], dict[str, list]] = {}
    for cand, bench, rung, text in found:
        out.setdefault((cand, rung), {})[bench] = json.loads(text)
    return out
