"""Disk a plan's runs take, and what a finished run no longer needs (torch-free: status and clean use it).

A run's folder (rbridge.planner.checkpoints.checkpoint_dir) holds, while it trains,
its newest full training checkpoints ``step_<n>/`` (weights, AdamW state: two thirds of
the bytes, RNG and data position: what resuming bit for bit needs; ``keep_checkpoints``
of them, spec field) and ``model/``, the proxy exported as a Hugging Face folder after
every rung (what ``rbridge score``, lm-eval and ``from_pretrained`` load).

Once a run is **done** nothing trains it again: a spec edit that changes its inputs
opens a new run (its fingerprint changes). Its full checkpoints are dropped at once,
``model/`` stays. A **pruned** run is needed again only if a ``--force`` edit (a larger
``keep``) promotes it: while its plan is unfinished it keeps its newest checkpoint, so
the promotion continues it from there; when the plan is done it is reduced to ``model/``
too, and a later promotion trains it again from its start (deterministic: the same
result, at the cost of its tokens again). ``finished_runs: checkpoint`` in the spec keeps
every finished run's newest checkpoint instead. Pending, running and failed runs are
never touched: ``rbridge resume`` continues them from their checkpoints. A superseded
run (a spec edit replaced it; its evaluations stay, and undoing the edit revives it)
is reduced like a live one of the same status.

``rbridge clean`` applies the same rule on demand, and also to plans that ran before
the rule existed.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from rbridge._du import folder_bytes, human_bytes  # noqa: F401 - re-exported: the planner's callers use them here

EXPORT_DIR = "model"  # as rbridge.planner.steps.EXPORT_DIR (that module imports torch)


def training_state(run_folder: str | Path) -> list[Path]:
    """The folders of ``run_folder`` that only continuing its training needs: full checkpoints
    (``step_<n>``) and half-written ones (``step_<n>.tmp``). Damaged checkpoints a resume set aside
    (``step_<n>.damaged``) are never removed: evidence to inspect, said when set aside (``damaged``)."""
    folder = Path(run_folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith("step_") and ".damaged" not in p.name)


def damaged(run_folder: str | Path) -> list[Path]:
    folder = Path(run_folder)
    return sorted(p for p in folder.iterdir() if p.is_dir() and ".damaged" in p.name) if folder.is_dir() else []


def has_model(run_folder: str | Path) -> bool:
    return (Path(run_folder) / EXPORT_DIR / "config.json").is_file()


def reduce_to_model(run_folder: str | Path, dry_run: bool = False) -> int:
    """Remove the run's training state, keeping ``model/``; the bytes freed (or that would be).

    Nothing is removed from a folder without an exported model: its checkpoint is then the
    only copy of the trained weights."""
    if not has_model(run_folder):
        return 0
    freed = 0
    for p in training_state(run_folder):
        freed += folder_bytes(p)
        if not dry_run:
            shutil.rmtree(p, ignore_errors=True)
    return freed


def reducible(status: str, plan_done: bool, finished_runs: str = "model") -> bool:
    """Whether a run of this status keeps only its model under the rule above."""
    if finished_runs != "model":
        return False
    return status == "done" or (status == "pruned" and plan_done)


@dataclass
class StageDisk:
    stage: str
    runs: int = 0
    before: int = 0
    freed: int = 0
    reduced: list[str] = field(default_factory=list)  # "<stage>/<candidate>" of the runs reduced
    damaged: list[Path] = field(default_factory=list)  # set-aside damaged checkpoints, left in place

    @property
    def after(self) -> int:
        return self.before - self.freed


def stage_bytes(runs_folder: str | Path) -> dict[str, int]:
    """{stage: bytes} of every stage folder under a plan's runs folder (``.superseded`` under its own
    name)."""
    root = Path(runs_folder)
    if not root.is_dir():
        return {}
    return {p.name: folder_bytes(p) for p in sorted(root.iterdir()) if p.is_dir()}




def trim_checkpoints(run_folder: str | Path, keep: int) -> int:
    """Keep the newest ``keep`` complete checkpoints of a run; the bytes freed. Damaged and half-written
    ones are left to ``reduce_to_model``."""
    folder = Path(run_folder)
    complete = sorted((int(p.name[5:]), p) for p in training_state(folder)
                      if p.name[5:].isdigit() and (p / "COMPLETE").is_file())
    freed = 0
    for _, p in complete[:-keep] if keep > 0 else complete:
        freed += folder_bytes(p)
        shutil.rmtree(p, ignore_errors=True)
    return freed


def clean_plan(store, plan, dry_run: bool = False) -> list[StageDisk]:
    """Apply the rule of this module to one plan of an open store, whatever its ``finished_runs`` (asking
    for it is the user's explicit choice); per stage (and ``superseded``), the
    bytes before and the bytes freed (or that would be, ``dry_run``). Pending, running and failed runs
    are not touched; neither is anything but ``step_*`` folders of runs that have an exported model."""
    from rbridge.planner.checkpoints import checkpoint_dir
    from rbridge.store import plans as plan_ops

    plan_done = plan.status == "done"
    names = {c.id: n for n, c in plan_ops.candidates(store, plan.id).items()}
    entries = [(run.stage, checkpoint_dir(store.url, plan.name, run.stage, names.get(run.candidate_id,
                                                                                      str(run.candidate_id))),
                run.status) for run in plan_ops.plan_runs(store, plan.id)]
    entries += [("superseded", Path(run.checkpoint), run.status)
                for run, _ in plan_ops.superseded(store, plan.id) if run.checkpoint]
    out: dict[str, StageDisk] = {}
    for stage, folder, status in entries:
        row = out.setdefault(stage, StageDisk(stage))
        row.runs += 1
        row.before += folder_bytes(folder)
        row.damaged += damaged(folder)
        if status not in ("done", "pruned"):
            continue
        if status == "done" or plan_done:
            freed = reduce_to_model(folder, dry_run=dry_run)
        elif dry_run:  # a pruned run of an unfinished plan: its newest checkpoint stays
            complete = [p for p in training_state(folder) if p.name[5:].isdigit() and (p / "COMPLETE").is_file()]
            freed = sum(folder_bytes(p) for p in sorted(complete, key=lambda p: int(p.name[5:]))[:-1])
        else:
            freed = trim_checkpoints(folder, 1)
        if freed:
            row.freed += freed
            row.reduced.append(f"{stage}/{folder.name}")
    return list(out.values())
