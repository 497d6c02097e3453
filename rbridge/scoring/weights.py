"""Token weights of the rBridge score (METHOD.md section 2), pure numpy.

Three steps, each a function:

1. :func:`letter_weights` -- every character of the reasoning inherits
   ``exp(logprob)`` of the frontier token whose text contains it. Frontier
   tokens with empty text (allowed: e.g. the first half of a character split
   over two tokens, see ``generate.py``) give no character a weight.
2. :func:`token_weights` -- a proxy token covering characters ``[s, e)`` of the
   reasoning (the tokenizer's character offsets) weighs the mean of the letter
   weights over those characters. Byte-level tokenizers that split one
   multi-byte character over several tokens report offsets that all include
   that character, so those tokens share it: each averages its weight in.
   A zero-width token (``s == e``, e.g. a byte-fallback piece or a marker
   token) takes the letter weight of the character at ``s`` (the character it
   sits in front of); at the very end of the text it takes the last
   character's weight.
3. :func:`minmax` -- ``(w - min) / (max - min)``; when all weights are equal
   every normalized weight is 1. Applied per trace (the published algorithm,
   the default) or over all tokens of a benchmark (:func:`minmax_benchmark`,
   the draft reading).

Everything is float64 with no clipping and no epsilon; a token whose characters
all weigh the same gets exactly that weight, so equal weights stay equal.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


def letter_weights(token_texts: Sequence[str], logprobs: Sequence[float]) -> np.ndarray:
    """Weight per character of ``"".join(token_texts)``: exp(logprob) of its token."""
    if len(token_texts) != len(logprobs):
        raise ValueError("token_texts and logprobs differ in length")
    lengths = np.fromiter((len(t) for t in token_texts), dtype=np.int64, count=len(token_texts))
    probs = np.exp(np.asarray(logprobs, dtype=np.float64))
    return np.repeat(probs, lengths)


def token_weights(letters: np.ndarray, offsets: Iterable[tuple[int, int]]) -> np.ndarray:
    """Mean letter weight over each proxy token's character span ``[s, e)``.

    ``letters`` comes from :func:`letter_weights`; ``offsets`` are the proxy
    tokenizer's character offsets into the same reasoning text.
    """
    letters = np.asarray(letters, dtype=np.float64)
    n = letters.shape[0]
    if n == 0:
        raise ValueError("empty reasoning has no letter weights")
    offs = np.asarray(list(offsets), dtype=np.int64).reshape(-1, 2)
    starts, ends = offs[:, 0], offs[:, 1]
    if (starts < 0).any() or (ends > n).any() or (ends < starts).any():
        raise ValueError(f"token offsets outside the text of {n} characters")
    width = ends - starts
    out = np.empty(len(offs), dtype=np.float64)
    wide = width > 0
    if wide.any():
        # Mean as first letter + mean of differences from it: a span of equal
        # letter weights gets exactly that weight (a plain sum / n can be off
        # in the last bit, and MinMax would then turn equal weights into 0 and 1).
        s, w = starts[wide], width[wide]
        seg = np.concatenate([[0], np.cumsum(w)[:-1]])
        idx = np.repeat(s - seg, w) + np.arange(int(w.sum()))
        base = letters[s]
        diffs = letters[idx] - np.repeat(base, w)
        out[wide] = base + np.add.reduceat(diffs, seg) / w
    zero = ~wide
    out[zero] = letters[np.minimum(starts[zero], n - 1)]
    return out


def minmax(weights: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """MinMax-normalize; ``lo``/``hi`` default to the weights' own min and max.

    When ``hi == lo`` (all weights equal) every normalized weight is 1.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.size == 0:
        return w.copy()
    lo = float(w.min()) if lo is None else float(lo)
    hi = float(w.max()) if hi is None else float(hi)
    if hi == lo:
        return np.ones_like(w)
    return (w - lo) / (hi - lo)


def minmax_benchmark(per_trace: Sequence[np.ndarray]) -> list[np.ndarray]:
    """MinMax over all tokens of all traces of one benchmark (the draft reading)."""
    nonempty = [np.asarray(w, dtype=np.float64) for w in per_trace if len(w)]
    if not nonempty:
        return [np.asarray(w, dtype=np.float64).copy() for w in per_trace]
    lo = min(float(w.min()) for w in nonempty)
    hi = max(float(w.max()) for w in nonempty)
    return [minmax(w, lo, hi) for w in per_trace]


def normalize(per_trace: Sequence[np.ndarray], mode: str) -> list[np.ndarray]:
    """Apply ``mode`` = ``"trace"`` | ``"benchmark"`` | ``"none"`` to a benchmark's weights."""
    if mode == "trace":
        return [minmax(w) for w in per_trace]
    if mode == "benchmark":
        return minmax_benchmark(per_trace)
    if mode == "none":
        return [np.asarray(w, dtype=np.float64).copy() for w in per_trace]
    raise ValueError(f"minmax must be trace, benchmark or none, not {mode!r}")


def trace_token_weights(token_texts: Sequence[str], logprobs: Sequence[float],
                        offsets: Iterable[tuple[int, int]]) -> np.ndarray:
    """Steps 1 and 2 together: raw (un-normalized) proxy token weights of one trace."""
    return token_weights(letter_weights(token_texts, logprobs), offsets)
