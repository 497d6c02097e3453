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
from bisect import bisect_right
from collections import Counter, defaultdict
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from rbridge.store.db import Store


def _sign(a: Any, b: Any) -> int:
    """-1, 0 or 1 as SQL's CASE WHEN a > b THEN 1 WHEN a < b THEN -1 ELSE 0 (NaN, like NULL, ties)."""
    return 1 if a > b else -1 if a < b else 0


def _pair_counts_pairwise(x: Sequence, y: Sequence) -> list[int]:
    """[n_all, concordant, discordant, ties_x, ties_y, ties_x_only] by looking at every pair: O(n^2).

    Only where a value is NaN (a store cannot hold one: SQLite stores NULL, and the
    value columns are NOT NULL): NaN compares as tied with everything, which is no
    order, so :func:`_pair_counts` does not apply. Also the test suite's reference.
    """
    counts = [0] * 6
    n = len(y)
    for i in range(n):
        for j in range(i + 1, n):
            sx, sy = _sign(x[i], x[j]), _sign(y[i], y[j])
            counts[0] += 1
            counts[1] += sx * sy > 0
            counts[2] += sx * sy < 0
            counts[3] += sx == 0
            counts[4] += sy == 0
            counts[5] += sx == 0 and sy != 0
    return counts


def _dense_ranks(keys: Sequence) -> list[int]:
    """0-based ranks of ``keys`` in sorted order; equal keys share a rank."""
    ranks = [0] * len(keys)
    rank, prev = -1, None
    for i in sorted(range(len(keys)), key=keys.__getitem__):
        if rank < 0 or keys[i] != prev:
            rank, prev = rank + 1, keys[i]
        ranks[i] = rank
    return ranks


def _tied_pairs(ranks: Sequence[int]) -> int:
    """Unordered pairs that share a rank."""
    return sum(c * (c - 1) // 2 for c in Counter(ranks).values())


def _inversions(a: Sequence[int]) -> int:
    """Pairs i < j with a[i] > a[j] (strictly): O(n log^2 n), in C where it counts.

    A bottom-up merge sort: at each level every element of a block's right half counts
    the elements of the (sorted) left half above it with a bisection, and the block is
    sorted for the next level (two sorted runs: one linear merge inside ``list.sort``).
    """
    a = list(a)
    n, total, width = len(a), 0, 1
    while width < n:
        merged: list[int] = []
        for lo in range(0, n, 2 * width):
            left, right = a[lo:lo + width], a[lo + width:lo + 2 * width]
            if right:
                nl = len(left)
                total += sum(nl - bisect_right(left, v) for v in right)
                left += right
                left.sort()
            merged += left
        a, width = merged, width * 2
    return total


def _pair_counts(x: Sequence, y: Sequence) -> list[int]:
    """[n_all, concordant, discordant, ties_x, ties_y, ties_x_only] over every unordered pair: O(n log^2 n).

    ``x[i]`` and ``y[i]`` are candidate i's keys, ordered as Python orders them (a tuple
    key: the first item that differs decides); no NaN. Knight's method: sorted by
    (x, y), the discordant pairs are exactly the strict inversions of y; ties come
    from group sizes; the concordant pairs are what remains of the pairs ordered on
    both sides. A stage of 5,000 candidates has 12.5 million pairs: milliseconds here,
    minutes one by one.
    """
    n = len(y)
    n_all = n * (n - 1) // 2
    rx, ry = _dense_ranks(x), _dense_ranks(y)
    ties_x, ties_y = _tied_pairs(rx), _tied_pairs(ry)
    ties_xy = _tied_pairs(list(zip(rx, ry)))
    discordant = _inversions([ry[i] for i in sorted(range(n), key=lambda i: (rx[i], ry[i]))])
    concordant = n_all - ties_x - ties_y + ties_xy - discordant
    return [n_all, concordant, discordant, ties_x, ties_y, ties_x - ties_xy]


def _counts(x: Sequence, y: Sequence[float]) -> list[int]:
    """:func:`_pair_counts`, or the pairwise count where a NaN makes the values no order."""
    flat = [p for v in x for p in v] if x and isinstance(x[0], tuple) else x
    if any(map(math.isnan, flat)) or any(map(math.isnan, y)):
        return _pair_counts_pairwise(x, y)
    return _pair_counts(x, y)


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

    The pairs are counted in O(n log^2 n) (:func:`_pair_counts`), not one by one, in
    plain Python: importing numpy would take longer than counting.
    """
    px = [float(v) if proxy_higher_is_better else -float(v) for v in proxy]
    ty = [float(v) if target_higher_is_better else -float(v) for v in target]
    if len(ty) != len(px):
        raise ValueError("proxy and target differ in length")
    x: list = px if proxy_tokens is None else [(0 if t is None else t, v) for t, v in zip(proxy_tokens, px)]
    return _stats(len(px), _counts(x, ty))


def _plan_filter(plan: str | None) -> tuple[str, dict]:
    return ("WHERE plan = :plan", {"plan": plan}) if plan else ("", {})


def _target_rows(store: Store, plan: str | None) -> list[tuple]:
    """(plan, candidate, benchmark, metric, value, higher_is_better) of every target value."""
    where, params = _plan_filter(plan)
    return store.rows("SELECT plan, candidate, benchmark, metric, value, higher_is_better "
                      f"FROM target_values {where}", **params)


def decision_accuracy(store: Store, plan: str | None = None,
                      targets: list[tuple] | None = None) -> list[dict[str, Any]]:
    """Rows like the ``decision_accuracy`` view, computed in Python from the values; the same numbers.

    Two bulk reads (``proxy_values``; ``target_values``, unless ``targets`` already holds
    :func:`_target_rows`) and the pairs counted in O(n log^2 n) per group, where the
    view joins every candidate with every other one (O(n^2): minutes on 5,000
    candidates). It follows the view to the letter: every row carries its own metric
    direction, a missing token count is 0, and a candidate with two proxy rows in a
    stage (a planner run and an imported result under the same stage name) counts each
    row, but never pairs it with itself.
    """
    where, params = _plan_filter(plan)
    proxies = store.rows("SELECT plan, stage, candidate, benchmark, metric, value, higher_is_better, tokens_seen "
                         f"FROM proxy_values {where}", **params)
    tmap: dict[tuple, list[tuple]] = defaultdict(list)  # (plan, benchmark, candidate) -> (metric, oriented value)
    for pl, cand, bench, metric, value, hib in (_target_rows(store, plan) if targets is None else targets):
        tmap[(pl, bench, cand)].append((metric, value if hib else -value))
    # (plan, stage, benchmark, proxy metric, target metric) -> (candidate, (tokens, oriented proxy), target)
    groups: dict[tuple, list[tuple]] = defaultdict(list)
    for pl, stage, cand, bench, metric, value, hib, tokens in proxies:
        x = (tokens or 0, value if hib else -value)
        for tmetric, y in tmap.get((pl, bench, cand), ()):
            groups[(pl, stage, bench, metric, tmetric)].append((cand, x, y))
    out = []
    for (pl, stage, bench, pm, tm), rows in sorted(groups.items()):
        x = [r[1] for r in rows]
        y = [r[2] for r in rows]
        counts = _counts(x, y)
        by_candidate: dict[str, list[int]] = defaultdict(list)
        for i, r in enumerate(rows):
            by_candidate[r[0]].append(i)
        for idx in (ix for ix in by_candidate.values() if len(ix) > 1):
            # The view pairs distinct candidates only: take a candidate's pairs with itself out.
            own = _pair_counts_pairwise([x[i] for i in idx], [y[i] for i in idx])
            counts = [c - o for c, o in zip(counts, own)]
        out.append({"plan": pl, "stage": stage, "benchmark": bench, "proxy_metric": pm, "target_metric": tm,
                    **_stats(len(rows), counts)})
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
        JOIN plans p ON p.id = r.plan_id WHERE r.superseded_by = 0 AND r.role <> 'target' {where}""", **params)
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
    candidates up to rung r; ``plan_flops`` adds the planner's earlier stages;
    ``target_flops``: 6·N·D of the targets (per candidate and seed, where their size
    and tokens are known) and ``target_compute_ratio`` = target_flops / plan_flops.
    """
    obs = _observations(store, plan)
    where, params = _plan_filter(plan)
    targets = store.query(f"SELECT * FROM target_values {where}", **params)
    tmap: dict[tuple, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for t in targets:
        tmap[(t["plan"], t["benchmark"])][t["metric"]].append(t)
    # What the targets cost: 6·N·D per candidate and seed, where params and tokens are known.
    per_cand: dict[tuple, float] = {}
    for t in targets:
        if t.get("params") and t.get("tokens"):
            cost = 6.0 * float(t["params"]) * float(t["tokens"]) * float(t.get("n_seeds") or 1)
            per_cand[(t["plan"], t["candidate"])] = max(cost, per_cand.get((t["plan"], t["candidate"]), 0.0))
    target_flops: dict[str, float] = defaultdict(float)
    for (pl, _c), cost in per_cand.items():
        target_flops[pl] += cost

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
                                "target_flops": target_flops.get(pl) or None,
                                "target_compute_ratio": (target_flops[pl] / (earlier + sf)
                                                         if sf and target_flops.get(pl) else None),
                                "n_candidates": full["n_candidates"], "n_pairs": full["n_pairs"],
                                "decision_accuracy": full["decision_accuracy"],
                                "kendall_tau": full["kendall_tau"],
                                "rung_candidates": part["n_candidates"], "rung_pairs": part["n_pairs"],
                                "rung_decision_accuracy": part["decision_accuracy"],
                                "rung_kendall_tau": part["kendall_tau"]})
    return out


def _target_summary(store: Store, plan: str | None) -> list[dict[str, Any]]:
    from rbridge.analysis.intervals import target_summary  # numpy: only where there are targets

    return target_summary(store, plan)


def analysis_summary(store: Store, plan: str | None = None, curve: bool = True) -> dict[str, Any]:
    """Decision accuracy, its cost-accuracy curve and the stored fits, JSON-ready.

    Meant for ``rbridge status --json`` (``info["analysis"] = analysis_summary(st, info["plan"])``)
    and ``rbridge accuracy`` (``curve=False`` for ``--no-curve``: the curve is not computed
    at all, and the key is left out). Cheap when nothing was imported: every list is
    empty. The decision accuracy rows are the ``decision_accuracy`` view's numbers,
    computed by :func:`decision_accuracy` (the view counts pairs in O(n^2)).
    """
    from rbridge.analysis.stored import stored_fits
    from rbridge.store.sqlite_read import database_errors

    try:
        where, params = _plan_filter(plan)
        target_values = store.query(f"SELECT * FROM target_values {where}", **params)  # read once, used twice
        targets = [(t["plan"], t["candidate"], t["benchmark"], t["metric"], t["value"], t["higher_is_better"])
                   for t in target_values]
        n_targets = len(targets)
    except database_errors():  # a store opened read-only that predates these views
        out = {"targets": 0, "target_stages": [], "decision_accuracy": [], "accuracy_vs_compute": [], "fits": [],
               "note": "this store has no results views yet; any `rbridge ... import` adds them"}
    else:
        rows = decision_accuracy(store, plan, targets) if n_targets else []
        if rows:
            from rbridge.analysis.intervals import decision_intervals

            cis = decision_intervals(store, plan, targets=target_values)
            for r in rows:
                ci = cis.get((r["plan"], r["stage"], r["benchmark"], r["proxy_metric"], r["target_metric"]), {})
                r["ci_low"], r["ci_high"] = ci.get("ci_low"), ci.get("ci_high")
                r["ci_items"], r["ci_target_seeds"] = ci.get("n_items"), ci.get("target_seeds")
        out = {
            "targets": n_targets,
            "target_stages": _target_summary(store, plan) if n_targets else [],
            "decision_accuracy": rows,
            "accuracy_vs_compute": accuracy_vs_compute(store, plan) if n_targets and curve else [],
            "fits": stored_fits(store, plan),
            "note": "pairs whose target values differ; pairs tied on the proxy count half (METHOD.md section 5)",
        }
    if not curve:
        del out["accuracy_vs_compute"]
    return out


__all__ = ["pair_stats", "decision_accuracy", "decision_accuracy_view", "accuracy_vs_compute",
           "analysis_summary"]
