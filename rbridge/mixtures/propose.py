"""Mixtures proposed from a surrogate, within the repetition caps.

- ``regmix``: RegMix's rule. Draw many mixtures around the prior (the swarm's own sampler and
  strengths), predict each, and average the ``top_k`` best predicted: an average of good regions rather
  than one lucky corner of the surrogate. Caps are box constraints, so the average of mixtures within
  them is within them.
- ``near_prior``: the best predicted of the same draws whose KL divergence from the prior is at most
  ``kl_bound`` (by default the median divergence of the swarm the surrogate was fitted on, the region it
  saw): an optimum held near the prior, as olmix holds its proposals, so that a surrogate is not trusted
  where it has no data. A third and later proposal halves the bound each time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from rbridge.mixtures.surrogates import Surrogate
from rbridge.mixtures.swarm import DEFAULT_STRENGTHS, draw
from rbridge.mixtures.weights import kl


@dataclass
class Proposal:
    name: str
    rule: str
    weights: dict[str, float]
    predicted: float
    kl_from_prior: float

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "rule": self.rule, "weights": self.weights,
                "predicted": round(self.predicted, 6), "kl_from_prior": round(self.kl_from_prior, 4)}


def _weights(sources: list[str], w: np.ndarray) -> dict[str, float]:
    return {s: round(float(v), 6) for s, v in zip(sources, w) if v > 1e-6}


def propose(surrogate: Surrogate, sources: list[str], prior: np.ndarray, cap: np.ndarray, *, n: int = 2,
            seed: int = 0, samples: int = 20000, top_k: int = 100, strengths=DEFAULT_STRENGTHS,
            min_weight: float = 0.0, kl_bound: float | None = None, fitted: np.ndarray | None = None,
            prefix: str = "proposed", field: str = "search.max_repeats") -> list[Proposal]:
    """``n`` proposals (regmix first, then near_prior with halving bounds). ``fitted``: the swarm's mixtures,
    whose median divergence from the prior is the default bound."""
    rng = np.random.default_rng(seed)
    cand = draw(prior, samples, rng, strengths=strengths, min_weight=min_weight, cap=cap, field=field)
    pred = surrogate.predict(cand)
    div = kl(cand, prior)
    if kl_bound is None:
        kl_bound = float(np.median(kl(fitted, prior))) if fitted is not None and len(fitted) else float(np.median(div))
    out: list[Proposal] = []
    best = np.argsort(pred)[:top_k]
    w = cand[best].mean(axis=0)
    out.append(Proposal(f"{prefix}-1", "regmix", _weights(sources, w), float(surrogate.predict(w[None])[0]),
                        float(kl(w, prior)[0])))
    bound = kl_bound
    while len(out) < n:
        inside = np.flatnonzero(div <= bound)
        if inside.size == 0:
            inside = np.array([int(np.argmin(div))])
        i = int(inside[np.argmin(pred[inside])])
        out.append(Proposal(f"{prefix}-{len(out) + 1}", f"near_prior (KL <= {bound:.3g})",
                            _weights(sources, cand[i]), float(pred[i]), float(div[i])))
        bound /= 2
    return out[:n]
