"""Baselines per benchmark beside rBridge (METHOD.md section 4), as extra keys of ``rbridge score --json``.

Every log-likelihood here is a :class:`rbridge.scoring.requests.Request`
(context ids starting with BOS -- or EOS -- and tokenized separately from the
continuation, as lm-evaluation-harness does), tagged with its trace and, for a
choice, its option index; one :func:`rbridge.scoring.requests.loglikelihood`
pass scores all of a benchmark's requests and each value is read back from its
request.

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
correct over ``n_acc`` traces. Generation is :func:`rbridge.scoring.decoding.generate`,
batched and left-padded, stopping at the tokenizer's EOS only (not at other EOS
ids of the model's generation config, where trace generation also stops:
``rbridge score --accuracy`` has always done so, and keeps doing so).

``score_file`` (``rbridge score``) moved to :mod:`rbridge.scoring.api`; it is
still importable from here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from rbridge.scoring import decoding, forward_attr
from rbridge.scoring.answers import last_number  # noqa: F401 - the checkers' rule (torch-free), importable here
from rbridge.scoring.requests import Request, loglikelihood
from rbridge.scoring.scorer import context_text, start_token_id, text_ids
from rbridge.scoring.traces import Trace



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
    """The cloze-form context of a multiple-choice question (OLMES / DataDecide)."""
    return f"Question: {trace.question}\nAnswer:"


def cloze_continuation(choice: str) -> str:
    """The cloze-form continuation of one choice: a space, then the choice."""
    return " " + choice


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
    requests = _requests(tokenizer, traces, bos, context, fewshot_k)
    out: dict[str, Any] = {}
    if requests:
        loglikelihood(model, requests, batch_size=batch_size, precision=precision,
                      pad_id=int(pad), max_length=max_length)
        labels = [r for r in requests if r.kind == "label"]
        if labels:
            out["label_nll"] = float(np.mean([r.mean_nll for r in labels]))
            out["n_label"] = len(labels)
        choices: dict[int, list[Request]] = {}
        for r in requests:
            if r.kind == "choice":
                choices.setdefault(r.trace, []).append(r)
        if choices:
            rows = [mc_values([r.sum_logprob for r in opts],
                              [len(cloze_continuation(traces[i].choices[r.option])) for r in opts],
                              traces[i].gold)
                    for i, opts in choices.items()]
            for k in MC_KEYS:
                out[k] = float(np.mean([r[k] for r in rows]))
            out["n_mc"] = len(choices)
    if accuracy and traces:
        check = checker_for(traces[0].benchmark)
        if check is not None:
            mode = "fewshot" if context == "fewshot" else "question"
            prompts = [[bos] + text_ids(tokenizer, context_text(t, mode, traces, fewshot_k)) for t in traces]
            gens = greedy_generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                   batch_size=batch_size, pad_id=int(pad))
            out["acc_greedy"] = float(np.mean([check(g, t) for g, t in zip(gens, traces)]))
            out["n_acc"] = len(traces)
    return out


def _requests(tokenizer, traces: Sequence[Trace], bos: int, context: str, fewshot_k: int) -> list[Request]:
    """Per trace, in trace order: its label request (if it has a label), then one per choice."""
    requests: list[Request] = []
    for i, t in enumerate(traces):
        if t.label:
            cont = text_ids(tokenizer, t.label)
            if cont:
                ctx = context_text(t, context, traces, fewshot_k)
                requests.append(Request([bos] + text_ids(tokenizer, ctx), cont, trace=i, kind="label"))
        if t.choices and t.gold is not None:
            ctx_ids = [bos] + text_ids(tokenizer, cloze_context(t))
            requests.extend(Request(ctx_ids, text_ids(tokenizer, cloze_continuation(ch)), trace=i,
                                    kind="choice", option=j)
                            for j, ch in enumerate(t.choices))
    return requests


def greedy_generate(model, tokenizer, prompts: Sequence[list[int]], *, max_new_tokens: int = 128,
                    batch_size: int = 16, pad_id: int = 0) -> list[str]:
    """Greedy continuations (decoded text) of token-id prompts, batched by length, left-padded.

    Stops at the tokenizer's EOS only (see the module docstring); special
    tokens are left out of the text.
    """
    eos = tokenizer.eos_token_id
    gens = decoding.generate(model, prompts, max_new_tokens=max_new_tokens,
                             stop=[eos] if eos is not None else [], pad_id=pad_id, batch_size=batch_size)
    return [tokenizer.decode(g.ids, skip_special_tokens=True) for g in gens]


def __getattr__(name: str):   # score_file moved to api, which imports this module: resolved on first use
    return forward_attr(__name__, name, {"score_file": "rbridge.scoring.api"})
