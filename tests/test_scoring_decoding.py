"""The one generation loop (rbridge.scoring.decoding) and what each command keeps of the two loops it
replaced: ``rbridge score --accuracy`` stops at the tokenizer's EOS only, ``rbridge traces generate``
also at the model's other EOS ids; a JSON-null final answer is "null" in generated traces and ""
in imported ones."""

import copy
import json
import math

import numpy as np
import pytest
import torch

import rbridge.scoring.generate as gen
from rbridge.scoring import decoding
from rbridge.scoring.baselines import greedy_generate
from rbridge.scoring.completions import answer_text
from rbridge.scoring.generate import Question, generate_traces
from rbridge.scoring.importers import import_openai


@pytest.fixture(scope="module")
def prompts(tokenizer):
    enc = lambda s: [tokenizer.bos_token_id] + tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    return [enc("Natalia sold 48/2"), enc("Weng earns 12/60 = 0.2 per minute.\nThe"), enc("Café")]


def test_batched_generation_matches_one_prompt_at_a_time(model, prompts):
    kw = dict(max_new_tokens=5, stop=[1], pad_id=2, logprobs=True)
    batched = decoding.generate(model, prompts, batch_size=3, **kw)
    for p, b in zip(prompts, batched):
        (one,) = decoding.generate(model, [p], **kw)
        assert b.ids == one.ids and b.truncated == one.truncated
        np.testing.assert_allclose(b.logprobs, one.logprobs, atol=1e-5)
    for p, g in zip(prompts, batched):   # raw logprobs: the model's own next-token distribution
        ids = p + g.ids
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
        np.testing.assert_allclose(g.logprobs, [lp[len(p) - 1 + k, t].item() for k, t in enumerate(g.ids)],
                                   atol=1e-4)
        assert g.truncated == (len(g.ids) == 5)


def test_sampling_is_seeded(model, prompts):
    kw = dict(max_new_tokens=6, stop=[1], pad_id=2, temperature=0.7)
    a = decoding.generate(model, prompts[:1], seed=3, **kw)[0].ids
    assert decoding.generate(model, prompts[:1], seed=3, **kw)[0].ids == a


@pytest.fixture
def extra_eos(model, tokenizer, prompts):
    """A copy of the model whose generation config lists one more EOS id: a token greedy decoding of
    prompt 0 first emits at position k >= 1. Returns the copy, the 6 greedy ids, k."""
    m = copy.deepcopy(model)
    (g,) = decoding.generate(m, prompts[:1], max_new_tokens=6, stop=[], pad_id=2)
    assert len(g.ids) == 6 and tokenizer.eos_token_id not in g.ids
    k = next(k for k in range(1, 6) if g.ids[k] not in g.ids[:k])
    m.generation_config.eos_token_id = [tokenizer.eos_token_id, g.ids[k]]
    return m, g.ids, k


def test_accuracy_baseline_stops_at_the_tokenizer_eos_only(extra_eos, tokenizer, prompts):
    m, full, _ = extra_eos
    text = greedy_generate(m, tokenizer, prompts[:1], max_new_tokens=6, pad_id=2)[0]
    assert text == tokenizer.decode(full, skip_special_tokens=True)   # went on past the model's extra EOS


def test_trace_generation_stops_at_every_eos_of_the_model(extra_eos, tokenizer, prompts):
    m, full, k = extra_eos
    assert decoding.stop_ids(m, tokenizer) == sorted({tokenizer.eos_token_id, full[k]})
    ids, lps, truncated = gen._generate_once(m, tokenizer, prompts[0], max_new_tokens=6, temperature=None, seed=0)
    assert ids == full[:k] and len(lps) == k and not truncated


def test_null_final_answer_generated_vs_imported(model, tokenizer, monkeypatch, tmp_path):
    assert answer_text(None) == "" and answer_text(None, null="null") == "null"
    assert answer_text(2) == "2" and answer_text("x") == "x" and answer_text([1, "é"]) == '[1, "é"]'
    completion = '{"reasoning": "a b", "final_answer": null}'
    ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    monkeypatch.setattr(gen, "_generate_once", lambda *a, **k: (ids, [math.log(0.5)] * len(ids), False))
    q = Question(id="q", question="How many clips?")
    (t,) = generate_traces(model, tokenizer, [q], model_name="tiny").traces
    assert t.reasoning == "a b" and t.answer == "null"          # rbridge traces generate, as ever
    content = [{"token": c, "logprob": -0.1, "bytes": list(c.encode())} for c in completion]
    rec = {"choices": [{"message": {"content": completion}, "logprobs": {"content": content}}]}
    (tmp_path / "gsm8k.jsonl").write_text(json.dumps(rec) + "\n")
    (i,) = import_openai([tmp_path / "gsm8k.jsonl"])
    assert i.reasoning == "a b" and i.answer == ""               # rbridge traces import, as ever
