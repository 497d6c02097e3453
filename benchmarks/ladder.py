"""The ladder (issue 15): does rbridge pick what a larger model would? Runs specs/ladder.yaml end to end and
reports, per proxy stage and metric, decision accuracy against the plan's own targets.

    python benchmarks/ladder.py [--store stores/ladder.db] [--no-run] [--resamples 1000]

The plan trains proxies (stages ``filter`` and ``rank``) and targets (stage ``target``: 20-80x the
compute, two seeds, greedy task accuracy on 1,000 test questions never trained on). Printed:

- the wall time of ``rbridge plan`` (skipped with ``--no-run``: the store is read as it is);
- each target's accuracy per seed, and the pairs of candidates the targets resolve beyond seed
  noise ("seed-robust": both seeds order the pair the same way, strictly);
- per proxy stage and metric (rbridge, rbridge_no_minmax, nll, bpb, label_nll, proxy accuracy):
  decision accuracy on all pairs (the store's ``decision_accuracy`` view) and on the seed-robust
  pairs, each with its 95% bootstrap interval (test items resampled, paired between proxies and
  targets, and each target's seeds: ``rbridge.analysis.intervals``), and the compute ratio of the
  targets to the proxies up to that stage;
- where weighting changes decisions: the pairs that rBridge and unweighted trace NLL order
  differently in each stage, and which of the two the targets side with.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sqlite3
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO / "specs" / "ladder.yaml"
METRICS = ("rbridge", "rbridge_no_minmax", "nll", "bpb", "label_nll", "accuracy")


def _last_items(con, stage: str, metric: str) -> dict[str, tuple[int, float, np.ndarray]]:
    """candidate -> (tokens, value, per-item values) of the run's last evaluation of ``metric``."""
    out = {}
    for cand, tokens, value, items in con.execute(
            "SELECT c.name, e.tokens_seen, e.value, i.item_values FROM evaluations e JOIN runs r ON r.id = e.run_id "
            "JOIN candidates c ON c.id = r.candidate_id JOIN evaluation_items i ON i.evaluation_id = e.id "
            "WHERE r.stage = ? AND e.metric = ? AND r.superseded_by = 0 ORDER BY e.tokens_seen, e.id",
            (stage, metric)):
        out[cand] = (tokens, value, np.array([np.nan if v is None else v for v in json.loads(items)]))
    return out


def _targets(con) -> dict[str, list[np.ndarray]]:
    per: dict[str, list[np.ndarray]] = defaultdict(list)
    for _stage, cand, items in con.execute(
            "SELECT r.stage, c.name, i.item_values FROM evaluations e JOIN runs r ON r.id = e.run_id "
            "JOIN candidates c ON c.id = r.candidate_id JOIN evaluation_items i ON i.evaluation_id = e.id "
            "WHERE r.role = 'target' AND e.metric = 'accuracy' AND r.status = 'done' ORDER BY r.stage"):
        per[cand].append(np.array(json.loads(items), dtype=float))
    return per


def _flops(con, where: str) -> float:
    return float(con.execute(f"SELECT COALESCE(SUM(6.0 * non_embedding_params * tokens_seen), 0) FROM runs "
                             f"WHERE superseded_by = 0 AND {where}").fetchone()[0])


def main(argv=None) -> int:
    from rbridge.analysis.intervals import _counts, _decision_accuracy, _means

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", default=str(REPO / "stores" / "ladder.db"))
    ap.add_argument("--no-run", action="store_true", help="read the store as it is")
    ap.add_argument("--resamples", type=int, default=1000)
    args = ap.parse_args(argv)
    from _machine import print_machine

    print_machine()
    store = Path(args.store)
    if not args.no_run:
        t0 = time.time()
        res = subprocess.run([sys.executable, "-m", "rbridge.cli", "plan", str(SPEC), "--store", str(store)],
                             cwd=REPO)
        print(f"rbridge plan specs/ladder.yaml: exit {res.returncode}, {time.time() - t0:,.0f} s wall", flush=True)
        if res.returncode:
            return res.returncode
    con = sqlite3.connect(f"file:{store}?mode=ro", uri=True)
    targets = _targets(con)
    names = sorted(targets)
    seeds = {c: [float(np.mean(s)) for s in v] for c, v in targets.items()}
    mean = {c: float(np.mean(v)) for c, v in seeds.items()}
    print("\ntarget task accuracy (the benchmark's test items) per seed, and the mean:")
    for c in sorted(names, key=lambda c: -mean[c]):
        print(f"  {c:18s} " + "  ".join(f"{x:6.1%}" for x in seeds[c]) + f"   mean {mean[c]:6.1%}")
    n_seeds = min(len(v) for v in seeds.values())
    robust = np.zeros((len(names), len(names)), dtype=bool)
    for i, j in itertools.combinations(range(len(names)), 2):
        a, b = seeds[names[i]], seeds[names[j]]
        signs = {np.sign(x - y) for x, y in zip(a, b)}
        robust[i, j] = robust[j, i] = len(signs) == 1 and 0 not in signs
    n_pairs = len(names) * (len(names) - 1) // 2
    print(f"seed-robust pairs (every one of {n_seeds} seeds orders them the same way): "
          f"{int(robust.sum() // 2)} of {n_pairs}")
    spread = max(mean.values()) - min(mean.values())
    print(f"best - worst target accuracy: {spread:.1%}")

    target_flops = _flops(con, "role = 'target'")
    stages = [s for (s,) in con.execute("SELECT DISTINCT stage FROM runs WHERE role <> 'target' AND "
                                        "superseded_by = 0 ORDER BY stage_index")]
    rows = []
    spent = 0.0
    for stage in stages:
        spent += _flops(con, f"stage = '{stage}'")
        for metric in METRICS:
            px = _last_items(con, stage, metric)
            cands = [c for c in names if c in px]
            if len(cands) < 2:
                continue
            hib = metric == "accuracy"
            idx = [names.index(c) for c in cands]
            n = len(px[cands[0]][2])
            counts = _counts(np.random.default_rng(0), n, args.resamples)
            sign = 1.0 if hib else -1.0
            p_items = np.stack([sign * px[c][2] for c in cands])
            p_boot = _means(p_items, counts)
            p_point = np.array([[sign * px[c][1]] for c in cands])
            tok = np.array([float(px[c][0]) for c in cands])
            rng = np.random.default_rng(1)
            t_boot = np.empty((len(cands), args.resamples))
            for k, c in enumerate(cands):
                m = _means(np.stack(targets[c]), counts)
                pick = rng.integers(0, len(targets[c]), size=(args.resamples, len(targets[c])))
                t_boot[k] = m[pick, np.arange(args.resamples)[:, None]].mean(axis=1)
            t_point = np.array([[mean[c]] for c in cands])
            sub = robust[np.ix_(idx, idx)]
            row = {"stage": stage, "metric": metric, "candidates": len(cands),
                   "compute_ratio": target_flops / spent if spent else float("nan")}
            for label, mask in (("all", None), ("robust", sub)):
                point = float(_decision_accuracy(tok, p_point, t_point, mask)[0])
                boot = _decision_accuracy(tok, p_boot, t_boot, mask)
                boot = boot[~np.isnan(boot)]
                lo, hi = (np.quantile(boot, [0.025, 0.975]) if len(boot) else (np.nan, np.nan))
                row[label] = (point, float(lo), float(hi))
            row["robust_pairs"] = int(sub.sum() // 2)
            rows.append(row)
    print("\n| stage | proxy metric | candidates | decision accuracy, all pairs [95% CI] | "
          "on seed-robust pairs [95% CI] | robust pairs | target / proxy compute |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        a, b = r["all"], r["robust"]
        print(f"| {r['stage']} | {r['metric']} | {r['candidates']} | {a[0]:.1%} [{a[1]:.1%}, {a[2]:.1%}] | "
              f"{b[0]:.1%} [{b[1]:.1%}, {b[2]:.1%}] | {r['robust_pairs']} | {r['compute_ratio']:,.0f}x |")

    print("\nwhere weighting changes decisions (rBridge vs unweighted trace NLL, final values of each stage):")
    for stage in stages:
        rb, nl = _last_items(con, stage, "rbridge"), _last_items(con, stage, "nll")
        cands = sorted(set(rb) & set(nl) & set(names))
        flips = []
        for a, b in itertools.combinations(cands, 2):
            if rb[a][0] != rb[b][0]:
                continue  # one was dropped earlier: both metrics order the pair by tokens
            s_rb, s_nl = np.sign(rb[b][1] - rb[a][1]), np.sign(nl[b][1] - nl[a][1])
            if s_rb != s_nl:
                s_t = np.sign(mean[a] - mean[b])
                side = "rbridge" if s_t == s_rb else "nll" if s_t == s_nl else "neither (targets tie)"
                rob = robust[names.index(a), names.index(b)]
                flips.append(f"{a} vs {b}: targets side with {side}{'' if rob else ' (not seed-robust)'}")
        print(f"  {stage}: {len(flips)} of {len(cands) * (len(cands) - 1) // 2} pairs ordered differently"
              + "".join(f"\n    {f}" for f in flips))
    return 0


if __name__ == "__main__":
    sys.exit(main())
