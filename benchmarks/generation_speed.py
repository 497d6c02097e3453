"""Generation speed (issue 24): a target stage's accuracy measurement against plain ``model.generate``.

    python benchmarks/generation_speed.py [--limit 200] [--preset 2M] [--seq-len 256] [--batch-size 32]
                                          [--no-cache-prompts 16] [--threads N] [--repeats 3]

A freshly built proxy of ``--preset`` (random weights, float32: the speed does not depend on them; a
greedy random model rarely stops early, so every prompt takes its whole budget, the worst case) with
a byte-level BPE of 4,096 tokens trained by rbridge on the repository's Austen and chain-of-thought
corpora (specs/data), and ``max_position_embeddings`` = ``--seq-len`` (a stage's default 256), as a
plan builds its target. Saved with ``use_cache: false``, as every proxy is. Timed, on the first
``--limit`` GSM8K traces (specs/traces/gsm8k.jsonl):

- rbridge: ``rbridge.scoring.task.accuracy_items(checker="number")``, what a target stage runs
  (prompt ``[BOS] + question + "\\n"``, budget ``answer_budget``, greedy, batches of ``--batch-size``
  sorted by length, left-padded; rbridge.scoring.decoding with the key/value cache);
- model.generate: the same prompts, batches and per-batch budgets (the budget cut to the context as
  rbridge cuts it, so both generate the same tokens) through ``model.generate(..., use_cache=True,
  do_sample=False)`` and decoded, nothing else;
- on the first ``--no-cache-prompts`` prompts (one batch): rbridge against ``model.generate`` with
  ``use_cache=False``, the loop rbridge ran before issue 24 (the proxy's config switched the cache off).

Median of ``--repeats`` after one warm-up call each, the timed calls interleaved (other load on a
shared machine falls on all alike); ratios are against ``model.generate`` with the cache, timed in the
same process. The last line checks that rbridge's greedy ids equal ``model.generate``'s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from rbridge.data.sources import SourceConfig
from rbridge.data.tokenizer import train_tokenizer
from rbridge.proxy import proxy_config
from rbridge.scoring import decoding
from rbridge.scoring.scorer import context_text, start_token_id, text_ids
from rbridge.scoring.task import accuracy_items, answer_budget
from rbridge.scoring.traces import load_traces

ROOT = Path(__file__).resolve().parent.parent


def build(preset: str, seq_len: int, cache_dir: str):
    srcs = [SourceConfig(name=n, path=ROOT / "specs" / "data" / f) for n, f in
            (("austen", "austen.txt.gz"), ("cot", "cot.jsonl.gz"))]
    tok = train_tokenizer(srcs, 4096, cache_dir=cache_dir, max_chars_per_source=1_000_000)
    eos = tok.eos_token_id
    cfg = proxy_config({"preset": preset}, len(tok), seq_len, bos_token_id=tok.bos_token_id or eos,
                       eos_token_id=eos, pad_token_id=tok.pad_token_id or eos)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    with tempfile.TemporaryDirectory() as d:   # saved and loaded as a plan's target is
        model.save_pretrained(d)
        model = LlamaForCausalLM.from_pretrained(d).eval()
    return model, tok


def batches(prompts, batch_size):
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    return [order[b:b + batch_size] for b in range(0, len(order), batch_size)]


def plain_generate(model, prompts, batch_size, budget, pad, eos, use_cache):
    """model.generate over rbridge's batches (same order, left padding, per-batch budgets)."""
    groups = batches(prompts, batch_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", decoding.ContextWarning)
        allowed = decoding.budgets(model, [len(prompts[g[0]]) for g in groups], budget)
    out = [None] * len(prompts)
    for idx, n in zip(groups, allowed):
        width = len(prompts[idx[0]])
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, i in enumerate(idx):
            ids[j, width - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[j, width - len(prompts[i]):] = 1
        with torch.inference_mode():
            seq = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                                 use_cache=use_cache, pad_token_id=pad, eos_token_id=eos)
        for j, i in enumerate(idx):
            out[i] = seq[j, width:].tolist()
    return out


def timed(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each function: one warm-up call each, then ``repeats`` rounds calling each in
    turn (interleaved, so that other load on a shared machine falls on all alike)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--traces", default=str(ROOT / "specs/traces/gsm8k.jsonl"))
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--preset", default="2M")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32, help="accuracy_items' default")
    ap.add_argument("--no-cache-prompts", type=int, default=16, help="0: skip the uncached comparison")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _machine import print_machine

    print_machine(args.threads)
    with tempfile.TemporaryDirectory() as cache:
        model, tok = build(args.preset, args.seq_len, cache)
    traces = load_traces(args.traces)[:args.limit]
    bos = start_token_id(tok)
    pad = int(tok.pad_token_id if tok.pad_token_id is not None else bos)
    prompts = [[bos] + text_ids(tok, context_text(t, "question", traces)) for t in traces]
    budget = answer_budget(tok, traces)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"proxy {args.preset} ({n_params / 1e6:.2f}M params, fp32, vocab {len(tok)}, "
          f"max_position_embeddings {model.config.max_position_embeddings}, config use_cache "
          f"{model.config.use_cache}, generation_config use_cache {model.generation_config.use_cache}); "
          f"{len(traces)} GSM8K questions, prompts {min(map(len, prompts))}-{max(map(len, prompts))} tokens, "
          f"answer budget {budget}, batch {args.batch_size}, {torch.get_num_threads()} threads", flush=True)
    with warnings.catch_warnings(record=True) as w:   # shows the context rule's message once
        warnings.simplefilter("always", decoding.ContextWarning)
        accuracy_items(model, tok, traces, checker="number", batch_size=args.batch_size)
    for x in w:
        if issubclass(x.category, decoding.ContextWarning):
            print(f"rbridge: {x.message}")

    eos = tok.eos_token_id
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", decoding.ContextWarning)
        t = timed({"rbridge": lambda: accuracy_items(model, tok, traces, checker="number",
                                                     batch_size=args.batch_size),
                   "hf": lambda: plain_generate(model, prompts, args.batch_size, budget, pad, eos, True)},
                  args.repeats)
        t_rb, t_hf = t["rbridge"], t["hf"]
        rb_ids = [g.ids for g in decoding.generate(model, prompts, max_new_tokens=budget, stop=[eos], pad_id=pad,
                                                   batch_size=args.batch_size)]
        hf_ids = plain_generate(model, prompts, args.batch_size, budget, pad, eos, True)
        new = sum(len(x) for x in rb_ids)
        print(f"{'':<44}{'seconds':>9}{'new tok/s':>11}  vs model.generate(use_cache=True)")
        print(f"{'rbridge accuracy_items (number)':<44}{t_rb:9.2f}{new / t_rb:11.0f}  {t_hf / t_rb:5.2f}x")
        print(f"{'model.generate(use_cache=True)':<44}{t_hf:9.2f}{new / t_hf:11.0f}  {1.0:5.2f}x")
        if args.no_cache_prompts:
            sub = prompts[:args.no_cache_prompts]
            t = timed({"rbridge": lambda: decoding.generate(model, sub, max_new_tokens=budget, stop=[eos],
                                                            pad_id=pad, batch_size=args.batch_size),
                       "cache": lambda: plain_generate(model, sub, args.batch_size, budget, pad, eos, True),
                       "no cache": lambda: plain_generate(model, sub, args.batch_size, budget, pad, eos, False)},
                      args.repeats)
            print(f"first {len(sub)} prompts, one batch:")
            print(f"  {'rbridge decoding.generate':<42}{t['rbridge']:9.2f}{'':11}  {t['cache'] / t['rbridge']:5.2f}x")
            print(f"  {'model.generate(use_cache=True)':<42}{t['cache']:9.2f}{'':11}  {1.0:5.2f}x")
            print(f"  {'model.generate(use_cache=False)':<42}{t['no cache']:9.2f}{'':11}  "
                  f"{t['cache'] / t['no cache']:5.2f}x (uncached takes {t['no cache'] / t['rbridge']:.1f}x "
                  f"rbridge's time)")
    same = sum(a == b[:len(a)] and (len(a) == len(b) or b[len(a)] == eos) for a, b in zip(rb_ids, hf_ids))
    print(f"greedy ids equal to model.generate's: {same} of {len(prompts)} prompts; {new} new tokens in all; "
          f"load average now {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
