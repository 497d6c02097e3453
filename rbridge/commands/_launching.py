"""What `rbridge launch slurm` and `rbridge plan --launch slurm` share: options, checks, the submission.

Registers no command (rbridge.commands.launch does), so `rbridge plan` may import it."""

from __future__ import annotations

from pathlib import Path

import click

from rbridge.commands._base import console
from rbridge.errors import InputError


def slurm_options(f, workers: bool = True):
    """The options `rbridge launch slurm` and `rbridge plan --launch slurm` share (`plan` has its own
    --workers, which counts array tasks under --launch slurm)."""
    opts = [click.option("--workers", type=int, default=None,
                         help="Array tasks, one worker each (required to launch).")] if workers else []
    for opt in reversed(opts + [
        click.option("--partition", default=None, help="SLURM partition (default: the cluster's default)."),
        click.option("--gpus-per-worker", type=int, default=0, show_default=True,
                     help="GPUs per task (--gres=gpu:G); 0: a CPU task."),
        click.option("--runs-per-gpu", type=int, default=1, show_default=True,
                     help="Worker processes per GPU: small proxies leave most of a GPU idle."),
        click.option("--cpus-per-worker", type=int, default=1, show_default=True,
                     help="CPU cores per worker process (its torch threads)."),
        click.option("--mem", default=None, help="Memory per task, as SLURM reads it (16G, 4000M)."),
        click.option("--time", "time_minutes", type=int, default=None,
                     help="Time limit per task in minutes; the worker gets SIGTERM before it and gives its run back."),
        click.option("--parallelism", type=int, default=None, help="At most this many tasks at once (--array=...%K)."),
        click.option("--sbatch-arg", "sbatch_args", multiple=True, metavar="--NAME=VALUE",
                     help="Any other sbatch option, repeatable (e.g. --sbatch-arg=--account=lab)."),
    ]):
        f = opt(f)
    return f


def make_options(workers, partition, gpus_per_worker, runs_per_gpu, cpus_per_worker, mem, time_minutes,
                 parallelism, sbatch_args):
    from rbridge.launch.slurm import SlurmOptions

    if workers is None:
        raise InputError("how many array tasks to submit", field="--workers")
    opts = SlurmOptions(workers=workers, partition=partition, gpus_per_worker=gpus_per_worker,
                        runs_per_gpu=runs_per_gpu, cpus_per_worker=cpus_per_worker, mem=mem,
                        time_minutes=time_minutes, parallelism=parallelism, sbatch_args=list(sbatch_args))
    opts.check()
    return opts


def check_launch(store: str, opts) -> None:
    """What can be checked before a plan is recorded: SLURM's commands, the partition, the store's kind."""
    from rbridge.launch import slurm
    from rbridge.store import store_url

    slurm.require_slurm()
    slurm.check_store(store_url(store), opts)


def launch_workers(store: str, plan_name: str | None, stages: list[str], opts, dry_run: bool) -> str | None:
    """Check, then (unless ``dry_run``) submit the array and record it on every plan it serves; the job id."""
    import shutil

    from rbridge.launch import slurm
    from rbridge.store import open_store, store_url
    from rbridge.store import plans as plan_ops

    url = store_url(store)
    st = open_store(store, create=False)
    try:
        plans = [p for p in plan_ops.list_plans(st, plan_name) if p.status != "done"]
        if not plans:
            raise InputError((f"no unfinished plan '{plan_name}' in this store" if plan_name else
                              "the store holds no unfinished plan for workers to serve")
                             + "; record one with `rbridge plan SPEC.yaml --store STORE --launch slurm ...`",
                             file=store)
        have_slurm = shutil.which("sbatch") is not None
        if have_slurm:
            slurm.check_store(url, opts)
        elif not dry_run:
            slurm.require_slurm()
        if url.startswith("sqlite:///"):
            log_dir = Path(url[len("sqlite:///"):]).with_suffix(".slurm-logs").resolve()
        else:
            log_dir = (Path("stores") / "slurm-logs").resolve()
        name = f"rbridge-{plan_name or plans[0].name if len(plans) == 1 else 'plans'}"
        script = slurm.build_script(url, plan_name, stages, opts, cwd=Path.cwd(), log_dir=log_dir, job_name=name)
        if dry_run:
            click.echo(script, nl=False)
            if not have_slurm:
                console.print("# (SLURM's commands are not on this machine: the partition and its nodes were "
                              "not checked)", style="yellow")
            return None
        log_dir.mkdir(parents=True, exist_ok=True)
        job = slurm.submit(script)
        for p in plans:
            plan_ops.record_launch(st, p.id, job, opts.workers, script)
    finally:
        st.close()
    console.print(f"submitted job array {job}: {opts.workers} task(s) serving plan(s) "
                  f"{', '.join(p.name for p in plans)}; logs in {log_dir}")
    console.print(f"  watch: rbridge status --store {store}    stop: rbridge launch slurm --cancel --store {store}")
    return job


