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


def pair_stats(proxy: Sequence[float], target: Sequence[float], *, proxy_higher_is_better: bool = False,
               target_higher_is_better: bool = True, proxy_tokens: Sequence[float] | None = None) -> dict[str, Any]:
    """Decision accuracy and Kendall tau-b of one proxy ordering against one target ordering.

    ``proxy[i]`` and ``target[i]`` belong to candidate i. ``proxy_tokens`` (optional):
    tokens each proxy value was measured at; more tokens ranks first, as in ``ranking``.
    Returns n_candidates, n_pairs (target values differ), decision_accuracy (proxy ties
    count half), kendall_tau (tau-b, None when either side is constant), concordant,
    discordant, proxy_ties_counted_half, target_ties.
    """
    px = np.asarray(proxy, dtype=float) * (1.0 if proxy_higher_is_better else -1.0)
    ty = np.asarray(target, dtype=float) * (1.0 if target_higher_is_better else -1.0)
    n = len(px)
    if len(ty) != n:
        raise ValueError("proxy and target differ in length")
    iu, ju = np.triu_indices(n, k=1)
    sx = _sign(px[iu] - px[ju])
    if proxy_tokens is not None:
        tk = np.asarray([0 if t is None else t for t in proxy_tokens], dtype=float)
        st = _sign(tk[iu] - tk[ju])
        sx = np.where(st != 0, st, sx)
    sy = _sign(ty[iu] - ty[ju])
    prod = sx * sy
    n_all = len(prod)
    concordant = int((prod > 0).sum())
    discordant = int((prod < 0).sum())
    ties_x = int((sx == 0).sum())
    ties_y = int((sy == 0).sum())
    ties_x_only = int(((sx == 0) & (sy != 0)).sum())
    n_pairs = n_all - ties_y
    acc = (concordant + 0.5 * ties_x_only) / n_pairs if n_pairs > 0 else None
    denom = (n_all - ties_x) * (n_all - ties_y)
    tau = (concordant - discordant) / math.sqrt(denom) if denom > 0 else None
    return {"n_candidates": n, "n_pairs": n_pairs, "decision_accuracy": acc, "kendall_tau": tau,
            "concordant": concordant, "discordant": discordant, "proxy_ties_counted_half": ties_x_only,
            "target_ties": ties_y}


def _plan_filter(plan: str | None) -> tuple[str, dict]:
    return ("WHERE plan = :plan", {"plan": plan}) if plan else ("", {})


def decision_accuracy(store: Store, plan: str | None = None) -> list[dict[str, Any]]:
    """Rows like the ``decision_accuracy`` view, computed in Python from the values."""
    where, params = _plan_filter(plan)
    proxies = store.query(f"SELECT * FROM proxy_values {where}", **params)
    targets = store.query(f"SELECT * FROM target_values {where}", **params)
    tmap: dict[tuple, list[dict]] = defaultdict(list)
    for t in targets:
        tmap[(t["plan"], t["benchmark"])].append(t)
    groups: dict[tuple, list[tuple[dict, dict]]] = defaultdict(list)
    for v in proxies:
        for t in tmap.get((v["plan"], v["benchmark"]), []):
            if t["candidate"] == v["candidate"]:
                groups[(v["plan"], v["stage"], v["benchmark"], v["metric"], t["metric"])].append((v, t))
    out = []
    for (pl, stage, bench, pm, tm), pairs in sorted(groups.items()):
        pairs.sort(key=lambda p: p[0]["candidate"])
        st = pair_stats([p[0]["value"] for p in pairs], [p[1]["value"] for p in pairs],
                        proxy_higher_is_better=bool(pairs[0][0]["higher_is_better"]),
                        target_higher_is_better=bool(pairs[0][1]["higher_is_better"]),
                        proxy_tokens=[p[0]["tokens_seen"] for p in pairs])
        out.append({"plan": pl, "stage": stage, "benchmark": bench, "proxy_metric": pm, "target_metric": tm,
                    **st})
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


def analysis_summary(store: Store, plan: str | None = None) -> dict[str, Any]:
    """Decision accuracy (view), its cost-accuracy curve and the stored fits, JSON-ready.

    Meant for ``rbridge status --json`` (``info["analysis"] = analysis_summary(st, info["plan"])``).
    Cheap when nothing was imported: every list is empty.
    """
    from sqlalchemy.exc import DBAPIError

    from rbridge.analysis.fit import stored_fits

    try:
        n_targets = store.query("SELECT COUNT(*) AS n FROM target_values"
                                + (" WHERE plan = :plan" if plan else ""), **({"plan": plan} if plan else {}))[0]["n"]
    except DBAPIError:  # a store opened read-only that predates these views
        return {"targets": 0, "decision_accuracy": [], "accuracy_vs_compute": [], "fits": [],
                "note": "this store has no results views yet; any `rbridge ... import` adds them"}
    return {
        "targets": n_targets,
        "decision_accuracy": decision_accuracy_view(store, plan) if n_targets else [],
        "accuracy_vs_compute": accuracy_vs_compute(store, plan) if n_targets else [],
        "fits": stored_fits(store, plan),
        "note": "pairs whose target values differ; pairs tied on the proxy count half (METHOD.md section 5)",
    }


__all__ = ["pair_stats", "decision_accuracy", "decision_accuracy_view", "accuracy_vs_compute",
           "analysis_summary"]
