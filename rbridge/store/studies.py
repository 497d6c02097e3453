"""The Optuna studies a plan keeps in its store: their names, and the facts recorded on them.

Each proxy stage is a study (rbridge.planner.mirror writes it); its name is ``plan:stage``, or
``plan:stage@r<revision>`` for a stage decided afresh after an accepted spec edit.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

_storages: dict = {}
_storages_lock = threading.Lock()


@contextmanager
def optuna_storage(store_url: str) -> Iterator:
    """Optuna's storage on a store, made once per process and URL, its connections closed after the block.

    Making an ``RDBStorage`` checks the tables and the schema version every time (75 ms on a small SQLite
    store; 5 ms to use one already made), and a plan touches its studies at every ask, rung and tell, so
    the storage is kept; its connections are not: each block ends with the pool emptied (the engine reconnects
    when next used), so none is left to the garbage collector and a process's last connection to close
    checkpoints the store's WAL (rbridge's CLI skips the collections at exit: rbridge.commands._base)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with _storages_lock:
        storage = _storages.get(store_url)
        if storage is None or not _has_optuna_tables(storage):
            storage = _storages[store_url] = optuna.storages.RDBStorage(store_url)
    try:
        yield storage
    finally:
        storage.remove_session()
        storage.engine.dispose()


def _has_optuna_tables(storage) -> bool:
    """Whether the database behind a kept storage still has Optuna's tables (one query, about a millisecond):
    a store deleted and made again at the same URL (a user's fresh start, a test's folder) is another
    database, which the storage made for the old one never prepared."""
    import sqlalchemy

    try:
        with storage.engine.connect() as con:
            con.execute(sqlalchemy.text("SELECT 1 FROM version_info LIMIT 1"))
        return True
    except sqlalchemy.exc.SQLAlchemyError:
        return False


def study_name(plan: str, stage: str, revision: int = 0) -> str:
    return f"{plan}:{stage}" + (f"@r{revision}" if revision else "")


def study_attrs(store_url: str, plan: str, stage: str, revision: int = 0) -> dict:
    """The user attributes recorded on a stage's study ({} where there is no such study)."""
    import optuna

    with optuna_storage(store_url) as storage:
        try:
            return dict(optuna.load_study(study_name=study_name(plan, stage, revision), storage=storage).user_attrs)
        except KeyError:
            return {}
