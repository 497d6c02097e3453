"""Store schema versions on real SQLite files: an older store is upgraded in place, a newer one is refused
untouched."""

from __future__ import annotations

import sqlite3

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
    con.execute("DROP INDEX ux_runs_plan_stage_candidate")
    con.execute("DROP INDEX ux_decisions_plan_stage_rung_candidate")
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
        assert {"ux_runs_plan_stage_candidate", "ux_decisions_plan_stage_rung_candidate"} <= indexes
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
