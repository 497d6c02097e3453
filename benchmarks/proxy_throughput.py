"""Training throughput of proxy presets, fp32 vs bf16 autocast, on this machine.

    python benchmarks/proxy_throughput.py [--presets 0.5M 2M 8M] [--threads 1 2] [--seconds 3] [--batch-size 8]

Each (preset, torch threads, precision) runs ProxyTrainer steps (forward, backward, AdamW) on
random tokens at vocab 8192, seq_len 256: one warm-up step, then steps until
``--seconds`` have passed (at least 3). Ratios are against fp32 of the same
preset at the same thread count, measured in the same process. On a shared
machine the figures swing with other load: when other processes keep the cores
busy, every multi-threaded op waits for its slowest thread, and one thread can
beat two by several times. The cpu/wall column (CPU seconds of this process per
wall second) shows how much of the machine the run actually got.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from rbridge.proxy import ProxyTrainer, param_counts, proxy_config

VOCAB, SEQ_LEN = 8192, 256


def measure(preset: str, precision: str, batch_size: int, seconds: float) -> tuple[float, float]:
    """(tokens per wall second, CPU seconds per wall second) of ``preset`` at ``precision``."""
    config = proxy_config({"preset": preset}, VOCAB, SEQ_LEN)
    data = np.random.default_rng(0).integers(0, VOCAB, size=(256, SEQ_LEN), dtype=np.int32)
    tokens_per_step = batch_size * SEQ_LEN
    trainer = ProxyTrainer(config, data, total_tokens=10**9, batch_size=batch_size, lr=1e-3, seed=0,
                           precision=precision)
    trainer.train_to(tokens_per_step)                           # warm-up: allocator, kernels
    start, cpu_start, steps = time.perf_counter(), time.process_time(), 0
    while steps < 3 or time.perf_counter() - start < seconds:
        trainer.train_to(trainer.tokens_seen + tokens_per_step)
        steps += 1
    tokens = steps * tokens_per_step
    wall = time.perf_counter() - start
    return tokens / wall, (time.process_time() - cpu_start) / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["0.5M", "2M", "8M"])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--threads", nargs="+", type=int, default=sorted({1, torch.get_num_threads()}))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds per measurement")
    args = parser.parse_args()

    print(f"torch {torch.__version__}, cpu capability {torch.backends.cpu.get_cpu_capability()}, "
          f"vocab {VOCAB}, seq_len {SEQ_LEN}, batch {args.batch_size}, load average {os.getloadavg()[0]:.1f}")
    print(f"{'preset':>6} {'non-emb':>8} {'total':>8} {'threads':>7} {'precision':>9} {'tokens/s':>9} "
          f"{'vs fp32':>7} {'cpu/wall':>8}")
    for preset in args.presets:
        total, non_emb = param_counts(proxy_config({"preset": preset}, VOCAB, SEQ_LEN))
        for threads in args.threads:
            torch.set_num_threads(threads)
            baseline = None
            for precision in args.precisions:
                tps, cpu_per_wall = measure(preset, precision, args.batch_size, args.seconds)
                if precision == "fp32":
                    baseline = tps
                ratio = f"{tps / baseline:6.2f}x" if baseline else "      -"
                print(f"{preset:>6} {non_emb / 1e6:7.2f}M {total / 1e6:7.2f}M {threads:>7} {precision:>9} "
                      f"{tps:9.0f} {ratio} {cpu_per_wall:8.2f}", flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
