"""Named operations on plans, candidates, a stage's runs and rung decisions.

The planner decides; these functions read and write the rows, each write one
transaction. Where several workers may race (opening a stage, deciding a rung),
a unique index lets the first transaction land and the function reports that
another process won, so callers never need to look at SQL or driver errors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from sqlalchemy import update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, delete, select

from rbridge._failpoints import failpoint
from rbridge.store.db import Store
from rbridge.store.models import Candidate, Decision, Evaluation, Plan, Run, utcnow

# ---------------------------------------------------------------------------- plans


def find_plan(store: Store, name: str) -> Plan | None:
    with store.session() as s:
        return s.exec(select(Plan).where(Plan.name == name)).first()


def get_plan(store: Store, plan_id: int) -> Plan:
    with store.session() as s:
        return s.get(Plan, plan_id)


def list_plans(store: Store, name: str | None = None) -> list[Plan]:
    """Plans a worker can serve (rows made by ``targets import`` alone have no spec), oldest first."""
    with store.session() as s:
        q = select(Plan).where(Plan.spec_hash != "")
        if name:
            q = q.where(Plan.name == name)
        return list(s.exec(q.order_by(Plan.id)).all())


def all_plans(store: Store) -> list[Plan]:
    with store.session() as s:
        return list(s.exec(select(Plan)).all())


def _add_candidates(s: Session, plan_id: int, candidates: list[tuple[str, dict]], have: set[str] = frozenset()
                    ) -> None:
    """The one place candidates are inserted: (name, mixture) in spec order, skipping names in ``have``."""
    for position, (name, mix) in enumerate(candidates):
        if name not in have:
            s.add(Candidate(plan_id=plan_id, name=name, mix=json.dumps(mix, sort_keys=True), position=position))


def create_plan(store: Store, *, name: str, spec_text: str, spec_hash: str, spec_path: str, seed: int,
                candidates: list[tuple[str, dict]]) -> Plan:
    """A new plan row with its candidates, in one transaction."""
    with store.session() as s:
        plan = Plan(name=name, spec_text=spec_text, spec_hash=spec_hash, spec_path=spec_path, seed=seed)
        s.add(plan)
        s.flush()
        _add_candidates(s, plan.id, candidates)
        failpoint("plan-row")
        return plan


def adopt_plan(store: Store, plan_id: int, *, spec_text: str, spec_hash: str, spec_path: str,
               candidates: list[tuple[str, dict]]) -> None:
    """A plan made by ``targets import`` (no spec) is now run by a spec: store it, add missing candidates."""
    with store.session() as s:
        row = s.get(Plan, plan_id)
        row.spec_text, row.spec_hash, row.status, row.spec_path = spec_text, spec_hash, "running", spec_path
        have = {c.name for c in s.exec(select(Candidate).where(Candidate.plan_id == plan_id)).all()}
        _add_candidates(s, plan_id, candidates, have)


def mark_plan_done(store: Store, plan_id: int) -> bool:
    """Set the plan done; False when it already was."""
    with store.session() as s:
        res = s.execute(update(Plan).where(Plan.id == plan_id, Plan.status != "done")
                        .values(status="done", updated_at=utcnow()))
    return res.rowcount == 1


def set_plan_compute(store: Store, plan_id: int, compute: dict) -> None:
    with store.session() as s:
        row = s.get(Plan, plan_id)
        row.compute = json.dumps(compute)
        row.updated_at = utcnow()


def candidates(store: Store, plan_id: int) -> dict[str, Candidate]:
    with store.session() as s:
        return {c.name: c for c in s.exec(select(Candidate).where(Candidate.plan_id == plan_id)).all()}


def evaluated_rungs(store: Store, plan_id: int) -> int:
    """How many (run, rung) steps of the plan have evaluations."""
    with store.session() as s:
        return len(s.exec(select(Evaluation.run_id, Evaluation.rung).distinct()
                          .join(Run, Run.id == Evaluation.run_id).where(Run.plan_id == plan_id)).all())


def ranking(store: Store, plan_name: str) -> list[dict]:
    """The ``ranking`` view's rows of a plan, stage by stage."""
    return store.query(
        "SELECT stage, candidate, benchmark, metric, value, rank, tokens_seen, status FROM ranking "
        "WHERE plan = :plan ORDER BY stage_index, benchmark, metric, rank, candidate", plan=plan_name)


# ---------------------------------------------------------------------------- stages and decisions


def stage_runs(store: Store, plan_id: int, stage: str) -> dict[int, Run]:
    """The stage's runs by candidate id."""
    with store.session() as s:
        return {r.candidate_id: r for r in s.exec(select(Run).where(Run.plan_id == plan_id, Run.stage == stage)).all()}


def open_runs(store: Store, runs: list[Run]) -> bool:
    """Create a stage's missing runs in one transaction; False when another worker created them first."""
    try:
        with store.session() as s:
            s.add_all(runs)
        return True
    except IntegrityError:  # the unique (plan, stage, candidate) index: theirs are the same rows
        return False


def delete_runs(store: Store, run_ids: list[int]) -> None:
    """Delete runs and their evaluations, in one transaction (checkpoints are the caller's)."""
    if not run_ids:
        return
    with store.session() as s:
        s.exec(delete(Evaluation).where(Evaluation.run_id.in_(run_ids)))
        s.exec(delete(Run).where(Run.id.in_(run_ids)))


def decisions(store: Store, plan_id: int, stage: str, rung: int) -> list[Decision]:
    with store.session() as s:
        return list(s.exec(select(Decision).where(Decision.plan_id == plan_id, Decision.stage == stage,
                                                  Decision.rung == rung)).all())


@dataclass(frozen=True)
class DecisionRow:
    candidate_id: int
    run_id: int
    kept: bool
    score: float | None  # None for a run that failed before the rung
    rank: int
    why: str


def decide(store: Store, plan_id: int, stage: str, rung: int, rows: list[DecisionRow]) -> bool:
    """Record a rung's decisions and prune the dropped runs, in one transaction.

    False when another worker decided the rung first (the unique index on
    decisions); its decisions are the same, since they depend only on the scores.
    """
    try:
        with store.session() as s:
            for d in rows:
                s.add(Decision(plan_id=plan_id, stage=stage, rung=rung, candidate_id=d.candidate_id, kept=d.kept,
                               score=d.score, rank=d.rank, why=d.why))
                if not d.kept:  # a failed run stays failed
                    s.execute(update(Run).where(Run.id == d.run_id, Run.status != "failed")
                              .values(status="pruned", finished_at=utcnow()))
            s.flush()
            failpoint("decision-write")
        return True
    except IntegrityError:
        return False


# ---------------------------------------------------------------------------- an accepted spec change


@dataclass
class SpecChange:
    """What an accepted spec edit (``rbridge plan --force``) does to a plan's rows, computed by the planner."""

    spec_text: str
    spec_hash: str
    candidates: list[tuple[str, dict]]                         # the new spec's, in order
    drop_runs: list[int] = field(default_factory=list)         # runs whose inputs changed
    drop_candidates: list[int] = field(default_factory=list)   # candidates no longer in the spec
    redecide_stages: list[str] = field(default_factory=list)   # stages whose decisions are recomputed


def apply_spec_change(store: Store, plan_id: int, change: SpecChange) -> None:
    """Apply a spec change in one transaction: all of it lands, or none of it."""
    with store.session() as s:
        have = {c.name: c for c in s.exec(select(Candidate).where(Candidate.plan_id == plan_id)).all()}
        for position, (name, mix) in enumerate(change.candidates):
            if name in have:
                have[name].mix, have[name].position = json.dumps(mix, sort_keys=True), position
        _add_candidates(s, plan_id, change.candidates, set(have))
        if change.drop_runs:
            s.exec(delete(Evaluation).where(Evaluation.run_id.in_(change.drop_runs)))
            s.exec(delete(Run).where(Run.id.in_(change.drop_runs)))
        for cid in change.drop_candidates:
            s.exec(delete(Decision).where(Decision.candidate_id == cid))
            s.exec(delete(Candidate).where(Candidate.id == cid))
        if change.redecide_stages:
            s.exec(delete(Decision).where(Decision.plan_id == plan_id, Decision.stage.in_(change.redecide_stages)))
            # Runs of those stages get fresh Optuna trials (in fresh studies) and may run again.
            for run in s.exec(select(Run).where(Run.plan_id == plan_id, Run.stage.in_(change.redecide_stages))).all():
                run.trial_number = None
                if run.status == "pruned":
                    run.status = "pending"
        row = s.get(Plan, plan_id)
        row.spec_text, row.spec_hash, row.status, row.updated_at = change.spec_text, change.spec_hash, "running", \
            utcnow()


def plan_runs(store: Store, plan_id: int) -> list[Run]:
    with store.session() as s:
        return list(s.exec(select(Run).where(Run.plan_id == plan_id)).all())
