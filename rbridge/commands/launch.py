"""`rbridge launch slurm`: a plan's workers as one SLURM job array (rbridge.launch.slurm)."""

from __future__ import annotations

import click

from rbridge.commands._base import console, guard, main
from rbridge.commands._launching import launch_workers, make_options, slurm_options
from rbridge.errors import InputError


@main.group()
def launch() -> None:
    """Start a plan's workers on a scheduler."""


@launch.command("slurm")
@click.option("--store", "store", required=True, help="The plan's store: postgresql://... for many nodes; a SQLite "
              "path only when every task runs on this machine.")
@click.option("--plan", "plan_name", default=None, help="Serve only this plan (default: every unfinished plan).")
@click.option("--stage", "stages", multiple=True, help="Take only runs of this stage (repeatable).")
@slurm_options
@click.option("--dry-run", is_flag=True, help="Print the sbatch script that would be submitted; submit nothing.")
@click.option("--cancel", is_flag=True, help="Cancel the job arrays launched for the plan(s) instead.")
@guard
def launch_slurm(store: str, plan_name: str | None, stages: tuple[str, ...], workers, partition, gpus_per_worker,
                 runs_per_gpu, cpus_per_worker, mem, time_minutes, parallelism, sbatch_args, dry_run: bool,
                 cancel: bool) -> None:
    """Submit ONE SLURM job array whose tasks each run `rbridge worker --until-idle` on the store.

    \b
    Tasks are requeueable and get SIGTERM before their time limit; on it, on preemption
    and on `scontrol requeue` a worker checkpoints its run, gives it back and exits, and
    the run resumes from that checkpoint in whichever worker takes it next. The array
    ends when the plan is done. `rbridge status` shows the array's tasks and the run
    each worker holds. The same Python, folder and RBRIDGE_* variables are used.
    """
    if cancel:
        _cancel(store, plan_name)
        return
    opts = make_options(workers, partition, gpus_per_worker, runs_per_gpu, cpus_per_worker, mem, time_minutes,
                        parallelism, sbatch_args)
    launch_workers(store, plan_name, list(stages), opts, dry_run)


def _cancel(store: str, plan_name: str | None) -> None:
    from rbridge.launch import slurm
    from rbridge.store import open_store
    from rbridge.store import plans as plan_ops

    slurm.require_slurm()
    st = open_store(store, create=False)
    try:
        plans = plan_ops.list_plans(st, plan_name)
        if plan_name and not plans:
            raise InputError(f"no plan '{plan_name}' in this store", file=store)
        rows = [launch for p in plans for launch in plan_ops.launches(st, p.id, live_only=True)]
        jobs = sorted({r.job_id for r in rows})
        slurm.cancel(jobs)
        plan_ops.mark_cancelled(st, [r.id for r in rows])
    finally:
        st.close()
    console.print(f"cancelled job array(s) {', '.join(jobs)}" if jobs else "no launched job array to cancel")
    if jobs:
        console.print("  their runs go back to the store when their heartbeats stop; `rbridge resume` or a new "
                      "launch continues the plan from the checkpoints")
