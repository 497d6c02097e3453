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
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from conftest import SOURCES, gsm8k_lines

# One worker runs the module: its module-scoped plan fixture is built once, not once per pytest -n worker.
pytestmark = pytest.mark.xdist_group("targets")

SPEC = f"""\
name: tgt
seed: 3
tokenizer: {{train: {{vocab_size: 320}}}}
{SOURCES}candidates:
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
def plan(tmp_path_factory, shared_cache):
    d = tmp_path_factory.mktemp("targets")
    lines = gsm8k_lines(24).splitlines()
    (d / "traces.jsonl").write_text("\n".join(_with_choices(x, i) for i, x in enumerate(lines)) + "\n")
    (d / "tgt.yaml").write_text(SPEC)
    # bf16 injected as 4x fp32 (rbridge.proxy.precision): proxy stages take it, target stages stay in fp32
    env = dict(os.environ, RBRIDGE_CACHE=str(shared_cache), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               RBRIDGE_BF16_SPEEDUP="4")
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
    # precision auto: the proxies take bf16 (injected at 4x fp32), the targets stay in fp32
    precisions = dict(con.execute("select role, group_concat(distinct precision) from runs group by role"))
    assert precisions == {"proxy": "bf16", "target": "fp32"}, precisions
    assert "stage target.s0 trains in fp32 (precision auto on a target stage" in res.stdout
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


# ---------------------------------------------------------------------------- rbridge report (issue 16)
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def report(plan):
    d, env, _res = plan
    res = _rbridge("report", "--store", "stores/tgt.db", "--out", "out/report.html", "--png", "out/png",
                   cwd=d, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    return d, d / "out/report.html", res, env


def test_report_writes_every_chart_and_draws_the_stores_numbers(report):
    d, page, res, _env = report
    text = page.read_text()
    data = json.loads(text.split('id="rbridge-data">', 1)[1].split("</script>", 1)[0])
    names = set(data)
    assert {"ranking-filter", "halving-filter", "curves-filter", "halving-target.s0", "halving-target.s1", "compute",
            "accuracy-vs-compute"} <= names
    assert {p.stem for p in (d / "out/png").glob("*.png")} == names
    assert "http://" not in text and "https://" not in text  # nothing to fetch
    con = sqlite3.connect(d / "stores/tgt.db")
    # successive halving: each point is the run's decision score at that rung (one benchmark: its value)
    for cand, rung_tokens, value in con.execute(
            "select c.name, e.tokens_seen, e.value from evaluations e join runs r on r.id = e.run_id "
            "join candidates c on c.id = r.candidate_id where r.stage = 'filter' and e.metric = 'rbridge'"):
        assert [rung_tokens, pytest.approx(value)] in [list(p) for p in data["halving-filter"]["series"][cand]]
    dropped = dict(con.execute("select c.name, d.rung from decisions d join candidates c on c.id = d.candidate_id "
                               "where d.stage = 'filter' and d.kept = 0"))
    assert data["halving-filter"]["dropped"] == dropped
    # ... each with its 95% interval (one benchmark: the evaluation's own bounds)
    for cand, rung, low, high in con.execute(
            "select c.name, e.rung, e.ci_low, e.ci_high from evaluations e join runs r on r.id = e.run_id "
            "join candidates c on c.id = r.candidate_id where r.stage = 'filter' and e.metric = 'rbridge'"):
        assert data["halving-filter"]["intervals"][cand][rung - 1] == [pytest.approx(low), pytest.approx(high)]
    # the ranking chart: the stage's scores, intervals and ties as `rbridge status` has them
    ranked = data["ranking-filter"]
    assert len(ranked["candidates"]) == 4 and all(lo < v < hi for v, (lo, hi) in zip(ranked["score"], ranked["ci"]))
    status = json.loads(_rbridge("status", "--store", "stores/tgt.db", "--json", cwd=d, env=_env).stdout)
    filt = next(st for st in status["stages"] if st["name"] == "filter")
    assert ranked["separated_from_next"] == [r["separated_from_next"] for r in filt["candidates"]]
    assert data["compute"]["flops"][-1] > 0  # drawn on a linear axis with its value
    # the decision-accuracy curve: the view's final numbers at each stage's last rung
    view = {(r[0], r[1]): r[2] for r in con.execute(
        "select stage, proxy_metric, decision_accuracy from decision_accuracy")}
    curve = data["accuracy-vs-compute"]
    for (stage, metric), acc in view.items():
        pts = curve[f"{metric} -> accuracy (gsm8k)"]
        assert any(w == f"{stage} r2" and y == pytest.approx(acc) for _x, y, w in pts)
    assert "report of plan tgt" in res.stdout


def _browser():
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip("Debian's chromium and chromium-driver are not installed (.ci/run installs them)")
    os.environ["SE_AVOID_STATS"] = "true"  # selenium-manager is never asked anything: the driver path is given
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--no-first-run", "--disable-background-networking", "--disable-component-update"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)


def test_report_opens_in_a_real_browser_offline_on_a_laptop_and_a_phone(report):
    d, page, _res, env = report
    driver = _browser()
    try:
        for width, height in ((1280, 900), (390, 844)):
            driver.set_window_size(width, height)
            driver.get(page.as_uri())
            state = driver.execute_async_script("""
                const done = arguments[arguments.length - 1];
                const imgs = Array.from(document.images);
                Promise.all(imgs.map(i => i.decode().then(() => [i.id, i.naturalWidth, i.naturalHeight],
                                                          e => [i.id, 0, 0])))
                  .then(sizes => done({sizes: sizes, overflow: document.documentElement.scrollWidth
                                       - document.documentElement.clientWidth,
                                       title: document.title}));
            """)
            assert state["title"] == "rbridge report: tgt"
            sizes = state["sizes"]
            assert len(sizes) >= 6 and all(w > 0 and h > 0 for _id, w, h in sizes), sizes
            assert state["overflow"] <= 1, f"the page scrolls sideways at {width}px"
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
        urls = []
        for entry in driver.get_log("performance"):
            msg = json.loads(entry["message"])["message"]
            if msg["method"] == "Network.requestWillBeSent":
                urls.append(msg["params"]["request"]["url"])
        assert urls and all(u.startswith(("file:", "data:")) for u in urls), urls
        # the ranking tables show what `rbridge status --json` says: scores, intervals, the tie column
        status = json.loads(_rbridge("status", "--store", "stores/tgt.db", "--json", cwd=d, env=env).stdout)
        filt = next(st for st in status["stages"] if st["name"] == "filter")
        want = [[str(r["rank"]), r["candidate"], f"{r['score']:.6g}", f"[{r['ci_low']:.4f}, {r['ci_high']:.4f}]",
                 {None: "", True: "separated", False: "tie"}[r["separated_from_next"]]]
                for r in filt["candidates"]]
        rows = driver.execute_script(
            "return Array.from(document.querySelectorAll('#ranking-filter tbody tr'))"
            ".map(r => Array.from(r.cells).map(c => c.textContent));")
        assert [r[:5] for r in rows] == want
        heads = driver.execute_script(
            "return Array.from(document.querySelectorAll('#ranking-filter thead th')).map(c => c.textContent);")
        assert heads[:5] == ["Rank", "Candidate", "Score", "95% interval", "vs next"], heads
        assert not any("_" in h for h in driver.execute_script(
            "return Array.from(document.querySelectorAll('th')).map(c => c.textContent);"))
    finally:
        driver.quit()


def test_optuna_dashboard_reads_the_plans_studies(plan):
    """`optuna-dashboard sqlite:///stores/tgt.db` serves this WSGI app: its API lists the plan's studies
    and their trials (the store is opened read-only by nothing here: the dashboard's own storage)."""
    import io
    from wsgiref.util import setup_testing_defaults

    from optuna_dashboard import wsgi

    d, _env, _res = plan
    app = wsgi(f"sqlite:///{d / 'stores/tgt.db'}")

    def get(path: str) -> dict:
        environ: dict = {}
        setup_testing_defaults(environ)
        environ.update(PATH_INFO=path, REQUEST_METHOD="GET", QUERY_STRING="", **{"wsgi.input": io.BytesIO()})
        status = []
        body = b"".join(app(environ, lambda s, h, *a: status.append(s)))
        assert status[0].startswith("200"), (path, status, body[:300])
        return json.loads(body)

    studies = {s["study_name"]: s for s in get("/api/studies")["study_summaries"]}
    assert {"tgt:filter", "tgt:target.s0", "tgt:target.s1"} <= set(studies), sorted(studies)
    detail = get(f"/api/studies/{studies['tgt:filter']['study_id']}")
    assert len(detail["trials"]) == 4  # one trial per candidate of the stage


def test_report_refuses_bad_arguments_and_status_names_it(report):
    d, page, _res, _env = report
    env = dict(os.environ, RBRIDGE_CACHE=str(d / "cache"), HF_HUB_OFFLINE="1")
    bad = _rbridge("report", "--store", "stores/tgt.db", "--plan", "nope", cwd=d, env=env)
    assert bad.returncode == 2 and "no plan 'nope'" in bad.stderr
    folder = _rbridge("report", "--store", "stores/tgt.db", "--out", "out", cwd=d, env=env)
    assert folder.returncode == 2 and "--out" in folder.stderr
    missing = _rbridge("report", "--store", "stores/none.db", cwd=d, env=env)
    assert missing.returncode == 2 and not (d / "stores/none.db").exists()
    default = _rbridge("report", "--store", "stores/tgt.db", cwd=d, env=env)
    assert default.returncode == 0 and (d / "stores/tgt.report.html").is_file()
    status = _rbridge("status", "--store", "stores/tgt.db", cwd=d, env=env)
    assert "tgt.report.html" in status.stdout


def test_target_summary_gives_seeds_mean_interval_and_robust_pairs(plan):
    from rbridge.analysis.intervals import target_summary
    from rbridge.store import open_store

    d, env, _res = plan
    st = open_store(d / "stores/tgt.db", create=False, read_only=True)
    try:
        rows = target_summary(st, "tgt")
        again = target_summary(st, "tgt")
    finally:
        st.close()
    assert rows == again and len(rows) == 4
    con = sqlite3.connect(d / "stores/tgt.db")
    per = defaultdict(dict)
    for stage, cand, value in con.execute(
            "select r.stage, c.name, e.value from evaluations e join runs r on r.id = e.run_id "
            "join candidates c on c.id = r.candidate_id where e.metric = 'accuracy' and r.role = 'target'"):
        per[cand][stage] = value
    for r in rows:
        assert r["stage"] == "target" and set(r["seeds"]) == {"0", "1"}
        assert r["seeds"]["0"] == pytest.approx(per[r["candidate"]]["target.s0"])
        assert r["accuracy"] == pytest.approx(sum(per[r["candidate"]].values()) / 2)
        assert 0.0 <= r["ci_low"] <= r["ci_high"] <= 1.0
        for a, b in r["robust_pairs"]:
            da = per[a]["target.s0"] - per[b]["target.s0"]
            db = per[a]["target.s1"] - per[b]["target.s1"]
            assert da * db > 0
    human = _rbridge("accuracy", "--store", "stores/tgt.db", "--no-curve", cwd=d, env=env)
    assert "targets trained by the plan" in human.stdout
