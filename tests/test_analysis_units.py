"""Issue 5 in the small: ties, metric direction, seeds, bad files, the four fit families,
planner stages in the views, and decision accuracy against compute. Real SQLite files in tmp_path."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from scipy.stats import kendalltau

from rbridge.analysis.decision import accuracy_vs_compute, analysis_summary, decision_accuracy, pair_stats
from rbridge.analysis.fit import fit_curve
from rbridge.analysis.results_io import default_higher_is_better, import_results, read_results
from rbridge.cli import main
from rbridge.errors import InputError
from rbridge.store import Candidate, Evaluation, Plan, Run, open_store
from sqlmodel import select


def _invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def _csv(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def _rows(db: Path, sql: str) -> list[dict]:
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    return [dict(r) for r in con.execute(sql)]


# ---------------------------------------------------------------------------- ties and direction
TARGET_LOSS = {"A": 1.0, "B": 2.0, "C": 3.0, "D": 3.0, "E": 4.0}  # C and D tie on the target
PROXY_ACC = {"A": 0.9, "B": 0.7, "C": 0.7, "D": 0.5, "E": 0.6}  # B and C tie on the proxy


def test_ties_and_direction_in_view_and_python(tmp_path):
    db = tmp_path / "s.db"
    _csv(tmp_path / "t.csv", "candidate,benchmark,metric,value",
         [f"{c},bench,loss,{v}" for c, v in TARGET_LOSS.items()])
    # The same numbers twice: as an accuracy (higher is better, by name) and as a lower-is-better metric.
    _csv(tmp_path / "p.csv", "candidate,benchmark,metric,value,higher_is_better",
         [f"{c},bench,acc,{v}," for c, v in PROXY_ACC.items()]
         + [f"{c},bench,flipped,{v},false" for c, v in PROXY_ACC.items()])
    assert _invoke("targets", "import", str(tmp_path / "t.csv"), "--store", str(db)).exit_code == 0
    assert _invoke("results", "import", str(tmp_path / "p.csv"), "--store", str(db), "--stage", "s").exit_code == 0
    view = {r["proxy_metric"]: r for r in _rows(db, "select * from decision_accuracy")}
    # 10 pairs, C-D tied on the target leaves 9; B-C tied on the proxy counts half; D-E is wrong:
    # 7 right + 0.5 = 7.5 / 9.
    acc = view["acc"]
    assert (acc["n_candidates"], acc["n_pairs"], acc["proxy_ties_counted_half"], acc["target_ties"]) == (5, 9, 1, 1)
    assert acc["decision_accuracy"] == pytest.approx(7.5 / 9)
    names = sorted(PROXY_ACC)
    tau = kendalltau([PROXY_ACC[n] for n in names], [-TARGET_LOSS[n] for n in names]).statistic
    assert acc["kendall_tau"] == pytest.approx(tau) and tau > 0
    # Read as lower-is-better, every untied pair flips: only D-E is right, plus the half.
    flipped = view["flipped"]
    assert flipped["decision_accuracy"] == pytest.approx(1.5 / 9)
    assert flipped["kendall_tau"] == pytest.approx(-tau)
    st = open_store(db)
    try:
        py = {r["proxy_metric"]: r for r in decision_accuracy(st)}
    finally:
        st.close()
    for m in ("acc", "flipped"):
        assert py[m]["decision_accuracy"] == pytest.approx(view[m]["decision_accuracy"])
        assert py[m]["kendall_tau"] == pytest.approx(view[m]["kendall_tau"])
    # pair_stats alone, and all proxy values tied: every pair counts half, tau undefined.
    st = pair_stats([1, 1, 1], [1, 2, 3], proxy_higher_is_better=True, target_higher_is_better=True)
    assert st["decision_accuracy"] == 0.5 and st["kendall_tau"] is None and st["n_pairs"] == 3


def test_direction_defaults():
    for name in ("accuracy", "acc", "acc_norm", "pass@1", "pass@k", "gsm8k_accuracy"):
        assert default_higher_is_better(name) is True, name
    for name in ("loss", "nll", "rbridge", "bpb", "rbridge_no_minmax", "val_loss", "pile_cc_loss"):
        assert default_higher_is_better(name) is False, name
    assert default_higher_is_better("foo") is None


# ---------------------------------------------------------------------------- seeds
def test_seed_averaging_and_choosing_a_seed(tmp_path):
    db = tmp_path / "s.db"
    f = _csv(tmp_path / "t.jsonl", "", [])
    lines = []
    for cand, vals in (("a", [0.30, 0.40, 0.50]), ("b", [0.20, 0.25, 0.60])):
        for seed, v in enumerate(vals):
            lines.append(json.dumps({"candidate": cand, "benchmark": "gsm8k", "metric": "accuracy", "value": v,
                                     "seed": seed, "params": 1e9, "tokens": 2e10}))
    f.write_text("\n".join(lines) + "\n")
    rows = {r.candidate: r for r in read_results(f)}
    assert rows["a"].value == pytest.approx(0.40) and rows["a"].n_seeds == 3 and rows["a"].seed is None
    assert rows["b"].value == pytest.approx(0.35) and rows["a"].seeds == "0,1,2"
    assert rows["a"].params == 10**9 and rows["a"].tokens == 2 * 10**10 and rows["a"].higher_is_better
    r = _invoke("targets", "import", str(f), "--store", str(db), "--plan", "p")
    assert r.exit_code == 0, r.output
    got = {x["candidate"]: x for x in _rows(db, "select * from target_values")}
    assert got["a"]["value"] == pytest.approx(0.40) and got["a"]["n_seeds"] == 3 and got["a"]["seed"] is None
    # One seed instead of the mean: the values change and the change is recorded.
    r = _invoke("targets", "import", str(f), "--store", str(db), "--plan", "p", "--seed", "2", "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    assert rep["updated"] == 2
    got = {x["candidate"]: x for x in _rows(db, "select * from target_values")}
    assert got["a"]["value"] == pytest.approx(0.50) and got["b"]["value"] == pytest.approx(0.60)
    assert got["a"]["seed"] == 2 and got["a"]["n_seeds"] == 1
    fields = {(c["candidate"], c["field"]) for c in _rows(db, "select * from result_changes")}
    assert {("a", "value"), ("a", "seed"), ("a", "n_seeds"), ("b", "value")} <= fields
    r = _invoke("targets", "import", str(f), "--store", str(db), "--plan", "p", "--seed", "7")
    assert r.exit_code == 2 and "no row with seed 7" in r.output


# ---------------------------------------------------------------------------- bad files
def test_bad_csv_exits_2_naming_file_line_column_and_writes_nothing(tmp_path):
    db = tmp_path / "s.db"
    good = _csv(tmp_path / "good.csv", "candidate,benchmark,metric,value", ["a,b,loss,1.0", "c,b,loss,2.0"])
    assert _invoke("targets", "import", str(good), "--store", str(db)).exit_code == 0
    before = _rows(db, "select * from results"), _rows(db, "select * from plans")
    bad = _csv(tmp_path / "bad.csv", "candidate,benchmark,metric,value",
               ["a,b,loss,1.5", "c,b,loss,2.5", "d,b,loss,oops", "e,b,loss,3.0"])
    env = {k: v for k, v in os.environ.items() if k != "RBRIDGE_DEBUG"}
    r = subprocess.run([sys.executable, "-c", "from rbridge.cli import main; main()", "targets", "import",
                        str(bad), "--store", str(db)], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2
    assert f"{bad}:4: value: not a number: 'oops'" in r.stderr and "Traceback" not in r.stderr
    assert (_rows(db, "select * from results"), _rows(db, "select * from plans")) == before
    cases = [
        ("candidate,benchmark,metric", ["a,b,loss"], ":1: value: missing column"),
        ("candidate,benchmark,metric,value,colour", ["a,b,loss,1,red"], ":1: colour: unknown column"),
        ("candidate,benchmark,metric,value", ["a,b,loss,1", "a,b,loss,2"], ":3: duplicate result"),
        ("candidate,benchmark,metric,value", ["a,b,loss,1", "c,b,loss"], ":3: 3 cells"),
        ("candidate,benchmark,metric,value", ["a,b,foo,1"], ":2: higher_is_better: cannot tell"),
        ("candidate,benchmark,metric,value,higher_is_better", ["a,b,m,1,true", "c,b,m,2,false"],
         ":3: higher_is_better: metric 'm'"),
        ("candidate,benchmark,metric,value,seed", ["a,b,loss,1,0", "a,b,loss,1,x"], ":3: seed: not a number"),
        ("candidate,benchmark,metric,value", ["a,b,loss,nan"], ":2: value: not a finite number"),
        ("candidate,benchmark,metric,value", ["a,,loss,1"], ":2: benchmark: empty"),
        ("candidate,benchmark,metric,value,higher_is_better", ["a,b,loss,1,true"],
         ":2: higher_is_better: metric 'loss' is stored"),  # contradicts the store: refused in the transaction
    ]
    for i, (header, rows, msg) in enumerate(cases):
        f = _csv(tmp_path / f"bad{i}.csv", header, rows)
        r = _invoke("targets", "import", str(f), "--store", str(db))
        assert r.exit_code == 2, (header, rows, r.output)
        assert f"{f}{msg}" in r.output.replace("\n", ""), r.output
    assert (_rows(db, "select * from results"), _rows(db, "select * from plans")) == before
    # A bad file never creates the store.
    r = _invoke("targets", "import", str(tmp_path / "bad.csv"), "--store", str(tmp_path / "new.db"))
    assert r.exit_code == 2 and not (tmp_path / "new.db").exists()
    r = _invoke("results", "import", str(good), "--store", str(db), "--stage", "target")
    assert r.exit_code == 2 and "reserved" in r.output


# ---------------------------------------------------------------------------- fits
@pytest.mark.parametrize("family,fn,true", [
    ("linear", lambda x: 0.9 - 0.08 * x, {"a": -0.08, "b": 0.9}),
    ("logarithmic", lambda x: 0.2 + 0.15 * np.log(x), {"a": 0.15, "b": 0.2}),
    ("quadratic", lambda x: 0.02 * x**2 - 0.16 * x + 0.5, {"a": 0.02, "b": -0.16, "c": 0.5}),
    ("exponential", lambda x: 0.8 - 0.5 * np.exp(-0.4 * x), None),
])
def test_fit_recovers_each_family(family, fn, true):
    rng = np.random.default_rng(3)
    x = np.sort(rng.uniform(1.0, 10.0, 40))
    y = fn(x) + rng.normal(0, 1e-4, len(x))
    res = fit_curve(x, y, folds=5, seed=0)
    assert res.family == family, res.families
    assert res.cv_train_r2 > 0.999 and res.cv_test_mae < 1e-3
    assert len(res.cv_residuals) == 40
    if true is not None:
        for k, v in true.items():
            assert res.params[k] == pytest.approx(v, rel=2e-2, abs=2e-3)
    else:  # a*exp(b*(x - x0)) + c with a = -0.5*exp(-0.4*x0)
        p = res.params
        assert p["b"] == pytest.approx(-0.4, rel=2e-2) and p["c"] == pytest.approx(0.8, abs=5e-3)
        assert p["a"] * np.exp(-p["b"] * p["x0"]) == pytest.approx(-0.5, rel=5e-2)
    xs = np.linspace(1.5, 9.5, 7)
    assert np.allclose(res.predict(xs), fn(xs), atol=2e-3)
    # Folds are fixed by the seed.
    again = fit_curve(x, y, folds=5, seed=0)
    assert again.cv_test_mae == res.cv_test_mae


def test_fit_needs_points():
    with pytest.raises(InputError, match="at least 5"):
        fit_curve([1, 2, 3], [1, 2, 3])


# ---------------------------------------------------------------------------- planner stages
def _planner_store(db: Path) -> None:
    """A plan as the planner writes it: stage 'filter', 2 rungs, candidate d pruned at rung 1."""
    st = open_store(db)
    with st.session() as s:
        plan = Plan(name="tiny", spec_text="name: tiny\n", spec_hash="h", status="done")
        s.add(plan)
        s.flush()
        # rbridge (lower is better) at rung 1 and 2; d has the best rung-1 score but was dropped.
        scores = {"a": (2.0, 1.5), "b": (2.2, 1.7), "c": (2.1, 1.9), "d": (1.9, None)}
        for i, (name, (r1, r2)) in enumerate(scores.items()):
            cand = Candidate(plan_id=plan.id, name=name, mix=json.dumps({name: 1.0}), position=i)
            s.add(cand)
            s.flush()
            run = Run(plan_id=plan.id, stage="filter", stage_index=0, candidate_id=cand.id, config="{}",
                      non_embedding_params=100, tokens_target=2000, tokens_seen=2000 if r2 else 1000,
                      status="done" if r2 else "pruned")
            s.add(run)
            s.flush()
            s.add(Evaluation(run_id=run.id, rung=1, tokens_seen=1000, benchmark="gsm8k", metric="rbridge", value=r1))
            s.add(Evaluation(run_id=run.id, rung=1, tokens_seen=1000, benchmark="gsm8k", metric="nll", value=r1 + 1))
            if r2:
                s.add(Evaluation(run_id=run.id, rung=2, tokens_seen=2000, benchmark="gsm8k", metric="rbridge",
                                 value=r2))
                s.add(Evaluation(run_id=run.id, rung=2, tokens_seen=2000, benchmark="gsm8k", metric="nll",
                                 value=r2 + 1))
    st.close()


def test_planner_stage_against_targets_and_compute(tmp_path):
    db = tmp_path / "tiny.db"
    _planner_store(db)
    # Target accuracy: a > b > d > c.
    t = _csv(tmp_path / "t.csv", "candidate,benchmark,metric,value",
             ["a,gsm8k,accuracy,0.6", "b,gsm8k,accuracy,0.5", "c,gsm8k,accuracy,0.3", "d,gsm8k,accuracy,0.4",
              "zeta,gsm8k,accuracy,0.9"])  # a candidate the planner never saw: ignored by the views
    r = _invoke("targets", "import", str(t), "--store", str(db))
    assert r.exit_code == 2 and "zeta" in r.output and "--new-candidates" in r.output  # a typo, by default
    r = _invoke("targets", "import", str(t), "--store", str(db), "--new-candidates")  # the store's only plan
    assert r.exit_code == 0 and "into plan 'tiny'" in r.output, r.output
    # The planner's own stage cannot be overwritten by imported results.
    r = _invoke("results", "import", str(t), "--store", str(db), "--stage", "filter")
    assert r.exit_code == 2 and "planner's own runs" in r.output
    view = {r["proxy_metric"]: r for r in _rows(db, "select * from decision_accuracy")}
    # Final ranking as in `ranking`: a(1.5) b(1.7) c(1.9) at 2000 tokens, then d (dropped at 1000).
    # Pairs against a > b > d > c: a-b ok, a-c ok, a-d ok, b-c ok, b-d ok, c-d wrong -> 5/6.
    assert view["rbridge"]["n_candidates"] == 4 and view["rbridge"]["decision_accuracy"] == pytest.approx(5 / 6)
    ranking = _rows(db, "select candidate, rank from ranking where metric = 'rbridge' order by rank")
    assert [r["candidate"] for r in ranking] == ["a", "b", "c", "d"]
    st = open_store(db)
    try:
        curve = accuracy_vs_compute(st, "tiny")
        summary = analysis_summary(st, "tiny")
    finally:
        st.close()
    rb = {r["rung"]: r for r in curve if r["proxy_metric"] == "rbridge"}
    assert rb[1]["stage_flops"] == 4 * 6 * 100 * 1000
    assert rb[2]["stage_flops"] == 3 * 6 * 100 * 2000 + 6 * 100 * 1000 == rb[2]["plan_flops"]
    # Rung 1: d(1.9) a(2.0) c(2.1) b(2.2) vs a > b > d > c: a-b ok, a-c ok, a-d wrong, b-c wrong,
    # b-d wrong, c-d ok -> 3/6.
    assert rb[1]["decision_accuracy"] == pytest.approx(3 / 6) and rb[1]["rung_candidates"] == 4
    assert rb[2]["decision_accuracy"] == pytest.approx(5 / 6)
    assert rb[2]["rung_candidates"] == 3 and rb[2]["rung_decision_accuracy"] == pytest.approx(1.0)
    assert summary["targets"] == 5 and len(summary["decision_accuracy"]) == 2
    assert {r["proxy_metric"] for r in summary["accuracy_vs_compute"]} == {"rbridge", "nll"}
    r = _invoke("accuracy", "--store", str(db), "--json")
    assert r.exit_code == 0 and json.loads(r.output)["decision_accuracy"][0]["stage"] == "filter"


def test_imported_checkpoints_are_rungs(tmp_path):
    db = tmp_path / "s.db"
    rows = []
    for c, (v1, v2) in {"a": (3.0, 2.0), "b": (2.5, 2.4), "c": (3.5, 2.6)}.items():
        rows += [f"{c},web,loss,{v1},1000000,1000", f"{c},web,loss,{v2},1000000,4000"]
    p = _csv(tmp_path / "p.csv", "candidate,benchmark,metric,value,params,tokens", rows)
    t = _csv(tmp_path / "t.csv", "candidate,benchmark,metric,value", ["a,web,loss,1.0", "b,web,loss,1.1",
                                                                      "c,web,loss,1.2"])
    assert _invoke("results", "import", str(p), "--store", str(db), "--stage", "ckpt").exit_code == 0
    assert _invoke("targets", "import", str(t), "--store", str(db)).exit_code == 0
    # proxy_values: the last checkpoint; decision accuracy 1.0 there.
    (row,) = _rows(db, "select * from decision_accuracy")
    assert row["decision_accuracy"] == 1.0 and row["kendall_tau"] == pytest.approx(1.0)
    st = open_store(db)
    try:
        curve = {r["rung"]: r for r in accuracy_vs_compute(st)}
    finally:
        st.close()
    assert curve[1]["tokens"] == 1000 and curve[1]["stage_flops"] == 3 * 6 * 1e6 * 1000
    assert curve[1]["decision_accuracy"] == pytest.approx(2 / 3)  # b first at 1000 tokens: b-a wrong
    assert curve[2]["stage_flops"] == 3 * 6 * 1e6 * 4000 and curve[2]["decision_accuracy"] == 1.0


def test_import_into_named_plan_and_store_with_two_plans(tmp_path):
    db = tmp_path / "s.db"
    f = _csv(tmp_path / "t.csv", "candidate,benchmark,metric,value", ["a,b,acc,0.5"])
    st = open_store(db)
    try:
        rep = import_results(st, f, stage=None, plan_name="one")
        assert rep.plan_created and rep.inserted == 1
        rep = import_results(st, f, stage=None, plan_name="two")
        with pytest.raises(InputError, match="pass --plan"):
            import_results(st, f, stage=None)
        plan = _rows(db, "select name, spec_text, spec_hash, status from plans order by id")
    finally:
        st.close()
    assert plan == [{"name": "one", "spec_text": "", "spec_hash": "", "status": "imported"},
                    {"name": "two", "spec_text": "", "spec_hash": "", "status": "imported"}]


# ---------------------------------------------------------------------------- fast pair counting (issue 14)
def _brute_pair_stats(proxy, target, proxy_hib, target_hib, tokens=None) -> dict:
    """METHOD.md section 5 pair by pair, in plain Python: the reference the O(n log n) counts must equal."""
    n = len(proxy)
    sign = lambda a, b: (a > b) - (a < b)  # noqa: E731
    px = [v if proxy_hib else -v for v in proxy]
    ty = [v if target_hib else -v for v in target]
    tk = [0 if t is None else t for t in tokens] if tokens is not None else [0] * n
    c = d = tx = tyy = txo = 0
    for i in range(n):
        for j in range(i + 1, n):
            sx = sign(tk[i], tk[j]) or sign(px[i], px[j])
            sy = sign(ty[i], ty[j])
            c += sx * sy > 0
            d += sx * sy < 0
            tx += sx == 0
            tyy += sy == 0
            txo += sx == 0 and sy != 0
    n_all = n * (n - 1) // 2
    n_pairs = n_all - tyy
    return {"n_candidates": n, "n_pairs": n_pairs,
            "decision_accuracy": (c + 0.5 * txo) / n_pairs if n_pairs > 0 else None,
            "kendall_tau": ((c - d) / (float(n_all - tx) * float(n_all - tyy)) ** 0.5
                            if n_all - tx > 0 and n_all - tyy > 0 else None),
            "concordant": c, "discordant": d, "proxy_ties_counted_half": txo, "target_ties": tyy}


def test_inversion_count_against_brute_force():
    from rbridge.analysis.decision import _inversions

    rng = np.random.default_rng(3)
    for n in (0, 1, 2, 3, 5, 8, 17, 64, 100, 257):
        for span in (1, 2, 5, 1000):
            a = rng.integers(0, span, size=n)
            want = sum(int(a[i] > a[j]) for i in range(n) for j in range(i + 1, n))
            assert _inversions(a) == want, (n, span)


def test_pair_stats_equals_the_pairwise_count_on_random_data_with_ties():
    """Every count, the accuracy and tau, exactly (not approximately): small value ranges force ties on
    the proxy, on the target, on both, and on the tokens; both directions; with and without tokens."""
    rng = np.random.default_rng(14)
    for trial in range(120):
        n = int(rng.integers(0, 60))
        levels = int(rng.integers(1, 8))
        proxy = (rng.integers(0, levels, size=n) / 4).tolist()
        target = (rng.integers(0, int(rng.integers(1, 8)), size=n) * 0.1).tolist()
        tokens = None
        if trial % 3:
            tokens = [None if rng.random() < 0.1 else int(v) * 1000 for v in rng.integers(1, 4, size=n)]
        hib = (bool(trial % 2), bool(trial % 5))
        got = pair_stats(proxy, target, proxy_higher_is_better=hib[0], target_higher_is_better=hib[1],
                         proxy_tokens=tokens)
        assert got == _brute_pair_stats(proxy, target, *hib, tokens), trial
    # Infinities order like any value; a NaN (SQL's NULL: tied with everything) is no order, and is
    # counted pair by pair, as the view does.
    inf = float("inf")
    for proxy in ([inf, -inf, 1.0, 1.0, inf], [float("nan"), 1.0, 2.0, 1.0, 0.5]):
        target = [1, 2, 3, 3, 5]
        assert pair_stats(proxy, target, proxy_higher_is_better=True) == _brute_pair_stats(proxy, target, True, True)
    # Distinct values, and scipy's tau-b as a third opinion.
    x, y = rng.normal(size=300), rng.normal(size=300)
    got = pair_stats(x, y, proxy_higher_is_better=True)
    assert got == _brute_pair_stats(x.tolist(), y.tolist(), True, True)
    assert got["kendall_tau"] == pytest.approx(kendalltau(x, y).statistic, abs=1e-12)


def _mixed_store(db: Path) -> None:
    """A planner stage (ties on proxy and target, a candidate dropped early, two benchmarks and metrics),
    imported targets (one higher-, one lower-is-better) and an imported proxy stage."""
    rng = np.random.default_rng(5)
    st = open_store(db)
    with st.session() as s:
        plan = Plan(name="mixed", spec_text="name: mixed\n", spec_hash="h", status="done")
        s.add(plan)
        s.flush()
        for i in range(40):
            cand = Candidate(plan_id=plan.id, name=f"k{i:02d}", mix="{}", position=i)
            s.add(cand)
            s.flush()
            rungs = 1 + int(rng.integers(0, 3))
            run = Run(plan_id=plan.id, stage="filter", stage_index=0, candidate_id=cand.id, config="{}",
                      non_embedding_params=100, tokens_target=3000, tokens_seen=1000 * rungs,
                      status="done" if rungs == 3 else "pruned")
            s.add(run)
            s.flush()
            for rung in range(1, rungs + 1):
                for bench in ("gsm8k", "math"):
                    s.add(Evaluation(run_id=run.id, rung=rung, tokens_seen=1000 * rung, benchmark=bench,
                                     metric="rbridge", value=float(rng.integers(0, 6)) / 2))
                    s.add(Evaluation(run_id=run.id, rung=rung, tokens_seen=1000 * rung, benchmark=bench,
                                     metric="acc", value=float(rng.integers(0, 4)) / 4, higher_is_better=True))
    st.close()
    rows = []
    for i in range(40):
        rows += [f"k{i:02d},gsm8k,accuracy,{int(rng.integers(0, 5)) / 10}",
                 f"k{i:02d},math,loss,{int(rng.integers(0, 5)) / 10}"]
    t = _csv(db.parent / "t.csv", "candidate,benchmark,metric,value", rows)
    assert _invoke("targets", "import", str(t), "--store", str(db)).exit_code == 0
    p = _csv(db.parent / "p.csv", "candidate,benchmark,metric,value,tokens",
             [f"k{i:02d},gsm8k,loss,{int(rng.integers(0, 4))},{1000 * int(rng.integers(1, 3))}"
              for i in range(0, 40, 2)])
    assert _invoke("results", "import", str(p), "--store", str(db), "--stage", "other").exit_code == 0


def test_commands_give_the_views_numbers(tmp_path):
    """`rbridge accuracy` and `status --json` compute decision accuracy in Python now; their rows must be
    the `decision_accuracy` view's, exactly, on a store with ties, both directions and dropped candidates."""
    db = tmp_path / "m.db"
    _mixed_store(db)
    view = _rows(db, "select * from decision_accuracy order by plan, stage, benchmark, proxy_metric, "
                     "target_metric")
    assert len(view) == 5 and any(r["proxy_ties_counted_half"] for r in view) and any(r["target_ties"] for r in view)
    r = _invoke("accuracy", "--store", str(db), "--no-curve", "--json")
    assert r.exit_code == 0, r.output
    got = json.loads(r.output)
    assert "accuracy_vs_compute" not in got
    ci_keys = ("ci_low", "ci_high", "ci_items", "ci_target_seeds")
    # the bootstrap interval needs per-item values, which imported results lack: present, and empty
    assert all(r[k] is None for r in got["decision_accuracy"] for k in ci_keys)
    assert [{k: v for k, v in r.items() if k not in ci_keys} for r in got["decision_accuracy"]] == view
    st = open_store(db, create=False, read_only=True)
    try:
        assert decision_accuracy(st) == view
        summary = analysis_summary(st, "mixed")["decision_accuracy"]
        assert [{k: v for k, v in r.items() if k not in ci_keys} for r in summary] == view
    finally:
        st.close()


def test_a_candidate_with_two_proxy_rows_is_never_paired_with_itself(tmp_path):
    """The view joins distinct candidates only; a planner run and an imported result under the same stage
    name (the import refuses this; an older store may hold it) give the candidate two rows."""
    from rbridge.store.results import Result

    db = tmp_path / "m.db"
    _mixed_store(db)
    st = open_store(db)
    try:
        with st.session() as s:
            plan_id = s.exec(select(Plan.id)).first()
            for i, v in ((0, 0.5), (1, 1.0), (2, 1.0)):
                s.add(Result(plan_id=plan_id, kind="proxy", stage="filter", candidate=f"k{i:02d}", benchmark="gsm8k",
                             metric="rbridge", value=v, higher_is_better=False, tokens=3000))
        view = _rows(db, "select * from decision_accuracy order by plan, stage, benchmark, proxy_metric, "
                         "target_metric")
        assert decision_accuracy(st) == view
    finally:
        st.close()


def _fit_store(db: Path, xs: dict[str, float | None], pruned: str) -> None:
    """Stage 'filter' at 2000 tokens: each candidate's rbridge value; ``pruned`` stopped at 1000 tokens."""
    st = open_store(db)
    with st.session() as s:
        plan = Plan(name="fitp", spec_text="name: fitp\n", spec_hash="h", status="done")
        s.add(plan)
        s.flush()
        for i, (name, x) in enumerate(xs.items()):
            cand = Candidate(plan_id=plan.id, name=name, mix=json.dumps({name: 1.0}), position=i)
            s.add(cand)
            s.flush()
            tokens = 1000 if name == pruned else 2000
            run = Run(plan_id=plan.id, stage="filter", stage_index=0, candidate_id=cand.id, config="{}",
                      non_embedding_params=100, tokens_target=2000, tokens_seen=tokens,
                      status="pruned" if name == pruned else "done")
            s.add(run)
            s.flush()
            s.add(Evaluation(run_id=run.id, rung=1 if name == pruned else 2, tokens_seen=tokens, benchmark="gsm8k",
                             metric="rbridge", value=x))
    st.close()


def test_fit_warns_when_its_error_exceeds_the_targets_range_and_predict_is_honest(tmp_path):
    """Issue 15: a fit whose out-of-fold error exceeds the targets' spread is flagged; predict lists a
    pruned candidate without a target as stopped early (not as having a target), and clips accuracy
    predictions and intervals to [0, 1]."""
    db = tmp_path / "f.db"
    # rbridge (lower is better) against accuracy; 'far' lies far outside the fitted x range.
    xs = {"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0, "e": 100.0, "new": 0.2, "cut": 1.5}
    _fit_store(db, xs, pruned="cut")
    t = _csv(tmp_path / "t.csv", "candidate,benchmark,metric,value",
             ["a,gsm8k,accuracy,0.5", "b,gsm8k,accuracy,0.6", "c,gsm8k,accuracy,0.7", "d,gsm8k,accuracy,0.8",
              "e,gsm8k,accuracy,0.9"])
    assert _invoke("targets", "import", str(t), "--store", str(db)).exit_code == 0
    r = _invoke("fit", "--store", str(db), "--json")
    assert r.exit_code == 0, r.output
    (fit,) = json.loads(r.output)["fits"]
    assert fit["target_range"] == pytest.approx(0.4) and fit["cv_test_mae"] > 0.4
    assert "exceeds the targets' range" in fit["warning"]
    said = " ".join(_invoke("fit", "--store", str(db)).output.split())  # rich wraps lines
    assert "warning:" in said and "no better than a constant" in said
    r = _invoke("predict", "--store", str(db), "--json")
    assert r.exit_code == 0, r.output
    rows = {p["candidate"]: p for p in json.loads(r.output)["predictions"][0]["predictions"]}
    assert set(rows) == {"new", "cut"}
    assert rows["cut"]["predicted"] is None and rows["cut"]["rank"] is None
    assert "stopped at 1,000 tokens" in rows["cut"]["why"]
    new = rows["new"]
    assert new["rank"] == 1 and 0.0 <= new["low"] <= new["predicted"] <= new["high"] <= 1.0
    said = " ".join(_invoke("predict", "--store", str(db)).output.split())
    assert "stopped at 1,000 tokens" in said and "has a target already" not in said
