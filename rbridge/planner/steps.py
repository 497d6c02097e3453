"""A run's steps: prepare the plan's data, train a proxy to a rung, score it.

Like torchtitan's train.py, this module only wires components; each component
(data/, proxy/, scoring/) owns its own config and logic. It knows nothing of the
store: the worker loop (rbridge.planner.worker) records what these return.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from rbridge._failpoints import failpoint, raise_point
from rbridge.data import build_mixture, default_cache_dir, load_tokenizer, tokenize_source, train_tokenizer
from rbridge.data.tokenizer import check_tokenizer
from rbridge.data.tokens import check_dtype
from rbridge.errors import InputError
from rbridge.planner import stop
from rbridge.planner.schedule import rung_tokens
from rbridge.proxy import ProxyTrainer, param_counts, proxy_config, proxy_train_flops
from rbridge.proxy.peak import device_name, model_flops_per_token, peak_flops
from rbridge.reporting import SILENT, Reporter
from rbridge.scoring.config import METRICS
from rbridge.scoring.scorer import score_traces
from rbridge.spec import Spec, Stage


@dataclass
class PlanData:
    tokenizer: Any
    shards: dict  # source name -> SourceShards
    cache_dir: Path


def prepare_data(spec: Spec, report: Reporter = SILENT) -> PlanData:
    """Tokenizer and token shards of every source, from the cache when the inputs are unchanged.

    A source larger than ``sampling.above`` bytes is sampled (rbridge.data.sample): read and
    tokenized, on every core, only as far as the plan needs.
    """
    import dataclasses

    cache = spec.cache or default_cache_dir()
    sources = {}
    for name, s in spec.sources.items():
        src = s.config(name)
        # Token files are always read as samples (no tokenizing: a chunk is split and copied).
        if src.fmt == "tokens" or sum(f.stat().st_size for f in src.files()) > spec.sampling.above:
            src = dataclasses.replace(src, sampled=True)
        sources[name] = src
    needs = spec.source_needs()
    tokens = {name: src for name, src in sources.items() if src.fmt == "tokens"}
    t0 = time.perf_counter()
    if spec.tokenizer.path is not None:
        tok = load_tokenizer(spec.tokenizer.path)
        report.say(f"tokenizer: loaded {spec.tokenizer.path} (vocab {len(tok):,})")
    elif tokens:  # refused before any tokenizer is trained
        name = sorted(tokens)[0]
        check_tokenizer(name, tokens[name].tokenizer, None, None, spec.path)
    else:
        tok = train_tokenizer(sources, spec.tokenizer.train.vocab_size, cache,
                              heldout_fraction=spec.heldout_fraction)
        how = "reused from cache" if getattr(tok, "rbridge_cached", False) else "trained"
        report.say(f"tokenizer: byte-level BPE, vocab {len(tok):,}, {how} ({time.perf_counter() - t0:.1f} s)")
    for name, src in tokens.items():  # every token source checked before any is read
        check_tokenizer(name, src.tokenizer, tok, spec.tokenizer.path, spec.path)
        for tf in src.token_files():
            check_dtype(tf, len(tok), name)
    shards = {}
    for name, src in sources.items():
        t1 = time.perf_counter()
        if src.sampled:
            from rbridge.data.sample import sample_shards

            sh, read = sample_shards(src, tok, needs[name], Path(cache), heldout_fraction=spec.heldout_fraction,
                                     workers=spec.sampling.workers, report=report)
            how = (f"sampled {read.chunks} of {read.chunks_total} chunks, {read.bytes / 1e6:,.1f} of "
                   f"{read.bytes_total / 1e6:,.1f} MB; "
                   + ("reused cached shards" if sh.cached else f"{time.perf_counter() - t1:.1f} s"))
        else:
            sh = tokenize_source(src, tok, cache, heldout_fraction=spec.heldout_fraction)
            how = "read whole; " + ("reused cached shards" if sh.cached
                                    else f"tokenized in {time.perf_counter() - t1:.1f} s")
        shards[name] = sh
        report.say(f"  source {name}: {sh.n_train_tokens:,} train + {sh.n_heldout_tokens:,} held-out tokens ({how})")
    return PlanData(tok, shards, Path(cache))


def stage_config(stage: Stage, data: PlanData):
    tok = data.tokenizer
    eos = tok.eos_token_id
    return proxy_config(stage.proxy, vocab_size=len(tok), seq_len=stage.training.seq_len,
                        bos_token_id=tok.bos_token_id if tok.bos_token_id is not None else eos,
                        eos_token_id=eos, pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else eos,
                        field=f"stages[{stage.index}].proxy")


def check_proxies(stages: list[Stage], data: PlanData, spec_path: Path | None = None) -> None:
    """Build every stage's proxy on the meta device (no memory, no compute): a shape that LlamaConfig or
    the model refuses fails here, as an InputError naming the stage, before a plan touches its store."""
    from transformers import LlamaForCausalLM

    for stage in stages:
        cfg = stage_config(stage, data)
        try:
            with torch.device("meta"):
                LlamaForCausalLM(cfg)
        except Exception as exc:  # noqa: BLE001 - whatever the model refuses is an input error here
            raise InputError(f"the model refuses this shape: {type(exc).__name__}: {exc}", file=spec_path,
                             field=f"stages[{stage.index}].proxy") from None


def warn_cut_answers(stages: list[Stage], spec: Spec, data: PlanData, traces: dict, report: Reporter) -> None:
    """Say at the start which stages measure greedy accuracy with answers their context cuts
    (rbridge.scoring.task.cut_answers): such accuracy is lower than the model's, not an error."""
    from rbridge.scoring.task import answer_room, cut_answers

    room: dict[str, tuple[int, int]] = {}  # benchmark -> (longest prompt, answer budget): tokenized once
    told: set[tuple[str, str]] = set()     # a stage run once per seed is told once
    for stage in stages:
        if "accuracy" not in stage.evaluate:
            continue
        context = stage_config(stage, data).max_position_embeddings
        name = stage.group or stage.name
        for bench in spec.benchmarks:
            if bench.answer_checker != "number" or not traces[bench.name] or (name, bench.name) in told:
                continue
            if bench.name not in room:
                room[bench.name] = answer_room(data.tokenizer, traces[bench.name])
            why = cut_answers(*room[bench.name], context)
            if why:
                told.add((name, bench.name))
                report.say(f"[yellow]warning[/]: stage {name}, benchmark {bench.name}: {why}; "
                           f"set stages[{stage.index}].seq_len")


def run_epochs(stage: Stage, mix: dict[str, float], data: PlanData) -> dict[str, float]:
    """{source: times a run of ``stage`` on ``mix`` goes through the source's training tokens}."""
    from rbridge.data.mixture import planned_epochs

    return planned_epochs(mix, {n: sh.n_train_tokens for n, sh in data.shards.items()}, stage.training.tokens,
                          stage.training.seq_len)


def warn_repeated_sources(stages: list[Stage], spec: Spec, data: PlanData, report: Reporter) -> None:
    """Say at the start which sources a candidate would train on more than once (epochs > 1): repeated
    tokens are worth less than new ones (Muennighoff et al. 2023, "Scaling Data-Constrained Language
    Models"), so such a candidate is judged on less data than its mixture suggests. A later stage's
    candidates are not known yet: every candidate that could reach it is counted."""
    from rbridge.mixtures.search import all_candidates

    every = all_candidates(spec, data)
    worst: dict[str, tuple[float, str, list[str]]] = {}  # source -> (epochs, stage, candidates at that)
    for stage in stages:
        names = stage.candidates or [c.name for c in every]
        mixes = {c.name: c.mix for c in every}
        for name in names:
            for src, epochs in run_epochs(stage, dict(mixes[name]), data).items():
                if epochs <= 1.0:
                    continue
                best = worst.get(src)
                if best is None or epochs > best[0] + 1e-9:
                    worst[src] = (epochs, stage.group or stage.name, [name])
                elif abs(epochs - best[0]) <= 1e-9 and name not in best[2] and best[1] == (stage.group or stage.name):
                    best[2].append(name)
    for src, (epochs, stage_name, names) in sorted(worst.items()):
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        report.say(f"[yellow]warning[/]: source {src} has {data.shards[src].n_train_tokens:,} training tokens; "
                   f"stage {stage_name} trains on it {epochs:.1f} times ({shown}): repeated tokens teach less than "
                   "new ones, so more data in the source, or fewer tokens in the stage, judges the mixture fairly "
                   "(`rbridge status` lists the repeats)")


def describe_proxy(stage: Stage, data: PlanData) -> dict[str, Any]:
    """The run's stored config: the LlamaConfig plus training settings, and parameter counts."""
    cfg = stage_config(stage, data)
    total, non_emb = param_counts(cfg)
    return {"config": {"llama": cfg.to_diff_dict(), "train": stage.run_settings()}, "params": total,
            "non_embedding_params": non_emb}


@dataclass
class RunContext:
    spec: Spec
    stage: Stage
    candidate: str
    mix: dict[str, float]
    data: PlanData
    traces: dict    # benchmark name -> list[Trace]
    checkpoint_dir: Path
    seed: int       # data order: from the spec seed, the stage and the candidate name
    model_seed: int  # initial weights: the same for every candidate of a stage
    run_key: str = ""  # the run's fingerprint: checkpoints in the folder written by another run are set aside
    precision: str = ""  # what the run trains in (the worker's: its stage's first run fixed it); "": the stage's


@dataclass
class Trained:
    model: Any
    tokens_seen: int
    wall_s: float
    tokens_per_s: float
    train_flops: float
    mfu: float = 0.0      # model FLOPs per second of training over the device's peak (rbridge.proxy.peak)
    device: str = ""
    precision: str = "fp32"  # what the trainer computed in: the run is scored in it too (score_run)


EXPORT_DIR = "model"  # <run folder>/model: the proxy as a Hugging Face folder, after every rung


def export_model(model, tokenizer, folder: Path) -> Path:
    """Write the trained proxy as a Hugging Face folder (config.json with architecture LlamaForCausalLM,
    model.safetensors, the tokenizer), replacing the previous rung's, so that any tool loads it:
    ``rbridge score --model <run folder>``, ``AutoModelForCausalLM.from_pretrained``, lm-eval. Written
    beside and renamed over the old one: a crash leaves the old folder or the new one, never half."""
    import json
    import shutil

    from transformers.utils import logging as hf_logging

    tmp = folder.with_name(folder.name + ".tmp")
    old = folder.with_name(folder.name + ".old")
    for stale in (tmp, old):
        if stale.exists():
            shutil.rmtree(stale)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Writing model shards" bar in the plan's output
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    # The fused-loss subclass is a training detail: the folder is a plain Llama to every other tool.
    config = tmp / "config.json"
    fields = json.loads(config.read_text())
    fields["architectures"] = ["LlamaForCausalLM"]
    config.write_text(json.dumps(fields, indent=2, sort_keys=True) + "\n")
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    if old.exists():
        shutil.rmtree(old)
    return folder


_SLOW_STEP_S = float(os.environ.get("RBRIDGE_SLOW_STEP_S") or 0)


def train_run(ctx: RunContext, tokens: int, report: Reporter = SILENT,
              check: Callable[[], None] | None = None) -> Trained:
    """Resume the run from its last checkpoint, train it to ``tokens``, checkpoint it.

    ``check()`` runs after every step and may raise to stop (a worker whose claim
    was taken over stops training instead of racing the new holder's checkpoints).
    """
    stage, train = ctx.stage, ctx.stage.training
    raise_point("train", f"{stage.name}/{ctx.candidate}")
    cfg = stage_config(stage, ctx.data)
    rows, _stats = build_mixture(ctx.mix, ctx.data.shards, n_tokens=train.tokens, seq_len=train.seq_len,
                                 seed=ctx.seed, cache_dir=ctx.data.cache_dir, where=f"candidates.{ctx.candidate}.mix")
    # micro_batch_size is passed only when the spec sets it, so plans without it train exactly as before.
    micro = {"micro_batch_size": train.micro_batch_size} if train.micro_batch_size is not None else {}
    trainer = ProxyTrainer(cfg, rows, total_tokens=train.tokens, batch_size=train.batch_size, lr=train.lr,
                           warmup_frac=train.warmup, seed=ctx.model_seed, precision=ctx.precision or train.precision,
                           checkpoint_dir=ctx.checkpoint_dir,
                           save_every_s=ctx.spec.checkpoint_minutes * 60 if ctx.spec.checkpoint_minutes else None,
                           run_key=ctx.run_key or None, keep_checkpoints=ctx.spec.keep_checkpoints, **micro)
    for was, now, why in trainer.set_aside:
        report.say(f"  {stage.name}/{ctx.candidate}: checkpoint {was.name} set aside ({why}) as "
                   f"{now.name}, resuming from " + (f"step {trainer.step}" if trainer.step else "the start"))
    if trainer.step and trainer.tokens_seen < tokens and trainer.tokens_seen not in rung_tokens(stage):
        # a checkpoint between rungs: a stopped, preempted or requeued worker's, or checkpoint_minutes'
        report.say(f"  {stage.name}/{ctx.candidate}: resuming from its checkpoint at step {trainer.step} "
                   f"({trainer.tokens_seen:,} tokens)")
    if trainer.step == 0 and (ctx.checkpoint_dir / EXPORT_DIR / "config.json").is_file():
        report.say(f"  {stage.name}/{ctx.candidate}: trained before, but its training checkpoints were removed "
                   "when it finished (finished_runs: model; rbridge clean): it trains again from the start, "
                   "with the same result")
    if trainer.tokens_seen < tokens:
        # Live bars only where the reporter draws them; logs get the one line per rung the worker reports.
        with report.progress(f"  train {stage.name}/{ctx.candidate}", total=tokens,
                             completed=trainer.tokens_seen) as bar:
            def on_step(seen: int, loss: float) -> None:
                bar.update(seen)
                failpoint("train-step")
                if _SLOW_STEP_S:  # test hook (tests/test_resume.py): time for a signal to land mid-training
                    time.sleep(_SLOW_STEP_S)
                stop.check()
                if check is not None:
                    check()

            try:
                trainer.train_to(tokens, on_step=on_step)
            except stop.Stopped:
                trainer.save_checkpoint()  # the steps trained so far are kept
                raise
        trainer.save_checkpoint()
    flops = proxy_train_flops(cfg, trainer.tokens_seen)["non_embedding"]
    model = trainer.model
    model.eval()
    if trainer.accelerator.is_main_process:
        export_model(model, ctx.data.tokenizer, ctx.checkpoint_dir / EXPORT_DIR)
    device = trainer.accelerator.device
    peak = peak_flops(device, trainer.precision, torch.get_num_threads())
    mfu = model_flops_per_token(cfg, train.seq_len) * trainer.tokens_per_s / peak if peak > 0 else 0.0
    return Trained(model, trainer.tokens_seen, trainer.wall_time_s, trainer.tokens_per_s, flops, mfu,
                   device_name(device), "bf16" if trainer.precision == "bf16" else "fp32")  # fp16 training: fp32


@dataclass
class Scored:
    """A run's evaluation at one rung: {benchmark: {metric: value}}, the scoring FLOPs, each value's 95%
    bootstrap interval over the benchmark's traces, and the per-trace values (None where a trace has none)."""

    scores: dict[str, dict[str, float]]
    flops: float
    intervals: dict[str, dict[str, tuple[float, float]]]
    items: dict[str, dict[str, list[float | None]]]


def score_run(ctx: RunContext, model, non_embedding_params: int, report: Reporter = SILENT,
              precision: str = "fp32") -> Scored:
    """Score the model on every benchmark: every metric of scoring.config.METRICS, then the stage's task
    metrics (``Stage.evaluate``: accuracy, label_nll; rbridge.scoring.task).

    ``precision``: the one the run trained in (``Trained.precision``), not the scorer's ``auto``, which
    follows the machine's bf16 units: a stage served by several machines must score alike."""
    from rbridge.scoring.task import accuracy_items, item_interval, item_mean, label_nll_items

    out: dict[str, dict[str, float]] = {}
    intervals: dict[str, dict[str, tuple[float, float]]] = {}
    items: dict[str, dict[str, list[float | None]]] = {}
    n_tokens = 0
    tok = ctx.data.tokenizer
    for bench in ctx.spec.benchmarks:
        traces = ctx.traces[bench.name]
        with report.progress(f"  score {ctx.stage.name}/{ctx.candidate} on {bench.name}", total=len(traces)) as bar:
            res = score_traces(model, tok, traces, **bench.score_options(), precision=precision,
                               on_progress=lambda done, total: bar.update(done, total))
        out[bench.name] = {m: getattr(res, m) for m in METRICS}
        intervals[bench.name] = {m: ci for m in METRICS if (ci := res.interval(m)) is not None}
        items[bench.name] = {m: [getattr(t, m) for t in res.traces] for m in METRICS}
        n_tokens += res.n_tokens
        for metric in ctx.stage.evaluate:
            if metric == "accuracy":
                with report.progress(f"  accuracy {ctx.stage.name}/{ctx.candidate} on {bench.name}", total=None):
                    per = accuracy_items(model, tok, traces, checker=bench.answer_checker, precision=precision)
            else:
                per = label_nll_items(model, tok, traces, context=bench.context, precision=precision)
            value = item_mean(per)
            if value is None:
                continue  # no trace has a label (or choices): nothing to record
            out[bench.name][metric] = value
            items[bench.name][metric] = per
            if (ci := item_interval(per)) is not None:
                intervals[bench.name][metric] = ci
    # 2·N·D forward FLOPs, N non-embedding like the training figure (Kaplan's convention).
    return Scored(out, 2.0 * non_embedding_params * n_tokens, intervals, items)
