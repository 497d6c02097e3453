"""Reading a SQLite store with the standard library alone: the file checks, and queries for read commands.

``rbridge status`` and ``rbridge accuracy`` on a SQLite file read it through
:class:`SQLiteReader`, never importing SQLAlchemy or SQLModel: those imports take
about half a second, longer than everything else such a command does on a store of
10,000 runs. The reader answers ``query`` and ``rows`` as :class:`rbridge.store.db.Store`
does (the same SQL, the same values), opens the file ``mode=ro`` (``immutable`` when no
writer's ``-wal`` file is there) with ``PRAGMA query_only``, and so changes nothing.
:func:`open_reader` gives one only for a store of this rbridge's schema; anything else
(PostgreSQL, an older schema that needs its in-place upgrade) goes through
:func:`rbridge.store.db.open_store`.

This module imports nothing of rbridge.store but :mod:`rbridge.store.version`.
"""

from __future__ import annotations

import os
import sqlite3
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from rbridge.errors import InputError
from rbridge.store.version import SCHEMA_VERSION

_META = "meta"  # rbridge.store.models.Meta's table


def check_sqlite_file(path: Path, *, create: bool) -> int | None:
    """Look at a SQLite store file before anything opens it for writing; return its schema version.

    None for a new store (no file yet, ``create``). Every other case raises one
    InputError naming the file and saying what to do: a directory, no file for a
    read command, an empty or unreadable file, not a SQLite database, a damaged
    one (``PRAGMA quick_check``), a database of another application. Reads only
    (``mode=ro``): a file that is refused is left byte for byte as it was.
    """
    if path.is_dir():
        raise InputError("is a directory, not a store; give the path of a .db file", file=path)
    if not path.exists():
        if create:
            return None
        raise InputError("no store here; run `rbridge plan SPEC.yaml` first or pass --store", file=path)
    # Only stat and SQLite itself look at the file: a plain open() and close() of a database file would
    # drop every POSIX lock this process's SQLite connections hold on it (the fcntl rule SQLite works around).
    if path.stat().st_size == 0:
        if create:  # SQLite's own rule: an empty file is an empty database (and a store being created
            return None  # by another process at this moment looks like one)
        raise InputError("is an empty file, not an rbridge store; remove it or use another --store", file=path)
    if not os.access(path, os.R_OK):
        raise InputError("cannot be read (permission denied)", file=path)
    try:
        # No -wal file: nobody is writing in WAL mode, so read it as immutable, which creates no -wal/-shm
        # beside a file that may not be ours. With one (a plan running), a plain read-only connection.
        live = Path(f"{path}-wal").exists()
        con = sqlite3.connect(f"file:{path}?mode=ro" + ("" if live else "&immutable=1"), uri=True, timeout=30)
        try:
            check = [row[0] for row in con.execute("PRAGMA quick_check(5)")]
            tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            version = None
            if _META in tables:
                row = con.execute(f"SELECT value FROM {_META} WHERE key = 'schema_version'").fetchone()
                version = int(row[0]) if row and str(row[0]).isdigit() else None
        finally:
            con.close()
    except sqlite3.DatabaseError as exc:
        if "not a database" in str(exc):
            raise InputError("is not a SQLite database, so not an rbridge store; use another --store",
                             file=path) from None
        raise InputError(f"is damaged ({exc}); restore it from a copy, or use another --store", file=path) from None
    if check != ["ok"]:
        raise InputError(f"is damaged (quick_check: {'; '.join(check)}); restore it from a copy, or use another "
                         "--store", file=path)
    if tables and version is None and "plans" not in tables:
        shown = ", ".join(sorted(tables)[:5]) + (", ..." if len(tables) > 5 else "")
        raise InputError(f"is a database of another application (tables: {shown}), not an rbridge store; "
                         "rbridge writes nothing into it. Use another --store", file=path)
    if version is not None and version > SCHEMA_VERSION:
        raise InputError(f"store schema {version} is newer than this rbridge ({SCHEMA_VERSION}); upgrade rbridge",
                         file=path)
    return version if version is not None else (0 if tables else None)


def latest_store(folder: str | Path = "stores") -> Path | None:
    """The most recently modified SQLite store under ``folder``."""
    folder = Path(folder)
    dbs = sorted(folder.glob("*.db"), key=lambda p: p.stat().st_mtime, reverse=True)
    return dbs[0] if dbs else None


def _uri(path: Path) -> str:
    """A read-only URI: immutable (no -wal/-shm created beside the file) unless a writer's -wal file is there."""
    return f"file:{path}?mode=ro" + ("" if Path(f"{path}-wal").exists() else "&immutable=1")


class SQLiteReader:
    """Read-only queries on a SQLite store (``query`` and ``rows``, as :class:`rbridge.store.db.Store`)."""

    dialect = "sqlite"

    def __init__(self, path: Path):
        self.path = path
        self.url = f"sqlite:///{path}"
        self._con = sqlite3.connect(_uri(path), uri=True, timeout=30)
        self._con.execute("PRAGMA query_only=1")
        self._con.execute("PRAGMA busy_timeout=30000")
        # One transaction for every read: one consistent snapshot while a plan writes on.
        self._con.execute("BEGIN")

    def rows(self, sql: str, **params) -> list[tuple]:
        """Rows of a query as tuples (named parameters ``:name``, as SQLAlchemy's ``text()``)."""
        return self._con.execute(sql, params).fetchall()

    @contextmanager
    def reading(self) -> Iterator:
        """``rows`` (as :meth:`rbridge.store.db.Store.reading`; every read here shares one transaction)."""
        yield self.rows

    def query(self, sql: str, **params) -> list[dict]:
        """Rows of a query as dicts (for views and reports)."""
        cur = self._con.execute(sql, params)
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row)) for row in cur.fetchall()]

    def close(self) -> None:
        self._con.close()


def refuse_folder_path(store: str) -> None:
    """A store path ending in a slash names a folder; Path() would drop the slash and a plan would make a
    store file of the folder's name. One InputError naming it, before anything is read or made."""
    if store.endswith(("/", os.sep)):
        raise InputError(f"ends with '{store[-1]}', so it names a folder, but a store is a file: give the "
                         f"file's path (for example {store}NAME.db)", file=store)


def sqlite_path(store: str | Path) -> Path | None:
    """The file of a store argument that names a SQLite file (a path or ``sqlite:///`` URL), else None."""
    s = str(store)
    if "://" not in s:
        refuse_folder_path(s)
        return Path(s).expanduser().resolve()
    if s.startswith("sqlite:///") and "?" not in s:
        return Path(s[len("sqlite:///"):])
    return None


def open_reader(store: str | Path) -> SQLiteReader | None:
    """A :class:`SQLiteReader` for a SQLite store of this rbridge's schema, or None (use ``open_store``).

    The file is checked first (:func:`check_sqlite_file`: one InputError naming it for a
    missing, empty, damaged or foreign file, or a newer schema); None for a store of an
    older schema, which ``open_store(read_only=True)`` upgrades in place where it may.
    """
    path = sqlite_path(store)
    if path is None:
        return None
    if check_sqlite_file(path, create=False) != SCHEMA_VERSION:
        return None
    return SQLiteReader(path)


def database_errors() -> tuple[type[BaseException], ...]:
    """The errors a query on a store raises: sqlite3's, and SQLAlchemy's if it is loaded (it is not
    imported for this)."""
    import sys

    errors: list[type[BaseException]] = [sqlite3.DatabaseError]
    exc = sys.modules.get("sqlalchemy.exc")
    if exc is not None:
        errors.append(exc.DBAPIError)
    return tuple(errors)


__all__ = ["SQLiteReader", "open_reader", "check_sqlite_file", "latest_store", "sqlite_path", "database_errors"]
