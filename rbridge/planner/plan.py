"""Running a plan: check the store, prepare the data, record the plan, then serve it.

``rbridge plan`` is the plan's coordinator: it refuses a store holding another
plan or a changed spec, prepares tokenizer and shards, writes the plan row, and
then works on the plan itself through the same worker loop that ``rbridge
worker`` processes run (rbridge.planner.worker), alongside any of them; with
``--no-local`` it only waits for them. The store is written before and after
everything that costs compute, so a crash loses at most the work since the last
checkpoint, and running the same plan again skips what is done. Seeds derive
from the spec's seed, the stage and the candidate's name, so a resumed plan (or
one spread over many workers) equals an uninterrupted one.
"""

from __future__ import annotations

import difflib
import fcntl
import json
import os
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from sqlmodel import select

from rbridge._failpoints import failpoint
from rbridge.errors import InputError, StoreBusy
from rbridge.planner.worker import runs_dir
from rbridge.spec import Spec, parse_spec
from rbridge.store import Candidate, Evaluation, Plan, Run, Store, open_store, store_url
from rbridge.store.db import safe_url
from rbridge.store.models import utcnow

SCORE_METRICS = ("rbridge", "nll", "rbridge_no_minmax", "bpb")


@contextmanager
def plan_lock(store: str, plan_name: str | None = None):
    """Hold an exclusive lock for the life of a plan.

    SQLite: an OS file lock (flock) beside the database: the kernel releases it when its
    process dies, even by SIGKILL, so a crashed plan never leaves a stale lock and
    any run still marked RUNNING afterwards belongs to a dead process.

    PostgreSQL (a store that may hold many plans): a session-level advisory lock on
    a hash of the plan name, held on its own connection; the server releases it when
    that connection ends, so the same holds when the process dies.
    """
    from rbridge.store.db import AdvisoryLock, is_postgres, safe_url

    url = store_url(store)
    if is_postgres(url):
        lock = AdvisoryLock(url, f"rbridge plan:{plan_name or ''}",
                            holder=f"rbridge plan pid {os.getpid()} on {socket.gethostname()}")
        if not lock.acquire():
            holder = lock.holder_of() or "another process"
            raise StoreBusy(f"{safe_url(url)}: another rbridge plan ({holder}) is running plan "
                            f"'{plan_name}' on this store; wait for it, watch it with `rbridge status`, "
                            "or use another --store") from None
        try:
            yield
        finally:
            lock.release()
        return
    if not url.startswith("sqlite:///"):
        yield  # other shared stores coordinate through the database (rbridge worker)
        return
    path = Path(url[len("sqlite:///"):] + ".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise StoreBusy(f"{path.with_suffix('')}: another rbridge plan ({holder}) is running on this store; "
                            "wait for it, watch it with `rbridge status`, or use another --store") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()}")
        fh.flush()
        try:
            yield
        finally:
            fh.seek(0)
            fh.truncate()
            fcntl.flock(fh, fcntl.LOCK_UN)


def default_store_path(spec: Spec) -> str:
    return spec.store or str(Path("stores") / f"{spec.name}.db")


@dataclass
class PlanResult:
    plan_id: int
    store_url: str
    wall_s: float
    ranking: list[dict] = field(default_factory=list)
    reused_runs: int = 0   # (run, rung) steps found done in the store
    trained_runs: int = 0  # (run, rung) steps trained and scored by this call


class _Quiet:
    """A stand-in for rich's Console when the caller wants no output."""

    def print(self, *a, **k):
        pass

    def log(self, *a, **k):
        pass


class Planner:
    """Runs one spec against one store. ``Planner(spec).run()`` is the whole job."""

    def __init__(self, spec: Spec, store: str | None = None, console: Console | None = None,
                 force: bool = False, threads: int | None = None, local: bool = True, poll_s: float = 2.0,
                 heartbeat_timeout: float | None = None):
        self.spec = spec
        self.store_arg = store or default_store_path(spec)
        self.store: Store | None = None
        self.threads = threads
        self.console = console or _Quiet()
        self.force = force
        self.local = local
        self.poll_s = poll_s
        from rbridge.planner.worker import DEFAULT_HEARTBEAT_TIMEOUT_S
        self.heartbeat_timeout = heartbeat_timeout or DEFAULT_HEARTBEAT_TIMEOUT_S
        self.stages = spec.resolved_stages()
        self._data = None
        self._traces = None
        self.reused_runs = 0
        self.trained_runs = 0

    # ------------------------------------------------------------------ plan row
    def _check_store(self) -> None:
        """Refuse a store that holds another plan, or this plan with another spec; changes nothing."""
        url = store_url(self.store_arg)
        if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).exists():
            return
        st = open_store(self.store_arg)
        try:
            with st.session() as s:
                plans = s.exec(select(Plan)).all()
        finally:
            st.close()
        mine = [p for p in plans if p.name == self.spec.name]
        if not mine:
            if plans and url.startswith("sqlite"):
                raise InputError(f"this store holds plan '{plans[0].name}', not '{self.spec.name}'; "
                                 "use another --store", file=self.store_arg)
            return
        plan = mine[0]
        if not plan.spec_hash:  # made by `rbridge targets import` before the plan ran: adopt it
            return
        if plan.spec_hash != self.spec.spec_hash and not self.force:
            diff = "\n".join(difflib.unified_diff(plan.spec_text.splitlines(), self.spec.text.splitlines(),
                                                  "stored spec", "this spec", lineterm="", n=1))
            raise InputError("the spec changed since this plan began; rerun with --force to accept, "
                             f"or use another --store. Changes:\n{diff}", file=self.spec.path)

    def _plan_row(self, data) -> Plan:
        with self.store.session() as s:
            plan = s.exec(select(Plan).where(Plan.name == self.spec.name)).first()
            old_text = plan.spec_text if plan is not None else None
        if plan is not None and not plan.spec_hash:  # imported results only: this spec now runs it
            with self.store.session() as s:
                row = s.get(Plan, plan.id)
                row.spec_text, row.spec_hash, row.status = self.spec.text, self.spec.spec_hash, "running"
                row.spec_path = str(self.spec.path.resolve() if self.spec.path else "")
                have = {c.name for c in s.exec(select(Candidate).where(Candidate.plan_id == plan.id)).all()}
                for i, cand in enumerate(self.spec.candidates):
                    if cand.name not in have:
                        s.add(Candidate(plan_id=plan.id, name=cand.name,
                                        mix=json.dumps(cand.mix, sort_keys=True), position=i))
            return plan
        if plan is not None:
            if plan.spec_hash != self.spec.spec_hash:  # accepted with --force: redo what changed
                from rbridge.planner.reconcile import reconcile
                try:
                    old = parse_spec(old_text, Path(plan.spec_path or "spec.yaml"), check_files=False)
                except InputError:
                    old = None
                reconcile(self.store, plan.id, plan.name, old, self.spec, data,
                          runs_dir(self.store, self.spec.name), self.console)
                with self.store.session() as s:
                    row = s.get(Plan, plan.id)
                    row.spec_text, row.spec_hash, row.status = self.spec.text, self.spec.spec_hash, "running"
                    row.updated_at = utcnow()
            return plan
        with self.store.session() as s:
            plan = Plan(name=self.spec.name, spec_text=self.spec.text, spec_hash=self.spec.spec_hash,
                        spec_path=str(self.spec.path.resolve() if self.spec.path else ""), seed=self.spec.seed)
            s.add(plan)
            s.flush()
            for i, cand in enumerate(self.spec.candidates):
                s.add(Candidate(plan_id=plan.id, name=cand.name, mix=json.dumps(cand.mix, sort_keys=True),
                                position=i))
            failpoint("plan-row")
            return plan

    # ------------------------------------------------------------------ data
    def _prepare_data(self):
        from rbridge.planner.components import prepare_data
        if self._data is None:
            self._data = prepare_data(self.spec, self.console)
        return self._data

    def _load_traces(self):
        from rbridge.scoring.traces import load_traces
        if self._traces is None:
            self._traces = {b.name: load_traces(b.traces) for b in self.spec.benchmarks}
        return self._traces

    # ------------------------------------------------------------------ run
    def run(self) -> PlanResult:
        t0 = time.perf_counter()
        # Every input is read and validated before the store is created or changed.
        self._load_traces()
        with plan_lock(self.store_arg, self.spec.name):
            self._check_store()
            data = self._prepare_data()
            failpoint("data-prepared")
            self.store = open_store(self.store_arg)
            try:
                return self._run_locked(data, t0)
            finally:
                self.store.close()

    def _run_locked(self, data, t0: float) -> PlanResult:
        from rbridge.planner.worker import PlanState, serve_plan, wait_for_plan

        # Every stage's study (and Optuna's tables) exists before a worker can see the
        # plan row: workers never race to create them.
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        for stage in self.stages:
            optuna.create_study(study_name=f"{self.spec.name}:{stage.name}", storage=self.store.url,
                                direction="minimize", load_if_exists=True)
        plan = self._plan_row(data)
        with self.store.session() as s:
            self.reused_runs = len(s.exec(select(Evaluation.run_id, Evaluation.rung).distinct()
                                          .join(Run, Run.id == Evaluation.run_id)
                                          .where(Run.plan_id == plan.id)).all())
        state = PlanState(self.store, plan, self.spec, self.console, data=data, traces=self._load_traces(),
                          threads=self.threads, heartbeat_timeout=self.heartbeat_timeout)
        if self.local:
            serve_plan(state, self.poll_s)
        else:
            self.console.print(f"coordinating only (--no-local): start workers with "
                               f"`rbridge worker --store {safe_url(self.store.url)}`")
            wait_for_plan(state, self.poll_s)
        self.trained_runs = state.trained
        ranking = final_ranking(self.store, self.spec.name)
        return PlanResult(plan.id, self.store.url, time.perf_counter() - t0, ranking,
                          self.reused_runs, self.trained_runs)


def final_ranking(store: Store, plan_name: str) -> list[dict]:
    """The ranking view's rows for the plan's decision metric, stage by stage."""
    return store.query(
        "SELECT stage, candidate, benchmark, metric, value, rank, tokens_seen, status FROM ranking "
        "WHERE plan = :plan ORDER BY stage_index, benchmark, metric, rank, candidate", plan=plan_name)


def run_plan(spec: Spec, store: str | None = None, console: Console | None = None, force: bool = False,
             threads: int | None = None, local: bool = True, poll_s: float = 2.0,
             heartbeat_timeout: float | None = None) -> PlanResult:
    """Run (or continue) the plan a spec declares; returns the final ranking.

    ``threads``: CPU threads for torch; None picks per stage (see ``cpu_threads``).
    ``local=False`` (``--no-local``): only coordinate; ``rbridge worker`` processes do the runs.
    """
    return Planner(spec, store, console, force, threads, local, poll_s, heartbeat_timeout).run()


def make_progress(console: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed:,}/{task.total:,}"),
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console,
                    transient=True)

