"""Scoring: traces (canonical JSONL), token weights, the rBridge scorer, trace generation.

Public names (imported lazily, so reading traces does not import torch):

- traces:   ``Trace``, ``load_traces(path)``, ``write_traces(path, traces)``
- weights:  ``letter_weights``, ``token_weights``, ``minmax``, ``minmax_benchmark``
- requests: ``Request`` (context ids, continuation ids, what it belongs to, its results),
            ``loglikelihood(model, requests, ...)`` (the one batched teacher-forcing pass)
- scorer:   ``score_traces(model, tokenizer, traces, ...) -> BenchmarkScore``,
            ``score_benchmarks``, ``scores_to_json``
- api:      ``score_file`` (``rbridge score``, cached), ``score_model_dir(path, traces_path, ...)``,
            ``load_model``
- generate: ``generate_traces``, ``rescore_solutions``, ``load_questions``,
            ``main_generate(model_path, questions_path, out_path, rescore, limit)``
- importers: ``import_traces(fmt, paths, out)``, ``import_openai``, ``import_per_token``,
            ``import_rbridge``
- baselines: ``baseline_scores``, ``mc_values``

Other modules: ``decoding`` (the one generation loop: accuracy baseline and
trace generation), ``completions`` (the reasoning span and its tokens inside a
JSON completion), ``cache`` (the score cache). Names that moved between
modules stay importable from their old module (``scorer.load_model``,
``baselines.score_file``, ``generate.find_reasoning``, ...).
"""

from importlib import import_module

_NAMES = {
    "Trace": "traces", "load_traces": "traces", "write_traces": "traces",
    "letter_weights": "weights", "token_weights": "weights", "minmax": "weights",
    "minmax_benchmark": "weights",
    "BenchmarkScore": "scorer", "TraceScore": "scorer", "score_traces": "scorer",
    "score_benchmarks": "scorer", "scores_to_json": "scorer",
    "Request": "requests", "loglikelihood": "requests",
    "score_model_dir": "api", "load_model": "api", "score_file": "api",
    "Question": "generate", "generate_traces": "generate", "rescore_solutions": "generate",
    "load_questions": "generate", "main_generate": "generate",
    "import_traces": "importers", "import_openai": "importers", "import_per_token": "importers",
    "import_rbridge": "importers",
    "baseline_scores": "baselines", "mc_values": "baselines",
}

__all__ = sorted(_NAMES)


def forward_attr(module: str, name: str, table: dict[str, str]):
    """A module's ``__getattr__`` for names it re-exports from others (``table``: name -> module).

    The other module is imported on first use: the package does not import
    torch for reading traces, and a module can keep a name that moved to a
    module importing it (``scorer.load_model`` lives in ``api``).
    """
    if name in table:
        return getattr(import_module(table[name]), name)
    raise AttributeError(f"module {module!r} has no attribute {name!r}")


def __getattr__(name: str):
    return forward_attr(__name__, name, {k: f"rbridge.scoring.{v}" for k, v in _NAMES.items()})
