"""PostgreSQL stores against a real server on loopback (issue 6, part 1).

The server is conftest.py's ``pg_server`` fixture (Debian's PostgreSQL on 127.0.0.1).

The tiny plan of test_plan_e2e runs through the CLI on SQLite and on PostgreSQL;
the two stores must agree on every view.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import new_database as _new_database
from conftest import psycopg
from rbridge.store.db import advisory_key, store_url
from conftest import gsm8k_lines
from test_plan_e2e import SPEC, TARGETS

# One worker runs the module: its module-scoped plan fixture is built once, not once per pytest -n worker.
pytestmark = [pytest.mark.xdist_group("postgres"), pytest.mark.long(60)]  # about a minute as a group

PLAN_KEY = advisory_key("rbridge plan:tiny")


def _pg_rows(url: str, sql: str) -> list[tuple]:
    with psycopg.connect(url) as con:
        return con.execute(sql).fetchall()


# ---------------------------------------------------------------------------- CLI
def _env(cache: Path) -> dict:
    return dict(os.environ, RBRIDGE_CACHE=str(cache), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def _rbridge(*args, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rbridge.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def _plan_dir(root: Path, name: str) -> Path:
    d = root / name
    d.mkdir()
    (d / "traces.jsonl").write_text(gsm8k_lines(12))
    (d / "tiny.yaml").write_text(SPEC)
    (d / "targets.csv").write_text(TARGETS)
    return d


def _lock_holders(url: str) -> list[str]:
    return [r[0] for r in _pg_rows(url, f"""
        SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
        WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
          AND ((l.classid::bigint << 32) | l.objid::bigint) = {PLAN_KEY}""")]


@pytest.fixture(scope="module")
def plans(pg_server, tmp_path_factory, shared_cache):
    """The tiny plan on SQLite, then on PostgreSQL with the lock checks around it; targets imported into both."""
    root = tmp_path_factory.mktemp("pg")
    cache = shared_cache
    lite = _plan_dir(root, "sqlite")
    res = _rbridge("plan", "tiny.yaml", cwd=lite, env=_env(cache))
    assert res.returncode == 0, res.stdout + res.stderr
    pg = _plan_dir(root, "postgres")
    url = _new_database(pg_server, "tiny")
    env = _env(cache)
    checks: dict = {}

    # 1. A process holding the plan's lock (the planner's own plan_lock) refuses a plan;
    #    SIGKILLed, it leaves no stale lock behind.
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom rbridge.planner.plan import plan_lock\n"
        "with plan_lock(sys.argv[1], 'tiny'):\n    print('locked', flush=True)\n    time.sleep(300)\n"), url],
        cwd=pg, env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        checks["held_by_holder"] = _lock_holders(url)
        checks["refused_by_holder"] = _rbridge("plan", "tiny.yaml", "--store", url, cwd=pg, env=env)
        checks["holder_pid"] = holder.pid
    finally:
        holder.kill()
        holder.wait()
    checks["after_kill"] = _lock_holders(url)

    # 2. The plan itself, with a second concurrent `rbridge plan` started once it holds the lock.
    first = subprocess.Popen([sys.executable, "-m", "rbridge.cli", "plan", "tiny.yaml", "--store", url], cwd=pg,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not any(f"pid {first.pid} " in h for h in _lock_holders(url)):
        assert first.poll() is None, first.communicate()
        assert time.monotonic() < deadline, "the plan never took its lock"
        time.sleep(0.1)
    checks["second"] = _rbridge("plan", "tiny.yaml", "--store", url, cwd=pg, env=env)
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, out + err
    checks["first_pid"] = first.pid
    checks["first_stdout"] = out
    checks["released"] = _lock_holders(url)
    for d, store in ((lite, "stores/tiny.db"), (pg, url)):
        res = _rbridge("targets", "import", "targets.csv", "--store", store, cwd=d, env=env)
        assert res.returncode == 0, res.stdout + res.stderr
    return lite, pg, url, env, checks


VIEW_SQL = {
    "ranking": "SELECT plan, stage, candidate, benchmark, metric, value, rank, tokens_seen, status, stage_index "
               "FROM ranking ORDER BY stage_index, benchmark, metric, candidate",
    "proxy_values": "SELECT plan, stage, candidate, benchmark, metric, value, higher_is_better, tokens_seen, params, "
                    "source FROM proxy_values ORDER BY stage, candidate, benchmark, metric, source",
    "target_values": "SELECT plan, candidate, benchmark, metric, value, higher_is_better, params, tokens, seed, n_seeds "
                     "FROM target_values ORDER BY candidate, benchmark, metric",
    "decision_accuracy": "SELECT * FROM decision_accuracy ORDER BY stage, benchmark, proxy_metric, target_metric",
}


def _same_rows(a: list[tuple], b: list[tuple], what: str) -> None:
    assert len(a) == len(b), (what, a, b)
    for ra, rb in zip(a, b):
        assert len(ra) == len(rb), (what, ra, rb)
        for x, y in zip(ra, rb):
            if isinstance(x, float) or isinstance(y, float):
                assert x is not None and y is not None and math.isclose(x, y, rel_tol=0, abs_tol=1e-6), (what, ra, rb)
            else:  # SQLite's 0/1 booleans equal PostgreSQL's False/True
                assert x == y, (what, ra, rb)


# ---------------------------------------------------------------------------- tests
def test_store_url_uses_psycopg():
    assert store_url("postgresql://u@h:5432/db") == "postgresql+psycopg://u@h:5432/db"
    assert store_url("postgres://u@h/db") == "postgresql+psycopg://u@h/db"
    assert store_url("postgresql+psycopg2://u@h/db") == "postgresql+psycopg2://u@h/db"
    assert store_url("sqlite:///x.db") == "sqlite:///x.db"


def test_missing_driver_is_one_clear_input_error(tmp_path, monkeypatch):
    from rbridge.errors import InputError
    from rbridge.store import open_store

    monkeypatch.setitem(sys.modules, "psycopg", None)  # import psycopg -> ImportError
    with pytest.raises(InputError) as exc:
        open_store("postgresql://u:secret@127.0.0.1:9/db")
    assert "pip install 'rbridge[postgres]'" in str(exc.value) and "secret" not in str(exc.value)
    code = "import sys; sys.modules['psycopg'] = None\nfrom rbridge.cli import main\nmain()"
    res = subprocess.run([sys.executable, "-c", code, "status", "--store", "postgresql://u:secret@127.0.0.1:9/db"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "PostgreSQL stores need the psycopg driver: pip install 'rbridge" in res.stderr
    assert "Traceback" not in res.stderr and "secret" not in res.stderr


def test_ranking_on_postgres_equals_sqlite(plans):
    lite, _pg, url, _env, checks = plans
    assert "ranking - stage rank" in checks["first_stdout"]
    con = sqlite3.connect(lite / "stores" / "tiny.db")
    a = con.execute(VIEW_SQL["ranking"]).fetchall()
    b = _pg_rows(url, VIEW_SQL["ranking"])
    assert len(a) == 4 * 4 + 2 * 4  # (4 filter + 2 rank candidates) x 4 metrics
    _same_rows(a, b, "ranking")
    # Decisions, runs and the Optuna studies are there too.
    dec = "SELECT rung, COUNT(*), SUM(CASE WHEN kept THEN 1 ELSE 0 END) FROM decisions WHERE stage = 'filter' " \
          "GROUP BY rung ORDER BY rung"
    assert [tuple(r) for r in _pg_rows(url, dec)] == con.execute(dec).fetchall() == [(1, 4, 3), (2, 3, 2)]
    assert {r[0] for r in _pg_rows(url, "SELECT study_name FROM studies")} == {"tiny:filter", "tiny:rank"}
    assert _pg_rows(url, "SELECT COUNT(*) FROM trials")[0][0] == con.execute("SELECT COUNT(*) FROM trials").fetchone()[0]


def test_second_concurrent_plan_is_refused(plans):
    _lite, _pg, _url, _env, checks = plans
    held = checks["held_by_holder"]
    assert len(held) == 1 and f"pid {checks['holder_pid']} " in held[0]
    refused = checks["refused_by_holder"]
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert f"another rbridge plan (rbridge plan pid {checks['holder_pid']} " in refused.stderr
    assert checks["after_kill"] == []  # SIGKILL released it
    second = checks["second"]
    assert second.returncode == 1, second.stdout + second.stderr
    assert f"another rbridge plan (rbridge plan pid {checks['first_pid']} " in second.stderr
    assert "plan 'tiny'" in second.stderr
    assert checks["released"] == []


def test_views_equal_sqlite_after_targets_import(plans):
    lite, pg, url, env, _checks = plans
    con = sqlite3.connect(lite / "stores" / "tiny.db")
    for name, sql in VIEW_SQL.items():
        _same_rows(con.execute(sql).fetchall(), _pg_rows(url, sql), name)
    rows = _pg_rows(url, "SELECT stage, n_candidates, n_pairs, decision_accuracy, kendall_tau FROM decision_accuracy "
                         "WHERE benchmark = 'gsm8k' AND proxy_metric = 'rbridge' ORDER BY stage")
    assert [(r[0], r[1], r[2]) for r in rows] == [("filter", 4, 6), ("rank", 2, 1)]
    assert all(isinstance(r[3], float) and 0.0 <= r[3] <= 1.0 and isinstance(r[4], float) for r in rows)
    # Target and token counts past 2**31 fit (BIGINT columns).
    big = pg / "big.csv"
    big.write_text("candidate,benchmark,metric,value,params,tokens\ncot,gsm8k,loss,1.5,7000000000,20000000000\n")
    res = _rbridge("targets", "import", str(big), "--store", url, cwd=pg, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert _pg_rows(url, "SELECT params, tokens FROM target_values WHERE metric = 'loss'") == [(7_000_000_000,
                                                                                              20_000_000_000)]


def test_status_accuracy_fit_on_postgres(plans):
    lite, pg, url, env, _checks = plans
    st = _rbridge("status", "--store", url, "--json", cwd=pg, env=env)
    assert st.returncode == 0, st.stdout + st.stderr
    info = json.loads(st.stdout)
    ref = json.loads(_rbridge("status", "--store", "stores/tiny.db", "--json", cwd=lite, env=env).stdout)
    assert info["status"] == "done" and [s["name"] for s in info["stages"]] == ["filter", "rank"]
    assert [s["survivors"] for s in info["stages"]] == [s["survivors"] for s in ref["stages"]]
    assert [[(c["candidate"], c["rank"], c["tokens_seen"]) for c in s["candidates"]] for s in info["stages"]] == \
        [[(c["candidate"], c["rank"], c["tokens_seen"]) for c in s["candidates"]] for s in ref["stages"]]
    assert info["compute"]["train_flops"] == pytest.approx(ref["compute"]["train_flops"])
    acc = _rbridge("accuracy", "--store", url, "--json", cwd=pg, env=env)
    assert acc.returncode == 0, acc.stdout + acc.stderr
    rows = [r for r in json.loads(acc.stdout)["decision_accuracy"]
            if r["proxy_metric"] == "rbridge" and r["target_metric"] == "accuracy"]
    assert [(r["stage"], r["n_pairs"]) for r in rows] == [("filter", 6), ("rank", 1)]
    fit = _rbridge("fit", "--store", url, "--json", cwd=pg, env=env)
    assert fit.returncode == 0, fit.stdout + fit.stderr
    json.loads(fit.stdout)
    missing = _rbridge("status", "--store", url.rsplit("/", 1)[0] + "/nosuch", cwd=pg, env=env)
    assert missing.returncode == 2 and "cannot connect to the store" in missing.stderr
