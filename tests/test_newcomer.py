"""What a newcomer meets in a plan's output (issue 25): a source that repeats is named at the start and in
`rbridge status`, a second store of the same plan is announced before anything trains, and no third-party
warning reaches the output. Real plans in subprocesses, real SQLite files."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import pytest

# One worker runs the module: its module-scoped plan fixture is built once, not once per pytest -n worker.
pytestmark = pytest.mark.xdist_group("newcomer")

REPO = Path(__file__).resolve().parents[1]

SPEC = f"""\
name: newcomer
seed: 4
tokenizer: {{train: {{vocab_size: 300}}}}
sources:
  small: {{path: small.jsonl}}
  kjv: {{path: {REPO}/specs/data/kjv.txt.gz}}
candidates:
  - {{name: kjv, mix: {{kjv: 1.0}}}}
  - {{name: half, mix: {{kjv: 0.5, small: 0.5}}}}
  - {{name: small, mix: {{small: 1.0}}}}
benchmarks:
  - {{name: gsm8k, traces: traces.jsonl}}
stages:
  - name: filter
    proxy: {{hidden_size: 16, num_hidden_layers: 1, num_attention_heads: 2}}
    tokens: 2048
    seq_len: 32
    batch_size: 8
    lr: 0.01
    evals: 2
    keep: 2
"""


def _rbridge(*args, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rbridge.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def spec_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("newcomer")
    # three worked solutions: a few hundred tokens, far fewer than a 2,048-token run draws
    rows = gzip.open(REPO / "specs/data/cot.jsonl.gz", "rt").read().splitlines()[:3]
    (d / "small.jsonl").write_text("\n".join(rows) + "\n")
    lines = (REPO / "specs/traces/gsm8k.jsonl").read_text().splitlines()[:6]
    (d / "traces.jsonl").write_text("\n".join(lines) + "\n")
    (d / "newcomer.yaml").write_text(SPEC)
    env = dict(os.environ, RBRIDGE_CACHE=str(d / "cache"), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               RBRIDGE_WORKERS="2")
    first = _rbridge("plan", "newcomer.yaml", cwd=d, env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    return d, env, first


def test_a_repeated_source_is_named_at_the_start_and_in_status(spec_dir):
    d, env, first = spec_dir
    out = first.stdout + first.stderr
    warning = next(line for line in out.splitlines() if "source small" in line and "times" in line)
    assert "stage filter trains on it" in warning and "small" in warning, warning
    assert out.index(warning) < out.index("rung 1:")  # before anything trained
    status = _rbridge("status", cwd=d, env=env)
    assert status.returncode == 0, status.stderr
    line = next(line for line in status.stdout.splitlines() if "data repeated" in line)
    assert "small: " in line and "half " in line and "kjv " not in line.split("small: ", 1)[1], line


def test_no_third_party_warning_in_a_plans_output(spec_dir):
    _d, _env, first = spec_dir
    out = first.stdout + first.stderr
    for noise in ("UserWarning", "optuna_warn", "FutureWarning", "DeprecationWarning", "Traceback"):
        assert noise not in out, out


def test_a_new_store_beside_another_of_the_same_plan_is_announced_before_training(spec_dir, tmp_path):
    d, env, _first = spec_dir
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # one process: this plan trains everything again, and its announcement is the plan process's own
    again = _rbridge("plan", str(d / "newcomer.yaml"), cwd=elsewhere, env=dict(env, RBRIDGE_WORKERS="1"))
    assert again.returncode == 0, again.stdout + again.stderr
    out = again.stdout
    note = next(line for line in out.splitlines() if line.startswith("note: new store"))
    assert str(d / "stores" / "newcomer.db") in note and f"--store {d / 'stores' / 'newcomer.db'}" in note, note
    assert out.index(note) < out.index("rung 1:")
    # the first store's own folder: no note, it continues (everything reused)
    same = _rbridge("plan", "newcomer.yaml", cwd=d, env=env)
    assert same.returncode == 0 and "note: new store" not in same.stdout, same.stdout
    # done in this store: no second process is started to find nothing left (RBRIDGE_WORKERS=2 asks for one)
    assert "local workers: none; plan 'newcomer' is done in this store" in same.stdout, same.stdout
    assert "w1| " not in same.stdout


def test_a_top_level_typo_is_named_with_the_key_it_misspells(spec_dir, tmp_path):
    d, env, _ = spec_dir
    bad = tmp_path / "typo.yaml"
    bad.write_text((d / "newcomer.yaml").read_text().replace("candidates:", "candidate:")
                   .replace("small.jsonl", str(d / "small.jsonl")).replace("traces.jsonl", str(d / "traces.jsonl")))
    out = _rbridge("validate", str(bad), cwd=d, env=env)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "candidate: unknown key (did you mean 'candidates'?)" in out.stderr, out.stderr
    assert "typo.yaml:7:" in out.stderr, out.stderr  # the line of the typo


def test_score_names_a_runs_exported_model_by_its_run_and_draws_no_library_bar(spec_dir):
    import json

    d, env, _ = spec_dir
    model = next((d / "stores" / "newcomer.runs" / "filter").glob("*/model"))
    out = _rbridge("score", "--model", str(model), "--traces", str(d / "traces.jsonl"), "--json", cwd=d, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert json.loads(out.stdout)["model"] == f"filter/{model.parent.name}"
    assert "Loading weights" not in out.stderr + out.stdout, out.stderr


def test_an_import_into_a_read_only_store_and_resume_of_imported_results_exit_2_naming_the_store(spec_dir, tmp_path):
    import hashlib
    import shutil

    d, env, _ = spec_dir
    csv = tmp_path / "targets.csv"
    csv.write_text("candidate,benchmark,metric,value\nkjv,gsm8k,accuracy,0.25\n")
    ro = tmp_path / "ro.db"
    shutil.copy(d / "stores" / "newcomer.db", ro)
    ro.chmod(0o444)
    before = hashlib.sha256(ro.read_bytes()).hexdigest()
    out = _rbridge("targets", "import", str(csv), "--store", str(ro), cwd=tmp_path, env=env)
    assert out.returncode == 2 and str(ro) in out.stderr and "read-only" in out.stderr, out.stdout + out.stderr
    assert hashlib.sha256(ro.read_bytes()).hexdigest() == before
    done = _rbridge("resume", "--store", str(ro), cwd=tmp_path, env=env)  # reads only: a finished plan
    assert done.returncode == 0 and "is done" in done.stdout, done.stdout + done.stderr
    imported = tmp_path / "imported.db"
    assert _rbridge("targets", "import", str(csv), "--store", str(imported), cwd=tmp_path, env=env).returncode == 0
    again = _rbridge("resume", "--store", str(imported), cwd=tmp_path, env=env)
    assert again.returncode == 2 and "holds no plan to resume" in again.stderr, again.stdout + again.stderr
    assert f"--store {imported}" in again.stderr
