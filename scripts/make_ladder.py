#!/usr/bin/env python3
"""Generate specs/ladder/: the data of the rBridge "ladder" experiment.

The ladder asks whether rBridge (weighted NLL of tiny proxies on a stronger
model's reasoning traces) ranks pre-training candidates the way the task
accuracy of larger target models does, when the candidates differ in the
*share* and the *quality* of task-format data mixed into real prose. The task
is synthetic so that models of 0.5M-8M parameters trained on a few million
tokens learn it, and so that every quality knob is exact:

- a reasoning task: 2-step arithmetic word problems (five templates, 30 names,
  20 objects; single-digit operands, +, - and small *, results 0-27) with
  written-out steps and a checkable final number::

      Ann has 4 boxes with 3 pens each. She gives away 5. How many pens are left?
      4 * 3 = 12. 12 - 5 = 7. The answer is 7.

  (A first version with 2-4 steps and results up to 110 was not learned by a
  2.75M-parameter model in 1M tokens -- 5% greedy accuracy -- so the numbers
  were made small: the ladder's proxies see only a few hundred thousand task
  tokens.)

- task-format training sources (``data/*.jsonl.gz``, ``{"text": ...}`` per
  line, problems of the train split, 1-4 per document joined by a blank line;
  each problem is ``question + "\\n" + solution``):

  ``clean``   worked solutions, every step right;
  ``answers`` the same problems, answer only (``The answer is N.``);
  ``noisy``   the same problems with worked solutions in which (for 80% of
              problems) one step has an arithmetic slip that is carried into
              the later steps and the final answer.

  Real prose for the rest of a mixture is *not* copied: a spec points at
  ``../data/austen.txt.gz`` etc. (see ../data/SOURCES.md).

- ``test.jsonl``: test questions (another seed; no test question appears in
  the train split) with gold answer and clean gold solution;
- ``traces.jsonl``: one rbridge trace per test question whose reasoning is
  SAMPLED (temperature 1.0, fixed seed) from a "stronger" reference model, a
  ~2.75M-parameter LlamaForCausalLM (hidden 256, 4 layers) with its own byte-level BPE, trained here on
  the clean train problems only; every token carries its log-probability under
  the model's raw distribution (rbridge's trace format, see
  rbridge/scoring/traces.py). The traces are therefore not templated text: they
  carry the reference model's own uncertainty, including its mistakes.

Everything is deterministic (fixed seeds, one torch thread, gzip mtime=0):
re-running the script on the same software rewrites every file byte for byte.
The reference model trains for about 9 minutes on one CPU thread.

``--learnability`` additionally trains two 2M-parameter proxies (25% clean +
75% Austen, and 100% Austen) and prints their greedy accuracy on 200 test
questions; it writes nothing.

Usage:  python scripts/make_ladder.py [--out specs/ladder] [--quick] [--learnability
        [--learn-tokens N] [--learn-shares 0.25,0]]
"""
from __future__ import annotations

import argparse
import gzip
import io
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing rbridge, too

SEED_TEST, SEED_NOISE, SEED_DOCS = 22, 33, 44
SEED_REF_INIT, SEED_REF_DATA, SEED_SAMPLE = 55, 66, 77
N_TRAIN, N_TEST = 80_000, 1_000   # train problems: enough task tokens for an 80% share of 1.5M tokens
NOISE_RATE = 0.8
BENCHMARK = "ladder"
REF_MODEL = "ladder-reference"
# The reference ("frontier") model: 4x the targets' non-embedding parameters, trained on the clean task
# only. Tiny models learn to copy the question's numbers only after a few thousand optimizer steps (a 0.5M
# model: 4% greedy accuracy after 1,200 steps of 512 tokens, 93% after 2,900), so it takes many small steps.
REF_SHAPE = dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=3, num_key_value_heads=3,
                 intermediate_size=576)
REF_VOCAB = 512
REF_SEQ, REF_BATCH, REF_LR = 64, 8, 1e-2
REF_TOKENS = 1_500_000          # 2,900 steps (~6 min on two idle cores)
MAX_NEW_TOKENS = 64
TEMPERATURE = 1.0

# ------------------------------------------------------------------ the task



def _apply(x, op, y):
    return x * y if op == "*" else x + y if op == "+" else x - y


def solve(plan, slip=None):
    """Steps of ``plan`` as (x, op, y, result); ``slip`` = (step index, delta) adds an error there.

    A ``None`` operand is the previous step's result; ``"P"`` operands are the
    results of the two steps before (the 4-step template). Errors propagate.
    """
    steps, results = [], []
    for i, (x, op, y) in enumerate(plan):
        if x == "P":
            x, y = results[-2], results[-1]
        x = results[-1] if x is None else x
        y = results[-1] if y is None else y
        r = _apply(x, op, y)
        if slip is not None and slip[0] == i:
            r += slip[1]
        steps.append((x, op, y, r))
        results.append(r)
    return steps


def solution_text(steps):
    body = " ".join(f"{x} {op} {y} = {r}." for x, op, y, r in steps)
    return f"{body} The answer is {steps[-1][3]}."


def all_problems():
    """Every problem of the task: two-step expressions of single-digit numbers, in a fixed order.

    ``a + b - c``, ``a + b + c``, ``a - b + c``, ``a * b + c`` and ``a * b - c`` (products of 2-5),
    every intermediate and final result >= 0: about 1,900 problems. The question states the
    expression in words-and-symbols ("What is 7 + 5 - 3?"); the solution works it left to right.
    """
    out = []
    for a in range(1, 10):
        for b in range(1, 10):
            for c in range(1, 10):
                out.append((f"What is {a} + {b} + {c}?", [(a, "+", b), (None, "+", c)]))
                if c < a + b:
                    out.append((f"What is {a} + {b} - {c}?", [(a, "+", b), (None, "-", c)]))
                if b < a:
                    out.append((f"What is {a} - {b} + {c}?", [(a, "-", b), (None, "+", c)]))
    for a in range(2, 6):
        for b in range(2, 6):
            for c in range(1, 10):
                out.append((f"What is {a} * {b} + {c}?", [(a, "*", b), (None, "+", c)]))
                if c < a * b:
                    out.append((f"What is {a} * {b} - {c}?", [(a, "*", b), (None, "-", c)]))
    return out


def split_problems(seed, n_test, n_train):
    """``n_test`` distinct test problems and ``n_train`` train problems drawn (with repeats) from the
    others: no test question is ever trained on; a model must compose the steps it learned."""
    problems = all_problems()
    rng = random.Random(seed)
    rng.shuffle(problems)
    test, pool = problems[:n_test], problems[n_test:]
    return rng.choices(pool, k=n_train), test


def noisy_solution(plan, rng):
    steps = solve(plan)
    if rng.random() >= NOISE_RATE:
        return solution_text(steps)
    while True:
        i = rng.randrange(len(plan))
        d = rng.choice([-10, -2, -1, 1, 2, 10])
        bad = solve(plan, (i, d))
        if all(r >= 0 for *_, r in bad) and bad[-1][3] != steps[-1][3]:
            return solution_text(bad)


# ------------------------------------------------------------------ files

def write_gz_jsonl(path: Path, texts):
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as gz:
        for t in texts:
            gz.write((json.dumps({"text": t}, ensure_ascii=False) + "\n").encode("utf-8"))
    path.write_bytes(buf.getvalue())


def write_jsonl(path: Path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def group_docs(items, seed):
    """Join problem texts into documents of 1-4 problems (blank line between), fixed grouping."""
    rng = random.Random(seed)
    docs, i = [], 0
    while i < len(items):
        k = rng.randint(1, 4)
        docs.append("\n\n".join(items[i:i + k]))
        i += k
    return docs


# ------------------------------------------------------------------ models

def bpe_tokenizer(texts, vocab_size):
    """A GPT-2 style byte-level BPE (rbridge's proxy tokenizer recipe) trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from rbridge.data.tokenizer import SPECIAL_TOKEN
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[SPECIAL_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    texts = list(texts)
    tok.train_from_iterator([texts[i:i + 1000] for i in range(0, len(texts), 1000)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIAL_TOKEN, eos_token=SPECIAL_TOKEN,
                                   pad_token=SPECIAL_TOKEN)


def new_model(shape, vocab_size, eos, seq_len, seed):
    import torch
    from transformers import LlamaConfig

    from rbridge.proxy.model import ProxyLlamaForCausalLM
    cfg = LlamaConfig(vocab_size=vocab_size, max_position_embeddings=seq_len, tie_word_embeddings=True,
                      bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, initializer_range=0.02,
                      use_cache=True, **shape)
    torch.manual_seed(seed)
    return ProxyLlamaForCausalLM(cfg)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def train(model, docs_ids, eos, *, tokens, seq_len, batch, lr, seed, log=""):
    """Plain AdamW on packed ``[EOS] doc [EOS] doc ...`` streams (documents reshuffled every epoch).

    Returns (tokens trained, seconds). The fused loss of rbridge's proxies is used (same maths as
    LlamaForCausalLM's loss, faster on CPU).
    """
    import torch
    rng = random.Random(seed)
    steps = max(1, tokens // (seq_len * batch))

    def stream():
        while True:
            order = list(range(len(docs_ids)))
            rng.shuffle(order)
            for i in order:
                yield eos
                yield from docs_ids[i]

    it = stream()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
    model.train()
    t0, loss_ema = time.time(), None
    for s in range(steps):
        x = torch.tensor([[next(it) for _ in range(seq_len)] for _ in range(batch)], dtype=torch.long)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss_ema = loss.item() if loss_ema is None else 0.95 * loss_ema + 0.05 * loss.item()
        if log and (s + 1) % max(1, steps // 10) == 0:
            el = time.time() - t0
            print(f"  [{log}] step {s + 1}/{steps} loss {loss_ema:.3f} {el:.0f}s "
                  f"{(s + 1) * seq_len * batch / el:.0f} tok/s", flush=True)
    model.eval()
    return steps * seq_len * batch, time.time() - t0


def continue_prompts(model, tok, questions, *, temperature=None, seed=0, logprobs=False, batch_size=50):
    """Continuations of ``[EOS] question \\n`` (rbridge's question context), stopping at EOS."""
    from rbridge.scoring.decoding import generate
    eos = tok.eos_token_id
    prompts = [[eos] + tok(q + "\n", add_special_tokens=False)["input_ids"] for q in questions]
    return generate(model, prompts, max_new_tokens=MAX_NEW_TOKENS, stop=[eos], pad_id=eos,
                    batch_size=batch_size, temperature=temperature, seed=seed, logprobs=logprobs)


def is_correct(text, gold):
    from rbridge.scoring.baselines import last_number
    got = last_number(text.split("\n\n")[0])
    return got is not None and abs(got - float(gold)) < 1e-6


# ------------------------------------------------------------------ traces

def cut_tokens(texts, lps):
    """Token texts/logprobs up to the first blank line, trailing whitespace-only tokens dropped."""
    out_t, out_l, acc = [], [], ""
    for t, lp in zip(texts, lps):
        if "\n\n" in acc + t:
            keep = (acc + t).split("\n\n")[0][len(acc):]
            if keep:
                out_t.append(keep)
                out_l.append(lp)
            break
        out_t.append(t)
        out_l.append(lp)
        acc += t
    while out_t and not out_t[-1].strip():
        out_t.pop()
        out_l.pop()
    return out_t, out_l


def make_traces(test, train_problems, quick):
    from rbridge.scoring.completions import stream_texts
    from rbridge.scoring.traces import Frontier, FrontierToken, Trace

    clean_texts = [q + "\n" + solution_text(solve(plan)) for q, plan in train_problems]
    tok = bpe_tokenizer(clean_texts, REF_VOCAB)
    eos = tok.eos_token_id
    docs = [tok(t, add_special_tokens=False)["input_ids"] for t in clean_texts]
    n_doc_tok = sum(len(d) + 1 for d in docs)
    model = new_model(REF_SHAPE, len(tok), eos, REF_SEQ, SEED_REF_INIT)
    budget = REF_TOKENS // 10 if quick else REF_TOKENS
    print(f"reference model: {n_params(model):,} params, vocab {len(tok)}, train problems {len(docs):,} "
          f"({n_doc_tok:,} tokens/epoch), training on {budget:,} tokens", flush=True)
    trained, secs = train(model, docs, eos, tokens=budget, seq_len=REF_SEQ, batch=REF_BATCH, lr=REF_LR,
                          seed=SEED_REF_DATA, log="reference")
    print(f"reference trained: {trained:,} tokens in {secs:.0f}s ({trained / secs:.0f} tok/s)", flush=True)

    questions = [r["question"] for r in test]
    t0 = time.time()
    greedy = continue_prompts(model, tok, questions)
    g_ok = [is_correct(tok.decode(g.ids), r["answer"]) for g, r in zip(greedy, test)]
    sampled = continue_prompts(model, tok, questions, temperature=TEMPERATURE, seed=SEED_SAMPLE, logprobs=True)
    print(f"generation: {time.time() - t0:.0f}s", flush=True)

    traces, s_ok, all_lp = [], [], []
    shape = dict(REF_SHAPE, vocab_size=len(tok), params=n_params(model))
    for i, (g, row) in enumerate(zip(sampled, test)):
        texts, lps = cut_tokens(stream_texts(tok, g.ids), g.logprobs)
        if not "".join(texts).strip():        # an empty sample cannot be a trace: keep the greedy one's text
            raise RuntimeError(f"empty sample for test question {row['id']}")
        reasoning = "".join(texts)
        ok = is_correct(reasoning, row["answer"])
        s_ok.append(ok)
        toks = [FrontierToken(text=t, logprob=0.0 if round(min(0.0, lp), 6) == 0 else round(min(0.0, lp), 6))
                for t, lp in zip(texts, lps)]
        all_lp += [t.logprob for t in toks]
        traces.append(Trace(
            id=row["id"], benchmark=BENCHMARK, question=row["question"], reasoning=reasoning,
            answer=row["answer"], label=row["label"], frontier=Frontier(model=REF_MODEL, tokens=toks),
            metadata={"method": "sampled", "temperature": TEMPERATURE, "top_k": 0, "top_p": 1.0,
                      "seed": SEED_SAMPLE, "frontier_model": REF_MODEL,
                      "frontier_source": "scripts/make_ladder.py (trained on data/clean.jsonl.gz problems)",
                      "reference_model": shape, "reference_tokenizer": f"byte-level BPE {len(tok)}",
                      "reference_train_tokens": trained, "questions_source": f"test.jsonl#{i + 1}",
                      "prompt": "[EOS] question \\n", "truncated": g.truncated, "sampled_correct": ok}))
    stats = dict(greedy_acc=sum(g_ok) / len(g_ok), sampled_acc=sum(s_ok) / len(s_ok),
                 lp_mean=statistics.fmean(all_lp), lp_std=statistics.pstdev(all_lp),
                 lp_min=min(all_lp), n_tokens=len(all_lp), train_secs=secs, params=n_params(model))
    return traces, stats


# ------------------------------------------------------------------ learnability check

def read_austen():
    with gzip.open(REPO / "specs" / "data" / "austen.txt.gz", "rt", encoding="utf-8") as f:
        return [p.strip() for p in f.read().split("\n\n") if p.strip()]


def learnability(clean_docs, test, n_eval=200, tokens=1_500_000, shares=(0.25, 0.0)):
    austen = read_austen()
    tok = bpe_tokenizer(austen + clean_docs, 4096)
    eos = tok.eos_token_id
    enc = lambda ds: [tok(d, add_special_tokens=False)["input_ids"] for d in ds]  # noqa: E731
    a_ids, c_ids = enc(austen), enc(clean_docs)
    print(f"learnability: austen {sum(map(len, a_ids)):,} tokens, clean {sum(map(len, c_ids)):,} tokens "
          f"(vocab {len(tok)})", flush=True)
    shape = dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=3, num_key_value_heads=3,
                 intermediate_size=576)
    questions, golds = [r["question"] for r in test[:n_eval]], [r["answer"] for r in test[:n_eval]]
    for share in shares:
        name = f"clean{round(share * 100)}" if share else "prose"
        rng = random.Random(1)
        docs, n_c, n_a = [], 0, 0
        ci, ai = list(range(len(c_ids))), list(range(len(a_ids)))
        rng.shuffle(ci)
        rng.shuffle(ai)
        for i in ci:                     # task documents up to their share of the budget (one pass)
            if n_c >= share * tokens:
                break
            docs.append(c_ids[i])
            n_c += len(c_ids[i]) + 1
        while n_a < (1 - share) * tokens:  # prose up to its share (Austen is repeated when short)
            for i in ai:
                if n_a >= (1 - share) * tokens:
                    break
                docs.append(a_ids[i])
                n_a += len(a_ids[i]) + 1
        model = new_model(shape, len(tok), eos, 256, 0)
        trained, secs = train(model, docs, eos, tokens=tokens, seq_len=256, batch=8, lr=1e-2, seed=2, log=name)
        t0 = time.time()
        gens = continue_prompts(model, tok, questions)
        outs = [tok.decode(g.ids) for g in gens]
        acc = sum(is_correct(o, g) for o, g in zip(outs, golds)) / len(golds)
        print(f"LEARNABILITY {name}: params {n_params(model):,}, mixture task {n_c:,} + prose {n_a:,} tokens, "
              f"trained {trained:,} tokens in {secs:.0f}s ({trained / secs:.0f} tok/s), "
              f"greedy acc {acc:.3f} on {len(golds)} (eval {time.time() - t0:.0f}s)", flush=True)
        for o in outs[:3]:
            print("   sample:", repr(o.split("\n\n")[0][:120]))


# ------------------------------------------------------------------ main

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / "specs" / "ladder"))
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: a reference model trained on a tenth of the tokens")
    ap.add_argument("--learnability", action="store_true",
                    help="also train two 2M proxies (25%% clean + prose, prose only) and print their accuracy")
    ap.add_argument("--learn-tokens", type=int, default=1_500_000, help="tokens per learnability proxy")
    ap.add_argument("--learn-shares", default="0.25,0", help="clean-task shares of the learnability proxies")
    ap.add_argument("--no-traces", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    import torch
    torch.set_num_threads(2)            # fixed, so that the files regenerate byte for byte
    out = Path(args.out)
    (out / "data").mkdir(parents=True, exist_ok=True)

    train_problems, test_problems = split_problems(SEED_TEST, N_TEST, N_TRAIN)
    assert not {q for q, _ in test_problems} & {q for q, _ in train_problems}

    nrng = random.Random(SEED_NOISE)
    clean = [q + "\n" + solution_text(solve(p)) for q, p in train_problems]
    answers = [q + "\n" + f"The answer is {solve(p)[-1][3]}." for q, p in train_problems]
    noisy = [q + "\n" + noisy_solution(p, nrng) for q, p in train_problems]
    n_wrong = sum(a.rsplit(" ", 1)[1] != b.rsplit(" ", 1)[1] for a, b in zip(clean, noisy))
    for name, items in (("clean", clean), ("answers", answers), ("noisy", noisy)):
        docs = group_docs(items, SEED_DOCS)    # same grouping for all three
        write_gz_jsonl(out / "data" / f"{name}.jsonl.gz", docs)
        chars = sum(map(len, docs))
        print(f"data/{name}.jsonl.gz: {len(docs):,} docs, {len(items):,} problems, {chars:,} chars "
              f"(~{chars / 3.5:,.0f} tokens), {(out / 'data' / f'{name}.jsonl.gz').stat().st_size:,} bytes",
              flush=True)
    print(f"noisy: {n_wrong:,} of {len(noisy):,} problems end in a wrong answer")

    test = []
    for i, (q, p) in enumerate(test_problems):
        steps = solve(p)
        test.append({"id": f"ladder-{i}", "question": q, "answer": str(steps[-1][3]),
                     "label": solution_text(steps)})
    write_jsonl(out / "test.jsonl", test)

    if args.learnability:
        learnability(group_docs(clean, SEED_DOCS), test, tokens=args.learn_tokens,
                     shares=[float(x) for x in args.learn_shares.split(",")])

    if not args.no_traces:
        from rbridge.scoring.traces import load_traces, write_traces
        traces, st = make_traces(test, train_problems, args.quick)
        write_traces(out / "traces.jsonl", traces)
        back = load_traces(out / "traces.jsonl")
        assert len(back) == len(test)
        print(f"traces.jsonl: {len(back)} traces; reference {st['params']:,} params, trained {st['train_secs']:.0f}s; "
              f"accuracy greedy {st['greedy_acc']:.3f}, sampled {st['sampled_acc']:.3f}; token logprob "
              f"mean {st['lp_mean']:.4f} std {st['lp_std']:.4f} min {st['lp_min']:.3f} over {st['n_tokens']:,} tokens")


if __name__ == "__main__":
    main()
