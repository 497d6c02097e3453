"""Opening a store: engine, schema, views, SQLite pragmas.

A store is any SQLAlchemy URL; a bare path means a SQLite file. SQLite runs in
WAL mode with a busy timeout, so a ``rbridge status`` in another terminal reads
while a plan writes, and every state change is its own short transaction.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from sqlalchemy import event, text
from sqlalchemy.engine import Engine
from sqlmodel import Session, SQLModel, create_engine, select

from rbridge.errors import InputError
from rbridge.store.models import SCHEMA_VERSION, Meta

# The last evaluation of every run, ranked within (plan, stage, benchmark, metric).
# A run that went further (more tokens: it survived more rungs) ranks above one
# dropped earlier; among runs that reached the same point, the metric decides in
# its own direction (lower is better for NLL-like metrics).
RANKING_VIEW = """
CREATE VIEW ranking AS
WITH last AS (
  SELECT e.run_id, e.benchmark, e.metric, e.value, e.higher_is_better, e.tokens_seen,
         ROW_NUMBER() OVER (PARTITION BY e.run_id, e.benchmark, e.metric
                            ORDER BY e.tokens_seen DESC, e.id DESC) AS rn
  FROM evaluations e
)
SELECT p.name AS plan, r.stage AS stage, c.name AS candidate,
       l.benchmark AS benchmark, l.metric AS metric, l.value AS value,
       RANK() OVER (PARTITION BY p.id, r.stage, l.benchmark, l.metric
                    ORDER BY l.tokens_seen DESC,
                             CASE WHEN l.higher_is_better THEN -l.value ELSE l.value END) AS rank,
       l.tokens_seen AS tokens_seen, r.status AS status, r.stage_index AS stage_index
FROM last l
JOIN runs r ON r.id = l.run_id
JOIN candidates c ON c.id = r.candidate_id
JOIN plans p ON p.id = r.plan_id
WHERE l.rn = 1
"""

VIEWS = {"ranking": RANKING_VIEW}


def store_url(store: str | Path) -> str:
    """A SQLAlchemy URL for a store argument: URLs pass through, paths become SQLite URLs."""
    s = str(store)
    if "://" in s:
        return s
    return f"sqlite:///{Path(s).expanduser().resolve()}"


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


class Store:
    """A connection to one store: ``with store.session() as s: ...`` commits on success."""

    def __init__(self, url: str, engine: Engine):
        self.url = url
        self.engine = engine

    @contextmanager
    def session(self) -> Iterator[Session]:
        with Session(self.engine, expire_on_commit=False) as session:
            try:
                yield session
                session.commit()
            except BaseException:
                session.rollback()
                raise

    def query(self, sql: str, **params) -> list[dict]:
        """Rows of a raw SQL query as dicts (for views and reports)."""
        with self.engine.connect() as conn:
            result = conn.execute(text(sql), params)
            return [dict(row._mapping) for row in result]

    def close(self) -> None:
        self.engine.dispose()


def open_store(store: str | Path, create: bool = True) -> Store:
    """Open (and by default create) the store at a path or URL, with tables and views."""
    url = store_url(store)
    if url.startswith("sqlite:///"):
        path = Path(url[len("sqlite:///"):])
        if not path.exists() and not create:
            raise InputError("no store here", file=path)
        path.parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
    else:
        engine = create_engine(url, pool_pre_ping=True)
    st = Store(url, engine)
    if create:
        _ensure_schema(st)
    return st


def _ensure_schema(st: Store) -> None:
    SQLModel.metadata.create_all(st.engine)
    with st.engine.begin() as conn:
        existing = {row[0] for row in conn.execute(text(
            "SELECT name FROM sqlite_master WHERE type='view'" if st.url.startswith("sqlite")
            else "SELECT table_name FROM information_schema.views WHERE table_schema = current_schema()"))}
        for name, sql in VIEWS.items():
            if name not in existing:
                conn.execute(text(sql))
    with st.session() as s:
        row = s.get(Meta, "schema_version")
        if row is None:
            s.add(Meta(key="schema_version", value=str(SCHEMA_VERSION)))
        elif int(row.value) > SCHEMA_VERSION:
            raise InputError(f"store schema {row.value} is newer than this rbridge ({SCHEMA_VERSION}); upgrade rbridge",
                             file=st.url)


def latest_store(folder: str | Path = "stores") -> Path | None:
    """The most recently modified SQLite store under ``folder``."""
    folder = Path(folder)
    dbs = sorted(folder.glob("*.db"), key=lambda p: p.stat().st_mtime, reverse=True)
    return dbs[0] if dbs else None


__all__ = ["Store", "open_store", "store_url", "latest_store", "select"]
