"""Data preparation throughput and memory: rbridge vs Hugging Face `datasets` map, in one run.

    pip install datasets psutil
    python benchmarks/data_throughput.py [--gb 1] [--workers N] [--vocab 32768] [--work DIR] [--deb FILE]

Both tokenize the same >= ``--gb`` GB of real text (the Linux kernel's source tree
from Debian's linux-source package, one document per file, as JSON lines; see
benchmarks/_corpus.py) with the same tokenizer (a byte-level BPE rbridge trains on
a bounded sample of it), each in its own process so their memory is measured apart:

- rbridge: ``rbridge.data.sample.sample_shards`` asked for the whole corpus (a
  sampled source read to the end), ``--workers`` processes, token streams on disk;
- datasets: ``load_dataset("json")`` then ``map(batched=True, num_proc=--workers)``
  calling the same tokenizer, Arrow cache on disk.

Reported per side: wall seconds (reading, tokenizing and writing included), tokens
per second, and the peak resident memory of the process and its workers summed
(sampled every 0.1 s). The last line is the ratio rbridge / datasets. The token
counts must agree up to one end-of-text per document (rbridge adds it).
The machine's load average is printed before each side: compare runs taken on
an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def run_rbridge(corpus: Path, tokdir: Path, cache: Path, workers: int) -> dict:
    from rbridge.data import SourceConfig, load_tokenizer
    from rbridge.data.sample import sample_shards

    tok = load_tokenizer(tokdir)
    src = SourceConfig("kernel", path=corpus, sampled=True)
    t0 = time.perf_counter()
    sh, read = sample_shards(src, tok, 10**15, cache, heldout_fraction=0.05, workers=workers)
    wall = time.perf_counter() - t0
    t1 = time.perf_counter()
    again, _ = sample_shards(src, tok, 10**15, cache, heldout_fraction=0.05, workers=workers)
    hit = time.perf_counter() - t1
    assert again.cached
    return {"wall_s": wall, "tokens": sh.n_train_tokens + sh.n_heldout_tokens,
            "docs": sh.n_train_docs + sh.n_heldout_docs, "chunks": read.chunks, "cache_hit_s": hit}


def run_datasets(corpus: Path, tokdir: Path, cache: Path, workers: int) -> dict:
    import datasets
    import pyarrow.compute as pc
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    tok = AutoTokenizer.from_pretrained(str(tokdir), local_files_only=True)
    t0 = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=str(corpus), split="train", cache_dir=str(cache))

    def encode(batch):
        return {"ids": tok(batch["text"], add_special_tokens=False)["input_ids"]}

    out = ds.map(encode, batched=True, num_proc=workers, remove_columns=ds.column_names)
    wall = time.perf_counter() - t0
    tokens = int(pc.sum(pc.list_value_length(out.data.column("ids"))).as_py())
    return {"wall_s": wall, "tokens": tokens, "docs": len(out), "datasets": datasets.__version__}


def _side(name: str, args, corpus: Path, tokdir: Path, cache: Path) -> dict:
    """One side in its own process; its peak memory (with its workers) measured from here."""
    from _corpus import PeakRSS

    out = cache / f"{name}.json"
    print(f"{name}: load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    proc = subprocess.Popen([sys.executable, __file__, "--side", name, "--corpus", str(corpus), "--tokdir",
                             str(tokdir), "--cache", str(cache / name), "--workers", str(args.workers),
                             "--out", str(out)])
    mon = PeakRSS(proc.pid)
    rc = proc.wait()
    peak = mon.stop()
    if rc != 0:
        raise SystemExit(f"{name} failed with exit code {rc}")
    res = json.loads(out.read_text())
    res["peak_rss"] = peak
    print(f"{name:9s} {res['wall_s']:8.1f} s  {res['tokens'] / res['wall_s']:12,.0f} tokens/s  "
          f"peak {peak / 2**30:6.2f} GiB  ({res['tokens']:,} tokens, {res['docs']:,} documents)", flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=1.0, help="gigabytes of JSON lines to tokenize (>= 1 for the goal)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--work", type=Path, default=None, help="keep the corpus and package here (default: temp)")
    ap.add_argument("--deb", type=Path, default=None, help="a linux-source .deb already downloaded")
    ap.add_argument("--side", choices=["rbridge", "datasets"], help=argparse.SUPPRESS)
    ap.add_argument("--corpus", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--tokdir", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        fn = run_rbridge if args.side == "rbridge" else run_datasets
        args.out.write_text(json.dumps(fn(args.corpus, args.tokdir, args.cache, args.workers)))
        return

    from _corpus import kernel_documents, write_jsonl
    from _machine import print_machine

    print_machine()

    from rbridge.data import SourceConfig, train_tokenizer

    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        root = Path(tmp)
        corpus = root / "kernel.jsonl"
        t0 = time.perf_counter()
        n, size = write_jsonl(corpus, kernel_documents(args.work or root, args.deb), int(args.gb * 1e9))
        print(f"corpus: {n:,} documents, {size / 1e9:.2f} GB of JSON lines from Debian linux-source "
              f"({time.perf_counter() - t0:.0f} s to write); {os.cpu_count()} cores, {args.workers} workers",
              flush=True)
        tok = train_tokenizer({"kernel": SourceConfig("kernel", path=corpus, sampled=True)}, args.vocab,
                              root / "tokcache")
        tokdir = root / "tokenizer"
        tok.save_pretrained(str(tokdir))
        print(f"tokenizer: byte-level BPE, vocab {len(tok):,}, trained on a bounded sample", flush=True)
        subprocess.run(["cat", str(corpus)], stdout=subprocess.DEVNULL, check=True)  # both start page-cached
        rb = _side("rbridge", args, corpus, tokdir, root)
        hf = _side("datasets", args, corpus, tokdir, root)
        print(f"rbridge cache hit: {rb['cache_hit_s']:.3f} s")
        extra = rb["tokens"] - hf["tokens"]
        print(f"token counts: rbridge - datasets = {extra:,} (rbridge's end-of-text per document: {rb['docs']:,})")
        speed = (rb["tokens"] / rb["wall_s"]) / (hf["tokens"] / hf["wall_s"])
        print(f"ratio rbridge/datasets: speed {speed:.2f}x, peak memory {rb['peak_rss'] / hf['peak_rss']:.2f}x "
              f"(datasets {hf['datasets']})")


if __name__ == "__main__":
    main()
