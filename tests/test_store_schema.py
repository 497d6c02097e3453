"""Store schema versions on real SQLite files: an older store is upgraded in place, a newer one is refused
untouched."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest

from rbridge.errors import InputError
from rbridge.store import Candidate, Plan, Run, open_store
from rbridge.store.models import SCHEMA_VERSION

SCHEMA_2_COLUMNS = ["worker", "lease", "beats", "beat_every_s", "heartbeat_at"]


def _columns(con: sqlite3.Connection, table: str) -> list[str]:
    return [row[1] for row in con.execute(f"PRAGMA table_info({table})")]


def _schema_1_store(path) -> None:
    """A store as rbridge wrote it before schema 2: one plan with one run, no claim columns, no unique indexes."""
    store = open_store(path)
    with store.session() as s:
        plan = Plan(name="old", spec_text="x", spec_hash="h")
        s.add(plan)
        s.flush()
        cand = Candidate(plan_id=plan.id, name="cot", mix='{"cot": 1.0}')
        s.add(cand)
        s.flush()
        s.add(Run(plan_id=plan.id, stage="filter", stage_index=0, candidate_id=cand.id, config="{}",
                  tokens_target=6144, tokens_seen=3072, status="done"))
    store.close()
    con = sqlite3.connect(path)
    con.execute("DROP INDEX ux_runs_live")
    con.execute("DROP INDEX ux_decisions_live")
    for col in SCHEMA_2_COLUMNS:
        con.execute(f"ALTER TABLE runs DROP COLUMN {col}")
    con.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    con.commit()
    con.close()


def test_a_schema_1_store_is_upgraded_in_place(tmp_path):
    db = tmp_path / "old.db"
    _schema_1_store(db)
    open_store(db).close()
    con = sqlite3.connect(db)
    try:
        assert set(SCHEMA_2_COLUMNS) <= set(_columns(con, "runs"))
        assert con.execute("SELECT stage, tokens_seen, status, worker, lease, beats FROM runs").fetchall() == \
            [("filter", 3072, "done", "", 0, 0)]                                 # kept, with the new defaults
        indexes = {row[1] for row in con.execute("SELECT * FROM sqlite_master WHERE type = 'index'")}
        assert {"ux_runs_live", "ux_decisions_live"} <= indexes
        assert con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == (str(SCHEMA_VERSION),)
    finally:
        con.close()


def test_a_schema_3_store_is_upgraded_in_place_with_its_results(tmp_path):
    """tests/fixtures/store_v3.db was written by rbridge at schema 3 (commit 21fc302): one plan, two scored
    runs, a rung decision. Schema 4 adds the revision columns, replaces the unique indexes by live-row ones
    and recreates the views (which now leave superseded runs out); every row stays."""
    db = tmp_path / "v3.db"
    shutil.copy(Path(__file__).parent / "fixtures" / "store_v3.db", db)
    con = sqlite3.connect(db)
    before = {t: con.execute(f"SELECT * FROM {t} ORDER BY id").fetchall()
              for t in ("plans", "candidates", "runs", "evaluations", "decisions")}
    ranking = con.execute("SELECT candidate, value, rank FROM ranking ORDER BY rank").fetchall()
    con.close()
    assert ranking == [("b", 3.25, 1), ("a", 3.5, 2)]
    store = open_store(db)
    store.close()
    con = sqlite3.connect(db)
    try:
        for table, rows in before.items():  # each old row, with the new columns' defaults after it
            now = con.execute(f"SELECT * FROM {table} ORDER BY id").fetchall()
            assert [r[:len(rows[0])] for r in now] == rows, table
        assert con.execute("SELECT revision, studies FROM plans").fetchall() == [(0, "")]
        assert con.execute("SELECT DISTINCT superseded_by FROM runs").fetchall() == [(0,)]
        indexes = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert {"ux_runs_live", "ux_decisions_live"} <= indexes
        assert not {"ux_runs_plan_stage_candidate", "ux_decisions_plan_stage_rung_candidate"} & indexes
        assert con.execute("SELECT candidate, value, rank FROM ranking ORDER BY rank").fetchall() == ranking
        con.execute("UPDATE runs SET superseded_by = 1 WHERE candidate_id = (SELECT id FROM candidates "
                    "WHERE name = 'a')")
        assert con.execute("SELECT candidate FROM ranking").fetchall() == [("b",)]  # the recreated view
        assert con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == (str(SCHEMA_VERSION),)
    finally:
        con.close()


def test_a_store_from_a_newer_rbridge_is_refused_untouched(tmp_path):
    db = tmp_path / "new.db"
    open_store(db).close()
    con = sqlite3.connect(db)
    con.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    con.execute("DROP VIEW ranking")            # something this rbridge would create again if it went on
    con.commit()
    con.close()
    before = db.read_bytes()
    with pytest.raises(InputError, match="newer than this rbridge") as e:
        open_store(db)
    assert str(db) in str(e.value.file)
    assert db.read_bytes() == before


def test_one_optuna_storage_per_store_and_a_store_made_again_gets_a_new_one(tmp_path):
    """rbridge.store.studies keeps one Optuna storage per store in a process (making one checks Optuna's
    tables each time); a store deleted and made again at the same path is another database: its storage is
    made afresh, with Optuna's tables, and no connection is left open after each use."""
    from rbridge.planner import mirror
    from rbridge.store import studies

    db = tmp_path / "s.db"
    st = open_store(db)
    url = st.url
    st.close()
    mirror.ensure_study(url, "p", "filter")
    mirror.ensure_study(url, "p", "rank")
    kept = [s for u, s in studies._storages.items() if u == url]
    assert len(kept) == 1 and kept[0].engine.pool.checkedout() == 0
    assert studies.study_attrs(url, "p", "rank") == {}
    for f in tmp_path.glob("s.db*"):
        f.unlink()
    st = open_store(db)  # a new, empty store at the same path
    st.close()
    number = mirror.ask(url, "p", "filter", "cot")
    assert number == 0  # the new database's first trial: nothing of the old one was reused
    with sqlite3.connect(db) as con:
        assert con.execute("SELECT study_name FROM studies").fetchall() == [("p:filter",)]
