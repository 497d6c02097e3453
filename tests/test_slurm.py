"""rbridge launch slurm against a REAL single-node SLURM (Debian's slurm-wlm and munge, started here as root
without systemd: munged, slurmctld and slurmd with a one-node slurm.conf on free ports, proctrack/linuxproc,
task/none, no accounting). `.ci/run` installs the packages; elsewhere these tests skip, saying why.

One test function, in phases, so that one cluster serves them all whatever pytest-xdist does:
a 3-task array serves a plan score for score like a local plan while one of its tasks is cancelled
(`scancel`: it checkpoints its run and gives it back) and another's worker is killed outright (a lost node:
its run is taken over after the heartbeat timeout); a task requeued mid-run (`scontrol requeue`) resumes its
run from a checkpoint; a task that runs out of `--time` gives its run back; nothing is left in the queue.
Wrong options and stores exit 2 naming them before anything is submitted.
"""

from __future__ import annotations

import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import SOURCES, gsm8k_lines

SPEC = f"""\
name: NAME
seed: 5
tokenizer: {{train: {{vocab_size: 300}}}}
{SOURCES}candidates:
  - {{name: spam, mix: {{spam: 1.0}}}}
  - {{name: kjv, mix: {{kjv: 1.0}}}}
  - {{name: cot, mix: {{cot: 1.0}}}}
  - {{name: kjv-cot, mix: {{kjv: 0.5, cot: 0.5}}}}
benchmarks:
  - {{name: gsm8k, traces: {{TRACES}}}}
stages:
  - name: filter
    proxy: {{hidden_size: 16, num_hidden_layers: 1, num_attention_heads: 2}}
    tokens: TOKENS
    seq_len: 32
    batch_size: 8
    lr: 0.01
    evals: 2
    keep: 2
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sh(*cmd, env=None, check=True, timeout=60) -> subprocess.CompletedProcess:
    out = subprocess.run(list(cmd), env=env, capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"{cmd}: {out.returncode}\n{out.stdout}\n{out.stderr}")
    return out


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    missing = [b for b in ("munged", "munge", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "sinfo",
                           "scancel") if shutil.which(b) is None]
    if missing:
        pytest.skip(f"SLURM is not installed here ({', '.join(missing)} missing; .ci/run installs Debian's "
                    "slurm-wlm and munge)")
    if os.geteuid() != 0:
        pytest.skip("the test starts munged, slurmctld and slurmd itself, which needs root")
    d = tmp_path_factory.mktemp("slurm")
    if _sh("munge", "-n", check=False).returncode != 0:  # no munged answering: start one
        key = Path("/etc/munge/munge.key")
        if not key.exists():
            key.parent.mkdir(parents=True, exist_ok=True)
            key.write_bytes(os.urandom(1024))
            key.chmod(0o400)
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        _sh("munged", "--force")
        for _ in range(50):
            if _sh("munge", "-n", check=False).returncode == 0:
                break
            time.sleep(0.1)
    host = socket.gethostname().split(".")[0]
    (d / "state").mkdir()
    (d / "spool").mkdir()
    conf = d / "slurm.conf"
    conf.write_text(f"""ClusterName=rbtest
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MpiDefault=none
KillWait=10
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SlurmdParameters=config_overrides
NodeName={host} CPUs={2 * (os.cpu_count() or 1)} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
""")
    env = dict(os.environ, SLURM_CONF=str(conf))
    _sh("slurmctld", "-f", str(conf), "-i", env=env)
    _sh("slurmd", "-f", str(conf), env=env)
    for _ in range(100):
        if "idle" in _sh("sinfo", "-h", "-o", "%t", env=env, check=False).stdout:
            break
        time.sleep(0.2)
    else:
        pytest.fail("the test cluster's node never became idle: " + (d / "slurmctld.log").read_text()[-2000:])
    yield d, env
    _sh("scancel", "-u", "root", env=env, check=False)
    for pid_file in ("slurmd.pid", "slurmctld.pid"):
        try:
            os.kill(int((d / pid_file).read_text().strip()), 15)
        except (OSError, ValueError):
            pass


def _rbridge(*args, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rbridge.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def _plan_dir(root: Path, name: str, tokens: int) -> Path:
    d = root / name
    d.mkdir()
    traces = d / "traces.jsonl"
    traces.write_text(gsm8k_lines(6))
    (d / "plan.yaml").write_text(SPEC.replace("NAME", name).replace("{TRACES}", str(traces))
                                 .replace("TOKENS", str(tokens)))
    return d


def _scores(db: Path) -> dict:
    with sqlite3.connect(db) as con:
        return {(c, r): v for c, r, v in con.execute(
            "SELECT c.name, e.rung, e.value FROM evaluations e JOIN runs r ON r.id = e.run_id JOIN candidates c "
            "ON c.id = r.candidate_id WHERE e.metric = 'rbridge'")}


def _query(db: Path, sql: str):
    try:
        with sqlite3.connect(db, timeout=30) as con:
            return con.execute(sql).fetchall()
    except sqlite3.OperationalError:
        return []


def _wait(cond, seconds: float, what: str, env=None, plan_dir: Path | None = None):
    end = time.time() + seconds
    while time.time() < end:
        if cond():
            return
        time.sleep(0.3)
    queue = _sh("squeue", env=env, check=False).stdout if env else ""
    said = ""
    if plan_dir is not None:  # what the tasks printed and what the store holds, to see why
        dbs = sorted((plan_dir / "stores").glob("*.db"))
        runs = _query(dbs[0], "SELECT c.name, r.status, r.worker, r.tokens_seen FROM runs r JOIN candidates c ON "
                              "c.id = r.candidate_id") if dbs else []
        said = f"\nruns: {runs}\ntask logs:\n{_logs(plan_dir)[-4000:]}"
    raise AssertionError(f"timed out waiting for {what}\n{queue}{said}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()


def _steps_of(job: str) -> list[str]:
    """This node's slurmstepd processes of a job ("slurmstepd: [8.batch]"): its tasks still ending."""
    found = []
    for d in Path("/proc").iterdir():
        try:
            cmd = (d / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if cmd.startswith(f"slurmstepd: [{job}."):
            found.append(cmd)
    return found


def _queue_empty(env, job: str | None = None) -> bool:
    """No task of the job (or of any job) left in the queue."""
    return _sh("squeue", "-h", *(["-j", job] if job else []), env=env, check=False).stdout.strip() == ""


def _logs(d: Path) -> str:
    return "\n".join(p.read_text() for p in sorted((d / "stores").glob("*.slurm-logs/*.out")))


@pytest.mark.long(110)
def test_a_plan_served_by_a_slurm_job_array(cluster, tmp_path, shared_cache):
    conf_dir, slurm_env = cluster
    env = dict(slurm_env, RBRIDGE_CACHE=str(shared_cache), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               RBRIDGE_BF16_SPEEDUP="1", RBRIDGE_HEARTBEAT_TIMEOUT="4", RBRIDGE_POLL_S="0.3")

    # wrong inputs: exit 2 naming them, nothing submitted
    ref = _plan_dir(tmp_path, "ref", 8192)
    for args, words in ((["--workers", "0"], "--workers"), (["--workers", "2", "--partition", "nope"], "nope"),
                        (["--workers", "2", "--mem", "lots"], "--mem"),
                        (["--workers", "2", "--runs-per-gpu", "2"], "--runs-per-gpu")):
        bad = _rbridge("plan", "plan.yaml", "--launch", "slurm", *args, cwd=ref, env=env)
        assert bad.returncode == 2 and words in bad.stderr, (args, bad.stdout + bad.stderr)
    assert _queue_empty(slurm_env) and not (ref / "stores" / "ref.db").exists()
    missing = _rbridge("launch", "slurm", "--store", str(ref / "stores" / "none.db"), "--workers", "1", cwd=ref,
                       env=env)
    assert missing.returncode == 2 and "none.db" in missing.stderr, missing.stderr

    # 4 (started now, checked at the end: SLURM warns a 2-minute task 30 to 60 s after it starts). A task that
    # runs out of --time gives its run back (SIGTERM before the limit) and leaves the queue
    env_slow = dict(env, RBRIDGE_SLOW_STEP_S="0.15")
    tm = _plan_dir(tmp_path, "tm", 65536)
    out = _rbridge("plan", "plan.yaml", "--launch", "slurm", "--workers", "1", "--time", "2", cwd=tm, env=env_slow)
    assert out.returncode == 0, out.stdout + out.stderr
    tm_job = out.stdout.split("submitted job array ", 1)[1].split(":", 1)[0]
    tm_db = tm / "stores" / "tm.db"
    assert "#SBATCH --signal=B:TERM@30" in _query(tm_db, "SELECT script FROM launches")[0][0]

    # 1. a 3-task array equals a local plan of the same spec, score for score, though one task is cancelled
    # (scancel: it checkpoints its run and gives it back) and another's worker is killed outright (a lost node:
    # its run is taken over after the heartbeat timeout), each while it holds a run. One array for the three
    # cases: each task and each launch is a process importing torch (seconds of CPU). Slow steps (a sleep)
    # keep each run in training long enough to be seen holding it.
    local = _rbridge("plan", "plan.yaml", "--workers", "1", cwd=ref, env=env)
    assert local.returncode == 0, local.stdout + local.stderr
    arr = _plan_dir(tmp_path, "arr", 8192)
    (arr / "plan.yaml").write_text((ref / "plan.yaml").read_text().replace("name: ref", "name: arr"))
    out = _rbridge("plan", "plan.yaml", "--launch", "slurm", "--workers", "3", "--time", "30", cwd=arr, env=env_slow)
    assert out.returncode == 0 and "submitted job array" in out.stdout, out.stdout + out.stderr
    job = out.stdout.split("submitted job array ", 1)[1].split(":", 1)[0]
    db = arr / "stores" / "arr.db"
    held = {}  # task -> (candidate, worker) of the run it held when seen

    def act() -> bool:
        for task in (1, 2):
            if task not in held:
                rows = _query(db, "SELECT c.name, r.worker FROM runs r JOIN candidates c ON c.id = r.candidate_id "
                                  f"WHERE r.status = 'running' AND r.worker LIKE '%slurm={job}_{task}%'")
                if rows:
                    held[task] = rows[0]
                    if task == 1:
                        _sh("scancel", f"{job}_1", env=slurm_env)
                    else:
                        os.kill(int(rows[0][1].split(":")[1]), 9)
        return len(held) == 2

    _wait(act, 120, "tasks 1 and 2 to hold a run", slurm_env, arr)
    _wait(lambda: _query(db, "SELECT status FROM plans") == [("done",)] and _queue_empty(slurm_env, job), 240,
          "task 0 to finish the plan", slurm_env, arr)
    assert _scores(db) == _scores(ref / "stores" / "ref.db")
    task = {i: (arr / "stores" / "arr.slurm-logs" / f"rbridge-arr-{job}_{i}.out").read_text() for i in range(3)}
    assert "stopped by SIGTERM: the running proxy was checkpointed and given back" in task[1], task[1][-2000:]
    assert f"filter/{held[1][0]} rung" in task[0] + task[2], _logs(arr)[-3000:]  # another task trained it on
    assert f"taking over run filter/{held[2][0]}" in _logs(arr), _logs(arr)[-3000:]
    status = _rbridge("status", "--store", str(db), cwd=arr, env=env)
    assert "slurm job array" in status.stdout and "(done)" in status.stdout, status.stdout
    script = _rbridge("launch", "slurm", "--store", str(ref / "stores" / "ref.db"), "--workers", "2", "--dry-run",
                      cwd=ref, env=env)
    assert script.returncode == 2 and "no unfinished plan" in script.stderr  # ref is done: nothing to serve

    # 2. a task requeued mid-run resumes its run from a checkpoint, not from step 0
    rq = _plan_dir(tmp_path, "rq", 4096)
    out = _rbridge("plan", "plan.yaml", "--launch", "slurm", "--workers", "1", cwd=rq, env=env_slow)
    assert out.returncode == 0, out.stdout + out.stderr
    job = out.stdout.split("submitted job array ", 1)[1].split(":", 1)[0]
    rq_db = rq / "stores" / "rq.db"
    _wait(lambda: _query(rq_db, "SELECT count(*) FROM evaluations") not in ([], [(0,)])
          and _query(rq_db, "SELECT count(*) FROM runs WHERE status = 'running'") == [(1,)], 120,
          "a run in training after the first rung", slurm_env, rq)
    time.sleep(2)
    [(first_worker,)] = _query(rq_db, "SELECT worker FROM runs WHERE status = 'running'")
    _sh("scontrol", "requeue", f"{job}_0", env=slurm_env)
    # SLURM holds a requeued batch job back for about two minutes; once its first run has ended (its worker
    # and its slurmstepd gone, so that the end of the first run cannot reach the second), let it start now
    _wait(lambda: not _alive(int(first_worker.split(":")[1])) and not _steps_of(job) and _sh(
          "squeue", "-h", "-j", job, "-o", "%T", env=slurm_env, check=False).stdout.strip() == "PENDING", 60,
          "the requeued task to wait", slurm_env, rq)
    _sh("scontrol", "update", f"jobid={job}_0", "StartTime=now", env=slurm_env, check=False)
    _wait(lambda: _query(rq_db, "SELECT status FROM plans") == [("done",)] and _queue_empty(slurm_env, job), 240,
          "the requeued task to finish the plan", slurm_env, rq)
    logs = _logs(rq)
    assert "stopped by SIGTERM" in logs and "resuming from its checkpoint at step" in logs, logs[-3000:]

    _wait(lambda: _queue_empty(slurm_env, tm_job), 180, "the task to reach its time limit", slurm_env, tm)
    assert _query(tm_db, "SELECT status FROM plans") == [("running",)]
    assert _query(tm_db, "SELECT count(*) FROM runs WHERE status = 'running'") == [(0,)]  # given back
    assert "stopped by SIGTERM" in _logs(tm), _logs(tm)
    assert list((tm / "stores" / "tm.runs" / "filter").glob("*/step_*"))  # its checkpoint, to resume from
    cancel = _rbridge("launch", "slurm", "--cancel", "--store", str(tm_db), cwd=tm, env=env)
    assert cancel.returncode == 0, cancel.stderr
    assert _queue_empty(slurm_env)
