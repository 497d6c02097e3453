"""Score a causal LM on frontier traces: rBridge and its baselines (METHOD.md section 2).

The unit of work is a *request* (as in lm-evaluation-harness): a context (token
ids, starting with BOS -- or EOS where the tokenizer has no BOS) and a
continuation (the reasoning's token ids). Context and reasoning are tokenized
separately, so no token straddles the boundary. Every continuation token is
scored by teacher forcing: NLL_i = -log p(token_i | context, tokens before i).

Batching: requests are sorted by length (longest first), cut into batches of
``batch_size``, right-padded and masked; one forward pass per request under
``torch.inference_mode`` on the model's own device. Log-softmax is taken in
float32 whatever the model's dtype.

Long traces: when context + reasoning exceed the model's maximum positions
(``config.max_position_embeddings`` or ``n_positions``, or ``max_length=``),
the request is split into strided windows, never silently truncated. Windows
hold at most ``max_length`` tokens and advance by ``stride = max_length // 2``;
each window scores only tokens no earlier window scored, so every reasoning
token is scored exactly once, with at least ``max_length - stride`` tokens of
left context (the first window keeps BOS and as much of the context as fits;
later windows are plain slices of the full sequence, without a new BOS).

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
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Any

import numpy as np
import torch

from rbridge.errors import InputError
from rbridge.scoring.traces import Trace, group_by_benchmark, load_traces
from rbridge.scoring.weights import normalize, trace_token_weights

CONTEXTS = ("question", "none", "fewshot")
MINMAX = ("trace", "benchmark", "none")
AGGREGATES = ("mean", "weighted")
PRECISIONS = ("auto", "fp32", "bf16")


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

    def to_dict(self, per_trace: bool = False) -> dict[str, Any]:
        """The JSON object of ``rbridge score --json`` for this benchmark."""
        d = {k: getattr(self, k) for k in (
            "rbridge", "nll", "rbridge_no_minmax", "bpb", "n_traces", "n_tokens",
            "context", "minmax", "aggregate")}
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


# ---------------------------------------------------------------- model passes

def model_max_length(model) -> int | None:
    cfg = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        v = getattr(cfg, name, None)
        if isinstance(v, int) and v > 1:
            return v
    return None


def _windows(n_ctx: int, total: int, max_len: int | None) -> list[tuple[int, int, int]]:
    """(start, first_scored, end) windows over a sequence; see the module docstring."""
    if max_len is None or total <= max_len:
        return [(0, n_ctx, total)]
    if max_len < 2:
        raise ValueError("max_length must be at least 2")
    stride = max(1, max_len // 2)
    out = []
    pos = n_ctx
    while pos < total:
        end = min(total, max(pos + stride, max_len))
        start = max(0, end - max_len)
        out.append((start, pos, end))
        pos = end
    return out


def _precision_context(model, precision: str, device: torch.device):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported() \
            and next(model.parameters()).dtype == torch.float32:
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return nullcontext()


def request_nlls(model, requests: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                 batch_size: int = 16, precision: str = "auto", pad_id: int = 0,
                 max_length: int | None = None,
                 on_progress: Callable[[int, int], None] | None = None) -> list[np.ndarray]:
    """NLL (nats, float64) of every continuation token of each (context, continuation).

    ``context`` must be non-empty (it starts with BOS). ``max_length`` defaults
    to the model's maximum positions; longer requests use strided windows.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    max_len = max_length if max_length is not None else model_max_length(model)
    # Flatten into window rows: (request index, ids, first scored index in row).
    rows: list[tuple[int, list[int], int]] = []
    for r, (ctx, cont) in enumerate(requests):
        if len(ctx) == 0:
            raise ValueError("every request needs a non-empty context (BOS at least)")
        full = list(ctx) + list(cont)
        for start, first, end in _windows(len(ctx), len(full), max_len):
            rows.append((r, full[start:end], first - start))
    row_nll: dict[int, np.ndarray] = {}
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][1]))

    device = next(model.parameters()).device
    orig_dtype = next(model.parameters()).dtype
    was_training = model.training
    if precision == "fp32" and orig_dtype != torch.float32:
        model.to(torch.float32)
    model.eval()
    try:
        with torch.inference_mode(), _precision_context(model, precision, device):
            for b in range(0, len(order), batch_size):
                idx = order[b:b + batch_size]
                width = len(rows[idx[0]][1])
                ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
                for j, i in enumerate(idx):
                    seq = rows[i][1]
                    ids[j, :len(seq)] = torch.tensor(seq, dtype=torch.long)
                # Right padding needs no attention mask in a causal LM: a real token only
                # attends to earlier positions, all real. Without a mask, attention takes
                # the fused causal kernel (as lm-evaluation-harness does), not a masked one.
                logits = model(input_ids=ids.to(device)).logits
                for j, i in enumerate(idx):
                    _, seq, first = rows[i]
                    lg = logits[j, first - 1:len(seq) - 1].float()
                    tgt = ids[j, first:len(seq)].to(device)
                    lp = torch.log_softmax(lg, dim=-1).gather(-1, tgt[:, None])[:, 0]
                    row_nll[i] = (-lp).double().cpu().numpy()
                del logits
                if on_progress is not None:
                    on_progress(min(b + batch_size, len(order)), len(order))
    finally:
        if precision == "fp32" and orig_dtype != torch.float32:
            model.to(orig_dtype)
        model.train(was_training)
    out: list[list[np.ndarray]] = [[] for _ in requests]
    for i in range(len(rows)):  # rows of one request are consecutive and in order
        out[rows[i][0]].append(row_nll[i])
    return [np.concatenate(p) if p else np.zeros(0) for p in out]


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
    for t in traces:
        ids, offs = encode_with_offsets(tokenizer, t.reasoning)
        if not ids:
            raise InputError("the tokenizer produced no tokens for the reasoning", field=f"{t.id}.reasoning")
        ctx = context_text(t, context, traces, fewshot_k)
        ctx_ids = tokenizer(ctx, add_special_tokens=False)["input_ids"] if ctx else []
        requests.append(([bos] + list(ctx_ids), ids))
        raw_w.append(trace_token_weights([x.text for x in t.frontier.tokens],
                                         [x.logprob for x in t.frontier.tokens], offs))
    nlls = request_nlls(model, requests, batch_size=batch_size, precision=precision,
                        pad_id=int(pad), max_length=max_length, on_progress=on_progress)
    norm_w = normalize(raw_w, minmax)

    per: list[TraceScore] = []
    for t, nll, w, wn in zip(traces, nlls, raw_w, norm_w):
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


# ---------------------------------------------------------------- loading models

def load_model(path: str | Path, *, device: str = "auto", dtype: torch.dtype | None = None):
    """Load a local causal LM and its tokenizer: an HF directory or a ``.gguf`` file.

    A directory without ``config.json`` but with exactly one ``.gguf`` file is
    loaded from that file. Nothing is downloaded (``local_files_only``).
    Returns ``(model, tokenizer, name)``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.exists():
        raise InputError("model path not found", file=path)
    kwargs: dict[str, Any] = {"local_files_only": True}
    if path.is_file():
        if path.suffix != ".gguf":
            raise InputError("a model file must be .gguf; otherwise pass a directory", file=path)
        directory, kwargs["gguf_file"], name = path.parent, path.name, path.stem
    else:
        directory, name = path, path.name
        if not (path / "config.json").exists():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) != 1:
                raise InputError("not a Hugging Face model directory (no config.json) and not "
                                 f"exactly one .gguf file in it (found {len(ggufs)})", file=path)
            kwargs["gguf_file"], name = ggufs[0].name, ggufs[0].stem
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            directory, **kwargs, **({"dtype": dtype} if dtype is not None else {}))
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"cannot load a causal LM and tokenizer from it: {e}", file=path) from None
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    model.eval()
    return model, tokenizer, name


def score_model_dir(path: str | Path, traces_path: str | Path, *, device: str = "auto",
                    **opts) -> dict[str, BenchmarkScore]:
    """Load the model at ``path`` (HF dir or .gguf) and score every benchmark in ``traces_path``.

    ``opts`` go to :func:`score_traces` (context, minmax, aggregate, batch_size,
    precision, fewshot_k, max_length). Traces are validated before the model loads.
    """
    traces = load_traces(traces_path)
    model, tokenizer, _ = load_model(path, device=device)
    return score_benchmarks(model, tokenizer, traces, **opts)


def scores_to_json(model_name: str, scores: dict[str, BenchmarkScore],
                   per_trace: bool = False) -> dict[str, Any]:
    """The document ``rbridge score --json`` prints (INTERFACE.md)."""
    return {"model": model_name,
            "benchmarks": {k: v.to_dict(per_trace=per_trace) for k, v in scores.items()}}
