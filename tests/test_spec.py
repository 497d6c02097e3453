"""Spec validation: every error names the file, the field path and the line; exit code 2 from the CLI."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rbridge.errors import InputError
from rbridge.planner.schedule import decide, rung_tokens, survivors_at
from rbridge.spec import KeepWithin, keep_count, load_spec

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
    proxy: {hidden_size: 16}
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
    assert s1.seq_len == 256 and s1.evals == 4 and s1.keep == 1
    assert s2.lr == s1.lr and s2.batch_size == s1.batch_size
    assert s2.keep is None  # keep and reduction_factor are never inherited
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
    from rbridge.spec import StageSpec
    st = StageSpec(name="s", tokens=1000, evals=4)
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
