"""The Optuna mirror: each stage is a study, each run a trial, each rung an intermediate value.

rbridge decides rungs itself (rbridge.planner.schedule: synchronous successive
halving, independent of the order runs finish); the studies record the same
story in Optuna's own tables, so Optuna's tools (dashboards, ``study.trials_dataframe()``)
see every trial, its reports at each rung's token count, and whether it was pruned
or completed. Every call here is idempotent: a second decider, or one that died
after telling, changes nothing.
"""

from __future__ import annotations

import optuna
from optuna.trial import TrialState


def study_name(plan: str, stage: str) -> str:
    return f"{plan}:{stage}"


def study(store_url: str, plan: str, stage: str) -> optuna.Study:
    """The stage's study, created when missing."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(study_name=study_name(plan, stage), storage=store_url, direction="minimize",
                               load_if_exists=True)


def ask(store_url: str, plan: str, stage: str, candidate: str) -> int:
    """A new trial for a run; returns its number."""
    trial = study(store_url, plan, stage).ask()
    trial.set_user_attr("candidate", candidate)
    return trial.number


def fail(store_url: str, plan: str, stage: str, number: int) -> None:
    """Mark a trial failed (asked by a worker whose run took another trial)."""
    study(store_url, plan, stage).tell(number, state=TrialState.FAIL, skip_if_finished=True)


def tell_rung(store_url: str, plan: str, stage: str, results: list[tuple[int | None, float, bool]],
              step: int, final: bool) -> None:
    """Report a rung: each (trial number, score, kept) at ``step`` tokens; pruned trials end PRUNED,
    and at the stage's last rung the kept ones end COMPLETE with their score."""
    st = study(store_url, plan, stage)
    trials = {t.number: t for t in st.get_trials(deepcopy=False)}
    for number, score, kept in results:
        frozen = trials.get(number)
        if frozen is None or frozen.state != TrialState.RUNNING:
            continue
        trial = optuna.trial.Trial(st, frozen._trial_id)
        try:
            if step not in frozen.intermediate_values:
                trial.report(score, step=step)
            if not kept:
                st.tell(frozen.number, state=TrialState.PRUNED, skip_if_finished=True)
            elif final:
                st.tell(frozen.number, score, skip_if_finished=True)
        except (RuntimeError, ValueError):  # finished by another decider meanwhile
            continue


def fail_orphans(store_url: str, plan: str, stage: str, run_trials: set[int | None]) -> None:
    """Trials asked by a worker that died before recording them on its run: mark them failed.

    Called when a stage's last rung is decided: every run of the stage was claimed
    (and got its trial) by then, so a RUNNING trial no run names is an orphan.
    """
    st = study(store_url, plan, stage)
    for t in st.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.number not in run_trials:
            st.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)


def delete_studies(store_url: str, plan: str, stages: list[str]) -> None:
    """Drop the studies of stages whose decisions are recomputed (their runs get fresh trials)."""
    for stage in stages:
        try:
            optuna.delete_study(study_name=study_name(plan, stage), storage=store_url)
        except KeyError:
            pass
