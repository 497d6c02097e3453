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
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import new_database
from conftest import gsm8k_lines
from test_plan_e2e import SPEC

HEARTBEAT_TIMEOUT = "3"


def _env(cache: Path, **extra) -> dict:
    return dict(os.environ, RBRIDGE_CACHE=str(cache), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                RBRIDGE_POLL_S="0.3", **extra)


def _cmd(*args) -> list[str]:
    return [sys.executable, "-m", "rbridge.cli", *args]


# Micro-batches of 4 rows: every world size runs the same passes, so the 2-process worker below
# trains bitwise the runs one process trains (ProxyTrainer's docstring; test_distributed).
SPEC_MB = SPEC.replace("    batch_size: 8\n", "    batch_size: 8\n    micro_batch_size: 4\n")
assert SPEC_MB != SPEC


def _setup(d: Path) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / "traces.jsonl").write_text(gsm8k_lines(12))
    (d / "tiny.yaml").write_text(SPEC_MB)


def _rows(url: str, sql: str) -> list[tuple]:
    import psycopg

    with psycopg.connect(url) as con:
        return con.execute(sql).fetchall()


@pytest.fixture(scope="module")
def single(tmp_path_factory, shared_cache) -> tuple[Path, Path, float]:
    """The tiny plan done by one `rbridge plan` on SQLite (test_postgres shows PostgreSQL stores equal SQLite's)."""
    root = tmp_path_factory.mktemp("single")
    cache, one = shared_cache, root / "one"
    _setup(one)
    t0 = time.perf_counter()
    res = subprocess.run(_cmd("plan", "tiny.yaml"), cwd=one, env=_env(cache), capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    return one / "stores/tiny.db", cache, time.perf_counter() - t0


def _lite(db: Path, sql: str) -> list[tuple]:
    con = sqlite3.connect(db)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def _same_ranking(a: list[tuple], b: list[tuple], tol: float) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert x[:4] == y[:4] and x[5:7] == y[5:7] and x[7] == y[7], (x, y)
        assert abs(x[4] - y[4]) <= tol, (x, y)


RANKING = ("SELECT stage, candidate, benchmark, metric, value, rank, tokens_seen, status FROM ranking "
           "ORDER BY stage, candidate, benchmark, metric")
DECISIONS = ("SELECT d.stage, d.rung, c.name, d.kept, d.rank FROM decisions d "
             "JOIN candidates c ON c.id = d.candidate_id ORDER BY d.stage, d.rung, c.name")


@pytest.mark.long(70)  # its group (with tests/test_failed_runs.py) takes about a minute
@pytest.mark.xdist_group("workers")
def test_three_workers_one_killed_equal_single_process(pg_server, single, tmp_path):
    db_one, cache, wall_one = single
    many = tmp_path / "many"
    _setup(many)
    url_many = new_database(pg_server, "workers_many")

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
    samples: list[int] = []  # server connections of the plan and its workers, sampled while they run
    done = threading.Event()

    def sample() -> None:
        import psycopg

        with psycopg.connect(url_many.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as con:
            while not done.wait(0.05):
                # the plan's lock (one session-level advisory lock per plan, by design) is left out
                samples.append(con.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> "
                    "pg_backend_pid() AND application_name NOT LIKE 'rbridge plan pid%'").fetchone()[0])

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    codes = {name: p.wait(timeout=600) for name, p in procs.items()}
    done.set()
    sampler.join(timeout=10)
    wall_many = time.perf_counter() - t0
    # Four processes (the plan's lock connection aside), connected only while they talk to the store: on average
    # well under one connection each, so 200 workers stay far below PostgreSQL's default max_connections of 100.
    mean = sum(samples) / max(1, len(samples))
    print(f"\nserver connections while 4 processes served the plan (besides the plan's lock): mean {mean:.2f}, max {max(samples, default=0)} "
          f"({len(samples)} samples)")
    assert samples and mean / 4 < 0.25 and max(samples) <= 8, (mean, max(samples))
    for f in logs.values():
        f.close()
    out = {name: (many / f"{name}.log").read_text() for name in procs}
    print(f"\nwall time of the tiny plan: 1 process (SQLite) {wall_one:.1f} s; PostgreSQL, plan --no-local + 3 workers "
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
    assert evaluated == _lite(db_one, "SELECT count(*) FROM (SELECT DISTINCT run_id, rung FROM evaluations)")[0][0] == 9
    # One claim per rung trained, plus the victim's claim that a survivor took over.
    assert _rows(url_many, "SELECT sum(lease) FROM runs")[0][0] == evaluated + 1
    done_by = [int(line.rsplit(":", 1)[1]) for name in ("w1", "w2") for line in out[name].splitlines()
               if "rungs trained and scored by this worker" in line]
    assert sum(done_by) == evaluated, out

    # The same decisions and ranking as one process.
    assert _rows(url_many, DECISIONS) == [(a, b, c, bool(d), e) for a, b, c, d, e in _lite(db_one, DECISIONS)]
    _same_ranking(_rows(url_many, RANKING), _lite(db_one, RANKING), 1e-6)
    assert _rows(url_many, "SELECT status FROM plans") == [("done",)]


@pytest.mark.long(70)  # beside the test above: their module fixture is built once
@pytest.mark.xdist_group("workers")
def test_worker_under_accelerate_launch_trains_with_two_processes(single, tmp_path):
    """`accelerate launch` (2 CPU processes, gloo) of `rbridge worker`: both ranks train every run, rank 0
    records; with micro-batches fixed by the spec the plan's decisions and scores equal one process's exactly."""
    from test_distributed import accelerate_launch_cmd

    db_one, cache, _ = single
    two = tmp_path / "two"
    _setup(two)

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

    b = two / "stores/tiny.db"
    assert _lite(b, DECISIONS) == _lite(db_one, DECISIONS)
    # Without micro_batch_size the ranks' half-batch passes differ from one pass over the batch by float
    # rounding, which AdamW magnified to 6.65e-4 in a rank-stage score on one machine; with it: equal.
    _same_ranking(_lite(b, RANKING), _lite(db_one, RANKING), 0.0)
