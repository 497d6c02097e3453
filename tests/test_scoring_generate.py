"""Frontier traces from a local model: rescoring by teacher forcing, generation, token streams."""

import json
import math

import numpy as np
import torch

from rbridge.scoring.generate import (Question, generate_traces, prompt_ids, rescore_solutions,
                                      stream_texts)
from rbridge.scoring.traces import load_traces, write_traces

ITEMS = [Question(id="g-0", question="How many clips?", answer="72",
                  solution="Natalia sold 48/2 = 24 clips in May.\nCafé 😀 \"quoted\" \\ done."),
         Question(id="g-1", question="Weng?", answer="10", solution="She earned 0.2 x 50 = 10.")]


def naive_logprobs(model, ids, first):
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    lp = torch.log_softmax(logits, -1)
    return np.array([lp[p - 1, ids[p]].item() for p in range(first, len(ids))])


def test_stream_texts_hold_partial_characters(tokenizer):
    ids = tokenizer("a 😀 é", add_special_tokens=False)["input_ids"]
    texts = stream_texts(tokenizer, ids)
    assert "".join(texts) == "a 😀 é" and len(texts) == len(ids)
    assert all("\ufffd" not in t for t in texts)


def test_rescore_plain_matches_teacher_forcing(model, tokenizer, tmp_path):
    traces = rescore_solutions(model, tokenizer, ITEMS, model_name="tiny", metadata={"date": "2025-01-01"})
    assert [t.reasoning for t in traces] == [q.solution for q in ITEMS]
    for q, t in zip(ITEMS, traces):
        assert "".join(x.text for x in t.frontier.tokens) == q.solution
        assert t.metadata["method"] == "rescored" and t.metadata["date"] == "2025-01-01"
        ctx = prompt_ids(tokenizer, q.question, "grade school math")
        enc = tokenizer(q.solution, add_special_tokens=False)["input_ids"]
        expected = naive_logprobs(model, ctx + enc, len(ctx))
        got = [x.logprob for x in t.frontier.tokens]
        if q.id == "g-1":   # ASCII: one frontier token per model token, same logprobs
            np.testing.assert_allclose(got, expected, atol=2e-6)
        else:               # tokens holding only part of a character complete nothing: left out
            assert len(expected) - 3 <= len(got) < len(expected)
            it = iter(expected)
            assert all(any(abs(g - e) < 2e-6 for e in it) for g in got)   # an ordered subsequence
    # the emoji is split over byte-level tokens: it belongs to the completing one
    emoji_tok = next(x for x in traces[0].frontier.tokens if "😀" in x.text)
    assert emoji_tok.logprob <= 0
    write_traces(tmp_path / "t.jsonl", traces)
    assert load_traces(tmp_path / "t.jsonl") == traces


def test_rescore_json_format_maps_escapes_back(model, tokenizer):
    traces = rescore_solutions(model, tokenizer, ITEMS, assistant_format="json")
    for q, t in zip(ITEMS, traces):
        assert "".join(x.text for x in t.frontier.tokens) == q.solution
        assert all(x.text for x in t.frontier.tokens)
        assert t.metadata["assistant_format"] == "json"


def test_generate_drops_malformed_after_one_retry(model, tokenizer):
    res = generate_traces(model, tokenizer, ITEMS[:1], max_new_tokens=4)
    # a random model does not write JSON: tried twice, then dropped and counted
    assert res.traces == [] and res.dropped == ["g-0"]


def test_generate_keeps_well_formed_output(model, tokenizer, monkeypatch):
    import rbridge.scoring.generate as gen

    answer = '{"reasoning": "caf\\u00e9 \\ud83d\\ude00\\nok", "final_answer": 2}'
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    lps = [math.log(0.5)] * len(ids)
    monkeypatch.setattr(gen, "_generate_once", lambda *a, **k: (ids, lps, False))
    res = generate_traces(model, tokenizer, ITEMS[:1], model_name="tiny")
    (t,) = res.traces
    assert t.reasoning == "café 😀\nok" and t.answer == "2"
    assert "".join(x.text for x in t.frontier.tokens) == t.reasoning
    assert {x.logprob for x in t.frontier.tokens} == {round(math.log(0.5), 6)}
    assert t.metadata["method"] == "generated" and t.metadata["attempts"] == 1
    assert json.loads(t.to_json_line())["frontier"]["model"] == "tiny"
