"""Score a causal LM on frontier traces: rBridge and its baselines (METHOD.md section 2).

The unit of work is a :class:`~rbridge.scoring.requests.Request` (as in
lm-evaluation-harness): a context (token ids, starting with BOS -- or EOS where
the tokenizer has no BOS) and a continuation (the reasoning's token ids), one
per trace. Context and reasoning are tokenized separately, so no token
straddles the boundary. Every reasoning token is scored by teacher forcing,
NLL_i = -log p(token_i | context, tokens before i), in one batched pass
(:func:`rbridge.scoring.requests.loglikelihood`: length-sorted batches, right
padding, strided windows for traces longer than the model's maximum positions,
never truncation).

Per trace (``TraceScore``), with ``w`` the raw token weights (``weights.py``)
and ``w~`` the MinMax-normalized ones:

- ``nll``  = mean_i NLL_i (the paper's unweighted baseline R^phi)
- ``rbridge`` = mean_i w~_i NLL_i (``aggregate="mean"``, the paper's algorithm)
  or sum_i w~_i NLL_i / sum_i w~_i (``aggregate="weighted"``); if the weights
  sum to 0 (possible only with benchmark-wide MinMax), the weighted form falls
  back to the unweighted mean, its limit for equal weights
- ``rbridge_no_minmax``: the same aggregate with the raw weights ``w``
- ``bpb`` = sum_i NLL_i / (ln 2 * UTF-8 bytes of the reasoning)

Benchmark values are means over traces of the per-trace values. Lower is
better; units are nats (bits for bpb).

Moved, still importable from here: ``request_nlls``, ``model_max_length`` and
``PRECISIONS`` (to ``requests.py``), ``load_model`` and ``score_model_dir``
(to ``api.py``, the entry point of ``rbridge score``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Callable, Any

import numpy as np

from rbridge.errors import InputError
from rbridge.scoring import forward_attr
from rbridge.scoring.config import METRICS, ScoreOptions
from rbridge.scoring.requests import Request, loglikelihood
from rbridge.scoring.traces import Trace, group_by_benchmark
from rbridge.scoring.weights import normalize, trace_token_weights

CONTEXTS = ("question", "none", "fewshot")
MINMAX = ("trace", "benchmark", "none")
AGGREGATES = ("mean", "weighted")


@dataclass
class TraceScore:
    """Per-trace values; every benchmark value is the mean of one of these."""

    id: str
    n_tokens: int
    n_bytes: int
    nll: float
    rbridge: float
    rbridge_no_minmax: float
    bpb: float
    sum_nll: float


@dataclass
class BenchmarkScore:
    """Benchmark-level scores (INTERFACE.md, ``rbridge score --json``) plus per-trace values."""

    benchmark: str
    rbridge: float
    nll: float
    rbridge_no_minmax: float
    bpb: float
    n_traces: int
    n_tokens: int
    context: str
    minmax: str
    aggregate: str
    traces: list[TraceScore] = field(default_factory=list)

    def interval(self, metric: str, level: float = 0.95, resamples: int = 1000, seed: int = 0
                 ) -> tuple[float, float] | None:
        """Percentile bootstrap interval of the benchmark's ``metric`` (a mean over traces): the traces
        resampled with replacement ``resamples`` times from ``seed``, so the same scores give the same
        interval. None with fewer than two traces."""
        values = np.array([getattr(t, metric) for t in self.traces], dtype=float)
        if len(values) < 2:
            return None
        draws = np.random.default_rng(seed).integers(0, len(values), size=(resamples, len(values)))
        means = values[draws].mean(axis=1)
        lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
        return float(lo), float(hi)

    def to_dict(self, per_trace: bool = False) -> dict[str, Any]:
        """The JSON object of ``rbridge score --json`` for this benchmark."""
        d = {k: getattr(self, k) for k in (*METRICS, "n_traces", "n_tokens", *ScoreOptions.model_fields)}
        if per_trace:
            d["traces"] = [asdict(t) for t in self.traces]
        return d


# ---------------------------------------------------------------- tokenization

def start_token_id(tokenizer) -> int:
    """BOS, or EOS where the tokenizer has no BOS (METHOD.md: conditioning)."""
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    raise InputError("the tokenizer has neither a BOS nor an EOS token to start sequences with",
                     field="tokenizer")


def encode_with_offsets(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and character offsets of ``text``, without special tokens."""
    if not getattr(tokenizer, "is_fast", False):
        raise InputError("scoring needs a fast (Rust) tokenizer that reports character offsets",
                         field="tokenizer")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def text_ids(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (none for the empty string)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def fewshot_text(example: Trace) -> str:
    """One solved example of a few-shot context."""
    return f"{example.question}\n{example.reasoning}\nThe answer is {example.answer}.\n\n"


def context_text(trace: Trace, mode: str, pool: Sequence[Trace], k: int = 3) -> str:
    """The context string of ``trace``: ``none``, ``question`` or ``fewshot``.

    ``fewshot``: the first ``k`` traces of ``pool`` (same benchmark, in file
    order) other than ``trace`` itself, each as question, reasoning and
    "The answer is ...", then the question. Deterministic.
    """
    if mode == "none":
        return ""
    if mode == "question":
        return trace.question + "\n"
    if mode == "fewshot":
        shots = [t for t in pool if t.id != trace.id and t.benchmark == trace.benchmark][:k]
        return "".join(fewshot_text(s) for s in shots) + trace.question + "\n"
    raise ValueError(f"context must be one of {CONTEXTS}, not {mode!r}")


# ---------------------------------------------------------------- scoring

def _aggregate(nll: np.ndarray, w: np.ndarray, mode: str) -> float:
    if mode == "mean":
        return float(np.mean(nll * w))
    s = float(np.sum(w))
    if s == 0.0:
        return float(np.mean(nll))
    return float(np.sum(nll * w) / s)


def score_traces(model, tokenizer, traces: Sequence[Trace], *, context: str = "question",
                 minmax: str = "trace", aggregate: str = "mean", batch_size: int = 16,
                 precision: str = "auto", fewshot_k: int = 3,
                 max_length: int | None = None,
                 on_progress: Callable[[int, int], None] | None = None) -> BenchmarkScore:
    """rBridge and baselines of ``model`` on the traces of one benchmark.

    ``on_progress(done, total)`` is called after every batch (for progress bars).

    ``traces`` must all share one ``benchmark`` (use :func:`score_benchmarks`
    for a mixed file). Benchmark-wide MinMax normalizes over all tokens of
    ``traces``. See the module docstring for every definition.
    """
    if context not in CONTEXTS:
        raise ValueError(f"context must be one of {CONTEXTS}, not {context!r}")
    if minmax not in MINMAX:
        raise ValueError(f"minmax must be one of {MINMAX}, not {minmax!r}")
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {AGGREGATES}, not {aggregate!r}")
    if not traces:
        raise InputError("no traces to score")
    names = {t.benchmark for t in traces}
    if len(names) != 1:
        raise InputError(f"score_traces takes one benchmark, got {sorted(names)}; "
                         "use score_benchmarks", field="benchmark")

    bos = start_token_id(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else bos
    requests, raw_w = [], []
    for i, t in enumerate(traces):
        ids, offs = encode_with_offsets(tokenizer, t.reasoning)
        if not ids:
            raise InputError("the tokenizer produced no tokens for the reasoning", field=f"{t.id}.reasoning")
        ctx_ids = text_ids(tokenizer, context_text(t, context, traces, fewshot_k))
        requests.append(Request([bos] + ctx_ids, ids, trace=i, kind="reasoning"))
        raw_w.append(trace_token_weights([x.text for x in t.frontier.tokens],
                                         [x.logprob for x in t.frontier.tokens], offs))
    loglikelihood(model, requests, batch_size=batch_size, precision=precision,
                  pad_id=int(pad), max_length=max_length, on_progress=on_progress)
    norm_w = normalize(raw_w, minmax)

    per: list[TraceScore] = []
    for req, w, wn in zip(requests, raw_w, norm_w):
        t, nll = traces[req.trace], req.nll
        n_bytes = len(t.reasoning.encode("utf-8"))
        per.append(TraceScore(
            id=t.id, n_tokens=int(nll.size), n_bytes=n_bytes,
            nll=float(np.mean(nll)),
            rbridge=_aggregate(nll, wn, aggregate),
            rbridge_no_minmax=_aggregate(nll, w, aggregate),
            bpb=float(np.sum(nll) / (math.log(2) * n_bytes)),
            sum_nll=float(np.sum(nll))))

    def mean(attr: str) -> float:
        return float(np.mean([getattr(p, attr) for p in per]))

    return BenchmarkScore(
        benchmark=next(iter(names)), rbridge=mean("rbridge"), nll=mean("nll"),
        rbridge_no_minmax=mean("rbridge_no_minmax"), bpb=mean("bpb"),
        n_traces=len(per), n_tokens=int(sum(p.n_tokens for p in per)),
        context=context, minmax=minmax, aggregate=aggregate, traces=per)


def score_benchmarks(model, tokenizer, traces: Sequence[Trace], **opts) -> dict[str, BenchmarkScore]:
    """:func:`score_traces` per benchmark name found in ``traces`` (file order kept)."""
    return {name: score_traces(model, tokenizer, group, **opts)
            for name, group in group_by_benchmark(list(traces)).items()}


def scores_to_json(model_name: str, scores: dict[str, BenchmarkScore],
                   per_trace: bool = False) -> dict[str, Any]:
    """The document ``rbridge score --json`` prints (INTERFACE.md)."""
    return {"model": model_name,
            "benchmarks": {k: v.to_dict(per_trace=per_trace) for k, v in scores.items()}}


# Names that moved, still importable from here (resolved on first use: api imports this module).
_MOVED = {"request_nlls": "rbridge.scoring.requests", "model_max_length": "rbridge.scoring.requests",
          "PRECISIONS": "rbridge.scoring.requests",
          "load_model": "rbridge.scoring.api", "score_model_dir": "rbridge.scoring.api"}


def __getattr__(name: str):
    return forward_attr(__name__, name, _MOVED)
