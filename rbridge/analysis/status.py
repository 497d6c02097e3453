"""What a plan has done so far, per stage: candidates, scores, ranks, decisions, compute.

Read-only: safe to call from another process while a plan runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rbridge.analysis.compute import non_embedding_params, plan_compute
from rbridge.analysis.separation import mark_ties, stage_items
from rbridge.errors import InputError
from rbridge._du import folder_bytes
from rbridge.spec import stored_stages

if TYPE_CHECKING:
    from rbridge.store.db import Store
    from rbridge.store.sqlite_read import SQLiteReader


def _shown_url(url: str) -> str:
    """The store's URL for output, any password masked (SQLite URLs have none: SQLAlchemy not needed)."""
    if url.startswith("sqlite"):
        return url
    from rbridge.store.db import safe_url

    return safe_url(url)


# The columns of a run that status reports: read as plain rows, not ORM objects (a plan of
# 10,000 runs and 30,000 evaluations loads in a tenth of the time).
_RUN_COLUMNS = ("id", "stage", "stage_index", "candidate_id", "status", "worker", "tokens_seen", "tokens_target",
                "params", "non_embedding_params", "train_flops", "score_flops", "wall_s", "tokens_per_s",
                "superseded_by", "checkpoint", "threads", "device", "precision", "precision_rates", "mfu", "config",
                "heartbeat_at", "beat_every_s")
_PLAN_COLUMNS = ("id", "name", "status", "revision", "spec_hash", "spec_text", "spec_path")


def plan_status(store: Store | SQLiteReader, plan_name: str | None = None) -> dict[str, Any]:
    """A JSON-ready summary of one plan in the store (the only or most recent one by default).

    Five bulk reads in one transaction (the plan, its candidates, runs, evaluations and live
    decisions), of the columns it needs, as plain rows: through SQLAlchemy (``Store``) or,
    for `rbridge status` on a SQLite file, sqlite3 alone (``SQLiteReader``).
    """
    with store.reading() as rows:
        plan_sql = f"SELECT {', '.join(_PLAN_COLUMNS)} FROM plans "
        found = (rows(plan_sql + "WHERE name = :name", name=plan_name) if plan_name
                 else rows(plan_sql + "ORDER BY updated_at DESC LIMIT 1"))
        if not found:
            raise InputError("no plan in this store" + (f" named '{plan_name}'" if plan_name else ""),
                             file=store.url)
        plan = dict(zip(_PLAN_COLUMNS, found[0]))
        every = {i: {"name": name, "mix": mix, "position": position, "superseded_by": sup}
                 for i, name, mix, position, sup in rows(
                     "SELECT id, name, mix, position, superseded_by FROM candidates WHERE plan_id = :p", p=plan["id"])}
        cands = {i: c for i, c in every.items() if not c["superseded_by"]}
        all_runs = [dict(zip(_RUN_COLUMNS, r)) for r in rows(
            f"SELECT {', '.join(_RUN_COLUMNS)} FROM runs WHERE plan_id = :p ORDER BY stage_index, id", p=plan["id"])]
        runs = [r for r in all_runs if not r["superseded_by"]]
        # Per run in id order, as the rows were recorded (a score averages its benchmarks in that order).
        evals = rows("SELECT run_id, rung, benchmark, metric, value, ci_low, ci_high FROM evaluations "
                     "WHERE run_id IN (SELECT id FROM runs WHERE plan_id = :p) ORDER BY run_id, id", p=plan["id"])
        decisions = rows("SELECT stage, candidate_id, rung, kept, rank, why FROM decisions "
                         "WHERE plan_id = :p AND superseded_by = 0 ORDER BY rung, id", p=plan["id"])
        launched = [dict(zip(("scheduler", "job_id", "tasks", "submitted_at", "cancelled_at"), r)) for r in rows(
            "SELECT scheduler, job_id, tasks, submitted_at, cancelled_at FROM launches WHERE plan_id = :p "
            "ORDER BY id", p=plan["id"])]
    try:  # the stages only: the candidates, nearly all of a large spec, are rows read above
        resolved, target_model = stored_stages(plan["spec_text"], Path(plan["spec_path"] or "spec.yaml"))
        stage_specs, has_spec = {st.name: st for st in resolved}, True
    except InputError:  # an imported plan (issue 5) has no spec
        stage_specs, target_model, has_spec = {}, None, False

    by_run: dict[int, list[tuple]] = {}  # run id -> (rung, benchmark, metric, value) in id order
    ci: dict[tuple, tuple] = {}  # (run id, rung, benchmark, metric) -> (low, high)
    for run_id, rung, benchmark, metric, value, low, high in evals:
        by_run.setdefault(run_id, []).append((rung, benchmark, metric, value))
        if low is not None:
            ci[(run_id, rung, benchmark, metric)] = (low, high)
    last_decision: dict[tuple[str, int], dict] = {}
    for stage, candidate_id, rung, kept, rank, why in decisions:
        last_decision[(stage, candidate_id)] = {"rung": rung, "kept": bool(kept), "rank": rank, "why": why}

    stages: list[dict[str, Any]] = []
    stage_order: list[str] = []
    for run in runs:
        if run["stage"] not in stage_order:
            stage_order.append(run["stage"])
    for name in stage_order:
        st_spec = stage_specs.get(name)
        metric = st_spec.pruning.metric if st_spec else "rbridge"
        rows = []
        for run in (r for r in runs if r["stage"] == name):
            ev = by_run.get(run["id"], [])
            rung = max((e[0] for e in ev), default=0)
            at_rung = [e for e in ev if e[0] == rung]
            score_vals = [value for _, _, m, value in at_rung if m == metric]
            # The decision score's interval: the benchmarks' bounds averaged like their scores.
            bounds = [ci.get((run["id"], rung, b, m)) for _, b, m, _v in at_rung if m == metric]
            have = bounds and all(bounds)
            d = last_decision.get((name, run["candidate_id"]))
            rows.append({
                "candidate": cands[run["candidate_id"]]["name"],
                "status": run["status"],
                "worker": run["worker"] if run["status"] == "running" else "",  # host:pid:boot of the holder
                "rung": rung,
                "tokens_seen": run["tokens_seen"],
                "tokens_target": run["tokens_target"],
                "score": sum(score_vals) / len(score_vals) if score_vals else None,
                "ci_low": sum(b[0] for b in bounds) / len(bounds) if have else None,
                "ci_high": sum(b[1] for b in bounds) / len(bounds) if have else None,
                "scores": {f"{b}/{m}": value for _, b, m, value in at_rung},
                "decision": None if d is None else dict(d),
                "params": run["params"],
                "non_embedding_params": run["non_embedding_params"],
                "train_flops": run["train_flops"],
                "score_flops": run["score_flops"],
                "wall_s": run["wall_s"],
                "tokens_per_s": run["tokens_per_s"],
                "threads": run["threads"],
                "device": run["device"],
                "precision": run["precision"],
                "precision_rates": _rates(run["precision_rates"]),
                "mfu": run["mfu"],
            })
        reached = sorted(rows, key=lambda r: (-r["tokens_seen"], r["score"] if r["score"] is not None else 1e300,
                                              r["candidate"]))
        for i, r in enumerate(reached, start=1):
            r["rank"] = i if r["score"] is not None else None
        per_trace = _stage_items(store, plan["id"], name, metric, len(reached))
        mark_ties(reached, group=lambda r: r["tokens_seen"], value="score",
                  items=lambda r: per_trace.get((r["candidate"], r["rung"])))
        role = st_spec.role if st_spec else "proxy"
        accuracy = {}  # a target stage's accuracy per candidate: the mean over benchmarks at its last rung
        for r in rows:
            vals = [v for k, v in r["scores"].items() if k.endswith("/accuracy")]
            if vals:
                r["accuracy"] = accuracy[r["candidate"]] = sum(vals) / len(vals)
        stages.append({
            "name": name,
            "role": role,
            "group": st_spec.group if st_spec else name,
            "metric": metric,
            "evals": st_spec.pruning.evals if st_spec else None,
            "tokens": st_spec.training.tokens if st_spec else None,
            "candidates": reached,
            "survivors": [r["candidate"] for r in reached if r["status"] not in ("pruned",)],
            "train_flops": sum(r["train_flops"] for r in rows),
            "score_flops": sum(r["score_flops"] for r in rows),
            "wall_s": sum(r["wall_s"] for r in rows),
            # Bytes of the stage's run folders (checkpoints and exported models; rbridge.planner.disk),
            # as this machine sees the folders the runs recorded.
            # Sources a run trains on more than once: {candidate: {source: epochs}} (recorded when it opened).
            "repeats": {cands[r["candidate_id"]]["name"]: rep for r in runs if r["stage"] == name
                        for rep in [_repeats(r["config"])] if rep},
            "disk_bytes": sum(folder_bytes(r["checkpoint"]) for r in runs if r["stage"] == name and r["checkpoint"]),
            **_hardware(rows),
        })
    target = last = None
    if has_spec:
        if target_model is not None:
            target = (target_model.params, target_model.tokens)
        final = [st for st in stage_specs.values() if not st.is_target][-1]
        last = (non_embedding_params(final), final.training.tokens)
        for name, st in stage_specs.items():  # stages not started yet
            if name not in stage_order:
                stages.append({"name": name, "role": st.role, "group": st.group or name, "metric": st.pruning.metric,
                               "evals": st.pruning.evals, "tokens": st.training.tokens,
                               "candidates": [], "survivors": [], "train_flops": 0.0, "score_flops": 0.0,
                               "wall_s": 0.0, "disk_bytes": 0, "repeats": {}, "threads": 0, "devices": [], "precisions": [],
                               "precision_rates": None, "mfu": None})
    _add_progress(stages, stage_specs)
    superseded = []  # runs an accepted spec edit set aside: kept, left out of the stages above
    for run in sorted((r for r in all_runs if r["superseded_by"]),
                      key=lambda r: (r["superseded_by"], r["stage_index"], r["id"])):
        ev = by_run.get(run["id"], [])
        rung = max((e[0] for e in ev), default=0)
        metric = stage_specs[run["stage"]].pruning.metric if run["stage"] in stage_specs else "rbridge"
        vals = [value for r, _, m, value in ev if r == rung and m == metric]
        superseded.append({"revision": run["superseded_by"], "stage": run["stage"],
                           "candidate": every[run["candidate_id"]]["name"], "status": run["status"], "rung": rung,
                           "tokens_seen": run["tokens_seen"], "score": sum(vals) / len(vals) if vals else None,
                           "checkpoint": run["checkpoint"]})
    status = plan["status"]
    live_launch = any(not launch["cancelled_at"] for launch in launched)  # a scheduler may start workers
    if status == "running" and not live_launch and _nobody_runs(store.url, runs):
        status = "interrupted"
    return {
        "plan": plan["name"],
        "status": status,
        "revision": plan["revision"],
        "superseded": superseded,
        "launches": [{k: (str(v) if k.endswith("_at") and v is not None else v) for k, v in launch.items()}
                     for launch in launched],
        "superseded_disk_bytes": sum(folder_bytes(r["checkpoint"]) for r in superseded if r["checkpoint"]),
        "spec_hash": plan["spec_hash"],
        "store": _shown_url(store.url),
        "candidates": [c["name"] for c in sorted(cands.values(), key=lambda c: c["position"])],
        "mixtures": {c["name"]: json.loads(c["mix"]) for c in cands.values()},
        "stages": stages,
        "compute": plan_compute(stages, len(cands), last, target),
    }


def _nobody_runs(url: str, runs: list[dict]) -> bool:
    """Whether a plan the store calls running has nobody running it: no `rbridge plan` holds its SQLite
    store's lock (the kernel drops the lock when the process dies, even by SIGKILL) and no run has a
    heartbeat younger than three beat intervals (a `rbridge worker` training it). Stores on a server
    (PostgreSQL) have workers this machine cannot see between runs: never judged interrupted here."""
    if not url.startswith("sqlite:///"):
        return False
    import fcntl
    from datetime import datetime, timezone

    lock = Path(url[len("sqlite:///"):] + ".lock")
    try:
        with open(lock) as fh:  # read only: status creates nothing
            try:
                fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # a plan process holds it
            fcntl.flock(fh, fcntl.LOCK_UN)
    except OSError:
        pass  # no lock file: no plan process
    now = datetime.now(timezone.utc)
    for r in runs:
        if r["status"] != "running" or not r.get("heartbeat_at"):
            continue
        at = r["heartbeat_at"]
        if isinstance(at, str):
            try:
                at = datetime.fromisoformat(at)
            except ValueError:
                return False
        if at.tzinfo is None:
            at = at.replace(tzinfo=timezone.utc)
        if (now - at).total_seconds() < 3 * max(float(r.get("beat_every_s") or 0), 20.0):
            return False
    return True


def _repeats(config: str | None) -> dict[str, float]:
    """{source: epochs} of the sources a run's recorded config says it trains on more than once."""
    try:
        epochs = json.loads(config or "{}").get("epochs") or {}
    except (ValueError, AttributeError):
        return {}
    return {src: round(float(e), 3) for src, e in sorted(epochs.items()) if float(e) > 1.0}


PAIRED_MAX_ROWS = 2000  # larger stages keep the unpaired tie rule: parsing every run's items costs seconds


def _stage_items(store, plan_id: int, stage: str, metric: str, n_rows: int) -> dict[tuple, list]:
    """{(candidate, rung): [per-trace values of each benchmark, benchmarks in name order]} for the paired
    tie rule (rbridge.analysis.separation); empty for large stages and stores without per-trace values."""
    if n_rows > PAIRED_MAX_ROWS:
        return {}
    with store.reading() as rows:
        found = stage_items(rows, plan_id, stage, metric)
    return {k: [v[b] for b in sorted(v)] for k, v in found.items()}


def _rates(text: str) -> dict[str, Any] | None:
    """A run's recorded precision measurement as {fp32, bf16, speedup, how, machine, threads, text}."""
    from rbridge.proxy.rates import Rates

    r = Rates.from_json(text or "")
    if r is None:
        return None
    return {"fp32": r.fp32, "bf16": r.bf16, "speedup": round(r.speedup, 3), "how": r.how, "machine": r.machine,
            "threads": r.threads, "text": r.describe()}


def _hardware(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """A stage's threads, devices, precisions and MFU (the runs' MFU weighted by their training seconds)."""
    timed = [r for r in rows if r["mfu"] and r["wall_s"]]
    wall = sum(r["wall_s"] for r in timed)
    return {"threads": max((r["threads"] for r in rows), default=0),
            "devices": sorted({r["device"] for r in rows if r["device"]}),
            "precisions": sorted({r["precision"] for r in rows if r["precision"]}),
            # the measurement that chose the stage's precision (its first run's; rows come in run order)
            "precision_rates": next((r["precision_rates"] for r in rows if r["precision_rates"]), None),
            "mfu": sum(r["mfu"] * r["wall_s"] for r in timed) / wall if wall else None}


def _add_progress(stages: list[dict[str, Any]], specs: dict) -> None:
    """Per stage: the rung reached, the share of its token budget trained, and an ETA.

    The ETA assumes the runs still in the stage train at the stage's measured
    tokens/s (or the previous stage's, scaled by parameter count, before any has).
    """
    for st in stages:
        rows = st["candidates"]
        live = [r for r in rows if r["status"] not in ("pruned", "done", "failed")]
        total = sum(r["tokens_target"] for r in rows)
        # A pruned run is finished work: its remaining tokens will never be trained.
        seen = sum(r["tokens_target"] if r["status"] == "pruned" else r["tokens_seen"] for r in rows)
        rates = [r["tokens_per_s"] for r in rows if r["tokens_per_s"]]
        rate = sum(rates) / len(rates) if rates else None
        remaining = sum(r["tokens_target"] - r["tokens_seen"] for r in live)
        st["rung"] = max((r["rung"] for r in rows), default=0)
        st["progress"] = seen / total if total else 0.0
        st["remaining_tokens"] = remaining
        st["eta_s"] = (remaining / rate) if rate and remaining else (0.0 if rows and not live else None)
