"""Tokenization throughput and cache-hit speedup of rbridge.data, in one process.

    python benchmarks/data_throughput.py [--mb 8] [--vocab 8192] [--seq-len 256]

Generates word-salad text with a Zipf-like word distribution (no downloads),
trains a byte-level BPE on it, tokenizes it into shards, builds a mixture,
and repeats each cached step to time the cache hit. "cold-process hit"
clears the in-process file-hash memo, which is what a new `rbridge` process
pays on a hit (one sha256 pass over the source files).
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from pathlib import Path

from rbridge.data import SourceConfig, build_mixture, tokenize_source, train_tokenizer
from rbridge.data import sources as _sources


def _generate(path: Path, n_chars: int, seed: int) -> None:
    rng = random.Random(seed)
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(1, 9))) for _ in range(20_000)]
    weights = [1.0 / (i + 1) for i in range(len(words))]
    written = 0
    with open(path, "w", encoding="utf-8") as fh:
        while written < n_chars:
            doc = " ".join(rng.choices(words, weights, k=rng.randint(50, 400)))
            fh.write(doc + "\n\n")
            written += len(doc) + 2


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=8.0, help="megabytes of generated text per source (2 sources)")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=256)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        n_chars = int(args.mb * 1e6)
        srcs = {}
        for i, name in enumerate(["a", "b"]):
            _generate(root / f"{name}.txt", n_chars, seed=i)
            srcs[name] = SourceConfig(name, path=root / f"{name}.txt")
        cache = root / "cache"
        print(f"text: 2 sources x {args.mb:g} MB; vocab {args.vocab}; "
              f"cpus {os.cpu_count()}; RAYON_NUM_THREADS={os.environ.get('RAYON_NUM_THREADS', 'unset')}")

        tok, t_train = _timed(lambda: train_tokenizer(srcs, args.vocab, cache))
        _, t_train_hit = _timed(lambda: train_tokenizer(srcs, args.vocab, cache))
        print(f"tokenizer train   {t_train:7.2f} s   cache hit {t_train_hit:6.3f} s   "
              f"speedup {t_train / t_train_hit:7.1f}x")

        shards, t_tok = _timed(lambda: {n: tokenize_source(s, tok, cache) for n, s in srcs.items()})
        n_tokens = sum(s.n_train_tokens + s.n_heldout_tokens for s in shards.values())
        total_chars = 2 * n_chars
        print(f"tokenize shards   {t_tok:7.2f} s   {n_tokens / t_tok:12,.0f} tokens/s   "
              f"{total_chars / t_tok / 1e6:6.2f} MB/s   ({n_tokens:,} tokens, "
              f"{total_chars / n_tokens:.2f} chars/token)")
        hits, t_hit = _timed(lambda: {n: tokenize_source(s, tok, cache) for n, s in srcs.items()})
        assert all(h.cached for h in hits.values())
        print(f"shard cache hit   {t_hit:7.3f} s   speedup {t_tok / t_hit:9.1f}x (in-process)")
        _sources._file_digests.clear()
        _sources._splits.clear()
        _, t_cold = _timed(lambda: {n: tokenize_source(s, tok, cache) for n, s in srcs.items()})
        print(f"shard cache hit   {t_cold:7.3f} s   speedup {t_tok / t_cold:9.1f}x (cold process: re-hash files)")

        budget = min(sum(s.n_train_tokens for s in shards.values()), 20_000_000)
        (rows, stats), t_mix = _timed(lambda: build_mixture({"a": 0.7, "b": 0.3}, shards, budget,
                                                            args.seq_len, 0, cache))
        _, t_mix_hit = _timed(lambda: build_mixture({"a": 0.7, "b": 0.3}, shards, budget, args.seq_len, 0, cache))
        print(f"mixture build     {t_mix:7.2f} s   {stats.n_tokens / t_mix:12,.0f} tokens/s   "
              f"cache hit {t_mix_hit:6.3f} s   speedup {t_mix / t_mix_hit:7.1f}x")


if __name__ == "__main__":
    main()
