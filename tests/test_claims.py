"""The claim protocol of rbridge.planner.worker on a real SQLite store, step by step.

Two PlanWorker objects stand for two workers; the second calls itself another
machine, so it cannot see the first one's pid and has to rely on heartbeats.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from sqlalchemy import update
from sqlmodel import select

from rbridge.planner.claims import holder_is_dead_here, worker_id
from rbridge.planner.state import PlanState, Task
from rbridge.planner.worker import PlanWorker
from rbridge.spec import parse_spec
from rbridge.store import Candidate, Plan, Run, open_store
from rbridge.store import runs as run_ops
from test_plan_e2e import SPEC

TIMEOUT = 1.5  # heartbeat timeout; the holder beats every 0.375 s, 4 beats per timeout


def _world(tmp_path: Path):
    spec = parse_spec(SPEC, tmp_path / "tiny.yaml", check_files=False)
    store = open_store(tmp_path / "claims.db")
    with store.session() as s:
        plan = Plan(name="tiny", spec_text=SPEC, spec_hash=spec.spec_hash)
        s.add(plan)
        s.flush()
        cand = Candidate(plan_id=plan.id, name="cot", mix='{"cot": 1.0}')
        s.add(cand)
        s.flush()
        run = Run(plan_id=plan.id, stage="filter", stage_index=0, candidate_id=cand.id, config="{}",
                  tokens_target=6144, trial_number=0)  # a trial already asked: no Optuna needed here
        s.add(run)
    a = PlanWorker(PlanState(store, plan, spec), heartbeat_timeout=TIMEOUT)
    b = PlanWorker(PlanState(store, plan, spec), heartbeat_timeout=TIMEOUT)
    b.me = "node-b:12345:00000000"
    stage = spec.resolved_stages()[0]

    def task() -> Task:  # what a worker sees when it reads the store now
        with store.session() as s:
            row = s.exec(select(Run)).one()
        return Task(stage, 1, 3072, row, cand, 1)

    return store, a, b, task


def test_one_claim_wins_heartbeats_keep_it_and_a_dead_holder_is_taken_over(tmp_path):
    store, a, b, task = _world(tmp_path)
    seen = task()
    assert a.claimable(seen) and b.claimable(seen)
    first = a.claim(seen)
    assert first is not None and first.lease == 1
    assert b.claim(seen) is None  # the same snapshot: the compare-and-set fails for the second worker
    try:
        # While the holder beats, its run never looks stale, however long the other worker watches.
        deadline = time.monotonic() + 2 * TIMEOUT
        while time.monotonic() < deadline:
            assert not b.claimable(task())
            time.sleep(0.1)
        assert task().run.beats >= 5
    finally:
        first.stop()  # the holder dies: no more beats, nothing released
    held = task()
    assert held.run.status == "running" and held.run.worker == a.me
    assert not b.claimable(held)  # first look: the clock starts now
    time.sleep(TIMEOUT + 0.2)
    stale = task()
    assert b.claimable(stale)
    second = b.claim(stale)
    assert second is not None and second.lease == 2
    try:
        # The first holder's lease is gone: its heartbeat or its record would change no row.
        assert not run_ops.beat(store, first.run_id, first.lease, first.worker)
        time.sleep(0.6)
        second.check()  # still ours
        assert not second.lost.is_set()
    finally:
        second.release()
    after = task().run
    assert after.status == "pending" and after.worker == "" and after.lease == 2
    store.close()


def test_a_lost_claim_is_noticed_by_its_holder(tmp_path):
    store, a, b, task = _world(tmp_path)
    mine = a.claim(task())
    try:
        with store.session() as s:  # someone else took the run (e.g. after a network partition)
            s.execute(update(Run).values(lease=Run.lease + 1, worker=b.me))
        deadline = time.monotonic() + 5
        while not mine.lost.is_set():
            assert time.monotonic() < deadline, "the heartbeat never noticed"
            time.sleep(0.05)
        try:
            mine.check()
            raise AssertionError("check() should raise once the claim is lost")
        except Exception as exc:  # noqa: BLE001
            assert type(exc).__name__ == "ClaimLost"
    finally:
        mine.stop()
    store.close()


def test_holder_is_dead_here_uses_pid_only_on_the_same_machine():
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    me = worker_id()
    host, pid, boot = me.split(":")
    assert not holder_is_dead_here(me)
    assert holder_is_dead_here(f"{host}:{gone.pid}:{boot}")
    assert not holder_is_dead_here(f"elsewhere:{gone.pid}:{boot}")  # another machine: heartbeats decide
    assert not holder_is_dead_here(f"{host}:{gone.pid}:otherboot")  # rebooted since: pids were reused


def test_stages_a_worker_is_limited_to_that_the_plan_lacks(tmp_path):
    store, a, _, _ = _world(tmp_path)
    assert a.missing_stages == []
    with store.session() as s:
        plan = s.exec(select(Plan)).one()
    limited = PlanWorker(PlanState(store, plan, a.state.spec), stages=["filter", "fliter"])  # worker --stage ...
    assert limited.missing_stages == ["fliter"]
    store.close()
