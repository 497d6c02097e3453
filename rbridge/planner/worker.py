"""Workers: any number of processes, on any number of machines, doing one plan's runs.

The store is the only coordinator. A plan advances in units of (run, rung): train
one candidate's proxy to the rung's token count, checkpoint, score, record. Every
process that serves a plan (``rbridge plan``'s own worker, ``rbridge worker``)
repeats the same loop (``PlanWorker.step``):

1. ``PlanState.sync`` (rbridge.planner.state) makes the decisions the stored
   scores allow and says which runs the current rung still lacks.
2. Claim one: a compare-and-set on the run row (rbridge.store.runs.claim) that
   succeeds for exactly one process, and only if nobody claimed, beat or recorded
   the run since this process read it. A run is claimable when pending, or when
   its holder is gone (rbridge.planner.claims).
3. Train it to the rung and score it (rbridge.planner.steps) while a heartbeat
   thread keeps the claim; under ``accelerate launch`` every rank trains with us
   (rbridge.planner.ranks).
4. Record: in one transaction, the same compare-and-set on (lease, worker) first,
   then the evaluations. A worker whose claim was taken over writes nothing.

This is the pattern of job queues built on a relational database (a row claimed by
a conditional UPDATE, a lease kept alive by heartbeats); a separate broker would
add a service to run and a second source of truth.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any, Callable

import torch

from rbridge._failpoints import failpoint
from rbridge.planner import mirror, stop
from rbridge.planner.claims import (DEFAULT_HEARTBEAT_TIMEOUT_S, Claim, ClaimLost, StaleWatch, beat_interval,
                                    worker_id)
from rbridge.planner.ranks import Ranks, follow, run_message
from rbridge.planner.state import PlanState, SyncResult, Task
from rbridge.planner.checkpoints import checkpoint_dir
from rbridge.planner.disk import reduce_to_model
from rbridge.planner.local import threads_for
from rbridge.planner.steps import RunContext, score_run, train_run
from rbridge.proxy.rates import Rates
from rbridge.reporting import SILENT, Reporter, si
from rbridge.store import open_store
from rbridge.store import plans as plan_ops
from rbridge.store import runs as run_ops
from rbridge.store.db import safe_url


def derive_seed(*parts: Any) -> int:
    """A 31-bit seed from any parts (spec seed, stage, candidate name)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).hexdigest()
    return int(digest[:8], 16) & 0x7FFFFFFF


class PlanWorker:
    """This process's work on one plan: claim a run the plan needs, advance it one rung, record it."""

    def __init__(self, state: PlanState, threads: int | None = None,
                 heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT_S, stages: list[str] | None = None,
                 ranks: Ranks | None = None, changed: Callable[[], None] | None = None,
                 host_processes: int | None = None):
        self.state = state
        self.host_processes = host_processes  # rbridge plan's own worker: its local processes (threads_for)
        # Called when this process sees the plan move (a rung done or decided, a run recorded): rbridge plan
        # wakes its waiting local processes with it (LocalWorkers.nudge) instead of their next poll.
        self.changed = changed
        self._seen: tuple | None = None
        self.store = state.store
        self.report = state.report
        self.threads = threads
        self.heartbeat_timeout = heartbeat_timeout
        self.only_stages = set(stages) if stages else None
        self.ranks = ranks
        self.watch = StaleWatch(heartbeat_timeout)
        self.me = worker_id()
        self.trained = 0  # (run, rung) steps this process trained and recorded
        self.claimed = 0  # runs this process claimed (a stop before any has nothing to give back)
        self._announced: set[tuple[str, int]] = set()
        self._told_threads: set[str] = set()  # stages whose threads (precision) this process has reported
        self._told_precision: set[str] = set()
        self._stage_compute: dict[str, tuple[int, str]] = {}  # stage -> (threads, precision) its first run fixed

    @property
    def missing_stages(self) -> list[str]:
        """Stages named by ``--stage`` that this plan does not have (a typo, or another plan's)."""
        return sorted((self.only_stages or set()) - {st.name for st in self.state.stages})

    # ------------------------------------------------------------------ claims
    def claimable(self, task: Task) -> bool:
        """Whether this worker may claim the task's run now (pending, or its holder is gone)."""
        if self.only_stages is not None and task.stage.name not in self.only_stages:
            return False
        return self.watch.claimable(task.run)

    def claim(self, task: Task) -> Claim | None:
        run = task.run
        every = beat_interval(self.heartbeat_timeout)
        ckpt = str(checkpoint_dir(self.store.url, self.state.name, task.stage.name, task.candidate.name))
        lease = run_ops.claim(self.store, run, self.me, every, ckpt)
        if lease is None:
            return None
        claim = Claim(self.store, run.id, lease, self.me, every)
        self.claimed += 1
        if run_ops.rung_recorded(self.store, run.id, task.rung):  # recorded just before our read
            claim.release()
            return None
        if run.status == "running":
            self.report.say(f"  taking over run {task.stage.name}/{task.candidate.name} left running by "
                            f"{run.worker or 'a process'} that died (resuming from its last checkpoint)")
        if run.trial_number is None:
            rev = self.state.study_revision(task.stage.name)
            number = mirror.ask(self.store.url, self.state.name, task.stage.name, task.candidate.name, rev,
                                weights=mirror.weights(task.candidate.mix, self.state.spec.sources))
            if run_ops.set_trial(self.store, run.id, lease, number):
                task.run.trial_number = number
            else:
                mirror.fail(self.store.url, self.state.name, task.stage.name, number, rev)
        return claim

    # ------------------------------------------------------------------ work
    def announce(self, task: Task, sync: SyncResult) -> None:
        """One header per stage and rung this process works on."""
        stage = task.stage
        if (stage.name, 0) not in self._announced:
            self._announced.add((stage.name, 0))
            threads = self.threads_of(task)
            preset = stage.proxy.root.get("preset")
            # named by non-embedding parameters (as `rbridge presets`); the (tied) embedding dominates small ones
            size = (f"preset {preset}: " if preset else "") + (
                f"{si(task.run.non_embedding_params)} non-embedding params "
                f"({si(task.run.params)} with the embedding)")
            self.report.say(f"[bold]stage {stage.name}[/]: {task.n_entrants} candidates, proxy {size}, "
                            f"{stage.training.tokens:,} tokens each, {stage.pruning.evals} rungs, "
                            f"{threads} CPU thread{'s' if threads > 1 else ''}")
        if (stage.name, task.rung) not in self._announced:
            self._announced.add((stage.name, task.rung))
            if sync.n_done:
                self.report.say(f"  rung {task.rung}: {sync.n_done} of {sync.n_done + len(sync.tasks)} runs "
                                "already trained and scored")

    def _fixed(self, task: Task) -> tuple[int, str]:
        """(threads, precision) the run's stage fixed with its first run ((0, "") before any started):
        read from the store until then, so a resumed stage, or one that a process with another
        --threads or on another kind of machine joins, computes identically."""
        name = task.stage.name
        if not self._stage_compute.get(name, (0, ""))[0]:
            self._stage_compute[name] = run_ops.stage_compute(self.store, self.state.plan_id, name)
        return self._stage_compute[name]

    def threads_of(self, task: Task) -> int:
        """CPU threads for a run: what it or its stage's first run recorded, else the rule of
        rbridge.planner.local.threads_for."""
        fixed = task.run.threads or self._fixed(task)[0]
        if fixed and self.threads and fixed != self.threads and task.stage.name not in self._told_threads:
            self._told_threads.add(task.stage.name)
            self.report.say(f"  stage {task.stage.name} trains with {fixed} CPU thread(s), as its first runs did "
                            f"(--threads {self.threads} applies to stages not yet started)")
        return fixed or threads_for(task.run.non_embedding_params, self.threads, self.host_processes)

    def precision_of(self, task: Task, threads: int) -> tuple[str, Rates | None]:
        """The precision a run trains in, and the measured rates that chose it (None where none did):
        what it or its stage's first run recorded, else the stage's ``precision`` as a trainer in
        this process resolves it for the stage's shape at ``threads`` (rbridge.proxy.train.planned_precision;
        ``auto`` measures fp32 against bf16, rbridge.proxy.precision)."""
        from rbridge.planner.steps import stage_config
        from rbridge.proxy.train import TrainShape, auto_rates, planned_precision

        fixed = task.run.precision or self._fixed(task)[1]
        stage = task.stage
        asked = stage.training.precision
        if fixed == run_ops.LEGACY_PRECISION:  # a stage started before runs recorded their precision
            return planned_precision(asked, legacy=True), None
        # fp16 (accelerate launch --mixed_precision fp16) is the launcher's to give, not a stage's to ask
        if fixed in ("fp32", "bf16"):
            return fixed, None
        from accelerate import Accelerator

        acc = Accelerator()
        launched = acc.mixed_precision != "no"  # accelerate launch --mixed_precision: the launcher decides
        if asked == "auto" and stage.role == "target" and not launched:
            # Targets stand for the large run the proxies must predict: never traded for speed. bf16 autocast
            # took the ladder's clean-80 target (specs/ladder.yaml) from 87.8% to 8.8% greedy accuracy.
            # (accelerate launch --mixed_precision still rules: it was asked for explicitly.)
            if stage.name not in self._told_precision:
                self._told_precision.add(stage.name)
                self.report.say(f"  stage {stage.name} trains in fp32 (precision auto on a target stage; "
                                "precision: bf16 asks for bf16)")
            return "fp32", None
        train = stage.training
        shape = TrainShape(stage_config(stage, self.state.data), train.micro_batch_size or train.batch_size,
                           train.seq_len, threads)
        precision = planned_precision(asked, shape=shape)
        rates = None
        if asked == "auto" and not launched:
            rates = auto_rates(acc.device, shape)  # the measurement planned_precision used (memoised)
            if rates is not None and stage.name not in self._told_precision:
                self._told_precision.add(stage.name)
                self.report.say(f"  stage {stage.name} trains in {precision}: {rates.describe()}")
        return precision, rates

    def advance(self, task: Task, claim: Claim) -> bool:
        """Train the claimed run to the rung, checkpoint, score, record; False if the claim was lost."""
        state, stage, name = self.state, task.stage, task.candidate.name
        seeded = (stage.seed,) if stage.seed else ()  # seed 0 derives as before seeds existed
        n_params = task.run.non_embedding_params
        threads = self.threads_of(task)
        precision, rates = self.precision_of(task, threads)
        # one stage, one precision: where a run of the stage recorded one first (another process), it rules
        chosen = run_ops.set_compute(self.store, task.run.id, claim.lease, self.me, threads, precision,
                                     rates.to_json() if rates is not None else "")
        if chosen != precision:
            self.report.say(f"  {stage.name}/{name} trains in {chosen}, as its stage's first run recorded")
            precision = chosen
        ctx = RunContext(state.spec, stage, name, json.loads(task.candidate.mix), state.data, state.traces,
                         checkpoint_dir(self.store.url, state.name, stage.name, name),
                         seed=derive_seed(state.spec.seed, stage.name, name, *seeded),
                         model_seed=derive_seed(state.spec.seed, stage.name, *seeded), run_key=task.run.fingerprint,
                         precision=precision)
        torch.set_num_threads(threads)
        try:
            distributed = self.ranks is not None and self.ranks.distributed
            if distributed:  # every rank trains this run with us
                self.ranks.send(run_message(ctx, state.spec_hash, task.tokens, threads))
            # A lost claim stops training at once in one process; with several ranks it is
            # noticed when recording (stopping one rank alone would hang the others).
            trained = train_run(ctx, task.tokens, self.report, check=None if distributed else claim.check)
            failpoint("after-checkpoint")
            scored = score_run(ctx, trained.model, n_params, self.report, trained.precision)
            scores = scored.scores
            failpoint("after-score")
            claim.stop()
            if not run_ops.record(self.store, task.run.id, claim.lease, self.me, rung=task.rung,
                                  done=trained.tokens_seen >= task.run.tokens_target,
                                  tokens_seen=trained.tokens_seen, wall_s=trained.wall_s,
                                  tokens_per_s=trained.tokens_per_s, train_flops=trained.train_flops,
                                  score_flops=scored.flops, scores=scores, mfu=trained.mfu, device=trained.device,
                                  intervals=scored.intervals, items=scored.items):
                raise ClaimLost(f"run {task.run.id} was taken over by another worker")
            if trained.tokens_seen >= task.run.tokens_target and state.spec.finished_runs == "model":
                # Done: nothing trains this run again; model/ (exported above) is all that is read from now on.
                reduce_to_model(ctx.checkpoint_dir)
        except ClaimLost as exc:
            claim.stop()
            self.report.say(f"  {stage.name}/{name}: {exc}; its result is discarded")
            return False
        except Exception as exc:  # noqa: BLE001 - one bad run must not stop the plan (as Optuna's FAIL)
            if self.ranks is not None and self.ranks.distributed:
                claim.release()  # the other ranks may be inside a collective: stop them all
                raise
            claim.stop()
            self._failed(task, claim, exc)
            return False
        except BaseException:
            claim.release()
            raise
        self.trained += 1
        metric = stage.pruning.metric
        short = ", ".join(f"{b} {v[metric]:.4f}" for b, v in scores.items())
        self.report.say(f"  {stage.name}/{name} rung {task.rung}: {metric} {short} "
                        f"({trained.tokens_seen:,} tokens, {trained.tokens_per_s:,.0f} tok/s, MFU {trained.mfu:.1%})")
        return True

    def _failed(self, task: Task, claim: Claim, exc: Exception) -> None:
        """Record a failed attempt: retried by any worker until ``max_attempts``, then the run is failed and
        its rung is decided without it."""
        stage, name, limit = task.stage, task.candidate.name, self.state.spec.max_attempts
        error = f"{type(exc).__name__}: {exc}"
        status = run_ops.fail(self.store, task.run.id, claim.lease, self.me, error, limit)
        attempt = task.run.attempts + 1
        if status == "failed":
            self.report.say(f"  {stage.name}/{name} failed ({error}); attempt {attempt} of {limit}: recorded as "
                            "failed, the plan goes on without it")
        elif status == "pending":
            self.report.say(f"  {stage.name}/{name} failed ({error}); attempt {attempt} of {limit}, will be retried")

    def step(self) -> str:
        """Do one unit of work if there is one: 'worked', 'waiting' (others hold the work) or 'done'."""
        sync = self.state.sync()
        seen = (sync.done, sync.stage.name if sync.stage else None, sync.rung, sync.n_done)
        if self.changed is not None and seen != self._seen:
            self._seen = seen
            self.changed()
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


class Worker:
    """``rbridge worker``: serve every unfinished plan in a store (or one, with ``plan``)."""

    def __init__(self, store: str, report: Reporter = SILENT, plan: str | None = None, until_idle: bool = False,
                 poll_s: float = 2.0, threads: int | None = None,
                 heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT_S, stages: list[str] | None = None,
                 wait: Callable[[float], None] = time.sleep):
        self.store = open_store(store)
        self.wait = wait  # between polls; rbridge plan's local processes wake early when it nudges them
        self.report = report
        self.plan = plan
        self.until_idle = until_idle
        self.poll_s = poll_s
        self.ranks = Ranks()
        self.kw = dict(threads=threads, heartbeat_timeout=heartbeat_timeout, stages=stages, ranks=self.ranks)
        self.workers: dict[str, PlanWorker] = {}
        self.trained = 0

    @property
    def claimed_any(self) -> bool:
        return any(w.claimed for w in self.workers.values())

    def _worker(self, plan) -> PlanWorker:
        pw = self.workers.get(plan.name)
        if pw is None or (pw.state.spec_hash, pw.state.revision) != (plan.spec_hash, plan.revision):
            # new, or changed with --force (possibly back to a spec this worker saw before)
            pw = PlanWorker(PlanState.from_store(self.store, plan, self.report), **self.kw)
            self.workers[plan.name] = pw
            self.report.say(f"serving plan {plan.name} as {pw.me}")
            if pw.missing_stages:
                self.report.say(f"  plan {plan.name} has no stage {', '.join(pw.missing_stages)} "
                                f"(its stages: {', '.join(st.name for st in pw.state.stages)})")
        return pw

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
                stop.check()
                plans = plan_ops.list_plans(self.store, self.plan)
                if not plans and not told:
                    self.report.say("waiting for a plan: start one with `rbridge plan SPEC.yaml --store "
                                    f"{safe_url(self.store.url)}`")
                    told = True
                worked = False
                for plan in (p for p in plans if p.status != "done"):
                    if self._worker(plan).step() == "worked":
                        worked = True
                        break
                self.trained = sum(w.trained for w in self.workers.values())
                if worked:
                    continue
                if self.until_idle and plans and not any(p.status != "done"
                                                          for p in plan_ops.list_plans(self.store, self.plan)):
                    return self.trained
                self.wait(self.poll_s)
                self.ranks.send("wait")
        finally:
            try:
                self.ranks.send(None)  # the other ranks exit with us
                self.ranks.close()
            finally:
                self.store.close()


def serve_plan(worker: PlanWorker, poll_s: float = 2.0, wait: Callable[[float], None] = time.sleep) -> None:
    """Work on one plan until it is done (``rbridge plan``'s own worker). ``wait``: between polls
    (LocalWorkers.wait_for_news wakes as soon as a local process reports)."""
    while True:
        stop.check()
        what = worker.step()
        if what == "done":
            return
        if what == "waiting":
            wait(poll_s)


def wait_for_plan(state: PlanState, poll_s: float = 2.0) -> None:
    """``rbridge plan --no-local``: make decisions the workers leave, report progress, return when done."""
    last = None
    while True:
        stop.check()
        sync = state.sync()
        if sync.done:
            return
        where = (sync.stage.name, sync.rung, sync.n_done)
        if where != last:
            running = sum(1 for t in sync.tasks if t.run.status == "running")
            state.report.say(f"  waiting for workers: stage {sync.stage.name} rung {sync.rung}: "
                             f"{sync.n_done}/{sync.n_done + len(sync.tasks)} runs done, {running} running")
            last = where
        time.sleep(poll_s)
