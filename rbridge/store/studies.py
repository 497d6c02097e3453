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
    key = _identity(store_url)
    with _storages_lock:
        storage = _storages.get(key)
        if storage is None:
            storage = _storages[key] = optuna.storages.RDBStorage(store_url)
    try:
        yield storage
    finally:
        storage.remove_session()
        storage.engine.dispose()


def _identity(store_url: str) -> tuple:
    """The URL, and for a SQLite file its inode: a store deleted and made again at the same path (a test's
    folder, a user's fresh start) is a new database whose tables a kept storage would not have checked."""
    import os

    if store_url.startswith("sqlite:///"):
        try:
            st = os.stat(store_url[len("sqlite:///"):].split("?", 1)[0])
            return store_url, st.st_dev, st.st_ino
        except OSError:
            return store_url, None
    return (store_url,)


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
