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
