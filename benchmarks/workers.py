"""Wall time of one plan done by one process vs by `rbridge plan --no-local` and N workers.

    python benchmarks/workers.py [--workers 3] [--store-url postgresql://.../db_a,postgresql://.../db_b]

Without --store-url both runs use fresh SQLite stores in a temporary folder (workers
on one machine); with it, give two empty databases (one per run). Both runs share
one data cache, prepared before timing, so the figures compare the runs only. The
script also checks that both runs made the same decisions.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SPEC = f"""\
name: bench
seed: 1
tokenizer: {{train: {{vocab_size: 512}}}}
sources:
  cot: {{path: {REPO}/specs/data/cot.jsonl.gz}}
  spam: {{path: {REPO}/specs/data/spam.jsonl.gz}}
  kjv: {{path: {REPO}/specs/data/kjv.txt.gz}}
  austen: {{path: {REPO}/specs/data/austen.txt.gz}}
candidates:
  - {{name: spam, mix: {{spam: 1.0}}}}
  - {{name: kjv, mix: {{kjv: 1.0}}}}
  - {{name: cot, mix: {{cot: 1.0}}}}
  - {{name: austen, mix: {{austen: 1.0}}}}
  - {{name: kjv-cot, mix: {{kjv: 0.5, cot: 0.5}}}}
  - {{name: austen-cot, mix: {{austen: 0.5, cot: 0.5}}}}
benchmarks:
  - {{name: gsm8k, traces: traces.jsonl}}
stages:
  - name: filter
    proxy: {{hidden_size: 64, num_hidden_layers: 2, num_attention_heads: 4}}
    tokens: TOKENS
    seq_len: 64
    batch_size: 8
    lr: 0.01
    evals: 2
    keep: 2
  - name: rank
    proxy: {{hidden_size: 96, num_hidden_layers: 2, num_attention_heads: 4}}
    tokens: TOKENS
    evals: 1
"""


def _cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "rbridge.cli", *args]


def _decisions(store: str) -> list[tuple]:
    sql = ("SELECT d.stage, d.rung, c.name, d.kept FROM decisions d JOIN candidates c ON c.id = d.candidate_id "
           "ORDER BY d.stage, d.rung, c.name")
    if "://" in store:
        import psycopg

        with psycopg.connect(store) as con:
            return [tuple(r) for r in con.execute(sql).fetchall()]
    con = sqlite3.connect(store)
    try:
        return [(a, b, c, bool(d)) for a, b, c, d in con.execute(sql).fetchall()]
    finally:
        con.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=32768, help="training tokens per run in each stage")
    ap.add_argument("--store-url", default=None, help="two empty PostgreSQL databases, comma-separated")
    args = ap.parse_args()
    from _machine import print_machine

    print_machine()
    work = Path(tempfile.mkdtemp(prefix="rbridge-bench-workers-"))
    lines = (REPO / "specs/traces/gsm8k.jsonl").read_text().splitlines()[:24]
    (work / "traces.jsonl").write_text("\n".join(lines) + "\n")
    (work / "bench.yaml").write_text(SPEC.replace("TOKENS", str(args.tokens)))
    env = dict(os.environ, RBRIDGE_CACHE=str(work / "cache"), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               RBRIDGE_POLL_S="0.5")
    stores = args.store_url.split(",") if args.store_url else [str(work / "one.db"), str(work / "many.db")]
    subprocess.run(_cmd("validate", "bench.yaml"), cwd=work, env=env, check=True, capture_output=True)
    # Warm the data cache (tokenizer, shards) so that neither timed run pays for it.
    from rbridge.planner.steps import prepare_data
    from rbridge.spec import load_spec

    os.environ["RBRIDGE_CACHE"] = env["RBRIDGE_CACHE"]
    prepare_data(load_spec(work / "bench.yaml"))

    t0 = time.perf_counter()
    subprocess.run(_cmd("plan", "bench.yaml", "--store", stores[0]), cwd=work, env=env, check=True,
                   capture_output=True)
    one = time.perf_counter() - t0

    t0 = time.perf_counter()
    procs = [subprocess.Popen(_cmd("plan", "bench.yaml", "--store", stores[1], "--no-local"), cwd=work, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    procs += [subprocess.Popen(_cmd("worker", "--store", stores[1], "--until-idle"), cwd=work, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(args.workers)]
    codes = [p.wait() for p in procs]
    many = time.perf_counter() - t0
    assert codes == [0] * len(procs), codes
    same = _decisions(stores[0]) == _decisions(stores[1])
    steps = len(_decisions(stores[0]))
    print(f"cores: {os.cpu_count()}; plan: 6 candidates, 2 stages, {steps} rung steps (run trained to a rung), "
          f"{args.tokens:,} tokens per run and stage")
    print(f"1 process (rbridge plan):                 {one:7.1f} s")
    print(f"plan --no-local + {args.workers} workers:            {many:7.1f} s   speed-up {one / many:.2f}x")
    print(f"same decisions: {same}")


if __name__ == "__main__":
    main()
