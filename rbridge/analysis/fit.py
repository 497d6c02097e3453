"""Predicting the target from the proxy: target = g(proxy metric) (METHOD.md section 6).

g comes from a fixed hypothesis space (linear, logarithmic, quadratic,
exponential) and is chosen by training R^2 on all points; a family with more
parameters must beat a simpler one by more than ``TIE_R2`` (so a quadratic does
not win over a straight line by fitting noise). The chosen family is then
cross-validated with k-fold CV (folds fixed by the seed): mean training R^2 and
mean test MAE in the target's units. Out-of-fold residuals give the prediction
intervals of ``rbridge predict``.

Points: one per candidate with a target value and a proxy value on the same
benchmark, at equal proxy tokens (the stage's largest token count, so candidates
dropped at an earlier rung are left out).
"""

from __future__ import annotations

import json
import math
import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from sqlmodel import select

from rbridge.analysis.stored import stored_fits  # noqa: F401 - read here by predict_store, and by callers
from rbridge.errors import InputError
from rbridge.store import Fit, Plan, Store

FAMILIES = ("linear", "logarithmic", "quadratic", "exponential")  # simplest first
N_PARAMS = {"linear": 2, "logarithmic": 2, "quadratic": 3, "exponential": 3}
FORMULAS = {"linear": "a*x + b", "logarithmic": "a*ln(x) + b", "quadratic": "a*x^2 + b*x + c",
            "exponential": "a*exp(b*(x - x0)) + c"}
TIE_R2 = 1e-4
MIN_POINTS = 5


# ---------------------------------------------------------------------------- the families
def predict_family(family: str, params: dict[str, float], x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=float)
    p = params
    if family == "linear":
        return p["a"] * x + p["b"]
    if family == "quadratic":
        return p["a"] * x * x + p["b"] * x + p["c"]
    if family == "logarithmic":
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(x > 0, p["a"] * np.log(np.where(x > 0, x, 1.0)) + p["b"], np.nan)
    if family == "exponential":
        with np.errstate(over="ignore"):
            return p["a"] * np.exp(p["b"] * (x - p["x0"])) + p["c"]
    raise ValueError(f"unknown family {family}")


def _lstsq(cols: list[np.ndarray], y: np.ndarray) -> tuple[np.ndarray, float]:
    A = np.column_stack(cols)
    coef, *_ = np.linalg.lstsq(A, y, rcond=None)
    r = y - A @ coef
    return coef, float(r @ r)


def fit_family(family: str, x: np.ndarray, y: np.ndarray) -> dict[str, float] | None:
    """Least-squares parameters of one family, or None where it does not apply (log of x <= 0)."""
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    if family == "linear":
        a, b = np.polyfit(x, y, 1)
        return {"a": float(a), "b": float(b)}
    if family == "quadratic":
        a, b, c = np.polyfit(x, y, 2)
        return {"a": float(a), "b": float(b), "c": float(c)}
    if family == "logarithmic":
        if np.any(x <= 0):
            return None
        a, b = np.polyfit(np.log(x), y, 1)
        return {"a": float(a), "b": float(b)}
    if family == "exponential":
        x0 = float(np.mean(x))
        scale = float(np.std(x)) or 1.0
        ones = np.ones_like(x)
        best: tuple[float, float, float, float] | None = None
        # Variable projection: for a fixed rate the model is linear in (a, c); scan the rate, then refine.
        for k in np.concatenate([-np.geomspace(8, 0.02, 30), np.geomspace(0.02, 8, 30)]):
            b = k / scale
            e = np.exp(b * (x - x0))
            (a, c), sse = _lstsq([e, ones], y)
            if best is None or sse < best[0]:
                best = (sse, float(a), float(b), float(c))
        _, a, b, c = best
        f: Callable = lambda xx, a_, b_, c_: a_ * np.exp(b_ * (xx - x0)) + c_  # noqa: E731
        # Imported here, not with the module: scipy.optimize takes about a second to import, and
        # `rbridge accuracy` and `status --json` read stored fits through this module without fitting.
        from scipy.optimize import OptimizeWarning, curve_fit

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", OptimizeWarning)
                warnings.simplefilter("ignore", RuntimeWarning)
                popt, _ = curve_fit(f, x, y, p0=(a, b, c), maxfev=5000)
            if np.all(np.isfinite(popt)) and _sse(f(x, *popt), y) <= best[0]:
                a, b, c = (float(v) for v in popt)
        except (RuntimeError, ValueError):
            pass
        return {"a": a, "b": b, "c": c, "x0": x0}
    raise ValueError(f"unknown family {family}")


def _sse(pred: np.ndarray, y: np.ndarray) -> float:
    r = y - pred
    return float(r @ r)


def r2(pred: np.ndarray, y: np.ndarray) -> float | None:
    y = np.asarray(y, dtype=float)
    sst = float(((y - y.mean()) ** 2).sum())
    if sst == 0 or not np.all(np.isfinite(pred)):
        return None
    return 1.0 - _sse(np.asarray(pred, dtype=float), y) / sst


@dataclass
class FitResult:
    family: str
    params: dict[str, float]
    n_points: int
    train_r2: float
    families: dict[str, float | None]
    cv_train_r2: float | None
    cv_test_mae: float | None
    cv_residuals: list[float]
    folds: int
    seed: int

    @property
    def formula(self) -> str:
        return FORMULAS[self.family]

    def predict(self, x) -> np.ndarray:
        return predict_family(self.family, self.params, np.asarray(x, dtype=float))


def choose_family(x: np.ndarray, y: np.ndarray, families=FAMILIES) -> tuple[str, dict[str, float], dict]:
    """The family with the best training R^2 (simplest within TIE_R2 of the best)."""
    scores: dict[str, float | None] = {}
    fitted: dict[str, dict[str, float]] = {}
    for fam in families:
        p = fit_family(fam, x, y)
        if p is None:
            scores[fam] = None
            continue
        fitted[fam] = p
        scores[fam] = r2(predict_family(fam, p, x), y)
    valid = {f: s for f, s in scores.items() if s is not None}
    if not valid:
        raise InputError("no family fits these points (are the target values all equal?)")
    best = max(valid.values())
    for fam in sorted(valid, key=lambda f: (N_PARAMS[f], FAMILIES.index(f))):
        if valid[fam] >= best - TIE_R2:
            return fam, fitted[fam], scores
    raise AssertionError("unreachable")


def fit_curve(x, y, *, folds: int = 5, seed: int = 0, families=FAMILIES) -> FitResult:
    """Choose g by training R^2 on all points, then k-fold cross-validate that family."""
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    n = len(x)
    if n < MIN_POINTS:
        raise InputError(f"{n} points; a fit with {folds}-fold cross-validation needs at least {MIN_POINTS}")
    family, params, scores = choose_family(x, y, families)
    k = min(folds, n)
    order = np.random.default_rng(seed).permutation(n)
    train_r2s, maes, residuals = [], [], np.full(n, np.nan)
    for test in np.array_split(order, k):
        train = np.setdiff1d(order, test)
        p = fit_family(family, x[train], y[train])
        if p is None:
            continue
        tr = r2(predict_family(family, p, x[train]), y[train])
        if tr is not None:
            train_r2s.append(tr)
        pred = predict_family(family, p, x[test])
        maes.append(float(np.mean(np.abs(y[test] - pred))))
        residuals[test] = y[test] - pred
    return FitResult(family=family, params=params, n_points=n,
                     train_r2=r2(predict_family(family, params, x), y) or 0.0, families=scores,
                     cv_train_r2=float(np.mean(train_r2s)) if train_r2s else None,
                     cv_test_mae=float(np.mean(maes)) if maes else None,
                     cv_residuals=[float(r) for r in residuals if np.isfinite(r)], folds=k, seed=seed)


# ---------------------------------------------------------------------------- the store
def _plan_row(store: Store, plan: str | None) -> Plan:
    from rbridge.analysis.results_io import resolve_plan

    with store.session() as s:
        row, _ = resolve_plan(s, store, plan, create=False)
        return row


def fit_points(store: Store, plan: str) -> dict[tuple, dict[str, Any]]:
    """(stage, benchmark, x_metric, target_metric) -> candidates, x, y and directions.

    x: the proxy value at the stage's largest token count (equal tokens); y: the target value.
    """
    proxies = store.query("SELECT * FROM proxy_values WHERE plan = :plan", plan=plan)
    targets = store.query("SELECT * FROM target_values WHERE plan = :plan", plan=plan)
    top: dict[tuple, int] = {}
    for v in proxies:
        k = (v["stage"], v["benchmark"], v["metric"])
        top[k] = max(top.get(k, 0), v["tokens_seen"] or 0)
    tmap: dict[str, list[dict]] = defaultdict(list)
    for t in targets:
        tmap[t["benchmark"]].append(t)
    out: dict[tuple, dict[str, Any]] = {}
    for v in sorted(proxies, key=lambda v: v["candidate"]):
        if (v["tokens_seen"] or 0) != top[(v["stage"], v["benchmark"], v["metric"])]:
            continue
        for t in tmap.get(v["benchmark"], []):
            if t["candidate"] != v["candidate"]:
                continue
            g = out.setdefault((v["stage"], v["benchmark"], v["metric"], t["metric"]),
                               {"candidates": [], "x": [], "y": [], "x_hib": bool(v["higher_is_better"]),
                                "y_hib": bool(t["higher_is_better"])})
            g["candidates"].append(v["candidate"])
            g["x"].append(float(v["value"]))
            g["y"].append(float(t["value"]))
    return out


def fit_store(store: Store, plan: str | None = None, *, benchmark: str | None = None, x_metric: str | None = None,
              stage: str | None = None, target_metric: str | None = None, folds: int = 5,
              seed: int = 0) -> list[dict[str, Any]]:
    """Fit g for every (benchmark, stage, proxy metric, target metric) that matches; store and return the rows.

    Groups with fewer than MIN_POINTS points are returned with ``skipped`` and not stored.
    """
    plan_row = _plan_row(store, plan)
    groups = fit_points(store, plan_row.name)
    rows = []
    for (stg, bench, xm, tm), g in sorted(groups.items()):
        if (benchmark and bench != benchmark) or (x_metric and xm != x_metric) or (stage and stg != stage) \
                or (target_metric and tm != target_metric):
            continue
        base = {"plan": plan_row.name, "benchmark": bench, "stage": stg, "x_metric": xm, "target_metric": tm,
                "n_points": len(g["x"])}
        try:
            res = fit_curve(g["x"], g["y"], folds=folds, seed=seed)
        except InputError as exc:
            rows.append({**base, "skipped": exc.message})
            continue
        fit = Fit(plan_id=plan_row.id, benchmark=bench, stage=stg, x_metric=xm, x_higher_is_better=g["x_hib"],
                  target_metric=tm, target_higher_is_better=g["y_hib"], family=res.family, formula=res.formula,
                  params=json.dumps(res.params), n_points=res.n_points, train_r2=res.train_r2,
                  cv_train_r2=res.cv_train_r2, cv_test_mae=res.cv_test_mae,
                  cv_residuals=json.dumps(res.cv_residuals), families=json.dumps(res.families), folds=res.folds,
                  seed=seed)
        with store.session() as s:
            for old in s.exec(select(Fit).where(Fit.plan_id == plan_row.id, Fit.benchmark == bench,
                                                Fit.stage == stg, Fit.x_metric == xm,
                                                Fit.target_metric == tm)).all():
                s.delete(old)
            s.add(fit)
        spread = float(np.max(g["y"]) - np.min(g["y"]))
        row = {**base, "family": res.family, "formula": res.formula, "params": res.params,
               "train_r2": res.train_r2, "cv_train_r2": res.cv_train_r2, "cv_test_mae": res.cv_test_mae,
               "families": res.families, "folds": res.folds, "seed": seed, "target_range": spread}
        if res.cv_test_mae is not None and res.cv_test_mae > spread:
            # Out of fold, g misses by more than the targets differ: it ranks nothing.
            row["warning"] = (f"{bench}/{tm} from {stg}/{xm}: the {res.family} fit's CV test MAE "
                              f"{res.cv_test_mae:.4g} exceeds the targets' range {spread:.4g}; its predictions "
                              "are no better than a constant")
        rows.append(row)
    if not rows:
        raise InputError("nothing to fit: no candidate has both a proxy value and a target value on the same "
                         "benchmark" + (" (after the filters)" if any((benchmark, x_metric, stage, target_metric))
                                        else "; import targets with `rbridge targets import`"), file=store.url)
    return rows


def _clip_for(metric: str):
    """Clip to [0, 1] for target metrics that are proportions (accuracy, acc_norm, pass@k, exact match, F1)."""
    name = metric.lower()
    if "acc" in name or name.startswith("pass@") or name in ("exact_match", "em", "f1"):
        return lambda v: min(1.0, max(0.0, v))
    return lambda v: v


def predict_store(store: Store, plan: str | None = None, *, benchmark: str | None = None,
                  x_metric: str | None = None, stage: str | None = None, level: float = 0.9) -> list[dict[str, Any]]:
    """Apply every stored g (matching the filters) to the candidates with a proxy value but no target.

    Per fit: candidates ranked by predicted target (in the target's direction), each
    with an interval: the prediction plus the (1-level)/2 and (1+level)/2 quantiles of
    the out-of-fold residuals, clipped to [0, 1] for proportions (accuracy, pass@k, ...).
    Candidates without a target whose value is at fewer tokens than the fit's (pruned
    before the stage's last rung) are listed unranked, with ``why``.
    """
    plan_row = _plan_row(store, plan)
    fits = [f for f in stored_fits(store, plan_row.name)
            if not ((benchmark and f["benchmark"] != benchmark) or (x_metric and f["x_metric"] != x_metric)
                    or (stage and f["stage"] != stage))]
    if not fits:
        raise InputError("no stored fit" + (" matches" if any((benchmark, x_metric, stage)) else "")
                         + "; run `rbridge fit` first", file=store.url)
    proxies = store.query("SELECT * FROM proxy_values WHERE plan = :plan", plan=plan_row.name)
    targets = store.query("SELECT * FROM target_values WHERE plan = :plan", plan=plan_row.name)
    have = {(t["candidate"], t["benchmark"], t["metric"]) for t in targets}
    out = []
    for f in fits:
        rows = [v for v in proxies if v["stage"] == f["stage"] and v["benchmark"] == f["benchmark"]
                and v["metric"] == f["x_metric"]
                and (v["candidate"], f["benchmark"], f["target_metric"]) not in have]
        top = max(((v["tokens_seen"] or 0) for v in proxies if v["stage"] == f["stage"]
                   and v["benchmark"] == f["benchmark"] and v["metric"] == f["x_metric"]), default=0)
        res = np.asarray(f["cv_residuals"], dtype=float)
        lo_q, hi_q = ((float(np.quantile(res, (1 - level) / 2)), float(np.quantile(res, (1 + level) / 2)))
                      if len(res) else (0.0, 0.0))
        clip = _clip_for(f["target_metric"])
        preds = []
        for v in rows:
            if (v["tokens_seen"] or 0) != top:
                # Stopped (pruned) before the stage's last rung: its value is at fewer tokens than the
                # values g was fitted on, so g says nothing about it.
                preds.append({"candidate": v["candidate"], "x": v["value"], "predicted": None, "low": None,
                              "high": None, "why": f"stopped at {v['tokens_seen'] or 0:,} tokens; g was fitted "
                                                   f"on values at {top:,}"})
                continue
            p = float(predict_family(f["family"], f["params"], np.array([v["value"]]))[0])
            ok = math.isfinite(p)
            preds.append({"candidate": v["candidate"], "x": v["value"], "predicted": clip(p) if ok else None,
                          "low": clip(p + lo_q) if ok else None, "high": clip(p + hi_q) if ok else None})
        sign = -1.0 if f["target_higher_is_better"] else 1.0
        preds.sort(key=lambda r: (r["predicted"] is None, sign * (r["predicted"] or 0.0), r["candidate"]))
        for i, r in enumerate(preds, start=1):
            r["rank"] = i if r["predicted"] is not None else None
        out.append({"plan": plan_row.name, "benchmark": f["benchmark"], "stage": f["stage"],
                    "x_metric": f["x_metric"], "target_metric": f["target_metric"],
                    "target_higher_is_better": f["target_higher_is_better"], "family": f["family"],
                    "formula": f["formula"], "params": f["params"], "cv_test_mae": f["cv_test_mae"],
                    "interval": f"{level:.0%} from out-of-fold CV residuals", "predictions": preds})
    return out


__all__ = ["FAMILIES", "fit_family", "predict_family", "choose_family", "fit_curve", "fit_points", "fit_store",
           "stored_fits", "predict_store", "r2", "FitResult"]
