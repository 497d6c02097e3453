"""`rbridge plan` uses the whole machine (issue 14): runs of a rung train at once in local worker processes.

The same plan with 1 and with 2 local processes gives the same decisions and the same scores, and a
2-process plan killed mid-way and resumed with 2 processes ends the same again: the processes share
runs through the store's claims, and a run's numbers depend only on its inputs.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from test_resume import _decisions, _ranking, _rbridge, _same, _setup, crash_baseline


@pytest.mark.long(70)
def test_one_or_two_local_workers_and_a_killed_two_worker_plan_give_the_same_plan(tmp_path, tmp_path_factory,
                                                                                    shared_cache):
    cache = shared_cache
    # one process: the crash spec's plan as tests/test_resume.py's tests compare with, made once a test run
    one, info = crash_baseline(tmp_path_factory, cache)
    runs = {"1": (one / "stores/crash.db", info["stdout"])}
    d = tmp_path / "w2"
    d.mkdir()
    # Slow steps (a sleep, no compute) so the second process, a few seconds to start, finds work left
    # (a sleep changes no number).
    env = dict(_setup(d, cache), RBRIDGE_WORKERS="2", RBRIDGE_POLL_S="0.2", RBRIDGE_SLOW_STEP_S="0.4")
    res = _rbridge(["plan", "crash.yaml"], d, env)
    assert res.returncode == 0, res.stdout + res.stderr
    runs["2"] = (d / "stores/crash.db", res.stdout)
    # every process closed its connections (the CLI skips the last garbage collections), the plan's own
    # last, after its local processes ended: WAL checkpointed and removed
    assert not info["wal_left"], "a -wal file is left beside the store of the one-process plan"
    assert not Path(f"{runs['2'][0]}-wal").exists(), "a -wal file is left beside the store of the two-process plan"
    assert "local workers" not in runs["1"][1]
    out2 = runs["2"][1]
    assert "local workers: 1 more process(es) beside this one" in out2
    assert "w1| " in out2 and " rung 1: rbridge gsm8k" in out2.split("w1| ", 1)[1]  # the other process trained
    trained = [out.split("rungs trained and scored this time: ")[1].split(";")[0] for _, out in runs.values()]
    assert trained[0] == trained[1] and int(trained[0]) > 4  # every rung step, counted across processes
    _same(_ranking(runs["2"][0]), info["ranking"])
    assert _decisions(runs["2"][0]) == info["decisions"]
    # Every run records its threads (the stage's rule: one for small proxies), its device and an MFU,
    # and status reports them per run and per stage.
    with sqlite3.connect(runs["2"][0]) as con:
        rows = con.execute("SELECT threads, device, precision, mfu FROM runs WHERE tokens_seen > 0").fetchall()
        measured = con.execute("SELECT stage, precision, precision_rates FROM runs WHERE precision_rates != ''"
                               " ORDER BY id").fetchall()
    # precision auto: what fp32 against bf16 measured on this machine chose (the same in every run of a
    # stage); the measurement is recorded with the precision and agrees with it
    native = rows[0][2]
    assert rows and all(t == 1 and d == "cpu" and p == native and 0 < m < 1 for t, d, p, m in rows), rows
    assert measured and measured[0][1] == native
    for _, p, text in measured:
        r = json.loads(text)
        assert r["how"].startswith("training steps") and r["threads"] == 1 and r["fp32"] > 0 and r["bf16"] > 0
        assert p == ("bf16" if r["bf16"] >= 1.15 * r["fp32"] else "fp32")
    shown = _rbridge(["status", "--store", str(runs["2"][0]), "--json"], tmp_path / "w2", dict(os.environ))
    status = json.loads(shown.stdout)
    assert all(st["threads"] == 1 and st["devices"] == ["cpu"] and st["precisions"] == [native]
               and 0 < st["mfu"] < 1 for st in status["stages"])
    assert all(st["precision_rates"]["text"].startswith("bf16 ") for st in status["stages"])
    # Each run's proxy is exported as a Hugging Face folder after every rung: `rbridge score` on the run
    # folder re-scores it without training and gives the stored score of its last rung.
    folder, stored, low, high = info["last_rank_score"]
    ranked = info["ranked"]
    assert (Path(folder) / "model/config.json").is_file() and (Path(folder) / "model/tokenizer.json").is_file()
    # The plan scores in its training precision; `rbridge score --precision <it>` reproduces it exactly.
    rescored = _rbridge(["score", "--model", folder, "--traces", "traces.jsonl", "--no-baselines", "--json",
                         "--no-cache", "--per-trace", "--precision", native], d, dict(os.environ))
    assert rescored.returncode == 0, rescored.stderr
    doc = json.loads(rescored.stdout)
    bench = doc["benchmarks"]["gsm8k"]
    assert doc["precision"] == native and abs(bench["rbridge"] - stored) < 1e-6
    # The other precision gives a close score, and says which it computed in (`rbridge score`'s own function,
    # here: another process would spend seconds importing torch for it).
    from rbridge.scoring.api import score_file

    other = {"bf16": "fp32", "fp32": "bf16"}[native]
    other_doc, _ = score_file(folder, d / "traces.jsonl", baselines=False, precision=other, use_cache=False)
    assert other_doc["precision"] == other
    assert abs(other_doc["benchmarks"]["gsm8k"]["rbridge"] - stored) < 0.02 * stored
    # Every ranked score carries its bootstrap interval over the traces, reproducible from seed 0:
    # 1,000 resamples of the per-trace values, 2.5% and 97.5% quantiles of their means.
    assert ranked and all(lo <= v <= hi for v, lo, hi in ranked)
    values = np.array([t["rbridge"] for t in bench["traces"]])
    draws = np.random.default_rng(0).integers(0, len(values), size=(1000, len(values)))
    assert np.allclose(np.quantile(values[draws].mean(axis=1), [0.025, 0.975]), [low, high], atol=1e-6)

    d = tmp_path / "killed"
    d.mkdir()
    env = dict(_setup(d, cache), RBRIDGE_WORKERS="2", RBRIDGE_POLL_S="0.2")
    killed = _rbridge(["plan", "crash.yaml"], d, env, failpoint="after-score:3")  # every process dies there
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    resumed = _rbridge(["resume", "--store", "stores/crash.db"], d, env)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    _same(_ranking(d / "stores/crash.db"), info["ranking"])
    assert _decisions(d / "stores/crash.db") == info["decisions"]


WAITER = """
import sys, time
from rbridge.planner.local import read_line_from_stdin, stdin_waiter
polls = []
wait = stdin_waiter(poll=polls.append)
print(read_line_from_stdin().strip(), flush=True)   # the plan's "go"
t = time.monotonic(); wait(120); print("woke" if time.monotonic() - t < 100 else "slept", flush=True)
wait(120); print("end of input" if polls == [] else "?", flush=True)  # EOF wakes it too
wait(7.5); print("polls", polls, flush=True)  # after EOF: the plain poll
"""


def test_a_waiting_local_process_wakes_on_the_plans_nudge_and_polls_after_its_end(tmp_path):
    """rbridge plan's local processes wait for news on stdin (LocalWorkers.nudge) instead of sleeping a
    whole poll interval at every rung's end; once the plan closes their stdin they poll as before."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", WAITER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, bufsize=1)
    proc.stdin.write("go\n\n")  # the word and a nudge at once: nothing of the nudge is buffered away
    proc.stdin.flush()
    assert proc.stdout.readline().strip() == "go"
    assert proc.stdout.readline().strip() == "woke"
    proc.stdin.close()
    assert proc.stdout.readline().strip() == "end of input"
    assert proc.stdout.readline().strip() == "polls [7.5]"
    assert proc.wait(timeout=60) == 0


def test_a_plan_too_small_to_pay_for_a_second_process_starts_none(tmp_path, monkeypatch):
    """A second local process costs seconds of imports; a plan whose whole work (an upper bound: training
    and scoring, every parameter, every candidate in every stage) is below LOCAL_WORKERS_FROM_FLOPS starts
    none. --workers / RBRIDGE_WORKERS still wins, the default plan still uses every core, and where the
    vocabulary is not known before the data (a tokenizer folder) or a stage generates, the old rule holds."""
    from rbridge.planner import local
    from rbridge.planner.local import LOCAL_WORKERS_FROM_FLOPS, layout, plan_work_flops, trace_tokens_bound
    from rbridge.scoring.traces import load_traces
    from rbridge.spec import load_spec, parse_spec
    from conftest import gsm8k_lines
    from test_resume import CANDIDATES, _spec

    monkeypatch.setattr(local.os, "cpu_count", lambda: 4)
    (tmp_path / "traces.jsonl").write_text(gsm8k_lines(6))
    spec = parse_spec(_spec(CANDIDATES), tmp_path / "crash.yaml")
    stages = spec.resolved_stages()
    traces = {"gsm8k": load_traces(tmp_path / "traces.jsonl")}
    scored = trace_tokens_bound(spec.benchmarks, traces)
    assert scored == sum(len(t.question.encode()) + len(t.reasoning.encode()) + 2 for t in traces["gsm8k"])
    # by hand: hidden 16 / 32, one layer, intermediate 64 / 128 (LlamaConfig's rule), tied 300-word embedding;
    # 2,048 tokens and 2 rungs, then 2,048 tokens and 1 rung, four candidates each (before pruning)
    params = [1 * (4 * 16 * 16 + 3 * 16 * 64 + 2 * 16) + 16 + 300 * 16,
              1 * (4 * 32 * 32 + 3 * 32 * 128 + 2 * 32) + 32 + 300 * 32]
    flops = plan_work_flops(stages, 4, 300, scored)
    assert flops == 4 * (params[0] * (6.0 * 2048 + 2.0 * scored * 2) + params[1] * (6.0 * 2048 + 2.0 * scored))
    assert flops < LOCAL_WORKERS_FROM_FLOPS
    assert layout(None, [1, 1], 1, flops).processes == 1
    assert layout(2, [1, 1], 1, flops).processes == 2            # asked for: started
    assert plan_work_flops(stages, 4, None, scored) is None       # vocabulary unknown: every core
    assert layout(None, [1, 1], 1, None).processes == 4
    assert layout(None, [1, 1], 1, LOCAL_WORKERS_FROM_FLOPS).processes == 4
    default = load_spec(Path(__file__).resolve().parents[1] / "specs/mix.yaml")
    big = plan_work_flops(default.resolved_stages(), len(default.candidates), 4096, scored)
    assert big > 100 * LOCAL_WORKERS_FROM_FLOPS and layout(None, [1, 1], 1, big).processes == 4


def test_processes_sharing_a_gpu_host_divide_its_cores(monkeypatch):
    """runs_per_gpu > 1: every local process on a GPU host gets cores / processes CPU threads, not torch's
    default of all the cores each (oversubscription): the plan's own worker through ``host_processes``, the
    processes it starts through their environment. --threads still wins; a CPU host keeps its rule."""
    from rbridge.planner import local
    from rbridge.planner.local import HOST_PROCESSES_ENV, Layout, threads_for

    monkeypatch.setattr(local, "_DEFAULT_THREADS", 16)
    monkeypatch.delenv(HOST_PROCESSES_ENV, raising=False)
    assert threads_for(10**6) == 1 and threads_for(10**8) == 16              # CPU host: one thread for small
    monkeypatch.setattr(local.torch.cuda, "is_available", lambda: True)
    assert threads_for(10**6) == 16                                          # a GPU host alone: every core
    assert threads_for(10**6, None, 4) == 4 and threads_for(10**8, None, 32) == 1   # never 0
    assert threads_for(10**6, 3, 4) == 3                                     # --threads wins
    env = Layout(processes=4, gpus=1, runs_per_gpu=4, threads=None).child_env(2)
    assert env[HOST_PROCESSES_ENV] == "4" and env["CUDA_VISIBLE_DEVICES"] == "0"
    assert HOST_PROCESSES_ENV not in Layout(processes=2, gpus=0, runs_per_gpu=1, threads=1).child_env(1)
    monkeypatch.setenv(HOST_PROCESSES_ENV, env[HOST_PROCESSES_ENV])           # a local process on that host
    assert threads_for(10**6) == 4
