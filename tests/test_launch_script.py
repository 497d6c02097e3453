"""The sbatch script `rbridge launch slurm` submits (rbridge.launch.slurm), without a cluster: what a cluster
user checks in `--dry-run`, and options refused before anything is asked of SLURM (tests/test_slurm.py runs
the scripts on a real SLURM)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rbridge.errors import InputError
from rbridge.launch.slurm import SlurmOptions, build_script, slurm_task


def _script(**kw) -> str:
    opts = SlurmOptions(**{"workers": 3, **kw})
    opts.check()
    return build_script("postgresql://me@db/rb", "mix", ["filter"], opts, cwd=Path("/work/exp"),
                        log_dir=Path("/shared/logs"), job_name="rbridge-mix",
                        env={"RBRIDGE_RUNS": "/shared/runs", "RBRIDGE_CACHE": "/shared/cache", "HOME": "/root"})


def test_a_cpu_array_script():
    s = _script(partition="cpu", cpus_per_worker=2, mem="8G", time_minutes=90, parallelism=2,
                sbatch_args=["--account=lab"])
    for line in ("#SBATCH --array=0-2%2", "#SBATCH --cpus-per-task=2", "#SBATCH --requeue",
                 "#SBATCH --signal=B:TERM@120", "#SBATCH --partition=cpu", "#SBATCH --mem=8G", "#SBATCH --time=90",
                 "#SBATCH --account=lab", "#SBATCH --output=/shared/logs/%x-%A_%a.out", "cd /work/exp",
                 "export RBRIDGE_CACHE=/shared/cache", "export RBRIDGE_RUNS=/shared/runs"):
        assert line in s.splitlines(), (line, s)
    exec_line = next(line for line in s.splitlines() if line.startswith("exec "))
    assert "-m rbridge.cli worker --store postgresql://me@db/rb --until-idle --threads 2 --plan mix --stage filter" \
        in exec_line
    assert "HOME" not in s and "--gres" not in s


def test_a_gpu_array_script_starts_runs_per_gpu_workers_and_forwards_sigterm():
    s = _script(gpus_per_worker=2, runs_per_gpu=3, cpus_per_worker=1, time_minutes=3)
    assert "#SBATCH --gres=gpu:2" in s and "#SBATCH --cpus-per-task=6" in s
    assert "#SBATCH --signal=B:TERM@90" in s  # a short job: at least 30 s of work even when SLURM warns early
    assert "#SBATCH --signal=B:TERM@30" in _script(time_minutes=2)
    assert "#SBATCH --signal=B:TERM@120" in _script(time_minutes=4)
    assert "for i in $(seq 0 5); do" in s and "CUDA_VISIBLE_DEVICES=${gpus[$((i / 3))]}" in s
    assert "trap 'kill -TERM \"${pids[@]}\" 2>/dev/null' TERM" in s and "exec " not in s


@pytest.mark.parametrize("kw,field", [({"workers": 0}, "--workers"), ({"mem": "lots"}, "--mem"),
                                      ({"runs_per_gpu": 2}, "--runs-per-gpu"), ({"time_minutes": 0}, "--time"), ({"time_minutes": 1}, "--time"),
                                      ({"parallelism": 0}, "--parallelism"),
                                      ({"sbatch_args": ["--array=0-9"]}, "--sbatch-arg"),
                                      ({"sbatch_args": ["account=lab"]}, "--sbatch-arg")])
def test_options_that_cannot_work_are_refused_naming_them(kw, field):
    with pytest.raises(InputError) as err:
        SlurmOptions(**{"workers": 2, **kw}).check()
    assert err.value.field == field


def test_worker_ids_name_their_array_task():
    assert slurm_task("node7:123:abcd1234:slurm=991_4") == "991_4"
    assert slurm_task("node7:123:abcd1234") is None


def test_a_worker_stopped_while_it_starts_exits_politely(tmp_path):
    """SLURM may warn a task up to a minute early, while its worker still loads torch: exit 143, saying so."""
    import signal
    import subprocess
    import sys
    import time

    p = subprocess.Popen([sys.executable, "-m", "rbridge.cli", "worker", "--store", str(tmp_path / "s.db")],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    def catches_sigterm() -> bool:  # its handler is in place (SigCgt bit 15): inside the command
        line = next(x for x in open(f"/proc/{p.pid}/status") if x.startswith("SigCgt:"))
        return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)

    end = time.time() + 60
    while not catches_sigterm() and time.time() < end:
        time.sleep(0.01)
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 143, out
    assert "stopped by SIGTERM before it took a run: nothing to give back" in out, out
    assert not (tmp_path / "s.db").exists()
