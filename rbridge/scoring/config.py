"""The scoring part of a spec: the metrics a proxy is scored with and the options of a benchmark.

A leaf module (pydantic only): the spec, the planner, ``rbridge score`` and the
store read the metric names and score options from here, so each is declared once.
"""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict

# Every metric the scorer computes per benchmark, lower is better (nats or bits).
# METHOD.md sections 2-4; ``rbridge`` is the decision metric unless a stage says otherwise.
METRICS: dict[str, str] = {
    "rbridge": "confidence-weighted NLL of the reasoning tokens, weights min-max normalised (METHOD.md 3)",
    "nll": "plain mean NLL of the reasoning tokens",
    "rbridge_no_minmax": "confidence-weighted NLL with raw weights (ablation)",
    "bpb": "bits per UTF-8 byte of the reasoning text",
}
Metric = Literal["rbridge", "nll", "rbridge_no_minmax", "bpb"]
assert set(get_args(Metric)) == set(METRICS)

# Metrics where a higher value is better (imported task results); every scorer metric is lower-is-better.
HIGHER_IS_BETTER = frozenset({"accuracy", "acc", "pass@1"})

Context = Literal["none", "question", "fewshot"]
Minmax = Literal["trace", "benchmark", "none"]
Aggregate = Literal["mean", "weighted"]


class ScoreOptions(BaseModel):
    """How traces are scored: the context before the reasoning, the weight normalisation, the average."""

    model_config = ConfigDict(extra="forbid")
    context: Context = "question"
    minmax: Minmax = "trace"
    aggregate: Aggregate = "mean"

    def score_options(self) -> dict[str, str]:
        """Keyword arguments of ``score_traces`` / ``score_file`` (subclasses add fields; these three only)."""
        return {name: getattr(self, name) for name in ScoreOptions.model_fields}


CONTEXTS, MINMAX, AGGREGATES = get_args(Context), get_args(Minmax), get_args(Aggregate)
