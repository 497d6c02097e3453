"""``rbridge report``: one self-contained HTML file of a plan, with charts (issue 16).

Everything the page shows is read from the store through the same functions the other
commands use (``plan_status`` for stages, ranks, decisions and compute; the ``ranking``
view for the tables; ``analysis_summary`` for decision accuracy and its curve against
compute; the ``fits`` table), and every chart keeps the numbers it draws
(:attr:`Chart.data`), so tests compare what is drawn with the store's views.

The file needs no network: charts are PNGs drawn by matplotlib (Agg) and embedded as
``data:`` URIs; the styles are inline; there is no script but one JSON block with the
drawn numbers (``<script type="application/json" id="rbridge-data">``), which browsers
do not execute. It reads on a phone and a laptop: a viewport meta tag, images that
shrink to the screen, and wide tables that scroll sideways in their own box.

Charts (each also written as ``<name>.png`` by ``--png DIR``):

- ``halving-<stage>``: successive halving: the stage's decision score per rung and
  candidate; a candidate dropped at a rung ends there (an x).
- ``curves-<stage>``: every stored metric against training tokens, one panel per metric.
- ``compute``: compute spent per stage against the naive cost (every candidate at the
  last proxy stage's size) and, with ``target_model``, the estimate with the target.
- ``accuracy-vs-compute`` (with targets): decision accuracy of each proxy metric against
  the proxy compute spent, per stage and rung.
- ``fit-<i>`` (with stored fits): the fit's points, its curve and the band of its
  cross-validated mean absolute error.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LOWER_IS_BETTER_NOTE = "lower is better"


@dataclass
class Chart:
    name: str          # file-safe: the PNG's name and the <img> id
    title: str
    caption: str
    png: bytes = b""
    data: dict[str, Any] = field(default_factory=dict)  # the numbers drawn


@dataclass
class Report:
    plan: str
    html: str
    charts: list[Chart]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _colors(names) -> dict[str, Any]:
    """One colour per candidate, the same in every chart (by name order)."""
    import matplotlib

    names = sorted(set(names))
    cmap = matplotlib.colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {n: cmap(i % cmap.N) for i, n in enumerate(names)}


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


# ---------------------------------------------------------------------------- data
def _rung_values(store, plan: str) -> list[tuple]:
    """(stage, stage_index, candidate, rung, tokens, benchmark, metric, value, higher_is_better, ci_low,
    ci_high) of every live planner evaluation, in recording order."""
    return store.rows(
        "SELECT r.stage, r.stage_index, c.name, e.rung, e.tokens_seen, e.benchmark, e.metric, e.value, "
        "e.higher_is_better, e.ci_low, e.ci_high FROM evaluations e JOIN runs r ON r.id = e.run_id "
        "JOIN candidates c ON c.id = r.candidate_id JOIN plans p ON p.id = r.plan_id "
        "WHERE p.name = :plan AND r.superseded_by = 0 ORDER BY e.id", plan=plan)


def _runs(store, plan: str) -> list[dict]:
    return store.query(
        "SELECT r.stage AS stage, c.name AS candidate, r.status AS status, r.attempts AS attempts, "
        "r.tokens_seen AS tokens_seen, r.tokens_target AS tokens_target, r.tokens_per_s AS tokens_per_s, "
        "r.wall_s AS wall_s, r.error AS error, r.device AS device, r.threads AS threads, r.mfu AS mfu "
        "FROM runs r JOIN candidates c ON c.id = r.candidate_id JOIN plans p ON p.id = r.plan_id "
        "WHERE p.name = :plan AND r.superseded_by = 0 ORDER BY r.stage_index, r.stage, c.name", plan=plan)


def _ranking(store, plan: str) -> list[dict]:
    return store.query("SELECT stage, candidate, benchmark, metric, value, rank, tokens_seen, status, ci_low, "
                       "ci_high FROM ranking WHERE plan = :plan ORDER BY stage_index, stage, benchmark, metric, "
                       "rank, candidate", plan=plan)


def _versions(store) -> dict[str, str]:
    from rbridge.store.sqlite_read import database_errors

    out = {}
    try:
        for key, value in store.rows("SELECT key, value FROM meta ORDER BY key"):
            out[f"store {key}"] = value
    except database_errors():  # a store without a meta table: nothing to show
        pass
    from importlib.metadata import PackageNotFoundError, version

    for pkg in ("rbridge", "torch", "transformers", "optuna", "matplotlib"):
        try:
            out[f"report made with {pkg}"] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


# ---------------------------------------------------------------------------- charts
def _halving(stage: dict, values: list[tuple], colors: dict) -> Chart:
    import matplotlib.pyplot as plt

    metric = stage["metric"]
    per: dict[str, dict[int, list[tuple]]] = defaultdict(lambda: defaultdict(list))
    for st, _i, cand, rung, tokens, _b, m, value, _h, lo, hi in values:
        if st == stage["name"] and m == metric:
            per[cand][rung].append((tokens, value, lo, hi))
    series, intervals = {}, {}
    for cand, rungs in per.items():  # the decision score: the metric's mean over benchmarks at each rung
        series[cand] = [(max(p[0] for p in pts), sum(p[1] for p in pts) / len(pts)) for _r, pts in sorted(rungs.items())]
        # its 95% interval: the benchmarks' bounds averaged as their scores are (as `rbridge status`)
        intervals[cand] = [[sum(p[2] for p in pts) / len(pts), sum(p[3] for p in pts) / len(pts)]
                           if all(p[2] is not None and p[3] is not None for p in pts) else None
                           for _r, pts in sorted(rungs.items())]
    dropped = {r["candidate"]: r["decision"]["rung"] for r in stage["candidates"]
               if r.get("decision") and not r["decision"]["kept"]}
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for cand in sorted(series, key=lambda c: (c in dropped, series[c][-1][1])):
        pts = series[cand]
        ax.plot([t for t, _ in pts], [v for _, v in pts], marker="o", ms=3, lw=1.2, color=colors.get(cand),
                alpha=0.55 if cand in dropped else 1.0, label=cand)
        bounds = intervals[cand]
        have = [(t, v, b) for (t, v), b in zip(pts, bounds) if b is not None]
        if have:
            ax.errorbar([t for t, _, _ in have], [v for _, v, _ in have],
                        yerr=[[v - b[0] for _, v, b in have], [b[1] - v for _, v, b in have]], fmt="none",
                        ecolor=colors.get(cand), elinewidth=0.8, capsize=2, alpha=0.35 if cand in dropped else 0.7)
        if cand in dropped:
            ax.plot([pts[-1][0]], [pts[-1][1]], marker="x", ms=8, color=colors.get(cand))
    ax.set_xlabel("training tokens")
    ax.set_ylabel(f"{metric} ({LOWER_IS_BETTER_NOTE})")
    ax.set_title(f"stage {stage['name']}: successive halving")
    if len(series) <= 12:
        ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    return Chart(f"halving-{_safe(stage['name'])}", f"Stage {stage['name']}: score per rung",
                 f"{metric} of every candidate at every rung (mean over benchmarks) with its 95% bootstrap "
                 "interval over the traces; an x marks the rung a candidate was dropped at.", _png(fig),
                 {"metric": metric, "series": series, "intervals": intervals, "dropped": dropped})


def _ranking_chart(stage: dict, colors: dict) -> Chart:
    """The stage's final scores with their 95% intervals, best at the top; a bracket joins neighbours the
    paired bootstrap calls tied."""
    import matplotlib.pyplot as plt

    rows = [r for r in stage["candidates"] if r["score"] is not None]
    n = len(rows)
    fig, ax = plt.subplots(figsize=(7, 0.32 * n + 1.4))
    ys = list(range(n))[::-1]
    for y, r in zip(ys, rows):
        lo, hi = r.get("ci_low"), r.get("ci_high")
        err = [[r["score"] - lo], [hi - r["score"]]] if lo is not None and hi is not None else None
        ax.errorbar([r["score"]], [y], xerr=err, fmt="o", ms=4, capsize=3, color=colors.get(r["candidate"]),
                    alpha=0.55 if r["status"] == "pruned" else 1.0)
    lo_x = min((r.get("ci_low") if r.get("ci_low") is not None else r["score"]) for r in rows) if rows else 0
    for k, r in enumerate(rows[:-1]):
        if r.get("separated_from_next") is False:
            ax.annotate("tie", xy=(lo_x, ys[k] - 0.5), xytext=(-4, 0), textcoords="offset points", ha="right",
                        va="center", fontsize=7, color="#b5651d")
    ax.set_yticks(ys)
    ax.set_yticklabels([f"{r['rank']}. {r['candidate']}" + (" (pruned)" if r["status"] == "pruned" else "")
                        for r in rows], fontsize=8)
    ax.set_xlabel(f"{stage['metric']} at the last rung each reached ({LOWER_IS_BETTER_NOTE}); bars: 95% interval "
                  "over traces", fontsize=8)
    ax.set_title(f"stage {stage['name']}: ranking", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return Chart(f"ranking-{_safe(stage['name'])}", f"Stage {stage['name']}: ranking with intervals",
                 f"Each candidate's {stage['metric']} with its 95% bootstrap interval over the traces, in rank order "
                 "(candidates that trained more tokens first); 'tie' marks a pair the paired bootstrap cannot "
                 "separate.", _png(fig),
                 {"candidates": [r["candidate"] for r in rows], "score": [r["score"] for r in rows],
                  "ci": [[r.get("ci_low"), r.get("ci_high")] for r in rows],
                  "separated_from_next": [r.get("separated_from_next") for r in rows]})


def _curves(stage: dict, values: list[tuple], colors: dict) -> Chart:
    import matplotlib.pyplot as plt

    by_metric: dict[str, dict[str, dict[int, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    hib: dict[str, bool] = {}
    for st, _i, cand, _rung, tokens, _b, m, value, h, _lo, _hi in values:
        if st == stage["name"]:
            by_metric[m][cand][tokens].append(value)
            hib[m] = bool(h)
    metrics = sorted(by_metric, key=lambda m: (m != stage["metric"], m))
    n = len(metrics)
    cols = min(3, n) or 1
    rows = -(-n // cols) or 1
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    data = {}
    for k, m in enumerate(metrics):
        ax = axes[k // cols][k % cols]
        data[m] = {}
        for cand, pts in sorted(by_metric[m].items()):
            xy = [(t, sum(v) / len(v)) for t, v in sorted(pts.items())]
            data[m][cand] = xy
            ax.plot([t for t, _ in xy], [v for _, v in xy], marker="o", ms=2.5, lw=1, label=cand,
                    color=colors.get(cand))
        ax.set_title(f"{m} ({'higher' if hib.get(m) else 'lower'} is better)", fontsize=9)
        ax.set_xlabel("training tokens", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for k in range(n, rows * cols):
        axes[k // cols][k % cols].axis("off")
    if data and len(next(iter(data.values()))) <= 12:
        axes[0][0].legend(fontsize=6)
    fig.suptitle(f"stage {stage['name']}: every metric against training tokens", fontsize=10)
    fig.tight_layout()
    return Chart(f"curves-{_safe(stage['name'])}", f"Stage {stage['name']}: metrics against tokens",
                 "Each stored metric of each candidate at each evaluation (mean over benchmarks).", _png(fig),
                 {"metrics": data})


def _compute(compute: dict) -> Chart:
    import matplotlib.pyplot as plt

    labels, vals, colors = [], [], []
    for s in compute.get("stages", []):
        labels.append(f"{s['stage']}" + (" (target)" if s.get("role") == "target" else ""))
        vals.append(s["flops"])
        colors.append("#999999" if s.get("role") == "target" else "#3b75af")
    labels.append("plan (spent)")
    vals.append(compute.get("spent_flops") or 0.0)
    colors.append("#2a9d8f")
    if compute.get("naive_flops"):
        labels.append("naive")
        vals.append(compute["naive_flops"])
        colors.append("#e76f51")
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(labels) + 1.5))
    bars = ax.barh(labels[::-1], vals[::-1], color=colors[::-1])
    # A linear axis: bar lengths compare as the numbers do (a log axis made 2.4x look like 10x).
    ax.bar_label(bars, labels=[f"{v:.2e}" for v in vals[::-1]], fontsize=7, padding=2)
    ax.set_xlim(0, max(vals + [1.0]) * 1.18)
    ax.set_xlabel("FLOPs (6 N D, plus scoring), linear axis")
    red = compute.get("reduction")
    ax.set_title("compute: spent per stage and in all, against the naive cost"
                 + (f" (reduction {red:.1f}x)" if red else ""))
    ax.grid(axis="x", alpha=0.3)
    return Chart("compute", "Compute", "FLOPs spent per stage, by the plan in all, and the naive cost of "
                 "training every candidate at the last proxy stage's size; target stages (grey) check the "
                 "decision and are not part of its cost.", _png(fig),
                 {"labels": labels, "flops": vals, "reduction": red,
                  "target_fraction": compute.get("target_fraction")})


def _accuracy_vs_compute(curve: list[dict]) -> Chart:
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[float, float, str]]] = defaultdict(list)
    for r in curve:
        if r["plan_flops"] is None or r["decision_accuracy"] is None:
            continue
        key = f"{r['proxy_metric']} -> {r['target_metric']} ({r['benchmark']})"
        series[key].append((r["plan_flops"], r["decision_accuracy"], f"{r['stage']} r{r['rung']}"))
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for key, pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, lw=1.2, label=key)
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("proxy compute spent so far (FLOPs)")
    ax.set_ylabel("decision accuracy")
    ax.set_title("decision accuracy against proxy compute")
    if series:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no pair of candidates whose targets differ yet", ha="center", transform=ax.transAxes)
    ax.grid(alpha=0.3)
    return Chart("accuracy-vs-compute", "Decision accuracy against compute",
                 "Decision accuracy of each proxy metric against the targets, at every stage and rung, against "
                 "the proxy compute spent up to there (0.5: a coin).", _png(fig),
                 {k: [(x, y, w) for x, y, w in v] for k, v in series.items()})


def _fit(i: int, f: dict, points: dict | None) -> Chart:
    import matplotlib.pyplot as plt
    import numpy as np

    from rbridge.analysis.fit import predict_family

    fig, ax = plt.subplots(figsize=(6, 4))
    data: dict[str, Any] = {"family": f["family"], "params": f["params"], "cv_test_mae": f["cv_test_mae"]}
    if points:
        x, y = np.asarray(points["x"]), np.asarray(points["y"])
        ax.scatter(x, y, s=14, label="candidates")
        grid = np.linspace(x.min(), x.max(), 200) if len(x) else np.array([])
        data.update(x=points["x"], y=points["y"], candidates=points["candidates"])
    else:
        grid = np.array([])
    if len(grid):
        g = predict_family(f["family"], f["params"], grid)
        ax.plot(grid, g, color="black", lw=1.3, label=f"{f['family']}: {f['formula']}")
        mae = f["cv_test_mae"]
        if mae is not None:
            ax.fill_between(grid, g - mae, g + mae, color="grey", alpha=0.25, label=f"CV MAE {mae:.3g}")
    ax.set_xlabel(f"{f['x_metric']} (stage {f['stage']})")
    ax.set_ylabel(f"target {f['target_metric']}")
    ax.set_title(f"fit on {f['benchmark']}: {f['n_points']} points, CV R2 {f['cv_train_r2'] or 0:.3f}")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return Chart(f"fit-{i}", f"Fit: {f['benchmark']}, {f['x_metric']} -> {f['target_metric']}",
                 "The proxy score against the target of every candidate with both, the fitted curve and a band "
                 "of its cross-validated mean absolute error.", _png(fig), data)


# ---------------------------------------------------------------------------- HTML
_CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1100px;
padding:12px;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
img{max-width:100%;height:auto;display:block}figure{margin:1em 0}figcaption{font-size:.9em;color:#555}
.scroll{overflow-x:auto;-webkit-overflow-scrolling:touch}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}
th,td{border:1px solid #ddd;padding:3px 6px;text-align:left;white-space:nowrap}th{background:#f4f4f4}
td.num{text-align:right;font-variant-numeric:tabular-nums}
pre{background:#f7f7f7;padding:8px;overflow-x:auto;font-size:.8em}
.note{color:#555;font-size:.9em}
"""


def _search(store, plan: str, spec_text: str) -> tuple[list[Chart], dict | None]:
    """A plan's mixture search (spec ``search:``): the surrogate's cross-validated predictions against the
    observed scores, and each source's weight across the swarm with the proposals, the prior and the listed
    mixtures beside it. Nothing for a plan without a search, or before its search stage is decided."""
    import yaml

    try:
        spec = yaml.safe_load(spec_text or "") or {}
    except yaml.YAMLError:
        return [], None
    if not isinstance(spec, dict) or not isinstance(spec.get("search"), dict):
        return [], None
    stage = spec["search"].get("stage") or next((st.get("name") for st in spec.get("stages", [])
                                                 if isinstance(st, dict) and st.get("role") != "target"), None)
    from rbridge.store.studies import study_attrs

    url = store.url
    revs = store.rows("SELECT studies FROM plans WHERE name = :p", p=plan)
    rev = json.loads(revs[0][0] or "{}").get(stage, 0) if revs else 0
    found = study_attrs(url, plan, stage, rev).get("search")
    if not found:
        return [], None
    import matplotlib.pyplot as plt
    import numpy as np

    from rbridge.mixtures.data import load_table
    from rbridge.mixtures.surrogates import cross_validate

    table = load_table(store, plan, stage, None, None)
    sources = found["sources"]
    keep = [i for i, m in enumerate(table.mixtures) if set(m) <= set(sources)]
    x = np.array([[table.mixtures[i].get(s, 0.0) for s in sources] for i in keep])
    y = table.loss[keep]
    cv = cross_validate(found["surrogate"], x, y, k=5, seed=0)
    charts = []
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.scatter(y, cv.predictions, s=18, color="#3b75af")
    lo, hi = float(min(y.min(), cv.predictions.min())), float(max(y.max(), cv.predictions.max()))
    ax.plot([lo, hi], [lo, hi], color="#999999", lw=1)
    ax.set_xlabel(f"observed {table.metric} at rung {found['rung']}")
    ax.set_ylabel("predicted (5-fold cross-validated)")
    ax.set_title(f"{found['surrogate']} surrogate: Spearman {cv.spearman:.3f}")
    ax.grid(alpha=0.3)
    charts.append(Chart("search-cv", "Surrogate: predicted against observed",
                        f"each candidate of stage {stage} at rung {found['rung']}, predicted by a {found['surrogate']} "
                        "surrogate fitted on the other folds; on the grey line predictions equal observations.",
                        _png(fig), {"observed": y.tolist(), "predicted": cv.predictions.tolist(),
                                    "spearman": cv.spearman, "candidates": [table.candidates[i] for i in keep]}))
    fig, ax = plt.subplots(figsize=(7, 0.55 * len(sources) + 1.6))
    swarm = [m for n, m in zip(table.candidates, table.mixtures) if n.startswith("swarm-")]
    for j, src in enumerate(sources):
        ax.scatter([m.get(src, 0.0) for m in swarm], [j] * len(swarm), s=10, color="#bbbbbb",
                   label="swarm" if j == 0 else None)
    ax.scatter([found["prior"][s] for s in sources], range(len(sources)), marker="|", s=300, color="#000000",
               label="prior")
    marks = ["o", "s", "^", "D", "v"]
    for k, p in enumerate(found["proposals"]):
        ax.scatter([p["weights"].get(s, 0.0) for s in sources], range(len(sources)), marker=marks[k % len(marks)],
                   s=40, label=p["name"], zorder=3)
    ax.set_yticks(range(len(sources)), sources)
    ax.set_xlabel("weight in the mixture")
    ax.set_title("where the swarm sampled, the prior and the proposals")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    charts.append(Chart("search-weights", "Mixtures: swarm, prior and proposals",
                        "each source's weight in every swarm mixture (grey), in the prior the swarm was drawn around "
                        "(black bar) and in each proposal.", _png(fig),
                        {"sources": sources, "prior": found["prior"], "proposals": found["proposals"],
                         "swarm": swarm}))
    return charts, found


def _cell(v: Any) -> str:
    if v is None:
        return "<td></td>"
    if isinstance(v, float):
        return f'<td class="num">{v:.6g}</td>'
    if isinstance(v, int) and not isinstance(v, bool):
        return f'<td class="num">{v:,}</td>'
    return f"<td>{html.escape(str(v))}</td>"


# Column keys -> the heading a reader sees (keys not listed are shown as they are).
LABELS = {"rank": "Rank", "candidate": "Candidate", "benchmark": "Benchmark", "value": "Score",
          "ci": "95% interval", "vs_next": "vs next", "tokens_seen": "Tokens trained",
          "tokens_target": "Token budget", "status": "Status", "stopped": "Stopped at", "rung": "Rung",
          "why": "Why", "stage": "Stage", "attempts": "Attempts", "tokens_per_s": "Tokens/s",
          "wall_s": "Training seconds", "mfu": "MFU", "device": "Device", "threads": "CPU threads",
          "error": "Last error", "proxy_metric": "Proxy metric", "target_metric": "Target metric",
          "n_candidates": "Candidates", "n_pairs": "Pairs", "decision_accuracy": "Decision accuracy",
          "ci_low": "95% CI low", "ci_high": "95% CI high", "kendall_tau": "Kendall tau", "what": "What",
          "version": "Version", "disk": "Disk", "runs": "Runs"}


def _table(rows: list[dict], cols: list[str], table_id: str) -> str:
    head = "".join(f"<th>{html.escape(LABELS.get(c, c))}</th>" for c in cols)
    body = "".join("<tr>" + "".join(_cell(r.get(c)) for c in cols) + "</tr>" for r in rows)
    return f'<div class="scroll"><table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


TIE_NOTE = ("tie: the 95% paired-bootstrap interval of the difference between this candidate's score and the "
            "next one's (the benchmark's traces resampled together) contains 0: resampling the traces could swap "
            "them; not a decision")


def _interval(low, high) -> str | None:
    return None if low is None or high is None else f"[{low:.4f}, {high:.4f}]"


def _ranking_rows(stage: dict) -> list[dict]:
    """The stage's candidates as `rbridge status` lists them: decision score, interval, tie mark."""
    out = []
    for r in stage["candidates"]:
        sep = r.get("separated_from_next")
        d = r.get("decision")
        out.append({"rank": r["rank"], "candidate": r["candidate"], "value": r["score"],
                    "ci": _interval(r.get("ci_low"), r.get("ci_high")),
                    "vs_next": "" if sep is None else ("separated" if sep else "tie"),
                    "tokens_seen": r["tokens_seen"], "status": r["status"],
                    "stopped": f"rung {d['rung']}" if d and not d["kept"] else None})
    return out


def _figure(c: Chart) -> str:
    uri = "data:image/png;base64," + base64.b64encode(c.png).decode()
    return (f'<figure><img id="chart-{c.name}" src="{uri}" alt="{html.escape(c.title)}">'
            f"<figcaption>{html.escape(c.caption)}</figcaption></figure>")


def build_report(store, plan: str | None = None) -> Report:
    """The report of ``plan`` (default: the store's only or latest plan)."""
    import matplotlib

    matplotlib.use("Agg")

    from rbridge.analysis.decision import analysis_summary
    from rbridge.analysis.status import plan_status
    from rbridge.analysis.stored import stored_fits

    info = plan_status(store, plan)
    name = info["plan"]
    values = _rung_values(store, name)
    analysis = analysis_summary(store, name)
    ranking = _ranking(store, name)
    runs = _runs(store, name)
    spec_text = (store.rows("SELECT spec_text FROM plans WHERE name = :p", p=name) or [("",)])[0][0]

    charts: list[Chart] = []
    parts: list[str] = []
    colors = _colors(info["candidates"])
    for stage in info["stages"]:
        if not stage["candidates"]:
            continue
        charts.append(_ranking_chart(stage, colors))
        charts.append(_halving(stage, values, colors))
        charts.append(_curves(stage, values, colors))
    charts.append(_compute(info["compute"]))
    if analysis.get("accuracy_vs_compute"):
        charts.append(_accuracy_vs_compute(analysis["accuracy_vs_compute"]))
    fits = stored_fits(store, name)
    if fits:
        from rbridge.analysis.fit import fit_points

        pts = fit_points(store, name)
        for i, f in enumerate(fits):
            charts.append(_fit(i, f, pts.get((f["stage"], f["benchmark"], f["x_metric"], f["target_metric"]))))
    search_charts, search = _search(store, name, spec_text)
    charts += search_charts
    by_name = {c.name: c for c in charts}

    c = info["compute"]
    parts.append(f"<h1>rbridge report: plan {html.escape(name)}</h1>")
    parts.append(f'<p class="note">status {html.escape(info["status"])}; {len(info["candidates"])} candidates; '
                 f"store {html.escape(info['store'])}; compute spent {c['spent_flops']:.3g} FLOPs"
                 + (f", {c['reduction']:.1f}x less than the naive {c['naive_flops']:.3g}" if c.get("reduction") else "")
                 + "</p>")
    parts.append("<h2>Ranking per stage</h2>")
    for stage in info["stages"]:
        if not stage["candidates"]:
            continue
        role = " (target stage: never prunes)" if stage.get("role") == "target" else ""
        parts.append(f"<h3>Stage {html.escape(stage['name'])}{role}: {html.escape(stage['metric'])}, "
                     f"{LOWER_IS_BETTER_NOTE}</h3>")
        parts.append(_table(_ranking_rows(stage), ["rank", "candidate", "value", "ci", "vs_next", "tokens_seen",
                                                   "status", "stopped"], f"ranking-{_safe(stage['name'])}"))
        if any(r.get("separated_from_next") is False for r in stage["candidates"]):
            parts.append(f"<p class=note>{html.escape(TIE_NOTE)}</p>")
        per_bench = [r for r in ranking if r["stage"] == stage["name"] and r["metric"] == stage["metric"]]
        if len({r["benchmark"] for r in per_bench}) > 1:
            for r in per_bench:
                r["ci"] = _interval(r.get("ci_low"), r.get("ci_high"))
            parts.append("<p class=note>per benchmark:</p>")
            parts.append(_table(per_bench, ["rank", "candidate", "benchmark", "value", "ci", "tokens_seen",
                                            "status"], f"ranking-{_safe(stage['name'])}-benchmarks"))
        stopped = [{"candidate": r["candidate"], "rung": r["decision"]["rung"], "why": r["decision"]["why"]}
                   for r in stage["candidates"] if r.get("decision") and not r["decision"]["kept"]]
        if stopped:
            parts.append("<p class=note>where candidates stopped:</p>")
            parts.append(_table(stopped, ["candidate", "rung", "why"], f"stopped-{_safe(stage['name'])}"))
        parts.append(_figure(by_name[f"ranking-{_safe(stage['name'])}"]))
        parts.append(_figure(by_name[f"halving-{_safe(stage['name'])}"]))
        parts.append(_figure(by_name[f"curves-{_safe(stage['name'])}"]))
    if search:
        parts.append("<h2>Mixture search</h2>")
        parts.append(f"<p class=note>a {html.escape(search['surrogate'])} surrogate fitted on every candidate's "
                     f"score at rung {search['rung']}; cross-validation of each family:</p>")
        parts.append(_table(search["cv"], ["surrogate", "cv_spearman", "cv_rmse"], "search-cv"))
        parts.append(_table([{"candidate": p["name"], "rule": p["rule"], "predicted": p["predicted"],
                              "weights": ", ".join(f"{k} {v:.3f}" for k, v in sorted(p["weights"].items(),
                                                                                    key=lambda kv: -kv[1]))}
                             for p in search["proposals"]], ["candidate", "rule", "predicted", "weights"],
                            "search-proposals"))
        parts.append(_figure(by_name["search-cv"]))
        parts.append(_figure(by_name["search-weights"]))
    parts.append("<h2>Compute</h2>")
    parts.append(_figure(by_name["compute"]))
    from rbridge._du import human_bytes

    disk = [{"stage": st["name"], "runs": len(st["candidates"]), "disk": human_bytes(st.get("disk_bytes") or 0)}
            for st in info["stages"] if st["candidates"]]
    if info.get("superseded"):
        disk.append({"stage": "superseded", "runs": len(info["superseded"]),
                     "disk": human_bytes(info.get("superseded_disk_bytes") or 0)})
    parts.append("<h2>Disk</h2><p class=note>checkpoints and exported models of each stage's runs, as this "
                 "machine sees them; done and pruned runs keep their exported model only once the plan is done "
                 "(`rbridge clean` applies it to older plans)</p>")
    parts.append(_table(disk, ["stage", "runs", "disk"], "disk"))
    if c.get("target_fraction"):
        parts.append(f"<p>With the target model: {c['target_total_flops']:.3g} FLOPs against "
                     f"{c['target_naive_flops']:.3g} for training every candidate at target size: "
                     f"{c['target_fraction']:.1%} of the naive cost (reduction {c['target_reduction']:.1f}x).</p>")
    if analysis.get("decision_accuracy"):
        parts.append("<h2>Do the proxies pick what the targets pick?</h2>")
        parts.append(_table(analysis["decision_accuracy"],
                            ["stage", "benchmark", "proxy_metric", "target_metric", "n_candidates", "n_pairs",
                             "decision_accuracy", "ci_low", "ci_high", "kendall_tau"], "decision-accuracy"))
        if "accuracy-vs-compute" in by_name:
            parts.append(_figure(by_name["accuracy-vs-compute"]))
    if fits:
        parts.append("<h2>Fits: proxy score to target</h2>")
        for ch in charts:
            if ch.name.startswith("fit-"):
                parts.append(_figure(ch))
    parts.append("<h2>Runs</h2>")
    parts.append(_table(runs, ["stage", "candidate", "status", "attempts", "tokens_seen", "tokens_target",
                               "tokens_per_s", "wall_s", "mfu", "device", "threads", "error"], "runs"))
    parts.append("<h2>Spec</h2>")
    parts.append(f"<pre>{html.escape(spec_text or '(imported results: no spec)')}</pre>")
    parts.append("<h2>Versions</h2>")
    parts.append(_table([{"what": k, "version": v} for k, v in _versions(store).items()], ["what", "version"],
                        "versions"))
    drawn = {ch.name: ch.data for ch in charts}
    payload = json.dumps(drawn, default=str).replace("</", "<\\/")
    doc = ("<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
           '<meta name=viewport content="width=device-width, initial-scale=1">'
           f"<title>rbridge report: {html.escape(name)}</title><style>{_CSS}</style></head><body>"
           + "".join(parts)
           + f'<script type="application/json" id="rbridge-data">{payload}</script></body></html>')
    return Report(name, doc, charts)


def write_report(report: Report, out: Path, png_dir: Path | None = None) -> list[Path]:
    """Write the HTML (atomically) and, with ``png_dir``, every chart as a PNG; returns the files written."""
    import os

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(report.html, encoding="utf-8")
    os.replace(tmp, out)
    written = [out]
    if png_dir is not None:
        png_dir.mkdir(parents=True, exist_ok=True)
        for ch in report.charts:
            p = png_dir / f"{ch.name}.png"
            p.write_bytes(ch.png)
            written.append(p)
    return written


__all__ = ["Chart", "Report", "build_report", "write_report"]
