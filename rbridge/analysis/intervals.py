"""Bootstrap intervals of decision accuracy: over test items and, for targets with several seeds, over seeds.

Every planner evaluation stores its per-trace values (``evaluation_items``), in the
benchmark file's order, so the proxies and the targets of a plan are measured on the
same items. One resample draws the benchmark's items with replacement (the same draw
for every candidate, proxy and target alike: a paired bootstrap, as the items are
shared) and, independently per candidate, its target seeds with replacement; each
candidate's proxy value and target value are recomputed as means over the drawn items
(and seeds), and decision accuracy is recounted with the rules of the
``decision_accuracy`` view (candidates that went further in the stage rank first, proxy
ties count half, pairs with equal targets are left out). The interval is the 2.5th and
97.5th percentile over ``resamples`` draws from ``seed``: the same store gives the same
interval.

Where one side has no items (imported results), that side is held fixed and only the
other is resampled. Groups of more than ``MAX_CANDIDATES`` candidates get no interval
(the pairs times the resamples would not fit in memory).
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

import numpy as np

from rbridge.store.sqlite_read import database_errors

MAX_CANDIDATES = 400
RESAMPLES = 1000
LEVEL = 0.95

_LAST_ITEMS = """
WITH last AS (
  SELECT e.id, e.run_id, e.benchmark, e.metric, e.tokens_seen, e.higher_is_better, e.value,
         ROW_NUMBER() OVER (PARTITION BY e.run_id, e.benchmark, e.metric
                            ORDER BY e.tokens_seen DESC, e.id DESC) AS rn
  FROM evaluations e
)
SELECT p.name, r.stage, r.role, r.stage_group, r.seed, r.status, c.name, l.benchmark, l.metric,
       l.tokens_seen, l.higher_is_better, i.item_values
FROM last l
JOIN evaluation_items i ON i.evaluation_id = l.id
JOIN runs r ON r.id = l.run_id
JOIN candidates c ON c.id = r.candidate_id
JOIN plans p ON p.id = r.plan_id
WHERE l.rn = 1 AND r.superseded_by = 0 {where}
"""


def _last_items(store, plan: str | None, where: str = "") -> list[tuple] | None:
    """Rows of ``_LAST_ITEMS`` (the last evaluation of every run, benchmark and metric, with its per-trace
    values) of ``plan`` (every plan if None) that also meet the SQL condition ``where``; None for a store
    without per-trace values."""
    params = {"plan": plan} if plan else {}
    try:
        return store.rows(_LAST_ITEMS.format(where=("AND p.name = :plan " if plan else "") + where), **params)
    except database_errors():
        return None


def _counts(rng: np.random.Generator, n: int, resamples: int) -> np.ndarray:
    """[resamples, n]: how often each of n items is drawn in each resample (n draws with replacement)."""
    draws = rng.integers(0, n, size=(resamples, n))
    flat = (np.arange(resamples)[:, None] * n + draws).ravel()
    return np.bincount(flat, minlength=resamples * n).reshape(resamples, n).astype(float)


def _means(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Means of each row of ``values`` [k, n] (NaN: no value) under each resample's counts [B, n] -> [k, B]."""
    have = ~np.isnan(values)
    filled = np.where(have, values, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (filled @ counts.T) / (have.astype(float) @ counts.T)


def _decision_accuracy(tokens: np.ndarray, px: np.ndarray, ty: np.ndarray,
                       pairs: np.ndarray | None = None) -> np.ndarray:
    """Decision accuracy per resample. ``tokens`` [C]; ``px``, ``ty`` [C, B] oriented higher-is-better;
    ``pairs`` [C, C] bool: only these pairs count (default: every pair)."""
    a, b = np.triu_indices(len(tokens), k=1)
    dt = np.sign(tokens[a] - tokens[b])[:, None]
    sx = np.where(dt != 0, dt, np.sign(px[a] - px[b]))
    sy = np.sign(ty[a] - ty[b])
    counted = sy != 0
    if pairs is not None:
        counted &= pairs[a, b][:, None]
    score = np.where(sx * sy > 0, 1.0, 0.0) + np.where((sx == 0) & counted, 0.5, 0.0)
    n = counted.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, (score * counted).sum(axis=0) / np.maximum(n, 1), np.nan)


def _parse(text: str) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in json.loads(text)], dtype=float)


def decision_intervals(store, plan: str | None = None, *, resamples: int = RESAMPLES, level: float = LEVEL,
                       seed: int = 0, targets: list[dict] | None = None) -> dict[tuple, dict[str, Any]]:
    """{(plan, stage, benchmark, proxy_metric, target_metric): {ci_low, ci_high, n_items, seeds, resamples}}.

    ``store`` needs only ``rows``/``query`` (a Store or the sqlite3 reader). ``targets``: rows of the
    ``target_values`` view, if already read.
    """
    rows = _last_items(store, plan)
    if rows is None:  # a store without evaluation_items (older schema, read-only): no intervals
        return {}
    if targets is None:
        tw, tp = ("WHERE plan = :plan", {"plan": plan}) if plan else ("", {})
        targets = store.query(f"SELECT * FROM target_values {tw}", **tp)
    # Proxy side: (plan, stage, benchmark, metric) -> candidate -> (tokens, oriented items)
    proxies: dict[tuple, dict[str, tuple[float, np.ndarray]]] = defaultdict(dict)
    # Target side from the planner's target stages: (plan, group, benchmark, metric) -> candidate -> [items per seed]
    planned: dict[tuple, dict[str, list[np.ndarray]]] = defaultdict(lambda: defaultdict(list))
    for pl, stage, role, group, _seed, status, cand, bench, metric, tokens, hib, text in rows:
        items = _parse(text)
        items = items if hib else -items
        if role == "target":
            if status == "done":
                planned[(pl, group or stage, bench, metric)][cand].append(items)
        else:
            proxies[(pl, stage, bench, metric)][cand] = (float(tokens or 0), items)
    tmap: dict[tuple, dict[str, dict[str, Any]]] = defaultdict(dict)  # (plan, bench, tmetric) -> cand -> row
    for t in targets:
        tmap[(t["plan"], t["benchmark"], t["metric"])][t["candidate"]] = t

    out: dict[tuple, dict[str, Any]] = {}
    for (pl, stage, bench, pm), cands in sorted(proxies.items()):
        for (tpl, tbench, tm), trows in sorted(tmap.items()):
            if tpl != pl or tbench != bench:
                continue
            names = sorted(c for c in cands if c in trows)
            if len(names) < 2 or len(names) > MAX_CANDIDATES:
                continue
            n_items = {len(cands[c][1]) for c in names}
            if len(n_items) != 1:
                continue
            n = n_items.pop()
            rng = np.random.default_rng(seed)
            counts = _counts(rng, n, resamples)
            tokens = np.array([cands[c][0] for c in names])
            px = _means(np.stack([cands[c][1] for c in names]), counts)
            ty = np.empty((len(names), resamples))
            seeds_used = 0
            for k, c in enumerate(names):
                row = trows[c]
                hib = bool(row["higher_is_better"])
                per_seed = (planned.get((pl, row.get("stage_group"), bench, tm), {}).get(c)
                            if row.get("source") == "planner" else None)
                if per_seed and all(len(s) == n for s in per_seed):
                    seeds_used = max(seeds_used, len(per_seed))
                    means = _means(np.stack(per_seed), counts)           # [S, B]
                    pick = rng.integers(0, len(per_seed), size=(resamples, len(per_seed)))
                    ty[k] = means[pick, np.arange(resamples)[:, None]].mean(axis=1)
                else:
                    value = float(row["value"])
                    ty[k] = value if hib else -value
            da = _decision_accuracy(tokens, px, ty)
            da = da[~np.isnan(da)]
            if not len(da):
                continue
            lo, hi = np.quantile(da, [(1 - level) / 2, (1 + level) / 2])
            out[(pl, stage, bench, pm, tm)] = {"ci_low": float(lo), "ci_high": float(hi), "n_items": n,
                                               "target_seeds": seeds_used, "resamples": resamples}
    return out



def target_summary(store, plan: str | None = None, *, resamples: int = RESAMPLES, level: float = LEVEL,
                   seed: int = 0) -> list[dict[str, Any]]:
    """The plan's own targets: per target stage, benchmark and candidate, the accuracy of each seed, their
    mean, and a bootstrap interval of the mean over the test items and the seeds; and, per stage and
    benchmark, which pairs of candidates every seed orders the same way (``robust``: resolved beyond
    seed noise)."""
    rows = _last_items(store, plan, "AND r.role = 'target' AND r.status = 'done' AND l.metric = 'accuracy'")
    if rows is None:  # a store without evaluation_items: nothing to summarise
        return []
    groups: dict[tuple, dict[str, dict[int, np.ndarray]]] = defaultdict(lambda: defaultdict(dict))
    for pl, _stage, _role, group, s, _status, cand, bench, _metric, _tokens, _hib, text in rows:
        groups[(pl, group, bench)][cand][s] = _parse(text)
    out = []
    for (pl, group, bench), cands in sorted(groups.items()):
        rng = np.random.default_rng(seed)
        names = sorted(cands)
        for cand in names:
            per = [cands[cand][s] for s in sorted(cands[cand])]
            values = [float(np.nanmean(v)) for v in per]
            counts = _counts(rng, len(per[0]), resamples)
            means = _means(np.stack(per), counts)
            pick = rng.integers(0, len(per), size=(resamples, len(per)))
            boot = means[pick, np.arange(resamples)[:, None]].mean(axis=1)
            lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
            out.append({"plan": pl, "stage": group, "benchmark": bench, "candidate": cand,
                        "seeds": {str(s): v for s, v in zip(sorted(cands[cand]), values)},
                        "accuracy": float(np.mean(values)), "ci_low": float(lo), "ci_high": float(hi)})
        robust = []
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                common = sorted(set(cands[a]) & set(cands[b]))
                signs = {np.sign(np.nanmean(cands[a][s]) - np.nanmean(cands[b][s])) for s in common}
                if len(common) > 1 and len(signs) == 1 and 0 not in signs:
                    robust.append(sorted((a, b)))
        for r in out:
            if (r["plan"], r["stage"], r["benchmark"]) == (pl, group, bench):
                r["robust_pairs"] = [p for p in robust if r["candidate"] in p]
    return out


__all__ = ["decision_intervals", "target_summary"]
