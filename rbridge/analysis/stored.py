"""Stored fits as JSON-ready dicts, read with plain SQL.

Its own module, apart from rbridge.analysis.fit (numpy, SQLModel), so that
``rbridge accuracy`` and ``rbridge status --json`` read the fits of a SQLite store
through rbridge.store.sqlite_read without importing either.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from rbridge.store.sqlite_read import database_errors

if TYPE_CHECKING:
    from rbridge.store.db import Store
    from rbridge.store.sqlite_read import SQLiteReader

_FIT_SQL = """
SELECT p.name AS plan, f.benchmark AS benchmark, f.stage AS stage, f.x_metric AS x_metric,
       f.target_metric AS target_metric, f.family AS family, f.formula AS formula, f.params AS params,
       f.n_points AS n_points, f.train_r2 AS train_r2, f.cv_train_r2 AS cv_train_r2,
       f.cv_test_mae AS cv_test_mae, f.folds AS folds, f.seed AS seed,
       f.x_higher_is_better AS x_higher_is_better, f.target_higher_is_better AS target_higher_is_better,
       f.cv_residuals AS cv_residuals
FROM fits f JOIN plans p ON p.id = f.plan_id
"""


def stored_fits(store: Store | SQLiteReader, plan: str | None = None) -> list[dict[str, Any]]:
    """The fits in the store, JSON-ready (empty for a store without fits)."""
    where, params = ("WHERE p.name = :plan ", {"plan": plan}) if plan else ("", {})
    try:
        rows = store.query(_FIT_SQL + where + "ORDER BY f.benchmark, f.stage, f.x_metric, f.target_metric, f.id",
                           **params)
    except database_errors():  # a store that predates the fits table
        return []
    for r in rows:
        r["params"] = json.loads(r["params"])
        r["cv_residuals"] = json.loads(r["cv_residuals"])
        r["x_higher_is_better"] = bool(r["x_higher_is_better"])
        r["target_higher_is_better"] = bool(r["target_higher_is_better"])
    return rows


__all__ = ["stored_fits"]
