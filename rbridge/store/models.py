"""The store's tables: plain rows anyone can read with sqlite3 or pandas.

One plan per store file is the common case, but every row carries its plan id so
a PostgreSQL store can hold many plans.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Optional

from sqlalchemy import BigInteger, Index, text
from sqlmodel import Field, SQLModel

# 2: runs carry a worker claim (worker, lease, beats, heartbeat_at, beat_every_s);
#    unique (plan, stage, candidate) runs and (plan, stage, rung, candidate) decisions.
# 3: runs count failed attempts (attempts) and keep the last error (error); status 'failed'.
# 4: an accepted spec edit supersedes rows instead of deleting them: plans.revision counts
#    accepted edits; runs, candidates and decisions carry superseded_by (0: live, else the
#    revision that superseded the row); the unique indexes cover live rows only;
#    plans.studies names each stage's Optuna study revision.
# 5: runs.threads (CPU threads the run trains with: the first run of a stage fixes them for the
#    stage, so a resumed stage computes identically), runs.device and runs.mfu;
#    evaluations.ci_low/ci_high (bootstrap interval over traces), shown by the ranking view.
# 6: target stages: runs.role ('proxy' | 'target'), runs.stage_group (the stage as written: a stage
#    with several seeds runs as <group>.s<seed>) and runs.seed; evaluation_items holds every
#    evaluation's per-trace values (for paired bootstraps over test items).
# 7: runs.precision ('fp32' | 'bf16': what the run trains in, recorded with its threads; the first
#    run of a stage fixes it for the stage, as its threads; '' on a run not started, and on runs
#    started before 7, whose stage keeps the old rule: auto = fp32 on CPUs).
# 8: runs.precision_rates (JSON: the fp32 and bf16 rates that `precision: auto` measured to choose
#    the run's precision, rbridge.proxy.precision.Rates; '' where nothing was measured).
# 9: launches: job arrays submitted for a plan's workers (rbridge launch slurm): scheduler, job id,
#    tasks, the script submitted, when; `rbridge status` asks the scheduler about them.
# The number itself lives in rbridge.store.version (read without SQLAlchemy); bump it there.
from rbridge.store.version import SCHEMA_VERSION  # noqa: E402

# The unique indexes below hold among live rows only (superseded_by = 0): a superseded
# run and the live run that replaced it share (plan, stage, candidate).
LIVE = text("superseded_by = 0")

# Parameter and token counts pass 2**31 (a 1B proxy, 20B target tokens): 64-bit
# everywhere (SQLite's INTEGER already is; PostgreSQL's INTEGER is 32-bit).
BIG = BigInteger


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Meta(SQLModel, table=True):
    __tablename__ = "meta"
    key: str = Field(primary_key=True)
    value: str


class Plan(SQLModel, table=True):
    __tablename__ = "plans"
    id: Optional[int] = Field(default=None, primary_key=True)
    name: str = Field(index=True, unique=True)
    spec_text: str
    spec_hash: str
    spec_path: str = ""
    seed: int = 0
    status: str = "running"  # running | done | failed
    compute: str = ""  # JSON: spend per stage, naive spend, reduction (rbridge.analysis.compute)
    revision: int = Field(default=0, sa_column_kwargs={"server_default": "0"})  # accepted spec edits so far
    studies: str = Field(default="", sa_column_kwargs={"server_default": ""})  # JSON {stage: study revision}
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class Candidate(SQLModel, table=True):
    __tablename__ = "candidates"
    id: Optional[int] = Field(default=None, primary_key=True)
    plan_id: int = Field(foreign_key="plans.id", index=True)
    name: str
    mix: str  # JSON: {source: token share}
    position: int = 0  # order in the spec (display only; never used for decisions)
    superseded_by: int = Field(default=0, sa_column_kwargs={"server_default": "0"})  # revision that dropped it


class Run(SQLModel, table=True):
    """One proxy trained on one candidate in one stage.

    Workers claim a run by compare-and-set on (lease, beats, status): a claim bumps
    ``lease``, the holder bumps ``beats`` every ``beat_every_s`` seconds, and a run
    whose beats stop is taken over (rbridge.planner.worker).
    """

    __tablename__ = "runs"
    __table_args__ = (Index("ux_runs_live", "plan_id", "stage", "candidate_id", unique=True,
                            sqlite_where=LIVE, postgresql_where=LIVE),)
    id: Optional[int] = Field(default=None, primary_key=True)
    plan_id: int = Field(foreign_key="plans.id", index=True)
    stage: str
    stage_index: int
    candidate_id: int = Field(foreign_key="candidates.id", index=True)
    config: str  # JSON: the LlamaConfig and training settings
    fingerprint: str = ""  # hash of every input of the run (rbridge.planner.reconcile)
    params: int = Field(default=0, sa_type=BIG)
    non_embedding_params: int = Field(default=0, sa_type=BIG)
    tokens_target: int = Field(default=0, sa_type=BIG)
    tokens_seen: int = Field(default=0, sa_type=BIG)
    train_flops: float = 0.0
    score_flops: float = 0.0
    wall_s: float = 0.0
    tokens_per_s: float = 0.0
    threads: int = Field(default=0, sa_column_kwargs={"server_default": "0"})  # torch CPU threads; 0: not started
    device: str = Field(default="", sa_column_kwargs={"server_default": ""})   # "cpu", "cuda: NVIDIA H100 ..."
    precision: str = Field(default="", sa_column_kwargs={"server_default": ""})  # fp32 | bf16; "": not started
    precision_rates: str = Field(default="", sa_column_kwargs={"server_default": ""})  # JSON: what auto measured
    mfu: float = Field(default=0.0, sa_column_kwargs={"server_default": "0"})  # model FLOPs utilisation
    role: str = Field(default="proxy", sa_column_kwargs={"server_default": "proxy"})  # proxy | target
    stage_group: str = Field(default="", sa_column_kwargs={"server_default": ""})  # the stage as written
    seed: int = Field(default=0, sa_column_kwargs={"server_default": "0"})  # the stage's training seed
    status: str = "pending"  # pending | running | pruned | done | failed
    checkpoint: str = ""
    trial_number: Optional[int] = None
    worker: str = Field(default="", sa_column_kwargs={"server_default": ""})  # host:pid:boot of the holder
    lease: int = Field(default=0, sa_column_kwargs={"server_default": "0"})  # claims so far
    beats: int = Field(default=0, sa_column_kwargs={"server_default": "0"})  # heartbeats of this lease
    beat_every_s: float = Field(default=0.0, sa_column_kwargs={"server_default": "0"})
    heartbeat_at: Optional[datetime] = None
    attempts: int = Field(default=0, sa_column_kwargs={"server_default": "0"})  # failed attempts so far
    error: str = Field(default="", sa_column_kwargs={"server_default": ""})  # the last failure, if any
    # 0 while the run counts; else the plan revision whose spec edit superseded it. A superseded
    # run keeps its evaluations (and its checkpoints, moved under <runs>/.superseded/r<revision>),
    # is left out of every view, and is revived when a later spec asks for the same fingerprint.
    superseded_by: int = Field(default=0, sa_column_kwargs={"server_default": "0"})
    started_at: Optional[datetime] = None
    finished_at: Optional[datetime] = None


class Launch(SQLModel, table=True):
    """A job array submitted to serve a plan (``rbridge launch slurm``): what was submitted, and when."""

    __tablename__ = "launches"
    id: Optional[int] = Field(default=None, primary_key=True)
    plan_id: int = Field(foreign_key="plans.id", index=True)
    scheduler: str = "slurm"
    job_id: str
    tasks: int
    script: str
    submitted_at: datetime = Field(default_factory=utcnow)
    cancelled_at: Optional[datetime] = None


class Evaluation(SQLModel, table=True):
    __tablename__ = "evaluations"
    id: Optional[int] = Field(default=None, primary_key=True)
    run_id: int = Field(foreign_key="runs.id", index=True)
    rung: int
    tokens_seen: int = Field(sa_type=BIG)
    benchmark: str
    metric: str
    value: float
    higher_is_better: bool = False
    # 95% percentile-bootstrap interval of the value over the benchmark's traces (seed 0, 1,000
    # resamples: BenchmarkScore.interval); None for imported results and older rows.
    ci_low: Optional[float] = None
    ci_high: Optional[float] = None
    created_at: datetime = Field(default_factory=utcnow)


class EvaluationItems(SQLModel, table=True):
    """An evaluation's value on each of the benchmark's traces, in the traces file's order (JSON list;
    null where a trace has no value, e.g. label_nll of a trace without a label). The evaluation's value
    is the mean of the non-null items; bootstraps over test items resample these."""

    __tablename__ = "evaluation_items"
    evaluation_id: int = Field(primary_key=True, foreign_key="evaluations.id")
    n: int
    item_values: str


class Decision(SQLModel, table=True):
    """Why a candidate went on or stopped at a rung, with the score that drove it."""

    __tablename__ = "decisions"
    # Rung decisions are made once: a second worker deciding the same rung hits this index.
    __table_args__ = (Index("ux_decisions_live", "plan_id", "stage", "rung", "candidate_id", unique=True,
                            sqlite_where=LIVE, postgresql_where=LIVE),)
    id: Optional[int] = Field(default=None, primary_key=True)
    plan_id: int = Field(foreign_key="plans.id", index=True)
    stage: str
    rung: int
    candidate_id: int = Field(foreign_key="candidates.id")
    kept: bool
    score: Optional[float] = None
    rank: int = 0
    why: str = ""
    superseded_by: int = Field(default=0, sa_column_kwargs={"server_default": "0"})  # as Run.superseded_by
    created_at: datetime = Field(default_factory=utcnow)
