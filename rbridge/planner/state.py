"""One plan as the store tells it: where the work is, and the rung decisions the scores allow.

``PlanState.sync`` walks the stages in order. Rungs whose every active run is
evaluated get their decision (rbridge.planner.schedule decides, the store records
it once, Optuna is told); a stage whose last rung is decided opens the next stage
(creates its runs); the first rung with unevaluated runs is where the work is.
Decisions depend only on the stored scores, so whichever process makes them makes
the same ones.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from rbridge._failpoints import failpoint
from rbridge.planner import mirror
from rbridge.planner.checkpoints import checkpoint_dir, move_checkpoints, superseded_dir
from rbridge.planner.disk import human_bytes, reduce_to_model, trim_checkpoints
from rbridge.planner.reconcile import run_fingerprint
from rbridge.planner.schedule import RungDecision, decide, rung_tokens, survivors_at
from rbridge.reporting import SILENT, Reporter
from rbridge.spec import Spec, Stage, parse_spec
from rbridge.store import Store
from rbridge.store import plans as plan_ops
from rbridge.store import runs as run_ops
from rbridge.store.models import Candidate, Plan, Run


@dataclass
class Task:
    """Train ``run`` to rung ``rung`` (``tokens`` tokens) of ``stage``."""

    stage: Stage
    rung: int
    tokens: int
    run: Run
    candidate: Candidate
    n_entrants: int


@dataclass
class SyncResult:
    done: bool
    tasks: list[Task] = field(default_factory=list)  # runs without an evaluation at the current rung
    stage: Stage | None = None
    rung: int = 0
    n_done: int = 0  # runs of the current rung already evaluated


class PlanState:
    """One plan as a worker sees it: its spec, data and traces, and its rows in the store."""

    def __init__(self, store: Store, plan: Plan, spec: Spec, report: Reporter = SILENT, data=None, traces=None):
        self.store = store
        self.plan_id = plan.id
        self.name = plan.name
        self.spec_hash = plan.spec_hash
        self.revision = plan.revision  # accepted spec edits so far (rbridge.planner.reconcile)
        self.studies: dict[str, int] = json.loads(plan.studies or "{}")  # stage -> its study's revision
        self.spec = spec
        self.report = report
        self.stages = spec.resolved_stages()
        self._data = data
        self._traces = traces

    @classmethod
    def from_store(cls, store: Store, plan: Plan, report: Reporter = SILENT) -> "PlanState":
        """A worker's view: the spec as stored; its paths resolve where the plan was written."""
        spec = parse_spec(plan.spec_text, Path(plan.spec_path or "spec.yaml"))
        return cls(store, plan, spec, report)

    @property
    def data(self):
        from rbridge.planner.steps import prepare_data
        if self._data is None:
            self._data = prepare_data(self.spec, self.report)
        return self._data

    @property
    def traces(self):
        from rbridge.scoring.traces import load_traces
        if self._traces is None:
            self._traces = {b.name: load_traces(b.traces) for b in self.spec.benchmarks}
        return self._traces

    def study_revision(self, stage: str) -> int:
        """The revision of the stage's current Optuna study (rbridge.planner.mirror.study_name)."""
        return self.studies.get(stage, 0)

    # ------------------------------------------------------------------ sync
    def sync(self) -> SyncResult:
        """Make every decision the store's evaluations allow; return where the work is."""
        cands = plan_ops.candidates(self.store, self.plan_id)
        by_id = {c.id: n for n, c in cands.items()}
        entrants = sorted(n for n in cands if not n.startswith("proposed-"))  # proposals enter after the search
        for stage in self.stages:
            # A target stage trains the candidates it names (default: all, pruned or not) and passes
            # nobody on: the next proxy stage takes the survivors of the last proxy stage.
            field = sorted(stage.candidates or cands) if stage.is_target else entrants
            runs = self._open_stage(stage, field, cands)
            rungs = rung_tokens(stage)
            active = field
            for rung, tokens in enumerate(rungs, start=1):
                evaluated = run_ops.evaluated(self.store, [r.id for r in runs.values()], rung)
                # A failed run (max_attempts used up) lacks nothing: the rung is decided without it.
                lacking = [n for n in active if runs[n].id not in evaluated and runs[n].status != "failed"]
                if lacking:
                    tasks = [Task(stage, rung, tokens, runs[n], cands[n], len(field)) for n in lacking]
                    return SyncResult(False, tasks, stage, rung, len(active) - len(lacking))
                made = plan_ops.decisions(self.store, self.plan_id, stage.name, rung)
                if made:
                    active = sorted(by_id[d.candidate_id] for d in made if d.kept)
                else:
                    active = self._decide(stage, rung, len(rungs), field, active, runs, cands)
            if not stage.is_target:
                entrants = active
                if stage.name == self.spec.search_stage() and self.spec.search.propose:
                    # the search's proposals, and the listed candidates as baselines, join the next stage
                    cands = self._proposals(stage, field, runs, cands)
                    by_id = {c.id: n for n, c in cands.items()}
                    extra = [f"proposed-{i}" for i in range(1, self.spec.search.propose + 1)]
                    extra += [c.name for c in self.spec.candidates]
                    entrants = sorted(set(active) | set(extra))
        if plan_ops.get_plan(self.store, self.plan_id).status != "done":
            self.record_compute()
            if plan_ops.mark_plan_done(self.store, self.plan_id):
                self.reduce_finished()
        return SyncResult(True)

    def _open_stage(self, stage: Stage, entrants: list[str], cands: dict[str, Candidate]) -> dict[str, Run]:
        """The stage's runs for exactly these entrants: opened once (unique index), extras superseded.

        A missing run whose inputs a superseded run of the same candidate had (a spec edit
        undone) is revived with its evaluations and checkpoints instead of trained again.
        """
        from rbridge.planner.steps import describe_proxy, run_epochs

        runs = plan_ops.stage_runs(self.store, self.plan_id, stage.name)
        wanted = {cands[n].id for n in entrants}
        extra = {cid: r for cid, r in runs.items() if cid not in wanted}
        if extra:  # survivors changed after a --force: these candidates no longer reach the stage
            names = {c.id: n for n, c in cands.items()}
            moved = {}
            for cid, run in extra.items():
                live = checkpoint_dir(self.store.url, self.name, stage.name, names.get(cid, str(cid)))
                to = superseded_dir(self.store.url, self.name, self.revision, stage.name, names.get(cid, str(cid)))
                moved[run.id] = str(to) if move_checkpoints(live, to) else run.checkpoint
            plan_ops.supersede_runs(self.store, moved, self.revision)
        missing = [n for n in entrants if cands[n].id not in runs]
        if missing:
            fingerprints = {n: run_fingerprint(self.spec, stage, json.loads(cands[n].mix), self.data)
                            for n in missing}
            kept = plan_ops.superseded_runs(self.store, self.plan_id, stage.name, [cands[n].id for n in missing])
            revive, new = {}, []
            for n in missing:
                old = next((r for r in kept.get(cands[n].id, [])
                            if r.fingerprint == fingerprints[n] and r.status != "failed"), None)
                if old is None:
                    new.append(n)
                    continue
                live = checkpoint_dir(self.store.url, self.name, stage.name, n)
                if old.checkpoint:
                    move_checkpoints(old.checkpoint, live)
                revive[old.id] = str(live)
            info = describe_proxy(stage, self.data) if new else None
            if plan_ops.open_runs(self.store, [
                    Run(plan_id=self.plan_id, stage=stage.name, stage_index=stage.index, candidate_id=cands[n].id,
                        config=json.dumps({**info["config"], "epochs": run_epochs(stage, json.loads(cands[n].mix),
                                                                                  self.data)}, sort_keys=True),
                        params=info["params"],
                        non_embedding_params=info["non_embedding_params"], tokens_target=stage.training.tokens,
                        fingerprint=fingerprints[n], role=stage.role, stage_group=stage.group or stage.name,
                        seed=stage.seed)
                    for n in new], revive=revive) and revive:
                self.report.say(f"  {stage.name}: {len(revive)} superseded run(s) revived with their results, "
                                f"not trained again ({', '.join(n for n in missing if n not in new)})")
            runs = plan_ops.stage_runs(self.store, self.plan_id, stage.name)
        return {n: runs[cands[n].id] for n in entrants}

    # ------------------------------------------------------------------ search
    def _proposals(self, stage: Stage, field: list[str], runs: dict[str, Run],
                   cands: dict[str, Candidate]) -> dict[str, Candidate]:
        """The search's proposals as candidates (rbridge.mixtures): computed once, when the search stage is
        decided, from every candidate's decision score at the first rung (the last rung all of them reached:
        successive halving scores survivors again after more tokens, and a fit on those would favour them
        for having trained longer), and stored; a resume or another worker finds them stored."""
        import numpy as np

        from rbridge.mixtures.propose import propose
        from rbridge.mixtures.search import search_caps, search_prior
        from rbridge.mixtures.surrogates import choose
        from rbridge.mixtures.swarm import check_caps

        sr = self.spec.search
        names = [f"proposed-{i}" for i in range(1, sr.propose + 1)]
        if all(n in cands for n in names):
            return cands
        sources = self.spec.searched_sources()
        usable = [n for n in field if runs[n].status != "failed" and set(json.loads(cands[n].mix)) <= set(sources)]
        scores = run_ops.rung_scores(self.store, [runs[n].id for n in usable], 1, stage.pruning.metric)
        usable = [n for n in usable if runs[n].id in scores]
        mixes = [json.loads(cands[n].mix) for n in usable]
        x = np.array([[m.get(s, 0.0) for s in sources] for m in mixes])
        y = np.array([scores[runs[n].id] for n in usable])  # a pruning metric: lower is better
        seed = self.spec.seed if sr.seed is None else sr.seed
        model, cvs = choose(x, y, sr.surrogate, seed=seed)
        prior = search_prior(self.spec, self.data)
        caps = search_caps(self.spec, self.data)
        cap = check_caps(sources, caps, sr.min_weight)
        props = propose(model, sources, np.array([prior[s] for s in sources]), cap, n=sr.propose, seed=seed,
                        strengths=sr.strengths, min_weight=sr.min_weight, fitted=x)
        cv = next(c for c in cvs if c.family == model.family)
        self.report.say(f"  search: {model.family} surrogate on {len(usable)} mixtures at rung 1 (CV Spearman "
                        f"{cv.spearman:.3f}); proposals join the next stage:")
        for p in props:
            self.report.say(f"    {p.name} ({p.rule}): predicted {stage.pruning.metric} {p.predicted:.4f}; "
                            + ", ".join(f"{k} {v:.3f}" for k, v in sorted(p.weights.items(), key=lambda kv: -kv[1])))
        mirror.set_study_attrs(self.store.url, self.name, stage.name, {"search": {
            "sources": sources, "prior": prior, "caps": caps, "surrogate": model.family, "rung": 1,
            "cv": [c.to_json() for c in cvs], "proposals": [p.to_json() for p in props]}},
            self.study_revision(stage.name))
        total = {p.name: sum(p.weights.values()) for p in props}
        return plan_ops.add_candidates(self.store, self.plan_id,
                                       [(p.name, {k: v / total[p.name] for k, v in p.weights.items()}) for p in props])

    # ------------------------------------------------------------------ decisions
    def _decide(self, stage: Stage, rung: int, n_rungs: int, entrants: list[str], active: list[str],
                runs: dict[str, Run], cands: dict[str, Candidate]) -> list[str]:
        prune = stage.pruning
        failed = [n for n in active if runs[n].status == "failed"]
        scored = [n for n in active if n not in failed]
        by_run = run_ops.rung_scores(self.store, [runs[n].id for n in scored], rung, prune.metric)
        scores = {n: by_run[runs[n].id] for n in scored}
        n_keep = min(survivors_at(rung, n_rungs, len(entrants), prune.keep, prune.reduction_factor,
                                  list(scores.values()) or None), len(scored))
        decisions = decide(scores, n_keep, rung, prune.metric)
        if stage.is_target:  # every candidate goes on: the rank is recorded, nobody is cut
            decisions = [RungDecision(d.candidate, d.score, d.rank, True,
                                      f"target stage (never prunes): rank {d.rank}/{len(scored)} at rung {rung} "
                                      f"by {prune.metric} {d.score:.4f}") for d in decisions]
        decisions += [RungDecision(n, None, len(scored) + i, False, f"failed at rung {rung} after "
                                   f"{runs[n].attempts} attempt(s): {runs[n].error}")
                      for i, n in enumerate(failed, start=1)]
        final = rung == n_rungs
        rev = self.study_revision(stage.name)
        mirror.tell_rung(self.store.url, self.name, stage.name,
                         [(runs[d.candidate].trial_number, d.score, d.kept) for d in decisions if d.score is not None],
                         rung_tokens(stage)[rung - 1], final, rev)
        for n in failed:
            if runs[n].trial_number is not None:
                mirror.fail(self.store.url, self.name, stage.name, runs[n].trial_number, rev)
        failpoint("after-tell")
        rows = [plan_ops.DecisionRow(cands[d.candidate].id, runs[d.candidate].id, d.kept, d.score, d.rank, d.why)
                for d in decisions]
        if not plan_ops.decide(self.store, self.plan_id, stage.name, rung, rows):
            # Another worker decided this rung first: the same decision.
            by_id = {c.id: n for n, c in cands.items()}
            return sorted(by_id[d.candidate_id] for d in plan_ops.decisions(self.store, self.plan_id, stage.name, rung)
                          if d.kept)
        dropped = [d.candidate for d in decisions if not d.kept and d.candidate not in failed]
        for n in dropped:  # a --force edit that promotes it continues it from its newest checkpoint
            trim_checkpoints(checkpoint_dir(self.store.url, self.name, stage.name, n), 1)
        if dropped or failed:
            self.report.say(f"  {stage.name} rung {rung} decision: keep {n_keep}/{len(active)}; "
                            f"dropped {', '.join(dropped) or 'none'}" + (f"; failed {', '.join(failed)}" if failed else ""))
        if final:
            mirror.fail_orphans(self.store.url, self.name, stage.name, {r.trial_number for r in runs.values()}, rev)
            self.record_compute()
        return sorted(d.candidate for d in decisions if d.kept)

    def reduce_finished(self) -> int:
        """The plan is done: every done or pruned run, live or superseded, keeps its exported model alone
        (``finished_runs: model``, rbridge.planner.disk); the bytes freed."""
        if self.spec.finished_runs != "model":
            return 0
        freed = 0
        names = {c.id: n for n, c in plan_ops.candidates(self.store, self.plan_id).items()}
        for run in plan_ops.plan_runs(self.store, self.plan_id):
            if run.status in ("done", "pruned"):
                freed += reduce_to_model(checkpoint_dir(self.store.url, self.name, run.stage,
                                                        names.get(run.candidate_id, str(run.candidate_id))))
        for run, _name in plan_ops.superseded(self.store, self.plan_id):
            if run.status in ("done", "pruned") and run.checkpoint:
                freed += reduce_to_model(run.checkpoint)
        if freed:
            self.report.say(f"finished runs reduced to their exported models: {human_bytes(freed)} of training "
                            "checkpoints removed (finished_runs: checkpoint keeps them)")
        return freed

    def record_compute(self) -> None:
        """Store the plan's compute so far (spent, naive, reduction) on its row."""
        from rbridge.analysis.status import plan_status

        plan_ops.set_plan_compute(self.store, self.plan_id, plan_status(self.store, self.name)["compute"])
