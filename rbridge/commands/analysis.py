"""`rbridge targets|results import`, `rbridge fit`, `rbridge predict`, `rbridge accuracy` (issue 5).

Thin wrappers over rbridge.analysis.results_io, .decision and .fit.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.table import Table

from rbridge.commands._base import console, err_console, guard, main, open_for_reading, store_or_latest
from rbridge.errors import InputError

_FILE = click.Path(dir_okay=False, path_type=Path)


def _fmt(v, spec: str = ".4f") -> str:
    return "-" if v is None else format(v, spec)


def _import(file: Path, store: str, stage: str | None, plan_name: str | None, seed: int | None,
            as_json: bool, new_candidates: bool = False, mixtures_file: Path | None = None) -> None:
    from rbridge.analysis.results_io import import_results, read_results
    from rbridge.store import open_store

    from sqlalchemy.exc import OperationalError

    rows = read_results(file, seed=seed)  # the whole file is checked before the store is touched
    mixtures = None
    if mixtures_file is not None:
        from rbridge.mixtures.weights import read_mixtures_csv

        mixtures = read_mixtures_csv(mixtures_file)
    st = open_store(store)
    try:
        rep = import_results(st, file, stage=stage, plan_name=plan_name, seed=seed, rows=rows,
                             new_candidates=new_candidates, mixtures=mixtures, mixtures_path=mixtures_file)
    except OperationalError as exc:
        if "readonly" not in str(exc).lower() and "read-only" not in str(exc).lower():
            raise
        raise InputError("the store is read-only (its file, or the folder its journal goes in, cannot be "
                         "written): an import writes to it; nothing was changed", file=store) from None
    finally:
        st.close()
    if as_json:
        click.echo(json.dumps(rep.as_dict(), indent=2, default=str))
        return
    what = "targets" if stage is None else f"proxy results of stage '{stage}'"
    console.print(f"{file}: {rep.rows} {what} into plan '{rep.plan}'"
                  + (" (new imported plan)" if rep.plan_created else "")
                  + f": {rep.inserted} new, {rep.updated} updated, {rep.unchanged} unchanged"
                  + (f"; {rep.mixtures_added} mixtures added" if mixtures_file is not None else ""))
    for c in rep.changes[:20]:
        console.print(f"  changed {c['candidate']}/{c['benchmark']}/{c['metric']} {c['field']}: "
                      f"{c['old']} -> {c['new']}")
    if len(rep.changes) > 20:
        console.print(f"  ... {len(rep.changes) - 20} more (table result_changes)")


_seed_opt = click.option("--seed", type=int, default=None,
                         help="Keep only this seed (default: average the seeds of each result).")
_plan_opt = click.option("--plan", "plan_name", default=None,
                         help="Plan to attach to (default: the store's only plan, or a new one named after "
                              "the store file).")
_json_opt = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
_store_req = click.option("--store", "store", required=True, help="SQLite path or SQLAlchemy URL.")
_store_opt = click.option("--store", "store", default=None,
                          help="SQLite path or SQLAlchemy URL (default: the most recent store under stores/).")
_new_opt = click.option("--new-candidates", is_flag=True,
                        help="Accept candidates the plan's spec does not have (default: refused as typos).")


@main.group()
def targets() -> None:
    """Known target-scale results (the models the proxies stand in for)."""


@targets.command("import")
@click.argument("file", type=_FILE)
@_store_req
@_plan_opt
@_seed_opt
@_new_opt
@_json_opt
@guard
def targets_import(file: Path, store: str, plan_name: str | None, seed: int | None, new_candidates: bool,
                   as_json: bool) -> None:
    """Import target results: CSV or JSON lines with candidate,benchmark,metric,value[,higher_is_better,params,tokens,seed]."""
    _import(file, store, None, plan_name, seed, as_json, new_candidates)


@main.group()
def results() -> None:
    """Proxy results produced elsewhere (used like the planner's own evaluations)."""


@results.command("import")
@click.argument("file", type=_FILE)
@_store_req
@click.option("--stage", required=True, help="Stage name the proxy results belong to (e.g. regmix-1m).")
@_plan_opt
@_seed_opt
@_new_opt
@click.option("--mixtures", "mixtures_file", type=_FILE, default=None,
              help="CSV of each candidate's mixture: a 'candidate' column and one column per source (weights "
                   "summing to 1), for `rbridge mixtures fit|propose|predict`.")
@_json_opt
@guard
def results_import(file: Path, store: str, stage: str, plan_name: str | None, seed: int | None,
                   new_candidates: bool, mixtures_file: Path | None, as_json: bool) -> None:
    """Import proxy results: same columns as `rbridge targets import`."""
    _import(file, store, stage, plan_name, seed, as_json, new_candidates, mixtures_file)


@main.command()
@_store_opt
@_plan_opt
@click.option("--benchmark", default=None, help="Only this benchmark.")
@click.option("--x", "x_metric", default=None, help="Only this proxy metric as the x-axis (default: every one).")
@click.option("--stage", default=None, help="Only the proxy values of this stage.")
@click.option("--y", "target_metric", default=None, help="Only this target metric.")
@click.option("--folds", type=click.IntRange(min=2), default=5, show_default=True,
              help="Cross-validation folds (fewer when there are fewer candidates with targets).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the cross-validation folds.")
@_json_opt
@guard
def fit(store: str | None, plan_name: str | None, benchmark: str | None, x_metric: str | None, stage: str | None,
        target_metric: str | None, folds: int, seed: int, as_json: bool) -> None:
    """Fit target = g(proxy metric) per benchmark; g chosen by train R^2, k-fold cross-validated, stored."""
    from rbridge.analysis.fit import fit_store
    from rbridge.store import open_store

    store = store_or_latest(store)
    st = open_store(store, create=False)
    try:
        _ensure_views(st)
        rows = fit_store(st, plan_name, benchmark=benchmark, x_metric=x_metric, stage=stage,
                         target_metric=target_metric, folds=folds, seed=seed)
    finally:
        st.close()
    if as_json:
        click.echo(json.dumps({"fits": rows}, indent=2))
        return
    table = Table(title=f"target = g(proxy): g by train R^2, {folds}-fold CV (seed {seed}); MAE in target units")
    for col in ("benchmark", "target", "proxy (stage/metric)", "n", "g", "train R^2", "CV train R^2",
                "CV test MAE", "parameters"):
        table.add_column(col, no_wrap=col != "parameters")
    for r in rows:
        if "skipped" in r:
            table.add_row(r["benchmark"], r["target_metric"], f"{r['stage']}/{r['x_metric']}", str(r["n_points"]),
                          "-", "-", "-", "-", r["skipped"])
            continue
        table.add_row(r["benchmark"], r["target_metric"], f"{r['stage']}/{r['x_metric']}", str(r["n_points"]),
                      r["family"], _fmt(r["train_r2"], ".3f"), _fmt(r["cv_train_r2"], ".3f"),
                      _fmt(r["cv_test_mae"], ".4g"),
                      ", ".join(f"{k}={v:.4g}" for k, v in r["params"].items()))
    console.print(table)
    for r in rows:
        if r.get("warning"):
            err_console.print(f"[yellow]warning:[/] {r['warning']}")
    # One row per x-axis, averaged over benchmarks: the paper's Table 2 layout.
    by_x: dict[tuple, list[dict]] = {}
    for r in rows:
        if "skipped" not in r:
            by_x.setdefault((r["stage"], r["x_metric"], r["target_metric"]), []).append(r)
    if len(by_x) > 1 or any(len(v) > 1 for v in by_x.values()):
        summary = Table(title="mean over benchmarks, per proxy metric")
        for col in ("proxy (stage/metric)", "target", "benchmarks", "CV train R^2", "CV test MAE"):
            summary.add_column(col)
        for (stg, xm, tm), rs in sorted(by_x.items()):
            r2s = [r["cv_train_r2"] for r in rs if r["cv_train_r2"] is not None]
            maes = [r["cv_test_mae"] for r in rs if r["cv_test_mae"] is not None]
            summary.add_row(f"{stg}/{xm}", tm, str(len(rs)), _fmt(sum(r2s) / len(r2s) if r2s else None, ".3f"),
                            _fmt(sum(maes) / len(maes) if maes else None, ".4g"))
        console.print(summary)


@main.command()
@_store_opt
@_plan_opt
@click.option("--benchmark", default=None, help="Only fits of this benchmark.")
@click.option("--x", "x_metric", default=None, help="Only fits on this proxy metric.")
@click.option("--stage", default=None, help="Only fits on this stage's proxy values.")
@click.option("--level", type=click.FloatRange(0.5, 0.99), default=0.9, show_default=True,
              help="Coverage of the interval from the out-of-fold residuals.")
@_json_opt
@guard
def predict(store: str | None, plan_name: str | None, benchmark: str | None, x_metric: str | None, stage: str | None,
            level: float, as_json: bool) -> None:
    """Predict the target of candidates without target results from a stored fit, ranked."""
    from rbridge.analysis.fit import predict_store
    from rbridge.store import open_store

    store = store_or_latest(store)
    st = open_store(store, create=False, read_only=True)
    try:
        _require_plan(st, plan_name)
        out = predict_store(st, plan_name, benchmark=benchmark, x_metric=x_metric, stage=stage, level=level)
    finally:
        st.close()
    if as_json:
        click.echo(json.dumps({"predictions": out}, indent=2))
        return
    for f in out:
        best = "higher" if f.get("target_higher_is_better", True) else "lower"
        table = Table(title=f"{f['benchmark']}: predicted {f['target_metric']} = {f['family']} g of "
                            f"{f['stage']}/{f['x_metric']} (CV MAE {_fmt(f['cv_test_mae'], '.4g')}; "
                            f"interval {f['interval']}; {best} is better)")
        for col in ("rank", "candidate", f["x_metric"], f"predicted {f['target_metric']}", "interval"):
            table.add_column(col, no_wrap=True)
        for r in f["predictions"]:
            table.add_row(str(r["rank"] or "-"), r["candidate"], _fmt(r["x"]), _fmt(r["predicted"]),
                          r.get("why") or ("-" if r["low"] is None else f"[{r['low']:.4f}, {r['high']:.4f}]"))
        if not f["predictions"]:
            table.add_row("-", "(every candidate with a proxy value in this stage has a target already)", "", "", "")
        console.print(table)


@main.command()
@click.option("--store", "store", default=None,
              help="SQLite path or SQLAlchemy URL (default: the most recent store under stores/).")
@_plan_opt
@click.option("--curve/--no-curve", default=True, show_default=True, help="Also decision accuracy per rung.")
@_json_opt
@guard
def accuracy(store: str | None, plan_name: str | None, curve: bool, as_json: bool) -> None:
    """Decision accuracy and Kendall tau of every stage's proxy ranking against the imported targets."""
    from rbridge.analysis.decision import analysis_summary

    store = store_or_latest(store)
    st = open_for_reading(store)
    try:
        _require_plan(st, plan_name)
        info = analysis_summary(st, plan_name, curve=curve)  # --no-curve: not computed at all
    finally:
        st.close()
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
        return
    if not info["targets"]:
        console.print(f"no target results in {store} yet: decision accuracy compares the proxies' ranking with "
                      "results at the target scale; import them with `rbridge targets import FILE.csv --store "
                      f"{store}` (columns candidate,benchmark,metric,value; README: \"Decision accuracy, fits and "
                      "predictions\")")
        return
    if info.get("target_stages"):
        tt = Table(title="targets trained by the plan: task accuracy per seed and the mean (95% CI over test "
                         "items and seeds)")
        for col in ("stage", "benchmark", "candidate", "per seed", "accuracy", "95% CI", "seed-robust pairs"):
            tt.add_column(col, no_wrap=True)
        for r in sorted(info["target_stages"], key=lambda r: (r["stage"], r["benchmark"], -r["accuracy"])):
            tt.add_row(r["stage"], r["benchmark"], r["candidate"],
                       " ".join(f"{v:.1%}" for v in r["seeds"].values()), f"{r['accuracy']:.1%}",
                       f"[{r['ci_low']:.1%}, {r['ci_high']:.1%}]", str(len(r.get("robust_pairs", []))))
        console.print(tt)
        console.print("  seed-robust pairs: pairs of candidates every seed orders the same way (resolved beyond "
                      "seed noise)")
    table = Table(title="decision accuracy: pairs whose targets differ; proxy ties count half")
    for col in ("stage", "benchmark", "proxy", "target", "candidates", "pairs", "decision acc.", "95% CI",
                "Kendall tau", "proxy ties"):
        table.add_column(col, no_wrap=True)
    for r in info["decision_accuracy"]:
        ci = (f"[{r['ci_low']:.1%}, {r['ci_high']:.1%}]" if r.get("ci_low") is not None else "")
        table.add_row(r["stage"], r["benchmark"], r["proxy_metric"], r["target_metric"], str(r["n_candidates"]),
                      str(r["n_pairs"]), _fmt(r["decision_accuracy"], ".1%"), ci, _fmt(r["kendall_tau"], ".3f"),
                      str(r["proxy_ties_counted_half"]))
    console.print(table)
    if any(r.get("ci_low") is not None for r in info["decision_accuracy"]):
        console.print("  95% CI: bootstrap over the benchmark's test items (paired: proxies and targets are "
                      "measured on the same items) and over each target's seeds; 1,000 resamples, seed 0")
    if curve and info.get("accuracy_vs_compute"):
        t2 = Table(title="decision accuracy against proxy compute (FLOPs = 6 N D)")
        for col in ("stage", "rung", "tokens", "benchmark", "proxy", "target", "stage FLOPs", "plan FLOPs",
                    "targets / plan", "decision acc.", "tau", "at rung: n", "acc."):
            t2.add_column(col, no_wrap=True)
        for r in info["accuracy_vs_compute"]:
            ratio = f"{r['target_compute_ratio']:,.0f}x" if r.get("target_compute_ratio") else "-"
            t2.add_row(r["stage"], str(r["rung"]), _fmt(r["tokens"], ","), r["benchmark"], r["proxy_metric"],
                       r["target_metric"], _fmt(r["stage_flops"], ".2e"), _fmt(r["plan_flops"], ".2e"), ratio,
                       _fmt(r["decision_accuracy"], ".1%"), _fmt(r["kendall_tau"], ".3f"),
                       str(r["rung_candidates"]), _fmt(r["rung_decision_accuracy"], ".1%"))
        console.print(t2)


@main.command()
@click.option("--store", "store", default=None,
              help="SQLite path or SQLAlchemy URL (default: the most recent store under stores/).")
@_plan_opt
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The HTML file to write (default: <store folder>/<plan>.report.html).")
@click.option("--png", "png_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also write every chart as a PNG into this folder.")
@guard
def report(store: str | None, plan_name: str | None, out: Path | None, png_dir: Path | None) -> None:
    """One self-contained HTML report of a plan: rankings, successive halving, metrics against tokens,
    compute, decision accuracy and fits, runs, the spec (charts embedded; opens without a network)."""
    from rbridge.analysis.report import build_report, write_report

    if out is not None and out.is_dir():  # checked before the report is built
        raise InputError("--out names a folder; give the HTML file's path", file=str(out), field="--out")
    store = store_or_latest(store)
    st = open_for_reading(store)
    try:
        _require_plan(st, plan_name)
        rep = build_report(st, plan_name)
    finally:
        st.close()
    if out is None:
        base = Path(store).parent if "://" not in store else Path("stores")
        out = base / f"{rep.plan}.report.html"
    written = write_report(rep, out, png_dir)
    console.print(f"report of plan {rep.plan}: {out} ({out.stat().st_size / 1024:,.0f} KiB, "
                  f"{len(rep.charts)} charts: {', '.join(c.name for c in rep.charts)})")
    if png_dir is not None:
        console.print(f"  {len(written) - 1} PNGs in {png_dir}")


def _ensure_views(st) -> None:
    """A store written before issue 5 gains the results tables and views (no other change)."""
    from rbridge.store.db import _ensure_schema

    _ensure_schema(st)


def _require_plan(st, plan_name: str | None) -> None:
    """--plan NAME must name a plan of the store (exit 2 with the plans it has, as elsewhere)."""
    if plan_name is None:
        return
    names = [name for (name,) in st.rows("SELECT name FROM plans ORDER BY id")]
    if plan_name not in names:
        from rbridge.store.db import safe_url

        raise InputError(f"no plan {plan_name!r} in this store (plans: {', '.join(names) or 'none'})",
                         file=safe_url(st.url), field="--plan")
