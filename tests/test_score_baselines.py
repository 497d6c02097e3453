"""Baselines (METHOD.md section 4): hand-computed multiple-choice values, label NLL and MC
log-likelihoods against a naive unbatched loop, the GSM8K checker, batched greedy generation."""

import math

import numpy as np
import pytest
import torch

from rbridge.scoring.baselines import (baseline_scores, cloze_context, greedy_generate, gsm8k_check,
                                       last_number, mc_values)
from rbridge.scoring.traces import Frontier, FrontierToken, Trace

torch.set_num_threads(2)


def test_mc_values_by_hand():
    # three choices with probabilities .5, .2, .1 and lengths 4, 2, 5 characters; gold 0
    v = mc_values([math.log(0.5), math.log(0.2), math.log(0.1)], [4, 2, 5], 0)
    pc = [0.5 ** (1 / 4), 0.2 ** (1 / 2), 0.1 ** (1 / 5)]     # 0.840896, 0.447214, 0.630957: sum 1.919067
    assert v["correct_prob"] == pytest.approx(0.5)
    assert v["total_prob"] == pytest.approx(0.8)
    assert v["margin"] == pytest.approx(0.3)
    assert v["correct_prob_per_char"] == pytest.approx(0.840896, abs=1e-6)
    assert v["norm_correct_prob"] == pytest.approx(pc[0] / sum(pc)) == pytest.approx(0.438180, abs=1e-6)
    assert v["norm_correct_prob_raw"] == pytest.approx(0.5 / 0.8)
    assert v["acc_cloze"] == 1.0 and v["acc_cloze_raw"] == 1.0
    # gold 2: raw argmax is choice 0, per-character argmax is still choice 0
    w = mc_values([math.log(0.5), math.log(0.2), math.log(0.1)], [4, 2, 5], 2)
    assert w["margin"] == pytest.approx(0.1 - 0.5) and w["acc_cloze"] == 0.0
    # per-character normalization changes the winner: .3 over 30 chars beats .4 over 2 chars
    u = mc_values([math.log(0.4), math.log(0.3)], [2, 30], 1)
    assert u["acc_cloze"] == 1.0 and u["acc_cloze_raw"] == 0.0


def test_last_number_and_gsm8k_checker():
    assert last_number("so 1,234.5 then 7.") == 7.0 and last_number("x 1,234") == 1234.0
    assert last_number("none") is None
    t = Trace(id="a", benchmark="gsm8k", question="q", reasoning="r", answer="99", label="... #### 1,200",
              frontier=Frontier(model="m", tokens=[FrontierToken(text="r", logprob=0)]))
    assert gsm8k_check("She has 3 + 4 = 7, so 1200 in all.\n\nQuestion: 5", t)
    assert not gsm8k_check("The answer is 99", t)   # gold comes from the label, not the frontier answer


def _trace(i, **kw):
    return Trace(id=f"t{i}", benchmark="arc", question=kw.pop("question", "How many clips?"),
                 reasoning="Natalia sold 48/2 = 24 clips.", answer="24",
                 frontier=Frontier(model="f", tokens=[FrontierToken(text="Natalia sold 48/2 = 24 clips.",
                                                                    logprob=-0.1)]), **kw)


def _sum_ll(model, ctx, cont):
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ctx + cont])).logits[0].double()
    lp = torch.log_softmax(logits, -1)
    return [float(lp[len(ctx) - 1 + k, t]) for k, t in enumerate(cont)]


def test_baseline_scores_match_a_naive_loop(model, tokenizer):
    traces = [_trace(0, choices=["24", "48 clips", "72"], gold=0, label="24 clips"),
              _trace(1, question="Café?", choices=["crème", "€ 3"], gold=1),
              _trace(2, label="The answer is 72.")]
    got = baseline_scores(model, tokenizer, traces, context="question", precision="fp32", batch_size=2)
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]   # noqa: E731
    bos = tokenizer.bos_token_id
    lab = [np.mean(-np.array(_sum_ll(model, [bos] + enc(t.question + "\n"), enc(t.label)))) for t in (traces[0], traces[2])]
    assert got["n_label"] == 2 and got["label_nll"] == pytest.approx(np.mean(lab), abs=1e-5)
    rows = []
    for t in traces[:2]:
        ctx = [bos] + enc(cloze_context(t))
        lls = [sum(_sum_ll(model, ctx, enc(" " + c))) for c in t.choices]
        rows.append(mc_values(lls, [len(" " + c) for c in t.choices], t.gold))
    assert got["n_mc"] == 2
    for k in ("correct_prob", "norm_correct_prob", "total_prob", "margin", "acc_cloze"):
        assert got[k] == pytest.approx(np.mean([r[k] for r in rows]), rel=1e-4, abs=1e-9), k
    assert "acc_greedy" not in got
    # no labels, no choices: no baseline keys
    assert baseline_scores(model, tokenizer, [_trace(3)], precision="fp32") == {}


def test_batched_greedy_generation_matches_one_at_a_time(model, tokenizer):
    enc = lambda s: [tokenizer.bos_token_id] + tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompts = [enc("Natalia sold 48/2"), enc("Weng earns 12/60 = 0.2 per minute.\nThe"), enc("Café")]
    batched = greedy_generate(model, tokenizer, prompts, max_new_tokens=6, batch_size=3, pad_id=2)
    single = [greedy_generate(model, tokenizer, [p], max_new_tokens=6, batch_size=1, pad_id=2)[0] for p in prompts]
    assert batched == single
    t = Trace(id="g", benchmark="gsm8k", question="Natalia sold 48/2", reasoning="r", answer="1", label="#### 1",
              frontier=Frontier(model="m", tokens=[FrontierToken(text="r", logprob=0)]))
    out = baseline_scores(model, tokenizer, [t], precision="fp32", accuracy=True, max_new_tokens=4)
    assert out["n_acc"] == 1 and out["acc_greedy"] in (0.0, 1.0) and out["label_nll"] > 0
