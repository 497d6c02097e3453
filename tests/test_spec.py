"""Spec validation: every error names the file, the field path and the line; exit code 2 from the CLI."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rbridge.errors import InputError
from rbridge.planner.schedule import decide, rung_tokens, survivors_at
from rbridge.spec import KeepWithin, keep_count, load_spec, parse_spec

GOOD = """\
name: t
sources:
  a: {path: a.txt}
  b: {path: b.jsonl, field: text}
candidates:
  - {name: a, mix: {a: 1.0}}
  - {name: ab, mix: {a: 0.7, b: 0.3}}
benchmarks:
  - {name: g, traces: traces.jsonl}
stages:
  - name: s1
    proxy: {hidden_size: 16, num_hidden_layers: 1}
    tokens: 1000
    keep: 1
  - name: s2
    proxy: {preset: 2M}
    tokens: 2000
"""


def _write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "a.txt").write_text("hello\n\nworld\n")
    (tmp_path / "b.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "traces.jsonl").write_text("{}\n")
    p = tmp_path / "spec.yaml"
    p.write_text(textwrap.dedent(text))
    return p


def _error(tmp_path: Path, text: str) -> InputError:
    with pytest.raises(InputError) as info:
        load_spec(_write(tmp_path, text))
    return info.value


def test_good_spec_resolves_paths_and_inherits_stage_fields(tmp_path):
    spec = load_spec(_write(tmp_path, GOOD))
    assert spec.sources["a"].path == tmp_path / "a.txt"
    assert spec.benchmarks[0].traces == tmp_path / "traces.jsonl"
    s1, s2 = spec.resolved_stages()
    assert s1.training.seq_len == 256 and s1.pruning.evals == 4 and s1.pruning.keep == 1
    assert s2.training.lr == s1.training.lr and s2.training.batch_size == s1.training.batch_size
    assert s2.pruning.keep is None  # keep and reduction_factor are never inherited
    assert (s1.index, s2.index) == (0, 1) and s2.proxy.root == {"preset": "2M"}
    assert len(spec.spec_hash) == 64


def test_unknown_key_names_field_and_line(tmp_path):
    err = _error(tmp_path, GOOD.replace("    tokens: 2000", "    tokens: 2000\n    tokenz: 5"))
    assert err.field == "stages[1].tokenz"
    assert err.line == 18
    assert "unknown key" in str(err) and "spec.yaml:18" in str(err)


def test_wrong_type(tmp_path):
    err = _error(tmp_path, GOOD.replace("tokens: 1000", "tokens: lots"))
    assert err.field == "stages[0].tokens" and err.line == 13


def test_missing_file(tmp_path):
    err = _error(tmp_path, GOOD.replace("traces: traces.jsonl", "traces: nope.jsonl"))
    assert err.field == "benchmarks[0].traces" and "nope.jsonl" in str(err) and err.line == 9


def test_empty_mixture(tmp_path):
    err = _error(tmp_path, GOOD.replace("{a: 0.7, b: 0.3}", "{}"))
    assert err.field == "candidates[1].mix" and "at least one source" in str(err)


def test_weights_not_summing_to_one(tmp_path):
    err = _error(tmp_path, GOOD.replace("{a: 0.7, b: 0.3}", "{a: 0.7, b: 0.2}"))
    assert err.field == "candidates[1].mix" and "sum to 1" in str(err)


def test_unknown_source_in_mixture(tmp_path):
    err = _error(tmp_path, GOOD.replace("{a: 0.7, b: 0.3}", "{a: 0.7, c: 0.3}"))
    assert err.field == "candidates[1].mix.c" and "unknown source" in str(err) and err.line == 7


def test_bad_keep_and_yaml_syntax(tmp_path):
    err = _error(tmp_path, GOOD.replace("keep: 1", "keep: lots"))
    assert err.field == "stages[0].keep"
    err = _error(tmp_path, GOOD.replace("  - name: s2", "  - name: s2\n - broken: [x"))
    assert "not valid YAML" in str(err) and err.line is not None



def test_fast_yaml_reader_reads_and_refuses_as_pyyaml(tmp_path):
    """Specs load through libyaml (specs of thousands of candidates); the data, and each refusal with its
    message and line, are what the pure-Python loader gives."""
    import yaml

    from rbridge.spec import _load_yaml

    assert _load_yaml(GOOD) == yaml.safe_load(GOOD)
    bad = GOOD.replace("  - name: s2", "  - name: s2\n - broken: [x")
    with pytest.raises(yaml.YAMLError) as fast:
        _load_yaml(bad)
    with pytest.raises(yaml.YAMLError) as slow:
        yaml.safe_load(bad)
    assert str(fast.value) == str(slow.value)
    err = _error(tmp_path, GOOD.replace("benchmarks:", "  - {name: ab, mix: {a: 1.0}}\nbenchmarks:"))
    assert "candidate names must be unique: ab" in str(err)

def test_cli_validate_exit_codes(tmp_path):
    good = _write(tmp_path, GOOD)
    ok = subprocess.run([sys.executable, "-m", "rbridge.cli", "validate", str(good)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    good.write_text(GOOD.replace("tokens: 1000", "tokens: -1"))
    bad = subprocess.run([sys.executable, "-m", "rbridge.cli", "validate", str(good)], capture_output=True, text=True)
    assert bad.returncode == 2
    assert "spec.yaml:13" in bad.stderr and "stages[0].tokens" in bad.stderr and "Traceback" not in bad.stderr


def test_keep_counts():
    assert keep_count(3, 10) == 3
    assert keep_count(0.25, 10) == 3
    assert keep_count(KeepWithin(within=0.1), 4, [1.0, 1.05, 1.2, 1.1]) == 3
    assert keep_count(None, 7) == 7


def test_rungs_and_geometric_halving():
    spec_text = GOOD.replace("    tokens: 1000\n", "    tokens: 1000\n    evals: 4\n")
    st = parse_spec(spec_text, Path("spec.yaml"), check_files=False).resolved_stages()[0]
    assert rung_tokens(st) == [250, 500, 750, 1000]
    # 16 -> 2 over 3 rungs: 16 * (1/8)^(r/3) = 8, 4, 2
    assert [survivors_at(r, 3, 16, 2, None) for r in (1, 2, 3)] == [8, 4, 2]
    assert [survivors_at(r, 3, 16, 2, 4.0) for r in (1, 2, 3)] == [4, 2, 2]
    assert survivors_at(2, 3, 5, None, None) == 5


def test_decide_is_order_independent_and_breaks_ties_by_name():
    scores = {"c": 1.0, "a": 2.0, "b": 1.0, "d": 3.0}
    shuffled = dict(reversed(list(scores.items())))
    d1, d2 = decide(scores, 2, 1, "rbridge"), decide(shuffled, 2, 1, "rbridge")
    assert d1 == d2
    assert [d.candidate for d in d1 if d.kept] == ["b", "c"]


# ---------------------------------------------------------------------------- typed stage parts (issue 11)
@pytest.mark.parametrize("proxy, field, words", [
    ("{preset: 3M}", "stages[1].proxy.preset", "unknown preset '3M'"),
    ("{preset: 2M, hidden_sise: 64}", "stages[1].proxy.hidden_sise", "unknown LlamaConfig field"),
    ("{preset: 2M, vocab_size: 64}", "stages[1].proxy.vocab_size", "set by rbridge"),
    ("{hidden_size: 100, num_hidden_layers: 2, num_attention_heads: 3}", "stages[1].proxy.num_attention_heads",
     "not divisible"),
    ("{preset: 2M, num_key_value_heads: 2}", "stages[1].proxy.num_key_value_heads", "not divisible"),
    ("{preset: 2M, max_position_embeddings: 8}", "stages[1].proxy.max_position_embeddings", "at least seq_len"),
    ("{hidden_size: 0, num_hidden_layers: 1}", "stages[1].proxy.hidden_size", "positive integer"),
    ("{num_hidden_layers: 1}", "stages[1].proxy.hidden_size", "required"),
    ("[1, 2]", "stages[1].proxy", "dictionary"),
    ("{preset: []}", "stages[1].proxy.preset", "unknown preset"),            # found by tests/test_fuzz_inputs.py
    ("{hidden_size: null, num_hidden_layers: 2}", "stages[1].proxy.hidden_size", "required"),  # (a TypeError)
])
def test_every_bad_proxy_setting_is_refused_at_load_with_file_line_field(tmp_path, proxy, field, words):
    err = _error(tmp_path, GOOD.replace("proxy: {preset: 2M}", f"proxy: {proxy}"))
    assert err.field == field and words in str(err), str(err)
    assert err.line == 16 and str(err).startswith(f"{tmp_path / 'spec.yaml'}:16: {field}:")


def test_micro_batch_size_must_divide_the_batch(tmp_path):
    err = _error(tmp_path, GOOD.replace("    keep: 1\n", "    keep: 1\n    batch_size: 12\n    micro_batch_size: 5\n"))
    assert err.field == "stages[0].micro_batch_size" and "not a multiple" in str(err) and err.line == 16
    spec = load_spec(_write(tmp_path, GOOD.replace("    keep: 1\n", "    keep: 1\n    micro_batch_size: 4\n")))
    s1, s2 = spec.resolved_stages()
    assert s1.training.micro_batch_size == s2.training.micro_batch_size == 4  # inherited like the batch size


# Run fingerprints of specs/mix.yaml's stages as computed before the stage settings became typed parts
# (issue 11): stores written by earlier versions keep reusing their runs after `rbridge plan --force`.
PINNED_FINGERPRINTS = {
    ("filter", "austen"): "1ed573849ab2d5f09cbdf421762b8713bfbea27d0b6f43b0b9b5a4feaed99481",
    ("filter", "kjv"): "ed405de437365a8c8002e27e71a8469929eb3522b1850000febdb5840e000bec",
    ("rank", "sotu"): "b6eca358ce9777f58796f032df08d6d4e59f6028697608b13674e2a0059fdd65",
}


def test_run_fingerprints_and_settings_unchanged_by_the_typed_parts():
    from types import SimpleNamespace as NS

    from rbridge.planner.reconcile import run_fingerprint

    spec = load_spec(Path(__file__).resolve().parents[1] / "specs/mix.yaml")
    data = NS(shards={n: NS(key=f"key-{n}") for n in spec.sources}, tokenizer=NS(rbridge_key="tok"))
    stages = {st.name: st for st in spec.resolved_stages()}
    mixes = {c.name: c.mix for c in spec.candidates}
    for (stage, cand), expected in PINNED_FINGERPRINTS.items():
        assert run_fingerprint(spec, stages[stage], mixes[cand], data) == expected
    assert stages["filter"].run_settings() == {"tokens": 98304, "seq_len": 256, "batch_size": 8, "lr": 0.01,
                                               "warmup": 0.05, "precision": "auto", "evals": 3}


def test_plan_of_a_spec_with_a_bad_preset_writes_nothing(tmp_path):
    """`rbridge validate` and `rbridge plan` both refuse `preset: 3M` (exit 2, file:line field) before any
    store, lock, run folder or cache exists."""
    spec = _write(tmp_path, GOOD.replace("proxy: {preset: 2M}", "proxy: {preset: 3M}"))
    env = {**__import__("os").environ, "RBRIDGE_CACHE": str(tmp_path / "cache")}
    for args in (["validate", str(spec)], ["plan", str(spec)]):
        res = subprocess.run([sys.executable, "-m", "rbridge.cli", *args], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 2, res.stdout + res.stderr
        assert f"{spec}:16: stages[1].proxy.preset: unknown preset '3M'" in res.stderr, res.stderr
    assert not (tmp_path / "stores").exists() and not (tmp_path / "cache").exists()


def test_keep_above_the_candidates_is_a_warning(tmp_path):
    spec = load_spec(_write(tmp_path, GOOD.replace("keep: 1", "keep: 5")))
    assert spec.warnings() == ["stages[0].keep: keeps 5 of the 2 candidates that reach stage 's1', so none is "
                               "dropped there"]
    assert load_spec(_write(tmp_path, GOOD)).warnings() == []
    res = subprocess.run([sys.executable, "-m", "rbridge.cli", "validate", str(tmp_path / "spec.yaml")],
                         capture_output=True, text=True)
    assert res.returncode == 0 and res.stderr == ""
    (tmp_path / "spec.yaml").write_text(GOOD.replace("keep: 1", "keep: 5"))
    res = subprocess.run([sys.executable, "-m", "rbridge.cli", "validate", str(tmp_path / "spec.yaml")],
                         capture_output=True, text=True)
    assert res.returncode == 0 and "warning:" in res.stderr and "keeps 5 of the 2" in res.stderr, res.stderr


def test_tokens_beyond_the_stores_integers_are_refused_at_load(tmp_path):
    err = _error(tmp_path, GOOD.replace("tokens: 2000", "tokens: 10000000000000000000"))
    assert err.field == "stages[1].tokens" and err.line == 17


TARGET = GOOD + """\
  - name: tgt
    role: target
    model: {preset: 8M}
    tokens: 4000
    seeds: [0, 1]
"""


def test_target_stage_resolves_one_stage_per_seed(tmp_path):
    text = TARGET.replace("traces: traces.jsonl}", "traces: traces.jsonl, checker: number}")
    spec = load_spec(_write(tmp_path, text))
    stages = spec.resolved_stages()
    assert [s.name for s in stages] == ["s1", "s2", "tgt.s0", "tgt.s1"]
    t0, t1 = stages[2:]
    assert (t0.role, t0.group, t0.seed, t1.seed) == ("target", "tgt", 0, 1)
    assert t0.proxy.root == {"preset": "8M"} and t0.evaluate == ("accuracy",) and t0.pruning.keep is None
    assert t0.index == t1.index == 2  # both name the stage as written in error messages
    assert t0.training.lr == stages[1].training.lr  # training settings inherit as for any stage
    assert t0.run_settings()["role"] == "target" and t1.run_settings()["seed"] == 1
    assert "role" not in stages[0].run_settings() and "seed" not in stages[0].run_settings()


@pytest.mark.parametrize("edit, field, words", [
    (("seeds: [0, 1]", "seeds: [0, 1]\n    keep: 2"), "stages[2].keep", "never prunes"),
    (("model: {preset: 8M}", "model: {preset: 8M}\n    proxy: {preset: 2M}"), "stages[2].model", "not both"),
    (("seeds: [0, 1]", "seeds: [1, 1]"), "stages[2].seeds", "unique"),
    (("seeds: [0, 1]", "candidates: [a, nope]"), "stages[2].candidates[1]", "unknown candidate 'nope'"),
    (("tokens: 1000\n    keep: 1", "tokens: 1000\n    keep: 1\n    seeds: [0, 1]"), "stages[0].seeds",
     "several seeds are for target stages"),
    (("tokens: 1000\n    keep: 1", "tokens: 1000\n    keep: 1\n    candidates: [a]"), "stages[0].candidates",
     "target stages"),
    (("role: target", "role: boss"), "stages[2].role", "'proxy' or 'target'"),
])
def test_bad_target_stages_are_refused_with_the_field(tmp_path, edit, field, words):
    text = TARGET.replace("traces: traces.jsonl}", "traces: traces.jsonl, checker: number}")
    err = _error(tmp_path, text.replace(*edit))
    assert field in str(err) and words in str(err)


def test_a_target_stage_needs_an_answer_checker(tmp_path):
    err = _error(tmp_path, TARGET)  # benchmark g: no checker, and its name does not say gsm8k
    assert "benchmarks[0].checker" in str(err) and "checker: number" in str(err)
    only_targets = TARGET.replace("traces: traces.jsonl}", "traces: traces.jsonl, checker: number}")
    only_targets = only_targets[:only_targets.index("  - name: s1")] + only_targets[only_targets.index("  - name: tgt"):]
    err = _error(tmp_path, only_targets)
    assert "at least one proxy stage" in str(err)
