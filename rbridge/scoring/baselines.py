"""Baselines per benchmark beside rBridge (METHOD.md section 4), as extra keys of ``rbridge score --json``.

Every log-likelihood here goes through :func:`rbridge.scoring.scorer.request_nlls`
(the one batched path: (context ids, continuation ids) requests, context
starting with BOS -- or EOS -- and tokenized separately from the continuation,
as lm-evaluation-harness does).

NLL on the benchmark's own answer (traces with ``label``)
    ``label_nll``: mean over those traces of the mean NLL per proxy token of
    the label, given the same context as the trace score (``none``,
    ``question``, ``fewshot``); ``n_label`` traces.

Multiple choice (traces with ``choices`` and ``gold``), cloze form as in
OLMES / DataDecide: context ``"Question: {question}\\nAnswer:"``, continuation
``" " + choice``. With ``ll_j`` the summed log-likelihood of choice ``j``,
``c_j`` its length in characters (leading space included, as OLMES's
``acc_per_char``) and ``p_j = exp(ll_j)``:

- ``correct_prob``       = p_gold (the raw probability of the correct continuation)
- ``correct_prob_per_char`` = exp(ll_gold / c_gold)
- ``norm_correct_prob``  = exp(ll_gold / c_gold) / sum_j exp(ll_j / c_j): per-character
  normalized probabilities, renormalized over the choices (the normalization
  this project uses; ``norm_correct_prob_raw`` = p_gold / sum_j p_j, the
  unnormalized-length variant, is given beside it)
- ``total_prob``         = sum_j p_j
- ``margin``             = p_gold - max_{j != gold} p_j (raw probabilities)
- ``acc_cloze``          = 1 if argmax_j ll_j / c_j == gold else 0 (OLMES CF,
  per-character normalized; ties go to the lowest index); ``acc_cloze_raw``
  the same on ll_j
- ``n_mc``: the number of multiple-choice traces.

Each is the mean over the benchmark's multiple-choice traces. Higher is better
for all of them (``label_nll``: lower).

Accuracy by greedy generation (opt-in, ``accuracy=True``), for benchmarks with
an answer checker (:data:`CHECKERS`; GSM8K: benchmark names starting with
``gsm8k``): the proxy continues ``[BOS] + context`` greedily (the question, or
the few-shot context when ``context="fewshot"``) for up to ``max_new_tokens``
tokens; the text up to the first blank line is kept and its last number is
compared with the gold number (the ``#### N`` of the label, else the label's
last number, else the trace's ``answer``). ``acc_greedy`` is the fraction
correct over ``n_acc`` traces.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from rbridge.scoring.scorer import context_text, request_nlls, start_token_id
from rbridge.scoring.traces import Trace

_NUM = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def last_number(text: str) -> float | None:
    """The last number in ``text`` (commas as thousands separators), or None."""
    found = _NUM.findall(text or "")
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def gsm8k_gold(trace: Trace) -> float | None:
    if trace.label and "####" in trace.label:
        return last_number(trace.label.rpartition("####")[2])
    if trace.label:
        return last_number(trace.label)
    return last_number(trace.answer)


def gsm8k_check(generation: str, trace: Trace) -> bool:
    """GSM8K checker: the generation's last number equals the gold number."""
    got, gold = last_number(generation.split("\n\n")[0]), gsm8k_gold(trace)
    return got is not None and gold is not None and abs(got - gold) < 1e-6


#: benchmark-name prefix -> checker(generation, trace) -> correct
CHECKERS: dict[str, Callable[[str, Trace], bool]] = {"gsm8k": gsm8k_check}


def checker_for(benchmark: str) -> Callable[[str, Trace], bool] | None:
    name = benchmark.lower()
    return next((c for prefix, c in CHECKERS.items() if name.startswith(prefix)), None)


def cloze_context(trace: Trace) -> str:
    return f"Question: {trace.question}\nAnswer:"


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def mc_values(lls: Sequence[float], chars: Sequence[int], gold: int) -> dict[str, float]:
    """The multiple-choice baselines of one question from its choices' summed log-likelihoods."""
    ll = np.asarray(lls, dtype=np.float64)
    per_char = ll / np.asarray(chars, dtype=np.float64)
    p = np.exp(ll)
    pc = np.exp(per_char - per_char.max())
    others = np.delete(p, gold)
    return {
        "correct_prob": float(p[gold]),
        "correct_prob_per_char": float(math.exp(per_char[gold])),
        "norm_correct_prob": float(pc[gold] / pc.sum()),
        "norm_correct_prob_raw": float(np.exp(ll[gold] - ll.max()) / np.exp(ll - ll.max()).sum()),
        "total_prob": float(p.sum()),
        "margin": float(p[gold] - (others.max() if others.size else 0.0)),
        "acc_cloze": float(int(np.argmax(per_char)) == gold),
        "acc_cloze_raw": float(int(np.argmax(ll)) == gold),
    }


MC_KEYS = ("correct_prob", "correct_prob_per_char", "norm_correct_prob", "norm_correct_prob_raw",
           "total_prob", "margin", "acc_cloze", "acc_cloze_raw")


def baseline_scores(model, tokenizer, traces: Sequence[Trace], *, context: str = "question",
                    fewshot_k: int = 3, batch_size: int = 16, precision: str = "auto",
                    max_length: int | None = None, accuracy: bool = False,
                    max_new_tokens: int = 128) -> dict[str, Any]:
    """Baseline values of one benchmark's ``traces`` (keys as in the module docstring).

    Keys are present only where the traces carry what they need.
    """
    bos = start_token_id(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else bos
    requests: list[tuple[list[int], list[int]]] = []
    label_idx: list[int] = []
    mc: list[tuple[Trace, list[int], list[int]]] = []   # trace, request indices, char lengths
    for t in traces:
        if t.label:
            ctx = context_text(t, context, traces, fewshot_k)
            cont = _ids(tokenizer, t.label)
            if cont:
                label_idx.append(len(requests))
                requests.append(([bos] + _ids(tokenizer, ctx), cont))
        if t.choices and t.gold is not None:
            ctx_ids = [bos] + _ids(tokenizer, cloze_context(t))
            idx, chars = [], []
            for ch in t.choices:
                cont_text = " " + ch
                idx.append(len(requests))
                chars.append(len(cont_text))
                requests.append((ctx_ids, _ids(tokenizer, cont_text)))
            mc.append((t, idx, chars))
    out: dict[str, Any] = {}
    if requests:
        nlls = request_nlls(model, requests, batch_size=batch_size, precision=precision,
                            pad_id=int(pad), max_length=max_length)
        if label_idx:
            out["label_nll"] = float(np.mean([nlls[i].mean() for i in label_idx]))
            out["n_label"] = len(label_idx)
        if mc:
            rows = [mc_values([-float(nlls[i].sum()) for i in idx], chars, t.gold)
                    for t, idx, chars in mc]
            for k in MC_KEYS:
                out[k] = float(np.mean([r[k] for r in rows]))
            out["n_mc"] = len(mc)
    if accuracy and traces:
        check = checker_for(traces[0].benchmark)
        if check is not None:
            mode = "fewshot" if context == "fewshot" else "question"
            prompts = [[bos] + _ids(tokenizer, context_text(t, mode, traces, fewshot_k)) for t in traces]
            gens = greedy_generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                   batch_size=batch_size, pad_id=int(pad))
            out["acc_greedy"] = float(np.mean([check(g, t) for g, t in zip(gens, traces)]))
            out["n_acc"] = len(traces)
    return out


def greedy_generate(model, tokenizer, prompts: Sequence[list[int]], *, max_new_tokens: int = 128,
                    batch_size: int = 16, pad_id: int = 0) -> list[str]:
    """Greedy continuations (decoded text) of token-id prompts, batched by length, left-padded."""
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id,
                           eos_token_id=eos)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    with torch.inference_mode():
        for b in range(0, len(order), batch_size):
            idx = order[b:b + batch_size]
            width = len(prompts[idx[0]])
            ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for j, i in enumerate(idx):
                p = prompts[i]
                ids[j, width - len(p):] = torch.tensor(p, dtype=torch.long)
                mask[j, width - len(p):] = 1
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=cfg)
            for j, i in enumerate(idx):
                new = gen[j, width:].tolist()
                if eos is not None and eos in new:
                    new = new[:new.index(eos)]
                out[i] = tokenizer.decode(new, skip_special_tokens=True)
    return out


# ---------------------------------------------------------------- whole files (rbridge score)

def score_file(model_path, traces_path, *, context: str = "question", minmax: str = "trace",
               aggregate: str = "mean", precision: str = "auto", batch_size: int = 16,
               fewshot_k: int = 3, max_length: int | None = None, baselines: bool = True,
               accuracy: bool = False, max_new_tokens: int = 128, per_trace: bool = False,
               device: str = "auto", use_cache: bool = True,
               cache_file=None) -> tuple[dict[str, Any], bool]:
    """``rbridge score``: (the ``--json`` document, whether it came from the cache).

    Traces are validated before the model loads. Results are cached in
    :mod:`rbridge.scoring.cache` keyed by (model, traces, options).
    """
    import time

    import rbridge
    from rbridge.scoring import cache
    from rbridge.scoring.scorer import (AGGREGATES, CONTEXTS, MINMAX, PRECISIONS, load_model,
                                        score_benchmarks, scores_to_json)
    from rbridge.scoring.traces import group_by_benchmark, load_traces
    from rbridge.errors import InputError

    for name, val, allowed in (("--context", context, CONTEXTS), ("--minmax", minmax, MINMAX),
                               ("--aggregate", aggregate, AGGREGATES), ("--precision", precision, PRECISIONS)):
        if val not in allowed:
            raise InputError(f"must be one of {', '.join(allowed)}, not {val!r}", field=name)
    traces = load_traces(traces_path)
    dev = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    options = {"context": context, "minmax": minmax, "aggregate": aggregate, "precision": precision,
               "fewshot_k": fewshot_k, "max_length": max_length, "baselines": baselines,
               "accuracy": accuracy, "max_new_tokens": max_new_tokens if accuracy else None,
               "per_trace": per_trace, "device": dev.split(":")[0], "rbridge": rbridge.__version__}
    key = mfp = tfp = opts = None
    if use_cache:
        mfp, tfp = cache.model_fingerprint(model_path), cache.traces_fingerprint(traces_path)
        key, opts = cache.cache_key(mfp, tfp, options)
        hit = cache.get(key, cache_file)
        if hit is not None:
            return hit, True
    t0 = time.perf_counter()
    model, tokenizer, name = load_model(model_path, device=dev)
    t1 = time.perf_counter()
    scores = score_benchmarks(model, tokenizer, traces, context=context, minmax=minmax,
                              aggregate=aggregate, batch_size=batch_size, precision=precision,
                              fewshot_k=fewshot_k, max_length=max_length)
    doc = scores_to_json(name, scores, per_trace=per_trace)
    if baselines or accuracy:
        for bench, group in group_by_benchmark(traces).items():
            extra = baseline_scores(model, tokenizer, group, context=context, fewshot_k=fewshot_k,
                                    batch_size=batch_size, precision=precision, max_length=max_length,
                                    accuracy=accuracy, max_new_tokens=max_new_tokens) if baselines or accuracy else {}
            if not baselines:
                extra = {k: v for k, v in extra.items() if k in ("acc_greedy", "n_acc")}
            doc["benchmarks"][bench].update(extra)
    doc["seconds"] = {"load": round(t1 - t0, 3), "score": round(time.perf_counter() - t1, 3)}
    if use_cache and key is not None:
        cache.put(key, mfp, tfp, opts, doc, cache_file)
    return doc, False
