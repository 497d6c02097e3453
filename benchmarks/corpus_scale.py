"""A plan on a corpus far larger than it needs: >= 10 GB of Parquet shards, sampled, not swallowed.

    pip install psutil
    python benchmarks/corpus_scale.py [--gb 10] [--shard-mb 256] [--work DIR] [--deb FILE] [--keep]

Writes ``--gb`` GB of Parquet shards (uncompressed, row groups of 64 MB) of real
text in a temporary folder: the Linux kernel's source tree from Debian's
linux-source package, one document per file, cycled with a copy number to reach
the size (benchmarks/_corpus.py). Then runs ``rbridge plan`` on a small spec whose
candidates mix that corpus with the repository's chain-of-thought source, and
reports: data preparation time (the tokenizer and every source), the bytes of the
corpus read against its size, the plan's wall time, and the peak resident memory
of the plan with its tokenizing workers (sampled every 0.1 s). The folder is
deleted at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

SPEC = """\
name: scale
tokenizer: {{train: {{vocab_size: 8192}}}}
sources:
  kernel: {{glob: "shards/*.parquet"}}
  cot: {{path: {repo}/specs/data/cot.jsonl.gz}}
candidates:
  - {{name: kernel, mix: {{kernel: 1.0}}}}
  - {{name: kernel-cot, mix: {{kernel: 0.8, cot: 0.2}}}}
benchmarks:
  - {{name: gsm8k, traces: {repo}/specs/traces/gsm8k.jsonl}}
stages:
  - name: filter
    proxy: {{preset: 0.5M}}
    tokens: 262144
    seq_len: 256
    evals: 1
"""


def write_parquet(out: Path, docs, gb: float, shard_mb: int) -> tuple[int, int, int]:
    """Parquet shards of about ``shard_mb`` MB until ``gb`` GB are on disk; (shards, documents, bytes)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out.mkdir(parents=True)
    cached: list[str] = []
    for doc in docs:
        cached.append(doc)
    shards = n = total = 0
    copy = 0
    batch: list[str] = []
    batch_bytes = 0

    def flush() -> None:
        nonlocal shards, total, batch, batch_bytes
        path = out / f"part-{shards:05d}.parquet"
        pq.write_table(pa.table({"text": batch}), path, compression="none", row_group_size=max(1, len(batch) // 4))
        total += path.stat().st_size
        shards += 1
        batch, batch_bytes = [], 0

    while total < gb * 1e9:
        for doc in cached:
            text = doc if copy == 0 else f"/* copy {copy} */\n{doc}"
            batch.append(text)
            batch_bytes += len(text)
            n += 1
            if batch_bytes >= shard_mb * 1e6:
                flush()
                if total >= gb * 1e9:
                    break
        copy += 1
    if batch:
        flush()
    return shards, n, total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=10.0)
    ap.add_argument("--shard-mb", type=int, default=256)
    ap.add_argument("--work", type=Path, default=None, help="where the temporary folder goes (default: temp)")
    ap.add_argument("--deb", type=Path, default=None, help="a linux-source .deb already downloaded")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()

    from _corpus import PeakRSS, kernel_documents
    from _machine import print_machine

    print_machine()

    tmp = Path(tempfile.mkdtemp(prefix="rbridge-scale-", dir=args.work))
    try:
        t0 = time.perf_counter()
        shards, n, total = write_parquet(tmp / "shards", kernel_documents(args.work or tmp, args.deb),
                                         args.gb, args.shard_mb)
        print(f"corpus: {shards} Parquet shards, {n:,} documents, {total / 1e9:.2f} GB "
              f"({time.perf_counter() - t0:.0f} s to write); load average "
              f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
        (tmp / "scale.yaml").write_text(SPEC.format(repo=REPO))
        env = dict(os.environ, RBRIDGE_CACHE=str(tmp / "cache"), COLUMNS="200")
        t1 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "rbridge.cli", "plan", "scale.yaml"], cwd=tmp, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        mon = PeakRSS(proc.pid)
        out, _ = proc.communicate()
        peak = mon.stop()
        wall = time.perf_counter() - t1
        print(out)
        if proc.returncode != 0:
            raise SystemExit(f"rbridge plan failed ({proc.returncode})")
        prep = re.findall(r"tokenizer: .*\(([\d.]+) s\)", out)
        kernel = next(line for line in out.splitlines() if "source kernel:" in line and "sampled" in line)
        print(f"plan wall {wall:.0f} s; tokenizer {prep[0] if prep else '?'} s; {kernel.strip()}")
        print(f"peak resident memory of the plan and its workers: {peak / 2**30:.2f} GiB")
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
