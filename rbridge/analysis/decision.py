"""Decision accuracy and Kendall tau-b of proxy rankings against target results (METHOD.md section 5).

Over N candidates take every unordered pair whose target values differ; a pair is
correct when the proxy orders it as the target does, each metric in its own
direction (loss and rBridge lower-is-better, accuracy higher-is-better); a pair the
proxy ties counts half. Kendall tau-b over all pairs is reported beside it.

The same numbers as the store's ``decision_accuracy`` view, computed in Python
from the ``proxy_values`` and ``target_values`` views (the values, not the pairs),
so each checks the other. The proxy orders candidates as the stage's ``ranking``
does: more tokens first (a candidate that survived more rungs), then the metric.

:func:`accuracy_vs_compute` follows a stage rung by rung: the proxy compute spent
so far (6·N·D with N the non-embedding parameters, D the tokens seen) and the
decision accuracy reached, per metric (METHOD.md section 7's cost-accuracy curve).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Sequence

import numpy as np

from rbridge.store import Store


def _sign(d: np.ndarray) -> np.ndarray:
    return np.sign(d).astype(np.int64)


def _pair_stats_pairwise(px: np.ndarray, ty: np.ndarray, tk: np.ndarray | None) -> tuple[int, ...]:
    """(n_all, concordant, discordant, ties_x, ties_y, ties_x_only) by looking at every pair: O(n^2).

    Only for values that are not all finite (never stored by rbridge): there the signs of
    differences are not an order, so :func:`_pair_counts` does not apply; this is the
    computation pair_stats always made, kept for them.
    """
    iu, ju = np.triu_indices(len(px), k=1)
    sx = _sign(px[iu] - px[ju])
    if tk is not None:
        st = _sign(tk[iu] - tk[ju])
        sx = np.where(st != 0, st, sx)
    sy = _sign(ty[iu] - ty[ju])
    prod = sx * sy
    return (len(prod), int((prod > 0).sum()), int((prod < 0).sum()), int((sx == 0).sum()), int((sy == 0).sum()),
            int(((sx == 0) & (sy != 0)).sum()))


def _dense_ranks(*keys: np.ndarray) -> np.ndarray:
    """0-based ranks of the rows ordered by ``keys`` (first key first); equal rows share a rank."""
    n = len(keys[0])
    order = np.lexsort(keys[::-1])  # lexsort's primary key is its last
    new = np.zeros(n, dtype=bool)
    for k in keys:
        ks = k[order]
        new[1:] |= ks[1:] != ks[:-1]
    ranks = np.empty(n, dtype=np.int64)
    ranks[order] = np.cumsum(new)
    return ranks


def _tied_pairs(ranks: np.ndarray) -> int:
    """Unordered pairs that share a rank."""
    counts = np.bincount(ranks)
    return int((counts * (counts - 1) // 2).sum())


def _inversions(a: np.ndarray) -> int:
    """Pairs i < j with a[i] > a[j] (strictly), for non-negative integers ``a``: O(n log^2 n) numpy work.

    A bottom-up merge sort: at each level every element of a block's right half counts
    the elements of the block's left half above it, for all blocks in one
    ``np.searchsorted`` (each value is shifted by its block number times the value
    span, so the left halves, each sorted by the level before, form one sorted array);
    then every block is sorted for the next level.
    """
    a = np.asarray(a, dtype=np.int64)
    n = len(a)
    if n < 2:
        return 0
    span = int(a.max()) + 1
    pos = np.arange(n, dtype=np.int64)
    total, width = 0, 1
    while width < n:
        block = pos // (2 * width)
        right = (pos % (2 * width)) >= width
        keyed = block * span + a
        left = keyed[~right]
        end_of_left = np.searchsorted(left, (block[right] + 1) * span, side="left")
        total += int((end_of_left - np.searchsorted(left, keyed[right], side="right")).sum())
        a = a[np.argsort(keyed, kind="stable")]
        width *= 2
    return total


def _pair_counts(x_keys: Sequence[np.ndarray], y: np.ndarray) -> tuple[int, ...]:
    """(n_all, concordant, discordant, ties_x, ties_y, ties_x_only) over every unordered pair, in O(n log^2 n).

    x is ordered by ``x_keys`` (the first that differs decides), y by its value; a
    pair ties on x only when every key ties. Knight's method: sorted by (x, y),
    the discordant pairs are exactly the strict inversions of y; ties come from
    group sizes; the concordant pairs are what remains of the pairs ordered on both.
    """
    n = len(y)
    n_all = n * (n - 1) // 2
    if n < 2:
        return n_all, 0, 0, 0, 0, 0
    rx, ry = _dense_ranks(*x_keys), _dense_ranks(y)
    ties_x, ties_y = _tied_pairs(rx), _tied_pairs(ry)
    ties_xy = _tied_pairs(rx * (int(ry.max()) + 1) + ry)
    discordant = _inversions(ry[np.lexsort((ry, rx))])
    concordant = n_all - ties_x - ties_y + ties_xy - discordant
    return n_all, concordant, discordant, ties_x, ties_y, ties_x - ties_xy


def _stats(n: int, counts: Sequence[int]) -> dict[str, Any]:
    """pair_stats' answer from the pair counts, with the arithmetic of the ``decision_accuracy`` view
    (so both give the same floats)."""
    n_all, concordant, discordant, ties_x, ties_y, ties_x_only = counts
    n_pairs = n_all - ties_y
    acc = (concordant + 0.5 * ties_x_only) / n_pairs if n_pairs > 0 else None
    tau = ((concordant - discordant) / math.sqrt(float(n_all - ties_x) * float(n_all - ties_y))
           if n_all - ties_x > 0 and n_all - ties_y > 0 else None)
    return {"n_candidates": n, "n_pairs": n_pairs, "decision_accuracy": acc, "kendall_tau": tau,
            "concordant": concordant, "discordant": discordant, "proxy_ties_counted_half": ties_x_only,
            "target_ties": ties_y}


def pair_stats(proxy: Sequence[float], target: Sequence[float], *, proxy_higher_is_better: bool = False,
               target_higher_is_better: bool = True, proxy_tokens: Sequence[float] | None = None) -> dict[str, Any]:
    """Decision accuracy and Kendall tau-b of one proxy ordering against one target ordering.

    ``proxy[i]`` and ``target[i]`` belong to candidate i. ``proxy_tokens`` (optional):
    tokens each proxy value was measured at; more tokens ranks first, as in ``ranking``.
    Returns n_candidates, n_pairs (target values differ), decision_accuracy (proxy ties
    count half), kendall_tau (tau-b, None when either side is constant), concordant,
    discordant, proxy_ties_counted_half, target_ties.

    The pairs are counted in O(n log^2 n) (:func:`_pair_counts`), not one by one: a
    stage of 5,000 candidates has 12.5 million pairs.
    """
    px = np.asarray(proxy, dtype=float) * (1.0 if proxy_higher_is_better else -1.0)
    ty = np.asarray(target, dtype=float) * (1.0 if target_higher_is_better else -1.0)
    n = len(px)
    if len(ty) != n:
        raise ValueError("proxy and target differ in length")
    tk = None if proxy_tokens is None else np.asarray([0 if t is None else t for t in proxy_tokens], dtype=float)
    if not (np.isfinite(px).all() and np.isfinite(ty).all() and (tk is None or np.isfinite(tk).all())):
        return _stats(n, _pair_stats_pairwise(px, ty, tk))
    return _stats(n, _pair_counts([px] if tk is None else [tk, px], ty))


def _plan_filter(plan: str | None) -> tuple[str, dict]:
    return ("WHERE plan = :plan", {"plan": plan}) if plan else ("", {})


def _sql_sign(a, b) -> int:
    return 1 if a > b else -1 if a < b else 0


def decision_accuracy(store: Store, plan: str | None = None) -> list[dict[str, Any]]:
    """Rows like the ``decision_accuracy`` view, computed in Python from the values; the same numbers.

    Two bulk reads (``proxy_values``, ``target_values``) and the pairs counted in
    O(n log^2 n) per group, where the view joins every candidate with every other
    one (O(n^2): minutes on 5,000 candidates). It follows the view to the letter:
    every row carries its own metric direction, a missing token count is 0, and a
    candidate with two proxy rows in a stage (a planner run and an imported result
    under the same stage name) counts each row, but never pairs it with itself.
    """
    where, params = _plan_filter(plan)
    proxies = store.query("SELECT plan, stage, candidate, benchmark, metric, value, higher_is_better, tokens_seen "
                          f"FROM proxy_values {where}", **params)
    targets = store.query("SELECT plan, candidate, benchmark, metric, value, higher_is_better "
                          f"FROM target_values {where}", **params)
    tmap: dict[tuple, list[dict]] = defaultdict(list)
    for t in targets:
        tmap[(t["plan"], t["benchmark"], t["candidate"])].append(t)
    groups: dict[tuple, list[tuple[dict, dict]]] = defaultdict(list)
    for v in proxies:
        for t in tmap.get((v["plan"], v["benchmark"], v["candidate"]), ()):
            groups[(v["plan"], v["stage"], v["benchmark"], v["metric"], t["metric"])].append((v, t))
    out = []
    for (pl, stage, bench, pm, tm), rows in sorted(groups.items()):
        tokens = np.array([float(v["tokens_seen"] or 0) for v, _ in rows])
        px = np.array([v["value"] if v["higher_is_better"] else -v["value"] for v, _ in rows], dtype=float)
        ty = np.array([t["value"] if t["higher_is_better"] else -t["value"] for _, t in rows], dtype=float)
        if np.isfinite(px).all() and np.isfinite(ty).all() and np.isfinite(tokens).all():
            counts = list(_pair_counts([tokens, px], ty))
        else:
            counts = list(_pair_stats_pairwise(px, ty, tokens))
        by_candidate: dict[str, list[int]] = defaultdict(list)
        for i, (v, _) in enumerate(rows):
            by_candidate[v["candidate"]].append(i)
        for idx in (ix for ix in by_candidate.values() if len(ix) > 1):
            for a, i in enumerate(idx):  # the view pairs distinct candidates only: take these pairs out
                for j in idx[a + 1:]:
                    sx = _sql_sign(tokens[i], tokens[j]) or _sql_sign(px[i], px[j])
                    sy = _sql_sign(ty[i], ty[j])
                    counts[0] -= 1
                    counts[1] -= sx * sy > 0
                    counts[2] -= sx * sy < 0
                    counts[3] -= sx == 0
                    counts[4] -= sy == 0
                    counts[5] -= sx == 0 and sy != 0
        out.append({"plan": pl, "stage": stage, "benchmark": bench, "proxy_metric": pm, "target_metric": tm,
                    **_stats(len(rows), [int(c) for c in counts])})
    return out


def decision_accuracy_view(store: Store, plan: str | None = None) -> list[dict[str, Any]]:
    """The store's ``decision_accuracy`` view, sorted like :func:`decision_accuracy`."""
    where, params = _plan_filter(plan)
    return store.query(f"SELECT * FROM decision_accuracy {where} "
                       "ORDER BY plan, stage, benchmark, proxy_metric, target_metric", **params)


# ---------------------------------------------------------------------------- against compute
def _observations(store: Store, plan: str | None) -> list[dict[str, Any]]:
    """Every proxy value at every rung: planner evaluations and imported proxy results.

    Imported results have no rungs: their distinct token counts within a stage are
    the rungs (one rung when the file gives no tokens).
    """
    where, params = ("AND p.name = :plan", {"plan": plan}) if plan else ("", {})
    planner = store.query(f"""
        SELECT p.name AS plan, r.stage AS stage, r.stage_index AS stage_index, c.name AS candidate,
               e.rung AS rung, e.tokens_seen AS tokens, r.non_embedding_params AS params,
               e.benchmark AS benchmark, e.metric AS metric, e.value AS value,
               e.higher_is_better AS higher_is_better, e.id AS id
        FROM evaluations e JOIN runs r ON r.id = e.run_id JOIN candidates c ON c.id = r.candidate_id
        JOIN plans p ON p.id = r.plan_id WHERE r.superseded_by = 0 {where}""", **params)
    for o in planner:
        o["source"] = "planner"
    imported = store.query(f"""
        SELECT p.name AS plan, x.stage AS stage, x.candidate AS candidate, x.tokens AS tokens, x.params AS params,
               x.benchmark AS benchmark, x.metric AS metric, x.value AS value,
               x.higher_is_better AS higher_is_better, x.id AS id
        FROM results x JOIN plans p ON p.id = x.plan_id WHERE x.kind = 'proxy' {where}""", **params)
    levels: dict[tuple, list] = defaultdict(set)
    for o in imported:
        levels[(o["plan"], o["stage"])].add(o["tokens"] or 0)
    rung_of = {k: {t: i for i, t in enumerate(sorted(v), start=1)} for k, v in levels.items()}
    for o in imported:
        o["rung"] = rung_of[(o["plan"], o["stage"])][o["tokens"] or 0]
        o["stage_index"] = None
        o["source"] = "imported"
    return planner + imported


def accuracy_vs_compute(store: Store, plan: str | None = None) -> list[dict[str, Any]]:
    """Per plan, stage, rung, benchmark, proxy metric and target metric: compute spent and accuracy reached.

    At rung r every candidate of the stage counts with its last value at or before
    r; those dropped earlier rank below those still running (as in ``ranking``), so
    ``decision_accuracy`` is the stage's whole ranking as it stood after rung r.
    ``rung_*`` columns use only the candidates measured at rung r (equal tokens:
    the metric alone decides). ``stage_flops``: 6·N·D summed over the stage's
    candidates up to rung r; ``plan_flops`` adds the planner's earlier stages.
    """
    obs = _observations(store, plan)
    where, params = _plan_filter(plan)
    targets = store.query(f"SELECT * FROM target_values {where}", **params)
    tmap: dict[tuple, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for t in targets:
        tmap[(t["plan"], t["benchmark"])][t["metric"]].append(t)

    by_stage: dict[tuple, list[dict]] = defaultdict(list)
    for o in obs:
        by_stage[(o["plan"], o["stage"])].append(o)
    # Compute per stage and rung (all benchmarks and metrics share the tokens of a rung).
    stage_rungs: dict[tuple, list[int]] = {k: sorted({o["rung"] for o in v}) for k, v in by_stage.items()}

    def flops_at(rows: list[dict], rung: int) -> float | None:
        best: dict[str, tuple[float, float | None]] = {}
        for o in rows:
            if o["rung"] <= rung:
                tok = o["tokens"] or 0
                if o["candidate"] not in best or tok > best[o["candidate"]][0]:
                    best[o["candidate"]] = (tok, o["params"])
        if not best or any(not tok or not p for tok, p in best.values()):
            return None
        return float(sum(6.0 * p * tok for tok, p in best.values()))

    stage_total: dict[tuple, float | None] = {k: flops_at(v, max(stage_rungs[k])) for k, v in by_stage.items()}
    planner_order = sorted({(o["plan"], o["stage_index"], o["stage"]) for o in obs if o["source"] == "planner"})

    out: list[dict[str, Any]] = []
    for (pl, stage), rows in sorted(by_stage.items()):
        earlier = 0.0
        is_planner = rows[0]["source"] == "planner"
        if is_planner:
            idx = rows[0]["stage_index"]
            for p2, i2, s2 in planner_order:
                if p2 == pl and i2 < idx:
                    earlier += stage_total.get((p2, s2)) or 0.0
        series: dict[tuple, list[dict]] = defaultdict(list)
        for o in rows:
            series[(o["benchmark"], o["metric"])].append(o)
        for rung in stage_rungs[(pl, stage)]:
            sf = flops_at(rows, rung)
            for (bench, metric), srows in sorted(series.items()):
                last: dict[str, dict] = {}
                for o in sorted(srows, key=lambda o: (o["rung"], o["tokens"] or 0, o["id"])):
                    if o["rung"] <= rung:
                        last[o["candidate"]] = o
                for tmetric, trows in sorted(tmap.get((pl, bench), {}).items()):
                    tv = {t["candidate"]: t for t in trows}
                    names = sorted(c for c in last if c in tv)
                    if not names:
                        continue
                    full = pair_stats([last[c]["value"] for c in names], [tv[c]["value"] for c in names],
                                      proxy_higher_is_better=bool(last[names[0]]["higher_is_better"]),
                                      target_higher_is_better=bool(tv[names[0]]["higher_is_better"]),
                                      proxy_tokens=[last[c]["tokens"] for c in names])
                    at = [c for c in names if last[c]["rung"] == rung]
                    part = pair_stats([last[c]["value"] for c in at], [tv[c]["value"] for c in at],
                                      proxy_higher_is_better=bool(last[names[0]]["higher_is_better"]),
                                      target_higher_is_better=bool(tv[names[0]]["higher_is_better"]))
                    tokens = max((last[c]["tokens"] or 0) for c in names) or None
                    out.append({"plan": pl, "stage": stage, "rung": rung, "tokens": tokens, "benchmark": bench,
                                "proxy_metric": metric, "target_metric": tmetric,
                                "stage_flops": sf,
                                "plan_flops": (earlier + sf) if sf is not None else None,
                                "n_candidates": full["n_candidates"], "n_pairs": full["n_pairs"],
                                "decision_accuracy": full["decision_accuracy"],
                                "kendall_tau": full["kendall_tau"],
                                "rung_candidates": part["n_candidates"], "rung_pairs": part["n_pairs"],
                                "rung_decision_accuracy": part["decision_accuracy"],
                                "rung_kendall_tau": part["kendall_tau"]})
    return out


def analysis_summary(store: Store, plan: str | None = None, curve: bool = True) -> dict[str, Any]:
    """Decision accuracy, its cost-accuracy curve and the stored fits, JSON-ready.

    Meant for ``rbridge status --json`` (``info["analysis"] = analysis_summary(st, info["plan"])``)
    and ``rbridge accuracy`` (``curve=False`` for ``--no-curve``: the curve is not computed
    at all, and the key is left out). Cheap when nothing was imported: every list is
    empty. The decision accuracy rows are the ``decision_accuracy`` view's numbers,
    computed by :func:`decision_accuracy` (the view counts pairs in O(n^2)).
    """
    from sqlalchemy.exc import DBAPIError

    from rbridge.analysis.fit import stored_fits

    try:
        n_targets = store.query("SELECT COUNT(*) AS n FROM target_values"
                                + (" WHERE plan = :plan" if plan else ""), **({"plan": plan} if plan else {}))[0]["n"]
    except DBAPIError:  # a store opened read-only that predates these views
        out = {"targets": 0, "decision_accuracy": [], "accuracy_vs_compute": [], "fits": [],
               "note": "this store has no results views yet; any `rbridge ... import` adds them"}
    else:
        out = {
            "targets": n_targets,
            "decision_accuracy": decision_accuracy(store, plan) if n_targets else [],
            "accuracy_vs_compute": accuracy_vs_compute(store, plan) if n_targets and curve else [],
            "fits": stored_fits(store, plan),
            "note": "pairs whose target values differ; pairs tied on the proxy count half (METHOD.md section 5)",
        }
    if not curve:
        del out["accuracy_vs_compute"]
    return out


__all__ = ["pair_stats", "decision_accuracy", "decision_accuracy_view", "accuracy_vs_compute",
           "analysis_summary"]
