"""`rbridge score` end to end on a tiny saved Llama: `--json` in a subprocess, the cache,
and malformed traces exiting 2 with file and line."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from rbridge.cli import main
from rbridge.scoring.baselines import score_file
from rbridge.scoring.scorer import score_benchmarks
from rbridge.scoring.traces import load_traces

RBRIDGE = str(Path(sys.executable).parent / "rbridge")


def _trace(i, bench, reasoning, pieces, **kw):
    return {"id": f"{bench}-{i}", "benchmark": bench, "question": kw.pop("question", "How many clips?"),
            "reasoning": reasoning, "answer": "72",
            "frontier": {"model": "f", "tokens": [{"text": p, "logprob": math.log(0.1 + 0.8 * (k % 2))}
                                                  for k, p in enumerate(pieces)]}, **kw}


@pytest.fixture(scope="module")
def files(model, tokenizer, tmp_path_factory):
    d = tmp_path_factory.mktemp("score")
    model.save_pretrained(d / "tiny")
    tokenizer.save_pretrained(d / "tiny")
    rows = [
        _trace(0, "gsm8k", "Natalia sold 48/2 = 24 clips in May.", ["Natalia", " sold 48", "/2 = 24", " clips in May."],
               label="Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72"),
        _trace(1, "gsm8k", "Café crème costs 3 €.", ["Caf", "é crème", " costs 3 ", "€."], label="#### 3"),
        _trace(0, "arc", "Weng earns 12/60 = 0.2 per minute.", ["Weng earns", " 12/60 = 0.2 per minute."],
               choices=["0.2", "10", "72"], gold=0),
    ]
    traces = d / "traces.jsonl"
    traces.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return d, traces


def test_score_json_in_a_subprocess(files, model, tokenizer):
    d, traces = files
    env = {**os.environ, "RBRIDGE_CACHE": str(d / "cache"), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([RBRIDGE, "score", "--model", str(d / "tiny"), "--traces", str(traces), "--json",
                        "--precision", "fp32", "--context", "question"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["model"] == "tiny" and set(doc["benchmarks"]) == {"gsm8k", "arc"} and doc["cached"] is False
    g, a = doc["benchmarks"]["gsm8k"], doc["benchmarks"]["arc"]
    for k in ("rbridge", "nll", "rbridge_no_minmax", "bpb", "n_traces", "n_tokens", "context", "minmax", "aggregate"):
        assert k in g and k in a
    assert g["n_traces"] == 2 and g["context"] == "question" and g["minmax"] == "trace"
    assert g["n_label"] == 2 and g["label_nll"] > 0 and "correct_prob" not in g
    assert a["n_mc"] == 1 and 0 <= a["norm_correct_prob"] <= 1 and a["acc_cloze"] in (0.0, 1.0)
    # the same numbers as the library on the in-memory model
    lib = score_benchmarks(model, tokenizer, load_traces(traces), precision="fp32")
    assert g["rbridge"] == pytest.approx(lib["gsm8k"].rbridge, abs=1e-6)
    assert a["nll"] == pytest.approx(lib["arc"].nll, abs=1e-6)
    # malformed traces: exit 2, one line naming file and line, no traceback
    bad = d / "bad.jsonl"
    bad.write_text(traces.read_text().splitlines()[0] + "\n{not json\n")
    r = subprocess.run([RBRIDGE, "score", "--model", str(d / "tiny"), "--traces", str(bad), "--json"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2 and "bad.jsonl:2" in r.stderr and "Traceback" not in r.stderr


def test_cache_hit_miss_and_no_cache(files, tmp_path):
    d, traces = files
    db = tmp_path / "c.sqlite"
    kw = dict(precision="fp32", device="cpu", cache_file=db)
    a, hit_a = score_file(d / "tiny", traces, **kw)
    b, hit_b = score_file(d / "tiny", traces, **kw)
    assert (hit_a, hit_b) == (False, True) and a == b
    c, hit_c = score_file(d / "tiny", traces, minmax="none", **kw)
    assert not hit_c and c["benchmarks"]["gsm8k"]["minmax"] == "none"
    _, hit_d = score_file(d / "tiny", traces, use_cache=False, **kw)
    assert not hit_d
    # a changed traces file is a different key
    t2 = tmp_path / "t2.jsonl"
    t2.write_text(traces.read_text().splitlines()[0] + "\n")
    e, hit_e = score_file(d / "tiny", t2, **kw)
    assert not hit_e and set(e["benchmarks"]) == {"gsm8k"}


def test_cli_human_table_and_bad_arguments(files, tmp_path, monkeypatch):
    d, traces = files
    monkeypatch.setenv("RBRIDGE_CACHE", str(tmp_path))
    r = CliRunner().invoke(main, ["score", "--model", str(d / "tiny"), "--traces", str(traces), "--no-baselines",
                                  "--no-cache", "--context", "none", "--aggregate", "weighted"])
    assert r.exit_code == 0, r.output
    assert "gsm8k" in r.output and "rbridge" in r.output and "aggregate weighted" in r.output
    r = CliRunner().invoke(main, ["score", "--model", str(tmp_path / "nope"), "--traces", str(traces)])
    assert r.exit_code == 2 and "model path not found" in r.output
    r = CliRunner().invoke(main, ["score", "--model", str(d / "tiny"), "--traces", str(traces), "--minmax", "x"])
    assert r.exit_code == 2


def test_auto_upcasts_a_bf16_checkpoint_where_bf16_does_not_pay(files, model, tokenizer, tmp_path, monkeypatch):
    """A checkpoint saved in bf16 (transformers loads it in bf16) is scored in fp32 under auto where bf16
    measured slower (injected), in bf16 where faster; the injected ratio is part of the cache key."""
    import torch

    d, traces = files
    half = type(model)(model.config)
    half.load_state_dict(model.state_dict())
    half.to(torch.bfloat16).save_pretrained(tmp_path / "half")
    tokenizer.save_pretrained(tmp_path / "half")
    db = tmp_path / "c.sqlite"
    monkeypatch.setenv("RBRIDGE_BF16_SPEEDUP", "0.5")
    slow, hit = score_file(tmp_path / "half", traces, device="cpu", cache_file=db, baselines=False)
    exact, _ = score_file(tmp_path / "half", traces, device="cpu", precision="fp32", cache_file=db, baselines=False)
    assert not hit and slow["precision"] == "fp32"
    assert slow["benchmarks"]["gsm8k"]["rbridge"] == exact["benchmarks"]["gsm8k"]["rbridge"]
    monkeypatch.setenv("RBRIDGE_BF16_SPEEDUP", "2")
    fast, hit = score_file(tmp_path / "half", traces, device="cpu", cache_file=db, baselines=False)
    assert not hit and fast["precision"] == "bf16"


def test_a_loaded_model_runs_no_hub_kernels(files):
    """transformers 5 replaces layers with kernels fetched from the Hugging Face Hub unless told not to
    (offline on a GPU the load fails outright); rbridge loads every model without them."""
    from transformers import PreTrainedModel

    from rbridge.scoring.api import load_model

    d, _ = files
    model, _, _ = load_model(d / "tiny", device="cpu")
    if hasattr(PreTrainedModel, "use_kernels"):
        assert model.use_kernels is False
