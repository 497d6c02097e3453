"""Where a plan's checkpoints live (a leaf: the planner's entry point needs it before torch is imported)."""

from __future__ import annotations

import os
from pathlib import Path


def runs_dir(store_url: str, plan_name: str) -> Path:
    """Where checkpoints live: beside a SQLite store, else under ./stores (or $RBRIDGE_RUNS).

    Workers on several machines need this folder on a shared filesystem (set
    $RBRIDGE_RUNS to its mount point) so that a run taken over resumes from its
    checkpoint; without it the new holder starts the run from scratch.
    """
    if os.environ.get("RBRIDGE_RUNS"):
        return Path(os.environ["RBRIDGE_RUNS"]) / plan_name
    if store_url.startswith("sqlite:///"):
        return Path(store_url[len("sqlite:///"):]).with_suffix(".runs")
    return Path("stores") / f"{plan_name}.runs"


def checkpoint_dir(store_url: str, plan_name: str, stage: str, candidate: str) -> Path:
    """The one folder a run's checkpoints go to."""
    return runs_dir(store_url, plan_name) / stage / candidate


def superseded_dir(store_url: str, plan_name: str, revision: int, stage: str, candidate: str) -> Path:
    """Where a run superseded by spec revision ``revision`` keeps its checkpoints.

    ``.superseded`` cannot clash with a stage: stage names start with a letter or digit.
    """
    return runs_dir(store_url, plan_name) / ".superseded" / f"r{revision}" / stage / candidate


def move_checkpoints(src: str | Path, dst: str | Path) -> bool:
    """Move a run's checkpoint folder (rename: same filesystem); False when there is none to move.

    Never overwrites: a folder already at ``dst`` stays, and ``src`` is left where it is.
    """
    src, dst = Path(src), Path(dst)
    if not src.is_dir() or dst.exists():
        return False
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(src, dst)
    except FileNotFoundError:  # another process moved it first
        return False
    return True
