"""Workers as one SLURM job array (``rbridge launch slurm``, ``rbridge plan --launch slurm``).

Each array task runs ``rbridge worker --until-idle`` against the store, with the same
Python, working folder and ``RBRIDGE_*`` variables as the launching shell: the store is
the only coordinator (claims, heartbeats, rung decisions made by whichever worker
completes a rung), so tasks need nothing from each other or from the launcher, and the
array ends when the plan does.

The script is written here, not through submitit: a worker is a command, not a Python
callable, and submitit's requeue protocol (pickled callables, its own checkpoint hook)
would duplicate what the store's claims and rbridge's checkpoints already do. The
script asks for:

- ``--requeue``: a preempted or ``scontrol requeue``\\ d task runs again;
- ``--signal=B:TERM@<grace>``: SIGTERM to the worker (the batch shell ``exec``\\ s it, or
  forwards it to its GPU workers) ``grace`` seconds before the time limit; SLURM sends
  SIGTERM itself on preemption and requeue. On SIGTERM a worker checkpoints its run at
  the next step, gives it back to the store and exits, so the requeued task, or any
  other worker, resumes the run from that checkpoint, never from step 0;
- ``--array=0-(N-1)%K``, one task per worker, at most K at once;
- per task: ``--cpus-per-task`` (the worker's torch threads), ``--gres=gpu:G`` with
  ``R`` worker processes per GPU (each sees one GPU through ``CUDA_VISIBLE_DEVICES``),
  ``--mem``, ``--time``, ``--partition``, and any ``--sbatch-arg``.

SQLite stores are accepted only when every node of the partition is this machine (SQLite
locking over network file systems loses data); otherwise PostgreSQL.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from rbridge.errors import InputError

DEFAULT_GRACE_S = 120  # seconds between the warning signal and the time limit: a checkpoint of a large proxy


@dataclass
class SlurmOptions:
    workers: int
    partition: str | None = None
    gpus_per_worker: int = 0
    runs_per_gpu: int = 1
    cpus_per_worker: int = 1
    mem: str | None = None
    time_minutes: int | None = None
    parallelism: int | None = None
    sbatch_args: list[str] = field(default_factory=list)
    grace_s: int = DEFAULT_GRACE_S

    def check(self) -> None:
        """Refuse options that cannot work, naming them (exit 2), before anything is asked of SLURM."""
        for name, value, low in (("--workers", self.workers, 1), ("--runs-per-gpu", self.runs_per_gpu, 1),
                                 ("--cpus-per-worker", self.cpus_per_worker, 1),
                                 ("--gpus-per-worker", self.gpus_per_worker, 0)):
            if value < low:
                raise InputError(f"must be at least {low} (got {value})", field=name)
        if self.parallelism is not None and self.parallelism < 1:
            raise InputError(f"must be at least 1 (got {self.parallelism})", field="--parallelism")
        if self.time_minutes is not None and self.time_minutes < 2:
            # SLURM may send the --signal warning up to 60 s before the time asked for (sbatch(1)): a
            # 1-minute task could be told to stop before its worker has started.
            raise InputError(f"must be at least 2 minutes (got {self.time_minutes}): SLURM may send the stop "
                             "warning up to a minute early", field="--time")
        if self.time_minutes is not None:
            # warned at least 30 s before the limit, and never before 30 s of work even when SLURM warns a
            # minute early: 2 minutes -> 30 s, 3 -> 90 s, 4 and more -> DEFAULT_GRACE_S
            self.grace_s = min(self.grace_s, self.time_minutes * 60 - 90)
        if self.mem is not None and not re.fullmatch(r"\d+[KMGT]?", self.mem):
            raise InputError(f"must be a size SLURM reads, such as 4G or 16000M (got {self.mem!r})", field="--mem")
        if self.runs_per_gpu > 1 and not self.gpus_per_worker:
            raise InputError("needs --gpus-per-worker", field="--runs-per-gpu")
        for arg in self.sbatch_args:
            if not arg.startswith("--"):
                raise InputError(f"an sbatch option as --name=value, got {arg!r}", field="--sbatch-arg")
            if arg.split("=", 1)[0] in ("--array", "--wrap", "--parsable"):
                raise InputError(f"{arg.split('=', 1)[0]} is rbridge's to set", field="--sbatch-arg")


def slurm_task(worker: str) -> str | None:
    """The SLURM job (``<job>_<task>``) a worker id names (rbridge.planner.claims.worker_id), or None."""
    for part in worker.split(":")[3:]:
        if part.startswith("slurm="):
            return part[len("slurm="):]
    return None


def require_slurm() -> None:
    missing = [c for c in ("sbatch", "squeue", "scancel", "sinfo") if shutil.which(c) is None]
    if missing:
        raise InputError(f"{', '.join(missing)} not found: run this on a SLURM login node (or put SLURM's "
                         "commands on PATH)", field="launch slurm")


def _run(cmd: list[str], what: str, stdin: str | None = None) -> str:
    try:
        out = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise InputError(f"{what}: {cmd[0]} did not answer ({exc})", field="launch slurm") from None
    if out.returncode != 0:
        msg = (out.stderr or out.stdout).strip().splitlines()
        raise InputError(f"{what}: {cmd[0]} said: {msg[-1] if msg else f'exit {out.returncode}'}",
                         field="launch slurm")
    return out.stdout


def partition_nodes(partition: str | None) -> list[str]:
    """The nodes of ``partition`` (the default partition when None); an unknown one is refused."""
    args = ["sinfo", "-h", "-o", "%P %N"] + (["-p", partition] if partition else [])
    rows = [line.split() for line in _run(args, "listing partitions").splitlines() if line.strip()]
    if partition is None:
        rows = [r for r in rows if r[0].endswith("*")]
    if not rows:
        known = sorted({line.split()[0].rstrip("*") for line in _run(["sinfo", "-h", "-o", "%P"], "listing "
                        "partitions").splitlines() if line.strip()})
        raise InputError(f"no such partition {partition!r} (this cluster has: {', '.join(known) or 'none'})"
                         if partition else "this cluster has no default partition: give --partition",
                         field="--partition")
    nodes: list[str] = []
    for r in rows:
        if len(r) > 1 and r[1] not in ("", "n/a"):
            nodes += [n for n in _run(["scontrol", "show", "hostnames", r[1]], "listing nodes").split() if n]
    return nodes


def this_host() -> set[str]:
    name = socket.gethostname()
    return {name, name.split(".")[0], socket.getfqdn()}


def check_store(store_url: str, opts: SlurmOptions) -> None:
    """SQLite only where every task runs on this machine (the partition's nodes, or a --nodelist of it)."""
    if not store_url.startswith("sqlite"):
        return
    pinned = [a.split("=", 1)[1] for a in opts.sbatch_args if a.startswith(("--nodelist=", "-w="))]
    nodes = pinned or partition_nodes(opts.partition)
    others = sorted(set(nodes) - this_host())
    if others:
        raise InputError(f"a SQLite store serves workers on this machine only, and the partition's tasks may run "
                         f"on {', '.join(others[:5])}{' ...' if len(others) > 5 else ''}: SQLite's locks over a "
                         "network file system lose data. Use a PostgreSQL store (--store postgresql://...), or "
                         f"pin the tasks here with --sbatch-arg=--nodelist={socket.gethostname()}", field="--store")


def worker_command(store_url: str, plan: str | None, stages: list[str], threads: int) -> list[str]:
    cmd = [sys.executable, "-m", "rbridge.cli", "worker", "--store", store_url, "--until-idle",
           "--threads", str(threads)]
    if plan:
        cmd += ["--plan", plan]
    for st in stages:
        cmd += ["--stage", st]
    return cmd


def build_script(store_url: str, plan: str | None, stages: list[str], opts: SlurmOptions, *, cwd: Path,
                 log_dir: Path, job_name: str, env: dict[str, str] | None = None) -> str:
    """The sbatch script of the job array (what ``--dry-run`` prints and what is submitted)."""
    env = dict(os.environ if env is None else env)
    array = f"0-{opts.workers - 1}" + (f"%{opts.parallelism}" if opts.parallelism else "")
    lines = ["#!/bin/bash", f"#SBATCH --job-name={job_name}", f"#SBATCH --array={array}",
             f"#SBATCH --cpus-per-task={opts.cpus_per_worker * max(1, opts.gpus_per_worker * opts.runs_per_gpu)}",
             "#SBATCH --requeue", f"#SBATCH --signal=B:TERM@{opts.grace_s}",
             f"#SBATCH --output={log_dir}/%x-%A_%a.out", "#SBATCH --open-mode=append"]
    if opts.partition:
        lines.append(f"#SBATCH --partition={opts.partition}")
    if opts.gpus_per_worker:
        lines.append(f"#SBATCH --gres=gpu:{opts.gpus_per_worker}")
    if opts.mem:
        lines.append(f"#SBATCH --mem={opts.mem}")
    if opts.time_minutes:
        lines.append(f"#SBATCH --time={opts.time_minutes}")
    lines += [f"#SBATCH {a}" for a in opts.sbatch_args]
    lines += ["", "# rbridge worker(s) serving the plan until it is done; SIGTERM (preemption, requeue, the",
              "# time limit's warning) checkpoints the run, gives it back to the store and exits.",
              "set -u", f"cd {shlex.quote(str(cwd))}"]
    for k in sorted(env):
        if k.startswith("RBRIDGE_") and k not in ("RBRIDGE_WORKERS",):
            lines.append(f"export {k}={shlex.quote(env[k])}")
    cmd = " ".join(shlex.quote(c) for c in worker_command(store_url, plan, stages, opts.cpus_per_worker))
    if not opts.gpus_per_worker:
        lines.append(f"exec {cmd}")
    else:
        per_task = opts.gpus_per_worker * opts.runs_per_gpu
        lines += [f"# {opts.runs_per_gpu} worker(s) per GPU, {per_task} in this task, each on one GPU",
                  "gpus=(${CUDA_VISIBLE_DEVICES//,/ })", "pids=()",
                  f"for i in $(seq 0 {per_task - 1}); do",
                  f"  CUDA_VISIBLE_DEVICES=${{gpus[$((i / {opts.runs_per_gpu}))]}} {cmd} &",
                  "  pids+=($!)", "done",
                  "trap 'kill -TERM \"${pids[@]}\" 2>/dev/null' TERM",
                  "wait; wait  # the second wait: the workers' own exits after a forwarded SIGTERM"]
    return "\n".join(lines) + "\n"


def submit(script: str) -> str:
    """Submit the script; the job id."""
    out = _run(["sbatch", "--parsable"], "submitting the job array", stdin=script).strip()
    job = out.split(";", 1)[0]
    if not job.isdigit():
        raise InputError(f"sbatch answered {out!r}, not a job id", field="launch slurm")
    return job


def cancel(job_ids: list[str]) -> None:
    if job_ids:
        _run(["scancel", *job_ids], "cancelling")


def task_states(job_ids: list[str]) -> dict[str, list[tuple[str, str, str]]]:
    """{job id: [(task id, state, reason or node)]} of the tasks SLURM still knows (finished tasks leave
    the queue: without accounting, SLURM forgets them)."""
    if not job_ids or shutil.which("squeue") is None:
        return {}
    try:
        out = subprocess.run(["squeue", "-h", "-r", "-j", ",".join(job_ids), "-o", "%F|%K|%T|%R"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    states: dict[str, list[tuple[str, str, str]]] = {}
    for line in out.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 4:
            states.setdefault(parts[0], []).append((parts[1], parts[2], parts[3]))
    return states
