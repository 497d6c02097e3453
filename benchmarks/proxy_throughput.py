"""Training throughput of proxy presets: rbridge's trainer against the alternatives it chose between.

    python benchmarks/proxy_throughput.py [--presets 0.5M 2M 8M] [--threads 1 2] [--precisions fp32 bf16]
        [--variants rbridge hf-loss foreach-adamw fused-adamw compile] [--seconds 3] [--steps 3]

Each (preset, threads, precision, variant) runs ProxyTrainer steps (forward,
backward, clipping, AdamW) on random tokens at vocab 4096, seq_len 256, batch 8:
one warm-up step (its time is printed: it holds torch.compile's compilation),
then steps until ``--seconds`` have passed and at least ``--steps`` were taken.
Variants, each the trainer as rbridge runs it with one thing changed:

- ``rbridge``: the trainer as it is (fused chunked loss, rbridge.proxy.model; fused AdamW);
- ``hf-loss``: LlamaForCausalLM's own loss (full logits, log-softmax);
- ``hf-decoder``: transformers' decoder forward instead of rbridge.proxy.fused's (same fused loss);
- ``hf-eager``: ``hf-decoder`` with transformers' "eager" attention instead of "sdpa";
- ``foreach-adamw`` / ``fused-adamw``: AdamW's multi-tensor or fused kernel
  (rbridge uses the fused one where torch has it for the device; so
  ``fused-adamw`` equals ``rbridge`` there);
- ``loop-adamw``: AdamW's plain for-loop over tensors (torch's default on CPUs);
- ``compile``: the model wrapped in ``torch.compile`` (inductor);
- ``plain``: no rbridge at all, the loop a user would write (LlamaForCausalLM and its loss,
  AdamW's defaults, bf16 autocast in bf16, no clipping or schedule).

``--precisions auto fp32 bf16 --variants rbridge plain`` also prints, per preset and threads,
rbridge at ``auto`` (which measures fp32 against bf16, rbridge.proxy.precision) against the
faster of the plain loop's fp32 and bf16.

``--repeats N`` runs the whole grid N times, one round after another (so the machine's slow and
fast minutes fall on every variant alike), and ends with each figure's median over the rounds: per
preset, threads and precision, rbridge's tokens/s and its ratio to the plain loop's (each round's
ratio, then their median), and rbridge at ``auto`` against the faster plain loop.

Ratios are against the ``rbridge`` variant at the same preset, threads and
precision, measured in the same process. MFU is model FLOPs (PaLM's 6N + 12LdT,
rbridge.proxy.peak) per second over the device's peak (data sheet on NVIDIA
GPUs, else a measured matrix product). On a shared machine the figures swing
with other load; the cpu/wall column (CPU seconds of this process per wall
second) shows how much of the machine the run actually got.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from transformers import LlamaForCausalLM

from rbridge.proxy import ProxyTrainer, param_counts, proxy_config
from rbridge.proxy.peak import device_name, model_flops_per_token, peak_flops

VOCAB, SEQ_LEN = 4096, 256
VARIANTS = ("rbridge", "hf-loss", "hf-decoder", "hf-eager", "loop-adamw", "foreach-adamw", "fused-adamw", "compile", "plain")


class PlainLoop:
    """The ``plain`` variant: what a user would write without rbridge (LlamaForCausalLM and its own loss,
    AdamW with torch's defaults, bf16 autocast when asked, no accelerate, clipping or schedule), with the
    two methods ``measure`` calls. On the GPU when there is one, as ProxyTrainer (through accelerate)."""

    def __init__(self, preset: str, precision: str, batch_size: int):
        torch.manual_seed(0)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = LlamaForCausalLM(proxy_config({"preset": preset}, VOCAB, SEQ_LEN)).to(self.device)
        self.model.train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
        self.x = torch.from_numpy(np.random.default_rng(0).integers(0, VOCAB, size=(batch_size, SEQ_LEN))).to(self.device)
        self.bf16 = precision == "bf16"
        self.tokens_per_step, self.tokens_seen = batch_size * SEQ_LEN, 0

    def train_to(self, tokens: int) -> None:
        while self.tokens_seen < tokens:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                loss = self.model(input_ids=self.x, labels=self.x).loss
            loss.backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self.tokens_seen += self.tokens_per_step


def make_trainer(preset: str, precision: str, batch_size: int, variant: str) -> ProxyTrainer | PlainLoop:
    if variant == "plain":
        return PlainLoop(preset, precision, batch_size)
    config = proxy_config({"preset": preset}, VOCAB, SEQ_LEN)
    data = np.random.default_rng(0).integers(0, VOCAB, size=(256, SEQ_LEN), dtype=np.int32)
    trainer = ProxyTrainer(config, data, total_tokens=10**12, batch_size=batch_size, lr=1e-3, seed=0,
                           precision=precision)
    model = trainer.accelerator.unwrap_model(trainer._model)
    if variant == "hf-loss":
        model.__class__ = LlamaForCausalLM  # same modules and weights; transformers' forward and loss
    elif variant in ("hf-decoder", "hf-eager"):
        model.fused_decoder = False
        if variant == "hf-eager":
            model.set_attn_implementation("eager")
    elif variant in ("foreach-adamw", "fused-adamw", "loop-adamw"):
        key = variant.split("-")[0]
        for group in trainer.optimizer.optimizer.param_groups:
            group["foreach"], group["fused"] = key == "foreach", key == "fused"  # loop: neither
    elif variant == "compile":
        trainer._model = torch.compile(trainer._model)
    return trainer


def measure(trainer: ProxyTrainer, seconds: float, min_steps: int) -> tuple[float, float, float]:
    """(first step seconds, tokens per wall second, CPU seconds per wall second)."""
    per_step = trainer.tokens_per_step
    t0 = time.perf_counter()
    trainer.train_to(per_step)                           # warm-up: allocator, kernels, compilation
    _sync()
    first = time.perf_counter() - t0
    start, cpu_start, steps = time.perf_counter(), time.process_time(), 0
    while steps < min_steps or time.perf_counter() - start < seconds:
        trainer.train_to(trainer.tokens_seen + per_step)
        steps += 1
    _sync()
    wall = time.perf_counter() - start
    return first, steps * per_step / wall, (time.process_time() - cpu_start) / wall


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["0.5M", "2M", "8M"])
    parser.add_argument("--precisions", nargs="+", default=["fp32"])
    parser.add_argument("--variants", nargs="+", default=["rbridge", "hf-loss", "loop-adamw", "foreach-adamw"], choices=VARIANTS)
    parser.add_argument("--threads", nargs="+", type=int, default=sorted({1, torch.get_num_threads()}))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds per measurement")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per measurement, at least")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of the whole grid; medians at the end")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    from _machine import print_machine

    print_machine()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"torch {torch.__version__}, {device_name(device)}, cpu capability "
          f"{torch.backends.cpu.get_cpu_capability()}, vocab {VOCAB}, seq_len {SEQ_LEN}, batch {args.batch_size}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'preset':>6} {'non-emb':>8} {'threads':>7} {'precision':>9} {'variant':>13} {'1st step':>8} "
          f"{'tokens/s':>10} {'vs rbridge':>10} {'MFU':>6} {'cpu/wall':>8}")
    rounds: list[dict[tuple, tuple[float, str]]] = []
    for r in range(args.repeats):
        if args.repeats > 1:
            print(f"round {r + 1} of {args.repeats}", flush=True)
        rounds.append(run_grid(args, device))
    for k, rates in enumerate(rounds):
        if args.repeats > 1:
            print(f"round {k + 1}:")
        print_auto(rates)
    if args.repeats > 1:
        print_medians(rounds)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


def run_grid(args, device) -> dict[tuple, tuple[float, str]]:
    """One round: every (preset, threads, precision, variant) measured and printed; their (tokens/s, precision)."""
    rates: dict[tuple, tuple[float, str]] = {}
    for preset in args.presets:
        config = proxy_config({"preset": preset}, VOCAB, SEQ_LEN)
        _, non_emb = param_counts(config)
        per_token = model_flops_per_token(config, SEQ_LEN)
        for threads in args.threads:
            torch.set_num_threads(threads)
            for precision in args.precisions:
                baseline = None
                for variant in args.variants:
                    if variant == "plain" and precision == "auto":
                        continue  # a plain loop has no auto: its fp32 and bf16 rows are the comparison
                    trainer = make_trainer(preset, precision, args.batch_size, variant)
                    computed = getattr(trainer, "precision", None) or precision  # auto: what it resolved to
                    peak = peak_flops(device, computed if computed != "auto" else "fp32", threads)
                    first, tps, cpu_per_wall = measure(trainer, args.seconds, args.steps)
                    del trainer
                    if variant == "rbridge":
                        baseline = tps
                    ratio = f"{tps / baseline:9.2f}x" if baseline else "         -"
                    rates[(preset, threads, precision, variant)] = (tps, computed)
                    print(f"{preset:>6} {non_emb / 1e6:7.2f}M {threads:>7} {precision:>9} {variant:>13} "
                          f"{first:7.2f}s {tps:10.0f} {ratio} {per_token * tps / peak:6.1%} {cpu_per_wall:8.2f}",
                          flush=True)
    return rates


def faster_plain(rates: dict, preset: str, threads: int) -> float | None:
    plain = [rates[k][0] for k in ((preset, threads, p, "plain") for p in ("fp32", "bf16")) if k in rates]
    return max(plain) if plain else None


def print_auto(rates: dict) -> None:
    """rbridge's auto against the faster plain loop at the same threads (issue 24: >= 0.95x)."""
    for (preset, threads, precision, variant), (tps, computed) in rates.items():
        plain = faster_plain(rates, preset, threads)
        if precision == "auto" and variant == "rbridge" and plain:
            print(f"{preset:>6} {threads} thread(s): rbridge auto (computed in {computed}) {tps:,.0f} tokens/s = "
                  f"{tps / plain:.2f}x the faster plain loop ({plain:,.0f} tokens/s)")


def print_medians(rounds: list[dict]) -> None:
    """Per preset, threads and precision: rbridge's median tokens/s and its ratio to the plain loop's in the
    same round (each round's ratio and their median); rbridge at auto against the faster plain loop."""
    import statistics

    print(f"medians of {len(rounds)} rounds (ratios: rbridge / plain in the same round):")
    for key in rounds[0]:
        preset, threads, precision, variant = key
        if variant != "rbridge":
            continue
        tps = statistics.median(r[key][0] for r in rounds)
        if precision == "auto":
            ratios = [r[key][0] / p for r in rounds if (p := faster_plain(r, preset, threads))]
            against = "the faster plain loop (fp32 or bf16)"
        else:
            ratios = [r[key][0] / r[k][0] for r in rounds if (k := (preset, threads, precision, "plain")) in r]
            against = f"the plain loop in {precision}"
        computed = "/".join(sorted({r[key][1] for r in rounds}))
        line = f"{preset:>6} {threads} thread(s) {precision:>5} (computed in {computed}): rbridge {tps:,.0f} tokens/s"
        if ratios:
            line += (f", {statistics.median(ratios):.2f}x {against} "
                     f"(rounds: {', '.join(f'{x:.2f}' for x in ratios)})")
        print(line)


if __name__ == "__main__":
    main()
