"""Accepting a changed spec (`rbridge plan --force`): redo only what the change affects.

Every run stores a fingerprint of everything its numbers depend on: the stage's
proxy and training settings, the candidate's mixture, the seed, the tokenizer and
the token shards it trains on, and the benchmarks it is scored on. After a spec
change, a run whose fingerprint differs is deleted (evaluations and checkpoints)
and trained again; every other run is kept. Decisions are recomputed from the
first stage that changed on (a changed run, candidate set, or keep rule), since
the survivors of later stages may change with them.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import optuna
from sqlmodel import delete, select

from rbridge.spec import Spec, StageSpec
from rbridge.store import Candidate, Decision, Evaluation, Run, Store

# Stage fields that change decisions but not the runs themselves.
DECISION_FIELDS = ("keep", "reduction_factor", "metric", "evals")


def _file_hash(path: Path, _memo: dict[str, str] = {}) -> str:  # noqa: B006 - per-process memo
    key = str(path)
    if key not in _memo:
        _memo[key] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return _memo[key]


def run_fingerprint(spec: Spec, stage: StageSpec, mix: dict[str, float], data) -> str:
    """A hash of every input that determines a run's checkpoints and scores."""
    settings = stage.model_dump(exclude={"name", "keep", "reduction_factor", "metric"})
    payload = {
        "stage": stage.name,
        "settings": settings,
        "mix": dict(sorted(mix.items())),
        "shards": {name: data.shards[name].key for name in sorted(mix)},
        "tokenizer": getattr(data.tokenizer, "rbridge_key", None) or str(spec.tokenizer.path),
        "seed": spec.seed,
        "benchmarks": [{**b.model_dump(exclude={"traces"}), "traces": _file_hash(b.traces)}
                       for b in spec.benchmarks],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def reconcile(store: Store, plan_id: int, plan_name: str, old: Spec | None, new: Spec, data, runs_root: Path,
              console) -> None:
    """Bring a plan's rows in line with a changed spec, deleting only what the change invalidates."""
    stages = new.resolved_stages()
    old_stages = {s.name: s for s in old.resolved_stages()} if old is not None else {}
    first_changed = len(stages)
    redone: list[str] = []
    with store.session() as s:
        cands = {c.name: c for c in s.exec(select(Candidate).where(Candidate.plan_id == plan_id)).all()}
        wanted = {c.name: c for c in new.candidates}
        # Candidates: add new ones, drop removed ones (with their runs), update mixtures.
        if set(cands) != set(wanted):
            first_changed = 0
        for i, cand in enumerate(new.candidates):
            mix = json.dumps(cand.mix, sort_keys=True)
            if cand.name not in cands:
                row = Candidate(plan_id=plan_id, name=cand.name, mix=mix, position=i)
                s.add(row)
                s.flush()
                cands[cand.name] = row
            else:
                cands[cand.name].mix, cands[cand.name].position = mix, i
        by_id = {c.id: n for n, c in cands.items()}
        index = {st.name: i for i, st in enumerate(stages)}
        for run in s.exec(select(Run).where(Run.plan_id == plan_id)).all():
            name = by_id.get(run.candidate_id)
            stage = stages[index[run.stage]] if run.stage in index else None
            keep = (name in wanted and stage is not None
                    and run.fingerprint == run_fingerprint(new, stage, wanted[name].mix, data))
            if keep:
                continue
            redone.append(f"{run.stage}/{name}")
            first_changed = min(first_changed, index.get(run.stage, 0))
            s.exec(delete(Evaluation).where(Evaluation.run_id == run.id))
            shutil.rmtree(runs_root / run.stage / str(name), ignore_errors=True)
            s.delete(run)
        for name, row in list(cands.items()):
            if name not in wanted:
                s.exec(delete(Decision).where(Decision.candidate_id == row.id))
                s.delete(row)
        for i, st in enumerate(stages):
            prev = old_stages.get(st.name)
            if prev is None or any(getattr(prev, f) != getattr(st, f) for f in DECISION_FIELDS):
                first_changed = min(first_changed, i)
        affected = [st.name for st in stages[first_changed:]]
        if affected:
            s.exec(delete(Decision).where(Decision.plan_id == plan_id, Decision.stage.in_(affected)))
            # Runs of affected stages get fresh Optuna trials in fresh studies.
            for run in s.exec(select(Run).where(Run.plan_id == plan_id, Run.stage.in_(affected))).all():
                run.trial_number = None
                if run.status == "pruned":
                    run.status = "pending"
    for name in affected:
        try:
            optuna.delete_study(study_name=f"{plan_name}:{name}", storage=store.url)
        except KeyError:
            pass
    console.print(f"spec changed (--force): {len(redone)} runs to redo"
                  + (f" ({', '.join(redone)})" if redone else "")
                  + (f"; decisions recomputed from stage {affected[0]}" if affected else ""))
