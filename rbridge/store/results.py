"""Imported results, their change log, and stored curve fits (issue 5).

``results`` holds what was measured elsewhere: target-scale results
(``kind='target'``, ``stage='target'``) from ``rbridge targets import`` and proxy
results (``kind='proxy'``, a stage name) from ``rbridge results import``. One row
per (plan, stage, candidate, benchmark, metric, tokens); its value is the mean over
the seeds in the file (``seed`` NULL, ``n_seeds`` and ``seeds`` say which) or the
one seed chosen with ``--seed`` (``seed`` set). Candidates are names, not foreign
keys: targets may name candidates the planner never trained (zero-shot transfer),
and the planner's own ``candidates`` table stays the spec's.

``result_changes`` records every value a re-import changed (old and new).
``fits`` holds ``rbridge fit``'s curves target = g(proxy metric).

The views built on these (``proxy_values``, ``target_values``,
``decision_accuracy``) live in :mod:`rbridge.store.db`'s ``VIEWS``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Optional

from sqlalchemy import Index
from sqlmodel import Field, SQLModel

from rbridge.store.models import BIG, utcnow

TARGET_STAGE = "target"


class Result(SQLModel, table=True):
    __tablename__ = "results"
    __table_args__ = (Index("ix_results_key", "plan_id", "kind", "stage", "candidate", "benchmark", "metric"),)
    id: Optional[int] = Field(default=None, primary_key=True)
    plan_id: int = Field(foreign_key="plans.id", index=True)
    kind: str  # target | proxy
    stage: str  # 'target' for targets, the stage name for proxy results
    candidate: str
    benchmark: str
    metric: str
    value: float
    higher_is_better: bool = False
    params: Optional[int] = Field(default=None, sa_type=BIG)  # parameters of the model measured (non-embedding for proxies, if known)
    tokens: Optional[int] = Field(default=None, sa_type=BIG)  # training tokens of the model measured (part of the key: checkpoints)
    seed: Optional[int] = None  # the seed chosen with --seed; NULL when the value is a mean over seeds
    n_seeds: int = 1
    seeds: str = ""  # the seeds averaged, comma-separated ('' when the file had no seed column)
    source: str = ""  # the file imported (absolute path)
    source_line: int = 0  # first line of the row(s) in that file
    imported_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class ResultChange(SQLModel, table=True):
    """One field of one imported result changed by a re-import."""

    __tablename__ = "result_changes"
    id: Optional[int] = Field(default=None, primary_key=True)
    result_id: int = Field(foreign_key="results.id", index=True)
    plan_id: int = Field(foreign_key="plans.id", index=True)
    kind: str
    stage: str
    candidate: str
    benchmark: str
    metric: str
    tokens: Optional[int] = Field(default=None, sa_type=BIG)
    field: str  # value | higher_is_better | params | n_seeds | seed
    old_value: Optional[float] = None
    new_value: Optional[float] = None
    source: str = ""
    changed_at: datetime = Field(default_factory=utcnow)


class Fit(SQLModel, table=True):
    """target metric = g(proxy metric) for one benchmark, chosen and cross-validated by ``rbridge fit``."""

    __tablename__ = "fits"
    id: Optional[int] = Field(default=None, primary_key=True)
    plan_id: int = Field(foreign_key="plans.id", index=True)
    benchmark: str
    stage: str  # the stage whose proxy values are the x-axis
    x_metric: str
    x_higher_is_better: bool = False
    target_metric: str
    target_higher_is_better: bool = True
    family: str  # linear | quadratic | exponential | logarithmic
    formula: str  # e.g. 'a*x + b'
    params: str  # JSON: g's parameters by name
    n_points: int
    train_r2: float  # R^2 of g fitted on all points
    cv_train_r2: Optional[float] = None  # mean over folds of the training R^2
    cv_test_mae: Optional[float] = None  # mean over folds of the test MAE (target units)
    cv_residuals: str = "[]"  # JSON: out-of-fold residuals y - g(x) (prediction intervals)
    families: str = "{}"  # JSON: train R^2 of every family tried
    folds: int = 5
    seed: int = 0
    created_at: datetime = Field(default_factory=utcnow)


__all__ = ["Result", "ResultChange", "Fit", "TARGET_STAGE"]
