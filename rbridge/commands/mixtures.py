"""`rbridge mixtures fit|predict|propose`: a surrogate from mixture weights to a stage's score (rbridge.mixtures)."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.table import Table

from rbridge.commands._base import console, guard, main, store_or_latest
from rbridge.errors import InputError

_FILE = click.Path(path_type=Path, dir_okay=False)


def _common(f):
    for opt in reversed([
        click.option("--store", default=None, help="SQLite path or SQLAlchemy URL (default: the most recent store "
                                                   "under stores/)."),
        click.option("--plan", "plan_name", default=None, help="The plan (default: the store's only one with mixtures)."),
        click.option("--stage", default=None, help="The stage whose scores are fitted (default: the only one)."),
        click.option("--benchmark", default=None, help="The benchmark (default: the only one)."),
        click.option("--metric", default=None, help="The metric (default: rbridge, or the only one)."),
        click.option("--surrogate", type=click.Choice(["auto", "linear", "log_linear", "lightgbm"]), default="auto",
                     show_default=True, help="The surrogate family; auto: the best k-fold cross-validated Spearman "
                                             "on this stage's data."),
        click.option("--folds", type=click.IntRange(min=2), default=5, show_default=True,
                     help="Cross-validation folds."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed of the folds and the sampling."),
        click.option("--json", "as_json", is_flag=True, help="Machine-readable output."),
    ]):
        f = opt(f)
    return f


def _fit(store, plan_name, stage, benchmark, metric, surrogate, folds, seed):
    from rbridge.commands.analysis import _ensure_views
    from rbridge.mixtures.data import load_table
    from rbridge.mixtures.surrogates import choose
    from rbridge.store import open_store

    st = open_store(store_or_latest(store), create=False)
    try:
        _ensure_views(st)
        table = load_table(st, plan_name, stage, benchmark, metric)
    finally:
        st.close()
    model, cvs = choose(table.x, table.loss, surrogate, k=folds, seed=seed)
    return table, model, cvs


def _header(table) -> dict:
    return {"plan": table.plan, "stage": table.stage, "benchmark": table.benchmark, "metric": table.metric,
            "higher_is_better": table.higher_is_better, "n": len(table.candidates), "sources": table.sources,
            "rung": table.rung}


def _back(table, loss_values):
    """Predictions in the metric's own direction."""
    return [float(-v if table.higher_is_better else v) for v in loss_values]


@main.group()
def mixtures() -> None:
    """Fit a surrogate from mixture weights to a stage's score; predict mixtures; propose new ones."""


@mixtures.command("fit")
@_common
@guard
def mixtures_fit(store, plan_name, stage, benchmark, metric, surrogate, folds, seed, as_json) -> None:
    """Fit every surrogate family by k-fold cross-validation on the stage's scores and keep the best."""
    table, model, cvs = _fit(store, plan_name, stage, benchmark, metric, surrogate, folds, seed)
    doc = {**_header(table), "surrogate": model.family, "folds": folds, "seed": seed,
           "cv": [c.to_json() for c in cvs], "fit": model.describe(table.sources)}
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    at = f" at rung {table.rung}, which every candidate reached" if table.rung else ""
    t = Table(title=f"{table.plan}/{table.stage}: {table.metric} on {table.benchmark}{at}, from the mixtures of "
                    f"{len(table.candidates)} candidates ({folds}-fold CV, seed {seed})")
    for col in ("surrogate", "CV Spearman", "CV RMSE", ""):
        t.add_column(col)
    for c in cvs:
        t.add_row(c.family, f"{c.spearman:.3f}", f"{c.rmse:.4g}", "chosen" if c.family == model.family else "")
    console.print(t)
    coef = doc["fit"].get("coefficients") or doc["fit"].get("importance") or {}
    if coef:
        what = "coefficient (loss direction)" if "coefficients" in doc["fit"] else "importance (splits)"
        console.print(f"{what}: " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(coef.items(), key=lambda kv: kv[1])))


@mixtures.command("predict")
@_common
@click.option("--mixtures", "mixtures_file", type=_FILE, required=True,
              help="CSV of mixtures: a 'candidate' (or 'name') column and one column per source.")
@guard
def mixtures_predict(store, plan_name, stage, benchmark, metric, surrogate, folds, seed, as_json,
                     mixtures_file) -> None:
    """One prediction per row of --mixtures, in the file's order."""
    from rbridge.mixtures.weights import as_matrix, read_mixtures_csv

    rows = read_mixtures_csv(mixtures_file)  # checked before the store is opened
    table, model, cvs = _fit(store, plan_name, stage, benchmark, metric, surrogate, folds, seed)
    unknown = sorted({s for m in rows.values() for s in m} - set(table.sources))
    if unknown:
        raise InputError(f"source(s) the fitted mixtures never use: {', '.join(unknown)} (fitted on "
                         f"{', '.join(table.sources)})", file=mixtures_file)
    pred = _back(table, model.predict(as_matrix(list(rows.values()), table.sources)))
    out = [{"name": name, "predicted": p} for name, p in zip(rows, pred)]  # unrounded: ranks are compared
    if as_json:
        click.echo(json.dumps({**_header(table), "surrogate": model.family,
                               "cv": [c.to_json() for c in cvs], "predictions": out}, indent=2))
        return
    t = Table(title=f"predicted {table.metric} on {table.benchmark} ({model.family}, fitted on {table.plan}/"
                    f"{table.stage})")
    t.add_column("name")
    t.add_column(f"predicted {table.metric}", justify="right")
    for r in out:
        t.add_row(r["name"], f"{r['predicted']:.5g}")
    console.print(t)


@mixtures.command("propose")
@_common
@click.option("-n", "--n", "n_proposals", type=click.IntRange(min=1), default=2, show_default=True,
              help="How many mixtures to propose (RegMix's rule first, then optima near the prior).")
@click.option("--prior", type=click.Choice(["swarm", "uniform"]), default="swarm", show_default=True,
              help="The prior proposals are drawn around: the mean of the fitted mixtures, or uniform.")
@click.option("--cap", "caps", multiple=True, metavar="SOURCE=W",
              help="The largest weight a source may have (its repetition cap), repeatable.")
@click.option("--samples", type=click.IntRange(min=100), default=20000, show_default=True,
              help="Mixtures drawn and predicted to choose from.")
@guard
def mixtures_propose(store, plan_name, stage, benchmark, metric, surrogate, folds, seed, as_json, n_proposals,
                     prior, caps, samples) -> None:
    """Propose mixtures from the surrogate: the mean of the best predicted draws (RegMix), then the best
    predicted draw near the prior (olmix), within the caps."""
    import numpy as np

    from rbridge.mixtures.propose import propose
    from rbridge.mixtures.swarm import check_caps

    cap_map = {}
    for c in caps:
        name, _, value = c.partition("=")
        try:
            w = float(value)
        except ValueError:
            w = float("nan")
        if not name.strip() or not 0 < w <= 1:
            raise InputError(f"expected SOURCE=W with 0 < W <= 1, got {c!r}", field="--cap")
        cap_map[name.strip()] = w
    table, model, cvs = _fit(store, plan_name, stage, benchmark, metric, surrogate, folds, seed)
    unknown = sorted(set(cap_map) - set(table.sources))
    if unknown:
        raise InputError(f"no source {', '.join(unknown)} in the fitted mixtures ({', '.join(table.sources)})",
                         field="--cap")
    cap = check_caps(table.sources, cap_map, 0.0, field="--cap")
    x = table.x
    p = x.mean(axis=0) if prior == "swarm" else np.full(len(table.sources), 1.0 / len(table.sources))
    props = propose(model, table.sources, p / p.sum(), cap, n=n_proposals, seed=seed, samples=samples, fitted=x,
                    field="--cap")
    for pr in props:
        pr.predicted = _back(table, [pr.predicted])[0]
    doc = {**_header(table), "surrogate": model.family, "cv": [c.to_json() for c in cvs],
           "prior": {s: round(float(v), 6) for s, v in zip(table.sources, p / p.sum())},
           "proposals": [pr.to_json() for pr in props]}
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    best = min(table.values) if not table.higher_is_better else max(table.values)
    console.print(f"{model.family} fitted on {len(table.candidates)} mixtures of {table.plan}/{table.stage} "
                  f"(best observed {table.metric}: {best:.5g})")
    for pr in props:
        console.print(f"[bold]{pr.name}[/] ({pr.rule}): predicted {table.metric} {pr.predicted:.5g}, KL from the "
                      f"prior {pr.kl_from_prior:.3f}")
        console.print("  " + ", ".join(f"{s} {w:.3f}" for s, w in sorted(pr.weights.items(), key=lambda kv: -kv[1])))
