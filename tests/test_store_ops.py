"""The store's named operations (rbridge.store.runs, rbridge.store.plans): one contract, two backends.

Every test runs on a real SQLite file and on a real PostgreSQL database (conftest's
``pg_server``; skipped without the server binaries). The planner relies on exactly
these promises: a compare-and-set returns False and writes nothing when another
process changed the row first; a racing second writer of a stage's runs or of a
rung's decisions is told so, and the rows stay single.
"""

from __future__ import annotations

import pytest
from sqlmodel import select

from conftest import new_database
from rbridge.store import Evaluation, open_store
from rbridge.store import plans as plan_ops
from rbridge.store import runs as run_ops
from rbridge.store.models import Decision, Run

ME, OTHER = "host-a:1:boot", "host-b:2:boot"


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    if request.param == "sqlite":
        st = open_store(tmp_path / "ops.db")
    else:
        base = request.getfixturevalue("pg_server")
        st = open_store(new_database(base, f"ops_{request.node.name.split('[')[0][-40:]}".lower()))
    yield st
    st.close()


def _plan(store, name="p", cands=(("a", {"x": 1.0}), ("b", {"x": 0.5, "y": 0.5}), ("c", {"y": 1.0}))):
    plan = plan_ops.create_plan(store, name=name, spec_text="name: p", spec_hash="h1", spec_path="/p.yaml", seed=0,
                                candidates=list(cands))
    return plan, plan_ops.candidates(store, plan.id)


def _open_stage(store, plan, cands, stage="s1"):
    rows = [Run(plan_id=plan.id, stage=stage, stage_index=0, candidate_id=c.id, config="{}", tokens_target=100)
            for c in cands.values()]
    assert plan_ops.open_runs(store, rows)
    return {n: plan_ops.stage_runs(store, plan.id, stage)[c.id] for n, c in cands.items()}


def _run(store, run_id):
    with store.session() as s:
        return s.get(Run, run_id)


def test_plans_and_candidates(store):
    plan, cands = _plan(store)
    assert plan_ops.find_plan(store, "p").id == plan.id and plan_ops.find_plan(store, "q") is None
    assert sorted(cands) == ["a", "b", "c"] and [cands[n].position for n in "abc"] == [0, 1, 2]
    assert cands["b"].mix == '{"x": 0.5, "y": 0.5}'
    assert [p.name for p in plan_ops.list_plans(store)] == ["p"] and plan_ops.list_plans(store, "q") == []
    plan_ops.set_plan_compute(store, plan.id, {"spent_flops": 1.5})
    assert plan_ops.mark_plan_done(store, plan.id) and not plan_ops.mark_plan_done(store, plan.id)
    row = plan_ops.get_plan(store, plan.id)
    assert row.status == "done" and row.compute == '{"spent_flops": 1.5}'


def test_adopt_a_plan_made_by_an_import(store):
    plan, _ = _plan(store, cands=(("b", {"x": 1.0}),))
    with store.session() as s:  # what `rbridge targets import` leaves: no spec
        row = s.get(type(plan), plan.id)
        row.spec_hash, row.spec_text = "", ""
    assert plan_ops.list_plans(store) == []  # nothing for a worker to serve yet
    plan_ops.adopt_plan(store, plan.id, spec_text="name: p", spec_hash="h2", spec_path="/p.yaml",
                        candidates=[("a", {"x": 1.0}), ("b", {"x": 1.0})])
    assert sorted(plan_ops.candidates(store, plan.id)) == ["a", "b"]
    assert plan_ops.get_plan(store, plan.id).spec_hash == "h2"


def test_one_claim_wins_and_a_stale_snapshot_claims_nothing(store):
    plan, cands = _plan(store)
    runs = _open_stage(store, plan, cands)
    seen = runs["a"]
    lease = run_ops.claim(store, seen, ME, 0.5, "/ckpt/a")
    assert lease == 1
    assert run_ops.claim(store, seen, OTHER, 0.5, "/ckpt/a") is None  # the same snapshot: lost the race
    now = _run(store, seen.id)
    assert (now.status, now.worker, now.lease, now.beats, now.checkpoint) == ("running", ME, 1, 0, "/ckpt/a")
    assert run_ops.beat(store, seen.id, lease, ME) and run_ops.beat(store, seen.id, lease, ME)
    assert not run_ops.beat(store, seen.id, lease, OTHER)  # not the holder
    assert run_ops.claim(store, now, OTHER, 0.5, "/ckpt/a") is None  # it beat since that read
    stale = _run(store, seen.id)
    assert stale.beats == 2
    taken = run_ops.claim(store, stale, OTHER, 0.5, "/ckpt/a")  # judged gone: taken over
    assert taken == 2
    assert not run_ops.beat(store, seen.id, lease, ME)  # the old holder's lease is gone
    assert not run_ops.release(store, seen.id, lease, ME)
    assert run_ops.release(store, seen.id, taken, OTHER)
    back = _run(store, seen.id)
    assert (back.status, back.worker, back.lease) == ("pending", "", 2)


def test_trial_is_set_once_by_the_holder(store):
    plan, cands = _plan(store)
    run = _open_stage(store, plan, cands)["a"]
    lease = run_ops.claim(store, run, ME, 0.5, "")
    assert not run_ops.set_trial(store, run.id, lease + 1, 7)  # not this lease
    assert run_ops.set_trial(store, run.id, lease, 7)
    assert not run_ops.set_trial(store, run.id, lease, 8)
    assert _run(store, run.id).trial_number == 7


def test_record_lands_whole_for_the_holder_and_not_at_all_for_a_lost_claim(store):
    plan, cands = _plan(store)
    runs = _open_stage(store, plan, cands)
    a, b = runs["a"], runs["b"]
    lease_a = run_ops.claim(store, a, ME, 0.5, "")
    scores = {"gsm8k": {"rbridge": 2.0, "nll": 3.0}, "math": {"rbridge": 4.0, "nll": 5.0}}
    kw = dict(rung=1, tokens_seen=50, wall_s=1.0, tokens_per_s=50.0, train_flops=10.0, score_flops=2.0,
              scores=scores)
    assert not run_ops.record(store, a.id, lease_a, OTHER, done=False, **kw)  # not the holder: nothing written
    assert not run_ops.rung_recorded(store, a.id, 1)
    assert run_ops.record(store, a.id, lease_a, ME, done=False, **kw)
    assert not run_ops.record(store, a.id, lease_a, ME, done=False, **kw)  # released by the first record
    row = _run(store, a.id)
    assert (row.status, row.worker, row.tokens_seen, row.score_flops, row.finished_at) == ("pending", "", 50, 2.0, None)
    with store.session() as s:
        assert len(s.exec(select(Evaluation).where(Evaluation.run_id == a.id)).all()) == 4
    lease_b = run_ops.claim(store, b, ME, 0.5, "")
    assert run_ops.record(store, b.id, lease_b, ME, done=True, **{**kw, "scores": {"gsm8k": {"rbridge": 1.0}}})
    assert _run(store, b.id).status == "done" and _run(store, b.id).finished_at is not None
    assert run_ops.rung_recorded(store, a.id, 1) and not run_ops.rung_recorded(store, a.id, 2)
    assert run_ops.evaluated(store, [a.id, b.id, runs["c"].id], 1) == {a.id, b.id}
    # The stage's decision score: the metric averaged over benchmarks.
    assert run_ops.rung_scores(store, [a.id, b.id], 1, "rbridge") == {a.id: 3.0, b.id: 1.0}
    assert plan_ops.evaluated_rungs(store, plan.id) == 2


def test_a_stage_is_opened_once(store):
    plan, cands = _plan(store)
    _open_stage(store, plan, cands)
    again = [Run(plan_id=plan.id, stage="s1", stage_index=0, candidate_id=cands["a"].id, config="{}")]
    assert not plan_ops.open_runs(store, again)  # another worker opened it first
    assert len(plan_ops.stage_runs(store, plan.id, "s1")) == 3


def test_a_rung_is_decided_once_and_dropped_runs_are_pruned(store):
    plan, cands = _plan(store)
    runs = _open_stage(store, plan, cands)
    rows = [plan_ops.DecisionRow(cands[n].id, runs[n].id, kept, score, rank, f"why {n}")
            for n, kept, score, rank in (("a", True, 1.0, 1), ("b", True, 2.0, 2), ("c", False, 3.0, 3))]
    assert plan_ops.decide(store, plan.id, "s1", 1, rows)
    assert not plan_ops.decide(store, plan.id, "s1", 1, rows)  # a second decider: rolled back, told so
    made = plan_ops.decisions(store, plan.id, "s1", 1)
    assert sorted((cands_by_id(cands)[d.candidate_id], d.kept, d.rank) for d in made) == \
        [("a", True, 1), ("b", True, 2), ("c", False, 3)]
    assert [_run(store, runs[n].id).status for n in "abc"] == ["pending", "pending", "pruned"]
    assert plan_ops.decisions(store, plan.id, "s1", 2) == []


def cands_by_id(cands):
    return {c.id: n for n, c in cands.items()}


def test_superseded_runs_keep_their_evaluations_lose_their_claim_and_can_be_revived(store):
    plan, cands = _plan(store)
    runs = _open_stage(store, plan, cands)
    lease = run_ops.claim(store, runs["a"], ME, 0.5, "/ck/a")
    run_ops.record(store, runs["a"].id, lease, ME, rung=1, done=False, tokens_seen=1, wall_s=0, tokens_per_s=0,
                   train_flops=0, score_flops=0, scores={"g": {"nll": 1.0}})
    held = run_ops.claim(store, _run(store, runs["b"].id), OTHER, 0.5, "/ck/b")
    plan_ops.supersede_runs(store, {runs["a"].id: "/old/a", runs["b"].id: "/old/b"}, revision=1)
    assert sorted(plan_ops.stage_runs(store, plan.id, "s1")) == [cands["c"].id]
    assert not run_ops.beat(store, runs["b"].id, held, OTHER)  # its holder is told at the next beat
    b = _run(store, runs["b"].id)
    assert (b.superseded_by, b.status, b.worker, b.checkpoint) == (1, "pending", "", "/old/b")
    with store.session() as s:
        assert [e.run_id for e in s.exec(select(Evaluation)).all()] == [runs["a"].id]  # kept
    assert plan_ops.evaluated_rungs(store, plan.id) == 0  # ... and left out
    assert plan_ops.ranking(store, "p") == []
    # A new live run for the same (stage, candidate) may open beside the superseded one.
    assert plan_ops.open_runs(store, [Run(plan_id=plan.id, stage="s1", stage_index=0, candidate_id=cands["b"].id,
                                          config="{}", tokens_target=100)])
    # Reviving "a" (a later spec asks for its inputs again) brings back its evaluations, once.
    kept = plan_ops.superseded_runs(store, plan.id, "s1", [cands["a"].id, cands["b"].id])
    assert {cid: [r.id for r in rs] for cid, rs in kept.items()} == {cands["a"].id: [runs["a"].id],
                                                                     cands["b"].id: [runs["b"].id]}
    assert plan_ops.open_runs(store, [], revive={runs["a"].id: "/ck/a"})
    assert not plan_ops.open_runs(store, [], revive={runs["a"].id: "/ck/a"})  # a second reviver is told
    a = _run(store, runs["a"].id)
    assert (a.superseded_by, a.checkpoint, a.trial_number) == (0, "/ck/a", None)
    assert plan_ops.evaluated_rungs(store, plan.id) == 1
    assert [r["candidate"] for r in plan_ops.ranking(store, "p")] == ["a"]


def test_a_spec_change_applies_whole_and_supersedes_instead_of_deleting(store):
    plan, cands = _plan(store)
    runs = _open_stage(store, plan, cands)
    s2 = _open_stage(store, plan, {n: cands[n] for n in "ab"}, stage="s2")
    rows = [plan_ops.DecisionRow(cands[n].id, runs[n].id, n != "c", 1.0, i, "") for i, n in enumerate("abc", 1)]
    plan_ops.decide(store, plan.id, "s1", 1, rows)
    with store.session() as s:
        s.get(Run, s2["a"].id).trial_number = 3
    change = plan_ops.SpecChange(spec_text="name: p2", spec_hash="h2",
                                 candidates=[("b", {"x": 1.0}), ("a", {"x": 1.0}), ("d", {"z": 1.0})],
                                 supersede_runs={runs["c"].id: "/old/c"}, drop_candidates=[cands["c"].id],
                                 redecide_stages=["s1", "s2"])
    assert not plan_ops.apply_spec_change(store, plan.id, change, revision=2)  # not the next revision
    assert plan_ops.get_plan(store, plan.id).spec_hash == "h1"
    assert plan_ops.apply_spec_change(store, plan.id, change, revision=1)
    now = plan_ops.candidates(store, plan.id)
    assert sorted(now) == ["a", "b", "d"] and [now[n].position for n in "bad"] == [0, 1, 2]
    assert now["b"].mix == '{"x": 1.0}'
    assert plan_ops.decisions(store, plan.id, "s1", 1) == []
    assert {_run(store, r.id).status for r in (runs["a"], runs["b"])} == {"pending"}
    assert _run(store, s2["a"].id).trial_number is None
    assert _run(store, runs["c"].id).superseded_by == 1
    row = plan_ops.get_plan(store, plan.id)
    assert (row.spec_text, row.spec_hash, row.status, row.revision) == ("name: p2", "h2", "running", 1)
    assert row.studies == '{"s1": 1, "s2": 1}'
    with store.session() as s:  # nothing deleted: the old decisions and candidate are kept, superseded
        assert sorted(d.superseded_by for d in s.exec(select(Decision)).all()) == [1, 1, 1]
    assert [(r.id, n) for r, n in plan_ops.superseded(store, plan.id)] == [(runs["c"].id, "c")]
    # The next edit brings "c" back: the same candidate row, so its superseded runs can be revived.
    back = plan_ops.SpecChange(spec_text="name: p", spec_hash="h1",
                               candidates=[("a", {"x": 1.0}), ("b", {"x": 0.5, "y": 0.5}), ("c", {"y": 1.0})],
                               drop_candidates=[now["d"].id], redecide_stages=["s1", "s2"])
    assert plan_ops.apply_spec_change(store, plan.id, back, revision=2)
    again = plan_ops.candidates(store, plan.id)
    assert sorted(again) == ["a", "b", "c"] and again["c"].id == cands["c"].id


def test_a_failed_attempt_is_retried_then_recorded_failed_and_never_pruned(store):
    plan, cands = _plan(store)
    run = _open_stage(store, plan, cands)["a"]
    lease = run_ops.claim(store, run, ME, 0.5, "")
    assert run_ops.fail(store, run.id, lease, OTHER, "RuntimeError: x", 2) is None  # not the holder
    assert run_ops.fail(store, run.id, lease, ME, "RuntimeError: first", 2) == "pending"
    again = _run(store, run.id)
    assert (again.status, again.attempts, again.error, again.worker) == ("pending", 1, "RuntimeError: first", "")
    lease = run_ops.claim(store, again, OTHER, 0.5, "")
    assert run_ops.fail(store, run.id, lease, OTHER, "RuntimeError: second", 2) == "failed"
    done = _run(store, run.id)
    assert (done.status, done.attempts, done.error) == ("failed", 2, "RuntimeError: second")
    assert done.finished_at is not None
    rows = [plan_ops.DecisionRow(cands["a"].id, run.id, False, None, 3, "failed")]
    assert plan_ops.decide(store, plan.id, "s1", 1, rows)
    assert _run(store, run.id).status == "failed"  # a decision to drop it does not make it "pruned"


def test_one_stage_trains_in_one_precision_whoever_measures_first(store):
    """Processes starting a stage's runs together each measure `precision: auto`, and two measurements near
    the threshold can disagree; the first to record fixes the stage's precision and the others take it
    (with no rates of their own), also when they record at the same moment (threads with their own
    connections, released together by a barrier)."""
    import threading

    plan, cands = _plan(store)
    runs = _open_stage(store, plan, cands)
    leases = {n: run_ops.claim(store, runs[n], ME, 0.5, "") for n in ("a", "b")}
    assert run_ops.set_compute(store, runs["a"].id, leases["a"], ME, 1, "bf16", '{"bf16": 1.2}') == "bf16"
    assert run_ops.set_compute(store, runs["b"].id, leases["b"], ME, 1, "fp32", '{"bf16": 1.1}') == "bf16"
    assert [(_run(store, runs[n].id).precision, _run(store, runs[n].id).precision_rates) for n in "ab"] == \
        [("bf16", '{"bf16": 1.2}'), ("bf16", "")]
    assert run_ops.set_compute(store, runs["a"].id, leases["a"], ME, 1, "fp32") == "bf16"  # a run keeps its own

    for i in range(6):  # racing processes: each stage ends with one precision
        stage = f"race{i}"
        runs = _open_stage(store, plan, cands, stage=stage)
        mine = {n: (open_store(store.url), run_ops.claim(store, runs[n], ME, 0.5, "")) for n in runs}
        barrier, got = threading.Barrier(len(runs)), {}

        def decide(n, precision):
            st, lease = mine[n]
            barrier.wait()
            got[n] = run_ops.set_compute(st, runs[n].id, lease, ME, 1, precision)

        threads = [threading.Thread(target=decide, args=(n, ("bf16", "fp32")[k % 2])) for k, n in enumerate(runs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for st, _ in mine.values():
            st.close()
        recorded = {_run(store, r.id).precision for r in runs.values()}
        assert len(recorded) == 1 and set(got.values()) == recorded, (stage, got, recorded)
