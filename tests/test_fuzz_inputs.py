"""Property-based fuzzing of the readers users feed (issue 12): the spec, trace files, result CSVs.

For any input, a reader either succeeds or raises rbridge's InputError (one message,
exit 2 in the CLI); never another exception. Inputs are built from mutations of
valid files (a field dropped, a value swapped for another type, a line cut, random
bytes spliced in) plus arbitrary text, so most examples get past the first check.
The example count is bounded for CI (HYPOTHESIS_PROFILE=thorough runs more).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from rbridge.errors import InputError  # noqa: E402

settings.register_profile("ci", max_examples=60, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=2000, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

SPEC = {
    "name": "fz", "seed": 1, "tokenizer": {"train": {"vocab_size": 300}},
    "sources": {"a": {"path": "a.txt"}, "b": {"path": "b.jsonl", "field": "text"}},
    "candidates": [{"name": "a", "mix": {"a": 1.0}}, {"name": "ab", "mix": {"a": 0.5, "b": 0.5}}],
    "benchmarks": [{"name": "g", "traces": "t.jsonl"}],
    "stages": [{"name": "s1", "proxy": {"preset": "0.5M"}, "tokens": 1000, "keep": 1, "micro_batch_size": 4,
                "batch_size": 8},
               {"name": "s2", "proxy": {"hidden_size": 64, "num_hidden_layers": 2}, "tokens": 2000}],
    "target_model": {"params": 1e9, "tokens": 2e10},
}
TRACE = {"id": "a", "benchmark": "b", "question": "q?", "reasoning": "x y", "answer": "1",
         "frontier": {"model": "m", "tokens": [{"text": "x", "logprob": -0.1}, {"text": " y", "logprob": -0.5}]}}

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20), st.floats(allow_nan=True),
                    st.text(max_size=12), st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5),
                                                                                              st.integers(), max_size=2))


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


@st.composite
def mutated(draw, base):
    """``base`` with one to three of: a value replaced by another type, a key dropped, an unknown key added."""
    obj = json.loads(json.dumps(base))
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(obj) if p]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = obj
        for part in path[:-1]:
            parent = parent[part]
        action = draw(st.sampled_from(["replace", "drop", "extra"]))
        if action == "replace":
            parent[path[-1]] = draw(scalars)
        elif action == "drop" and isinstance(parent, dict):
            parent.pop(path[-1])
        elif isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=8))] = draw(scalars)
    return obj


def _files(d: Path) -> None:
    (d / "a.txt").write_text("hello\n\nworld\n")
    (d / "b.jsonl").write_text('{"text": "x"}\n')
    (d / "t.jsonl").write_text(json.dumps(TRACE) + "\n")


def _only_input_errors(fn, *args):
    try:
        fn(*args)
    except InputError:
        pass


@given(spec=mutated(SPEC))
def test_spec_reader_raises_only_input_errors(tmp_path_factory, spec):
    from rbridge.spec import parse_spec

    d = tmp_path_factory.mktemp("spec")
    _files(d)

    def load(text):
        s = parse_spec(text, d / "spec.yaml")
        s.resolved_stages()
        s.warnings()

    _only_input_errors(load, yaml.safe_dump(spec, allow_unicode=True))


@given(text=st.text(max_size=300))
def test_spec_reader_on_arbitrary_text(tmp_path_factory, text):
    from rbridge.spec import parse_spec

    _only_input_errors(lambda t: parse_spec(t, tmp_path_factory.mktemp("raw") / "spec.yaml").resolved_stages(), text)


@given(trace=mutated(TRACE), junk=st.binary(max_size=40), cut=st.integers(0, 400))
def test_trace_reader_raises_only_input_errors(tmp_path_factory, trace, junk, cut):
    from rbridge.scoring.traces import load_traces

    d = tmp_path_factory.mktemp("traces")
    good = json.dumps(TRACE)
    bad = json.dumps(trace, allow_nan=True)
    (d / "m.jsonl").write_text(good + "\n" + bad + "\n")
    _only_input_errors(load_traces, d / "m.jsonl")
    (d / "c.jsonl").write_bytes((good + "\n" + bad)[:cut].encode() + junk)
    _only_input_errors(load_traces, d / "c.jsonl")


ROW = st.lists(st.one_of(st.text(alphabet=",.-0123456789abcdefnatruex \"'\t", max_size=10), st.floats().map(str)),
               min_size=0, max_size=9)


@given(header=st.sampled_from(["candidate,benchmark,metric,value", "candidate,benchmark,metric,value,seed",
                               "candidate,benchmark,metric,value,higher_is_better,params,tokens,seed", "x,y"]),
       rows=st.lists(ROW, max_size=6), as_json=st.booleans())
def test_result_reader_raises_only_input_errors(tmp_path_factory, header, rows, as_json):
    from rbridge.analysis.results_io import read_results

    d = tmp_path_factory.mktemp("csv")
    cols = header.split(",")
    if as_json:
        lines = [json.dumps(dict(zip(cols, r))) for r in rows]
        path = d / "r.jsonl"
        path.write_text("\n".join(lines) + "\n")
    else:
        path = d / "r.csv"
        path.write_text(header + "\n" + "\n".join(",".join(r) for r in rows) + "\n")
    _only_input_errors(read_results, path)
