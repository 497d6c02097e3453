"""Rungs and rung decisions: synchronous successive halving.

Every survivor of a stage is scored at rung r before anyone is dropped at r, and
the decision depends only on the scores (ties broken by candidate name), never
on the order in which runs finished or candidates were listed in the spec.
Optuna's own SuccessiveHalvingPruner decides each trial as it reports, against
whatever trials happened to report before it, so it is order-dependent; the
studies here record trials and intermediate values, and this module decides.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from rbridge.scoring.config import Metric


class KeepWithin(BaseModel):
    model_config = ConfigDict(extra="forbid")
    within: float = Field(gt=0)


Keep = Union[int, float, KeepWithin]


class PruningConfig(BaseModel):
    """How a stage prunes: rungs (``evals``), survivors (``keep``, ``reduction_factor``), the metric.

    ``evals`` and ``metric`` are inherited from the previous stage when left out
    (defaults in ``PRUNING_DEFAULTS``); ``keep`` and ``reduction_factor`` never are.
    A leaf part of the spec (rbridge.spec composes it into each stage).
    """

    model_config = ConfigDict(extra="forbid")
    evals: int | None = Field(None, ge=1, description="rungs: scored (and pruned) this many times, evenly")
    keep: Keep | None = None
    reduction_factor: float | None = Field(None, gt=1)
    metric: Metric | None = None

    @field_validator("keep", mode="before")
    @classmethod
    def _keep(cls, keep):
        if keep is None or isinstance(keep, KeepWithin):
            return keep
        if isinstance(keep, dict):
            return KeepWithin.model_validate(keep)
        if isinstance(keep, bool) or not isinstance(keep, (int, float)):
            raise ValueError(f"keep must be a count (3), a fraction (0.25) or {{within: X}}, got {keep!r}")
        if isinstance(keep, int) and keep < 1:
            raise ValueError("keep must be at least 1")
        if isinstance(keep, float) and not (0 < keep <= 1):
            raise ValueError("a fractional keep must lie in (0, 1]")
        return keep


PRUNING_DEFAULTS: dict[str, Any] = {"evals": 4, "metric": "rbridge"}
NOT_INHERITED = ("keep", "reduction_factor")


def keep_count(keep: Keep | None, n: int, scores: list[float] | None = None) -> int:
    """How many of ``n`` candidates a ``keep`` value lets through.

    ``within: X`` keeps everyone whose score is within X of the best
    (lower-is-better scores), so it needs the scores.
    """
    if keep is None:
        return n
    if isinstance(keep, KeepWithin):
        if scores is None:
            return n
        best = min(scores)
        return max(1, sum(1 for s in scores if s <= best + keep.within))
    if isinstance(keep, int):
        return max(1, min(n, keep))
    return max(1, min(n, math.ceil(keep * n)))


def rung_tokens(stage) -> list[int]:
    """Tokens seen at each rung of a resolved stage: ``evals`` evenly spaced points, the last its budget."""
    tokens, evals = stage.training.tokens, stage.pruning.evals
    return [round(tokens * r / evals) for r in range(1, evals + 1)]


def survivors_at(rung: int, n_rungs: int, n_start: int, keep: Keep | None,
                 reduction_factor: float | None, scores: list[float] | None = None) -> int:
    """How many candidates stay after ``rung`` (1-based) of ``n_rungs``.

    The stage ends with ``keep`` survivors. Without a ``reduction_factor`` the
    field shrinks geometrically from ``n_start`` to the final count across the
    rungs; with one, each rung keeps 1/reduction_factor of the field (never fewer
    than the final count). ``within: X`` decides at the last rung only.
    """
    if keep is None:
        return n_start
    if isinstance(keep, KeepWithin):
        if rung < n_rungs:
            if reduction_factor is None:
                return n_start
            return max(1, math.ceil(n_start / reduction_factor ** rung))
        return keep_count(keep, n_start, scores)
    final = keep_count(keep, n_start)
    if rung >= n_rungs:
        return final
    if reduction_factor is not None:
        return max(final, math.ceil(n_start / reduction_factor ** rung))
    # Geometric interpolation; the small epsilon keeps exact powers from rounding up.
    return max(final, math.ceil(n_start * (final / n_start) ** (rung / n_rungs) - 1e-9))


@dataclass(frozen=True)
class RungDecision:
    candidate: str
    score: float | None  # None: the run failed before this rung
    rank: int
    kept: bool
    why: str


def decide(scores: dict[str, float], n_keep: int, rung: int, metric: str) -> list[RungDecision]:
    """Keep the ``n_keep`` lowest scores (lower is better); ties go to the name order."""
    order = sorted(scores, key=lambda c: (_nan_last(scores[c]), c))
    cutoff = scores[order[n_keep - 1]] if n_keep else math.inf
    out = []
    for rank, cand in enumerate(order, start=1):
        kept = rank <= n_keep
        if kept:
            why = f"rank {rank}/{len(order)} at rung {rung}: {metric} {scores[cand]:.4f} <= cut {cutoff:.4f}"
        else:
            why = (f"rank {rank}/{len(order)} at rung {rung}: {metric} {scores[cand]:.4f} > cut {cutoff:.4f}; "
                   f"{n_keep} kept")
        out.append(RungDecision(cand, scores[cand], rank, kept, why))
    return out


def _nan_last(x: float) -> float:
    return math.inf if x != x else x
