"""Many workers on one PostgreSQL store (issue 6): every run exactly once, a killed worker's run taken over.

The tiny plan of test_plan_e2e runs twice on a real PostgreSQL server (conftest's
``pg_server``): once by `rbridge plan` alone, once by `rbridge plan --no-local` with
three `rbridge worker --until-idle` processes, one of which SIGKILLs itself in the
middle of training a run it holds (fail point ``train-step``). That worker calls its
machine "node-b" (RBRIDGE_WORKER_HOST), so the others cannot see that its pid is
gone and must wait for its heartbeats to stop: the cross-machine path.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import new_database
from test_plan_e2e import REPO, SPEC

HEARTBEAT_TIMEOUT = "3"


def _env(cache: Path, **extra) -> dict:
    return dict(os.environ, RBRIDGE_CACHE=str(cache), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                RBRIDGE_POLL_S="0.3", **extra)


def _cmd(*args) -> list[str]:
    return [sys.executable, "-m", "rbridge.cli", *args]


def _setup(d: Path) -> None:
    d.mkdir(parents=True, exist_ok=True)
    lines = (REPO / "specs/traces/gsm8k.jsonl").read_text().splitlines()[:12]
    (d / "traces.jsonl").write_text("\n".join(lines) + "\n")
    (d / "tiny.yaml").write_text(SPEC)


def _rows(url: str, sql: str) -> list[tuple]:
    import psycopg

    with psycopg.connect(url) as con:
        return con.execute(sql).fetchall()


RANKING = ("SELECT stage, candidate, benchmark, metric, value, rank, tokens_seen, status FROM ranking "
           "ORDER BY stage, candidate, benchmark, metric")
DECISIONS = ("SELECT d.stage, d.rung, c.name, d.kept, d.rank, round(d.score::numeric, 9) FROM decisions d "
             "JOIN candidates c ON c.id = d.candidate_id ORDER BY d.stage, d.rung, c.name")


def test_three_workers_one_killed_equal_single_process(pg_server, tmp_path):
    cache = tmp_path / "cache"
    one, many = tmp_path / "one", tmp_path / "many"
    _setup(one)
    _setup(many)
    url_one = new_database(pg_server, "workers_one")
    url_many = new_database(pg_server, "workers_many")

    t0 = time.perf_counter()
    single = subprocess.run(_cmd("plan", "tiny.yaml", "--store", url_one), cwd=one, env=_env(cache),
                            capture_output=True, text=True, timeout=600)
    wall_one = time.perf_counter() - t0
    assert single.returncode == 0, single.stdout + single.stderr

    t0 = time.perf_counter()
    logs = {name: open(many / f"{name}.log", "w") for name in ("plan", "victim", "w1", "w2")}
    # The victim starts first so that it surely holds a run when it dies at its 3rd training step.
    procs = {"victim": subprocess.Popen(
        _cmd("worker", "--store", url_many, "--until-idle", "--heartbeat-timeout", HEARTBEAT_TIMEOUT),
        cwd=many, env=_env(cache, RBRIDGE_FAILPOINT="train-step:3", RBRIDGE_WORKER_HOST="node-b"),
        stdout=logs["victim"], stderr=subprocess.STDOUT)}
    procs["plan"] = subprocess.Popen(_cmd("plan", "tiny.yaml", "--store", url_many, "--no-local"), cwd=many,
                                     env=_env(cache), stdout=logs["plan"], stderr=subprocess.STDOUT)
    for name in ("w1", "w2"):
        procs[name] = subprocess.Popen(
            _cmd("worker", "--store", url_many, "--until-idle", "--heartbeat-timeout", HEARTBEAT_TIMEOUT),
            cwd=many, env=_env(cache), stdout=logs[name], stderr=subprocess.STDOUT)
    codes = {name: p.wait(timeout=600) for name, p in procs.items()}
    wall_many = time.perf_counter() - t0
    for f in logs.values():
        f.close()
    out = {name: (many / f"{name}.log").read_text() for name in procs}
    print(f"\nwall time of the tiny plan: 1 process {wall_one:.1f} s; plan --no-local + 3 workers "
          f"(one killed, heartbeat timeout {HEARTBEAT_TIMEOUT} s) {wall_many:.1f} s")

    assert codes["victim"] == -signal.SIGKILL, out["victim"]
    assert codes["plan"] == 0 and codes["w1"] == 0 and codes["w2"] == 0, out
    # The victim held a run when it died; a survivor took it over after the heartbeat timeout.
    assert "taking over run" in out["w1"] + out["w2"], out
    assert "node-b" in out["w1"] + out["w2"]

    # Every run exactly once: one row per (stage, candidate), one evaluation per (run, rung, benchmark, metric),
    # nothing left running or pending, no Optuna trial left RUNNING.
    assert _rows(url_many, "SELECT stage, count(*) FROM runs GROUP BY stage ORDER BY stage") == \
        [("filter", 4), ("rank", 2)]
    assert _rows(url_many, "SELECT count(*) FROM (SELECT run_id, rung, benchmark, metric FROM evaluations "
                           "GROUP BY run_id, rung, benchmark, metric HAVING count(*) > 1) d") == [(0,)]
    assert _rows(url_many, "SELECT count(*) FROM runs WHERE status IN ('running', 'pending')") == [(0,)]
    assert _rows(url_many, "SELECT count(*) FROM trials WHERE state = 'RUNNING'") == [(0,)]
    # Rungs trained by the three workers add up to the single process's: no run done twice.
    evaluated = _rows(url_many, "SELECT count(DISTINCT (run_id, rung)) FROM evaluations")[0][0]
    assert evaluated == _rows(url_one, "SELECT count(DISTINCT (run_id, rung)) FROM evaluations")[0][0] == 9
    # One claim per rung trained, plus the victim's claim that a survivor took over.
    assert _rows(url_many, "SELECT sum(lease) FROM runs")[0][0] == evaluated + 1
    done_by = [int(line.rsplit(":", 1)[1]) for name in ("w1", "w2") for line in out[name].splitlines()
               if "rungs trained and scored by this worker" in line]
    assert sum(done_by) == evaluated, out

    # The same decisions and ranking as one process.
    assert _rows(url_many, DECISIONS) == _rows(url_one, DECISIONS)
    a, b = _rows(url_many, RANKING), _rows(url_one, RANKING)
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert x[:4] == y[:4] and x[5:] == y[5:], (x, y)
        assert abs(x[4] - y[4]) <= 1e-6, (x, y)
    assert _rows(url_many, "SELECT status FROM plans") == [("done",)]


def test_worker_under_accelerate_launch_trains_with_two_processes(tmp_path):
    """`accelerate launch` (2 CPU processes, gloo) of `rbridge worker`: both ranks train every run, rank 0
    records; the plan's decisions equal one process's and its scores agree to float rounding."""
    import sqlite3

    from test_distributed import accelerate_launch_cmd

    cache = tmp_path / "cache"
    one, two = tmp_path / "one", tmp_path / "two"
    _setup(one)
    _setup(two)
    single = subprocess.run(_cmd("plan", "tiny.yaml"), cwd=one, env=_env(cache), capture_output=True, text=True,
                            timeout=600)
    assert single.returncode == 0, single.stdout + single.stderr

    plan = subprocess.Popen(_cmd("plan", "tiny.yaml", "--no-local"), cwd=two, env=_env(cache),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    cmd, env = accelerate_launch_cmd(["-m", "rbridge.cli", "worker", "--store", "stores/tiny.db", "--until-idle"],
                                     tmp_path)
    try:
        launched = subprocess.run(cmd, cwd=two, env={**_env(cache), **env}, capture_output=True, text=True,
                                  timeout=600)
        out = launched.stdout + launched.stderr
        if launched.returncode != 0:
            plan.kill()  # no worker is left to finish the plan
        plan_out = plan.communicate(timeout=600)[0]
    finally:
        if plan.poll() is None:
            plan.kill()
    assert launched.returncode == 0, out
    assert plan.returncode == 0, plan_out
    assert "rank 1: trained 9 rungs with rank 0" in out, out
    assert "rungs trained and scored by this worker: 9" in out, out

    def rows(db: Path, sql: str) -> list[tuple]:
        con = sqlite3.connect(db)
        try:
            return con.execute(sql).fetchall()
        finally:
            con.close()

    a, b = one / "stores/tiny.db", two / "stores/tiny.db"
    decisions = ("SELECT d.stage, d.rung, c.name, d.kept, d.rank FROM decisions d "
                 "JOIN candidates c ON c.id = d.candidate_id ORDER BY d.stage, d.rung, c.name")
    assert rows(a, decisions) == rows(b, decisions)
    ra, rb = rows(a, RANKING), rows(b, RANKING)
    assert len(ra) == len(rb) > 0
    for x, y in zip(ra, rb):
        assert x[:4] == y[:4] and x[5:] == y[5:], (x, y)
        # Two ranks average gradients in another summation order: ~1e-6 in weights (test_distributed).
        assert abs(x[4] - y[4]) <= 1e-4, (x, y)
