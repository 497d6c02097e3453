"""The store: SQLite by default, any SQLAlchemy URL (PostgreSQL) when shared.

The names below load their module on first use (PEP 562): ``from rbridge.store import
Plan`` works as ever, while a command that only reads a SQLite file
(rbridge.store.sqlite_read) never imports SQLAlchemy or SQLModel. Opening a store
(rbridge.store.db) registers every table.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_WHERE = {
    "Store": "rbridge.store.db", "open_store": "rbridge.store.db", "store_url": "rbridge.store.db",
    "latest_store": "rbridge.store.sqlite_read",
    "Plan": "rbridge.store.models", "Candidate": "rbridge.store.models", "Run": "rbridge.store.models",
    "Evaluation": "rbridge.store.models", "Decision": "rbridge.store.models", "Meta": "rbridge.store.models",
    "Result": "rbridge.store.results", "ResultChange": "rbridge.store.results", "Fit": "rbridge.store.results",
}

__all__ = ["Store", "open_store", "store_url", "latest_store",
           "Plan", "Candidate", "Run", "Evaluation", "Decision", "Meta",
           "Result", "ResultChange", "Fit"]

if TYPE_CHECKING:  # for type checkers and editors; at run time __getattr__ below loads them
    from rbridge.store.db import Store, open_store, store_url
    from rbridge.store.models import Candidate, Decision, Evaluation, Meta, Plan, Run
    from rbridge.store.results import Fit, Result, ResultChange
    from rbridge.store.sqlite_read import latest_store


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        if _WHERE[name] != "rbridge.store.sqlite_read":
            importlib.import_module("rbridge.store.db")  # every table registered with any of them
        value = getattr(importlib.import_module(_WHERE[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'rbridge.store' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
