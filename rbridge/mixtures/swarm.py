"""The swarm: random mixtures drawn around a prior, as RegMix and olmix draw them.

Each draw is Dirichlet(strength x prior): a small strength gives sparse mixtures far from the prior
(a few sources dominate), a large one mixtures close to it; the strengths are cycled over the draws so
the swarm covers both. A weight below ``min_weight`` is set to 0 and the rest renormalised (RegMix's
minimum ratio: a proxy cannot learn from a trace of a source). A draw breaking a cap (a source's weight
above ``caps[source]``, where the cap keeps the source's tokens from repeating more than allowed at
the largest stage that trains it) is drawn again; caps no mixture can meet are refused up front.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from rbridge.errors import InputError

DEFAULT_STRENGTHS = (0.1, 0.3, 1.0, 3.0, 10.0)
MAX_TRIES_PER_DRAW = 1000


def check_caps(sources: Sequence[str], caps: Mapping[str, float] | None, min_weight: float,
               field: str = "search.max_repeats") -> np.ndarray:
    """The caps as a vector in ``sources`` order (1 where none); refuses caps no mixture can meet."""
    cap = np.array([min(1.0, float((caps or {}).get(s, 1.0))) for s in sources])
    if cap.sum() < 1.0 - 1e-9:
        detail = ", ".join(f"{s} <= {c:.3g}" for s, c in zip(sources, cap))
        raise InputError(f"no mixture can meet the caps: the weights may add up to {cap.sum():.3g} at most "
                         f"({detail}); allow more repeats or more tokens of the sources", field=field)
    if min_weight > 0 and min_weight > cap.max():
        raise InputError(f"min_weight {min_weight} is above every source's cap", field="search.min_weight")
    return cap


def _clip_small(w: np.ndarray, min_weight: float) -> np.ndarray:
    if min_weight <= 0:
        return w
    w = np.where(w < min_weight, 0.0, w)
    total = w.sum(axis=-1, keepdims=True)
    return np.divide(w, total, out=np.zeros_like(w), where=total > 0)


def draw(prior: np.ndarray, n: int, rng: np.random.Generator, *, strengths: Sequence[float] = DEFAULT_STRENGTHS,
         min_weight: float = 0.0, cap: np.ndarray | None = None, offset: int = 0,
         field: str = "search.max_repeats", unique: bool = False) -> np.ndarray:
    """``n`` mixtures (rows) in the prior's source order; draw i uses strengths[(offset + i) % len].
    ``unique``: a draw equal to an earlier one (to 6 decimals; sparse draws often give the same one-source
    mixture) is drawn again, so no two proxies of a swarm train on the same data."""
    prior = np.asarray(prior, dtype=float)
    cap = np.ones_like(prior) if cap is None else cap
    alpha_base = np.maximum(prior, 1e-6)
    out = np.empty((n, prior.size))
    seen: set[tuple] = set()
    for i in range(n):
        alpha = alpha_base * float(strengths[(offset + i) % len(strengths)])
        for _ in range(MAX_TRIES_PER_DRAW):
            w = _clip_small(rng.dirichlet(alpha), min_weight)
            key = tuple(np.round(w, 6)) if unique else None
            if w.sum() > 0 and np.all(w <= cap + 1e-12) and key not in seen:
                out[i] = w
                if unique:
                    seen.add(key)
                break
        else:
            raise InputError(f"no new draw met the caps in {MAX_TRIES_PER_DRAW} tries at strength "
                             f"{strengths[(offset + i) % len(strengths)]}: the caps (or a swarm larger than the "
                             "distinct mixtures they allow) leave too little room around this prior; loosen them "
                             "or choose another prior", field=field)
    return out


def swarm(prior: Mapping[str, float], size: int, *, seed: int, strengths: Sequence[float] = DEFAULT_STRENGTHS,
          min_weight: float = 0.0, caps: Mapping[str, float] | None = None) -> list[dict[str, float]]:
    """The swarm's mixtures, {source: weight} with zero weights left out, the same for the same inputs
    whatever the order of the prior's keys."""
    if size < 1:
        raise InputError(f"must be at least 1 (got {size})", field="search.swarm")
    sources = sorted(prior)
    p = np.array([float(prior[s]) for s in sources])
    if np.any(p < 0) or p.sum() <= 0:
        raise InputError("prior weights must be >= 0 and not all 0", field="search.prior")
    p = p / p.sum()
    cap = check_caps(sources, caps, min_weight)
    rows = draw(p, size, np.random.default_rng(seed), strengths=strengths, min_weight=min_weight, cap=cap,
                unique=True)
    return [{s: float(w) for s, w in zip(sources, row) if w > 0} for row in rows]
