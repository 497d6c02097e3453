"""Accepting a changed spec (`rbridge plan --force`): redo only what the change affects.

Every run stores a fingerprint of everything its numbers depend on: the stage's
proxy and training settings, the candidate's mixture, the seed, the tokenizer and
the token shards it trains on, and the benchmarks it is scored on. After a spec
change, a run whose fingerprint differs is deleted (evaluations and checkpoints)
and trained again; every other run is kept. Decisions are recomputed from the
first stage that changed on (a changed run, candidate set, or pruning settings),
since the survivors of later stages may change with them.

``spec_change`` only computes the change; ``rbridge.store.plans.apply_spec_change``
applies it in one transaction.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from rbridge.planner import mirror
from rbridge.planner.checkpoints import checkpoint_dir
from rbridge.reporting import SILENT, Reporter
from rbridge.spec import Spec, Stage
from rbridge.store import Store
from rbridge.store import plans as plan_ops


def _file_hash(path: Path, _memo: dict[str, str] = {}) -> str:  # noqa: B006 - per-process memo
    key = str(path)
    if key not in _memo:
        _memo[key] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return _memo[key]


def run_fingerprint(spec: Spec, stage: Stage, mix: dict[str, float], data) -> str:
    """A hash of every input that determines a run's checkpoints and scores."""
    payload = {
        "stage": stage.name,
        "settings": {"proxy": stage.proxy.root, **stage.run_settings()},
        "mix": dict(sorted(mix.items())),
        "shards": {name: data.shards[name].key for name in sorted(mix)},
        "tokenizer": getattr(data.tokenizer, "rbridge_key", None) or str(spec.tokenizer.path),
        "seed": spec.seed,
        "benchmarks": [{**b.model_dump(exclude={"traces"}), "traces": _file_hash(b.traces)}
                       for b in spec.benchmarks],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def spec_change(store: Store, plan_id: int, old: Spec | None, new: Spec, data) -> tuple[plan_ops.SpecChange, list]:
    """What ``new`` changes in a plan recorded under ``old``: the change, and the runs it drops (rows)."""
    stages = new.resolved_stages()
    index = {st.name: st.index for st in stages}
    old_stages = {s.name: s for s in old.resolved_stages()} if old is not None else {}
    wanted = {c.name: c for c in new.candidates}
    cands = plan_ops.candidates(store, plan_id)
    by_id = {c.id: n for n, c in cands.items()}
    first_changed = 0 if set(cands) != set(wanted) else len(stages)
    dropped = []
    for run in plan_ops.plan_runs(store, plan_id):
        name = by_id.get(run.candidate_id)
        stage = stages[index[run.stage]] if run.stage in index else None
        if (name in wanted and stage is not None
                and run.fingerprint == run_fingerprint(new, stage, wanted[name].mix, data)):
            continue
        dropped.append((run, name))
        first_changed = min(first_changed, index.get(run.stage, 0))
    for st in stages:
        prev = old_stages.get(st.name)
        if prev is None or prev.pruning != st.pruning:
            first_changed = min(first_changed, st.index)
    change = plan_ops.SpecChange(
        spec_text=new.text, spec_hash=new.spec_hash, candidates=[(c.name, c.mix) for c in new.candidates],
        drop_runs=[run.id for run, _ in dropped],
        drop_candidates=[c.id for n, c in cands.items() if n not in wanted],
        redecide_stages=[st.name for st in stages[first_changed:]])
    return change, dropped


def reconcile(store: Store, plan_id: int, plan_name: str, old: Spec | None, new: Spec, data,
              report: Reporter = SILENT) -> None:
    """Bring a plan's rows in line with a changed spec, deleting only what the change invalidates."""
    change, dropped = spec_change(store, plan_id, old, new, data)
    plan_ops.apply_spec_change(store, plan_id, change)
    for run, name in dropped:
        shutil.rmtree(checkpoint_dir(store.url, plan_name, run.stage, str(name)), ignore_errors=True)
    mirror.delete_studies(store.url, plan_name, change.redecide_stages)
    redone = [f"{run.stage}/{name}" for run, name in dropped]
    report.say(f"spec changed (--force): {len(redone)} runs to redo"
               + (f" ({', '.join(redone)})" if redone else "")
               + (f"; decisions recomputed from stage {change.redecide_stages[0]}" if change.redecide_stages else ""))
