"""Named operations on runs: the claim protocol and recording a rung's result.

Every state change a worker makes is one short transaction behind a name here,
as Optuna keeps every statement behind its storage's methods. A claim, a beat,
a release and a record are compare-and-set UPDATEs: each returns False when
another process changed the row first (claimed it, took it over, recorded it),
and then nothing is written. The same statements run on SQLite (the database
write lock serialises them) and PostgreSQL (the row lock does);
tests/test_store_ops.py runs one contract suite on both.
"""

from __future__ import annotations

import json

from sqlalchemy import case, func, update
from sqlmodel import select

from rbridge._failpoints import failpoint
from rbridge.scoring.config import HIGHER_IS_BETTER
from rbridge.store.db import Store
from rbridge.store.models import Evaluation, EvaluationItems, Run, utcnow


def _held(run_id: int, lease: int, worker: str):
    """The row condition of a claim still held: same lease, same holder, still running, not superseded."""
    return ((Run.id == run_id) & (Run.lease == lease) & (Run.worker == worker) & (Run.status == "running")
            & (Run.superseded_by == 0))


def claim(store: Store, run: Run, worker: str, beat_every_s: float, checkpoint: str) -> int | None:
    """Take ``run`` as it was read (pending, or running under a holder judged gone); return the new lease.

    None when the row changed since it was read: another worker claimed it, its
    holder beat, or it was recorded.
    """
    with store.session() as s:
        res = s.execute(
            update(Run).where(Run.id == run.id, Run.lease == run.lease, Run.beats == run.beats,
                              Run.status == run.status, Run.superseded_by == 0)
            .values(status="running", worker=worker, lease=run.lease + 1, beats=0, beat_every_s=beat_every_s,
                    heartbeat_at=utcnow(), started_at=run.started_at or utcnow(), checkpoint=checkpoint))
    return run.lease + 1 if res.rowcount == 1 else None


def beat(store: Store, run_id: int, lease: int, worker: str) -> bool:
    """One heartbeat of a held claim; False when the claim is no longer ours."""
    with store.session() as s:
        res = s.execute(update(Run).where(_held(run_id, lease, worker))
                        .values(beats=Run.beats + 1, heartbeat_at=utcnow()))
    return res.rowcount == 1


def release(store: Store, run_id: int, lease: int, worker: str) -> bool:
    """Give a held run back (after a failure): pending again, for any worker."""
    with store.session() as s:
        res = s.execute(update(Run).where(_held(run_id, lease, worker)).values(status="pending", worker=""))
    return res.rowcount == 1


def fail(store: Store, run_id: int, lease: int, worker: str, error: str, max_attempts: int) -> str | None:
    """Record a failed attempt of a held run: pending again for another try, or ``failed`` (with its error)
    once it has failed ``max_attempts`` times. Returns the new status; None when the claim was lost."""
    gives_up = Run.attempts + 1 >= max_attempts
    with store.session() as s:
        res = s.execute(update(Run).where(_held(run_id, lease, worker)).values(
            attempts=Run.attempts + 1, error=error[:2000], worker="",
            status=case((gives_up, "failed"), else_="pending"),
            finished_at=case((gives_up, utcnow()), else_=None)))
        if res.rowcount != 1:
            return None
        return s.exec(select(Run.status).where(Run.id == run_id)).one()


def set_trial(store: Store, run_id: int, lease: int, trial_number: int) -> bool:
    """Record the run's Optuna trial, once, by the holder of ``lease``; False if it already has one."""
    with store.session() as s:
        res = s.execute(update(Run).where(Run.id == run_id, Run.lease == lease, Run.trial_number.is_(None))
                        .values(trial_number=trial_number))
        failpoint("run-row")  # asked, not yet recorded on the run
    return res.rowcount == 1


def rung_recorded(store: Store, run_id: int, rung: int) -> bool:
    """Whether the run has evaluations at ``rung``."""
    with store.session() as s:
        return s.exec(select(Evaluation.id).where(Evaluation.run_id == run_id, Evaluation.rung == rung)).first() \
            is not None


LEGACY_PRECISION = "legacy"  # stage_compute: runs started before schema 7 recorded no precision


def stage_compute(store: Store, plan_id: int, stage: str) -> tuple[int, str]:
    """(CPU threads, precision) a stage's runs train with, fixed by the first of its live runs to start:
    (0, "") when none has; the precision is LEGACY_PRECISION when runs started before runs recorded it
    (schema 7), and that of the earliest-started run if racing runs recorded two."""
    live = (Run.plan_id == plan_id) & (Run.stage == stage) & (Run.superseded_by == 0)
    with store.session() as s:
        threads, started = s.exec(select(func.max(Run.threads), func.max(Run.tokens_seen)).where(live)).first()
        precision = s.exec(select(Run.precision).where(live & (Run.precision != ""))
                           .order_by(Run.started_at, Run.id).limit(1)).first()
    if not precision and (threads or started):
        precision = LEGACY_PRECISION
    return int(threads or 0), precision or ""


def set_compute(store: Store, run_id: int, lease: int, worker: str, threads: int, precision: str,
                rates: str = "") -> str:
    """Record the CPU threads and precision of a held run that has none yet (a run keeps its first ones),
    with ``rates``, the JSON of the measurement that chose the precision ('' where none did). Returns the
    precision the run trains in: its own if it had one; else that of a run of its stage that recorded one
    first, which it takes instead of ``precision``; else ``precision``.

    One stage, one precision: processes that start a stage's runs at the same moment each measure
    ``precision: auto`` (rbridge.proxy.precision), and two measurements near the threshold can fall on
    either side of it (an H200 measured one stage at 1.21x and 1.45x in two processes), which would train
    candidates of one stage in different precisions. The decision is one transaction that no other decision
    can interleave with: PostgreSQL takes a transaction-level advisory lock on the stage; SQLite takes its
    write lock (a write that changes nothing) before reading."""
    from sqlalchemy import text

    from rbridge.store.db import advisory_key

    with store.session() as s:
        row = s.exec(select(Run.plan_id, Run.stage).where(Run.id == run_id)).first()
        if row is None:
            return precision
        plan_id, stage = row
        if store.dialect == "postgresql":
            s.execute(text("SELECT pg_advisory_xact_lock(:k)"),
                      {"k": advisory_key(f"rbridge-stage-precision:{plan_id}:{stage}")})
        else:
            s.execute(update(Run).where(Run.id == run_id).values(threads=Run.threads))  # the write lock
        held = _held(run_id, lease, worker)
        own = s.exec(select(Run.precision).where(Run.id == run_id)).one()
        if own:
            chosen = own
        else:
            live = (Run.plan_id == plan_id) & (Run.stage == stage) & (Run.superseded_by == 0)
            first = s.exec(select(Run.precision).where(live & (Run.precision != "") & (Run.id != run_id))
                           .order_by(Run.started_at, Run.id).limit(1)).first()
            chosen = first or precision
            s.execute(update(Run).where(held & (Run.precision == "")).values(
                precision=chosen, precision_rates=rates if chosen == precision else ""))
        s.execute(update(Run).where(held & (Run.threads == 0)).values(threads=threads))
    return chosen


def record(store: Store, run_id: int, lease: int, worker: str, *, rung: int, done: bool, tokens_seen: int,
           wall_s: float, tokens_per_s: float, train_flops: float, score_flops: float,
           scores: dict[str, dict[str, float]], mfu: float = 0.0, device: str = "",
           intervals: dict[str, dict[str, tuple[float, float]]] | None = None,
           items: dict[str, dict[str, list[float | None]]] | None = None) -> bool:
    """Record a rung of a held run in one transaction: the run's progress, then every score.

    ``scores`` is {benchmark: {metric: value}}, ``intervals`` the same with (low, high) bootstrap
    bounds. False (and nothing written) when the claim was taken over meanwhile. ``score_flops``
    adds to the run's total.
    """
    with store.session() as s:
        res = s.execute(
            update(Run).where(_held(run_id, lease, worker))
            .values(status="done" if done else "pending", worker="", tokens_seen=tokens_seen, wall_s=wall_s,
                    tokens_per_s=tokens_per_s, train_flops=train_flops, score_flops=Run.score_flops + score_flops,
                    mfu=mfu, device=device, finished_at=utcnow() if done else None))
        if res.rowcount != 1:
            return False
        with_items: list[tuple[Evaluation, list]] = []
        for bench, values in scores.items():
            for metric, value in values.items():
                lo, hi = ((intervals or {}).get(bench) or {}).get(metric) or (None, None)
                ev = Evaluation(run_id=run_id, rung=rung, tokens_seen=tokens_seen, benchmark=bench, metric=metric,
                                value=float(value), higher_is_better=metric in HIGHER_IS_BETTER,
                                ci_low=lo, ci_high=hi)
                s.add(ev)
                per = ((items or {}).get(bench) or {}).get(metric)
                if per is not None:
                    with_items.append((ev, per))
        s.flush()  # the evaluations' ids
        for ev, per in with_items:
            s.add(EvaluationItems(evaluation_id=ev.id, n=len(per),
                                  item_values=json.dumps([None if v is None else float(v) for v in per])))
        s.flush()
        failpoint("eval-write")  # dies mid-transaction: nothing of it lands
    return True


def evaluated(store: Store, run_ids: list[int], rung: int) -> set[int]:
    """Which of ``run_ids`` have evaluations at ``rung``."""
    with store.session() as s:
        return set(s.exec(select(Evaluation.run_id).where(Evaluation.run_id.in_(run_ids),
                                                          Evaluation.rung == rung)).all())


def rung_scores(store: Store, run_ids: list[int], rung: int, metric: str) -> dict[int, float]:
    """Each run's ``metric`` at ``rung``, averaged over benchmarks (the stage's decision score).

    Averaged here in recording order, not by SQL AVG, so the figure is the same on every backend.
    """
    with store.session() as s:
        rows = s.exec(select(Evaluation.run_id, Evaluation.value)
                      .where(Evaluation.run_id.in_(run_ids), Evaluation.rung == rung, Evaluation.metric == metric)
                      .order_by(Evaluation.id)).all()
    values: dict[int, list[float]] = {}
    for run_id, value in rows:
        values.setdefault(run_id, []).append(value)
    return {run_id: sum(v) / len(v) for run_id, v in values.items()}
