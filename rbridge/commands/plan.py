"""`rbridge validate`, `plan`, `resume`, `worker`, `status`: running plans and watching them."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click
from rich.table import Table

from rbridge.commands._base import (RichReporter, console, err_console, guard, main, open_for_reading,
                                   store_or_latest)
from rbridge.errors import InputError
from rbridge.reporting import si


# ---------------------------------------------------------------------------- plan / resume / validate
@main.command()
@click.argument("spec_path", metavar="SPEC.yaml", type=click.Path(dir_okay=False, path_type=Path))
@guard
def validate(spec_path: Path) -> None:
    """Check a spec without running anything."""
    from rbridge.spec import load_spec

    spec = load_spec(spec_path)
    stages = spec.resolved_stages()
    for warning in spec.warnings():
        err_console.print(f"[yellow]warning:[/] {spec_path}: {warning}")
    from concurrent.futures import ThreadPoolExecutor

    from rbridge.data.sources import check_source

    # Each file opened far enough to catch a wrong format; sources in threads (decompression releases
    # the GIL), reported, and the first refusal raised, in the spec's order.
    with ThreadPoolExecutor(max_workers=max(1, min(len(spec.sources), os.cpu_count() or 1))) as pool:
        checks = [pool.submit(check_source, src.config(name)) for name, src in spec.sources.items()]
    for (name, _), check in zip(spec.sources.items(), checks):
        info = check.result()
        console.print(f"  source {name}: {info.format}, {info.files} file(s), {info.chunks} chunk(s), "
                      f"{si(info.bytes)}B")
    console.print(f"{spec_path}: ok - plan '{spec.name}', {len(spec.sources)} sources, "
                  f"{len(spec.candidates)} candidates"
                  + (f" and a search swarm of {spec.search.swarm}" if spec.search else "")
                  + f", {len(spec.benchmarks)} benchmarks, "
                  f"stages {' -> '.join(s.name for s in stages)}")


def _slurm_options(f):
    from rbridge.commands._launching import slurm_options

    return slurm_options(f, workers=False)


@main.command()
@click.argument("spec_path", metavar="SPEC.yaml", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--store", "store", default=None, help="SQLite path or SQLAlchemy URL (default stores/<name>.db).")
@click.option("--force", is_flag=True, help="Accept a spec that changed since the plan began.")
@click.option("--threads", type=click.IntRange(min=1), default=None, envvar="RBRIDGE_THREADS",
              help="CPU threads for torch (default: 1 for proxies under 10M non-embedding parameters, "
                   "else torch's default; on a GPU host, its cores divided among the local processes).")
@click.option("--no-local", "no_local", is_flag=True,
              help="Only coordinate: record the plan and wait while `rbridge worker` processes do the runs.")
@click.option("--workers", type=click.IntRange(min=1), default=None, envvar="RBRIDGE_WORKERS",
              help="Local processes training runs at once, this one included (default: the whole machine: "
                   "cores / threads per run, or GPUs x runs_per_gpu); with --launch slurm: the array's tasks.")
@click.option("--launch", "launcher", type=click.Choice(["slurm"]), default=None,
              help="Record the plan, submit its workers as a SLURM job array (see `rbridge launch slurm --help` "
                   "for the options below) and return.")
@_slurm_options
@guard
def plan(spec_path: Path, store: str | None, force: bool, threads: int | None, no_local: bool,
         workers: int | None, launcher: str | None, **slurm) -> None:
    """Run the plan declared in SPEC; continues it if the store already holds it.

    Any `rbridge worker --store` processes on the same store share the work.
    """
    from rbridge.spec import load_spec

    spec = load_spec(spec_path)
    if launcher is None:
        given = [k for k, v in slurm.items() if v not in (None, 0, 1, ())]
        if given:
            raise InputError("applies with --launch slurm only", field="--" + given[0].replace("_", "-")
                             .replace("time-minutes", "time").replace("sbatch-args", "sbatch-arg"))
        _run(spec, store, force, threads, local=not no_local, workers=workers)
        return
    from rbridge.commands._launching import check_launch, launch_workers, make_options
    from rbridge.planner.plan import default_store_path

    opts = make_options(workers, **slurm)
    where = store or default_store_path(spec)
    check_launch(where, opts)  # before the plan is recorded or anything submitted
    _run(spec, where, force, threads, local=False, record_only=True)
    launch_workers(where, spec.name, [], opts, dry_run=False)


@main.command()
@click.option("--store", "store", default=None, help="Store to continue (default: the most recent under stores/).")
@click.option("--force", is_flag=True, help="Accept a spec file that changed since the plan began.")
@click.option("--threads", type=click.IntRange(min=1), default=None, envvar="RBRIDGE_THREADS",
              help="CPU threads for torch (see rbridge plan --help).")
@click.option("--no-local", "no_local", is_flag=True, help="Only coordinate (see rbridge plan --help).")
@click.option("--workers", type=click.IntRange(min=1), default=None, envvar="RBRIDGE_WORKERS",
              help="Local processes training runs at once (see rbridge plan --help).")
@guard
def resume(store: str | None, force: bool, threads: int | None, no_local: bool, workers: int | None) -> None:
    """Continue the unfinished plan in the store."""
    from rbridge.spec import parse_spec
    from rbridge.store import Plan, open_store
    from sqlmodel import select

    store = store_or_latest(store)
    st = open_store(store, create=False, read_only=True)  # the plan it holds; _run opens it for writing
    with st.session() as s:
        row = s.exec(select(Plan).where(Plan.spec_hash != "").order_by(Plan.updated_at.desc())).first()
        imported = s.exec(select(Plan).where(Plan.spec_hash == "")).first() if row is None else None
    if row is None:
        st.close()
        if imported is not None:
            raise InputError(f"the store holds no plan to resume, only results imported for plan "
                             f"'{imported.name}' (rbridge targets/results import); start the plan with "
                             f"`rbridge plan SPEC.yaml --store {store}`", file=store)
        raise InputError("the store holds no plan yet (a plan killed before it was recorded); "
                         "start it again with `rbridge plan SPEC.yaml`", file=store)
    # The stored spec text is the plan; paths in it resolve against where it was written.
    spec = parse_spec(row.spec_text, Path(row.spec_path or "spec.yaml"))
    if row.status == "done":  # nothing to continue: its ranking, from the store alone (no torch, no data)
        import time

        from rbridge.planner.plan import PlanResult, final_ranking

        t0 = time.perf_counter()
        try:
            ranking, per_trace = final_ranking(st, spec.name, row.id, spec.resolved_stages())
        finally:
            st.close()
        result = PlanResult(row.id, st.url, 0.0, ranking, per_trace=per_trace)
        console.print(f"[bold]plan {spec.name}[/] is done: nothing to continue (`rbridge status` for details)")
        _print_ranking(result.ranking, spec.resolved_stages(), result.items)
        console.print(f"done in {time.perf_counter() - t0:.1f} s")
        return
    st.close()
    _run(spec, store, force, threads, local=not no_local, workers=workers)


def _run(spec, store: str | None, force: bool, threads: int | None = None, local: bool = True,
         workers: int | None = None, record_only: bool = False) -> None:
    from rbridge.planner.plan import run_plan

    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise InputError("rbridge plan runs as one process; under accelerate launch / torchrun run "
                         "`rbridge worker --store URL`, and `rbridge plan --no-local` once, outside it",
                         field="WORLD_SIZE")
    for warning in spec.warnings():
        err_console.print(f"[yellow]warning:[/] {spec.path}: {warning}")
    console.print(f"[bold]rbridge plan[/] {spec.name}: {len(spec.candidates)} candidates"
                  + (f" and a search swarm of {spec.search.swarm}" if spec.search else "") + ", "
                  f"stages {' -> '.join(s.name for s in spec.resolved_stages())}")
    from rbridge.planner import stop

    try:
        with stop.polite_signals():
            result = run_plan(spec, store, report=RichReporter(console), force=force, threads=threads, local=local,
                              poll_s=_poll_s(), heartbeat_timeout=_heartbeat_timeout(), workers=workers,
                              record_only=record_only)
    except stop.Stopped as exc:
        _stopped(exc, "rbridge resume" + (f" --store {store}" if store else ""))
    from rbridge.store.db import safe_url

    if record_only:
        console.print(f"plan recorded in {safe_url(result.store_url)}")
        return
    console.print(f"store: {safe_url(result.store_url)}")
    console.print(f"rungs trained and scored this time: {result.trained_runs}; already done and reused: "
                  f"{result.reused_runs}")
    _print_ranking(result.ranking, spec.resolved_stages(), result.items)
    console.print(f"done in {result.wall_s:.1f} s")


def _poll_s() -> float:
    return float(os.environ.get("RBRIDGE_POLL_S", "2"))


def _heartbeat_timeout(given: float | None = None) -> float:
    from rbridge.planner.claims import DEFAULT_HEARTBEAT_TIMEOUT_S

    return given or float(os.environ.get("RBRIDGE_HEARTBEAT_TIMEOUT", DEFAULT_HEARTBEAT_TIMEOUT_S))


@main.command()
@click.option("--store", "store", required=True, help="The shared store: postgresql://... (or a SQLite path "
              "for workers on one machine).")
@click.option("--plan", "plan_name", default=None, help="Serve only this plan (default: every unfinished plan).")
@click.option("--stage", "stages", multiple=True, help="Take only runs of this stage (repeatable), e.g. small "
              "proxies on CPU workers and large ones on GPU workers.")
@click.option("--until-idle", is_flag=True, help="Exit once the store holds no unfinished plan "
              "(waits while it holds none yet).")
@click.option("--heartbeat-timeout", type=click.FloatRange(min=0.5), default=None,
              help="Seconds without a heartbeat before another worker takes a run over "
                   "(default 60, or $RBRIDGE_HEARTBEAT_TIMEOUT).")
@click.option("--threads", type=click.IntRange(min=1), default=None, envvar="RBRIDGE_THREADS",
              help="CPU threads for torch (see rbridge plan --help).")
@click.option("--ready-on-stdin", is_flag=True, hidden=True,
              help="(rbridge plan's local workers) Load the training code, then wait for a line on stdin before "
                   "opening the store; exit quietly at end of input.")
@guard
def worker(store: str, plan_name: str | None, stages: tuple[str, ...], until_idle: bool,
           heartbeat_timeout: float | None, threads: int | None, ready_on_stdin: bool) -> None:
    """Take runs of the store's plans and do them, alongside any other workers.

    Start any number, on any number of machines, before or after `rbridge plan`.
    A worker that dies has its run taken over by another after the heartbeat
    timeout. Under `accelerate launch`, all processes train each run together.
    """
    from rbridge.planner import stop

    w = None
    try:
        # From the start, before the imports of torch and transformers (seconds): a SLURM task warned early
        # (sbatch --signal may come up to a minute early) or preempted while starting exits politely too.
        with stop.polite_signals():
            from rbridge.planner.worker import Worker

            if ready_on_stdin:
                import importlib

                for module in ("rbridge.planner.steps", "rbridge.proxy.train", "rbridge.scoring.scorer"):
                    importlib.import_module(module)  # torch, transformers, Accelerate: seconds, spent while waiting

                from rbridge.planner.local import read_line_from_stdin, stdin_waiter

                if not read_line_from_stdin():
                    return  # the plan stopped before its store was ready
                wait = {"wait": stdin_waiter()}  # the plan nudges it through stdin when the plan moves
            else:
                wait = {}
            stop.check()
            w = Worker(store, RichReporter(console), plan=plan_name, until_idle=until_idle, poll_s=_poll_s(),
                       threads=threads, heartbeat_timeout=_heartbeat_timeout(heartbeat_timeout),
                       stages=list(stages) or None, **wait)
            done = w.run()
    except stop.Stopped as exc:
        if w is None or not w.claimed_any:
            console.print(f"{exc} before it took a run: nothing to give back")
            sys.exit(exc.exit_code)
        if ready_on_stdin:  # one of `rbridge plan`'s own processes: the plan gives the advice
            console.print(f"{exc}: its run was checkpointed and given back")
            sys.exit(exc.exit_code)
        _stopped(exc, f"rbridge worker --store {store}" + (f" --plan {plan_name}" if plan_name else ""))
    if w.ranks.main:
        console.print(f"worker idle: no unfinished plan left; rungs trained and scored by this worker: {done}")
    else:
        console.print(f"rank {w.ranks.rank}: trained {done} rungs with rank 0")


def _print_ranking(rows: list[dict], stages, per_trace=None) -> None:
    """The final tables; ``per_trace(stage, metric)`` gives {(candidate, benchmark): per-trace values} of each
    candidate's last evaluation, for the paired tie rule."""
    from rbridge.analysis.separation import mark_ties

    metric_of = {s.name: s.pruning.metric for s in stages}
    for stage in [s.name for s in stages]:
        sel = [r for r in rows if r["stage"] == stage and r["metric"] == metric_of[stage]]
        if not sel:
            continue
        items = per_trace(stage, metric_of[stage]) if per_trace is not None else {}
        mark_ties(sel, group=lambda r: (r["benchmark"], r["tokens_seen"]),
                  items=lambda r: [items[(r["candidate"], r["benchmark"])]] if (r["candidate"], r["benchmark"])
                  in items else None)
        table = Table(title=f"ranking - stage {stage} ({metric_of[stage]}, lower is better)")
        for col in ("rank", "candidate", "benchmark", metric_of[stage], "95% CI", "vs next", "tokens", "status"):
            table.add_column(col, justify="right" if col in ("rank", "tokens", metric_of[stage]) else "left")
        for r in sel:
            table.add_row(str(r["rank"]), r["candidate"], r["benchmark"], f"{r['value']:.4f}", _ci(r),
                          _vs_next(r.get("separated_from_next")), f"{r['tokens_seen']:,}", r["status"])
        console.print(table)
        _tie_legend(sel)


def _tie_legend(rows: list[dict]) -> None:
    """What "tie" means under the rows' rule: paired (per-trace values stored) or unpaired (older rows)."""
    ties = [r for r in rows if r.get("separated_from_next") is False]
    if not ties:
        return
    if all(r.get("separated_from_next_paired") for r in ties):
        console.print("  tie: the 95% paired-bootstrap interval of the two scores' difference (the benchmark's "
                      "traces resampled together) contains 0: resampling the traces could swap them; not a decision")
    else:
        console.print("  tie: the two scores differ by less than the 95% bootstrap interval over the "
                      "benchmark's traces (resampling the traces could swap them); not a decision")


def _ci(r: dict, low: str = "ci_low", high: str = "ci_high") -> str:
    return "-" if r.get(low) is None else f"[{r[low]:.4f}, {r[high]:.4f}]"


def _vs_next(separated) -> str:
    return {None: "", True: "separated", False: "[yellow]tie[/]"}[separated]


# ---------------------------------------------------------------------------- status
@main.command()
@click.option("--store", "store", default=None, help="Store to read (default: the most recent under stores/).")
@click.option("--plan", "plan_name", default=None, help="Plan name, when the store holds several.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (every candidate of every stage).")
@click.option("--top", type=click.IntRange(min=0), default=20, show_default=True,
              help="Candidates listed per stage: the best ranked, then any running or failed ones.")
@click.option("--all", "show_all", is_flag=True, help="List every candidate of every stage.")
@guard
def status(store: str | None, plan_name: str | None, as_json: bool, top: int, show_all: bool) -> None:
    """Stages, candidates, decisions, scores, progress, compute spent.

    A stage lists its --top best candidates (and any running or failed), then counts the
    rest by status: a table of thousands of rows is slow to print and not read.
    """
    from rbridge.analysis.status import plan_status
    from rbridge.planner.disk import human_bytes

    store = store_or_latest(store)
    st = open_for_reading(store)
    info = plan_status(st, plan_name)
    if as_json:
        from rbridge.analysis.decision import analysis_summary

        info["analysis"] = analysis_summary(st, info["plan"])
        click.echo(json.dumps(info, indent=2, default=str))
        return
    limit = None if show_all else top
    revision = f", spec revision {info['revision']}" if info["revision"] else ""
    console.print(f"[bold]plan {info['plan']}[/] ({info['status']}{revision}) in {info['store']}")
    interrupted = info["status"] == "interrupted"
    if interrupted:
        where = info["store"][len("sqlite:///"):] if info["store"].startswith("sqlite:///") else info["store"]
        console.print(f"  [yellow]interrupted[/]: no process is running this plan (it was stopped or killed); "
                      f"nothing trained is lost: continue with `rbridge resume --store {where}`")
    for stage in info["stages"]:
        rows = stage["candidates"]
        shown = _status_rows(rows, limit)
        target = stage.get("role") == "target"
        title = (f"stage {stage['name']} (target, never prunes): {stage['metric']} (lower is better) and task "
                 "accuracy" if target else
                 f"stage {stage['name']}: {stage['metric']} (lower is better), {len(stage['survivors'])} survivors")
        table = Table(title=title)
        cols = ["rank", "candidate", stage["metric"], "95% CI", "vs next", "tokens", "status", "decision",
                "params", "FLOPs", "tok/s", "MFU"]
        if target:
            cols.insert(3, "accuracy")
        for col in cols:
            table.add_column(col, no_wrap=True)
        for r in shown:
            d = r["decision"]
            dec = "" if d is None else f"{'kept' if d['kept'] else 'dropped'} r{d['rung']}"
            acc = [f"{r['accuracy']:.1%}" if r.get("accuracy") is not None else "-"] if target else []
            table.add_row(str(r["rank"] or "-"), r["candidate"],
                          "-" if r["score"] is None else f"{r['score']:.4f}", *acc, _ci(r),
                          _vs_next(r.get("separated_from_next")),
                          f"{si(r['tokens_seen'])}/{si(r['tokens_target'])}",
                          r["status"] + (f" ({_holder(r['worker'])})" if r.get("worker") else ""), dec,
                          si(r["params"]), f"{r['train_flops']:.1e}", f"{r['tokens_per_s']:,.0f}",
                          f"{r['mfu']:.0%}" if r["mfu"] else "-")
        console.print(table)
        _tie_legend(shown)
        if len(shown) < len(rows):
            console.print(f"  {len(rows) - len(shown):,} more of {len(rows):,} candidates not listed "
                          f"({_status_counts(rows, shown)}); --all lists them, --json "
                          "gives every field")
        eta = "-" if stage["eta_s"] is None or (interrupted and stage["eta_s"]) else f"{stage['eta_s']:.0f} s"
        console.print(f"  rung {stage['rung']}/{stage['evals']}, {stage['progress']:.0%} of the stage's tokens, "
                      f"ETA {eta}; compute: train {stage['train_flops']:.2e} + scoring {stage['score_flops']:.2e} "
                      f"FLOPs, {stage['wall_s']:.0f} s of training; disk {human_bytes(stage['disk_bytes'])}")
        if stage.get("repeats"):
            by_source: dict[str, list[str]] = {}
            for cand, reps in stage["repeats"].items():
                for src, epochs in reps.items():
                    by_source.setdefault(src, []).append(f"{cand} {epochs:.1f}x")
            console.print("  [yellow]data repeated[/] (a source trained on more than once): " + "; ".join(
                f"{src}: {', '.join(v[:limit] if limit else v)}" + (f" and {len(v) - limit} more"
                                                                    if limit and len(v) > limit else "")
                for src, v in sorted(by_source.items())))
        if stage["devices"]:
            on = ", ".join(stage["devices"])
            threads = f", {stage['threads']} CPU thread(s) per run" if stage["threads"] else ""
            precision = f", {'/'.join(stage['precisions'])}" if stage["precisions"] else ""
            mfu = f", MFU {stage['mfu']:.1%}" if stage["mfu"] else ""
            console.print(f"  trained on {on}{threads}{precision}{mfu} (MFU: model FLOPs/s over the device's peak, "
                          "rbridge.proxy.peak)")
            if stage.get("precision_rates"):
                console.print(f"  precision auto measured {stage['precision_rates']['text']}")
    if info["superseded"]:
        by_rev: dict[int, list[str]] = {}
        for r in info["superseded"]:
            score = "" if r["score"] is None else f" {r['score']:.4f}"
            by_rev.setdefault(r["revision"], []).append(f"{r['stage']}/{r['candidate']} ({r['status']}, rung "
                                                        f"{r['rung']}{score})")
        console.print(f"[bold]superseded[/] by spec edits (kept; `rbridge plan OLD_SPEC --force` reuses them): "
                      f"{len(info['superseded'])} runs, disk {human_bytes(info['superseded_disk_bytes'])}")
        for rev, rows in sorted(by_rev.items()):
            more = "" if limit is None or len(rows) <= limit else f", ... {len(rows) - limit:,} more (--all)"
            console.print(f"  revision {rev}: {', '.join(rows[:limit])}{more}")
    _print_launches(info)
    c = info["compute"]
    console.print(f"[bold]compute[/]: spent {c['spent_flops']:.2e} FLOPs "
                  f"(train {c['train_flops']:.2e}, scoring {c['score_flops']:.2e}), {c['wall_s']:.0f} s")
    if c.get("target_stage_flops"):
        console.print(f"  target stages (checking the decision, not part of its cost): "
                      f"{c['target_stage_flops']:.2e} FLOPs, {c['target_stage_wall_s']:.0f} s; "
                      + (f"{c['target_stage_ratio']:,.1f}x the proxies' compute" if c.get("target_stage_ratio")
                         else ""))
    if c.get("naive_flops"):
        red = f"{c['reduction']:.1f}x" if c.get("reduction") else "-"
        console.print(f"  naive: {c['naive_flops']:.2e} FLOPs = {c['naive_basis']}; reduction {red}")
    if c.get("target_flops"):
        console.print(f"  with the target model: total {c['target_total_flops']:.2e} vs naive "
                      f"{c['target_naive_flops']:.2e} FLOPs = {c['target_fraction']:.1%} of the naive cost "
                      f"(reduction {c['target_reduction']:.1f}x, METHOD.md section 7)")
    report_file = _report_path(info)
    where = info["store"][len("sqlite:///"):] if info["store"].startswith("sqlite:///") else info["store"]
    if report_file is not None and report_file.is_file():
        console.print(f"[bold]report[/]: {report_file} (charts; `rbridge report --store {where}` refreshes it)")
    else:
        console.print(f"[bold]report[/]: `rbridge report --store {where}` writes an HTML report with charts")


@main.command()
@click.option("--store", "store", default=None, help="Store whose runs to clean (default: the most recent under stores/).")
@click.option("--plan", "plan_name", default=None, help="Only this plan (default: every plan in the store).")
@click.option("--dry-run", is_flag=True, help="Say what would be removed and the sizes after; remove nothing.")
@guard
def clean(store: str | None, plan_name: str | None, dry_run: bool) -> None:
    """Free disk: finished runs keep their exported model, not their training checkpoints.

    \b
    done runs      full checkpoints removed: nothing trains them again; model/ stays
    pruned runs    their newest checkpoint while the plan runs (a --force edit that
                   promotes one continues it from there); reduced to model/ once the
                   plan is done (a later promotion trains it again from its start:
                   the same result, its tokens again)
    superseded     as live runs of the same status (their results stay in the store)
    pending, running, failed runs: untouched (`rbridge resume` continues them)

    Plans do this themselves as they go (spec: finished_runs: model, the default;
    finished_runs: checkpoint keeps the checkpoints); clean applies it on demand,
    whatever the spec says, and to plans run before it existed. Nothing in the
    store changes.
    """
    from rbridge.planner.disk import clean_plan, human_bytes
    from rbridge.store import open_store
    from rbridge.store import plans as plan_ops

    store = store_or_latest(store)
    st = open_store(store, create=False, read_only=True)
    try:
        plans = plan_ops.list_plans(st, plan_name)
        if not plans:
            raise InputError(f"no plan {plan_name!r} in this store" if plan_name else "the store holds no plan",
                             file=store)
        table = Table(title=("would free (dry run)" if dry_run else "freed") + " per stage")
        for col in ("plan", "stage", "runs", "before", "after", "freed"):
            table.add_column(col, no_wrap=True, justify="left" if col in ("plan", "stage") else "right")
        total_before = total_freed = 0
        left: list = []
        for plan in plans:
            for row in clean_plan(st, plan, dry_run=dry_run):
                left += row.damaged
                table.add_row(plan.name, row.stage, str(row.runs), human_bytes(row.before), human_bytes(row.after),
                              human_bytes(row.freed))
                total_before += row.before
                total_freed += row.freed
        console.print(table)
        verb = "would free" if dry_run else "freed"
        console.print(f"{verb} {human_bytes(total_freed)}: {human_bytes(total_before)} before, "
                      f"{human_bytes(total_before - total_freed)} after")
        if left:
            console.print(f"left in place: {len(left)} damaged checkpoint(s) a resume set aside (inspect, then "
                          f"delete by hand): {', '.join(str(p) for p in left)}")
    finally:
        st.close()


@main.command()
@click.option("--vocab", type=click.IntRange(min=2), default=8192, show_default=True,
              help="Vocabulary size for the totals (the spec's tokenizer; 8,192 is its default).")
@click.option("--seq-len", type=click.IntRange(min=1), default=256, show_default=True,
              help="Sequence length for the attention term of the FLOPs per token.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@guard
def presets(vocab: int, seq_len: int, as_json: bool) -> None:
    """The proxy presets (`proxy: {preset: NAME}`): shapes, parameters and training FLOPs per token.

    A preset is named by its non-embedding parameters (Kaplan et al.'s convention, the
    N of the plan's compute figures: 6·N·D training FLOPs); the total adds the token
    embedding, tied with the output layer, which dominates the small presets. "with
    output & attention" adds the output layer and attention's 12·L·d·T (PaLM's count,
    used for MFU).
    """
    from rbridge.proxy.config import PRESETS, count_params

    rows = []
    for name, shape in PRESETS.items():
        total, non_emb = count_params(shape, vocab)
        h, layers = shape["hidden_size"], shape["num_hidden_layers"]
        full = 6.0 * (non_emb + vocab * h) + 12.0 * layers * h * seq_len
        rows.append({"preset": name, **shape, "non_embedding_params": non_emb, "total_params": total,
                     "train_flops_per_token": 6.0 * non_emb, "train_flops_per_token_full": full})
    if as_json:
        click.echo(json.dumps({"vocab_size": vocab, "seq_len": seq_len, "presets": rows}, indent=2))
        return
    table = Table(title=f"proxy presets (vocab {vocab:,}, seq_len {seq_len})")
    for col in ("preset", "hidden", "layers", "heads", "kv heads", "intermediate", "non-embedding",
                f"total (vocab {vocab:,})", "train FLOPs/token (6N)", "with output & attention"):
        table.add_column(col, justify="left" if col == "preset" else "right", no_wrap=True)
    for r in rows:
        table.add_row(r["preset"], str(r["hidden_size"]), str(r["num_hidden_layers"]), str(r["num_attention_heads"]),
                      str(r["num_key_value_heads"]), str(r["intermediate_size"]), si(r["non_embedding_params"]),
                      si(r["total_params"]), f"{r['train_flops_per_token']:.2e}",
                      f"{r['train_flops_per_token_full']:.2e}")
    console.print(table)


def _print_launches(info: dict) -> None:
    """The plan's job arrays and what SLURM says of their tasks now (finished tasks have left its queue)."""
    live = [launch for launch in info.get("launches", []) if not launch["cancelled_at"]]
    if not info.get("launches"):
        return
    from rbridge.launch.slurm import slurm_task, task_states

    states = task_states([launch["job_id"] for launch in live])
    holds = {slurm_task(r["worker"]): f"{st['name']}/{r['candidate']}" for st in info["stages"]
             for r in st["candidates"] if r.get("worker") and slurm_task(r["worker"])}
    for launch in info["launches"]:
        job = launch["job_id"]
        head = f"[bold]slurm job array {job}[/] ({launch['tasks']} task(s), submitted {launch['submitted_at'][:19]})"
        if launch["cancelled_at"]:
            console.print(f"{head}: cancelled")
            continue
        tasks = states.get(job, [])
        if not tasks:
            console.print(f"{head}: no task left in SLURM's queue (finished, or cancelled outside rbridge)")
            continue
        shown = []
        for task, state, where in tasks:
            held = holds.get(f"{job}_{task}")
            shown.append(f"{job}_{task} {state}" + (f" on {where}" if state == "RUNNING" else f" ({where})")
                         + (f", training {held}" if held else ""))
        console.print(f"{head}: " + "; ".join(shown))


def _holder(worker: str) -> str:
    """A run's holder as status shows it: host:pid, and the SLURM array task it runs in."""
    from rbridge.launch.slurm import slurm_task

    host, _, rest = worker.partition(":")
    task = slurm_task(worker)
    return f"{host}:{rest.split(':', 1)[0]}" + (f", slurm {task}" if task else "")


def _status_rows(rows: list[dict], limit: int | None) -> list[dict]:
    """The rows `rbridge status` lists, in ranking order: the first ``limit`` (all when None), then up to
    ``limit`` more that are running or failed (what someone watching a plan looks for)."""
    if limit is None or len(rows) <= limit:
        return rows
    watch = [i for i, r in enumerate(rows[limit:], start=limit) if r["status"] in ("running", "failed")][:limit]
    return rows[:limit] + [rows[i] for i in watch]


def _status_counts(rows: list[dict], shown: list[dict]) -> str:
    """'4,980 done, 10 pruned': the rows not shown, counted by status, most common first."""
    from collections import Counter

    listed = {id(r) for r in shown}
    counts = Counter(r["status"] for r in rows if id(r) not in listed)
    return ", ".join(f"{n:,} {status}" for status, n in counts.most_common())


def _stopped(exc, how: str) -> None:
    """Exit 143 (SIGTERM) or 130 (SIGINT) after a polite stop: the running proxy was checkpointed."""
    import sys

    console.print(f"{exc}: the running proxy was checkpointed and given back; continue with `{how}` (nothing "
                  "trained is lost)")
    sys.exit(exc.exit_code)


def _report_path(info: dict):
    """Where `rbridge report` writes a SQLite store's report by default (None for a server store)."""
    url = info["store"]
    if not url.startswith("sqlite:///"):
        return None
    return Path(url[len("sqlite:///"):]).parent / f"{info['plan']}.report.html"
