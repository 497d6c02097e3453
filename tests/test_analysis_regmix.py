"""Issue 5 on real results: RegMix's 256 mixtures, 1M-parameter proxy losses against 60M-parameter losses.

The fixtures (tests/fixtures/regmix, MIT, Sea AI Lab) are converted to rbridge's
result CSV here; the imports, fit and predict run through the CLI in subprocesses
against a real SQLite file, and the decision_accuracy view is checked against an
independent pair count and scipy's Kendall tau-b.
"""

from __future__ import annotations

import csv
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from scipy.stats import kendalltau

FIX = Path(__file__).resolve().parent / "fixtures" / "regmix"
DOMAINS = ("pile_cc", "arxiv")  # two of the 13 domains keep the test fast
CLI = [sys.executable, "-c", "from rbridge.cli import main; main()"]


def _regmix(name: str) -> dict[str, dict[str, float]]:
    """{mixture: {domain: loss}} from one RegMix file."""
    out: dict[str, dict[str, float]] = {}
    with open(FIX / name, newline="") as f:
        for row in csv.DictReader(f):
            mix = f"mix{int(row['index']):03d}"
            out[mix] = {k[len("metric/the_pile_"):-len("_val_loss")]: float(v)
                        for k, v in row.items() if k != "index"}
    return out


def _write(path: Path, data: dict[str, dict[str, float]], params: int, mixes=None) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["candidate", "benchmark", "metric", "value", "params"])
        for mix in sorted(mixes or data):
            for dom in DOMAINS:
                w.writerow([mix, dom, "loss", repr(data[mix][dom]), params])


def _cli(*args, cwd: Path) -> subprocess.CompletedProcess:
    """The real command in a subprocess (imports and fit)."""
    env = {k: v for k, v in os.environ.items() if k != "RBRIDGE_DEBUG"}
    return subprocess.run([*CLI, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def _cli_fast(*args, cwd: Path) -> subprocess.CompletedProcess:
    """The same command in-process (click's runner): each subprocess costs ~2 s of imports."""
    from click.testing import CliRunner

    from rbridge.cli import main

    old = Path.cwd()
    os.chdir(cwd)
    try:
        res = CliRunner().invoke(main, list(args), catch_exceptions=False)
    finally:
        os.chdir(old)
    return subprocess.CompletedProcess(args, res.exit_code, res.stdout, res.stderr)


def _independent(proxy: dict[str, float], target: dict[str, float]) -> tuple[float, int]:
    """Decision accuracy by plain pair counting (both losses: lower is better)."""
    names = sorted(proxy)
    correct = 0.0
    pairs = 0
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if target[a] == target[b]:
                continue
            pairs += 1
            if proxy[a] == proxy[b]:
                correct += 0.5
            elif (proxy[a] < proxy[b]) == (target[a] < target[b]):
                correct += 1
    return correct / pairs, pairs


@pytest.fixture(scope="module")
def regmix(tmp_path_factory):
    d = tmp_path_factory.mktemp("regmix")
    p1m, p60m = _regmix("test_pile_loss_1m.csv"), _regmix("test_pile_loss_60m.csv")
    assert len(p1m) == len(p60m) == 256 and set(p1m) == set(p60m)
    _write(d / "proxy_1m.csv", p1m, 1_000_000)
    _write(d / "target_60m.csv", p60m, 60_000_000)
    r = _cli("results", "import", "proxy_1m.csv", "--store", "regmix.db", "--stage", "regmix-1m", cwd=d)
    assert r.returncode == 0, r.stderr
    assert "512 new" in r.stdout and "new imported plan" in r.stdout
    r = _cli("targets", "import", "target_60m.csv", "--store", "regmix.db", "--json", cwd=d)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["plan"] == "regmix" and rep["inserted"] == 512 and rep["kind"] == "target"
    return d, p1m, p60m


def test_view_matches_independent_count_and_scipy(regmix):
    d, p1m, p60m = regmix
    con = sqlite3.connect(d / "regmix.db")
    con.row_factory = sqlite3.Row
    rows = {r["benchmark"]: dict(r) for r in con.execute(
        "select * from decision_accuracy where plan = 'regmix' and stage = 'regmix-1m'")}
    assert set(rows) == set(DOMAINS)
    for dom in DOMAINS:
        row = rows[dom]
        proxy = {m: v[dom] for m, v in p1m.items()}
        target = {m: v[dom] for m, v in p60m.items()}
        acc, pairs = _independent(proxy, target)
        assert row["n_candidates"] == 256 and row["n_pairs"] == pairs == 256 * 255 // 2
        assert row["proxy_metric"] == "loss" and row["target_metric"] == "loss"
        assert row["decision_accuracy"] == pytest.approx(acc, abs=1e-12)
        names = sorted(proxy)
        tau = kendalltau([proxy[n] for n in names], [target[n] for n in names]).statistic
        assert row["kendall_tau"] == pytest.approx(tau, abs=1e-12)
        assert 0.9 < row["decision_accuracy"] < 1.0  # 1M losses rank RegMix's mixtures well
    # The Python functions give the same numbers as the view.
    from rbridge.analysis.decision import decision_accuracy, decision_accuracy_view
    from rbridge.store import open_store

    st = open_store(d / "regmix.db")
    try:
        py = decision_accuracy(st, "regmix")
        view = decision_accuracy_view(st, "regmix")
    finally:
        st.close()
    assert [(r["benchmark"], r["n_pairs"], r["concordant"], r["discordant"]) for r in py] == \
        [(r["benchmark"], r["n_pairs"], r["concordant"], r["discordant"]) for r in view]
    for a, b in zip(py, view):
        assert a["decision_accuracy"] == pytest.approx(b["decision_accuracy"], abs=1e-12)
        assert a["kendall_tau"] == pytest.approx(b["kendall_tau"], abs=1e-12)


def test_reimport_is_idempotent_and_changes_are_recorded(regmix):
    d, _p1m, p60m = regmix
    db = d / "regmix.db"

    def snapshot():
        con = sqlite3.connect(db)
        return (con.execute("select id, value, updated_at, imported_at from results order by id").fetchall(),
                con.execute("select count(*) from result_changes").fetchone()[0])

    before = snapshot()
    r = _cli("targets", "import", "target_60m.csv", "--store", "regmix.db", cwd=d)
    assert r.returncode == 0, r.stderr
    assert "0 new, 0 updated, 512 unchanged" in r.stdout
    assert snapshot() == before

    # Change one target value: the row is updated and the change logged with old and new values.
    changed = d / "target_60m_fixed.csv"
    text = (d / "target_60m.csv").read_text().splitlines()
    old = p60m["mix007"]["pile_cc"]
    text = [ln.replace(repr(old), "3.25") if ln.startswith("mix007,pile_cc,") else ln for ln in text]
    changed.write_text("\n".join(text) + "\n")
    r = _cli_fast("targets", "import", str(changed), "--store", "regmix.db", "--json", cwd=d)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert (rep["inserted"], rep["updated"], rep["unchanged"]) == (0, 1, 511)
    con = sqlite3.connect(db)
    log = con.execute("select candidate, benchmark, metric, field, old_value, new_value, source "
                      "from result_changes").fetchall()
    assert log == [("mix007", "pile_cc", "loss", "value", old, 3.25, str(changed.resolve()))]
    assert con.execute("select value from target_values where candidate = 'mix007' and benchmark = 'pile_cc'"
                       ).fetchone() == (3.25,)
    # Putting the original back is one more recorded change; then everything is as before.
    r = _cli_fast("targets", "import", "target_60m.csv", "--store", "regmix.db", cwd=d)
    assert r.returncode == 0 and "1 updated" in r.stdout
    assert con.execute("select count(*) from result_changes").fetchone() == (2,)
    assert con.execute("select value from target_values where candidate = 'mix007' and benchmark = 'pile_cc'"
                       ).fetchone() == (old,)


def test_fit_and_predict_through_the_cli(regmix):
    d, p1m, p60m = regmix
    # Zero-shot transfer: a second plan in the same store with targets for 200 mixtures only.
    held = sorted(p60m)[200:]
    _write(d / "target_200.csv", p60m, 60_000_000, mixes=sorted(p60m)[:200])
    for args in (("results", "import", "proxy_1m.csv", "--store", "regmix.db", "--stage", "1m", "--plan", "half"),
                 ("targets", "import", "target_200.csv", "--store", "regmix.db", "--plan", "half")):
        r = _cli_fast(*args, cwd=d)
        assert r.returncode == 0, r.stderr
    r = _cli("fit", "--store", "regmix.db", "--plan", "half", "--benchmark", "pile_cc", "--x", "loss", "--json",
             cwd=d)
    assert r.returncode == 0, r.stderr
    (fit,) = json.loads(r.stdout)["fits"]
    assert fit["n_points"] == 200 and fit["family"] in ("linear", "quadratic", "exponential", "logarithmic")
    assert fit["cv_train_r2"] > 0.95 and 0 < fit["cv_test_mae"] < 0.1
    con = sqlite3.connect(d / "regmix.db")
    assert con.execute("select count(*) from fits f join plans p on p.id = f.plan_id where p.name = 'half'"
                       ).fetchone() == (1,)
    r = _cli_fast("fit", "--store", "regmix.db", "--plan", "half", cwd=d)  # the human table
    assert r.returncode == 0 and "pile_cc" in r.stdout and "arxiv" in r.stdout, r.stderr

    r = _cli_fast("predict", "--store", "regmix.db", "--plan", "half", "--benchmark", "pile_cc", "--json", cwd=d)
    assert r.returncode == 0, r.stderr
    (pred,) = json.loads(r.stdout)["predictions"]
    rows = pred["predictions"]
    assert sorted(p["candidate"] for p in rows) == held  # exactly the mixtures without targets
    assert [p["rank"] for p in rows] == list(range(1, 57))
    values = [p["predicted"] for p in rows]
    assert values == sorted(values)  # loss: lowest predicted first
    actual = [p60m[p["candidate"]]["pile_cc"] for p in rows]
    covered = sum(p["low"] <= a <= p["high"] for p, a in zip(rows, actual))
    assert covered >= 0.75 * len(rows)  # a 90% interval from CV residuals
    assert sum(abs(p["predicted"] - a) for p, a in zip(rows, actual)) / len(rows) < 0.1
    r = _cli_fast("predict", "--store", "regmix.db", "--plan", "half", cwd=d)
    assert r.returncode == 0 and "mix2" in r.stdout, r.stderr
    r = _cli_fast("accuracy", "--store", "regmix.db", "--plan", "regmix", cwd=d)
    assert r.returncode == 0 and "pile_cc" in r.stdout, r.stderr
