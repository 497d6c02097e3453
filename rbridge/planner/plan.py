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
import os
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from rbridge._failpoints import failpoint
from rbridge.analysis.separation import stage_items
from rbridge.errors import InputError, StoreBusy
from rbridge.planner import mirror
from rbridge.planner.claims import DEFAULT_HEARTBEAT_TIMEOUT_S
from rbridge.planner.state import PlanState
from rbridge.reporting import SILENT, Reporter
from rbridge.spec import Spec, parse_spec
from rbridge.store import Store, open_store, store_url
from rbridge.store import plans as plan_ops
from rbridge.store.models import utcnow
from rbridge.store.db import check_sqlite_file, safe_url


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
    # (stage, metric) -> {(candidate, benchmark): per-trace values of the last evaluation}: the paired tie rule
    per_trace: dict[tuple[str, str], dict[tuple[str, str], list]] = field(default_factory=dict)

    def items(self, stage: str, metric: str) -> dict[tuple[str, str], list]:
        return self.per_trace.get((stage, metric), {})


class Planner:
    """Runs one spec against one store. ``Planner(spec).run()`` is the whole job."""

    def __init__(self, spec: Spec, store: str | None = None, report: Reporter = SILENT, force: bool = False,
                 threads: int | None = None, local: bool = True, poll_s: float = 2.0,
                 heartbeat_timeout: float | None = None, workers: int | None = None, record_only: bool = False):
        self.spec = spec
        self.record_only = record_only  # record the plan (data, plan row, studies) and return: a launcher serves it
        self.workers = workers
        self.store_arg = store or default_store_path(spec)
        self.store: Store | None = None
        self.threads = threads
        self.report = report
        self.force = force
        self.local = local
        self.poll_s = poll_s
        self.heartbeat_timeout = heartbeat_timeout or DEFAULT_HEARTBEAT_TIMEOUT_S
        self.stages = spec.resolved_stages()
        self.reused_runs = 0
        self.trained_runs = 0
        self.done_already = False  # the store holds this plan, with this spec, done (_check_store)

    # ------------------------------------------------------------------ plan row
    def _check_store(self) -> None:
        """Refuse a store that holds another plan, or this plan with another spec; changes nothing."""
        url = store_url(self.store_arg)
        if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).exists():
            self._announce_new_store(Path(url[len("sqlite:///"):]))
            return
        st = open_store(self.store_arg)
        try:
            plans = plan_ops.all_plans(st)
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
        self.done_already = plan.status == "done" and plan.spec_hash == self.spec.spec_hash
        if plan.spec_hash != self.spec.spec_hash and not self.force:
            diff = "\n".join(difflib.unified_diff(plan.spec_text.splitlines(), self.spec.text.splitlines(),
                                                  "stored spec", "this spec", lineterm="", n=1))
            raise InputError("the spec changed since this plan began; rerun with --force to accept, "
                             f"or use another --store. Changes:\n{diff}", file=self.spec.path)

    def _announce_new_store(self, path: Path) -> None:
        """Say, before anything trains, that this plan starts a new store while another store of the same
        plan name exists (the same spec run from another folder: the default store is relative to the
        current folder, rbridge.store.registry)."""
        from rbridge.store import registry

        found = registry.others(self.spec.name, path)
        if not found:
            self.report.say(f"new store: {path}")
            return
        other = found[0]
        spec = self.spec.path if self.spec.path else "SPEC.yaml"
        self.report.say(f"[yellow]note:[/] new store {path.resolve()}: plan '{self.spec.name}' starts from nothing "
                        f"here, but it already has a store at {other['store']}"
                        + (f" (spec {other['spec']})" if other.get("spec") else "")
                        + f". The default store is stores/{self.spec.name}.db under the current folder; to continue "
                        f"that plan instead, stop now (Ctrl-C) and run `rbridge plan {spec} --store {other['store']}`")

    def _plan_row(self, data):
        from rbridge.mixtures.search import all_candidates

        spec = self.spec
        candidates = [(c.name, c.mix) for c in all_candidates(spec, data)]  # the listed ones, then a search's swarm
        spec_path = str(spec.path.resolve() if spec.path else "")
        plan = plan_ops.find_plan(self.store, spec.name)
        if plan is None:
            if self.store.url.startswith("sqlite:///"):
                from rbridge.store import registry

                registry.record(spec.name, Path(self.store.url[len("sqlite:///"):]), spec.path)
            return plan_ops.create_plan(self.store, name=spec.name, spec_text=spec.text, spec_hash=spec.spec_hash,
                                        spec_path=spec_path, seed=spec.seed, candidates=candidates)
        if not plan.spec_hash:  # imported results only: this spec now runs it
            plan_ops.adopt_plan(self.store, plan.id, spec_text=spec.text, spec_hash=spec.spec_hash,
                                spec_path=spec_path, candidates=candidates)
        elif plan.spec_hash != spec.spec_hash:  # accepted with --force: redo what changed
            from rbridge.planner.reconcile import reconcile
            try:
                old = parse_spec(plan.spec_text, Path(plan.spec_path or "spec.yaml"), check_files=False)
            except InputError:
                old = None
            reconcile(self.store, plan, old, spec, data, self.report)
        return plan_ops.get_plan(self.store, plan.id)

    # ------------------------------------------------------------------ run
    def run(self) -> PlanResult:
        t0 = time.perf_counter()
        # Every input is read and validated before the store is created or changed.
        from rbridge.scoring.traces import load_traces

        traces = {b.name: load_traces(b.traces) for b in self.spec.benchmarks}
        url = store_url(self.store_arg)
        if url.startswith("sqlite:///"):  # a directory, a damaged or foreign file: refused before the lock file
            check_sqlite_file(Path(url[len("sqlite:///"):]), create=True)
        with plan_lock(self.store_arg, self.spec.name):
            self._check_store()
            # This process closes the store after its local processes have ended: the last connection to
            # close checkpoints a SQLite store's WAL and removes the -wal file, which two processes closing
            # at the same moment can both leave (each sees the other still open).
            try:
                # Local worker processes load the training code while this one prepares the data;
                # they wait until the store and the plan row exist (LocalWorkers.release).
                with self._local_workers(traces) as local:
                    from rbridge.planner.steps import prepare_data  # torch: after the lock (a refusal stays quick)
                    data = prepare_data(self.spec, self.report)
                    # Check everything, then change anything: every stage's model is built (on the meta device)
                    # before the store is created or a recorded row is touched.
                    from rbridge.planner.steps import check_proxies, warn_cut_answers, warn_repeated_sources
                    check_proxies(self.stages, data, self.spec.path)
                    warn_cut_answers(self.stages, self.spec, data, traces, self.report)
                    if self.spec.search is not None:  # the swarm: drawn (or its caps refused) before the store
                        from rbridge.mixtures.search import swarm_candidates

                        n = len(swarm_candidates(self.spec, data))
                        self.report.say(f"search: a swarm of {n} mixtures of "
                                        f"{', '.join(self.spec.searched_sources())} (swarm-...), "
                                        f"beside {len(self.spec.candidates)} listed candidate(s)")
                    warn_repeated_sources(self.stages, self.spec, data, self.report)
                    failpoint("data-prepared")
                    self.store = open_store(self.store_arg)
                    return self._run_locked(data, traces, t0, local)
            finally:
                if self.store is not None:
                    self.store.close()

    def _local_workers(self, traces: dict):
        """The plan's local worker processes (rbridge.planner.local), started now, or nothing."""
        import contextlib

        if not self.local:
            return contextlib.nullcontext()
        from rbridge.analysis.compute import non_embedding_params
        from rbridge.planner.local import (LocalWorkers, layout, plan_work_flops, threads_for,
                                           too_small_for_workers, trace_tokens_bound)

        if self.done_already:  # every run recorded: a second process would import torch to find nothing
            plan_layout = layout(1, [1])
            self.report.say(f"local workers: none; plan '{self.spec.name}' is done in this store, "
                            "nothing is left to train")
        else:
            tok = self.spec.tokenizer
            search = self.spec.search
            n_candidates = len(self.spec.candidates) + (search.swarm + search.propose if search is not None else 0)
            flops = plan_work_flops(self.stages, n_candidates, tok.train.vocab_size if tok.train else None,
                                    trace_tokens_bound(self.spec.benchmarks, traces))
            plan_layout = layout(self.workers, [threads_for(non_embedding_params(st), self.threads)
                                                for st in self.stages], self.spec.runs_per_gpu, flops)
            if self.workers is None and too_small_for_workers(flops):
                self.report.say(f"local workers: none; the whole plan computes at most {flops / 1e9:.1f} GFLOP, "
                                "too little to pay for starting a second process (--workers N starts them anyway)")
        return LocalWorkers(store_url(self.store_arg), self.spec.name, plan_layout, self.heartbeat_timeout,
                            self.threads, self.report)

    def _run_locked(self, data, traces, t0: float, local) -> PlanResult:
        from rbridge.planner.worker import PlanWorker, serve_plan, wait_for_plan

        # Every stage's study (and Optuna's tables) exists before a worker can see the
        # plan row: workers never race to create them.
        for stage in self.stages:
            mirror.ensure_study(self.store.url, self.spec.name, stage.name)
        plan = self._plan_row(data)
        self.reused_runs = plan_ops.evaluated_rungs(self.store, plan.id)
        state = PlanState(self.store, plan, self.spec, self.report, data=data, traces=traces)
        if self.record_only:
            return PlanResult(plan.id, self.store.url, time.perf_counter() - t0)
        if self.local:
            worker = PlanWorker(state, threads=self.threads, heartbeat_timeout=self.heartbeat_timeout,
                                changed=local.nudge, host_processes=local.layout.processes)
            started = utcnow()
            local.release()
            serve_plan(worker, self.poll_s, wait=local.wait_for_news)
            # every local process's work (a revived superseded run brings its evaluations, not new ones)
            self.trained_runs = plan_ops.evaluated_rungs(self.store, plan.id, since=started)
        else:
            self.report.say(f"coordinating only (--no-local): start workers with "
                            f"`rbridge worker --store {safe_url(self.store.url)}`")
            wait_for_plan(state, self.poll_s)
        ranking, per_trace = final_ranking(self.store, self.spec.name, plan.id, self.stages)
        return PlanResult(plan.id, self.store.url, time.perf_counter() - t0, ranking,
                          self.reused_runs, self.trained_runs, per_trace)


def final_ranking(store: Store, name: str, plan_id: int, stages) -> tuple[list[dict], dict]:
    """A plan's ranking view rows and, per (stage, metric), each candidate's per-trace values at its last
    rung (the paired tie rule): what the plan prints at its end, read from the store alone."""
    ranking = plan_ops.ranking(store, name)
    per_trace = {}
    for st in stages:
        last: dict[str, int] = {}
        found = stage_items(store.rows, plan_id, st.name, st.pruning.metric)
        for cand, rung in found:
            last[cand] = max(last.get(cand, 0), rung)
        per_trace[(st.name, st.pruning.metric)] = {(cand, bench): values
                                                   for (cand, rung), by in found.items() if rung == last[cand]
                                                   for bench, values in by.items()}
    return ranking, per_trace


def run_plan(spec: Spec, store: str | None = None, report: Reporter = SILENT, force: bool = False,
             threads: int | None = None, local: bool = True, poll_s: float = 2.0,
             heartbeat_timeout: float | None = None, workers: int | None = None,
             record_only: bool = False) -> PlanResult:
    """Run (or continue) the plan a spec declares; returns the final ranking.

    ``report``: where news and progress go (silent by default; the CLI prints with rich).
    ``threads``: CPU threads for torch; None picks per stage (``local.threads_for``; a stage keeps the count its first run recorded).
    ``local=False`` (``--no-local``): only coordinate; ``rbridge worker`` processes do the runs.
    ``workers``: local processes serving the plan, this one included (rbridge.planner.local); None: the
    whole machine (cores / threads per run, or GPUs x ``runs_per_gpu``).
    """
    return Planner(spec, store, report, force, threads, local, poll_s, heartbeat_timeout, workers,
                   record_only).run()
