"""Commands that only read answer at once (issue 14): `status` and `accuracy` read a SQLite store with
sqlite3 alone and give what the SQLAlchemy path gives; `status` lists the top of each ranking; the CLI
imports only the module of the command that runs. Real SQLite files in tmp_path; no timings here
(benchmarks/status_latency.py measures them)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from rbridge.analysis.status import plan_status
from rbridge.cli import main
from rbridge.store import Candidate, Decision, Evaluation, Plan, Run, open_store
from rbridge.store.sqlite_read import SQLiteReader, open_reader

REPO = Path(__file__).resolve().parents[1]


def _plan_store(db: Path, n: int = 30) -> None:
    """A plan of two stages as the planner leaves it mid-way: pruned, done, failed and running runs, two
    benchmarks, decisions (some superseded), and runs and candidates an accepted spec edit superseded."""
    st = open_store(db)
    with st.session() as s:
        spec = (REPO / "specs/mix.yaml").read_text()
        plan = Plan(name="mix", spec_text=spec, spec_hash="h", spec_path=str(REPO / "specs/mix.yaml"),
                    status="running", revision=1)
        s.add(plan)
        s.flush()
        cands = [Candidate(plan_id=plan.id, name=f"c{i:03d}", mix='{"austen": 1.0}', position=n - i,
                           superseded_by=1 if i % 11 == 10 else 0) for i in range(n)]
        s.add_all(cands)
        s.flush()
        for stage_index, stage in enumerate(("filter", "rank")):
            for i, c in enumerate(cands):
                status = ("failed" if i % 7 == 3 else "running" if i % 5 == 1 else
                          "pruned" if i % 3 == 0 else "done")
                run = Run(plan_id=plan.id, stage=stage, stage_index=stage_index, candidate_id=c.id, config="{}",
                          params=1000 + i, non_embedding_params=500 + i, tokens_target=3000,
                          tokens_seen=1000 * (1 + i % 3), status=status, worker=f"host:{i}:boot",
                          train_flops=1e9 * i, score_flops=1e7, wall_s=1.0 + i, tokens_per_s=100.0 * (i % 4),
                          superseded_by=1 if (i % 13 == 5 or c.superseded_by) else 0, checkpoint=f"ck{i}")
                s.add(run)
                s.flush()
                for rung in range(1, 2 + i % 3):
                    for bench in ("gsm8k", "math"):
                        s.add(Evaluation(run_id=run.id, rung=rung, tokens_seen=1000 * rung, benchmark=bench,
                                         metric="rbridge", value=(i * 7919 % 13) / 7 + rung / 10))
                        s.add(Evaluation(run_id=run.id, rung=rung, tokens_seen=1000 * rung, benchmark=bench,
                                         metric="nll", value=(i % 5) / 3))
                    s.add(Decision(plan_id=plan.id, stage=stage, rung=rung, candidate_id=c.id,
                                   kept=(i + rung) % 2 == 0, score=1.0, rank=i, why=f"w{rung}",
                                   superseded_by=1 if i % 9 == 4 else 0))
    st.close()


def test_status_reads_the_same_through_sqlite3_and_sqlalchemy(tmp_path):
    db = tmp_path / "s.db"
    _plan_store(db)
    reader = open_reader(db)
    assert isinstance(reader, SQLiteReader)
    st = open_store(db, create=False, read_only=True)
    try:
        fast, slow = plan_status(reader), plan_status(st)
    finally:
        reader.close()
        st.close()
    assert json.dumps(fast) == json.dumps(slow)  # every field, every type (kept is a bool in both)
    assert fast["superseded"] and fast["stages"][0]["candidates"][0]["decision"]["kept"] in (True, False)
    assert sum(len(s["candidates"]) for s in fast["stages"]) == sum(
        1 for s in fast["stages"] for _ in s["candidates"]) > 40


def test_open_reader_only_for_a_current_sqlite_store(tmp_path):
    assert open_reader("postgresql://u@h/db") is None
    db = tmp_path / "s.db"
    _plan_store(db, n=3)
    assert open_reader(f"sqlite:///{db}") is not None
    import sqlite3

    con = sqlite3.connect(db)
    con.execute("UPDATE meta SET value = '4' WHERE key = 'schema_version'")
    con.commit()
    con.close()
    assert open_reader(db) is None  # an older schema: open_store upgrades it first


def _status(*args: str):
    return CliRunner().invoke(main, ["status", *args], catch_exceptions=False)


def test_status_lists_the_top_of_each_ranking_then_counts_the_rest(tmp_path):
    db = tmp_path / "s.db"
    _plan_store(db, n=60)
    full = json.loads(_status("--store", str(db), "--json").output)
    filt = full["stages"][0]["candidates"]
    r = _status("--store", str(db), "--top", "5")
    assert r.exit_code == 0, r.output
    shown = [c["candidate"] for c in filt if f" {c['candidate']} " in r.output]
    watch = [c["candidate"] for c in filt[5:] if c["status"] in ("running", "failed")][:5]
    assert shown[:5] == [c["candidate"] for c in filt[:5]] and set(watch) <= set(shown)
    hidden = len(filt) - len(set(shown))
    assert f"{hidden:,} more of {len(filt):,} candidates not listed" in r.output and "--all" in r.output
    assert "superseded by spec edits" in r.output and ", ... " in r.output
    every = _status("--store", str(db), "--all")
    assert all(f" {c['candidate']} " in every.output for c in filt) and "not listed" not in every.output
    default = _status("--store", str(db))
    assert "candidates not listed" in default.output  # 20 by default


def test_read_commands_import_neither_sqlalchemy_nor_pydantic_nor_numpy(tmp_path):
    """`rbridge accuracy` on a SQLite store loads only what it uses: its command module and sqlite3."""
    db = tmp_path / "s.db"
    _plan_store(db, n=4)
    code = ("import sys, runpy; sys.argv = ['rbridge', 'accuracy', '--store', sys.argv[1], '--no-curve']\n"
            "try:\n    runpy.run_module('rbridge.cli', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('sqlalchemy', 'sqlmodel', 'pydantic', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(db)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


def test_every_command_is_in_the_module_the_cli_names():
    """The CLI imports a command's module by the map in rbridge.cli: each name must be registered by exactly
    the module it names, and every command must be in the map (checked in a fresh process)."""
    code = ("import importlib\nfrom rbridge.cli import main\nassert not main.commands\n"
            "done = set()\n"
            "for mod in main.every_module:\n"
            "    importlib.import_module(mod)\n"
            "    done.add(mod)\n"
            "    named = {n for n, m in main.modules.items() if m in done}\n"
            "    assert named == set(main.commands), (mod, named ^ set(main.commands))\n"
            "assert set(main.commands) == set(main.modules), set(main.commands) ^ set(main.modules)\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_accuracy_without_targets_says_how_to_add_them(tmp_path):
    db = tmp_path / "s.db"
    _plan_store(db, n=3)
    res = CliRunner().invoke(main, ["accuracy", "--store", str(db)])
    assert res.exit_code == 0, res.output
    assert "no target results" in res.output and "rbridge targets import" in res.output
    assert json.loads(CliRunner().invoke(main, ["accuracy", "--store", str(db), "--json"]).output)["targets"] == 0
