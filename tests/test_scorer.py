"""The scorer against a naive per-token loop, on a real tiny Llama and a real BPE tokenizer
(fixtures ``model`` and ``tokenizer`` in conftest.py)."""

import math

import numpy as np
import pytest
import torch

from rbridge.errors import InputError
from rbridge.scoring.scorer import context_text, score_benchmarks, score_traces
from rbridge.scoring.traces import Frontier, FrontierToken, Trace
from rbridge.scoring.weights import normalize, trace_token_weights

torch.set_num_threads(2)

def make_trace(i, question, reasoning, pieces, probs, benchmark="gsm8k"):
    assert "".join(pieces) == reasoning
    return Trace(id=f"t{i}", benchmark=benchmark, question=question, reasoning=reasoning, answer="1",
                 frontier=Frontier(model="f", tokens=[FrontierToken(text=t, logprob=math.log(p))
                                                      for t, p in zip(pieces, probs)]))


@pytest.fixture(scope="module")
def traces():
    return [
        make_trace(0, "How many clips?", "Natalia sold 48/2 = 24 clips in May.",
                   ["Natalia", " sold", " 48", "/2", " = 24", " clips in May", "."],
                   [0.9, 0.8, 0.3, 0.5, 0.99, 0.7, 1.0]),
        make_trace(1, "Café?", "Café crème costs 3 €, and 😀.",
                   ["Caf", "é", " crème", " costs 3 ", "€", ", and ", "😀", "."],
                   [0.6, 0.2, 0.9, 0.4, 0.1, 0.95, 0.05, 1.0]),
        make_trace(2, "Weng?", "Weng earns 12/60 = 0.2 per minute.\nThe answer is 10.",
                   ["Weng earns 12/60 = 0.2 per minute.\n", "The answer is 10."], [0.5, 0.5]),
    ]


def naive_nll(model, ids, first):
    """-log p(ids[p] | ids[:p]) for p >= first, one unbatched forward pass per token."""
    out = []
    with torch.no_grad():
        for p in range(first, len(ids)):
            logits = model(input_ids=torch.tensor([ids[:p]])).logits[0, -1].double()
            out.append(-torch.log_softmax(logits, -1)[ids[p]].item())
    return np.array(out)


def naive_sequence(tokenizer, trace, context, pool):
    ctx = context_text(trace, context, pool)
    ctx_ids = tokenizer(ctx, add_special_tokens=False)["input_ids"] if ctx else []
    enc = tokenizer(trace.reasoning, add_special_tokens=False, return_offsets_mapping=True)
    return [tokenizer.bos_token_id] + ctx_ids, enc["input_ids"], enc["offset_mapping"]


@pytest.mark.parametrize("context", ["question", "none", "fewshot"])
def test_scorer_matches_naive_loop(model, tokenizer, traces, context):
    got = score_traces(model, tokenizer, traces, context=context, precision="fp32", batch_size=16)
    nlls, raw = [], []
    for t in traces:
        ctx, cont, offs = naive_sequence(tokenizer, t, context, traces)
        nlls.append(naive_nll(model, ctx + cont, len(ctx)))
        raw.append(trace_token_weights([x.text for x in t.frontier.tokens],
                                       [x.logprob for x in t.frontier.tokens], offs))
    norm = normalize(raw, "trace")
    for t, nll, w, wn, per in zip(traces, nlls, raw, norm, got.traces):
        assert per.n_tokens == len(nll)
        assert per.nll == pytest.approx(nll.mean(), abs=1e-5)
        assert per.rbridge == pytest.approx(np.mean(nll * wn), abs=1e-5)
        assert per.rbridge_no_minmax == pytest.approx(np.mean(nll * w), abs=1e-5)
        assert per.bpb == pytest.approx(nll.sum() / (math.log(2) * len(t.reasoning.encode())), abs=1e-5)
    assert got.nll == pytest.approx(np.mean([n.mean() for n in nlls]), abs=1e-5)
    assert got.n_tokens == sum(len(n) for n in nlls) and got.n_traces == 3
    assert got.rbridge < got.nll   # MinMax weights are <= 1
    assert got.nll > 0.5           # the sharpened random model is far from the traces


def test_batching_and_padding_do_not_change_results(model, tokenizer, traces):
    a = score_traces(model, tokenizer, traces, precision="fp32", batch_size=1)
    b = score_traces(model, tokenizer, traces, precision="fp32", batch_size=3)
    c = score_traces(model, tokenizer, list(reversed(traces)), precision="fp32", batch_size=2)
    for x, y in zip(a.traces, b.traces):
        assert x.nll == pytest.approx(y.nll, abs=1e-6) and x.rbridge == pytest.approx(y.rbridge, abs=1e-6)
    by_id = {t.id: t for t in c.traces}
    for x in a.traces:
        assert x.nll == pytest.approx(by_id[x.id].nll, abs=1e-6)


def test_options_aggregate_minmax_and_json(model, tokenizer, traces):
    mean = score_traces(model, tokenizer, traces, precision="fp32")
    weighted = score_traces(model, tokenizer, traces, precision="fp32", aggregate="weighted")
    none = score_traces(model, tokenizer, traces, precision="fp32", minmax="none")
    bench = score_traces(model, tokenizer, traces, precision="fp32", minmax="benchmark")
    # trace 2 has equal frontier weights: every normalized weight is 1 -> rbridge == nll
    assert mean.traces[2].rbridge == pytest.approx(mean.traces[2].nll, abs=1e-12)
    assert weighted.traces[2].rbridge == pytest.approx(mean.traces[2].nll, abs=1e-12)
    assert none.rbridge == pytest.approx(none.rbridge_no_minmax, abs=1e-12)
    assert bench.nll == pytest.approx(mean.nll, abs=1e-12)
    d = mean.to_dict()
    assert set(d) == {"rbridge", "nll", "rbridge_no_minmax", "bpb", "n_traces", "n_tokens",
                      "context", "minmax", "aggregate"}
    assert (d["context"], d["minmax"], d["aggregate"]) == ("question", "trace", "mean")


def test_long_traces_use_a_strided_window(model, tokenizer, traces):
    t = traces[2]
    full = score_traces(model, tokenizer, [t], precision="fp32")
    short = score_traces(model, tokenizer, [t], precision="fp32", max_length=8)
    ctx, cont, _ = naive_sequence(tokenizer, t, "question", [t])
    assert len(ctx) + len(cont) > 8
    assert short.traces[0].n_tokens == full.traces[0].n_tokens == len(cont)
    # naive: every continuation token once, from a window of <= 8 tokens ending at it
    ids, expected, pos = ctx + cont, [], len(ctx)
    while pos < len(ids):
        end = min(len(ids), max(pos + 4, 8))
        start = max(0, end - 8)
        expected.extend(naive_nll(model, ids[start:end], pos - start))
        pos = end
    assert short.traces[0].nll == pytest.approx(np.mean(expected), abs=1e-5)
    assert short.traces[0].nll != pytest.approx(full.traces[0].nll, abs=1e-6)


def test_bf16_is_close_and_model_dtype_restored(model, tokenizer, traces):
    fp32 = score_traces(model, tokenizer, traces, precision="fp32")
    bf16 = score_traces(model, tokenizer, traces, precision="bf16")
    assert bf16.nll == pytest.approx(fp32.nll, rel=0.05)
    assert next(model.parameters()).dtype == torch.float32


def test_mixed_benchmarks_and_bad_options(model, tokenizer, traces):
    other = make_trace(9, "Q?", "The answer is 72.", ["The answer", " is 72."], [0.3, 0.9], benchmark="arc")
    with pytest.raises(InputError):
        score_traces(model, tokenizer, traces + [other])
    res = score_benchmarks(model, tokenizer, traces + [other], precision="fp32")
    assert list(res) == ["gsm8k", "arc"] and res["arc"].n_traces == 1
    with pytest.raises(ValueError):
        score_traces(model, tokenizer, traces, context="zero")


def test_fewshot_context_excludes_scored_trace(traces):
    ctx = context_text(traces[0], "fewshot", traces, k=3)
    assert traces[0].reasoning not in ctx
    assert ctx.startswith(traces[1].question + "\n" + traces[1].reasoning)
    assert ctx.endswith(traces[0].question + "\n")
