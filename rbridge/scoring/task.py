"""Task metrics of a plan's stages, per trace: accuracy (greedy generation or multiple choice) and label NLL.

A target stage measures ``accuracy`` on every benchmark (its results are the plan's
targets, METHOD.md section 5); any stage may add ``accuracy`` or ``label_nll`` with
``evaluate:``. Each function returns one value per trace, in the traces' order, with
None where the trace has nothing to measure (no label, no choices), so that the store
keeps the items aligned across runs for paired bootstraps over test items.

- ``accuracy`` with checker ``number``: the model continues ``[BOS] + question + "\\n"``
  greedily (the prompt the scorer conditions the reasoning on, ``context: question``) for
  up to :func:`answer_budget` tokens, stopping at EOS; the text up to the first blank
  line is kept and its last number compared with the gold number (the ``#### N`` of the
  label, else the label's last number, else the trace's ``answer``): 1.0 or 0.0.
  The same rule as ``rbridge score --accuracy`` (:mod:`rbridge.scoring.baselines`).
- ``accuracy`` with checker ``choices``: cloze-form multiple-choice accuracy per
  character (OLMES's ``acc_per_char``, ``acc_cloze`` of the baselines).
- ``label_nll``: the mean NLL per token of the trace's gold answer text (``label``)
  after the same context as the trace score.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from rbridge.scoring.baselines import (_requests, cloze_continuation, greedy_generate, gsm8k_check,
                                       mc_values)
from rbridge.scoring.requests import loglikelihood
from rbridge.scoring.scorer import context_text, start_token_id, text_ids
from rbridge.scoring.traces import Trace

MAX_ANSWER_TOKENS = 256


def answer_budget(tokenizer, traces: Sequence[Trace]) -> int:
    """New tokens a greedy answer may take: the longest reference answer (the label, else the reasoning
    and its answer) plus 16, at most 256. Long enough for any answer the references give, without
    generating a fixed 256 tokens for short ones."""
    longest = max(len(text_ids(tokenizer, t.label or f"{t.reasoning} The answer is {t.answer}.")) for t in traces)
    return min(MAX_ANSWER_TOKENS, longest + 16)


def number_prompts(tokenizer, traces: Sequence[Trace]) -> list[list[int]]:
    """The greedy-answer prompts of checker ``number``: ``[BOS] + question + "\\n"`` as token ids."""
    bos = start_token_id(tokenizer)
    return [[bos] + text_ids(tokenizer, context_text(t, "question", traces)) for t in traces]


def answer_room(tokenizer, traces: Sequence[Trace]) -> tuple[int, int]:
    """(longest prompt, answer budget) in tokens of greedy answers (checker ``number``) on ``traces``."""
    return max(len(p) for p in number_prompts(tokenizer, traces)), answer_budget(tokenizer, traces)


def cut_answers(longest: int, budget: int, context: int) -> str | None:
    """Why greedy answers after prompts of up to ``longest`` tokens, ``budget`` new tokens each, would be cut
    by a model of ``context`` positions (rbridge.scoring.decoding cuts a batch's budget to what its longest
    prompt leaves), or None."""
    if longest + budget <= context:
        return None
    return (f"greedy answers take up to {budget} tokens after prompts of up to {longest} tokens, but the model's "
            f"context is {context} positions: answers after the longest prompts are cut to "
            f"{max(0, context - longest)} tokens (a seq_len of {longest + budget} avoids it)")


def accuracy_items(model, tokenizer, traces: Sequence[Trace], *, checker: str, batch_size: int = 32,
                   precision: str = "auto") -> list[float | None]:
    """1.0 / 0.0 per trace (None: a trace the checker cannot grade, e.g. no choices)."""
    bos = start_token_id(tokenizer)
    pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else bos)
    if checker == "number":
        prompts = number_prompts(tokenizer, traces)
        gens = greedy_generate(model, tokenizer, prompts, max_new_tokens=answer_budget(tokenizer, traces),
                               batch_size=batch_size, pad_id=pad)
        return [1.0 if gsm8k_check(g, t) else 0.0 for g, t in zip(gens, traces)]
    if checker == "choices":
        requests = [r for r in _requests(tokenizer, traces, bos, "question", 0) if r.kind == "choice"]
        out: list[float | None] = [None] * len(traces)
        if not requests:
            return out
        loglikelihood(model, requests, batch_size=batch_size, precision=precision, pad_id=pad)
        by_trace: dict[int, list] = {}
        for r in requests:
            by_trace.setdefault(r.trace, []).append(r)
        for i, opts in by_trace.items():
            t = traces[i]
            chars = [len(cloze_continuation(t.choices[r.option])) for r in opts]
            out[i] = mc_values([r.sum_logprob for r in opts], chars, t.gold)["acc_cloze"]
        return out
    raise ValueError(f"unknown answer checker {checker!r}")


def label_nll_items(model, tokenizer, traces: Sequence[Trace], *, context: str = "question",
                    batch_size: int = 16, precision: str = "auto") -> list[float | None]:
    """Mean NLL per token of each trace's label (None without one)."""
    bos = start_token_id(tokenizer)
    pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else bos)
    requests = [r for r in _requests(tokenizer, traces, bos, context, 3) if r.kind == "label"]
    out: list[float | None] = [None] * len(traces)
    if requests:
        loglikelihood(model, requests, batch_size=batch_size, precision=precision, pad_id=pad)
        for r in requests:
            out[r.trace] = r.mean_nll
    return out


def item_mean(items: Sequence[float | None]) -> float | None:
    """The mean of the items that have a value (None if none has)."""
    vals = [v for v in items if v is not None]
    return float(np.mean(vals)) if vals else None


def item_interval(items: Sequence[float | None], level: float = 0.95, resamples: int = 1000, seed: int = 0
                  ) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean over the items that have a value (the rule of
    ``BenchmarkScore.interval``: resampled with replacement from ``seed``)."""
    vals = np.array([v for v in items if v is not None], dtype=float)
    if len(vals) < 2:
        return None
    draws = np.random.default_rng(seed).integers(0, len(vals), size=(resamples, len(vals)))
    lo, hi = np.quantile(vals[draws].mean(axis=1), [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)
