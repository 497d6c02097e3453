"""Scoring: traces (canonical JSONL), token weights, the rBridge scorer, trace generation.

Public names (imported lazily, so reading traces does not import torch):

- traces:   ``Trace``, ``load_traces(path)``, ``write_traces(path, traces)``
- weights:  ``letter_weights``, ``token_weights``, ``minmax``, ``minmax_benchmark``
- scorer:   ``score_traces(model, tokenizer, traces, ...) -> BenchmarkScore``,
            ``score_benchmarks``, ``score_model_dir(path, traces_path, ...)``,
            ``load_model``, ``scores_to_json``
- generate: ``generate_traces``, ``rescore_solutions``, ``load_questions``,
            ``main_generate(model_path, questions_path, out_path, rescore, limit)``
- importers: ``import_traces(fmt, paths, out)``, ``import_openai``, ``import_per_token``,
            ``import_rbridge``
- baselines: ``baseline_scores``, ``mc_values``, ``score_file`` (``rbridge score``, cached)
"""

from importlib import import_module

_NAMES = {
    "Trace": "traces", "load_traces": "traces", "write_traces": "traces",
    "letter_weights": "weights", "token_weights": "weights", "minmax": "weights",
    "minmax_benchmark": "weights",
    "BenchmarkScore": "scorer", "TraceScore": "scorer", "score_traces": "scorer",
    "score_benchmarks": "scorer", "score_model_dir": "scorer", "load_model": "scorer",
    "scores_to_json": "scorer",
    "Question": "generate", "generate_traces": "generate", "rescore_solutions": "generate",
    "load_questions": "generate", "main_generate": "generate",
    "import_traces": "importers", "import_openai": "importers", "import_per_token": "importers",
    "import_rbridge": "importers",
    "baseline_scores": "baselines", "mc_values": "baselines", "score_file": "baselines",
}

__all__ = sorted(_NAMES)


def __getattr__(name: str):
    if name in _NAMES:
        return getattr(import_module(f"rbridge.scoring.{_NAMES[name]}"), name)
    raise AttributeError(f"module 'rbridge.scoring' has no attribute {name!r}")
