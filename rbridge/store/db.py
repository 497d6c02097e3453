"""Opening a store: engine, schema, views, SQLite pragmas.

A store is any SQLAlchemy URL; a bare path means a SQLite file. SQLite runs in
WAL mode with a busy timeout, so a ``rbridge status`` in another terminal reads
while a plan writes, and every state change is its own short transaction.

PostgreSQL (``postgresql://...``) holds the same tables, views and Optuna
studies through psycopg 3 (``pip install 'rbridge[postgres]'``); plain
``postgresql://`` and ``postgres://`` URLs become ``postgresql+psycopg://``.
The views are written in the SQL both engines share: booleans are only tested
(``CASE WHEN flag``), never summed, and every ratio is computed in
``DOUBLE PRECISION`` so PostgreSQL returns floats, not NUMERIC.
"""

from __future__ import annotations

import hashlib
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from sqlalchemy import event, inspect, text
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, OperationalError
from sqlalchemy.pool import NullPool
from sqlmodel import Session, SQLModel, create_engine, select

from rbridge.errors import InputError
import rbridge.store.results  # noqa: F401 - registers its tables before create_all
from rbridge.store.models import SCHEMA_VERSION, Meta
from rbridge.store.sqlite_read import check_sqlite_file, latest_store  # noqa: F401 - part of this API
from rbridge.store.sqlite_read import refuse_folder_path

# Every view reads live runs only: a run superseded by an accepted spec edit keeps its
# rows (rbridge status lists it) but no longer counts.
#
# The last evaluation of every run, ranked within (plan, stage, benchmark, metric).
# A run that went further (more tokens: it survived more rungs) ranks above one
# dropped earlier; among runs that reached the same point, the metric decides in
# its own direction (lower is better for NLL-like metrics).
RANKING_VIEW = """
CREATE VIEW ranking AS
WITH last AS (
  SELECT e.run_id, e.benchmark, e.metric, e.value, e.higher_is_better, e.tokens_seen, e.ci_low, e.ci_high,
         ROW_NUMBER() OVER (PARTITION BY e.run_id, e.benchmark, e.metric
                            ORDER BY e.tokens_seen DESC, e.id DESC) AS rn
  FROM evaluations e
)
SELECT p.name AS plan, r.stage AS stage, c.name AS candidate,
       l.benchmark AS benchmark, l.metric AS metric, l.value AS value,
       RANK() OVER (PARTITION BY p.id, r.stage, l.benchmark, l.metric
                    ORDER BY l.tokens_seen DESC,
                             CASE WHEN l.higher_is_better THEN -l.value ELSE l.value END) AS rank,
       l.tokens_seen AS tokens_seen, r.status AS status, r.stage_index AS stage_index,
       l.ci_low AS ci_low, l.ci_high AS ci_high
FROM last l
JOIN runs r ON r.id = l.run_id
JOIN candidates c ON c.id = r.candidate_id
JOIN plans p ON p.id = r.plan_id
WHERE l.rn = 1 AND r.superseded_by = 0
"""

# Proxy values per (plan, stage, candidate, benchmark, metric): the planner's last
# evaluation of every run (as in `ranking`) and the imported proxy results
# (`rbridge results import`, the checkpoint with the most tokens), side by side.
PROXY_VALUES_VIEW = """
CREATE VIEW proxy_values AS
WITH last AS (
  SELECT e.run_id, e.benchmark, e.metric, e.value, e.higher_is_better, e.tokens_seen, e.rung,
         ROW_NUMBER() OVER (PARTITION BY e.run_id, e.benchmark, e.metric
                            ORDER BY e.tokens_seen DESC, e.id DESC) AS rn
  FROM evaluations e
),
imported AS (
  SELECT x.plan_id, x.stage, x.candidate, x.benchmark, x.metric, x.value, x.higher_is_better, x.tokens,
         x.params,
         ROW_NUMBER() OVER (PARTITION BY x.plan_id, x.stage, x.candidate, x.benchmark, x.metric
                            ORDER BY COALESCE(x.tokens, 0) DESC, x.id DESC) AS rn
  FROM results x
  WHERE x.kind = 'proxy'
)
SELECT p.name AS plan, r.stage AS stage, c.name AS candidate, l.benchmark AS benchmark, l.metric AS metric,
       l.value AS value, l.higher_is_better AS higher_is_better, l.tokens_seen AS tokens_seen,
       r.non_embedding_params AS params, 'planner' AS source
FROM last l
JOIN runs r ON r.id = l.run_id
JOIN candidates c ON c.id = r.candidate_id
JOIN plans p ON p.id = r.plan_id
WHERE l.rn = 1 AND r.superseded_by = 0 AND r.role <> 'target'
UNION ALL
SELECT p.name AS plan, i.stage AS stage, i.candidate AS candidate, i.benchmark AS benchmark, i.metric AS metric,
       i.value AS value, i.higher_is_better AS higher_is_better, i.tokens AS tokens_seen,
       i.params AS params, 'imported' AS source
FROM imported i
JOIN plans p ON p.id = i.plan_id
WHERE i.rn = 1
"""

# One target value per (plan, candidate, benchmark, metric): the plan's own target stages
# (role 'target': the task accuracy of each finished run, averaged over the stage's seeds;
# n_seeds counts them) and the imported target results; of several, the largest
# model (params, then tokens) wins, then the planner's over an import of the same size.
TARGET_VALUES_VIEW = """
CREATE VIEW target_values AS
WITH last AS (
  SELECT e.run_id, e.benchmark, e.metric, e.value, e.higher_is_better, e.tokens_seen,
         ROW_NUMBER() OVER (PARTITION BY e.run_id, e.benchmark, e.metric
                            ORDER BY e.tokens_seen DESC, e.id DESC) AS rn
  FROM evaluations e
),
planned AS (
  SELECT r.plan_id AS plan_id, c.name AS candidate, l.benchmark AS benchmark, l.metric AS metric,
         AVG(l.value) AS value, MAX(CASE WHEN l.higher_is_better THEN 1 ELSE 0 END) AS hib,
         MAX(r.non_embedding_params) AS params, MAX(l.tokens_seen) AS tokens,
         COUNT(*) AS n_seeds, r.stage_group AS stage_group
  FROM last l
  JOIN runs r ON r.id = l.run_id
  JOIN candidates c ON c.id = r.candidate_id
  WHERE l.rn = 1 AND r.superseded_by = 0 AND r.role = 'target' AND r.status = 'done' AND l.metric = 'accuracy'
  GROUP BY r.plan_id, r.stage_group, c.name, l.benchmark, l.metric
),
everything AS (
  SELECT plan_id, candidate, benchmark, metric, value, hib, params, tokens, NULL AS seed, n_seeds,
         'planner' AS source, stage_group, 0 AS id
  FROM planned
  UNION ALL
  SELECT t.plan_id, t.candidate, t.benchmark, t.metric, t.value,
         CASE WHEN t.higher_is_better THEN 1 ELSE 0 END, t.params, t.tokens, t.seed, t.n_seeds,
         'imported', NULL, t.id
  FROM results t
  WHERE t.kind = 'target'
)
SELECT plan, candidate, benchmark, metric, value, higher_is_better, params, tokens, seed, n_seeds, source,
       stage_group
FROM (
  SELECT p.name AS plan, x.candidate AS candidate, x.benchmark AS benchmark, x.metric AS metric,
         x.value AS value, x.hib = 1 AS higher_is_better, x.params AS params, x.tokens AS tokens,
         x.seed AS seed, x.n_seeds AS n_seeds, x.source AS source, x.stage_group AS stage_group,
         ROW_NUMBER() OVER (PARTITION BY x.plan_id, x.candidate, x.benchmark, x.metric
                            ORDER BY COALESCE(x.params, 0) DESC, COALESCE(x.tokens, 0) DESC,
                                     CASE WHEN x.source = 'planner' THEN 0 ELSE 1 END, x.id DESC) AS rn
  FROM everything x
  JOIN plans p ON p.id = x.plan_id
) ranked
WHERE rn = 1
"""

# METHOD.md section 5. Every unordered pair of candidates with a proxy value in
# the stage and a target value on the same benchmark. The proxy orders a pair as
# the stage's `ranking` does: the candidate that went further (more tokens: it
# survived more rungs) first, then the proxy metric in its own direction; the
# target orders it by the target metric in its direction. Pairs whose target
# values differ count (n_pairs); a pair is correct when both orders agree, and
# half correct when the proxy ties (proxy_ties_counted_half says how many did).
# kendall_tau is tau-b over all pairs: (C - D) / sqrt((n0 - n1)(n0 - n2)).
DECISION_ACCURACY_VIEW = """
CREATE VIEW decision_accuracy AS
WITH j AS (
  SELECT v.plan AS plan, v.stage AS stage, v.benchmark AS benchmark, v.metric AS proxy_metric,
         t.metric AS target_metric, v.candidate AS candidate,
         COALESCE(v.tokens_seen, 0) AS px_tokens,
         CASE WHEN v.higher_is_better THEN v.value ELSE -v.value END AS px,
         CASE WHEN t.higher_is_better THEN t.value ELSE -t.value END AS ty
  FROM proxy_values v
  JOIN target_values t ON t.plan = v.plan AND t.candidate = v.candidate AND t.benchmark = v.benchmark
),
pairs AS (
  SELECT a.plan AS plan, a.stage AS stage, a.benchmark AS benchmark, a.proxy_metric AS proxy_metric,
         a.target_metric AS target_metric,
         CASE WHEN a.px_tokens > b.px_tokens THEN 1 WHEN a.px_tokens < b.px_tokens THEN -1
              WHEN a.px > b.px THEN 1 WHEN a.px < b.px THEN -1 ELSE 0 END AS sx,
         CASE WHEN a.ty > b.ty THEN 1 WHEN a.ty < b.ty THEN -1 ELSE 0 END AS sy
  FROM j a
  JOIN j b ON b.plan = a.plan AND b.stage = a.stage AND b.benchmark = a.benchmark
          AND b.proxy_metric = a.proxy_metric AND b.target_metric = a.target_metric
          AND a.candidate < b.candidate
),
agg AS (
  SELECT plan, stage, benchmark, proxy_metric, target_metric,
         COUNT(*) AS n_all,
         SUM(CASE WHEN sx * sy > 0 THEN 1 ELSE 0 END) AS concordant,
         SUM(CASE WHEN sx * sy < 0 THEN 1 ELSE 0 END) AS discordant,
         SUM(CASE WHEN sx = 0 THEN 1 ELSE 0 END) AS ties_proxy,
         SUM(CASE WHEN sy = 0 THEN 1 ELSE 0 END) AS ties_target,
         SUM(CASE WHEN sx = 0 AND sy <> 0 THEN 1 ELSE 0 END) AS ties_proxy_only
  FROM pairs
  GROUP BY plan, stage, benchmark, proxy_metric, target_metric
),
n AS (
  SELECT plan, stage, benchmark, proxy_metric, target_metric, COUNT(*) AS n_candidates
  FROM j
  GROUP BY plan, stage, benchmark, proxy_metric, target_metric
)
SELECT n.plan AS plan, n.stage AS stage, n.benchmark AS benchmark, n.proxy_metric AS proxy_metric,
       n.target_metric AS target_metric, n.n_candidates AS n_candidates,
       COALESCE(a.n_all - a.ties_target, 0) AS n_pairs,
       CASE WHEN a.n_all - a.ties_target > 0
            THEN CAST(a.concordant + 0.5 * a.ties_proxy_only AS DOUBLE PRECISION)
                 / CAST(a.n_all - a.ties_target AS DOUBLE PRECISION) END
         AS decision_accuracy,
       CASE WHEN a.n_all - a.ties_proxy > 0 AND a.n_all - a.ties_target > 0
            THEN CAST(a.concordant - a.discordant AS DOUBLE PRECISION)
                 / sqrt(CAST(a.n_all - a.ties_proxy AS DOUBLE PRECISION)
                        * CAST(a.n_all - a.ties_target AS DOUBLE PRECISION)) END AS kendall_tau,
       COALESCE(a.concordant, 0) AS concordant, COALESCE(a.discordant, 0) AS discordant,
       COALESCE(a.ties_proxy_only, 0) AS proxy_ties_counted_half, COALESCE(a.ties_target, 0) AS target_ties
FROM n
LEFT JOIN agg a ON a.plan = n.plan AND a.stage = n.stage AND a.benchmark = n.benchmark
               AND a.proxy_metric = n.proxy_metric AND a.target_metric = n.target_metric
"""

# In creation order: a view is created after the views it reads.
VIEWS = {"ranking": RANKING_VIEW, "proxy_values": PROXY_VALUES_VIEW, "target_values": TARGET_VALUES_VIEW,
         "decision_accuracy": DECISION_ACCURACY_VIEW}


POSTGRES_DRIVER = "postgresql+psycopg"
POSTGRES_HINT = "PostgreSQL stores need the psycopg driver: pip install 'rbridge[postgres]'"
# Serialises schema creation between processes opening the same PostgreSQL database.
_SCHEMA_LOCK_KEY = 0x7262726964676501  # "rbridge" + 1


def store_url(store: str | Path) -> str:
    """A SQLAlchemy URL for a store argument: URLs pass through, paths become SQLite URLs.

    ``postgresql://`` and ``postgres://`` become ``postgresql+psycopg://`` (psycopg 3);
    a URL naming another driver (``postgresql+psycopg2://``) is kept as given.
    """
    s = str(store)
    if "://" in s:
        scheme, rest = s.split("://", 1)
        if scheme in ("postgresql", "postgres"):
            return f"{POSTGRES_DRIVER}://{rest}"
        return s
    refuse_folder_path(s)
    return f"sqlite:///{Path(s).expanduser().resolve()}"


def is_postgres(url: str) -> bool:
    return url.startswith(("postgresql", "postgres:"))


def safe_url(url: str) -> str:
    """The URL with any password masked, for messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


def _require_driver(url: str) -> None:
    """One clear InputError when a PostgreSQL URL's driver is not installed."""
    if not is_postgres(url):
        return
    driver = url.split("://", 1)[0].partition("+")[2] or "psycopg2"
    module = {"psycopg": "psycopg", "psycopg2": "psycopg2", "asyncpg": "asyncpg", "pg8000": "pg8000"}.get(driver, driver)
    try:
        __import__(module)
    except ImportError:
        raise InputError(POSTGRES_HINT if module == "psycopg" else
                         f"the store URL asks for the {module} driver, which is not installed; "
                         f"use postgresql://... with pip install 'rbridge[postgres]'", file=safe_url(url)) from None


def _postgres_engine(url: str, application_name: str | None = None, **kw) -> Engine:
    _require_driver(url)
    # Timestamps are stored as naive UTC, as in SQLite, whatever the server's TimeZone.
    args = {"options": "-c timezone=UTC"}
    if application_name:
        args["application_name"] = application_name
    return create_engine(url, pool_pre_ping=True, connect_args=args, **kw)


def _connect_error(url: str, exc: OperationalError) -> InputError:
    first = str(exc.orig or exc).strip().splitlines()[0] if str(exc.orig or exc).strip() else type(exc).__name__
    return InputError(f"cannot connect to the store: {first}", file=safe_url(url))


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

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name  # sqlite | postgresql

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

    @contextmanager
    def reading(self) -> Iterator:
        """``rows`` on one connection: several reads in one transaction, one consistent snapshot."""
        with self.engine.connect() as conn:
            yield lambda sql, **params: [tuple(row) for row in conn.execute(text(sql), params)]

    def rows(self, sql: str, **params) -> list[tuple]:
        """Rows of a raw SQL query as tuples (bulk reads; rbridge.store.sqlite_read.SQLiteReader has the same)."""
        with self.engine.connect() as conn:
            return [tuple(row) for row in conn.execute(text(sql), params)]

    def close(self) -> None:
        self.engine.dispose()


_SCHEMES = ("sqlite", "postgresql", "postgres")


def _sqlite_read_only(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA query_only=1")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def open_store(store: str | Path, create: bool = True, read_only: bool = False) -> Store:
    """Open (and by default create) the store at a path or URL, with tables and views.

    A SQLite file is checked first (``check_sqlite_file``). ``read_only`` (``status``,
    ``accuracy``, ``predict``): the file is opened ``mode=ro``, so it works on a
    read-only file and changes nothing, not even the journal mode; a store of an older
    schema is upgraded first where the file is writable.
    """
    url = store_url(store)
    scheme = url.split("://", 1)[0].split("+", 1)[0]
    if scheme not in _SCHEMES:
        raise InputError(f"unsupported store URL scheme {scheme!r}; give a SQLite path or postgresql://...",
                         file=safe_url(url))
    if url.startswith("sqlite:///"):
        path = Path(url[len("sqlite:///"):])
        version = check_sqlite_file(path, create=create and not read_only)
        if read_only:
            if version is not None and version < SCHEMA_VERSION:
                # Written by an older rbridge: the additive in-place upgrade, once, if the file may be written
                # (permission bits, not os.access: root may write anything, but a 0444 file says "don't").
                if not (path.stat().st_mode & 0o200 and os.access(path.parent, os.W_OK)):
                    raise InputError(f"this store has schema {version} and needs the in-place upgrade to "
                                     f"{SCHEMA_VERSION}, which a read-only file does not allow; make it writable "
                                     "once, or read a copy", file=path)
                open_store(store, create=True).close()
            # As in check_sqlite_file: immutable (no -wal/-shm created) unless a writer's -wal file is there.
            quiet = "" if Path(f"{path}-wal").exists() else "&immutable=1"
            engine = create_engine(f"sqlite:///file:{path}?mode=ro{quiet}&uri=true", connect_args={"timeout": 30})
            event.listen(engine, "connect", _sqlite_read_only)
            return Store(url, engine)
        if path.exists() and not path.stat().st_mode & 0o200:
            # Permission bits, not os.access (root may write anything): a 0444 store says "do not write".
            raise InputError("the store file is read-only (no write permission) and this command writes to it; "
                             "make it writable (chmod u+w) or give another --store; nothing was changed",
                             file=path)
        path.parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
    elif is_postgres(url):
        # No pool: a connection per transaction, closed after it. A worker then holds a server connection
        # only while it talks to the store (claims, heartbeats, records: milliseconds every few seconds), not
        # for its life, so hundreds of workers fit in PostgreSQL's default 100 connections
        # (tests/test_workers.py measures them); a pooled engine kept 2 idle connections per worker.
        engine = _postgres_engine(url, poolclass=NullPool)
    else:
        engine = create_engine(url, pool_pre_ping=True)
    st = Store(url, engine)
    try:
        if create:
            _ensure_schema(st)
        elif not url.startswith("sqlite"):
            with engine.connect() as conn:
                if not inspect(conn).has_table("plans"):
                    raise InputError("no rbridge store in this database (no plans table)", file=safe_url(url))
    except OperationalError as exc:
        engine.dispose()
        if url.startswith("sqlite"):
            raise
        raise _connect_error(url, exc) from None
    except BaseException:
        engine.dispose()
        raise
    return st


def _create_views(conn: Connection, existing: set[str], replace: bool = False) -> None:
    """Create the views; ``replace``: drop and recreate them (a store of an older schema).

    Views hold no data, so replacing them loses nothing. Dropped in reverse order:
    a view is dropped before the views it reads.
    """
    if replace:
        for name in reversed(list(VIEWS)):
            if name in existing:
                conn.execute(text(f"DROP VIEW {name}"))
        existing = set()
    for name, sql in VIEWS.items():
        if name not in existing:
            conn.execute(text(sql))


# Indexes of earlier schemas that a later one replaced (4: the unique indexes now hold
# among live rows only). Dropping an index loses no data.
_REPLACED_INDEXES = {"runs": ["ux_runs_plan_stage_candidate"],
                     "decisions": ["ux_decisions_plan_stage_rung_candidate"]}


def _stored_version(conn: Connection) -> int | None:
    if Meta.__tablename__ not in inspect(conn).get_table_names():
        return None
    row = conn.execute(text(f"SELECT value FROM {Meta.__tablename__} WHERE key = 'schema_version'")).first()
    return None if row is None else int(row[0])


def _upgrade(conn: Connection) -> bool:
    """Bring a store written by an older rbridge up to this schema, in place; True if it was older.

    Only additive changes: columns added with their server defaults, indexes
    created when missing, replaced indexes and the views (no data) recreated.
    Nothing is rewritten and no row is dropped.
    """
    version = _stored_version(conn)
    insp = inspect(conn)
    tables = set(insp.get_table_names())
    for table in SQLModel.metadata.sorted_tables:
        if table.name not in tables:
            continue
        have = {c["name"] for c in insp.get_columns(table.name)}
        for col in table.columns:
            if col.name in have:
                continue
            ddl = f"ALTER TABLE {table.name} ADD COLUMN {col.name} {col.type.compile(conn.dialect)}"
            if col.server_default is not None:
                ddl += f" DEFAULT '{col.server_default.arg}'"
            conn.execute(text(ddl))
        indexes = {ix["name"] for ix in insp.get_indexes(table.name)}
        for name in _REPLACED_INDEXES.get(table.name, []):
            if name in indexes:
                conn.execute(text(f"DROP INDEX {name}"))
        for index in table.indexes:
            index.create(conn, checkfirst=True)
    return version is not None and version < SCHEMA_VERSION


def _refuse_newer(st: Store) -> None:
    """A store written by a newer rbridge is refused before any DDL touches it."""
    with st.engine.connect() as conn:
        if Meta.__tablename__ not in inspect(conn).get_table_names():
            return
        row = conn.execute(text(f"SELECT value FROM {Meta.__tablename__} WHERE key = 'schema_version'")).first()
    if row is not None and int(row[0]) > SCHEMA_VERSION:
        raise InputError(f"store schema {row[0]} is newer than this rbridge ({SCHEMA_VERSION}); upgrade rbridge",
                         file=safe_url(st.url))


def _ensure_schema(st: Store) -> None:
    _refuse_newer(st)
    if st.dialect == "postgresql":
        # DDL is transactional here: one transaction under a transaction-level advisory
        # lock, so processes opening a new database at once never race on CREATE.
        with st.engine.begin() as conn:
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _SCHEMA_LOCK_KEY})
            SQLModel.metadata.create_all(conn)
            older = _upgrade(conn)
            existing = {row[0] for row in conn.execute(text(
                "SELECT table_name FROM information_schema.views WHERE table_schema = current_schema()"))}
            _create_views(conn, existing, replace=older)
            if older:
                conn.execute(text(f"UPDATE {Meta.__tablename__} SET value = :v WHERE key = 'schema_version'"),
                             {"v": str(SCHEMA_VERSION)})
    else:
        # Several processes may open a new SQLite store at once (a plan and its workers);
        # CREATE TABLE / VIEW are not guarded there (pysqlite runs DDL outside a transaction),
        # so a loser of the race looks again.
        for attempt in range(5):
            try:
                SQLModel.metadata.create_all(st.engine)
                with st.engine.begin() as conn:
                    older = _upgrade(conn)
                    existing = {row[0] for row in conn.execute(text(
                        "SELECT name FROM sqlite_master WHERE type='view'" if st.url.startswith("sqlite")
                        else "SELECT table_name FROM information_schema.views WHERE table_schema = current_schema()"))}
                    _create_views(conn, existing, replace=older)
                    if older:  # in the same transaction: the next process sees a current store
                        conn.execute(text(f"UPDATE {Meta.__tablename__} SET value = :v WHERE key = 'schema_version'"),
                                     {"v": str(SCHEMA_VERSION)})
                break
            except OperationalError as exc:
                # A racing process created (or, upgrading, dropped) the same view or index.
                if not any(m in str(exc) for m in ("already exists", "no such view", "no such index")) \
                        or attempt == 4:
                    raise
                time.sleep(0.1 * (attempt + 1))
    try:
        with st.session() as s:
            if s.get(Meta, "schema_version") is None:
                s.add(Meta(key="schema_version", value=str(SCHEMA_VERSION)))
    except IntegrityError:
        pass  # another process opening the new store wrote it first
    with st.session() as s:
        row = s.get(Meta, "schema_version")
        if int(row.value) < SCHEMA_VERSION:
            row.value = str(SCHEMA_VERSION)  # upgraded above


def advisory_key(name: str) -> int:
    """A signed 64-bit PostgreSQL advisory-lock key for a name (stable across processes and machines)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


class AdvisoryLock:
    """A session-level PostgreSQL advisory lock held on its own connection.

    The server releases it when that connection ends, including when the process
    holding it dies (SIGKILL, a lost node): no stale locks.
    """

    def __init__(self, url: str, name: str, holder: str):
        self.url = store_url(url)
        self.name = name
        self.key = advisory_key(name)
        self.holder = holder
        self._engine: Engine | None = None
        self._conn: Connection | None = None

    def acquire(self) -> bool:
        """Take the lock without waiting; False when another session holds it."""
        # application_name tells a refused process who holds the lock (pg_stat_activity).
        self._engine = _postgres_engine(self.url, application_name=self.holder[:63], poolclass=NullPool)
        try:
            self._conn = self._engine.connect()
            got = bool(self._conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": self.key}).scalar())
            self._conn.commit()  # the lock is session-level: it outlives the transaction
        except OperationalError as exc:
            self.release()
            raise _connect_error(self.url, exc) from None
        if not got:
            self.release()
        return got

    def holder_of(self) -> str | None:
        """The application_name of the session holding the lock, if visible."""
        engine = _postgres_engine(self.url, poolclass=NullPool)
        try:
            with engine.connect() as conn:
                return conn.execute(text(
                    "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                    "WHERE l.locktype = 'advisory' AND l.granted AND l.database = "
                    "(SELECT oid FROM pg_database WHERE datname = current_database()) "
                    "AND l.objsubid = 1 AND ((l.classid::bigint << 32) | l.objid::bigint) = :k "
                    "LIMIT 1"), {"k": self.key}).scalar()
        except Exception:  # noqa: BLE001 - only for the message
            return None
        finally:
            engine.dispose()

    def release(self) -> None:
        if self._conn is not None:
            try:
                self._conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": self.key})
                self._conn.commit()
            except Exception:  # noqa: BLE001 - closing the connection releases it anyway
                pass
            self._conn.close()
            self._conn = None
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None


__all__ = ["Store", "open_store", "store_url", "latest_store", "select", "is_postgres", "safe_url",
           "AdvisoryLock", "advisory_key", "POSTGRES_HINT"]
