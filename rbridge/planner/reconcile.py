"""Accepting a changed spec (`rbridge plan --force`): redo only what the change affects.

Every run stores a fingerprint of everything its numbers depend on: the stage's
proxy and training settings, the candidate's mixture, the seed, the tokenizer and
the token shards it trains on, and the benchmarks it is scored on. An accepted
edit is the plan's next revision. A run whose fingerprint differs is superseded by
it: kept with its evaluations (its checkpoints move under
``<runs>/.superseded/r<revision>/``), left out of every view, and trained again
under the new spec; every other run stays as it is. Decisions are recomputed from
the first stage that changed on (a changed run, candidate set, or pruning
settings), since the survivors of later stages may change with them; the old
decisions and Optuna studies are kept too. When a later spec asks for a superseded
run's fingerprint again (``rbridge plan OLD_SPEC --force`` undoing a mistaken
edit), the stage revives that run instead of training it (rbridge.planner.state).

``spec_change`` only computes the change; ``rbridge.store.plans.apply_spec_change``
applies it in one transaction.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from rbridge.planner import mirror
from rbridge.errors import InputError
from rbridge.planner.checkpoints import checkpoint_dir, move_checkpoints, superseded_dir
from rbridge.reporting import SILENT, Reporter
from rbridge.spec import Spec, Stage
from rbridge.store import Store
from rbridge.store import plans as plan_ops
from rbridge.store.models import Plan


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
        # checker only where set: fingerprints of runs recorded before it existed stay the same
        "benchmarks": [{**b.model_dump(exclude={"traces"}, exclude_none=True), "traces": _file_hash(b.traces)}
                       for b in spec.benchmarks],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def spec_change(store: Store, plan: Plan, old: Spec | None, new: Spec, data) -> tuple[plan_ops.SpecChange, list]:
    """What ``new`` changes in a plan recorded under ``old``: the change, and the runs it supersedes
    as (run, candidate name, where its checkpoints go)."""
    stages = new.resolved_stages()
    index = {st.name: i for i, st in enumerate(stages)}  # position (a stage with several seeds is several)
    old_stages = {s.name: s for s in old.resolved_stages()} if old is not None else {}
    from rbridge.mixtures.search import all_candidates

    wanted = {c.name: c for c in all_candidates(new, data)}
    cands = plan_ops.candidates(store, plan.id)
    by_id = {c.id: n for n, c in cands.items()}
    first_changed = 0 if set(cands) != set(wanted) else len(stages)
    revision = plan.revision + 1
    dropped = []
    for run in plan_ops.plan_runs(store, plan.id):
        name = by_id.get(run.candidate_id)
        stage = stages[index[run.stage]] if run.stage in index else None
        if (name in wanted and stage is not None
                and run.fingerprint == run_fingerprint(new, stage, wanted[name].mix, data)):
            continue
        dropped.append((run, name, superseded_dir(store.url, plan.name, revision, run.stage, str(name))))
        first_changed = min(first_changed, index.get(run.stage, 0))
    for i, st in enumerate(stages):
        prev = old_stages.get(st.name)
        if prev is None or prev.pruning != st.pruning:
            first_changed = min(first_changed, i)
    change = plan_ops.SpecChange(
        spec_text=new.text, spec_hash=new.spec_hash, candidates=[(c.name, c.mix) for c in wanted.values()],
        supersede_runs={run.id: str(to) for run, _, to in dropped},
        drop_candidates=[c.id for n, c in cands.items() if n not in wanted],
        redecide_stages=[st.name for st in stages[first_changed:]])
    return change, dropped


def reconcile(store: Store, plan: Plan, old: Spec | None, new: Spec, data, report: Reporter = SILENT) -> None:
    """Bring a plan's rows in line with a changed spec as its next revision, superseding (never
    deleting) what the change invalidates."""
    change, dropped = spec_change(store, plan, old, new, data)
    revision = plan.revision + 1
    # Checkpoints move first: a run opened later for the same stage and candidate must not
    # find the superseded run's checkpoints in its folder (a crash here loses nothing: the
    # runs still counted have their evaluations, and retrain from scratch if trained further).
    for run, name, to in dropped:
        move_checkpoints(checkpoint_dir(store.url, plan.name, run.stage, str(name)), to)
    if not plan_ops.apply_spec_change(store, plan.id, change, revision):
        raise InputError("another process changed this plan's spec meanwhile; run the command again",
                         file=new.path)
    for stage in change.redecide_stages:  # the revision's fresh studies; the old ones are kept
        mirror.ensure_study(store.url, plan.name, stage, revision)
    redone = [f"{run.stage}/{name}" for run, name, _ in dropped]
    report.say(f"spec changed (--force): revision {revision}; {len(redone)} runs to redo"
               + (f" ({', '.join(redone)}; superseded, kept)" if redone else "")
               + (f"; decisions recomputed from stage {change.redecide_stages[0]}" if change.redecide_stages else ""))
