"""The planner's wiring of data, proxy and scoring: one place that knows all three.

Like torchtitan's train.py, this module only wires components; each component
(data/, proxy/, scoring/) owns its own config and logic.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rbridge._failpoints import failpoint
from rbridge.data import (SourceConfig, build_mixture, default_cache_dir, load_tokenizer, tokenize_source,
                          train_tokenizer)
from rbridge.proxy import ProxyTrainer, param_counts, proxy_config, proxy_train_flops
from rbridge.scoring.scorer import score_traces
from rbridge.spec import Spec, StageSpec


@dataclass
class PlanData:
    tokenizer: Any
    shards: dict  # source name -> SourceShards
    cache_dir: Path


def prepare_data(spec: Spec, console) -> PlanData:
    """Tokenizer and token shards of every source, from the cache when the inputs are unchanged."""
    cache = spec.cache or default_cache_dir()
    sources = {name: SourceConfig(name, path=s.path, field=s.field, glob=s.glob)
               for name, s in spec.sources.items()}
    t0 = time.perf_counter()
    if spec.tokenizer.path is not None:
        tok = load_tokenizer(spec.tokenizer.path)
        console.print(f"tokenizer: loaded {spec.tokenizer.path} (vocab {len(tok):,})")
    else:
        tok = train_tokenizer(sources, spec.tokenizer.train.vocab_size, cache,
                              heldout_fraction=spec.heldout_fraction)
        how = "reused from cache" if getattr(tok, "rbridge_cached", False) else "trained"
        console.print(f"tokenizer: byte-level BPE, vocab {len(tok):,}, {how} "
                      f"({time.perf_counter() - t0:.1f} s)")
    shards = {}
    for name, src in sources.items():
        t1 = time.perf_counter()
        sh = tokenize_source(src, tok, cache, heldout_fraction=spec.heldout_fraction)
        shards[name] = sh
        how = "reused cached shards" if sh.cached else f"tokenized in {time.perf_counter() - t1:.1f} s"
        console.print(f"  source {name}: {sh.n_train_tokens:,} train + {sh.n_heldout_tokens:,} held-out tokens "
                      f"({how})")
    return PlanData(tok, shards, Path(cache))


def _config(stage: StageSpec, data: PlanData, index: int):
    tok = data.tokenizer
    eos = tok.eos_token_id
    return proxy_config(stage.proxy, vocab_size=len(tok), seq_len=stage.seq_len,
                        bos_token_id=tok.bos_token_id if tok.bos_token_id is not None else eos,
                        eos_token_id=eos, pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else eos,
                        field=f"stages[{index}].proxy")


def describe_proxy(stage: StageSpec, data: PlanData, index: int = 0) -> dict[str, Any]:
    """The run's stored config: the LlamaConfig plus training settings, and parameter counts."""
    cfg = _config(stage, data, index)
    total, non_emb = param_counts(cfg)
    settings = {k: getattr(stage, k) for k in ("tokens", "seq_len", "batch_size", "lr", "warmup", "evals",
                                               "precision")}
    return {"config": {"llama": cfg.to_diff_dict(), "train": settings}, "params": total,
            "non_embedding_params": non_emb}


_DEFAULT_THREADS = torch.get_num_threads()
# Below this many non-embedding parameters a CPU proxy trains fastest on one thread:
# its matmuls are too small to amortise the threads' synchronisation. Measured on a
# 2-core machine (benchmarks/proxy_throughput.py): 0.5M preset 5.9k tok/s on 1 thread
# vs 3.4k on 2; 2M preset 2.9k vs 0.7k.
SMALL_PROXY_PARAMS = 10_000_000


def cpu_threads(non_embedding_params: int, requested: int | None = None) -> int:
    """Set and return torch's CPU thread count for a stage's proxies.

    ``requested`` (the CLI's --threads) wins; otherwise one thread for small
    proxies on a CPU-only machine, else torch's default. Fixed per stage, so a
    resumed stage computes with the same thread count.
    """
    if requested:
        n = requested
    elif not torch.cuda.is_available() and non_embedding_params < SMALL_PROXY_PARAMS:
        n = 1
    else:
        n = _DEFAULT_THREADS
    torch.set_num_threads(n)
    return n


@dataclass
class RunContext:
    spec: Spec
    stage: StageSpec
    stage_index: int
    candidate: Any  # store Candidate row
    run: Any        # store Run row
    data: PlanData
    traces: dict    # benchmark name -> list[Trace]
    checkpoint_dir: Path
    seed: int       # data order: from the spec seed, the stage and the candidate name
    model_seed: int  # initial weights: the same for every candidate of a stage


@dataclass
class Trained:
    model: Any
    tokens_seen: int
    wall_s: float
    tokens_per_s: float
    train_flops: float


def train_run(ctx: RunContext, tokens: int, console, check=None) -> Trained:
    """Resume the run from its last checkpoint, train it to ``tokens``, checkpoint it.

    ``check()`` runs after every step and may raise to stop (a worker whose claim
    was taken over stops training instead of racing the new holder's checkpoints).
    """
    from rbridge.planner.plan import make_progress

    stage = ctx.stage
    cfg = _config(stage, ctx.data, ctx.stage_index)
    mix = json.loads(ctx.candidate.mix)
    rows, _stats = build_mixture(mix, ctx.data.shards, n_tokens=stage.tokens, seq_len=stage.seq_len,
                                 seed=ctx.seed, cache_dir=ctx.data.cache_dir,
                                 where=f"candidates.{ctx.candidate.name}.mix")
    trainer = ProxyTrainer(cfg, rows, total_tokens=stage.tokens, batch_size=stage.batch_size, lr=stage.lr,
                           warmup_frac=stage.warmup, seed=ctx.model_seed, precision=stage.precision,
                           checkpoint_dir=ctx.checkpoint_dir,
                           save_every_s=ctx.spec.checkpoint_minutes * 60 if ctx.spec.checkpoint_minutes else None)
    if trainer.tokens_seen < tokens:
        # Live bars only on a terminal; logs and pipes get the one line per rung the planner prints.
        progress = make_progress(console) if getattr(console, "is_terminal", False) else None
        def tick() -> None:
            failpoint("train-step")
            if check is not None:
                check()

        if progress is None:
            trainer.train_to(tokens, on_step=lambda seen, loss: tick())
        else:
            with progress:
                task = progress.add_task(f"  train {stage.name}/{ctx.candidate.name}",
                                         total=tokens, completed=trainer.tokens_seen)

                def on_step(seen: int, loss: float) -> None:
                    progress.update(task, completed=seen)
                    tick()

                trainer.train_to(tokens, on_step=on_step)
        trainer.save_checkpoint()
    flops = proxy_train_flops(cfg, trainer.tokens_seen)["non_embedding"]
    model = trainer.model
    model.eval()
    return Trained(model, trainer.tokens_seen, trainer.wall_time_s, trainer.tokens_per_s, flops)


def score_run(ctx: RunContext, model, console=None) -> tuple[dict[str, dict[str, float]], float]:
    """Score the proxy on every benchmark: rBridge and its baselines; plus the scoring FLOPs."""
    from rbridge.planner.plan import make_progress

    out: dict[str, dict[str, float]] = {}
    n_tokens = 0
    live = getattr(console, "is_terminal", False)
    for bench in ctx.spec.benchmarks:
        opts = dict(context=bench.context, minmax=bench.minmax, aggregate=bench.aggregate)
        if live:
            with make_progress(console) as progress:
                task = progress.add_task(f"  score {ctx.stage.name}/{ctx.candidate.name} on {bench.name}",
                                         total=len(ctx.traces[bench.name]))
                res = score_traces(model, ctx.data.tokenizer, ctx.traces[bench.name], **opts,
                                   on_progress=lambda done, total: progress.update(task, completed=done,
                                                                                   total=total))
        else:
            res = score_traces(model, ctx.data.tokenizer, ctx.traces[bench.name], **opts)
        out[bench.name] = {m: getattr(res, m) for m in ("rbridge", "nll", "rbridge_no_minmax", "bpb")}
        n_tokens += res.n_tokens
    # 2·N·D forward FLOPs, N non-embedding like the training figure (Kaplan's convention).
    return out, 2.0 * ctx.run.non_embedding_params * n_tokens
