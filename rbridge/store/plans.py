"""Named operations on plans, candidates, a stage's runs and rung decisions.

The planner decides; these functions read and write the rows, each write one
transaction. Where several workers may race (opening a stage, deciding a rung),
a unique index lets the first transaction land and the function reports that
another process won, so callers never need to look at SQL or driver errors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from sqlalchemy import and_, case, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

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


def add_candidates(store: Store, plan_id: int, new: list[tuple[str, dict]]) -> dict[str, Candidate]:
    """Insert the candidates a plan does not have yet (a search's proposals), in one transaction; a name
    it has keeps its stored mixture (a second worker that computed the same proposals adds nothing).
    Returns the plan's candidates."""
    with store.session() as s:
        have = set(s.exec(select(Candidate.name).where(Candidate.plan_id == plan_id,
                                                       Candidate.superseded_by == 0)).all())
        n = len(have)
        for name, mix in new:
            if name not in have:
                s.add(Candidate(plan_id=plan_id, name=name, mix=json.dumps(mix, sort_keys=True), position=n))
                n += 1
    return candidates(store, plan_id)


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
    """The plan's live candidates by name (one a spec edit removed is kept, superseded, and left out)."""
    with store.session() as s:
        return {c.name: c for c in s.exec(select(Candidate).where(Candidate.plan_id == plan_id,
                                                                  Candidate.superseded_by == 0)).all()}


def evaluated_rungs(store: Store, plan_id: int, since=None) -> int:
    """How many (run, rung) steps of the plan have evaluations (recorded at or after ``since``, a UTC
    datetime, when given: the steps trained and scored by every process since then)."""
    with store.session() as s:
        q = (select(Evaluation.run_id, Evaluation.rung).distinct().join(Run, Run.id == Evaluation.run_id)
             .where(Run.plan_id == plan_id, Run.superseded_by == 0))
        if since is not None:
            q = q.where(Evaluation.created_at >= since)
        return len(s.exec(q).all())


def ranking(store: Store, plan_name: str) -> list[dict]:
    """The ``ranking`` view's rows of a plan, stage by stage."""
    return store.query(
        "SELECT stage, candidate, benchmark, metric, value, rank, tokens_seen, status, ci_low, ci_high FROM ranking "
        "WHERE plan = :plan ORDER BY stage_index, benchmark, metric, rank, candidate", plan=plan_name)


# ---------------------------------------------------------------------------- stages and decisions


def stage_runs(store: Store, plan_id: int, stage: str) -> dict[int, Run]:
    """The stage's live runs by candidate id."""
    with store.session() as s:
        return {r.candidate_id: r for r in s.exec(select(Run).where(Run.plan_id == plan_id, Run.stage == stage,
                                                                    Run.superseded_by == 0)).all()}


def superseded_runs(store: Store, plan_id: int, stage: str, candidate_ids: list[int]) -> dict[int, list[Run]]:
    """The stage's superseded runs of these candidates, newest supersession first, by candidate id."""
    out: dict[int, list[Run]] = {}
    with store.session() as s:
        for r in s.exec(select(Run).where(Run.plan_id == plan_id, Run.stage == stage, Run.superseded_by != 0,
                                          Run.candidate_id.in_(candidate_ids))
                        .order_by(Run.superseded_by.desc(), Run.id.desc())).all():
            out.setdefault(r.candidate_id, []).append(r)
    return out


def _unpruned():
    """A run's status when its stage is decided afresh: a pruned run that trained all its tokens (dropped at
    the last rung) is done, one dropped earlier is pending (it trains on if kept); others keep theirs."""
    return case((and_(Run.status == "pruned", Run.tokens_seen >= Run.tokens_target), "done"),
                (Run.status == "pruned", "pending"), else_=Run.status)


def open_runs(store: Store, runs: list[Run], revive: dict[int, str] | None = None) -> bool:
    """Open a stage's missing runs in one transaction: create ``runs``, and revive the superseded runs
    ``revive`` names ({run id: its checkpoint folder}) whose inputs the spec asks for again.

    A revived run counts again with its evaluations; its stage is decided afresh (a new
    Optuna trial, pruned -> pending). False when another worker opened the stage first.
    """
    try:
        with store.session() as s:
            for run_id, checkpoint in (revive or {}).items():
                res = s.execute(update(Run).where(Run.id == run_id, Run.superseded_by != 0).values(
                    superseded_by=0, trial_number=None, checkpoint=checkpoint,
                    status=_unpruned()))
                if res.rowcount != 1:  # revived by another worker
                    raise IntegrityError("revive", {}, None)
            s.add_all(runs)
        return True
    except IntegrityError:  # the unique live (plan, stage, candidate) index: theirs are the same rows
        return False


def supersede_runs(store: Store, run_ids: dict[int, str], revision: int) -> None:
    """Set runs aside as superseded by ``revision`` ({run id: where its checkpoints now are}), in one
    transaction: they keep their evaluations and leave every view; a claim on them is lost."""
    if not run_ids:
        return
    with store.session() as s:
        _supersede(s, run_ids, revision)


def _supersede(s: Session, run_ids: dict[int, str], revision: int) -> None:
    for run_id, checkpoint in run_ids.items():
        s.execute(update(Run).where(Run.id == run_id, Run.superseded_by == 0).values(
            superseded_by=revision, checkpoint=checkpoint, worker="",
            status=case((Run.status == "running", "pending"), else_=Run.status)))


def decisions(store: Store, plan_id: int, stage: str, rung: int) -> list[Decision]:
    with store.session() as s:
        return list(s.exec(select(Decision).where(Decision.plan_id == plan_id, Decision.stage == stage,
                                                  Decision.rung == rung, Decision.superseded_by == 0)).all())


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
    """What an accepted spec edit (``rbridge plan --force``) does to a plan's rows, computed by the planner.

    Nothing is deleted: what the edit invalidates is marked superseded by the plan's
    next revision, kept, and left out of the views (``rbridge status`` lists it).
    """

    spec_text: str
    spec_hash: str
    candidates: list[tuple[str, dict]]                              # the new spec's, in order
    supersede_runs: dict[int, str] = field(default_factory=dict)    # runs whose inputs changed -> checkpoints
    drop_candidates: list[int] = field(default_factory=list)        # candidates no longer in the spec
    redecide_stages: list[str] = field(default_factory=list)        # stages whose decisions are recomputed


def apply_spec_change(store: Store, plan_id: int, change: SpecChange, revision: int) -> bool:
    """Apply a spec change as plan revision ``revision``, in one transaction: all of it lands, or none.

    False (nothing written) when the plan is no longer at ``revision - 1``: another
    process accepted an edit meanwhile.
    """
    with store.session() as s:
        row = s.get(Plan, plan_id)
        if row.revision != revision - 1:
            return False
        live = {c.name: c for c in s.exec(select(Candidate).where(Candidate.plan_id == plan_id,
                                                                  Candidate.superseded_by == 0)).all()}
        old = {}  # superseded candidates, the most recently superseded first
        for c in s.exec(select(Candidate).where(Candidate.plan_id == plan_id, Candidate.superseded_by != 0)
                        .order_by(Candidate.superseded_by.desc(), Candidate.id.desc())).all():
            old.setdefault(c.name, c)
        for position, (name, mix) in enumerate(change.candidates):
            c = live.get(name) or old.get(name)  # a candidate the spec brings back keeps its id and runs
            if c is not None:
                c.mix, c.position, c.superseded_by = json.dumps(mix, sort_keys=True), position, 0
                s.add(c)
        s.flush()
        _add_candidates(s, plan_id, change.candidates, set(live) | set(old))
        _supersede(s, change.supersede_runs, revision)
        if change.drop_candidates:
            s.execute(update(Candidate).where(Candidate.id.in_(change.drop_candidates))
                      .values(superseded_by=revision))
            s.execute(update(Decision).where(Decision.candidate_id.in_(change.drop_candidates),
                                             Decision.superseded_by == 0).values(superseded_by=revision))
        studies = json.loads(row.studies or "{}")
        if change.redecide_stages:
            s.execute(update(Decision).where(Decision.plan_id == plan_id, Decision.superseded_by == 0,
                                             Decision.stage.in_(change.redecide_stages))
                      .values(superseded_by=revision))
            # Live runs of those stages get fresh Optuna trials (in the revision's new studies) and may run again.
            s.execute(update(Run).where(Run.plan_id == plan_id, Run.superseded_by == 0,
                                        Run.stage.in_(change.redecide_stages))
                      .values(trial_number=None, status=_unpruned()))
            studies.update({stage: revision for stage in change.redecide_stages})
        row.spec_text, row.spec_hash, row.status, row.updated_at = change.spec_text, change.spec_hash, "running", \
            utcnow()
        row.revision, row.studies = revision, json.dumps(studies, sort_keys=True)
        s.add(row)
        failpoint("spec-change")
    return True


def superseded(store: Store, plan_id: int) -> list[tuple[Run, str]]:
    """Every superseded run of a plan with its candidate's name, by revision then stage."""
    with store.session() as s:
        rows = s.exec(select(Run, Candidate.name).join(Candidate, Candidate.id == Run.candidate_id)
                      .where(Run.plan_id == plan_id, Run.superseded_by != 0)
                      .order_by(Run.superseded_by, Run.stage_index, Candidate.name)).all()
    return [(r, n) for r, n in rows]


def plan_runs(store: Store, plan_id: int) -> list[Run]:
    """The plan's live runs."""
    with store.session() as s:
        return list(s.exec(select(Run).where(Run.plan_id == plan_id, Run.superseded_by == 0)).all())


# ---------------------------------------------------------------------------- launches (job arrays)

def record_launch(store: Store, plan_id: int, job_id: str, tasks: int, script: str, scheduler: str = "slurm") -> None:
    from rbridge.store.models import Launch

    with store.session() as s:
        s.add(Launch(plan_id=plan_id, scheduler=scheduler, job_id=job_id, tasks=tasks, script=script))


def launches(store: Store, plan_id: int, live_only: bool = False) -> list:
    from rbridge.store.models import Launch

    with store.session() as s:
        q = select(Launch).where(Launch.plan_id == plan_id)
        if live_only:
            q = q.where(Launch.cancelled_at.is_(None))
        return list(s.exec(q.order_by(Launch.id)).all())


def mark_cancelled(store: Store, launch_ids: list[int]) -> None:
    from rbridge.store.models import Launch

    with store.session() as s:
        s.execute(update(Launch).where(Launch.id.in_(launch_ids)).values(cancelled_at=utcnow()))
