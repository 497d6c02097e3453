"""Generation (rbridge.scoring.decoding, the one loop behind target accuracy, ``rbridge score --accuracy``
and ``rbridge traces generate``) uses the key/value cache whatever the model's config says, and never
generates past the context the model was trained on (issue 24)."""

import warnings
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rbridge.errors import InputError
from rbridge.scoring import decoding
from rbridge.scoring.baselines import greedy_generate
from rbridge.scoring.task import accuracy_items, answer_budget
from rbridge.scoring.traces import load_traces

GSM8K = Path(__file__).resolve().parent.parent / "specs" / "traces" / "gsm8k.jsonl"


def tiny(tokenizer, positions: int = 1024) -> LlamaForCausalLM:
    """A tiny random Llama saved the way rbridge's proxies are: ``use_cache: false`` (training only),
    which transformers copies into the model's generation config."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=positions,
                      bos_token_id=0, eos_token_id=1, pad_token_id=2, use_cache=False)
    m = LlamaForCausalLM(cfg)
    with torch.no_grad():   # random init is too flat to tell tokens apart; sharpen it
        m.lm_head.weight.mul_(30.0)
    return m.eval()


class Calls:
    """Records each forward call of a model: (input length, whether a cache came in)."""

    def __init__(self, model):
        self.calls: list[tuple[int, bool]] = []
        self._h = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))   # transformers 5 / 4 name
        self.calls.append((ids.shape[1], cache is not None))

    @property
    def lengths(self) -> list[int]:
        return [n for n, _ in self.calls]

    @property
    def cached_steps(self) -> bool:
        """Every call after the first came with a cache."""
        return all(c for _, c in self.calls[1:])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._h.remove()


@pytest.fixture(scope="module")
def uncached(tokenizer):
    m = tiny(tokenizer)
    assert m.config.use_cache is False and m.generation_config.use_cache is False   # what proxies carry
    return m


def enc(tokenizer, text):
    return [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]


def test_every_step_after_the_first_feeds_one_token(uncached, tokenizer):
    prompts = [enc(tokenizer, "Natalia sold 48/2"), enc(tokenizer, "Weng earns 12/60 = 0.2 per minute.")]
    for kw in (dict(), dict(temperature=0.7, seed=1), dict(logprobs=True)):   # greedy, sampled, traces
        with Calls(uncached) as rec:
            (g,) = decoding.generate(uncached, prompts[:1], max_new_tokens=6, stop=[], pad_id=2, **kw)
        assert len(g.ids) == 6
        assert rec.lengths == [len(prompts[0])] + [1] * 5 and rec.cached_steps, kw
    with Calls(uncached) as rec:   # a left-padded batch
        decoding.generate(uncached, prompts, max_new_tokens=6, stop=[], pad_id=2, batch_size=2)
    assert rec.lengths == [max(map(len, prompts))] + [1] * 5 and rec.cached_steps
    # the model's own settings are left as they were
    assert uncached.config.use_cache is False and uncached.generation_config.use_cache is False


def test_cached_greedy_output_equals_uncached(uncached, tokenizer):
    prompts = [enc(tokenizer, s) for s in ("Natalia sold 48/2", "Weng earns 12/60 = 0.2 per minute.\nThe",
                                           "Café")]
    gens = decoding.generate(uncached, prompts, max_new_tokens=12, stop=[], pad_id=2, batch_size=3)
    for p, g in zip(prompts, gens):   # reference: the whole sequence through the model at every step
        ids = list(p)
        with torch.no_grad():
            for _ in range(12):
                logits = uncached(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1]
                ids.append(int(logits.argmax()))
        assert g.ids == ids[len(p):]


def test_budget_is_cut_to_the_context(tokenizer):
    m = tiny(tokenizer, positions=32)
    long, short = list(range(3, 23)), list(range(3, 8))   # 20 and 5 tokens
    with pytest.warns(decoding.ContextWarning) as w:
        (g,) = decoding.generate(m, [long], max_new_tokens=30, stop=[], pad_id=2)
    assert len(g.ids) == 12 and g.truncated
    (msg,) = [str(x.message) for x in w]
    assert "context of 32 positions" in msg and "a prompt of 20 tokens" in msg and "from 30 to 12" in msg
    # left padding: a batch's budget is set by its longest prompt
    with pytest.warns(decoding.ContextWarning):
        a, b = decoding.generate(m, [short, long], max_new_tokens=30, stop=[], pad_id=2, batch_size=2)
    assert len(a.ids) == len(b.ids) == 12
    with pytest.warns(decoding.ContextWarning) as w:   # one warning per call, however many batches are cut
        a, b = decoding.generate(m, [short, long], max_new_tokens=30, stop=[], pad_id=2, batch_size=1)
    assert (len(a.ids), len(b.ids)) == (27, 12)
    assert len(w) == 1 and "2 of 2 batches are cut, to 12-27" in str(w[0].message)
    with warnings.catch_warnings():   # within the context: no cut, no warning
        warnings.simplefilter("error")
        (g,) = decoding.generate(m, [long], max_new_tokens=12, stop=[], pad_id=2)
    assert len(g.ids) == 12


def test_a_prompt_that_fills_the_context_is_refused(tokenizer):
    m = tiny(tokenizer, positions=32)
    with Calls(m) as rec, pytest.raises(InputError, match="a prompt of 32 tokens fills the model's context of 32"):
        decoding.generate(m, [list(range(3, 8)), list(range(3, 35))], max_new_tokens=4, stop=[], pad_id=2)
    assert rec.calls == []   # refused before generating anything


def test_accuracy_paths_get_the_context_rule(tokenizer):
    """Target accuracy (task.accuracy_items with answer_budget) and ``rbridge score --accuracy``
    (baselines.greedy_generate) both go through the rule."""
    traces = load_traces(GSM8K)[:2]
    prompts = [enc(tokenizer, t.question + "\n") for t in traces]
    width = max(map(len, prompts))
    m = tiny(tokenizer, positions=width + 5)
    assert answer_budget(tokenizer, traces) > 5
    with pytest.warns(decoding.ContextWarning, match=f"context of {width + 5} positions"):
        assert accuracy_items(m, tokenizer, traces, checker="number") == [0.0, 0.0]
    with pytest.warns(decoding.ContextWarning, match=f"a prompt of {width} tokens"):
        greedy_generate(m, tokenizer, prompts, max_new_tokens=64, pad_id=2)


def test_a_plan_says_up_front_when_greedy_answers_would_be_cut(tokenizer, tmp_path):
    """rbridge.scoring.task.cut_answers: the longest prompt plus the answer budget against a context (what a
    plan prints for each stage that measures accuracy, rbridge.planner.steps.warn_cut_answers)."""
    import json

    from rbridge.scoring.task import answer_budget, answer_room, cut_answers, number_prompts
    from rbridge.scoring.traces import load_traces

    path = tmp_path / "t.jsonl"
    rows = [{"id": f"q{i}", "benchmark": "gsm8k", "question": "Natalia sold 48 clips in May." * (i + 1),
             "reasoning": "She sold 24 clips.", "answer": "24", "label": "48/2 = 24\n#### 24",
             "frontier": {"model": "m", "tokens": [{"text": "She sold", "logprob": -0.5},
                                                   {"text": " 24 clips.", "logprob": -0.1}]}}
            for i in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    traces = load_traces(path)
    longest = max(len(p) for p in number_prompts(tokenizer, traces))
    need = longest + answer_budget(tokenizer, traces)
    assert answer_room(tokenizer, traces) == (longest, need - longest)
    assert cut_answers(longest, need - longest, need) is None
    why = cut_answers(longest, need - longest, need - 5)
    assert why and f"up to {longest} tokens" in why and f"seq_len of {need}" in why
    assert f"cut to {need - 5 - longest} tokens" in why
