"""The entry point of scoring: ``rbridge score`` (:func:`score_file`) and the model loading it uses.

:func:`score_file` validates the options and the traces file, looks the result
up in the score cache (:mod:`rbridge.scoring.cache`), loads the model, and
puts together the ``--json`` document: the rBridge scores of every benchmark
(:mod:`rbridge.scoring.scorer`) with the baselines beside them
(:mod:`rbridge.scoring.baselines`). The metric modules take a model already in
memory; loading and caching happen here only.

:func:`load_model` reads a local causal LM: a Hugging Face directory or a
``.gguf`` file (nothing is downloaded). :func:`score_model_dir` is the short
form for library users: load, score, no baselines, no cache.

These names were in ``scorer.py`` (``load_model``, ``score_model_dir``) and
``baselines.py`` (``score_file``); they are still importable from there.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

import rbridge
from rbridge.errors import InputError
from rbridge.scoring import cache
from rbridge.scoring.baselines import baseline_scores
from rbridge.proxy.precision import machine_name
from rbridge.scoring.requests import PRECISIONS, precision_name, scoring_dtype
from rbridge.scoring.scorer import AGGREGATES, CONTEXTS, MINMAX, BenchmarkScore, score_benchmarks, scores_to_json
from rbridge.scoring.traces import group_by_benchmark, load_traces


def load_model(path: str | Path, *, device: str = "auto", dtype: torch.dtype | None = None):
    """Load a local causal LM and its tokenizer: an HF directory or a ``.gguf`` file.

    A directory without ``config.json`` but with exactly one ``.gguf`` file is
    loaded from that file; a plan's run folder (``stores/<plan>.runs/<stage>/<candidate>``)
    from the proxy exported in its ``model/`` folder. Nothing is downloaded (``local_files_only``).
    Returns ``(model, tokenizer, name)``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.exists():
        raise InputError("model path not found", file=path)
    kwargs: dict[str, Any] = {"local_files_only": True}
    model_kwargs = _no_hub_kernels()
    if path.is_file():
        if path.suffix != ".gguf":
            raise InputError("a model file must be .gguf; otherwise pass a directory", file=path)
        directory, kwargs["gguf_file"], name = path.parent, path.name, path.stem
    else:
        directory, name = path, path.name
        name = display_name(path)
        if not (path / "config.json").exists() and (path / "model" / "config.json").exists():
            # a plan's run folder (stores/<plan>.runs/<stage>/<candidate>): its exported proxy
            directory, name = path / "model", f"{path.parent.name}/{path.name}"
        elif not (path / "config.json").exists():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) != 1:
                raise InputError("not a Hugging Face model directory (no config.json), not a plan's run "
                                 "folder (no model/config.json) and not exactly one .gguf file in it "
                                 f"(found {len(ggufs)})", file=path)
            kwargs["gguf_file"], name = ggufs[0].name, ggufs[0].stem
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # transformers' "Loading weights" bar: noise in rbridge's output
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            directory, **kwargs, **model_kwargs, **({"dtype": dtype} if dtype is not None else {}))
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"cannot load a causal LM and tokenizer from it: {e}", file=path) from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    model.eval()
    return model, tokenizer, name


def _no_hub_kernels() -> dict[str, Any]:
    """``use_kernels=False`` where transformers has hub kernels: from transformers 5 on, ``from_pretrained``
    defaults to replacing layers with kernels downloaded from the Hugging Face Hub (the ``kernels`` package),
    code fetched at run time that rbridge does not run (nothing is downloaded at run time), and offline it
    fails outright on a GPU ("Version 2 of 'kernels-community/rotary' is not available in the local cache",
    seen on an H200). Older versions have no such argument (nor default), so nothing is passed there."""
    from transformers import PreTrainedModel

    return {"use_kernels": False} if hasattr(PreTrainedModel, "use_kernels") else {}


def display_name(path: str | Path) -> str:
    """How `rbridge score` names a model folder: a plan's run folder, or the ``model/`` exported in one,
    as ``<stage>/<candidate>``; a .gguf file by its stem; any other folder by its name."""
    path = Path(path)
    resolved = path.resolve()
    if path.is_file():
        return path.stem
    if resolved.name == "model" and resolved.parent.parent.parent.name.endswith(".runs"):
        return f"{resolved.parent.parent.name}/{resolved.parent.name}"
    if not (path / "config.json").exists() and (path / "model" / "config.json").exists():
        return f"{resolved.parent.name}/{resolved.name}"
    if not (path / "config.json").exists():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ggufs[0].stem
    return resolved.name


def score_model_dir(path: str | Path, traces_path: str | Path, *, device: str = "auto",
                    **opts) -> dict[str, BenchmarkScore]:
    """Load the model at ``path`` (HF dir or .gguf) and score every benchmark in ``traces_path``.

    ``opts`` go to :func:`rbridge.scoring.scorer.score_traces` (context, minmax,
    aggregate, batch_size, precision, fewshot_k, max_length). Traces are
    validated before the model loads.
    """
    traces = load_traces(traces_path)
    model, tokenizer, _ = load_model(path, device=device)
    return score_benchmarks(model, tokenizer, traces, **opts)


def score_file(model_path, traces_path, *, context: str = "question", minmax: str = "trace",
               aggregate: str = "mean", precision: str = "auto", batch_size: int = 16,
               fewshot_k: int = 3, max_length: int | None = None, baselines: bool = True,
               accuracy: bool = False, max_new_tokens: int = 128, per_trace: bool = False,
               device: str = "auto", use_cache: bool = True,
               cache_file=None) -> tuple[dict[str, Any], bool]:
    """``rbridge score``: (the ``--json`` document, whether it came from the cache).

    Traces are validated before the model loads. Results are cached in
    :mod:`rbridge.scoring.cache` keyed by (model, traces, options); the batch
    size is not part of the key. ``baselines=False`` with ``accuracy=True``
    keeps only the accuracy keys of the baselines.
    """
    for name, val, allowed in (("--context", context, CONTEXTS), ("--minmax", minmax, MINMAX),
                               ("--aggregate", aggregate, AGGREGATES), ("--precision", precision, PRECISIONS)):
        if val not in allowed:
            raise InputError(f"must be one of {', '.join(allowed)}, not {val!r}", field=name)
    traces = load_traces(traces_path)
    dev = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    options = {"context": context, "minmax": minmax, "aggregate": aggregate, "precision": precision,
               "fewshot_k": fewshot_k, "max_length": max_length, "baselines": baselines,
               "accuracy": accuracy, "max_new_tokens": max_new_tokens if accuracy else None,
               "per_trace": per_trace, "device": dev.split(":")[0], "rbridge": rbridge.__version__}
    if precision == "auto":  # what auto computes in depends on the machine and threads (requests.scoring_dtype)
        options["auto_on"] = f"{machine_name(options['device'])}; {torch.get_num_threads()} threads"
        options["auto_rule"] = 2  # 2: bf16 checkpoints measured too (1 scored them in bf16): older entries miss
        if os.environ.get("RBRIDGE_BF16_SPEEDUP"):  # an injected ratio decides instead of the measurement
            options["bf16_speedup"] = os.environ["RBRIDGE_BF16_SPEEDUP"]
    key = mfp = tfp = opts = None
    if use_cache:
        mfp, tfp = cache.model_fingerprint(model_path), cache.traces_fingerprint(traces_path)
        key, opts = cache.cache_key(mfp, tfp, options)
        hit = cache.get(key, cache_file)
        if hit is not None:
            hit["model"] = display_name(model_path)  # the same model under another path or name
            return hit, True
    t0 = time.perf_counter()
    model, tokenizer, name = load_model(model_path, device=dev)
    t1 = time.perf_counter()
    computed_in = precision_name(scoring_dtype(precision, model))
    scores = score_benchmarks(model, tokenizer, traces, context=context, minmax=minmax,
                              aggregate=aggregate, batch_size=batch_size, precision=precision,
                              fewshot_k=fewshot_k, max_length=max_length)
    doc = scores_to_json(name, scores, per_trace=per_trace)
    doc["precision"] = computed_in
    if baselines or accuracy:
        for bench, group in group_by_benchmark(traces).items():
            extra = baseline_scores(model, tokenizer, group, context=context, fewshot_k=fewshot_k,
                                    batch_size=batch_size, precision=precision, max_length=max_length,
                                    accuracy=accuracy, max_new_tokens=max_new_tokens)
            if not baselines:
                extra = {k: v for k, v in extra.items() if k in ("acc_greedy", "n_acc")}
            doc["benchmarks"][bench].update(extra)
    doc["seconds"] = {"load": round(t1 - t0, 3), "score": round(time.perf_counter() - t1, 3)}
    if use_cache and key is not None:
        cache.put(key, mfp, tfp, opts, doc, cache_file)
    return doc, False
