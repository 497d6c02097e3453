"""A spec's `search:` through `rbridge plan`: a Dirichlet swarm of candidates beside a listed (human) mixture,
pruned by successive halving; a surrogate fitted on every candidate's score at the first rung; proposals that
join the next stage beside the survivors and the listed candidate. Real tiny proxies, a real SQLite store."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SOURCES, gsm8k_lines

SPEC = f"""\
name: srch
seed: 5
tokenizer: {{train: {{vocab_size: 300}}}}
{SOURCES}candidates:
  - {{name: human, mix: {{kjv: 0.5, cot: 0.5}}}}
search:
SEARCH
benchmarks:
  - {{name: gsm8k, traces: TRACES}}
stages:
  - name: swarm
    proxy: {{hidden_size: 16, num_hidden_layers: 1, num_attention_heads: 2}}
    tokens: 2048
    seq_len: 32
    batch_size: 8
    lr: 0.01
    evals: 2
    keep: 3
  - name: rank
    proxy: {{hidden_size: 16, num_hidden_layers: 1, num_attention_heads: 2}}
    tokens: 4096
    evals: 1
"""


def _dir(tmp_path: Path, search: str) -> Path:
    traces = tmp_path / "traces.jsonl"
    traces.write_text(gsm8k_lines(8))
    (tmp_path / "plan.yaml").write_text(SPEC.replace("SEARCH", search).replace("TRACES", str(traces)))
    return tmp_path


@pytest.fixture(autouse=True)
def _cache(shared_cache, monkeypatch):
    """The run's shared data cache (conftest.shared_cache): the crash spec's tokenizer and corpora."""
    monkeypatch.setenv("RBRIDGE_CACHE", str(shared_cache))


def _rbridge(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-m", "rbridge.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_a_search_plan_draws_a_swarm_proposes_and_ranks_the_proposals(tmp_path):
    d = _dir(tmp_path, "  swarm: 8\n  max_repeats: 4\n  propose: 2\n  surrogate: log_linear")
    out = _rbridge("plan", "plan.yaml", cwd=d)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "search: a swarm of 8 mixtures of cot, kjv, spam" in out.stdout
    assert "search: log_linear surrogate on 9 mixtures at rung 1" in out.stdout, out.stdout
    db = d / "stores" / "srch.db"
    with sqlite3.connect(db) as con:
        mixes = dict(con.execute("SELECT name, mix FROM candidates"))
        rank = {n for (n,) in con.execute("SELECT c.name FROM runs r JOIN candidates c ON c.id = r.candidate_id "
                                          "WHERE r.stage = 'rank' AND r.superseded_by = 0")}
        swarm_stage = {n for (n,) in con.execute("SELECT c.name FROM runs r JOIN candidates c ON c.id = "
                                                 "r.candidate_id WHERE r.stage = 'swarm'")}
        kept = {n for (n,) in con.execute("SELECT c.name FROM decisions x JOIN candidates c ON c.id = x.candidate_id "
                                          "WHERE x.stage = 'swarm' AND x.rung = 2 AND x.kept")}
    names = sorted(mixes)
    assert [n for n in names if n.startswith("swarm-")] == [f"swarm-{i:03d}" for i in range(8)]
    assert {"proposed-1", "proposed-2", "human"} <= set(names)
    for n, mix in mixes.items():
        w = json.loads(mix)
        assert all(v > 0 for v in w.values()) and abs(sum(w.values()) - 1) < 1e-6, (n, w)
    assert swarm_stage == {n for n in names if not n.startswith("proposed-")}  # proposals skip the search stage
    assert rank == kept | {"proposed-1", "proposed-2", "human"}
    # each candidate is an Optuna trial with its weights as parameters (the dashboard's importances work)
    import optuna

    study = optuna.load_study(study_name="srch:swarm", storage=f"sqlite:///{db}")
    for t in study.get_trials():
        w = json.loads(mixes[t.user_attrs["candidate"]])
        assert t.params == {f"w_{s}": w.get(s, 0.0) for s in ("cot", "kjv", "spam")}, t.params
    assert len(study.get_trials()) == 9
    # the surrogate's table: every candidate of the search stage at rung 1, the rung all of them reached
    fit = _rbridge("mixtures", "fit", "--stage", "swarm", "--json", cwd=d)
    assert fit.returncode == 0, fit.stderr
    doc = json.loads(fit.stdout)
    assert doc["rung"] == 1 and doc["n"] == 9 and doc["sources"] == ["cot", "kjv", "spam"]
    # the report's search section: the surrogate's CV table and charts, the proposals with their weights
    rep = _rbridge("report", "--store", str(db), cwd=d)
    assert rep.returncode == 0, rep.stderr
    page = (d / "stores" / "srch.report.html").read_text()
    assert "<h2>Mixture search</h2>" in page and 'id="chart-search-cv"' in page and 'id="chart-search-weights"' in page
    data = json.loads(page.split('<script type="application/json" id="rbridge-data">', 1)[1].split("</script>")[0])
    assert [p["name"] for p in data["search-weights"]["proposals"]] == ["proposed-1", "proposed-2"]
    assert {p["name"]: p["weights"] for p in data["search-weights"]["proposals"]} == {
        n: {k: round(v, 6) for k, v in json.loads(mixes[n]).items()} for n in ("proposed-1", "proposed-2")}
    assert len(data["search-cv"]["observed"]) == 9 and abs(sum(data["search-weights"]["prior"].values()) - 1) < 1e-9
    # a resume of the finished plan changes nothing: the proposals were stored once
    again = _rbridge("resume", cwd=d)
    assert again.returncode == 0, again.stderr
    with sqlite3.connect(db) as con:
        assert dict(con.execute("SELECT name, mix FROM candidates")) == mixes


@pytest.mark.parametrize("search,field", [
    ("  swarm: 0", "search.swarm"),
    ("  swarm: 4\n  prior: {cot: 0.5, nope: 0.5}", "search.prior.nope"),
    ("  swarm: 4\n  sources: [cot, nope]", "search.sources[1]"),
    ("  swarm: 4\n  max_repeats: 0.001", "search.max_repeats"),
    ("  swarm: 4\n  stage: rank\n  propose: 2", "search.propose"),
    ("  swarm: 4\n  strengths: [0, 1]", "search.strengths"),
])
def test_bad_search_settings_exit_2_naming_the_field_before_anything_trains(tmp_path, search, field):
    d = _dir(tmp_path, search)
    out = _rbridge("plan", "plan.yaml", cwd=d)
    assert out.returncode == 2 and field in out.stderr, (field, out.stdout + out.stderr)
    assert not (d / "stores" / "srch.db").exists()
