"""The Optuna studies a plan keeps in its store: their names, and the facts recorded on them.

Each proxy stage is a study (rbridge.planner.mirror writes it); its name is ``plan:stage``, or
``plan:stage@r<revision>`` for a stage decided afresh after an accepted spec edit.
"""

from __future__ import annotations


def study_name(plan: str, stage: str, revision: int = 0) -> str:
    return f"{plan}:{stage}" + (f"@r{revision}" if revision else "")


def study_attrs(store_url: str, plan: str, stage: str, revision: int = 0) -> dict:
    """The user attributes recorded on a stage's study ({} where there is no such study)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(store_url)
    try:
        return dict(optuna.load_study(study_name=study_name(plan, stage, revision), storage=storage).user_attrs)
    except KeyError:
        return {}
    finally:
        storage.remove_session()
        storage.engine.dispose()
