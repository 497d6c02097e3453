"""Every command checks its store before use (issue 12): real files, real subprocesses.

A directory, a text file, an empty file, a truncated store, a store with overwritten
pages, another application's SQLite database, a store from a newer rbridge, a missing
store for a read command, an unsupported URL scheme: each command exits 2 with one
message naming the store, and the file is byte for byte as it was, with no -wal/-shm
or lock file left beside it. A read-only current store is read by the read-only
commands without a single byte changing.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from rbridge.store import Candidate, Plan, open_store
from rbridge.store.models import SCHEMA_VERSION
from conftest import gsm8k_lines
from test_plan_e2e import SPEC


def _store(path: Path) -> Path:
    st = open_store(path)
    with st.session() as s:
        plan = Plan(name="tiny", spec_text="", spec_hash="")
        s.add(plan)
        s.flush()
        s.add(Candidate(plan_id=plan.id, name="cot", mix='{"cot": 1.0}'))
    st.close()
    con = sqlite3.connect(path)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    for side in ("-wal", "-shm"):
        Path(f"{path}{side}").unlink(missing_ok=True)
    return path


def _make(kind: str, d: Path) -> str:
    p = d / "store.db"
    if kind == "directory":
        p.mkdir()
    elif kind == "text file":
        p.write_text("plan,candidate\ntiny,cot\n")
    elif kind == "empty file":
        p.write_bytes(b"")
    elif kind == "truncated store":
        data = _store(d / "good.db").read_bytes()
        p.write_bytes(data[: len(data) // 3])
    elif kind == "overwritten pages":
        data = bytearray(_store(d / "good.db").read_bytes())
        data[4096:12288] = b"\xa5" * 8192
        p.write_bytes(bytes(data))
    elif kind == "another application's database":
        con = sqlite3.connect(p)
        con.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
        con.execute("INSERT INTO invoices VALUES (1, 9.5)")
        con.commit()
        con.close()
    elif kind == "newer schema":
        _store(p)
        con = sqlite3.connect(p)
        con.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
        con.commit()
        con.close()
    elif kind == "missing store":
        pass
    elif kind == "folder path":  # a path ending in a slash: the user meant a folder; no file is made of it
        return str(p) + "/"
    elif kind == "unknown URL scheme":
        return "mysql://me@dbhost/rbridge"
    return str(p)


CASES = {
    "directory": "is a directory", "text file": "not a SQLite database", "empty file": "empty file",
    "truncated store": "is damaged", "overwritten pages": "is damaged",
    "another application's database": "another application", "newer schema": "newer than this rbridge",
    "missing store": "no store here", "unknown URL scheme": "unsupported store URL scheme",
    "folder path": "names a folder",
}
WRITERS = ("directory", "text file", "truncated store", "overwritten pages", "another application's database",
           "newer schema", "unknown URL scheme", "folder path")


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): (p.read_bytes() if p.is_file() else b"<dir>") for p in sorted(d.rglob("*"))}


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, RBRIDGE_CACHE=str(cwd.parent / "cache"), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "rbridge.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("kind", list(CASES))
def test_a_bad_store_is_refused_by_every_command_and_left_as_it_was(tmp_path, kind):
    d = tmp_path / "s"
    d.mkdir()
    (tmp_path / "t.csv").write_text("candidate,benchmark,metric,value\ncot,gsm8k,accuracy,0.5\n")
    (tmp_path / "traces.jsonl").write_text(gsm8k_lines(4))
    (tmp_path / "tiny.yaml").write_text(SPEC)
    store = _make(kind, d)
    before = _snapshot(d)
    commands = [["status", "--store", store]]
    if kind in ("overwritten pages", "another application's database"):  # the same read-only path as status
        commands += [["accuracy", "--store", store], ["predict", "--store", store]]
    if kind in WRITERS:
        commands += [["targets", "import", str(tmp_path / "t.csv"), "--store", store],
                     ["plan", str(tmp_path / "tiny.yaml"), "--store", store]]
    for args in commands:
        res = _run(args, tmp_path)
        assert res.returncode == 2, (args, res.stdout, res.stderr)
        assert CASES[kind] in res.stderr and "Traceback" not in res.stderr, (args, res.stderr)
        assert (store if "://" in store else str(d / "store.db")) in res.stderr, (args, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert _snapshot(d) == before  # byte for byte, and nothing new beside it


def test_read_commands_read_a_read_only_store_and_change_nothing(tmp_path):
    d = tmp_path / "s"
    d.mkdir()
    db = _store(d / "ro.db")
    (tmp_path / "t.csv").write_text("candidate,benchmark,metric,value\ncot,gsm8k,accuracy,0.5\n")
    assert _run(["targets", "import", str(tmp_path / "t.csv"), "--store", str(db)], tmp_path).returncode == 0
    con = sqlite3.connect(db)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    os.chmod(db, 0o444)
    os.chmod(d, 0o555)
    try:
        before = _snapshot(d)
        for args in (["status", "--store", str(db), "--json"], ["accuracy", "--store", str(db)]):
            res = _run(args, tmp_path)
            assert res.returncode == 0, (args, res.stderr)
        assert _snapshot(d) == before
    finally:
        os.chmod(d, 0o755)
        os.chmod(db, 0o644)
