"""Target stages (issue 15): a plan trains its own targets, measures task accuracy, and the store's
``decision_accuracy`` view compares every proxy stage with them, live, with no import.

A real plan through the CLI in subprocesses, on the repository's corpora and GSM8K traces
(specs/traces/gsm8k.jsonl: GSM8K test, MIT; see NOTICE), here given four answer choices each
(the gold number and three wrong numbers, placed by a fixed rule) so that a target's
accuracy is multiple-choice accuracy (``checker: choices``): tiny models differ there,
where greedy GSM8K accuracy would be 0 for all of them.
"""

from __future__ import annotations

import itertools
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

SPEC = f"""\
name: tgt
seed: 3
tokenizer: {{train: {{vocab_size: 320}}}}
sources:
  cot: {{path: {REPO}/specs/data/cot.jsonl.gz}}
  spam: {{path: {REPO}/specs/data/spam.jsonl.gz}}
  kjv: {{path: {REPO}/specs/data/kjv.txt.gz}}
candidates:
  - {{name: spam, mix: {{spam: 1.0}}}}
  - {{name: kjv, mix: {{kjv: 1.0}}}}
  - {{name: cot, mix: {{cot: 1.0}}}}
  - {{name: kjv-cot, mix: {{kjv: 0.5, cot: 0.5}}}}
benchmarks:
  - {{name: gsm8k, traces: traces.jsonl, checker: choices}}
stages:
  - name: filter
    proxy: {{hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2}}
    tokens: 4096
    seq_len: 64
    batch_size: 8
    lr: 0.01
    evals: 2
    keep: 2
  - name: target
    role: target
    model: {{hidden_size: 48, num_hidden_layers: 2, num_attention_heads: 2}}
    tokens: 6144
    evals: 1
    seeds: [0, 1]
"""


def _rbridge(*args, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rbridge.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def _with_choices(line: str, i: int) -> str:
    t = json.loads(line)
    gold = int(float(t["answer"]))
    options = [str(gold), str(gold + 1 + i % 7), str(gold * 2 + 3), str(max(0, gold - 5 - i % 3))]
    k = i % 4
    options[0], options[k] = options[k], options[0]
    t["choices"], t["gold"] = options, k
    return json.dumps(t)


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    d = tmp_path_factory.mktemp("targets")
    lines = (REPO / "specs/traces/gsm8k.jsonl").read_text().splitlines()[:24]
    (d / "traces.jsonl").write_text("\n".join(_with_choices(x, i) for i, x in enumerate(lines)) + "\n")
    (d / "tgt.yaml").write_text(SPEC)
    env = dict(os.environ, RBRIDGE_CACHE=str(d / "cache"), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    res = _rbridge("plan", "tgt.yaml", cwd=d, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    return d, env, res


def test_target_stage_trains_every_candidate_per_seed_and_never_prunes(plan):
    d, _env, res = plan
    con = sqlite3.connect(d / "stores/tgt.db")
    runs = con.execute("select r.stage, r.role, r.stage_group, r.seed, r.status, c.name from runs r "
                       "join candidates c on c.id = r.candidate_id order by r.stage, c.name").fetchall()
    target = [r for r in runs if r[1] == "target"]
    # every candidate, pruned in stage filter or not, once per seed, all finished
    assert sorted((r[0], r[5]) for r in target) == sorted(
        itertools.product(["target.s0", "target.s1"], ["cot", "kjv", "kjv-cot", "spam"]))
    assert {(r[0], r[3]) for r in target} == {("target.s0", 0), ("target.s1", 1)}
    assert {r[2] for r in target} == {"target"} and {r[4] for r in target} == {"done"}
    assert [r[4] for r in runs if r[0] == "filter"].count("pruned") == 2
    kept = con.execute("select count(*), sum(kept) from decisions where stage like 'target%'").fetchone()
    assert kept == (8, 8)  # decided, and nobody dropped
    # the two seeds trained different models: their accuracy items differ somewhere
    acc = con.execute("select r.stage, c.name, i.item_values from evaluations e join runs r on r.id = e.run_id "
                      "join candidates c on c.id = r.candidate_id join evaluation_items i on i.evaluation_id = e.id "
                      "where e.metric = 'nll' and r.role = 'target'").fetchall()
    by = {(s, c): json.loads(v) for s, c, v in acc}
    assert any(by[("target.s0", c)] != by[("target.s1", c)] for c in ["cot", "kjv", "kjv-cot", "spam"])
    assert "stage target.s1" in res.stdout


def _independent_decision_accuracy(con, stage: str, metric: str) -> tuple[float, int]:
    """Count the pairs from the raw tables: the proxy's last value per run (the further-trained run first),
    the target as the mean of the per-seed accuracies."""
    proxy = {}
    for cand, value, tokens in con.execute(
            "select c.name, e.value, e.tokens_seen from evaluations e join runs r on r.id = e.run_id "
            "join candidates c on c.id = r.candidate_id where r.stage = ? and e.metric = ? "
            "order by e.tokens_seen, e.id", (stage, metric)):
        proxy[cand] = (tokens, -value)  # lower is better: oriented so that higher is better
    seeds: dict[str, list[float]] = {}
    for cand, value in con.execute(
            "select c.name, e.value from evaluations e join runs r on r.id = e.run_id "
            "join candidates c on c.id = r.candidate_id where r.role = 'target' and e.metric = 'accuracy'"):
        seeds.setdefault(cand, []).append(value)
    target = {c: sum(v) / len(v) for c, v in seeds.items()}
    good = pairs = 0.0
    for a, b in itertools.combinations(sorted(proxy), 2):
        if target[a] == target[b]:
            continue
        pairs += 1
        sx = (proxy[a] > proxy[b]) - (proxy[a] < proxy[b])  # tokens first, then the value
        sy = (target[a] > target[b]) - (target[a] < target[b])
        good += 1.0 if sx * sy > 0 else 0.5 if sx == 0 else 0.0
    return (good / pairs if pairs else float("nan")), int(pairs)


def test_decision_accuracy_view_is_live_and_agrees_with_an_independent_count(plan):
    d, _env, _res = plan
    con = sqlite3.connect(d / "stores/tgt.db")
    assert con.execute("select count(*) from results").fetchone() == (0,)  # nothing imported
    targets = con.execute("select candidate, metric, n_seeds, source from target_values").fetchall()
    assert sorted(targets) == [(c, "accuracy", 2, "planner") for c in ["cot", "kjv", "kjv-cot", "spam"]]
    rows = con.execute("select stage, proxy_metric, target_metric, n_candidates, n_pairs, decision_accuracy "
                       "from decision_accuracy").fetchall()
    assert {r[0] for r in rows} == {"filter"}  # proxy stages only: the target stage is not its own proxy
    assert {r[2] for r in rows} == {"accuracy"}
    assert {r[1] for r in rows} == {"rbridge", "nll", "rbridge_no_minmax", "bpb"}
    for stage, metric, _t, n_cand, n_pairs, acc in rows:
        want, want_pairs = _independent_decision_accuracy(con, stage, metric)
        assert n_cand == 4 and n_pairs == want_pairs
        assert n_pairs > 0, "the targets' accuracies should differ somewhere"
        assert acc == pytest.approx(want, abs=1e-12)


def test_accuracy_command_gives_reproducible_bootstrap_intervals(plan):
    d, env, _res = plan
    first = _rbridge("accuracy", "--store", "stores/tgt.db", "--json", cwd=d, env=env)
    second = _rbridge("accuracy", "--store", "stores/tgt.db", "--json", cwd=d, env=env)
    assert first.returncode == 0, first.stderr
    a, b = json.loads(first.stdout), json.loads(second.stdout)
    assert a["decision_accuracy"] == b["decision_accuracy"]
    for r in a["decision_accuracy"]:
        assert r["ci_items"] == 24 and r["ci_target_seeds"] == 2
        assert 0.0 <= r["ci_low"] <= r["ci_high"] <= 1.0
    # the target stage's compute is not counted as proxy compute; the ratio to it is given
    curve = a["accuracy_vs_compute"]
    assert {r["stage"] for r in curve} == {"filter"}
    con = sqlite3.connect(d / "stores/tgt.db")
    target_flops = con.execute("select sum(6.0 * non_embedding_params * tokens_seen) from runs "
                               "where role = 'target'").fetchone()[0]
    last = max(curve, key=lambda r: r["rung"])
    assert last["target_flops"] == pytest.approx(target_flops)
    assert last["target_compute_ratio"] == pytest.approx(target_flops / last["plan_flops"]) and \
        last["target_compute_ratio"] > 1
    human = _rbridge("accuracy", "--store", "stores/tgt.db", cwd=d, env=env)
    assert "95% CI" in human.stdout and "seeds" in human.stdout


def test_intervals_depend_on_the_seed_only(plan):
    from rbridge.analysis.intervals import decision_intervals
    from rbridge.store import open_store

    d, _env, _res = plan
    st = open_store(d / "stores/tgt.db", create=False, read_only=True)
    try:
        one = decision_intervals(st, "tgt", seed=0)
        two = decision_intervals(st, "tgt", seed=0)
        other = decision_intervals(st, "tgt", seed=1, resamples=200)
    finally:
        st.close()
    assert one == two and one
    assert set(other) == set(one)
    assert all(v["resamples"] == 200 for v in other.values())


def test_bootstrap_decision_accuracy_matches_the_rules_on_a_fixed_draw():
    from rbridge.analysis.intervals import _decision_accuracy

    tokens = np.array([10.0, 10.0, 5.0])
    px = np.array([[3.0], [1.0], [9.0]])   # the third candidate was dropped earlier: ranks last
    ty = np.array([[2.0], [1.0], [0.0]])
    assert _decision_accuracy(tokens, px, ty)[0] == 1.0
    ty2 = np.array([[1.0], [2.0], [0.0]])  # the first pair flips
    assert _decision_accuracy(tokens, px, ty2)[0] == pytest.approx(2 / 3)
    px3 = np.array([[1.0], [1.0], [9.0]])  # a proxy tie counts half
    assert _decision_accuracy(tokens, px3, ty)[0] == pytest.approx(2.5 / 3)


def test_status_shows_target_stages_apart_from_the_plans_cost(plan):
    d, env, _res = plan
    res = _rbridge("status", "--store", "stores/tgt.db", cwd=d, env=env)
    assert res.returncode == 0, res.stderr
    assert "stage target.s0 (target, never prunes)" in res.stdout and "accuracy" in res.stdout
    assert "target stages (checking the decision, not part of its cost)" in res.stdout
    info = json.loads(_rbridge("status", "--store", "stores/tgt.db", "--json", cwd=d, env=env).stdout)
    roles = {s["name"]: s["role"] for s in info["stages"]}
    assert roles == {"filter": "proxy", "target.s0": "target", "target.s1": "target"}
    c = info["compute"]
    by = {s["stage"]: s["flops"] for s in c["stages"]}
    assert c["spent_flops"] == pytest.approx(by["filter"])
    assert c["target_stage_flops"] == pytest.approx(by["target.s0"] + by["target.s1"])
    accs = [r["accuracy"] for s in info["stages"] if s["role"] == "target" for r in s["candidates"]]
    assert len(accs) == 8 and all(0.0 <= a <= 1.0 for a in accs)
    assert info["analysis"]["decision_accuracy"] and info["analysis"]["targets"] == 4
