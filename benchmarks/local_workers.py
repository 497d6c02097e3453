"""When a second local process pays: one plan at growing sizes with `--workers 1` against `--workers 2`.

    python benchmarks/local_workers.py [--tokens 2048 32768] [--traces 6 200] [--repeats 3]

`rbridge plan` starts local worker processes (rbridge.planner.local) that each import torch,
transformers and Accelerate before they can train: seconds of CPU. For a plan whose whole training
is about as short as that, they cost CPU and gain little wall time; rbridge then starts none
(``LOCAL_WORKERS_FROM_FLOPS``, on the upper bound ``plan_work_flops``: training and scoring). This
script measures both sides on this machine: a two-stage plan of tiny proxies (4 candidates, hidden 16
then 32, one layer, a 300-word tokenizer: the shape of the test suite's plans) at each ``--tokens`` per
run and each number of GSM8K ``--traces`` scored at every rung, as a new `rbridge plan` process with
``--workers 1`` and with ``--workers 2`` (data cached first, the two interleaved, median of
``--repeats``). It prints, per size, the plan's work bound, both wall times, both processes' CPU seconds
(user + system of the plan and its children), the ratio of the walls, and what rbridge's rule chooses.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from _machine import print_machine  # noqa: E402

SPEC = f"""\
name: lw
seed: 3
tokenizer: {{train: {{vocab_size: 300}}}}
sources:
  cot: {{path: {REPO}/specs/data/cot.jsonl.gz}}
  spam: {{path: {REPO}/specs/data/spam.jsonl.gz}}
  kjv: {{path: {REPO}/specs/data/kjv.txt.gz}}
candidates:
  - {{name: spam, mix: {{spam: 1.0}}}}
  - {{name: kjv, mix: {{kjv: 1.0}}}}
  - {{name: cot, mix: {{cot: 1.0}}}}
  - {{name: kjv-cot, mix: {{kjv: 0.5, cot: 0.5}}}}
benchmarks:
  - {{name: gsm8k, traces: traces.jsonl}}
stages:
  - name: filter
    proxy: {{hidden_size: 16, num_hidden_layers: 1, num_attention_heads: 2}}
    tokens: TOKENS
    seq_len: 32
    batch_size: 8
    lr: 0.01
    evals: 2
    keep: 2
  - name: rank
    proxy: {{hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2}}
    tokens: TOKENS
    evals: 1
"""


def run_plan(d: Path, tokens: int, workers: int, env: dict) -> tuple[float, float]:
    """(wall s, CPU s of the plan and its children) of one fresh `rbridge plan`."""
    (d / "lw.yaml").write_text(SPEC.replace("TOKENS", str(tokens)))
    for f in d.glob("stores/*"):
        if f.is_file():
            f.unlink()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "rbridge.cli", "plan", "lw.yaml", "--workers", str(workers)],
                         cwd=d, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if res.returncode != 0:
        raise SystemExit(res.stdout + res.stderr)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[2048, 32768])
    ap.add_argument("--traces", type=int, nargs="+", default=[6, 200], help="GSM8K traces scored (first N)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print_machine(threads=1)

    from rbridge.planner.local import LOCAL_WORKERS_FROM_FLOPS, plan_work_flops, trace_tokens_bound
    from rbridge.scoring.traces import load_traces
    from rbridge.spec import parse_spec

    lines = (REPO / "specs/traces/gsm8k.jsonl").read_text().splitlines(keepends=True)

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / "stores").mkdir()
        env = dict(os.environ, RBRIDGE_CACHE=str(d / "cache"), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        (d / "traces.jsonl").write_text("".join(lines[:args.traces[0]]))
        run_plan(d, args.tokens[0], 1, env)  # data, tokenizer and precision rates cached before timing
        print(f"\n{'traces':>6} {'tokens/run':>10} {'GFLOP bound':>11} {'wall w=1':>9} {'wall w=2':>9} "
              f"{'CPU w=1':>8} {'CPU w=2':>8} {'w2/w1 wall':>10}  rule")
        for n_traces in args.traces:
            (d / "traces.jsonl").write_text("".join(lines[:n_traces]))
            for tokens in args.tokens:
                (d / "lw.yaml").write_text(SPEC.replace("TOKENS", str(tokens)))
                spec = parse_spec((d / "lw.yaml").read_text(), d / "lw.yaml")
                traces = {b.name: load_traces(b.traces) for b in spec.benchmarks}
                flops = plan_work_flops(spec.resolved_stages(), len(spec.candidates),
                                        spec.tokenizer.train.vocab_size, trace_tokens_bound(spec.benchmarks, traces))
                got: dict[int, list[tuple[float, float]]] = {1: [], 2: []}
                for _ in range(args.repeats):
                    for w in (1, 2):
                        got[w].append(run_plan(d, tokens, w, env))
                wall = {w: statistics.median(x[0] for x in got[w]) for w in got}
                cpu = {w: statistics.median(x[1] for x in got[w]) for w in got}
                rule = "1 process" if flops < LOCAL_WORKERS_FROM_FLOPS else "every core"
                print(f"{n_traces:>6} {tokens:>10,} {flops / 1e9:>11.1f} {wall[1]:>8.2f}s {wall[2]:>8.2f}s "
                      f"{cpu[1]:>7.2f}s {cpu[2]:>7.2f}s {wall[2] / wall[1]:>10.2f}  {rule}", flush=True)


if __name__ == "__main__":
    main()
