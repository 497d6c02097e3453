"""A tiny two-stage plan through the CLI in real subprocesses, against a real SQLite file.

Uses the repository's own corpora (specs/data) and GSM8K traces (specs/traces),
trimmed by the spec to a few thousand tokens so the whole plan runs in seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SOURCES, copy_folder, gsm8k_lines

# One worker runs the module: its module-scoped plan fixture is built once, not once per pytest -n worker.
pytestmark = pytest.mark.xdist_group("plan_e2e")

SPEC = f"""\
name: tiny
seed: 1
tokenizer: {{train: {{vocab_size: 320}}}}
{SOURCES}candidates:
  - {{name: spam, mix: {{spam: 1.0}}}}
  - {{name: kjv, mix: {{kjv: 1.0}}}}
  - {{name: cot, mix: {{cot: 1.0}}}}
  - {{name: kjv-cot, mix: {{kjv: 0.5, cot: 0.5}}}}
target_model: {{params: 1.0e8, tokens: 1.0e9}}
benchmarks:
  - {{name: gsm8k, traces: traces.jsonl}}
stages:
  - name: filter
    proxy: {{hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2}}
    tokens: 6144
    seq_len: 64
    batch_size: 8
    lr: 0.01
    evals: 2
    keep: 2
  - name: rank
    proxy: {{hidden_size: 48, num_hidden_layers: 2, num_attention_heads: 2}}
    tokens: 8192
    evals: 1
"""


def _rbridge(*args, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rbridge.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def plan_dir(tmp_path_factory, shared_cache) -> tuple[Path, dict, subprocess.CompletedProcess]:
    d = tmp_path_factory.mktemp("plan")
    (d / "traces.jsonl").write_text(gsm8k_lines(12))
    (d / "tiny.yaml").write_text(SPEC)
    env = dict(os.environ, RBRIDGE_CACHE=str(shared_cache), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    first = _rbridge("plan", "tiny.yaml", cwd=d, env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    return d, env, first


def test_plan_fills_store_and_ranking(plan_dir):
    d, _env, first = plan_dir
    db = d / "stores" / "tiny.db"
    assert db.is_file()
    con = sqlite3.connect(db)
    rows = con.execute("select stage, candidate, value, rank, tokens_seen, status from ranking "
                       "where metric = 'rbridge' order by stage_index, rank").fetchall()
    filter_rows = [r for r in rows if r[0] == "filter"]
    rank_rows = [r for r in rows if r[0] == "rank"]
    assert sorted(r[1] for r in filter_rows) == ["cot", "kjv", "kjv-cot", "spam"]
    assert len(rank_rows) == 2
    assert all(0 < r[2] < 20 for r in rows)
    # Survivors of stage 1 are exactly the stage 2 candidates, and they ranked 1-2 in stage 1.
    kept = {r[1] for r in filter_rows if r[3] <= 2}
    assert {r[1] for r in rank_rows} == kept
    # Decisions are stored with their scores; 4 -> 2 over 2 rungs drops one at each rung.
    dec = con.execute("select rung, count(*), sum(kept) from decisions where stage = 'filter' "
                      "group by rung order by rung").fetchall()
    assert dec == [(1, 4, 3), (2, 3, 2)]
    # The candidate dropped at rung 1 stopped training there.
    tokens = dict(con.execute("select c.name, r.tokens_seen from runs r join candidates c on c.id = r.candidate_id "
                              "where r.stage = 'filter' and r.status = 'pruned'").fetchall())
    assert sorted(tokens.values()) == [3072, 6144]
    # Every metric is stored per rung, and one Optuna study per stage.
    metrics = {m for (m,) in con.execute("select distinct metric from evaluations")}
    assert metrics == {"rbridge", "nll", "rbridge_no_minmax", "bpb"}
    studies = {n for (n,) in con.execute("select study_name from studies")}
    assert studies == {"tiny:filter", "tiny:rank"}
    assert "ranking - stage rank" in first.stdout


def test_second_plan_reuses_everything(plan_dir):
    d, env, _first = plan_dir
    before = sqlite3.connect(d / "stores" / "tiny.db").execute("select count(*) from evaluations").fetchone()
    again = _rbridge("plan", "tiny.yaml", cwd=d, env=env)
    assert again.returncode == 0, again.stderr
    assert "reused from cache" in again.stdout and "reused cached shards" in again.stdout
    assert "rungs trained and scored this time: 0;" in again.stdout
    after = sqlite3.connect(d / "stores" / "tiny.db").execute("select count(*) from evaluations").fetchone()
    assert before == after


def test_status_json_and_changed_spec_refused(plan_dir):
    d, env, _first = plan_dir
    st = _rbridge("status", "--store", "stores/tiny.db", "--json", cwd=d, env=env)
    assert st.returncode == 0, st.stderr
    info = json.loads(st.stdout)
    assert info["status"] == "done" and [s["name"] for s in info["stages"]] == ["filter", "rank"]
    assert len(info["stages"][1]["survivors"]) == 2
    # Compute accounting: stage spend adds up from the runs, naive = every candidate at stage 2's size.
    c = info["compute"]
    runs = [r for st in info["stages"] for r in st["candidates"]]
    assert c["train_flops"] == pytest.approx(sum(6.0 * r["non_embedding_params"] * r["tokens_seen"] for r in runs))
    rank_run = info["stages"][1]["candidates"][0]
    assert c["naive_flops"] == pytest.approx(4 * 6.0 * rank_run["non_embedding_params"] * 8192)
    assert c["reduction"] == pytest.approx(c["naive_flops"] / c["spent_flops"])
    ct = 6.0 * 1e8 * 1e9
    assert c["target_reduction"] == pytest.approx(4 * ct / (c["spent_flops"] + ct))
    assert info["stages"][0]["progress"] == pytest.approx(1.0) and info["stages"][0]["eta_s"] == 0.0
    human = _rbridge("status", "--store", "stores/tiny.db", cwd=d, env=env)
    assert "reduction" in human.stdout and "of the naive cost" in human.stdout
    changed = d / "changed.yaml"
    changed.write_text(SPEC.replace("tokens: 8192", "tokens: 9000"))
    count = "select (select count(*) from runs), (select count(*) from evaluations), (select count(*) from plans)"
    before = sqlite3.connect(d / "stores" / "tiny.db").execute(count).fetchone()
    res = _rbridge("plan", "changed.yaml", "--store", "stores/tiny.db", cwd=d, env=env)
    assert res.returncode == 2
    assert "spec changed" in res.stderr and "+    tokens: 9000" in res.stderr
    assert sqlite3.connect(d / "stores" / "tiny.db").execute(count).fetchone() == before


def test_bad_traces_exit_2_and_store_untouched(plan_dir, tmp_path):
    d, env, _first = plan_dir
    (tmp_path / "traces.jsonl").write_text('{"id": "x", "benchmark": "gsm8k"\n')
    (tmp_path / "tiny.yaml").write_text(SPEC)
    res = _rbridge("plan", "tiny.yaml", cwd=tmp_path, env=env)
    assert res.returncode == 2
    assert "traces.jsonl:1" in res.stderr
    assert not (tmp_path / "stores" / "tiny.db").exists()


TARGETS = """candidate,benchmark,metric,value,seed
spam,gsm8k,accuracy,0.10,0
spam,gsm8k,accuracy,0.12,1
kjv,gsm8k,accuracy,0.08,0
cot,gsm8k,accuracy,0.20,0
kjv-cot,gsm8k,accuracy,0.15,0
"""


def test_targets_give_decision_accuracy_for_every_stage(plan_dir, tmp_path):
    d, env, _first = plan_dir
    (tmp_path / "targets.csv").write_text(TARGETS)
    res = _rbridge("targets", "import", str(tmp_path / "targets.csv"), "--store", "stores/tiny.db", cwd=d, env=env)
    assert res.returncode == 0, res.stderr
    con = sqlite3.connect(d / "stores" / "tiny.db")
    rows = con.execute("select stage, proxy_metric, n_candidates, n_pairs, decision_accuracy from decision_accuracy "
                       "where benchmark = 'gsm8k' and proxy_metric = 'rbridge' order by stage").fetchall()
    assert [(r[0], r[2], r[3]) for r in rows] == [("filter", 4, 6), ("rank", 2, 1)]
    assert all(0.0 <= r[4] <= 1.0 for r in rows)
    st = json.loads(_rbridge("status", "--store", "stores/tiny.db", "--json", cwd=d, env=env).stdout)
    assert "analysis" in st


def test_plan_adopts_a_store_made_by_targets_import(plan_dir, tmp_path):
    _d, env, _first = plan_dir
    (tmp_path / "traces.jsonl").write_text((_d / "traces.jsonl").read_text())
    (tmp_path / "tiny.yaml").write_text(SPEC)
    (tmp_path / "targets.csv").write_text(TARGETS)
    imp = _rbridge("targets", "import", "targets.csv", "--store", "stores/tiny.db", cwd=tmp_path, env=env)
    assert imp.returncode == 0, imp.stderr
    res = _rbridge("plan", "tiny.yaml", cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr
    con = sqlite3.connect(tmp_path / "stores" / "tiny.db")
    assert con.execute("select count(*) from plans").fetchone() == (1,)
    assert con.execute("select count(*) from decision_accuracy where proxy_metric = 'rbridge'").fetchone()[0] == 2


def _dump(db: Path) -> list[str]:
    con = sqlite3.connect(db)
    try:
        return list(con.iterdump())
    finally:
        con.close()


BAD_EDITS = [  # (what the edit does, old text, new text, the field the error names)
    # Refused when the spec loads (tests/test_spec.py has more such settings).
    ("unknown preset", "proxy: {hidden_size: 48, num_hidden_layers: 2, num_attention_heads: 2}",
     "proxy: {preset: 3M}", "stages[1].proxy.preset"),
    ("unknown Llama field", "num_hidden_layers: 2, num_attention_heads: 2}",
     "num_hidden_layers: 2, num_attention_heads: 2, hiden_act: silu}", "stages[1].proxy.hiden_act"),
    ("tokens past the store's 64-bit integers", "tokens: 8192", f"tokens: {2**63}", "stages[1].tokens"),
    # Refused after the data is prepared, when every stage's model is built on the meta device.
    ("a shape the model refuses", "num_hidden_layers: 2, num_attention_heads: 2}",
     "num_hidden_layers: 2, num_attention_heads: 2, hidden_act: nope}", "stages[1].proxy"),
]


def test_force_with_each_invalid_edit_changes_nothing(plan_dir, tmp_path):
    """Check everything, then change anything: `plan --force` with an edit that cannot run exits 2 naming
    the spec and the field, and every table (Optuna's too) and every checkpoint is as it was."""
    d, env, _first = plan_dir
    work = tmp_path / "w"
    copy_folder(d, work, ignore=shutil.ignore_patterns("cache"))
    db = work / "stores" / "tiny.db"
    before, ckpts = _dump(db), sorted(p.relative_to(work) for p in (work / "stores").rglob("*"))
    spec = work / "tiny.yaml"
    good = spec.read_text()
    for what, old, new, field in BAD_EDITS:
        assert old in good, what
        spec.write_text(good.replace(old, new, 1))
        res = _rbridge("plan", "tiny.yaml", "--force", cwd=work, env=env)
        assert res.returncode == 2, (what, res.stdout + res.stderr)
        assert "tiny.yaml" in res.stderr and field in res.stderr and "Traceback" not in res.stderr, (what, res.stderr)
        assert _dump(db) == before, what
        assert sorted(p.relative_to(work) for p in (work / "stores").rglob("*")) == ckpts, what


def test_targets_for_a_candidate_the_plan_lacks_are_refused_unless_asked(plan_dir, tmp_path):
    d, env, _first = plan_dir
    work = tmp_path / "w"
    copy_folder(d, work, ignore=shutil.ignore_patterns("cache"))
    db = work / "stores" / "tiny.db"
    before = _dump(db)
    (tmp_path / "typo.csv").write_text(TARGETS.replace("kjv-cot,", "kjv-cott,"))
    res = _rbridge("targets", "import", str(tmp_path / "typo.csv"), "--store", "stores/tiny.db", cwd=work, env=env)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "typo.csv:6: candidate:" in res.stderr and "kjv-cott" in res.stderr and "--new-candidates" in res.stderr
    assert _dump(db) == before
    res = _rbridge("targets", "import", str(tmp_path / "typo.csv"), "--store", "stores/tiny.db", "--new-candidates",
                   cwd=work, env=env)
    assert res.returncode == 0, res.stderr
    assert sqlite3.connect(db).execute("select count(*) from results where candidate = 'kjv-cott'").fetchone() == (1,)
