"""Requests: one batched pass fills each request's own results, whatever the batch size, the order
of the requests, or the windows long requests are cut into (fixtures ``model`` and ``tokenizer``)."""

import random

import numpy as np
import pytest
import torch

from rbridge.scoring.requests import Request, loglikelihood, request_nlls


def naive(model, ctx, cont):
    """Per-token NLL and greedy flag of one unpadded, unbatched forward pass."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ctx + cont])).logits[0].double()
    lp = torch.log_softmax(logits[len(ctx) - 1:-1], -1)
    tgt = torch.tensor(cont)
    return -lp.gather(-1, tgt[:, None])[:, 0].numpy(), bool((lp.argmax(-1) == tgt).all())


@pytest.fixture(scope="module")
def pairs(tokenizer):
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]   # noqa: E731
    bos = tokenizer.bos_token_id
    texts = [("How many clips?\n", "Natalia sold 48/2 = 24 clips in May."),
             ("", "Café crème costs 3 €, and 😀 is a smile."),
             ("Weng?\n", " 10"),
             ("Question: Which?\nAnswer:", " 72"),
             ("Working 50 minutes,", " she earned 0.2 x 50 = 10. The answer is 10.\nThe answer is 72.")]
    return [([bos] + enc(c), enc(x)) for c, x in texts]


def make(pairs):
    return [Request(ctx, cont, trace=i, kind="choice" if i % 2 else "label", option=i % 3)
            for i, (ctx, cont) in enumerate(pairs)]


@pytest.mark.parametrize("max_length", [None, 8])
def test_results_land_on_their_request_whatever_the_batch_order(model, pairs, max_length):
    reference = make(pairs)
    loglikelihood(model, reference, batch_size=1, precision="fp32", pad_id=2, max_length=max_length)
    rng = random.Random(0)
    for batch_size in (2, 3, 16):
        reqs = make(pairs)
        shuffled = reqs[:]
        rng.shuffle(shuffled)
        assert loglikelihood(model, shuffled, batch_size=batch_size, precision="fp32", pad_id=2,
                             max_length=max_length) is shuffled
        for ref, req in zip(reference, reqs):
            assert (req.trace, req.kind, req.option) == (ref.trace, ref.kind, ref.option)
            assert req.nll.shape == (len(req.continuation),)
            np.testing.assert_allclose(req.nll, ref.nll, rtol=1e-6, atol=1e-6)  # float32 rounding of batch shapes
            assert req.is_greedy == ref.is_greedy
            assert req.sum_logprob == -float(req.nll.sum()) and req.mean_nll == float(req.nll.mean())
            assert req.sum_logprob == pytest.approx(ref.sum_logprob, abs=1e-5)


def test_one_pass_matches_a_naive_loop_and_the_pair_api(model, pairs):
    reqs = make(pairs)
    loglikelihood(model, reqs, batch_size=3, precision="fp32", pad_id=2)
    for (ctx, cont), req in zip(pairs, reqs):
        nll, greedy = naive(model, ctx, cont)
        np.testing.assert_allclose(req.nll, nll, atol=1e-5)
        assert req.is_greedy == greedy
    for a, b in zip(request_nlls(model, pairs, batch_size=3, precision="fp32", pad_id=2), reqs):
        np.testing.assert_array_equal(a, b.nll)


def test_is_greedy_is_true_for_the_models_own_argmax(model, pairs):
    ctx = pairs[0][0]
    greedy_ids, ids = [], list(ctx)
    with torch.no_grad():
        for _ in range(4):
            nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            greedy_ids.append(nxt)
            ids.append(nxt)
    other = [(greedy_ids[0] + 1) % model.config.vocab_size] + greedy_ids[1:]
    reqs = [Request(ctx, greedy_ids), Request(ctx, other)]
    loglikelihood(model, reqs, precision="fp32")
    assert [r.is_greedy for r in reqs] == [True, False]


def test_misuse_is_an_error(model, pairs):
    r = Request(*pairs[0])
    with pytest.raises(RuntimeError, match="not been scored"):
        r.sum_logprob
    with pytest.raises(ValueError, match="non-empty context"):
        loglikelihood(model, [Request([], pairs[0][1])])
    with pytest.raises(ValueError, match="precision"):
        loglikelihood(model, [r], precision="fp16")


def test_nll_and_greedy_equal_log_softmax_and_argmax_with_ties():
    """The scorer's reduction against the textbook one, across chunk boundaries, with tied maxima
    (``argmax`` takes the first: a target tied with an earlier class is not greedy)."""
    from rbridge.scoring.requests import _nll_and_greedy

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(37, 11, generator=g).round()  # rounded: many ties
    targets = torch.randint(0, 11, (37,), generator=g)
    targets[:10] = logits[:10].argmax(-1)
    nll, hit = _nll_and_greedy(logits, targets, chunk=8)
    lp = torch.log_softmax(logits, -1)
    assert np.allclose(nll, -lp.gather(-1, targets[:, None])[:, 0].double().numpy(), atol=1e-6)
    assert (hit == (lp.argmax(-1) == targets).numpy()).all() and hit[:10].all() and not hit.all()


def test_blocked_head_equals_the_output_layer_then_log_softmax_with_ties():
    """The CPU path's output layer in vocabulary blocks, reduced block by block, against the output
    layer's logits then log_softmax and argmax: across block boundaries, with a bias, with the row
    maximum tied between blocks and within one (the first class wins), and in bf16."""
    from rbridge.scoring.requests import _head_nll_and_greedy, _nll_and_greedy

    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(29, 6, generator=g)
    weight = torch.randn(23, 6, generator=g)
    weight[17] = weight[4]          # class 17 ties class 4 on every row (another block at block=8)
    weight[6] = weight[5]           # class 6 ties class 5 (the same block)
    bias = torch.randn(23, generator=g)
    bias[17], bias[6] = bias[4], bias[5]
    logits = hidden @ weight.t() + bias
    targets = torch.randint(0, 23, (29,), generator=g)
    targets[:8] = logits[:8].argmax(-1)
    targets[8:12] = torch.tensor([17, 6, 4, 5])   # tied late copies are never greedy
    for block in (1, 5, 8, 23, 64):
        nll, hit = _head_nll_and_greedy(hidden, weight, bias, targets, block=block)
        lp = torch.log_softmax(logits, -1)
        assert np.allclose(nll, -lp.gather(-1, targets[:, None])[:, 0].double().numpy(), atol=1e-5), block
        assert (hit == (logits.argmax(-1) == targets).numpy()).all(), block
    assert hit[:8].all() and not hit[8] and not hit[9]
    h16, w16 = hidden.bfloat16(), weight.bfloat16()
    nll16, hit16 = _head_nll_and_greedy(h16, w16, None, targets, block=8)
    ref16, refhit = _nll_and_greedy(h16 @ w16.t(), targets)
    assert np.allclose(nll16, ref16, atol=1e-5) and (hit16 == refhit).all()


class _ScaledLogits(torch.nn.Module):
    """A causal LM whose logits are not its output layer's (a soft-capping or scaling head)."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.config = model, model.config

    def get_decoder(self):
        return self.inner.get_decoder()

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()

    def forward(self, input_ids):
        out = self.inner(input_ids=input_ids)
        out.logits = out.logits * 0.5
        return out


def test_only_scored_positions_reach_the_output_layer_and_only_where_that_is_exact(model, pairs, monkeypatch):
    """The gathered-rows pass equals the full pass; a model whose logits differ from
    head(decoder(x)) is detected on the first batch and scored by the full pass."""
    import rbridge.scoring.requests as rq

    gathered = [r.nll for r in loglikelihood(model, make(pairs), batch_size=2, precision="fp32")]
    calls = []
    monkeypatch.setattr(rq, "_decoder_and_head", lambda m: calls.append(m) or None)
    full = [r.nll for r in loglikelihood(model, make(pairs), batch_size=2, precision="fp32")]
    assert calls and all(np.allclose(a, b, atol=1e-5) for a, b in zip(gathered, full))
    monkeypatch.undo()
    monkeypatch.setattr(rq, "HEAD_BLOCKS_FROM", 0)   # every batch through the output layer in blocks
    monkeypatch.setattr(rq, "HEAD_BLOCK", 7)
    blocked = loglikelihood(model, make(pairs), batch_size=2, precision="fp32")
    assert all(np.allclose(a, b.nll, atol=1e-5) for a, b in zip(full, blocked))
    monkeypatch.undo()
    scaled = _ScaledLogits(model)
    got = loglikelihood(scaled, make(pairs), batch_size=2, precision="fp32")
    for req, (ctx, cont) in zip(got, pairs):
        with torch.no_grad():
            lg = model(input_ids=torch.tensor([ctx + cont])).logits[0].double() * 0.5
        want = -torch.log_softmax(lg[len(ctx) - 1:-1], -1).gather(-1, torch.tensor(cont)[:, None])[:, 0]
        assert np.allclose(req.nll, want.numpy(), atol=1e-5)


def test_precision_rules_and_the_callers_parameters_come_back_bit_for_bit(model, pairs, monkeypatch):
    from rbridge.scoring import requests as rq

    assert rq.scoring_dtype("fp32", model) == torch.float32
    assert rq.scoring_dtype("bf16", model) == torch.bfloat16
    # auto follows fp32 against bf16 as measured (injected: bf16 faster, equal, slower)
    for speedup, dtype in (("2", torch.bfloat16), ("1", torch.float32), ("0.5", torch.float32)):
        monkeypatch.setenv("RBRIDGE_BF16_SPEEDUP", speedup)
        assert rq.scoring_dtype("auto", model) == dtype
    monkeypatch.delenv("RBRIDGE_BF16_SPEEDUP")
    with pytest.raises(ValueError):
        rq.scoring_dtype("fp16x", model)
    before = [(p, p.data_ptr(), p.data.clone()) for p in model.parameters()]
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    fp32 = loglikelihood(model, make(pairs), precision="fp32", pad_id=2)
    bf16 = loglikelihood(model, make(pairs), precision="bf16", pad_id=2)
    # the same storage, unrounded, buffers untouched: a planner goes on training this model
    assert all(p.data_ptr() == ptr and torch.equal(p.data, copy) for p, ptr, copy in before)
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
    for a, b in zip(fp32, bf16):
        assert np.allclose(a.nll, b.nll, atol=0.1) and not np.array_equal(a.nll, b.nll)
    again = loglikelihood(model, make(pairs), precision="fp32", pad_id=2)
    assert all(np.array_equal(a.nll, b.nll) for a, b in zip(fp32, again))
    # a bf16 model (a checkpoint saved in bf16) under auto follows the same measurement: upcast to
    # fp32 where bf16 does not pay; it stays bf16 afterwards; an fp16 model is scored as it is
    half = type(model)(model.config).to(torch.bfloat16).eval()
    for speedup, dtype in (("2", torch.bfloat16), ("1", torch.float32), ("0.5", torch.float32)):
        monkeypatch.setenv("RBRIDGE_BF16_SPEEDUP", speedup)
        assert rq.scoring_dtype("auto", half) == dtype
    up = loglikelihood(half, make(pairs), precision="auto", pad_id=2)
    ref = loglikelihood(half, make(pairs), precision="fp32", pad_id=2)
    assert all(np.array_equal(a.nll, b.nll) for a, b in zip(up, ref))
    monkeypatch.delenv("RBRIDGE_BF16_SPEEDUP")
    assert rq.scoring_dtype("auto", type(model)(model.config).to(torch.float16)) == torch.float16
    loglikelihood(half, make(pairs), precision="fp32", pad_id=2)
    assert next(half.parameters()).dtype == torch.bfloat16


def test_the_pass_keeps_no_key_value_cache(model, pairs, monkeypatch):
    """A config that says ``use_cache: true`` (the fixture's, SmolLM2's) builds no cache in a scoring pass, on the
    gathered-rows path or the full one: it would keep every layer's keys and values until the pass ends."""
    import rbridge.scoring.requests as rq

    assert model.config.use_cache
    seen = []

    def cache_of(out):
        return getattr(out, "cache", None) if hasattr(type(out), "cache") else getattr(out, "past_key_values", None)

    hooks = [m.register_forward_hook(lambda mod, args, out: seen.append(cache_of(out)))
             for m in (model, model.get_decoder())]
    try:
        with torch.inference_mode():
            assert cache_of(model.get_decoder()(input_ids=torch.tensor([pairs[0][0]]))) is not None  # the hook sees one
        seen.clear()
        loglikelihood(model, make(pairs), batch_size=2, precision="fp32")
        monkeypatch.setattr(rq, "_decoder_and_head", lambda m: None)  # the full pass
        loglikelihood(model, make(pairs), batch_size=2, precision="fp32")
    finally:
        for h in hooks:
            h.remove()
    assert len(seen) >= 6 and all(c is None for c in seen)


def test_nll_without_blocks_has_no_log_softmax_bias():
    """The unblocked path computes max + log(sum(exp(x - max))) - x_t, as the blocked one does: torch's CPU
    log_softmax comes out low on average (its faster exp), which summed over a trace's tokens exceeds the 1e-4
    nats per trace rbridge's float32 keeps to float64; this form is unbiased to float rounding."""
    from rbridge.scoring.requests import _nll_and_greedy

    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 49152, generator=g) * 3
    t = torch.randint(0, 49152, (400,), generator=g)
    ref = (-torch.log_softmax(x.double(), -1).gather(-1, t[:, None])[:, 0]).numpy()
    got, _ = _nll_and_greedy(x, t)
    torch_bias = float((-torch.log_softmax(x, -1).gather(-1, t[:, None])[:, 0].double().numpy() - ref).mean())
    assert abs(float((got - ref).mean())) < 2e-7 and np.abs(got - ref).max() < 5e-6
    print(f"mean signed error per token: rbridge {float((got - ref).mean()):+.1e}, torch.log_softmax {torch_bias:+.1e}")


def test_cpu_batches_end_before_a_row_with_more_than_a_tenth_of_padding(model, pairs, monkeypatch):
    import rbridge.scoring.requests as rq
    from rbridge.scoring.requests import _batches, _Row

    rows = [_Row(Request([0], [1]), [0] * n, 1) for n in (100, 95, 91, 90, 89, 50, 50, 50, 10)]
    monkeypatch.setattr(rq, "SPLIT_FROM_POSITIONS", 150)   # 150: one row of 100 is too few to end a batch
    cpu = _batches(rows, 3, torch.device("cpu"))
    assert [[len(r.ids) for r in b] for b in cpu] == [[100, 95, 91], [90, 89], [50, 50, 50], [10]]
    monkeypatch.setattr(rq, "SPLIT_FROM_POSITIONS", 200)
    assert [[len(r.ids) for r in b] for b in _batches(rows, 3, torch.device("cpu"))] == \
        [[100, 95, 91], [90, 89, 50], [50, 50, 10]]
    fixed = _batches(rows, 3, torch.device("cuda"))  # a device object only: nothing runs on it
    assert [len(b) for b in fixed] == [3, 3, 3]
    seen = []
    loglikelihood(model, make(pairs), batch_size=16, precision="fp32", on_progress=lambda d, n: seen.append((d, n)))
    assert seen[-1] == (len(pairs), len(pairs)) and [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_the_pass_feeds_no_position_that_predicts_nothing_and_skips_empty_continuations(model, pairs, monkeypatch):
    """A batch's longest row's last token predicts nothing scored: the decoder sees one position less than the
    longest row, with the same NLLs as a naive pass over the whole sequence. A batch whose rows score nothing
    (empty continuations, a BOS-only context among them) runs no pass and gives empty NLLs."""
    decoder = model.get_decoder()
    widths = []
    original = decoder.forward

    def recording(*args, input_ids=None, **kwargs):
        widths.append(input_ids.shape[1])
        return original(*args, input_ids=input_ids, **kwargs)

    monkeypatch.setattr(decoder, "forward", recording)
    reqs = make(pairs)
    loglikelihood(model, reqs, batch_size=16, precision="fp32", pad_id=2)
    longest = max(len(c) + len(x) for c, x in pairs)
    assert widths and max(widths) == longest - 1
    for (ctx, cont), req in zip(pairs, reqs):
        np.testing.assert_allclose(req.nll, naive(model, ctx, cont)[0], atol=1e-5)
    widths.clear()
    bos = pairs[0][0][0]
    empty = [Request([bos], []), Request(pairs[0][0], [])]
    loglikelihood(model, empty, precision="fp32", pad_id=2)
    assert widths == [] and all(r.nll.shape == (0,) and r.is_greedy for r in empty)
