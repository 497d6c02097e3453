"""What a plan has done so far, per stage: candidates, scores, ranks, decisions, compute.

Read-only: safe to call from another process while a plan runs.
"""

from __future__ import annotations

import json
from typing import Any

from sqlmodel import select

from pathlib import Path

from rbridge.analysis.compute import non_embedding_params, plan_compute
from rbridge.errors import InputError
from rbridge.store.db import safe_url
from rbridge.spec import parse_spec
from rbridge.store import Candidate, Decision, Evaluation, Plan, Run, Store


def plan_status(store: Store, plan_name: str | None = None) -> dict[str, Any]:
    """A JSON-ready summary of one plan in the store (the only or most recent one by default)."""
    with store.session() as s:
        q = select(Plan).order_by(Plan.updated_at.desc())
        if plan_name:
            q = select(Plan).where(Plan.name == plan_name)
        plan = s.exec(q).first()
        if plan is None:
            raise InputError("no plan in this store" + (f" named '{plan_name}'" if plan_name else ""),
                             file=store.url)
        every = {c.id: c for c in s.exec(select(Candidate).where(Candidate.plan_id == plan.id)).all()}
        cands = {i: c for i, c in every.items() if not c.superseded_by}
        all_runs = s.exec(select(Run).where(Run.plan_id == plan.id).order_by(Run.stage_index, Run.id)).all()
        runs = [r for r in all_runs if not r.superseded_by]
        evals = s.exec(select(Evaluation).join(Run, Run.id == Evaluation.run_id)
                       .where(Run.plan_id == plan.id)).all()
        decisions = s.exec(select(Decision).where(Decision.plan_id == plan.id, Decision.superseded_by == 0)
                           .order_by(Decision.rung)).all()
    try:
        spec = parse_spec(plan.spec_text, Path(plan.spec_path or "spec.yaml"), check_files=False)
        stage_specs = {st.name: st for st in spec.resolved_stages()}
    except InputError:  # an imported plan (issue 5) has no spec
        spec, stage_specs = None, {}

    by_run: dict[int, list[Evaluation]] = {}
    for e in evals:
        by_run.setdefault(e.run_id, []).append(e)
    last_decision: dict[tuple[str, int], Decision] = {}
    for d in decisions:
        last_decision[(d.stage, d.candidate_id)] = d

    stages: list[dict[str, Any]] = []
    stage_order: list[str] = []
    for run in runs:
        if run.stage not in stage_order:
            stage_order.append(run.stage)
    for name in stage_order:
        st_spec = stage_specs.get(name)
        metric = st_spec.pruning.metric if st_spec else "rbridge"
        rows = []
        for run in (r for r in runs if r.stage == name):
            ev = by_run.get(run.id, [])
            rung = max((e.rung for e in ev), default=0)
            at_rung = [e for e in ev if e.rung == rung]
            score_vals = [e.value for e in at_rung if e.metric == metric]
            scores = {f"{e.benchmark}/{e.metric}": e.value for e in at_rung}
            d = last_decision.get((name, run.candidate_id))
            rows.append({
                "candidate": cands[run.candidate_id].name,
                "status": run.status,
                "worker": run.worker if run.status == "running" else "",  # host:pid:boot of the holder
                "rung": rung,
                "tokens_seen": run.tokens_seen,
                "tokens_target": run.tokens_target,
                "score": sum(score_vals) / len(score_vals) if score_vals else None,
                "scores": scores,
                "decision": None if d is None else {"rung": d.rung, "kept": d.kept, "rank": d.rank, "why": d.why},
                "params": run.params,
                "non_embedding_params": run.non_embedding_params,
                "train_flops": run.train_flops,
                "score_flops": run.score_flops,
                "wall_s": run.wall_s,
                "tokens_per_s": run.tokens_per_s,
            })
        reached = sorted(rows, key=lambda r: (-r["tokens_seen"], r["score"] if r["score"] is not None else 1e300,
                                              r["candidate"]))
        for i, r in enumerate(reached, start=1):
            r["rank"] = i if r["score"] is not None else None
        stages.append({
            "name": name,
            "metric": metric,
            "evals": st_spec.pruning.evals if st_spec else None,
            "tokens": st_spec.training.tokens if st_spec else None,
            "candidates": reached,
            "survivors": [r["candidate"] for r in reached if r["status"] not in ("pruned",)],
            "train_flops": sum(r["train_flops"] for r in rows),
            "score_flops": sum(r["score_flops"] for r in rows),
            "wall_s": sum(r["wall_s"] for r in rows),
        })
    target = last = None
    if spec is not None:
        if spec.target_model is not None:
            target = (spec.target_model.params, spec.target_model.tokens)
        final = list(stage_specs.values())[-1]
        last = (non_embedding_params(final), final.training.tokens)
        for name, st in stage_specs.items():  # stages not started yet
            if name not in stage_order:
                stages.append({"name": name, "metric": st.pruning.metric, "evals": st.pruning.evals, "tokens": st.training.tokens,
                               "candidates": [], "survivors": [], "train_flops": 0.0, "score_flops": 0.0,
                               "wall_s": 0.0})
    _add_progress(stages, stage_specs)
    superseded = []  # runs an accepted spec edit set aside: kept, left out of the stages above
    for run in sorted((r for r in all_runs if r.superseded_by), key=lambda r: (r.superseded_by, r.stage_index, r.id)):
        ev = by_run.get(run.id, [])
        rung = max((e.rung for e in ev), default=0)
        metric = stage_specs[run.stage].pruning.metric if run.stage in stage_specs else "rbridge"
        vals = [e.value for e in ev if e.rung == rung and e.metric == metric]
        superseded.append({"revision": run.superseded_by, "stage": run.stage,
                           "candidate": every[run.candidate_id].name, "status": run.status, "rung": rung,
                           "tokens_seen": run.tokens_seen, "score": sum(vals) / len(vals) if vals else None,
                           "checkpoint": run.checkpoint})
    return {
        "plan": plan.name,
        "status": plan.status,
        "revision": plan.revision,
        "superseded": superseded,
        "spec_hash": plan.spec_hash,
        "store": safe_url(store.url),
        "candidates": [c.name for c in sorted(cands.values(), key=lambda c: c.position)],
        "mixtures": {c.name: json.loads(c.mix) for c in cands.values()},
        "stages": stages,
        "compute": plan_compute(stages, len(cands), last, target),
    }


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
        st["eta_s"] = (remaining / rate) if rate and remaining else (0.0 if not live else None)
