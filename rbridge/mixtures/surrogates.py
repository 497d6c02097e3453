"""Surrogates from mixture weights to a stage's score, and the choice among them by cross-validation.

Every surrogate models the score in its loss direction (lower is better: a higher-is-better metric is
negated first), on weight vectors in sorted source order (rbridge.mixtures.weights.source_order).

- ``linear``: score = b + t . w, least squares (a tiny ridge keeps it defined when the weights are
  collinear: they sum to 1).
- ``log_linear``: score = c + exp(b + t . w), the data mixing law of Ye et al. (arXiv 2403.16952) that
  olmix fits: for each offset c below the smallest score, log(score - c) is fitted linearly; the c
  with the least squared error on the scores is kept.
- ``lightgbm``: gradient-boosted trees, RegMix's surrogate (``pip install 'rbridge[mixtures]'``). With
  ``regmix_recipe`` its published settings (learning rate 1e-2, 1,000 rounds, seed 42, l1+l2 metrics);
  otherwise the same with leaves and minimum leaf sizes scaled to the data (a swarm of 24 cannot fill
  leaves of 20).
- ``auto``: the family with the best k-fold cross-validated Spearman correlation on the data given (and
  only that data: no later stage or held-out set is looked at); ties go to the simpler family.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.stats import spearmanr

from rbridge.errors import InputError

FAMILIES = ("linear", "log_linear", "lightgbm")
SURROGATES = ("auto",) + FAMILIES
RIDGE = 1e-6


def lightgbm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("lightgbm") is not None


def _design(x: np.ndarray) -> np.ndarray:
    return np.hstack([np.ones((x.shape[0], 1)), x])


def _lstsq(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    a = _design(x)
    return np.linalg.solve(a.T @ a + RIDGE * np.eye(a.shape[1]), a.T @ y)


@dataclass
class Surrogate:
    family: str
    params: dict[str, Any] = field(default_factory=dict)
    model: Any = None

    def fit(self, x: np.ndarray, y: np.ndarray) -> "Surrogate":
        if self.family == "linear":
            self.model = _lstsq(x, y)
        elif self.family == "log_linear":
            span = float(y.max() - y.min()) or 1.0
            best = None
            for frac in np.concatenate([[1e-3], np.geomspace(1e-2, 100.0, 41)]):
                c = float(y.min()) - frac * span
                coef = _lstsq(x, np.log(y - c))
                err = float(np.sum((c + np.exp(_design(x) @ coef) - y) ** 2))
                if best is None or err < best[0]:
                    best = (err, c, coef)
            _, c, coef = best
            self.model = (c, coef)
        elif self.family == "lightgbm":
            if not lightgbm_available():
                raise InputError("the lightgbm surrogate needs lightgbm: pip install 'rbridge[mixtures]'",
                                 field="--surrogate")
            import lightgbm as lgb

            # LightGBM's own training API (its scikit-learn wrapper, which RegMix used, needs scikit-learn and
            # trains the same model from the same parameters). One thread: swarms are small, and LightGBM's
            # OpenMP threads beside torch's in one process (a plan's worker) spun for 47 s on 2 cores where
            # one thread fits in 0.2 s. Results do not depend on it.
            params = dict(objective="regression", learning_rate=1e-2, seed=42, verbosity=-1, num_threads=1,
                          deterministic=True)
            if self.params.get("regmix_recipe"):  # RegMix's published settings, leaves at LightGBM's defaults
                params.update(metric=["l1", "l2"], num_leaves=31, min_data_in_leaf=20)
            else:  # the same, leaves scaled to the data (a swarm of 24 cannot fill leaves of 20)
                n = x.shape[0]
                params.update(num_leaves=max(4, min(31, n // 8)), min_data_in_leaf=max(2, min(20, n // 16)))
            self.model = lgb.train(params, lgb.Dataset(x, y, params=params), num_boost_round=1000)
        else:
            raise InputError(f"unknown surrogate {self.family!r} (one of {', '.join(SURROGATES)})",
                             field="--surrogate")
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        if self.family == "linear":
            return _design(x) @ self.model
        if self.family == "log_linear":
            c, coef = self.model
            return c + np.exp(np.clip(_design(x) @ coef, -50, 50))
        return np.asarray(self.model.predict(x), dtype=float)

    def describe(self, sources: list[str]) -> dict[str, Any]:
        """What the fit says about each source (linear and log-linear: its coefficient)."""
        if self.family == "linear":
            return {"intercept": float(self.model[0]), "coefficients": dict(zip(sources, map(float, self.model[1:])))}
        if self.family == "log_linear":
            c, coef = self.model
            return {"offset": c, "intercept": float(coef[0]), "coefficients": dict(zip(sources, map(float, coef[1:])))}
        return {"importance": dict(zip(sources, map(int, self.model.feature_importance(importance_type="split"))))}


@dataclass
class CvResult:
    family: str
    spearman: float
    rmse: float
    predictions: np.ndarray  # out-of-fold, in the input's order

    def to_json(self) -> dict[str, Any]:
        return {"surrogate": self.family, "cv_spearman": round(self.spearman, 4), "cv_rmse": round(self.rmse, 6)}


def folds(n: int, k: int, seed: int) -> list[np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    return [order[i::k] for i in range(k)]


def cross_validate(family: str, x: np.ndarray, y: np.ndarray, *, k: int = 5, seed: int = 0,
                   params: dict[str, Any] | None = None) -> CvResult:
    """Out-of-fold predictions of ``k`` folds (shuffled with ``seed``), their Spearman and RMSE against ``y``."""
    n = len(y)
    k = max(2, min(k, n))
    pred = np.empty(n)
    for test in folds(n, k, seed):
        train = np.setdiff1d(np.arange(n), test)
        pred[test] = Surrogate(family, dict(params or {})).fit(x[train], y[train]).predict(x[test])
    rho = spearmanr(pred, y).statistic if np.ptp(pred) > 0 else 0.0
    return CvResult(family, float(np.nan_to_num(rho)), float(np.sqrt(np.mean((pred - y) ** 2))), pred)


def choose(x: np.ndarray, y: np.ndarray, surrogate: str = "auto", *, k: int = 5, seed: int = 0,
           min_points: int = 6) -> tuple[Surrogate, list[CvResult]]:
    """The surrogate to use, fitted on all the data, and the cross-validation of every family tried."""
    if surrogate not in SURROGATES:
        raise InputError(f"unknown surrogate {surrogate!r} (one of {', '.join(SURROGATES)})", field="--surrogate")
    if len(y) < min_points:
        raise InputError(f"{len(y)} mixtures with a score; a surrogate needs at least {min_points}",
                         field="--stage")
    families = [surrogate] if surrogate != "auto" else [f for f in FAMILIES
                                                         if f != "lightgbm" or lightgbm_available()]
    results = [cross_validate(f, x, y, k=k, seed=seed) for f in families]
    best = max(results, key=lambda r: (round(r.spearman, 4), -FAMILIES.index(r.family)))
    return Surrogate(best.family).fit(x, y), results
