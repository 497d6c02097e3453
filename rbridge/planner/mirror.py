"""The Optuna mirror: each stage is a study, each run a trial, each rung an intermediate value.

rbridge decides rungs itself (rbridge.planner.schedule: synchronous successive
halving, independent of the order runs finish); the studies record the same
story in Optuna's own tables, so Optuna's tools (dashboards, ``study.trials_dataframe()``)
see every trial, its reports at each rung's token count, and whether it was pruned
or completed. Every call here is idempotent: a second decider, or one that died
after telling, changes nothing.
"""

from __future__ import annotations

import warnings

from collections.abc import Iterator
from contextlib import contextmanager

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from rbridge.store.studies import optuna_storage
from rbridge.store.studies import study_name as _study_name


def study_name(plan: str, stage: str, revision: int = 0) -> str:
    """``plan:stage``; a stage decided afresh after an accepted spec edit gets a new study,
    ``plan:stage@r<revision>``, and the earlier one is kept as it was (rbridge.store.studies)."""
    return _study_name(plan, stage, revision)


@contextmanager
def study(store_url: str, plan: str, stage: str, revision: int = 0) -> Iterator[optuna.Study]:
    """The stage's study (created when missing) on the process's storage for the store, whose connections
    are closed after the block (rbridge.store.studies.optuna_storage)."""
    with optuna_storage(store_url) as storage:
        yield optuna.create_study(study_name=study_name(plan, stage, revision), storage=storage,
                                  direction="minimize", load_if_exists=True)


def ensure_study(store_url: str, plan: str, stage: str, revision: int = 0) -> None:
    """Create the stage's study if it is missing."""
    with study(store_url, plan, stage, revision):
        pass


def weights(mix_json: str, sources) -> dict[str, float]:
    """A candidate's stored mixture over every source of the plan (0 where it has none): a trial's params."""
    import json

    mix = json.loads(mix_json or "{}")
    return {src: float(mix.get(src, 0.0)) for src in sources}


def ask(store_url: str, plan: str, stage: str, candidate: str, revision: int = 0,
        weights: dict[str, float] | None = None) -> int:
    """A new trial for a run; returns its number. ``weights``: the candidate's mixture, {source: weight} over
    every source of the plan, recorded as the trial's parameters ``w_<source>`` (FloatDistribution 0..1), so
    Optuna's dashboard and parameter-importance tools see which sources move the score."""
    from optuna.distributions import FloatDistribution

    with study(store_url, plan, stage, revision) as st:
        trial = st.ask()
        trial.set_user_attr("candidate", candidate)
        for source, w in sorted((weights or {}).items()):
            # what Trial.suggest_float records, with the value given instead of sampled (the storage's own
            # call: study.enqueue_trial would race between workers asking at once)
            st._storage.set_trial_param(trial._trial_id, f"w_{source}", float(w), FloatDistribution(0.0, 1.0))
        return trial.number


def fail(store_url: str, plan: str, stage: str, number: int, revision: int = 0) -> None:
    """Mark a trial failed (asked by a worker whose run took another trial, or a failed run's)."""
    with study(store_url, plan, stage, revision) as st:
        try:
            st.tell(number, state=TrialState.FAIL, skip_if_finished=True)
        except (UpdateFinishedTrialError, ValueError):  # another decider finished it between check and write
            pass


def tell_rung(store_url: str, plan: str, stage: str, results: list[tuple[int | None, float, bool]],
              step: int, final: bool, revision: int = 0) -> None:
    """Report a rung: each (trial number, score, kept) at ``step`` tokens; pruned trials end PRUNED,
    and at the stage's last rung the kept ones end COMPLETE with their score."""
    with study(store_url, plan, stage, revision) as st:
        _tell_rung(st, results, step, final)


def _tell_rung(st: optuna.Study, results: list[tuple[int | None, float, bool]], step: int, final: bool) -> None:
    trials = {t.number: t for t in st.get_trials(deepcopy=False)}
    for number, score, kept in results:
        frozen = trials.get(number)
        if frozen is None or frozen.state != TrialState.RUNNING:
            continue
        trial = optuna.trial.Trial(st, frozen._trial_id)
        try:
            if step not in frozen.intermediate_values:
                # Two deciders of the same rung (local processes, workers on several machines) report the
                # same value; the second is a no-op that Optuna warns about. Its warning would be the only
                # third-party line in a plan's output, and says nothing true about the plan.
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message="The reported value is ignored")
                    trial.report(score, step=step)
            if not kept:
                st.tell(frozen.number, state=TrialState.PRUNED, skip_if_finished=True)
            elif final:
                st.tell(frozen.number, score, skip_if_finished=True)
        except (RuntimeError, ValueError):  # finished by another decider meanwhile
            continue


def fail_orphans(store_url: str, plan: str, stage: str, run_trials: set[int | None], revision: int = 0) -> None:
    """Trials asked by a worker that died before recording them on its run: mark them failed.

    Called when a stage's last rung is decided: every run of the stage was claimed
    (and got its trial) by then, so a RUNNING trial no run names is an orphan.
    """
    with study(store_url, plan, stage, revision) as st:
        for t in st.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if t.number not in run_trials:
                try:
                    st.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
                except (UpdateFinishedTrialError, ValueError):  # failed by another decider meanwhile
                    pass


def set_study_attrs(store_url: str, plan: str, stage: str, attrs: dict, revision: int = 0) -> None:
    """Record facts about a stage on its study (a search's prior, surrogate and proposals: the report reads them)."""
    with study(store_url, plan, stage, revision) as st:
        for k, v in attrs.items():
            st.set_user_attr(k, v)
