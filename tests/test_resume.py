"""Crash-proof plans: SIGKILL a real `rbridge plan` at every phase, resume, compare with an uninterrupted run.

Each kill is a fail point (rbridge/_failpoints.py): the process SIGKILLs itself at
the n-th pass through a named place, so every phase is hit exactly: mid training
step, mid checkpoint write, between checkpoint and scoring, inside the evaluation
and decision transactions, between Optuna's tell and the decision write, ...
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import pytest

from conftest import SOURCES, built_once, copy_folder, gsm8k_lines, repoint_store

SPEC = f"""\
name: crash
seed: 3
tokenizer: {{train: {{vocab_size: 300}}}}
{SOURCES}candidates:
CANDIDATES
benchmarks:
  - {{name: gsm8k, traces: traces.jsonl}}
stages:
  - name: filter
    proxy: {{hidden_size: 16, num_hidden_layers: 1, num_attention_heads: 2}}
    tokens: 2048
    seq_len: 32
    batch_size: 8
    lr: 0.01
    evals: 2
    keep: 2
  - name: rank
    proxy: {{hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2}}
    tokens: 2048
    evals: 1
"""
CANDIDATES = ["  - {name: spam, mix: {spam: 1.0}}",
              "  - {name: kjv, mix: {kjv: 1.0}}",
              "  - {name: cot, mix: {cot: 1.0}}",
              "  - {name: kjv-cot, mix: {kjv: 0.5, cot: 0.5}}"]

# One plan killed (SIGKILL) at each phase in turn, resumed after each: (fail point, pass at which to die) in
# the process that resumes. The passes count from each start, so the kills walk through the plan in order,
# every phase at least once and both stages: before the store exists, inside the plan's first transaction,
# after Optuna's ask before the run row commits, mid training step, mid checkpoint write (model and optimizer
# written, marker not yet), checkpoint complete but not scored, inside the evaluation transaction, Optuna
# told but the decision not written, inside the decision transaction, mid training in stage 2.
KILLS = [
    ("data-prepared", 1), ("plan-row", 1), ("run-row", 2), ("train-step", 3), ("checkpoint-write", 1),
    ("after-checkpoint", 1), ("eval-write", 1), ("after-tell", 1), ("decision-write", 1), ("train-step", 16),
]


def _spec(candidates: list[str]) -> str:
    return SPEC.replace("CANDIDATES", "\n".join(candidates))


def _rbridge(args: list[str], cwd: Path, env: dict, failpoint: str | None = None) -> subprocess.CompletedProcess:
    env = dict(env)
    if failpoint:
        env["RBRIDGE_FAILPOINT"] = failpoint
    return subprocess.run([sys.executable, "-m", "rbridge.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def _env(cache: Path) -> dict:
    return dict(os.environ, RBRIDGE_CACHE=str(cache), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def _setup(d: Path, cache: Path, candidates=CANDIDATES) -> dict:
    (d / "traces.jsonl").write_text(gsm8k_lines(6))
    (d / "crash.yaml").write_text(_spec(candidates))
    return _env(cache)


def _ranking(db: Path) -> list[tuple]:
    con = sqlite3.connect(db)
    rows = con.execute("select stage, candidate, benchmark, metric, value, rank, tokens_seen, status from ranking "
                       "order by stage, candidate, benchmark, metric").fetchall()
    con.close()
    return rows


def _decisions(db: Path) -> list[tuple]:
    con = sqlite3.connect(db)
    rows = con.execute("select d.stage, d.rung, c.name, d.kept, d.rank, round(d.score, 9) from decisions d "
                       "join candidates c on c.id = d.candidate_id where d.superseded_by = 0 "
                       "order by d.stage, d.rung, c.name").fetchall()
    con.close()
    return rows


def _same(a: list[tuple], b: list[tuple]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x[:4] == y[:4] and x[5:] == y[5:], (x, y)
        assert abs(x[4] - y[4]) <= 1e-6, (x, y)


def crash_baseline(tmp_path_factory, cache: Path) -> tuple[Path, dict]:
    """The crash spec planned once, uninterrupted, by one process, for the whole test run (conftest.built_once;
    tests/test_local_workers.py compares its plans with it too): its folder and what the tests read of it,
    read here once (its ranking, decisions and output, and whether a -wal file was left beside the store), so
    no test opens the shared store (a SQLite connection makes -wal and -shm files that a copy could catch)."""
    def build(d: Path) -> dict:
        res = _rbridge(["plan", "crash.yaml"], d, _setup(d, cache))
        assert res.returncode == 0, res.stdout + res.stderr
        db = d / "stores/crash.db"
        wal_left = Path(f"{db}-wal").exists()
        with closing(sqlite3.connect(db)) as con:
            last = con.execute(
                "SELECT r.checkpoint, e.value, e.ci_low, e.ci_high FROM runs r JOIN evaluations e ON e.run_id = r.id "
                "WHERE r.stage = 'rank' AND e.metric = 'rbridge' ORDER BY e.rung DESC, r.id LIMIT 1").fetchone()
            ranked = con.execute("SELECT value, ci_low, ci_high FROM ranking").fetchall()
        return {"stdout": res.stdout, "wal_left": wal_left, "ranking": _ranking(db), "decisions": _decisions(db),
                "last_rank_score": last, "ranked": ranked}

    folder, info = built_once(tmp_path_factory, "crash-baseline", build)
    info["ranking"] = [tuple(r) for r in info["ranking"]]
    info["decisions"] = [tuple(r) for r in info["decisions"]]
    return folder, info


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, shared_cache):
    d, info = crash_baseline(tmp_path_factory, shared_cache)
    return shared_cache, info["ranking"], info["decisions"], d


def _copy_of_baseline(src: Path, dst: Path) -> None:
    """The baseline's finished plan copied into ``dst`` (set up by _setup), as if run there: its store and run
    folders, with the paths the store records (run folders, the spec) moved to the copy."""
    copy_folder(src / "stores", dst / "stores")
    repoint_store(dst / "stores/crash.db", src, dst)


def _count(db: Path, sql: str):
    if not db.exists():
        return None
    con = sqlite3.connect(db)
    try:
        return con.execute(sql).fetchall()
    except sqlite3.OperationalError:  # no tables yet
        return None
    finally:
        con.close()


@pytest.mark.long(70)
def test_sigkill_at_every_phase_then_resume_equals_uninterrupted(baseline, tmp_path):
    """One plan SIGKILLed ten times, at each phase in turn (KILLS), each time resumed by the next process:
    the end is the uninterrupted plan, decision for decision, and nothing is left half done. (A plan killed
    once and resumed once is the common case; the damaged-checkpoint, signal and precision tests below do
    that.) One process per kill, not two: each pays seconds of imports."""
    cache, expected, expected_decisions = baseline[:3]
    env = _setup(tmp_path, cache)
    db = tmp_path / "stores/crash.db"
    for point, nth in KILLS:
        has_plan = _count(db, "select count(*) from plans") == [(1,)]
        cmd = ["resume", "--store", str(db)] if has_plan else ["plan", "crash.yaml"]
        killed = _rbridge(cmd, tmp_path, env, failpoint=f"{point}:{nth}")
        assert killed.returncode == -signal.SIGKILL, (f"fail point {point}:{nth} was never reached "
                                                      f"({' '.join(cmd)}):\n{killed.stdout}{killed.stderr}")
        if point == "data-prepared":
            assert not db.exists()  # every input checked, nothing written yet
        elif point == "plan-row":
            assert _count(db, "select count(*) from plans") in (None, [(0,)])  # the transaction left nothing
    # the last kill landed in stage 2, mid training
    assert _count(db, "select stage from runs where status = 'running'") == [("rank",)]
    again = _rbridge(["resume", "--store", str(db)], tmp_path, env)
    assert again.returncode == 0, again.stdout + again.stderr
    _same(_ranking(db), expected)
    assert _decisions(db) == expected_decisions
    con = sqlite3.connect(db)
    # No Optuna trial is left RUNNING by the dead processes.
    assert con.execute("select count(*) from trials where state = 'RUNNING'").fetchone() == (0,)
    # Every run finished exactly once: one run row per (stage, candidate), one evaluation set per rung.
    assert con.execute("select count(*) from runs where status in ('running', 'pending')").fetchone() == (0,)
    dup = con.execute("select count(*) from (select run_id, rung, benchmark, metric, count(*) n from evaluations "
                      "group by run_id, rung, benchmark, metric having n > 1)").fetchone()
    assert dup == (0,)
    con.close()


def test_candidate_order_does_not_change_decisions(baseline, tmp_path):
    cache, expected, expected_decisions = baseline[:3]
    env = _setup(tmp_path, cache, candidates=list(reversed(CANDIDATES)))
    env.pop("RBRIDGE_WORKERS", None)  # the plan's own choice (conftest sets 1): too small to start a second process
    res = _rbridge(["plan", "crash.yaml"], tmp_path, env)
    assert res.returncode == 0, res.stderr
    assert "local workers: none; the whole plan computes at most" in res.stdout, res.stdout
    assert _decisions(tmp_path / "stores/crash.db") == expected_decisions
    _same(_ranking(tmp_path / "stores/crash.db"), expected)


def test_second_plan_on_same_store_is_refused(baseline, tmp_path):
    cache, _expected, _dec = baseline[:3]
    env = _setup(tmp_path, cache)
    env["RBRIDGE_FAILPOINT"] = ""
    first = subprocess.Popen([sys.executable, "-m", "rbridge.cli", "plan", "crash.yaml"], cwd=tmp_path, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lock = tmp_path / "stores/crash.db.lock"
        deadline = time.time() + 120
        while time.time() < deadline and not (lock.exists() and lock.read_text().startswith("pid")):
            time.sleep(0.2)
        second = _rbridge(["plan", "crash.yaml"], tmp_path, env)
        assert second.returncode == 1
        assert "another rbridge plan" in second.stderr and f"pid {first.pid}" in second.stderr
        # Another terminal can watch the running plan (SQLite WAL: readers never block the writer).
        deadline = time.time() + 120
        while time.time() < deadline:
            watch = _rbridge(["status", "--store", "stores/crash.db", "--json"], tmp_path, env)
            if watch.returncode == 0:
                break
            time.sleep(0.5)
        assert watch.returncode == 0, watch.stderr
        assert '"plan": "crash"' in watch.stdout
    finally:
        out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err


RANK_TOKENS = ("    tokens: 2048\n    evals: 1", "    tokens: 3072\n    evals: 1")
MIX = ("{kjv: 0.5, cot: 0.5}", "{kjv: 0.2, cot: 0.8}")


@pytest.mark.parametrize("change", [RANK_TOKENS, MIX], ids=["stage2-tokens", "stage1-mixture"])
def test_force_redoes_only_affected_runs_and_matches_a_fresh_plan(baseline, tmp_path, change):
    cache, expected, expected_decisions, done = baseline
    env = _setup(tmp_path, cache)
    _copy_of_baseline(done, tmp_path)  # the plan as it ended, without running it again
    db = tmp_path / "stores/crash.db"
    con = sqlite3.connect(db)
    filter_evals = con.execute("select e.id, e.value from evaluations e join runs r on r.id = e.run_id "
                               "where r.stage = 'filter' order by e.id").fetchall()
    con.close()
    changed = _spec(CANDIDATES).replace(*change)
    assert changed != _spec(CANDIDATES)
    (tmp_path / "crash.yaml").write_text(changed)
    refused = _rbridge(["plan", "crash.yaml"], tmp_path, env)
    assert refused.returncode == 2 and "the spec changed" in refused.stderr
    assert any(line.startswith("+") and change[1].splitlines()[0].strip() in line
               for line in refused.stderr.splitlines())
    forced = _rbridge(["plan", "crash.yaml", "--force"], tmp_path, env)
    assert forced.returncode == 0, forced.stderr
    con = sqlite3.connect(db)
    now = con.execute("select e.id, e.value from evaluations e join runs r on r.id = e.run_id "
                      "where r.stage = 'filter' and r.superseded_by = 0 order by e.id").fetchall()
    if change is RANK_TOKENS:
        assert "2 runs to redo (rank/" in forced.stdout
        assert now == filter_evals  # stage 1 untouched
        assert {t for (t,) in con.execute("select tokens_seen from runs where stage = 'rank' "
                                          "and superseded_by = 0")} == {3072}
    else:
        assert "runs to redo (filter/kjv-cot" in forced.stdout
        kept = set(filter_evals) & set(now)
        assert kept and len(kept) < len(filter_evals)  # the other candidates' stage-1 work is reused
    con.close()
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    env2 = _setup(fresh, cache)
    (fresh / "crash.yaml").write_text(changed)
    assert _rbridge(["plan", "crash.yaml"], fresh, env2).returncode == 0
    _same(_ranking(db), _ranking(fresh / "stores/crash.db"))
    assert _decisions(db) == _decisions(fresh / "stores/crash.db")
    if change is MIX:
        _undo_the_edit(tmp_path, env, db, filter_evals, expected, expected_decisions)


def _undo_the_edit(tmp_path, env, db, filter_evals, expected, expected_decisions) -> None:
    """`plan --force` back to the old spec revives the superseded runs (kept, with their evaluations and
    checkpoints): nothing is trained, and the plan is again the baseline plan."""
    con = sqlite3.connect(db)
    superseded = con.execute("select r.id, r.stage, c.name, r.checkpoint from runs r join candidates c "
                             "on c.id = r.candidate_id where r.superseded_by = 1").fetchall()
    con.close()
    assert superseded and all(".superseded/r1/" in ck and Path(ck).is_dir() for _, _, _, ck in superseded)
    status = _rbridge(["status", "--store", str(db)], tmp_path, env)
    assert "superseded by spec edits" in status.stdout and "revision 1: filter/kjv-cot" in status.stdout
    (tmp_path / "crash.yaml").write_text(_spec(CANDIDATES))
    back = _rbridge(["plan", "crash.yaml", "--force"], tmp_path, env)
    assert back.returncode == 0, back.stderr
    assert "revision 2" in back.stdout and "revived with their results" in back.stdout
    assert "rungs trained and scored this time: 0;" in back.stdout
    con = sqlite3.connect(db)
    now = con.execute("select e.id, e.value from evaluations e join runs r on r.id = e.run_id "
                      "where r.stage = 'filter' and r.superseded_by = 0 order by e.id").fetchall()
    revived = con.execute("select checkpoint from runs where superseded_by = 0 and id in (%s)"
                          % ",".join(str(i) for i, *_ in superseded)).fetchall()
    con.close()
    assert now == filter_evals  # the very rows recorded before the edit
    assert len(revived) == len(superseded) and all(Path(ck).is_dir() and ".superseded" not in ck
                                                   for (ck,) in revived)
    _same(_ranking(db), expected)
    assert _decisions(db) == expected_decisions


@pytest.mark.parametrize("damage", ["model.safetensors"])  # every file in turn: tests/test_proxy.py
def test_a_damaged_checkpoint_is_set_aside_and_the_plan_resumes_identically(baseline, tmp_path, damage):
    """Killed right after a run's rung-2 checkpoint; that checkpoint is then damaged (a file overwritten, or
    trainer.json lost). Resuming sets it aside (renamed, kept), trains the rung again from the rung-1
    checkpoint and ends with the uninterrupted ranking."""
    cache, expected, expected_decisions = baseline[:3]
    env = _setup(tmp_path, cache)
    killed = _rbridge(["plan", "crash.yaml"], tmp_path, env, failpoint="after-checkpoint:5")
    assert killed.returncode == -signal.SIGKILL
    [newest] = [p for p in (tmp_path / "stores/crash.runs/filter").glob("*/step_8")]
    assert (newest.parent / "step_4").is_dir()
    f = newest / damage
    if damage == "trainer.json":
        f.unlink()
    else:
        f.write_bytes(bytes(b ^ 0xFF for b in f.read_bytes()))
    again = _rbridge(["resume"], tmp_path, env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "checkpoint step_8 set aside" in again.stdout and "resuming from step 4" in again.stdout, again.stdout
    assert (newest.parent / "step_8.damaged" / damage).exists() or damage == "trainer.json"
    assert (newest.parent / "step_8.damaged").is_dir()
    _same(_ranking(tmp_path / "stores/crash.db"), expected)
    assert _decisions(tmp_path / "stores/crash.db") == expected_decisions


@pytest.mark.parametrize("sig", [signal.SIGTERM], ids=["SIGTERM"])  # SIGINT takes the same path, exit 130
def test_a_signal_stops_the_plan_politely_and_resume_is_identical(baseline, tmp_path, sig):
    """SIGTERM / SIGINT in the middle of the plan: the plan stops at the next training step with a checkpoint,
    gives its run back and exits 143 / 130; `rbridge resume` ends with the uninterrupted ranking."""
    cache, expected, expected_decisions = baseline[:3]
    env = _setup(tmp_path, cache)
    env["RBRIDGE_SLOW_STEP_S"] = "0.02"  # test hook: steps slow enough for the signal to land mid-training
    proc = subprocess.Popen([sys.executable, "-m", "rbridge.cli", "plan", "crash.yaml"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    db = tmp_path / "stores/crash.db"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if db.exists():
            con = sqlite3.connect(db)
            try:
                n = con.execute("select count(*) from runs where status = 'running'").fetchone()[0]
            except sqlite3.OperationalError:
                n = 0
            finally:
                con.close()
            if n:
                break
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 128 + sig, out + err
    assert f"stopped by {sig.name}" in out and "rbridge resume" in out, out
    assert "rbridge worker" not in out, out  # the plan's own processes leave the advice to the plan
    con = sqlite3.connect(db)
    assert con.execute("select count(*) from runs where status = 'running'").fetchone() == (0,)  # given back
    con.close()
    status = _rbridge(["status"], tmp_path, env)
    assert "(interrupted)" in status.stdout and "rbridge resume --store" in status.stdout, status.stdout
    assert "ETA -" in status.stdout, status.stdout
    again = _rbridge(["resume"], tmp_path, env)
    assert again.returncode == 0, again.stdout + again.stderr
    _same(_ranking(db), expected)
    assert _decisions(db) == expected_decisions
    done = _rbridge(["resume"], tmp_path, env)  # a finished plan: its ranking from the store, nothing loaded
    assert done.returncode == 0 and "is done: nothing to continue" in done.stdout, done.stdout + done.stderr
    assert "tokenizer:" not in done.stdout and "ranking - stage rank" in done.stdout, done.stdout
    assert "(done)" in _rbridge(["status"], tmp_path, env).stdout


@pytest.mark.parametrize("recorded", ["other", "legacy"])
def test_a_stage_trains_in_the_precision_its_first_run_recorded(baseline, tmp_path, tmp_path_factory, recorded):
    """The first run of a stage fixes the stage's precision, as its threads: a resumed stage, or one another
    machine joins, trains in it whatever this machine's auto would pick. A stage started before runs recorded
    their precision (store schema < 7: a run with threads, no precision) keeps the old rule, fp32 on CPUs.
    This machine's auto is injected (bf16 measured 2x fp32), so both answers are tried on any CPU."""
    cache, _expected, _dec = baseline[:3]
    env = dict(_env(cache), RBRIDGE_WORKERS="1", RBRIDGE_BF16_SPEEDUP="2")

    def kill(d: Path) -> dict:  # once a test run, for both cases
        _setup(d, cache)
        with (d / "crash.yaml").open("a") as f:  # finished runs keep a checkpoint to read the identity from
            f.write("finished_runs: checkpoint\n")
        # killed after the first step of the stage's first run: it recorded threads and precision, no checkpoint
        killed = _rbridge(["plan", "crash.yaml"], d, env, failpoint="train-step:1")
        assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
        return {}

    src, _ = built_once(tmp_path_factory, "crash-killed-at-first-step", kill)
    d = tmp_path / "plan"
    copy_folder(src, d)
    db = d / "stores/crash.db"
    repoint_store(db, src, d)
    native = "bf16"
    with sqlite3.connect(db) as con:
        started = con.execute("SELECT precision FROM runs WHERE threads > 0").fetchall()
        assert started == [(native,)]  # recorded with the threads, before training
        # as if another machine (or an older rbridge) had started the stage
        want = {"bf16": "fp32", "fp32": "bf16"}[native] if recorded == "other" else "fp32"
        con.execute("UPDATE runs SET precision = ? WHERE threads > 0", (want if recorded == "other" else "",))
    again = _rbridge(["resume", "--store", str(db)], d, env)
    assert again.returncode == 0, again.stdout + again.stderr
    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT stage, precision, checkpoint FROM runs WHERE tokens_seen > 0").fetchall()
    filter_runs = [(p, c) for s, p, c in rows if s == "filter"]
    assert len(filter_runs) == 4 and all(p == want for p, _ in filter_runs), filter_runs
    # every checkpoint of the stage was trained in it (the trainer's identity), the killed run's included
    for _, folder in filter_runs:
        state = json.loads(next(Path(folder).glob("step_*/trainer.json")).read_text())
        assert state["identity"]["precision"] == want, (folder, state["identity"])
    # the next stage, not started by anyone, follows this machine's rule
    assert {p for s, p, _ in rows if s == "rank"} == {native}
