"""Disk: finished runs keep their exported model, `rbridge clean` frees the rest, and nothing a resume or a
--force promotion needs is lost (rbridge.planner.disk). Real plans in subprocesses, real SQLite files."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import pytest

from rbridge.planner.disk import folder_bytes, reduce_to_model, training_state, trim_checkpoints

from conftest import SOURCES, copy_folder, gsm8k_lines, repoint_store

# One worker runs the module: its module-scoped plan fixture is built once, not once per pytest -n worker.
pytestmark = [pytest.mark.xdist_group("disk"), pytest.mark.long(60)]  # about a minute as a group

SPEC = f"""\
name: disk
seed: 2
tokenizer: {{train: {{vocab_size: 300}}}}
{SOURCES}candidates:
  - {{name: spam, mix: {{spam: 1.0}}}}
  - {{name: kjv, mix: {{kjv: 1.0}}}}
  - {{name: cot, mix: {{cot: 1.0}}}}
  - {{name: kjv-cot, mix: {{kjv: 0.5, cot: 0.5}}}}
benchmarks:
  - {{name: gsm8k, traces: traces.jsonl}}
stages:
  - name: filter
    proxy: {{hidden_size: 16, num_hidden_layers: 1, num_attention_heads: 2}}
    tokens: 3072
    seq_len: 32
    batch_size: 8
    lr: 0.01
    evals: 3
    keep: KEEP
  - name: rank
    proxy: {{hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2}}
    tokens: 2048
    evals: 1
"""


def _rbridge(*args, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "rbridge.cli", *args], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=600)
    return out


def _plan_dir(d: Path, cache: Path, keep: int, extra: str = "") -> dict:
    d.mkdir(parents=True, exist_ok=True)
    (d / "traces.jsonl").write_text(gsm8k_lines(6))
    (d / "disk.yaml").write_text(SPEC.replace("KEEP", str(keep)) + extra)
    return dict(os.environ, RBRIDGE_CACHE=str(cache), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                RBRIDGE_WORKERS="1")


def _runs(db: Path) -> dict[tuple[str, str], tuple[str, str]]:
    # closing(): `with sqlite3.connect()` only commits; an open connection keeps the store's -shm file, which a
    # later test copying the folder would see vanish when the connection is collected
    with closing(sqlite3.connect(db)) as con:
        rows = con.execute("SELECT r.stage, c.name, r.status, r.checkpoint FROM runs r JOIN candidates c "
                           "ON c.id = r.candidate_id WHERE r.superseded_by = 0").fetchall()
    return {(s, n): (status, ckpt) for s, n, status, ckpt in rows}


def _scores(db: Path) -> dict[tuple[str, str, int], float]:
    with closing(sqlite3.connect(db)) as con:
        rows = con.execute("SELECT r.stage, c.name, e.rung, e.value FROM evaluations e JOIN runs r ON r.id = e.run_id "
                           "JOIN candidates c ON c.id = r.candidate_id WHERE e.metric = 'rbridge' "
                           "AND r.superseded_by = 0").fetchall()
    return {(s, n, rung): v for s, n, rung, v in rows}


def _steps(folder: str) -> list[str]:
    return sorted(p.name for p in Path(folder).glob("step_*"))


@pytest.fixture(scope="module")
def plans(tmp_path_factory, shared_cache):
    """The same plan twice: as a user gets it (finished runs reduced) and with finished_runs: checkpoint."""
    root = tmp_path_factory.mktemp("disk")
    cache = shared_cache  # the crash spec's tokenizer and shards (tests/test_resume.py)
    out = {}
    for name, extra in (("model", ""), ("checkpoint", "finished_runs: checkpoint\nkeep_checkpoints: 1\n")):
        d = root / name
        env = _plan_dir(d, cache, keep=2, extra=extra)
        done = _rbridge("plan", "disk.yaml", cwd=d, env=env)
        assert done.returncode == 0, done.stdout + done.stderr
        out[name] = (d, env, done)
    return out


def test_a_finished_plan_keeps_only_exported_models(plans):
    d, env, done = plans["model"]
    runs = _runs(d / "stores/disk.db")
    assert {s for s, _ in runs.values()} == {"done", "pruned"}
    for (stage, name), (_status, folder) in runs.items():
        assert (Path(folder) / "model" / "config.json").is_file(), (stage, name)
        assert _steps(folder) == [], (stage, name, _steps(folder))
    assert "finished runs reduced to their exported models" in done.stdout
    dry = _rbridge("clean", "--dry-run", cwd=d, env=env)
    assert dry.returncode == 0 and "would free 0 B" in dry.stdout, dry.stdout + dry.stderr
    status = _rbridge("status", cwd=d, env=env)
    assert status.returncode == 0 and "disk " in status.stdout, status.stdout
    # a finished plan's runs load as models: scoring one works from the reduced folder
    spam = runs[("rank", "spam")][1] if ("rank", "spam") in runs else next(f for (s, _), (_, f) in runs.items()
                                                                          if s == "rank")
    # (`rbridge score`'s own function: another process would spend seconds importing torch for it)
    from rbridge.scoring.api import score_file

    doc, _ = score_file(spam, d / "traces.jsonl", use_cache=False)
    assert 0 < doc["benchmarks"]["gsm8k"]["rbridge"] < 20, doc


def test_keep_checkpoints_and_finished_runs_checkpoint_keep_the_newest(plans):
    d, _env, done = plans["checkpoint"]
    assert "reduced" not in done.stdout
    for (stage, name), (_status, folder) in _runs(d / "stores/disk.db").items():
        assert len(_steps(folder)) == 1, (stage, name, _steps(folder))  # keep_checkpoints: 1


def test_clean_dry_run_changes_nothing_then_clean_frees_and_resume_still_works(plans, tmp_path):
    src, env, _ = plans["checkpoint"]
    d = tmp_path / "copy"
    copy_folder(src, d)
    db = d / "stores/disk.db"
    env = dict(env)
    repoint_store(db, src, d)  # the copied store names the original folder's runs; point them at the copy
    before = folder_bytes(d / "stores/disk.runs")
    dry = _rbridge("clean", "--store", str(db), "--dry-run", cwd=d, env=env)
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert folder_bytes(d / "stores/disk.runs") == before and "would free" in dry.stdout
    cleaned = _rbridge("clean", "--store", str(db), cwd=d, env=env)
    assert cleaned.returncode == 0, cleaned.stdout + cleaned.stderr
    after = folder_bytes(d / "stores/disk.runs")
    assert after < before / 2, (before, after)
    assert all(_steps(f) == [] for _, f in _runs(db).values())
    again = _rbridge("resume", "--store", str(db), cwd=d, env=env)
    assert again.returncode == 0, again.stdout + again.stderr
    bad = _rbridge("clean", "--store", str(db), "--plan", "nope", cwd=d, env=env)
    assert bad.returncode == 2 and "nope" in bad.stderr, bad.stdout + bad.stderr


def test_a_promoted_pruned_run_trains_again_from_its_start_with_the_same_result(plans, tmp_path):
    """`--force` with a larger keep promotes candidates the finished plan pruned. Where their checkpoints
    were removed (the default) they train again from step 0 and reach exactly the scores of the plan that
    kept its checkpoints and continued them; a run dropped at the last rung (all tokens trained) is done."""
    results = {}
    for name in ("model", "checkpoint"):
        src, env, _ = plans[name]
        d = tmp_path / name
        copy_folder(src, d)
        db = d / "stores/disk.db"
        repoint_store(db, src, d)
        pruned = {n for (s, n), (status, _) in _runs(db).items() if s == "filter" and status == "pruned"}
        spec = (d / "disk.yaml").read_text().replace("keep: 2", "keep: 4")
        (d / "disk.yaml").write_text(spec)
        forced = _rbridge("plan", "disk.yaml", "--force", cwd=d, env=env)
        assert forced.returncode == 0, forced.stdout + forced.stderr
        results[name] = (forced.stdout, _scores(db), _runs(db), pruned)
    out_model, scores_model, runs_model, pruned = results["model"]
    out_ckpt, scores_ckpt, _runs_ckpt, _ = results["checkpoint"]
    assert pruned, "the first plan pruned nobody"
    assert "trains again from the start" in out_model and "trains again from the start" not in out_ckpt
    assert scores_model.keys() == scores_ckpt.keys()
    for key in scores_model:
        assert scores_model[key] == pytest.approx(scores_ckpt[key], abs=1e-6), key
    assert all(runs_model[("filter", n)][0] == "done" for n in pruned)
    assert all(_steps(runs_model[("filter", n)][1]) == [] for n in pruned)


def test_reduce_and_trim_on_folders(tmp_path):
    run = tmp_path / "run"
    for step in (4, 8, 12):
        (run / f"step_{step}").mkdir(parents=True)
        (run / f"step_{step}" / "optimizer.bin").write_bytes(b"x" * 100)
        (run / f"step_{step}" / "COMPLETE").write_text("")
    (run / "step_16.tmp").mkdir()
    (run / "step_2.damaged").mkdir()
    assert reduce_to_model(run) == 0 and len(training_state(run)) == 4  # no exported model: nothing goes
    assert trim_checkpoints(run, 2) == 100
    assert sorted(p.name for p in run.iterdir()) == ["step_12", "step_16.tmp", "step_2.damaged", "step_8"]
    (run / "model").mkdir()
    (run / "model" / "config.json").write_text("{}")
    assert reduce_to_model(run, dry_run=True) == 200 and (run / "step_8").is_dir()
    assert reduce_to_model(run) == 200
    assert sorted(p.name for p in run.iterdir()) == ["model", "step_2.damaged"]  # damaged ones are evidence
