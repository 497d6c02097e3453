"""Training tokens per wall second: a whole `rbridge plan` against a plain PyTorch loop, in one run.

    python benchmarks/plan_throughput.py [--preset 0.5M] [--tokens 393216] [--candidates 4] [--repeats 1]
        [--precision auto|fp32|bf16]

The plan: one stage of ``--candidates`` candidates (mixtures of the repository's
sources), ``--preset`` proxies, ``--tokens`` training tokens each, one rung, run as
``rbridge plan`` in a new process with its defaults (every core: local worker
processes), data already cached. Its wall time covers everything a user waits for:
start-up, loading, training, checkpoints, scoring, the store.

The baseline: a plain PyTorch loop (LlamaForCausalLM, AdamW, the same rows the plan
trains on, the same batch size and sequence length) training the same models one
after another in this process at its best: each precision (below) at 1 thread and at
every core is timed on 8 steps of the first model (after 2 warm-up steps), and the
fastest trains all of them. Its time counts training steps only: no start-up, no loading,
no scoring, no checkpoints. The loop is probed in fp32 and, where the plan trains in
bf16 (``precision: auto`` where bf16 measured clearly faster, rbridge.proxy.precision,
or ``--precision bf16``), also under bf16 autocast: the baseline is the fastest of
every precision and thread count probed. A plan in fp32 (``--precision fp32``) stands
for a CPU without fast bf16, whose best plain loop is fp32.

The default budget, 393,216 tokens per candidate (4x the default plan's filter
stage, 1,536 steps of 8 x 256 tokens in all), keeps start-up and scoring a minor
part of the plan's wall time, as in real use; ``--tokens 98304`` shows the default
plan's own scale, where they are not.

The ratio is (plan training tokens / plan wall seconds) / (baseline tokens /
baseline seconds); the median of ``--repeats`` runs of both is printed.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MIXES = ["{austen: 1.0}", "{kjv: 1.0}", "{austen: 0.8, cot: 0.2}", "{pydocs: 0.5, cot: 0.5}", "{sotu: 1.0}",
         "{spam: 1.0}", "{code: 1.0}", "{shakespeare: 1.0}"]


def spec_text(preset: str, tokens: int, n: int, precision: str = "auto") -> str:
    sources = "".join(f"  {s}: {{path: {REPO}/specs/data/{f}}}\n" for s, f in [
        ("austen", "austen.txt.gz"), ("kjv", "kjv.txt.gz"), ("sotu", "sotu.jsonl.gz"), ("pydocs", "pydocs.jsonl.gz"),
        ("spam", "spam.jsonl.gz"), ("code", "code.jsonl.gz"), ("shakespeare", "shakespeare.jsonl.gz"),
        ("cot", "cot.jsonl.gz")])
    cands = "".join(f"  - {{name: c{i}, mix: {MIXES[i % len(MIXES)]}}}\n" for i in range(n))
    return (f"name: bench\ntokenizer: {{train: {{vocab_size: 4096}}}}\nsources:\n{sources}candidates:\n{cands}"
            f"benchmarks:\n  - {{name: gsm8k, traces: {REPO}/specs/traces/gsm8k.jsonl}}\n"
            f"stages:\n  - {{name: s, proxy: {{preset: {preset}}}, tokens: {tokens}, seq_len: 256, batch_size: 8, "
            f"evals: 1, keep: {n}, precision: {precision}}}\n")


def plain_loop(spec_path: Path, threads: int, precision: str = "fp32", max_steps: int | None = None,
               candidates: int | None = None, warmup: int = 0) -> tuple[float, int]:
    """Train every candidate's proxy one after another with a plain loop; (training seconds, tokens).
    ``precision``: fp32, or bf16 autocast (fp32 weights). ``max_steps``/``candidates``/``warmup``: the
    thread-count probe (a few timed steps of the first model)."""
    import contextlib

    import torch
    from transformers import LlamaForCausalLM

    from rbridge.planner.steps import prepare_data, stage_config
    from rbridge.spec import load_spec
    from rbridge.data import build_mixture

    torch.set_num_threads(threads)
    spec = load_spec(spec_path)
    data = prepare_data(spec)
    stage = spec.resolved_stages()[0]
    tr = stage.training
    seconds, tokens = 0.0, 0
    cast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext
    for cand in spec.candidates[:candidates]:
        rows, _ = build_mixture(cand.mix, data.shards, n_tokens=tr.tokens, seq_len=tr.seq_len, seed=0,
                                cache_dir=data.cache_dir)
        torch.manual_seed(0)
        model = LlamaForCausalLM(stage_config(stage, data))
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=tr.lr, weight_decay=0.1, betas=(0.9, 0.95))
        batches = torch.from_numpy(rows.astype("int64"))
        starts = list(range(0, len(batches) - tr.batch_size + 1, tr.batch_size))
        for start in starts[:warmup]:
            x = batches[start:start + tr.batch_size]
            with cast():
                loss = model(input_ids=x, labels=x).loss
            loss.backward()
            opt.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        for start in starts[:max_steps]:
            x = batches[start:start + tr.batch_size]
            with cast():
                loss = model(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            tokens += x.numel()
        seconds += time.perf_counter() - t0
        assert loss.item() == loss.item()  # finite: the loop really trained
    return seconds, tokens


def run_plan(spec_path: Path, cwd: Path, cache: Path) -> tuple[float, list[str]]:
    """(wall seconds, the precisions its runs trained in) of one `rbridge plan` in a new process."""
    store = cwd / f"stores/run-{time.time_ns()}.db"
    env = dict(os.environ, RBRIDGE_CACHE=str(cache))
    env.pop("RBRIDGE_WORKERS", None)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "rbridge.cli", "plan", str(spec_path), "--store", str(store)], cwd=cwd,
                   env=env, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    with sqlite3.connect(store) as con:
        precisions = sorted(p for (p,) in con.execute("SELECT DISTINCT precision FROM runs"))
    return wall, precisions


def best_plain(spec: Path, precisions: list[str], cores: int) -> tuple[tuple[str, int], dict, float, int]:
    """The probe (8 timed steps of the first model after 2 warm-up steps, at every precision of
    ``precisions`` and at 1 thread and every core), then every candidate with the fastest:
    ((precision, threads), probe, seconds, tokens)."""
    probe = {(p, t): plain_loop(spec, t, p, max_steps=8, candidates=1, warmup=2)
             for p in precisions for t in sorted({1, cores})}
    best = min(probe, key=lambda k: probe[k][0] / probe[k][1])
    return (best, probe, *plain_loop(spec, best[1], best[0]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="0.5M")
    ap.add_argument("--tokens", type=int, default=393_216)
    ap.add_argument("--candidates", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                    help="the plan's stage precision (default auto: what fp32 against bf16 measures here)")
    args = ap.parse_args()
    from _machine import print_machine

    print_machine()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        spec = root / "bench.yaml"
        spec.write_text(spec_text(args.preset, args.tokens, args.candidates, args.precision))
        cache = root / "cache"
        os.environ["RBRIDGE_CACHE"] = str(cache)
        from rbridge.planner.steps import prepare_data
        from rbridge.spec import load_spec

        prepare_data(load_spec(spec))  # the data is cached for both sides
        cores = os.cpu_count() or 1
        print(f"{args.candidates} candidates x {args.tokens:,} tokens, preset {args.preset}, {cores} cores; "
              f"load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
        ratios: list[float] = []
        for rep in range(args.repeats):
            plan_s, precisions = run_plan(spec, root, cache)
            plan_tps = args.candidates * args.tokens / plan_s
            print(f"repeat {rep + 1}: rbridge plan {plan_s:6.1f} s wall = {plan_tps:9,.0f} tokens/s "
                  f"(trained in {'/'.join(precisions)})", flush=True)
            # A plan in fp32 stands for a CPU without fast bf16, whose best plain loop is fp32 too;
            # a plan in bf16 meets the plain loop at its best of fp32 and bf16 autocast.
            allowed = ["fp32"] + (["bf16"] if "bf16" in precisions else [])
            (best_p, best_t), probe, plain_s, plain_tokens = best_plain(spec, allowed, cores)
            plain_tps = plain_tokens / plain_s
            ratios.append(plan_tps / plain_tps)
            print("  plain loop probe: " + ", ".join(f"{p} {t} thread(s) {n / s:,.0f} tokens/s"
                                                     for (p, t), (s, n) in probe.items())
                  + f" -> {best_p}, {best_t} thread(s): {plain_s:6.1f} s = {plain_tps:9,.0f} tokens/s; ratio "
                  f"{ratios[-1]:.2f}x", flush=True)
        print(f"median ratio rbridge plan / best plain loop: {statistics.median(ratios):.2f}x "
              f"(of {len(ratios)}: {', '.join(f'{r:.2f}x' for r in ratios)})")
        print(f"load average at the end {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
