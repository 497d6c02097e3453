"""The store's tables: plain rows anyone can read with sqlite3 or pandas.

One plan per store file is the common case, but every row carries its plan id so
a PostgreSQL store can hold many plans.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Optional

from sqlalchemy import BigInteger
from sqlmodel import Field, SQLModel

SCHEMA_VERSION = 1

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
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class Candidate(SQLModel, table=True):
    __tablename__ = "candidates"
    id: Optional[int] = Field(default=None, primary_key=True)
    plan_id: int = Field(foreign_key="plans.id", index=True)
    name: str
    mix: str  # JSON: {source: token share}
    position: int = 0  # order in the spec (display only; never used for decisions)


class Run(SQLModel, table=True):
    """One proxy trained on one candidate in one stage."""

    __tablename__ = "runs"
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
    status: str = "pending"  # pending | running | pruned | done | failed
    checkpoint: str = ""
    trial_number: Optional[int] = None
    started_at: Optional[datetime] = None
    finished_at: Optional[datetime] = None


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
    created_at: datetime = Field(default_factory=utcnow)


class Decision(SQLModel, table=True):
    """Why a candidate went on or stopped at a rung, with the score that drove it."""

    __tablename__ = "decisions"
    id: Optional[int] = Field(default=None, primary_key=True)
    plan_id: int = Field(foreign_key="plans.id", index=True)
    stage: str
    rung: int
    candidate_id: int = Field(foreign_key="candidates.id")
    kept: bool
    score: Optional[float] = None
    rank: int = 0
    why: str = ""
    created_at: datetime = Field(default_factory=utcnow)
