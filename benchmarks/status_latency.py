"""How fast the commands that only read answer: `status`, `accuracy`, `validate`, `--help`.

    python benchmarks/status_latency.py [--runs 10000] [--repeats 3]

Builds a store as a plan of ``--runs`` runs would leave it (two stages, half the
runs each, three rungs of evaluations per run, a decision per rung and target
results for every candidate), then times each command as a new process (what a
user waits for), median of ``--repeats``, next to the floor of any Python command
(``python -c pass``) measured in the same run. Goals: `status` under 1 s on
10,000 runs; `accuracy`, `validate` and `--help` under 0.5 s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def build_store(path: Path, n_runs: int) -> None:
    """A finished plan of ``n_runs`` runs (bulk-inserted rows, as the planner writes them)."""
    from rbridge.store import open_store
    from rbridge.store.models import Candidate, Decision, Evaluation, Plan, Run

    n_cands = n_runs // 2
    spec = (REPO / "specs/mix.yaml").read_text()
    head, _, tail = spec.partition("candidates:\n")
    rest = tail[tail.index("target_model:"):]
    cands = "".join(f"  - {{name: c{i:05d}, mix: {{austen: 0.5, cot: 0.5}}}}\n" for i in range(n_cands))
    spec_text = head + "candidates:\n" + cands + rest
    st = open_store(path)
    with st.session() as s:
        plan = Plan(name="mix", spec_text=spec_text, spec_hash="bench", spec_path=str(REPO / "specs/mix.yaml"),
                    status="done")
        s.add(plan)
        s.flush()
        rows = [Candidate(plan_id=plan.id, name=f"c{i:05d}", mix='{"austen": 0.5, "cot": 0.5}', position=i)
                for i in range(n_cands)]
        s.add_all(rows)
        s.flush()
        runs = []
        for stage_index, stage in enumerate(("filter", "rank")):
            for c in rows:
                runs.append(Run(plan_id=plan.id, stage=stage, stage_index=stage_index, candidate_id=c.id,
                                config="{}", params=1_000_000, non_embedding_params=524_928,
                                tokens_target=98_304, tokens_seen=98_304, status="done", train_flops=3e11,
                                score_flops=1e10, wall_s=15.0, tokens_per_s=6500.0))
        s.add_all(runs)
        s.flush()
        evals, decisions = [], []
        for k, r in enumerate(runs):
            for rung in (1, 2, 3):
                evals.append(Evaluation(run_id=r.id, rung=rung, tokens_seen=32_768 * rung, benchmark="gsm8k",
                                        metric="rbridge", value=4.0 - 0.1 * rung + (k % 97) / 1000))
                decisions.append(Decision(plan_id=plan.id, stage=r.stage, rung=rung, candidate_id=r.candidate_id,
                                          kept=True, score=4.0, rank=1 + k % n_cands, why="bench"))
        s.add_all(evals)
        s.add_all(decisions)
    st.close()
    targets = path.with_suffix(".csv")
    targets.write_text("candidate,benchmark,metric,value\n"
                       + "".join(f"c{i:05d},gsm8k,accuracy,{(i * 37 % 101) / 101:.4f}\n" for i in range(n_cands)))
    subprocess.run([sys.executable, "-m", "rbridge.cli", "targets", "import", str(targets), "--store", str(path)],
                   check=True, stdout=subprocess.DEVNULL)


def timed(args: list[str], repeats: int, cwd: Path) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(args, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from _machine import print_machine

    print_machine()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        db = root / "bench.db"
        t0 = time.perf_counter()
        build_store(db, args.runs)
        print(f"store: {args.runs:,} runs, {3 * args.runs:,} evaluations ({time.perf_counter() - t0:.0f} s to "
              f"build); load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
        py = [sys.executable]
        rb = py + ["-m", "rbridge.cli"]
        cases = [
            ("python -c pass (floor)", py + ["-c", "pass"], None),
            ("rbridge --help", rb + ["--help"], 0.5),
            ("rbridge validate specs/mix.yaml", rb + ["validate", str(REPO / "specs/mix.yaml")], 0.5),
            ("rbridge accuracy --store", rb + ["accuracy", "--store", str(db), "--no-curve"], 0.5),
            ("rbridge status --store", rb + ["status", "--store", str(db)], 1.0),
            ("rbridge status --json", rb + ["status", "--store", str(db), "--json"], None),
        ]
        results = {}
        for name, cmd, goal in cases:
            t = timed(cmd, args.repeats, root)
            results[name] = t
            verdict = "" if goal is None else (f"  goal < {goal} s: " + ("met" if t < goal else "NOT met"))
            print(f"{name:34s} {t:6.2f} s (median of {args.repeats}){verdict}")
        print(json.dumps({k: round(v, 3) for k, v in results.items()}))


if __name__ == "__main__":
    main()
