"""Bootstrap intervals of scores and which neighbours in a ranking they separate (issue 15, item 4)."""

from __future__ import annotations

import pytest

from rbridge.analysis.separation import mark_neighbours, separated
from rbridge.scoring.scorer import BenchmarkScore, TraceScore


def _bench(values):
    traces = [TraceScore(id=str(i), n_tokens=1, n_bytes=1, nll=v, rbridge=v, rbridge_no_minmax=v, bpb=v, sum_nll=v)
              for i, v in enumerate(values)]
    mean = sum(values) / len(values)
    return BenchmarkScore(benchmark="b", rbridge=mean, nll=mean, rbridge_no_minmax=mean, bpb=mean,
                          n_traces=len(values), n_tokens=len(values), context="question", minmax="trace",
                          aggregate="mean", traces=traces)


def test_interval_is_reproducible_from_the_seed_and_brackets_the_mean():
    b = _bench([1.0, 2.0, 4.0, 3.5, 0.5, 2.5, 3.0, 1.5])
    lo, hi = b.interval("rbridge")
    assert lo < b.rbridge < hi and b.interval("rbridge") == (lo, hi) and b.interval("bpb") == (lo, hi)
    assert b.interval("rbridge", seed=1) != (lo, hi)
    assert b.interval("rbridge", level=0.5)[1] - b.interval("rbridge", level=0.5)[0] < hi - lo
    assert _bench([2.0]).interval("rbridge") is None  # one trace: no interval


def test_neighbours_within_an_interval_are_a_tie():
    assert separated(3.70, (3.60, 3.80), 3.75, (3.66, 3.84)) is False    # 0.05 apart, half-widths 0.10
    assert separated(3.50, (3.45, 3.55), 3.70, (3.66, 3.74)) is True     # 0.20 apart
    assert separated(3.50, (None, None), 3.70, (None, None)) is None     # no intervals: unknown
    rows = [{"value": 3.5, "ci_low": 3.45, "ci_high": 3.55}, {"value": 3.7, "ci_low": 3.6, "ci_high": 3.8},
            {"value": 3.72, "ci_low": 3.62, "ci_high": 3.82}, {"value": None}]
    mark_neighbours(rows)
    assert [r["separated_from_next"] for r in rows] == [True, False, None, None]


def test_a_bad_level_is_refused():
    with pytest.raises(ValueError):
        _bench([1.0, 2.0, 3.0]).interval("rbridge", level=1.5)


def test_paired_rule_separates_a_consistent_small_difference_the_unpaired_rule_calls_a_tie():
    import numpy as np

    from rbridge.analysis.separation import mark_neighbours, paired_separated

    rng = np.random.default_rng(5)
    hard = rng.normal(3.0, 1.0, 200)                    # how hard each trace is: shared by both candidates
    a = list(hard + rng.normal(0.0, 0.05, 200))
    b = list(hard + 0.05 + rng.normal(0.0, 0.05, 200))  # 0.05 worse on every trace, give or take
    assert paired_separated([a], [b]) is True
    assert paired_separated([a], [a]) is False
    assert paired_separated([a, a], [b, a]) is True       # averaged over two benchmarks: still apart
    assert paired_separated([[1.0]], [[2.0]]) is None     # one trace: no interval
    assert paired_separated([a[:5] + [None]], [b[:5] + [None]]) in (True, False)  # None items are skipped

    def row(name, items):
        m = float(np.mean(items))
        half = float(1.96 * np.std(items) / np.sqrt(len(items)))
        return {"name": name, "value": m, "ci_low": m - half, "ci_high": m + half, "items": [items]}

    rows = [row("a", a), row("b", b)]
    mark_neighbours(rows)
    assert rows[0]["separated_from_next"] is False                  # unpaired: within the wide intervals
    mark_neighbours(rows, items=lambda r: r["items"])
    assert rows[0]["separated_from_next"] is True and rows[0]["separated_from_next_paired"] is True
    assert paired_separated([a], [b]) == paired_separated([a], [b])  # seeded: reproducible
