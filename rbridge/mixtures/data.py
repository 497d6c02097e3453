"""A stage's (mixture, score) table from a store: the ``proxy_values`` view (the planner's last evaluation of
each run, or imported proxy results) joined with each candidate's mixture (``candidates.mix``)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from rbridge.errors import InputError
from rbridge.mixtures.weights import as_matrix, source_order


@dataclass
class Table:
    plan: str
    stage: str
    benchmark: str
    metric: str
    higher_is_better: bool
    candidates: list[str]
    mixtures: list[dict[str, float]]
    values: np.ndarray          # as stored
    sources: list[str]
    rung: int = 0               # a planner stage's rung the scores are from (0: imported results)

    @property
    def x(self) -> np.ndarray:
        return as_matrix(self.mixtures, self.sources)

    @property
    def loss(self) -> np.ndarray:
        """The values in the loss direction (lower is better), what surrogates model."""
        return -self.values if self.higher_is_better else self.values


def _one(options: list[str], what: str, flag: str, given: str | None) -> str:
    if given is not None:
        if given not in options:
            raise InputError(f"no {what} {given!r} with mixtures here (there: {', '.join(options) or 'none'})",
                             field=flag)
        return given
    if len(options) != 1:
        raise InputError(f"{len(options)} {what}s with mixtures here ({', '.join(options) or 'none'}): pass {flag}",
                         field=flag)
    return options[0]


def load_table(store, plan: str | None, stage: str | None, benchmark: str | None, metric: str | None) -> Table:
    """The table for the stage, benchmark and metric named (each may be left out where the store has one).

    A planner's stage prunes: survivors are scored again after more tokens, pruned candidates are not. The
    table takes every candidate's score at the last rung all of them reached (the first rung, under
    successive halving), so that every mixture is judged after the same tokens and none is favoured for
    having trained longer; ``Table.rung`` says which. Imported results have one score per candidate."""
    planner = store.rows(
        "SELECT p.name, r.stage, c.name, e.benchmark, e.metric, e.value, e.higher_is_better, c.mix, e.rung "
        "FROM evaluations e JOIN runs r ON r.id = e.run_id JOIN candidates c ON c.id = r.candidate_id "
        "JOIN plans p ON p.id = r.plan_id "
        "WHERE r.superseded_by = 0 AND r.role <> 'target' AND c.superseded_by = 0 "
        "AND c.mix IS NOT NULL AND c.mix <> '' AND c.mix <> '{}'")
    imported = store.rows(
        "SELECT v.plan, v.stage, v.candidate, v.benchmark, v.metric, v.value, v.higher_is_better, c.mix, 0 "
        "FROM proxy_values v JOIN plans p ON p.name = v.plan "
        "JOIN candidates c ON c.plan_id = p.id AND c.name = v.candidate AND c.superseded_by = 0 "
        "WHERE v.source = 'imported' AND c.mix IS NOT NULL AND c.mix <> '' AND c.mix <> '{}'")
    rows = planner + imported
    if not rows:
        raise InputError("no scores of candidates with mixtures in this store (import them with `rbridge results "
                         "import FILE --stage X --mixtures MIXTURES.csv`, or run a plan)", field="--store")
    plan = _one(sorted({r[0] for r in rows}), "plan", "--plan", plan)
    rows = [r for r in rows if r[0] == plan]
    stage = _one(sorted({r[1] for r in rows}), "stage", "--stage", stage)
    rows = [r for r in rows if r[1] == stage]
    benchmark = _one(sorted({r[3] for r in rows}), "benchmark", "--benchmark", benchmark)
    rows = [r for r in rows if r[3] == benchmark]
    names = sorted({r[4] for r in rows})
    metric = _one(names, "metric", "--metric", metric if metric is not None or "rbridge" not in names else "rbridge")
    rows = [r for r in rows if r[4] == metric]
    rung = 0
    if any(r[8] for r in rows):  # a planner stage: every candidate at the last rung all of them reached
        reached: dict[str, int] = {}
        for r in rows:
            reached[r[2]] = max(reached.get(r[2], 0), r[8])
        rung = min(reached.values())
        rows = [r for r in rows if r[8] == rung]
    rows = sorted(rows, key=lambda r: r[2])
    mixtures = [json.loads(r[7]) for r in rows]
    return Table(plan, stage, benchmark, metric, bool(rows[0][6]), [r[2] for r in rows], mixtures,
                 np.array([float(r[5]) for r in rows]), source_order(mixtures), rung)
