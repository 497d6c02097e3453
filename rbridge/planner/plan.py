"""Running a plan: data, then every stage's proxies rung by rung, all recorded in the store.

The store is written before and after everything that costs compute, so a
crash loses at most the work since the last checkpoint, and running the same
plan again skips what is done. Seeds derive from the spec's seed, the stage and
the candidate's name, so a resumed plan equals an uninterrupted one.
"""

from __future__ import annotations

import difflib
import fcntl
import hashlib
import json
import os
import shutil
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from sqlmodel import delete, select

from rbridge._failpoints import failpoint
from rbridge.errors import InputError, StoreBusy
from rbridge.planner.schedule import decide, rung_tokens, survivors_at
from rbridge.spec import Spec, StageSpec, parse_spec
from rbridge.store import Candidate, Decision, Evaluation, Plan, Run, Store, open_store, store_url
from rbridge.store.models import utcnow

# Metrics where a higher value is better; every other stored metric is lower-is-better.
HIGHER_IS_BETTER = {"accuracy", "acc", "pass@1"}
SCORE_METRICS = ("rbridge", "nll", "rbridge_no_minmax", "bpb")


def derive_seed(*parts: Any) -> int:
    """A 31-bit seed from any parts (spec seed, stage, candidate name)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).hexdigest()
    return int(digest[:8], 16) & 0x7FFFFFFF


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


def runs_dir(store: Store, plan_name: str) -> Path:
    """Where checkpoints live: beside a SQLite store, else under ./stores (or $RBRIDGE_RUNS)."""
    if os.environ.get("RBRIDGE_RUNS"):
        return Path(os.environ["RBRIDGE_RUNS"]) / plan_name
    if store.url.startswith("sqlite:///"):
        db = Path(store.url[len("sqlite:///"):])
        return db.with_suffix(".runs")
    return Path("stores") / f"{plan_name}.runs"


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
                 force: bool = False, threads: int | None = None):
        self.spec = spec
        self.store_arg = store or default_store_path(spec)
        self.store: Store | None = None
        self.threads = threads
        self.console = console or _Quiet()
        self.force = force
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
        plan = self._plan_row(data)
        with self.store.session() as s:
            cands = {c.name: c for c in s.exec(select(Candidate).where(Candidate.plan_id == plan.id)).all()}
            # The lock proves whoever left these RUNNING is dead: take them over.
            stale = s.exec(select(Run).where(Run.plan_id == plan.id, Run.status == "running")).all()
        for run in stale:
            self.console.print(f"taking over run {run.stage}/{next(n for n, c in cands.items() if c.id == run.candidate_id)}"
                               f" left running by a process that died (resuming from its last checkpoint)")
        survivors = sorted(cands)
        for index, stage in enumerate(self.stages):
            survivors = self._run_stage(plan, index, stage, survivors, cands, data)
            self._record_compute(plan)
        with self.store.session() as s:
            row = s.get(Plan, plan.id)
            row.status = "done"
            row.updated_at = utcnow()
        ranking = final_ranking(self.store, self.spec.name)
        return PlanResult(plan.id, self.store.url, time.perf_counter() - t0, ranking,
                          self.reused_runs, self.trained_runs)

    def _record_compute(self, plan: Plan) -> None:
        """Store the plan's compute so far (spent, naive, reduction) on its row."""
        from rbridge.analysis.status import plan_status

        info = plan_status(self.store, plan.name)["compute"]
        with self.store.session() as s:
            row = s.get(Plan, plan.id)
            row.compute = json.dumps(info)
            row.updated_at = utcnow()

    def _study(self, stage: StageSpec) -> optuna.Study:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        return optuna.create_study(study_name=f"{self.spec.name}:{stage.name}", storage=self.store.url,
                                   direction="minimize", load_if_exists=True)

    def _run_stage(self, plan: Plan, index: int, stage: StageSpec, entrants: list[str],
                   cands: dict[str, Candidate], data) -> list[str]:
        from rbridge.planner.components import RunContext, cpu_threads

        rungs = rung_tokens(stage)
        self._drop_non_entrants(plan, stage, entrants, cands)
        study = self._study(stage)
        runs = {name: self._run_row(plan, index, stage, cands[name], study, data) for name in entrants}
        self._fail_orphan_trials(study, runs)
        active = sorted(entrants)
        first = next(iter(runs.values()))
        threads = cpu_threads(first.non_embedding_params, self.threads)
        self.console.print(f"[bold]stage {stage.name}[/]: {len(active)} candidates, proxy "
                           f"{_fmt_params(first.params)} params ({_fmt_params(first.non_embedding_params)} "
                           f"non-embedding), {stage.tokens:,} tokens each, {len(rungs)} rungs, "
                           f"{threads} CPU thread{'s' if threads > 1 else ''}")
        for rung, tokens in enumerate(rungs, start=1):
            todo = [n for n in active if not self._has_eval(runs[n], rung)]
            if len(todo) < len(active):
                self.console.print(f"  rung {rung}: {len(active) - len(todo)} of {len(active)} runs already "
                                   "trained and scored (reused)")
            self.reused_runs += len(active) - len(todo)
            self.trained_runs += len(todo)
            for name in todo:
                ctx = RunContext(self.spec, stage, index, cands[name], runs[name], data, self._load_traces(),
                                 runs_dir(self.store, self.spec.name) / stage.name / name,
                                 seed=derive_seed(self.spec.seed, stage.name, name),
                                 model_seed=derive_seed(self.spec.seed, stage.name))
                self._advance(ctx, rung, tokens)
            active = self._decide(plan, stage, rung, len(rungs), entrants, active, runs, cands, study)
        return active

    def _run_row(self, plan: Plan, index: int, stage: StageSpec, cand: Candidate, study: optuna.Study,
                 data) -> Run:
        from rbridge.planner.components import describe_proxy
        from rbridge.planner.reconcile import run_fingerprint

        with self.store.session() as s:
            run = s.exec(select(Run).where(Run.plan_id == plan.id, Run.stage == stage.name,
                                           Run.candidate_id == cand.id)).first()
            if run is not None and run.trial_number is not None:
                return run
            trial = study.ask()
            trial.set_user_attr("candidate", cand.name)
            if run is not None:  # kept by a --force reconcile; its stage's study was renewed
                run.trial_number = trial.number
                return run
            info = describe_proxy(stage, data)
            run = Run(plan_id=plan.id, stage=stage.name, stage_index=index, candidate_id=cand.id,
                      config=json.dumps(info["config"], sort_keys=True), params=info["params"],
                      non_embedding_params=info["non_embedding_params"], tokens_target=stage.tokens,
                      trial_number=trial.number,
                      fingerprint=run_fingerprint(self.spec, stage, json.loads(cand.mix), data))
            s.add(run)
            s.flush()
            failpoint("run-row")
            return run

    def _drop_non_entrants(self, plan: Plan, stage: StageSpec, entrants: list[str],
                           cands: dict[str, Candidate]) -> None:
        """Delete runs of this stage whose candidate no longer reaches it (after a --force change)."""
        ids = {cands[n].id for n in entrants}
        with self.store.session() as s:
            for run in s.exec(select(Run).where(Run.plan_id == plan.id, Run.stage == stage.name)).all():
                if run.candidate_id not in ids:
                    s.exec(delete(Evaluation).where(Evaluation.run_id == run.id))
                    if run.checkpoint:
                        shutil.rmtree(run.checkpoint, ignore_errors=True)
                    s.delete(run)

    @staticmethod
    def _fail_orphan_trials(study: optuna.Study, runs: dict[str, Run]) -> None:
        """Trials asked by a process that died before recording their run: mark them failed."""
        from optuna.trial import TrialState

        mine = {r.trial_number for r in runs.values()}
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if t.number not in mine:
                study.tell(t.number, state=TrialState.FAIL)

    def _has_eval(self, run: Run, rung: int) -> bool:
        with self.store.session() as s:
            return s.exec(select(Evaluation.id).where(Evaluation.run_id == run.id,
                                                      Evaluation.rung == rung)).first() is not None

    def _advance(self, ctx, rung: int, tokens: int) -> None:
        """Train one run to a rung, checkpoint it, score it, and record it in one transaction."""
        from rbridge.planner.components import score_run, train_run

        with self.store.session() as s:
            run = s.get(Run, ctx.run.id)
            run.status = "running"
            run.started_at = run.started_at or utcnow()
            run.checkpoint = str(ctx.checkpoint_dir)
        trained = train_run(ctx, tokens, self.console)
        failpoint("after-checkpoint")
        scores, score_flops = score_run(ctx, trained.model, self.console)
        failpoint("after-score")
        with self.store.session() as s:
            run = s.get(Run, ctx.run.id)
            for bench, values in scores.items():
                for metric, value in values.items():
                    s.add(Evaluation(run_id=run.id, rung=rung, tokens_seen=trained.tokens_seen,
                                     benchmark=bench, metric=metric, value=float(value),
                                     higher_is_better=metric in HIGHER_IS_BETTER))
            run.tokens_seen = trained.tokens_seen
            run.wall_s = trained.wall_s
            run.tokens_per_s = trained.tokens_per_s
            run.train_flops = trained.train_flops
            run.score_flops = (run.score_flops or 0.0) + score_flops
            if run.tokens_seen >= run.tokens_target:
                run.status = "done"
                run.finished_at = utcnow()
            s.flush()
            failpoint("eval-write")  # dies mid-transaction: nothing of it lands
        short = ", ".join(f"{b} {v[ctx.stage.metric]:.4f}" for b, v in scores.items())
        self.console.print(f"  {ctx.stage.name}/{ctx.candidate.name} rung {rung}: {ctx.stage.metric} {short} "
                           f"({trained.tokens_seen:,} tokens, {trained.tokens_per_s:,.0f} tok/s)")

    def _stage_score(self, run: Run, rung: int, metric: str) -> float:
        """The decision score of a run at a rung: the stage metric, averaged over benchmarks."""
        with self.store.session() as s:
            values = s.exec(select(Evaluation.value).where(Evaluation.run_id == run.id, Evaluation.rung == rung,
                                                           Evaluation.metric == metric)).all()
        return sum(values) / len(values)

    def _decide(self, plan: Plan, stage: StageSpec, rung: int, n_rungs: int, entrants: list[str],
                active: list[str], runs: dict[str, Run], cands: dict[str, Candidate],
                study: optuna.Study) -> list[str]:
        with self.store.session() as s:
            done = s.exec(select(Decision).where(Decision.plan_id == plan.id, Decision.stage == stage.name,
                                                 Decision.rung == rung)).all()
        if done:  # decided before a restart: replay it
            by_id = {c.id: n for n, c in cands.items()}
            return sorted(by_id[d.candidate_id] for d in done if d.kept)
        scores = {n: self._stage_score(runs[n], rung, stage.metric) for n in active}
        n_keep = survivors_at(rung, n_rungs, len(entrants), stage.keep, stage.reduction_factor,
                              list(scores.values()))
        n_keep = min(n_keep, len(active))
        decisions = decide(scores, n_keep, rung, stage.metric)
        tokens = rung_tokens(stage)[rung - 1]
        self._tell_study(study, runs, decisions, rung, tokens, final=rung == n_rungs)
        failpoint("after-tell")
        with self.store.session() as s:
            for d in decisions:
                s.add(Decision(plan_id=plan.id, stage=stage.name, rung=rung, candidate_id=cands[d.candidate].id,
                               kept=d.kept, score=d.score, rank=d.rank, why=d.why))
                if not d.kept:
                    run = s.get(Run, runs[d.candidate].id)
                    run.status = "pruned"
                    run.finished_at = utcnow()
            s.flush()
            failpoint("decision-write")
        dropped = [d.candidate for d in decisions if not d.kept]
        if dropped:
            self.console.print(f"  rung {rung} decision: keep {n_keep}/{len(active)}; dropped {', '.join(dropped)}")
        return sorted(d.candidate for d in decisions if d.kept)

    def _tell_study(self, study: optuna.Study, runs: dict[str, Run], decisions, rung: int, tokens: int,
                    final: bool) -> None:
        """Mirror the rung in the stage's Optuna study: intermediate values, pruned and completed trials."""
        from optuna.trial import TrialState

        trials = {t.number: t for t in study.get_trials(deepcopy=False)}
        for d in decisions:
            number = runs[d.candidate].trial_number
            frozen = trials.get(number)
            if frozen is None or frozen.state != TrialState.RUNNING:
                continue
            trial = optuna.trial.Trial(study, frozen._trial_id)
            if tokens not in frozen.intermediate_values:
                trial.report(d.score, step=tokens)
            if not d.kept:
                study.tell(number, state=TrialState.PRUNED)
            elif final:
                study.tell(number, d.score)


def _fmt_params(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


def final_ranking(store: Store, plan_name: str) -> list[dict]:
    """The ranking view's rows for the plan's decision metric, stage by stage."""
    return store.query(
        "SELECT stage, candidate, benchmark, metric, value, rank, tokens_seen, status FROM ranking "
        "WHERE plan = :plan ORDER BY stage_index, benchmark, metric, rank, candidate", plan=plan_name)


def run_plan(spec: Spec, store: str | None = None, console: Console | None = None, force: bool = False,
             threads: int | None = None) -> PlanResult:
    """Run (or continue) the plan a spec declares; returns the final ranking.

    ``threads``: CPU threads for torch; None picks per stage (see ``cpu_threads``).
    """
    return Planner(spec, store, console, force, threads).run()


def make_progress(console: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed:,}/{task.total:,}"),
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console,
                    transient=True)

