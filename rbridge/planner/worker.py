"""Workers: any number of processes, on any number of machines, doing one plan's runs.

The store is the only coordinator. A plan advances in units of (run, rung): train
one candidate's proxy to the rung's token count, checkpoint, score, record. Every
process that serves a plan (``rbridge plan``'s own worker, ``rbridge worker``)
repeats the same loop:

1. ``PlanState.sync`` reads the store and walks the stages in order. Rungs whose
   every active run is evaluated get their decision; a stage whose last rung is
   decided opens the next stage (creates its runs); the first rung with
   unevaluated runs is where the work is.
2. ``claim``: compare-and-set on the run row. ``UPDATE runs SET status='running',
   lease=lease+1, worker=me ... WHERE id=? AND lease=? AND beats=? AND status=?``
   succeeds for exactly one process (the row lock in PostgreSQL, the database
   write lock in SQLite), and only if nobody claimed, heartbeat or recorded the
   run since this process read it.
3. While it trains, a heartbeat thread bumps ``beats``. Another worker takes the
   run over when its beats stop for ``heartbeat_timeout`` seconds (measured on the
   observer's own monotonic clock, so machines need no synchronised clocks), or at
   once when the holder ran on the same machine and its pid is gone. The new
   holder resumes from the run's last checkpoint.
4. ``record``: in one transaction, the same compare-and-set on (lease, worker)
   first, then the evaluations. A worker whose claim was taken over writes nothing.
5. Decisions are made once: the unique index on decisions (plan, stage, rung,
   candidate) lets the first decider's transaction land and rolls back any other.
   Decisions depend only on the stored scores, so whoever makes them makes the
   same ones; Optuna is told with ``skip_if_finished``, so a second tell is a no-op.

This is the pattern of job queues built on a relational database (a row claimed by
a conditional UPDATE, a lease kept alive by heartbeats); a separate broker would
add a service to run and a second source of truth.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from sqlalchemy import update
from sqlalchemy.exc import IntegrityError
from sqlmodel import delete, select

from rbridge._failpoints import failpoint
from rbridge.errors import InputError
from rbridge.planner.schedule import decide, rung_tokens, survivors_at
from rbridge.spec import Spec, StageSpec, parse_spec
from rbridge.store import Candidate, Decision, Evaluation, Plan, Run, Store, open_store
from rbridge.store.db import safe_url
from rbridge.store.models import utcnow

# Metrics where a higher value is better; every other stored metric is lower-is-better.
HIGHER_IS_BETTER = {"accuracy", "acc", "pass@1"}
DEFAULT_HEARTBEAT_TIMEOUT_S = 60.0


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8]
    except OSError:
        return "noboot"


def _host() -> str:
    """This machine's name in worker ids: $RBRIDGE_WORKER_HOST (e.g. a node name), else the hostname."""
    return os.environ.get("RBRIDGE_WORKER_HOST") or socket.gethostname()


def worker_id() -> str:
    """host:pid:boot - enough to tell, on the same machine, whether the holder still lives."""
    return f"{_host()}:{os.getpid()}:{_boot_id()}"


def holder_is_dead_here(worker: str) -> bool:
    """True when ``worker`` ran on this machine (same host and boot) and its process is gone."""
    host, _, rest = worker.partition(":")
    pid, _, boot = rest.partition(":")
    if host != _host() or boot != _boot_id() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


class ClaimLost(Exception):
    """Another worker took this run over (our heartbeats stopped reaching the store)."""


def derive_seed(*parts: Any) -> int:
    """A 31-bit seed from any parts (spec seed, stage, candidate name)."""
    import hashlib

    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).hexdigest()
    return int(digest[:8], 16) & 0x7FFFFFFF


def runs_dir(store: Store, plan_name: str) -> Path:
    """Where checkpoints live: beside a SQLite store, else under ./stores (or $RBRIDGE_RUNS).

    Workers on several machines need this folder on a shared filesystem (set
    $RBRIDGE_RUNS to its mount point) so that a run taken over resumes from its
    checkpoint; without it the new holder starts the run from scratch.
    """
    if os.environ.get("RBRIDGE_RUNS"):
        return Path(os.environ["RBRIDGE_RUNS"]) / plan_name
    if store.url.startswith("sqlite:///"):
        db = Path(store.url[len("sqlite:///"):])
        return db.with_suffix(".runs")
    return Path("stores") / f"{plan_name}.runs"


@dataclass
class Task:
    """Train ``run`` to rung ``rung`` (``tokens`` tokens) of stage ``stage``."""

    stage: StageSpec
    stage_index: int
    rung: int
    tokens: int
    run: Run
    candidate: Candidate
    n_entrants: int


@dataclass
class SyncResult:
    done: bool
    tasks: list[Task] = field(default_factory=list)  # runs without an evaluation at the current rung
    stage: StageSpec | None = None
    rung: int = 0
    n_done: int = 0  # runs of the current rung already evaluated


class Claim:
    """A run held by this worker, kept alive by a heartbeat thread until released."""

    def __init__(self, store: Store, run_id: int, lease: int, worker: str, every_s: float):
        self.store, self.run_id, self.lease, self.worker = store, run_id, lease, worker
        self.every_s = every_s
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-run-{run_id}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                with self.store.session() as s:
                    res = s.execute(update(Run).where(self._mine()).values(beats=Run.beats + 1,
                                                                          heartbeat_at=utcnow()))
                if res.rowcount != 1:
                    self.lost.set()
                    return
            except Exception:  # noqa: BLE001 - a missed beat is retried; the lease decides
                continue

    def _mine(self):
        return (Run.id == self.run_id) & (Run.lease == self.lease) & (Run.worker == self.worker) & \
            (Run.status == "running")

    def check(self) -> None:
        if self.lost.is_set():
            raise ClaimLost(f"run {self.run_id} was taken over by another worker")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def release(self) -> None:
        """Give the run back (after a failure): pending again, for any worker."""
        self.stop()
        try:
            with self.store.session() as s:
                s.execute(update(Run).where(self._mine()).values(status="pending", worker=""))
        except Exception:  # noqa: BLE001 - the lease times out anyway
            pass


class PlanState:
    """One plan as a worker sees it: its spec, data and traces, and its rows in the store."""

    def __init__(self, store: Store, plan: Plan, spec: Spec, console, data=None, traces=None,
                 threads: int | None = None, heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT_S,
                 stages: list[str] | None = None, ranks: "Ranks | None" = None):
        self.store = store
        self.ranks = ranks
        self.plan_id = plan.id
        self.name = plan.name
        self.spec_hash = plan.spec_hash
        self.spec = spec
        self.console = console
        self.stages = spec.resolved_stages()
        self.threads = threads
        self.heartbeat_timeout = heartbeat_timeout
        self.only_stages = set(stages) if stages else None
        self._data = data
        self._traces = traces
        self._seen: dict[int, tuple[int, int, str, float]] = {}  # run id -> (lease, beats, status, since)
        self._announced: set[tuple[str, int]] = set()
        self.me = worker_id()
        self.trained = 0  # (run, rung) steps this process trained and recorded

    # ------------------------------------------------------------------ inputs
    @classmethod
    def from_store(cls, store: Store, plan: Plan, console, **kw) -> "PlanState":
        """A worker's view: the spec as stored; its paths resolve where the plan was written."""
        spec = parse_spec(plan.spec_text, Path(plan.spec_path or "spec.yaml"))
        return cls(store, plan, spec, console, **kw)

    @property
    def missing_stages(self) -> list[str]:
        """Stages named by ``--stage`` that this plan does not have (a typo, or another plan's)."""
        return sorted((self.only_stages or set()) - {st.name for st in self.stages})

    @property
    def data(self):
        from rbridge.planner.components import prepare_data
        if self._data is None:
            self._data = prepare_data(self.spec, self.console)
        return self._data

    @property
    def traces(self):
        from rbridge.scoring.traces import load_traces
        if self._traces is None:
            self._traces = {b.name: load_traces(b.traces) for b in self.spec.benchmarks}
        return self._traces

    def study(self, stage: StageSpec) -> optuna.Study:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        return optuna.create_study(study_name=f"{self.name}:{stage.name}", storage=self.store.url,
                                   direction="minimize", load_if_exists=True)

    # ------------------------------------------------------------------ sync
    def sync(self) -> SyncResult:
        """Make every decision the store's evaluations allow; return where the work is."""
        with self.store.session() as s:
            cands = {c.name: c for c in s.exec(select(Candidate).where(Candidate.plan_id == self.plan_id)).all()}
        entrants = sorted(cands)
        for index, stage in enumerate(self.stages):
            runs = self._open_stage(index, stage, entrants, cands)
            by_id = {c.id: n for n, c in cands.items()}
            rungs = rung_tokens(stage)
            active = entrants
            for rung, tokens in enumerate(rungs, start=1):
                with self.store.session() as s:
                    evaluated = set(s.exec(select(Evaluation.run_id).where(
                        Evaluation.run_id.in_([r.id for r in runs.values()]), Evaluation.rung == rung)).all())
                    made = s.exec(select(Decision).where(Decision.plan_id == self.plan_id,
                                                         Decision.stage == stage.name,
                                                         Decision.rung == rung)).all()
                lacking = [n for n in active if runs[n].id not in evaluated]
                if lacking:
                    tasks = [Task(stage, index, rung, tokens, runs[n], cands[n], len(entrants)) for n in lacking]
                    return SyncResult(False, tasks, stage, rung, len(active) - len(lacking))
                if made:
                    active = sorted(by_id[d.candidate_id] for d in made if d.kept)
                else:
                    active = self._decide(stage, rung, len(rungs), entrants, active, runs, cands)
            entrants = active
        with self.store.session() as s:
            row = s.get(Plan, self.plan_id)
            finished = row.status == "done"
        if not finished:
            self._record_compute()
            with self.store.session() as s:
                s.execute(update(Plan).where(Plan.id == self.plan_id, Plan.status != "done")
                          .values(status="done", updated_at=utcnow()))
        return SyncResult(True)

    def _open_stage(self, index: int, stage: StageSpec, entrants: list[str],
                    cands: dict[str, Candidate]) -> dict[str, Run]:
        """The stage's runs for exactly these entrants: created once (unique index), extras dropped."""
        from rbridge.planner.components import describe_proxy
        from rbridge.planner.reconcile import run_fingerprint

        with self.store.session() as s:
            runs = {r.candidate_id: r for r in s.exec(select(Run).where(Run.plan_id == self.plan_id,
                                                                        Run.stage == stage.name)).all()}
        wanted = {cands[n].id for n in entrants}
        extra = [r for cid, r in runs.items() if cid not in wanted]
        if extra:  # survivors changed after a --force: these candidates no longer reach the stage
            with self.store.session() as s:
                for run in extra:
                    s.exec(delete(Evaluation).where(Evaluation.run_id == run.id))
                    s.exec(delete(Run).where(Run.id == run.id))
            for run in extra:
                if run.checkpoint:
                    shutil.rmtree(run.checkpoint, ignore_errors=True)
        missing = [n for n in entrants if cands[n].id not in runs]
        if missing:
            info = describe_proxy(stage, self.data, index)
            try:
                with self.store.session() as s:
                    for n in missing:
                        s.add(Run(plan_id=self.plan_id, stage=stage.name, stage_index=index,
                                  candidate_id=cands[n].id, config=json.dumps(info["config"], sort_keys=True),
                                  params=info["params"], non_embedding_params=info["non_embedding_params"],
                                  tokens_target=stage.tokens,
                                  fingerprint=run_fingerprint(self.spec, stage, json.loads(cands[n].mix),
                                                              self.data)))
            except IntegrityError:
                pass  # another worker opened the stage first: theirs are the same rows
            with self.store.session() as s:
                runs = {r.candidate_id: r for r in s.exec(select(Run).where(Run.plan_id == self.plan_id,
                                                                            Run.stage == stage.name)).all()}
        return {n: runs[cands[n].id] for n in entrants}

    # ------------------------------------------------------------------ decisions
    def _stage_score(self, run: Run, rung: int, metric: str) -> float:
        """The decision score of a run at a rung: the stage metric, averaged over benchmarks."""
        with self.store.session() as s:
            values = s.exec(select(Evaluation.value).where(Evaluation.run_id == run.id, Evaluation.rung == rung,
                                                           Evaluation.metric == metric)).all()
        return sum(values) / len(values)

    def _decide(self, stage: StageSpec, rung: int, n_rungs: int, entrants: list[str], active: list[str],
                runs: dict[str, Run], cands: dict[str, Candidate]) -> list[str]:
        scores = {n: self._stage_score(runs[n], rung, stage.metric) for n in active}
        n_keep = min(survivors_at(rung, n_rungs, len(entrants), stage.keep, stage.reduction_factor,
                                  list(scores.values())), len(active))
        decisions = decide(scores, n_keep, rung, stage.metric)
        final = rung == n_rungs
        study = self.study(stage)
        self._tell_study(study, runs, decisions, rung_tokens(stage)[rung - 1], final)
        failpoint("after-tell")
        try:
            with self.store.session() as s:
                for d in decisions:
                    s.add(Decision(plan_id=self.plan_id, stage=stage.name, rung=rung,
                                   candidate_id=cands[d.candidate].id, kept=d.kept, score=d.score, rank=d.rank,
                                   why=d.why))
                    if not d.kept:
                        s.execute(update(Run).where(Run.id == runs[d.candidate].id)
                                  .values(status="pruned", finished_at=utcnow()))
                s.flush()
                failpoint("decision-write")
        except IntegrityError:  # another worker decided this rung first; the same decision
            with self.store.session() as s:
                made = s.exec(select(Decision).where(Decision.plan_id == self.plan_id, Decision.stage == stage.name,
                                                     Decision.rung == rung)).all()
            by_id = {c.id: n for n, c in cands.items()}
            return sorted(by_id[d.candidate_id] for d in made if d.kept)
        dropped = [d.candidate for d in decisions if not d.kept]
        if dropped:
            self.console.print(f"  {stage.name} rung {rung} decision: keep {n_keep}/{len(active)}; "
                               f"dropped {', '.join(dropped)}")
        if final:
            self._fail_orphan_trials(study, runs)
            self._record_compute()
        return sorted(d.candidate for d in decisions if d.kept)

    @staticmethod
    def _tell_study(study: optuna.Study, runs: dict[str, Run], decisions, rung_tokens_: int, final: bool) -> None:
        """Mirror the rung in the stage's Optuna study: intermediate values, pruned and completed trials.

        Idempotent, so a decider that died after telling, or a second decider, changes nothing.
        """
        from optuna.trial import TrialState

        trials = {t.number: t for t in study.get_trials(deepcopy=False)}
        for d in decisions:
            frozen = trials.get(runs[d.candidate].trial_number)
            if frozen is None or frozen.state != TrialState.RUNNING:
                continue
            trial = optuna.trial.Trial(study, frozen._trial_id)
            try:
                if rung_tokens_ not in frozen.intermediate_values:
                    trial.report(d.score, step=rung_tokens_)
                if not d.kept:
                    study.tell(frozen.number, state=TrialState.PRUNED, skip_if_finished=True)
                elif final:
                    study.tell(frozen.number, d.score, skip_if_finished=True)
            except (RuntimeError, ValueError):  # finished by another decider meanwhile
                continue

    @staticmethod
    def _fail_orphan_trials(study: optuna.Study, runs: dict[str, Run]) -> None:
        """Trials asked by a worker that died before recording them on its run: mark them failed.

        Called when a stage's last rung is decided: every run of the stage was claimed
        (and got its trial) by then, so a RUNNING trial no run names is an orphan.
        """
        from optuna.trial import TrialState

        with_runs = {r.trial_number for r in runs.values()}
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if t.number not in with_runs:
                study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)

    def _record_compute(self) -> None:
        """Store the plan's compute so far (spent, naive, reduction) on its row."""
        from rbridge.analysis.status import plan_status

        info = plan_status(self.store, self.name)["compute"]
        with self.store.session() as s:
            row = s.get(Plan, self.plan_id)
            row.compute = json.dumps(info)
            row.updated_at = utcnow()

    # ------------------------------------------------------------------ claims
    def claimable(self, task: Task) -> bool:
        """Whether this worker may claim the task's run now (pending, or its holder is gone)."""
        run = task.run
        if self.only_stages is not None and task.stage.name not in self.only_stages:
            return False
        if run.status == "pending":
            return True
        if run.status != "running":
            return False
        if not run.worker or holder_is_dead_here(run.worker):
            return True
        # Stale when its (lease, beats) have not moved for the timeout, on our own clock.
        now = time.monotonic()
        key = (run.lease, run.beats, run.status)
        seen = self._seen.get(run.id)
        if seen is None or seen[:3] != key:
            self._seen[run.id] = (*key, now)
            return False
        return now - seen[3] >= max(self.heartbeat_timeout, 3 * (run.beat_every_s or 0))

    def claim(self, task: Task) -> Claim | None:
        run = task.run
        every = max(0.2, min(10.0, self.heartbeat_timeout / 4))
        ckpt = str(runs_dir(self.store, self.name) / task.stage.name / task.candidate.name)
        with self.store.session() as s:
            res = s.execute(
                update(Run).where(Run.id == run.id, Run.lease == run.lease, Run.beats == run.beats,
                                  Run.status == run.status)
                .values(status="running", worker=self.me, lease=run.lease + 1, beats=0, beat_every_s=every,
                        heartbeat_at=utcnow(), started_at=run.started_at or utcnow(), checkpoint=ckpt))
        if res.rowcount != 1:
            return None
        claim = Claim(self.store, run.id, run.lease + 1, self.me, every)
        with self.store.session() as s:  # belt and braces: the rung was recorded just before our read
            done = s.exec(select(Evaluation.id).where(Evaluation.run_id == run.id,
                                                      Evaluation.rung == task.rung)).first()
        if done is not None:
            claim.release()
            return None
        if run.status == "running":
            self.console.print(f"  taking over run {task.stage.name}/{task.candidate.name} left running by "
                               f"{run.worker or 'a process'} that died (resuming from its last checkpoint)")
        if run.trial_number is None:
            self._ask_trial(task, claim)
        return claim

    def _ask_trial(self, task: Task, claim: Claim) -> None:
        """The run's Optuna trial, asked by its first holder."""
        from optuna.trial import TrialState

        study = self.study(task.stage)
        trial = study.ask()
        trial.set_user_attr("candidate", task.candidate.name)
        with self.store.session() as s:
            res = s.execute(update(Run).where(Run.id == task.run.id, Run.lease == claim.lease,
                                              Run.trial_number.is_(None)).values(trial_number=trial.number))
            failpoint("run-row")  # asked, not yet recorded on the run
        if res.rowcount != 1:
            study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
        else:
            task.run.trial_number = trial.number

    # ------------------------------------------------------------------ work
    def announce(self, task: Task, sync: SyncResult) -> None:
        """One header per stage and rung this process works on."""
        from rbridge.planner.components import cpu_threads

        stage = task.stage
        if (stage.name, 0) not in self._announced:
            self._announced.add((stage.name, 0))
            threads = cpu_threads(task.run.non_embedding_params, self.threads)
            self.console.print(f"[bold]stage {stage.name}[/]: {task.n_entrants} candidates, proxy "
                               f"{_fmt_params(task.run.params)} params ({_fmt_params(task.run.non_embedding_params)}"
                               f" non-embedding), {stage.tokens:,} tokens each, {stage.evals} rungs, "
                               f"{threads} CPU thread{'s' if threads > 1 else ''}")
        if (stage.name, task.rung) not in self._announced:
            self._announced.add((stage.name, task.rung))
            if sync.n_done:
                self.console.print(f"  rung {task.rung}: {sync.n_done} of {sync.n_done + len(sync.tasks)} runs "
                                   "already trained and scored")

    def advance(self, task: Task, claim: Claim) -> bool:
        """Train the claimed run to the rung, checkpoint, score, record; False if the claim was lost."""
        from rbridge.planner.components import RunContext, score_run, train_run

        ctx = RunContext(self.spec, task.stage, task.stage_index, task.candidate, task.run, self.data, self.traces,
                         runs_dir(self.store, self.name) / task.stage.name / task.candidate.name,
                         seed=derive_seed(self.spec.seed, task.stage.name, task.candidate.name),
                         model_seed=derive_seed(self.spec.seed, task.stage.name))
        try:
            distributed = self.ranks is not None and self.ranks.world > 1
            if distributed:  # every rank trains this run with us
                self.ranks.send(self._message(task, ctx))
            # A lost claim stops training at once in one process; with several ranks it is
            # noticed when recording (stopping one rank alone would hang the others).
            trained = train_run(ctx, task.tokens, self.console, check=None if distributed else claim.check)
            failpoint("after-checkpoint")
            scores, score_flops = score_run(ctx, trained.model, self.console)
            failpoint("after-score")
            claim.stop()
            with self.store.session() as s:
                done = trained.tokens_seen >= task.run.tokens_target
                res = s.execute(
                    update(Run).where(Run.id == task.run.id, Run.lease == claim.lease, Run.worker == self.me,
                                      Run.status == "running")
                    .values(status="done" if done else "pending", worker="", tokens_seen=trained.tokens_seen,
                            wall_s=trained.wall_s, tokens_per_s=trained.tokens_per_s,
                            train_flops=trained.train_flops, score_flops=Run.score_flops + score_flops,
                            finished_at=utcnow() if done else None))
                if res.rowcount != 1:
                    raise ClaimLost(f"run {task.run.id} was taken over by another worker")
                for bench, values in scores.items():
                    for metric, value in values.items():
                        s.add(Evaluation(run_id=task.run.id, rung=task.rung, tokens_seen=trained.tokens_seen,
                                         benchmark=bench, metric=metric, value=float(value),
                                         higher_is_better=metric in HIGHER_IS_BETTER))
                s.flush()
                failpoint("eval-write")  # dies mid-transaction: nothing of it lands
        except ClaimLost as exc:
            claim.stop()
            self.console.print(f"  {task.stage.name}/{task.candidate.name}: {exc}; its result is discarded")
            return False
        except BaseException:
            claim.release()
            raise
        self.trained += 1
        short = ", ".join(f"{b} {v[task.stage.metric]:.4f}" for b, v in scores.items())
        self.console.print(f"  {task.stage.name}/{task.candidate.name} rung {task.rung}: {task.stage.metric} {short} "
                           f"({trained.tokens_seen:,} tokens, {trained.tokens_per_s:,.0f} tok/s)")
        return True

    def _message(self, task: Task, ctx) -> dict:
        return {"spec_hash": self.spec_hash, "spec_text": self.spec.text,
                "spec_path": str(self.spec.path.resolve()) if self.spec.path else "",
                "stage_index": task.stage_index, "candidate": task.candidate.name, "mix": task.candidate.mix,
                "non_embedding_params": task.run.non_embedding_params, "tokens": task.tokens,
                "checkpoint": str(ctx.checkpoint_dir.resolve()), "seed": ctx.seed, "model_seed": ctx.model_seed}

    def step(self) -> str:
        """Do one unit of work if there is one: 'worked', 'waiting' (others hold the work) or 'done'."""
        sync = self.sync()
        if sync.done:
            return "done"
        for task in sorted(sync.tasks, key=lambda t: t.candidate.name):
            if not self.claimable(task):
                continue
            claim = self.claim(task)
            if claim is None:
                continue
            self.announce(task, sync)
            self.advance(task, claim)
            return "worked"
        return "waiting"


def _fmt_params(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


class Ranks:
    """The processes of one worker started by ``accelerate launch`` (or torchrun).

    Rank 0 alone talks to the store: it claims a run, sends the run to the other
    ranks, and all of them train it together (ProxyTrainer shards every global
    batch by rank; DDP averages the gradients); rank 0 then scores and records it.
    While rank 0 waits for work it sends "wait" every poll, so the other ranks'
    collective calls never reach their timeout.
    """

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        self.rank = 0
        if self.world > 1:
            from accelerate import PartialState
            from accelerate.utils import parse_flag_from_env

            # Joins the process group (NCCL on GPUs; gloo on CPUs, where PartialState, unlike
            # the Accelerator, does not read ACCELERATE_USE_CPU itself).
            state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
            if state.num_processes != self.world:
                raise InputError(f"this is one of {self.world} launched processes but Accelerate did not start "
                                 "distributed training; on a machine without GPUs set ACCELERATE_USE_CPU=1 for "
                                 "accelerate launch --multi_gpu", field="WORLD_SIZE")
            self.rank = state.process_index

    @property
    def main(self) -> bool:
        return self.rank == 0

    def send(self, message) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.broadcast_object_list([message], src=0)

    def receive(self):
        import torch.distributed as dist

        box = [None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        """Leave together: free what still holds the process group, meet, destroy the group on
        every rank (a gloo group torn down at interpreter exit after the other rank left can hang)."""
        if self.world <= 1:
            return
        import gc

        import torch.distributed as dist

        if dist.is_initialized():
            gc.collect()
            dist.barrier()
            dist.destroy_process_group()


def follow(ranks: Ranks, threads: int | None = None) -> int:
    """Ranks > 0: train whatever rank 0 sends until it sends None; returns rungs trained."""
    from rbridge.planner.components import RunContext, cpu_threads, prepare_data, train_run

    quiet = _QuietConsole()
    specs: dict[str, tuple[Spec, Any]] = {}
    n = 0
    while True:
        message = ranks.receive()
        if message is None:
            return n
        if message == "wait":
            continue
        key = message["spec_hash"]
        if key not in specs:
            spec = parse_spec(message["spec_text"], Path(message["spec_path"] or "spec.yaml"))
            specs[key] = (spec, prepare_data(spec, quiet))
        spec, data = specs[key]
        stage = spec.resolved_stages()[message["stage_index"]]
        cpu_threads(message["non_embedding_params"], threads)
        cand = Candidate(name=message["candidate"], mix=message["mix"], plan_id=0)
        ctx = RunContext(spec, stage, message["stage_index"], cand, None, data, {}, Path(message["checkpoint"]),
                         seed=message["seed"], model_seed=message["model_seed"])
        train_run(ctx, message["tokens"], quiet)
        n += 1


class _QuietConsole:
    def print(self, *a, **k):
        pass


class Worker:
    """``rbridge worker``: serve every unfinished plan in a store (or one, with ``plan``)."""

    def __init__(self, store: str, console, plan: str | None = None, until_idle: bool = False,
                 poll_s: float = 2.0, threads: int | None = None,
                 heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT_S, stages: list[str] | None = None):
        self.store = open_store(store)
        self.console = console
        self.plan = plan
        self.until_idle = until_idle
        self.poll_s = poll_s
        self.ranks = Ranks()
        self.kw = dict(threads=threads, heartbeat_timeout=heartbeat_timeout, stages=stages, ranks=self.ranks)
        self.states: dict[str, PlanState] = {}
        self.trained = 0

    def _plans(self) -> list[Plan]:
        with self.store.session() as s:
            q = select(Plan).where(Plan.spec_hash != "")  # rows made by `targets import` alone have no spec
            if self.plan:
                q = q.where(Plan.name == self.plan)
            return list(s.exec(q.order_by(Plan.id)).all())

    def _state(self, plan: Plan) -> PlanState:
        state = self.states.get(plan.name)
        if state is None or state.spec_hash != plan.spec_hash:  # new, or changed with --force
            state = PlanState.from_store(self.store, plan, self.console, **self.kw)
            self.states[plan.name] = state
            self.console.print(f"serving plan {plan.name} as {state.me}")
            if state.missing_stages:
                self.console.print(f"  plan {plan.name} has no stage {', '.join(state.missing_stages)} "
                                   f"(its stages: {', '.join(st.name for st in state.stages)})")
        return state

    def run(self) -> int:
        """Work until stopped (or, with until_idle, until no unfinished plan is left); returns rungs done."""
        if not self.ranks.main:
            self.store.close()
            n = follow(self.ranks, self.kw["threads"])
            self.ranks.close()
            return n
        told = False
        try:
            while True:
                plans = self._plans()
                if not plans and not told:
                    self.console.print("waiting for a plan: start one with `rbridge plan SPEC.yaml --store "
                                       f"{safe_url(self.store.url)}`")
                    told = True
                unfinished = [p for p in plans if p.status != "done"]
                worked = False
                for plan in unfinished:
                    state = self._state(plan)
                    if state.step() == "worked":
                        worked = True
                        break
                self.trained = sum(s.trained for s in self.states.values())
                if worked:
                    continue
                if self.until_idle and plans and not any(p.status != "done" for p in self._plans()):
                    return self.trained
                time.sleep(self.poll_s)
                self.ranks.send("wait")
        finally:
            try:
                self.ranks.send(None)  # the other ranks exit with us
                self.ranks.close()
            finally:
                self.store.close()


def serve_plan(state: PlanState, poll_s: float = 2.0) -> None:
    """Work on one plan until it is done (``rbridge plan``'s own worker)."""
    while True:
        what = state.step()
        if what == "done":
            return
        if what == "waiting":
            time.sleep(poll_s)


def wait_for_plan(state: PlanState, poll_s: float = 2.0) -> None:
    """``rbridge plan --no-local``: make decisions the workers leave, report progress, return when done."""
    last = None
    while True:
        sync = state.sync()
        if sync.done:
            return
        where = (sync.stage.name, sync.rung, sync.n_done)
        if where != last:
            running = sum(1 for t in sync.tasks if t.run.status == "running")
            state.console.print(f"  waiting for workers: stage {sync.stage.name} rung {sync.rung}: "
                                f"{sync.n_done}/{sync.n_done + len(sync.tasks)} runs done, {running} running")
            last = where
        time.sleep(poll_s)


def load_plan_row(store: Store, name: str) -> Plan:
    with store.session() as s:
        plan = s.exec(select(Plan).where(Plan.name == name)).first()
    if plan is None:
        raise InputError(f"no plan '{name}' in this store", file=store.url)
    return plan
