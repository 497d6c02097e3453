"""Log-likelihood requests and the one batched teacher-forcing pass that answers them.

A :class:`Request` is the unit of work of every log-likelihood in rbridge (as
``Instance`` is in lm-evaluation-harness): it carries its arguments -- a
context and a continuation, as token ids -- what it belongs to (the trace, the
kind of request, the option of a multiple-choice question) and, once
:func:`loglikelihood` has run, its own results. Callers build requests, make
one call, and read each request's results from the request itself: batching,
sorting and windowing live here only, and no caller tracks positions in a
result list.

The context must be non-empty: it starts with BOS (or EOS where the tokenizer
has no BOS). Context and continuation are tokenized separately by the caller,
so no token straddles the boundary. Every continuation token is scored by
teacher forcing: NLL_i = -log p(token_i | context, tokens before i).

Batching: requests are cut into window rows (below), the rows sorted by length
(longest first; equal lengths keep request order), cut into batches of at most
``batch_size`` (on a CPU also before a row shorter than 0.9 of its batch's first:
:func:`_batches`) and right-padded with ``pad_id``. No attention mask: in a causal
LM a real token attends only to earlier positions, all real, and without a mask
attention takes the fused causal kernel (as lm-evaluation-harness does). One
forward pass per batch under ``torch.inference_mode`` on the model's own
device; log-softmax in float32 whatever the model's dtype.

Precision (:func:`scoring_dtype`): ``fp32`` computes in float32 end to end, ``bf16``
in bfloat16 (weights and activations; log-softmax in float32), ``auto`` in bf16 where
forward passes of the model measured bf16 clearly faster than fp32 on this machine
(rbridge.proxy.precision: CPU flags do not tell) and in fp32 elsewhere, also for a model
loaded in bf16 (Hugging Face checkpoints saved in bf16 load so; upcasting its weights is exact),
which on a CPU without fast bf16 ran at half the fp32 rate; an fp16 model is scored as it is.
For the pass the parameters are swapped for copies in the compute dtype, and the caller's
own tensors are put back afterwards, bit for bit (a planner goes on training the model it scored). Whole bf16
weights rather than autocast, because autocast casts every weight at every call: on
the AVX512_BF16 development CPU a 150M model scored 3.5x faster in bf16 than in fp32
with the weights cast once, 2.3x under autocast.

Only scored positions reach the output layer. lm-evaluation-harness computes the
logits of every position of a batch (context and padding included) and keeps
those of the continuation; for a small model with a large vocabulary that output
layer is most of the pass. Where a model's logits are its output embedding
applied to its decoder's last hidden state (every Llama-family model), rbridge
runs the decoder, gathers the hidden states of the continuation positions of the
whole batch and applies the output layer and one log-softmax to those rows
only (on a CPU, where those rows' logits would not fit in cache, a block of
vocabulary columns at a time, each reduced while in cache: :func:`_head_nll_and_greedy`).
Whether a model is such a model is checked, not assumed: the first batch runs both
ways, and any difference beyond float rounding (a model that scales or soft-caps its
logits) keeps the full pass for the whole call. The check runs on
one row, the shortest of the first batch, so it costs a fraction of one batch.

Long requests: when context + continuation exceed the model's maximum positions
(``config.max_position_embeddings`` or ``n_positions``, or ``max_length=``),
the request is split into strided windows, never silently truncated. Windows
hold at most ``max_length`` tokens and advance by ``stride = max_length // 2``;
each window scores only tokens no earlier window scored, so every continuation
token is scored exactly once, with at least ``max_length - stride`` tokens of
left context (the first window keeps BOS and as much of the context as fits;
later windows are plain slices of the full sequence, without a new BOS).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch


PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(eq=False)
class Request:
    """One (context, continuation) pair to score, what it belongs to, and its results.

    ``trace`` is the index of the trace (question) the request belongs to in the
    caller's list, ``kind`` what is scored (``"reasoning"``, ``"label"``,
    ``"choice"``, ``"solution"``, ...) and ``option`` the choice index of a
    multiple-choice continuation. :func:`loglikelihood` fills ``nll`` (nats,
    float64, one value per continuation token) and ``is_greedy`` (every
    continuation token was the model's argmax, as lm-evaluation-harness reports).
    """

    context: Sequence[int]
    continuation: Sequence[int]
    trace: int = 0
    kind: str = "reasoning"
    option: int | None = None
    nll: np.ndarray | None = field(default=None, repr=False)
    is_greedy: bool | None = None

    def _result(self) -> np.ndarray:
        if self.nll is None:
            raise RuntimeError("the request has not been scored; pass it to loglikelihood() first")
        return self.nll

    @property
    def sum_logprob(self) -> float:
        """Summed log-likelihood of the continuation (nats; <= 0)."""
        return -float(self._result().sum())

    @property
    def mean_nll(self) -> float:
        """Mean NLL per continuation token (nats)."""
        return float(self._result().mean())


def model_max_length(model) -> int | None:
    """The model's maximum positions, from its config; None when it names none."""
    cfg = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        v = getattr(cfg, name, None)
        if isinstance(v, int) and v > 1:
            return v
    return None


def _windows(n_ctx: int, total: int, max_len: int | None) -> list[tuple[int, int, int]]:
    """(start, first_scored, end) windows over a sequence; see the module docstring."""
    if max_len is None or total <= max_len:
        return [(0, n_ctx, total)]
    if max_len < 2:
        raise ValueError("max_length must be at least 2")
    stride = max(1, max_len // 2)
    out = []
    pos = n_ctx
    while pos < total:
        end = min(total, max(pos + stride, max_len))
        start = max(0, end - max_len)
        out.append((start, pos, end))
        pos = end
    return out


def scoring_dtype(precision: str, model) -> torch.dtype:
    """The dtype a scoring pass computes in: ``fp32`` -> float32, ``bf16`` -> bfloat16, ``auto`` ->
    bfloat16 for a float32 or bfloat16 model where forward passes of this model in bf16 measured at
    least rbridge.proxy.rates.THRESHOLD times fp32's tokens/s on its device at the current thread count
    (rbridge.proxy.precision.scoring_rates: once per machine and model shape, cached), else float32
    (a bf16 model's weights upcast for the pass: exact, and twice as fast where bf16 runs at half
    the fp32 rate); a float16 model is scored as it is."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    param = next(model.parameters())
    if param.dtype not in (torch.float32, torch.bfloat16):
        return param.dtype  # a model loaded in fp16 (or another dtype) is scored as it is
    return torch.bfloat16 if auto_scoring_precision(model) == "bf16" else torch.float32


def auto_scoring_precision(model) -> str:
    """What ``--precision auto`` computes a float32 or bfloat16 ``model`` in here: "bf16" or "fp32" (measured)."""
    from rbridge.proxy.precision import bf16_possible, scoring_rates

    if not bf16_possible(next(model.parameters()).device.type):
        return "fp32"
    return scoring_rates(model, measured_pass(model)).choice


def measured_pass(model):
    """``run(ids, dtype)``: the scorer's own pass (:func:`_forward`, scoring the second half of each row of
    token ids) with ``model``'s parameters in ``dtype``, as ``auto``'s measurement times it."""
    device, head = next(model.parameters()).device, _decoder_and_head(model)

    def run(ids: list[list[int]], dtype: torch.dtype) -> None:
        batch = [_Row(Request([0], [0]), row, max(1, len(row) // 2)) for row in ids]
        with _parameters_in(model, dtype), torch.inference_mode():
            _forward(model, batch, 0, device, head)
    return run


def precision_name(dtype: torch.dtype) -> str:
    """``fp32``, ``bf16`` or ``fp16``: how a result was computed (``rbridge score --json``: ``precision``)."""
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


@contextmanager
def _parameters_in(model, dtype: torch.dtype):
    """The model's floating parameters as ``dtype`` copies inside the block; its own tensors (not
    rounded copies) put back afterwards. Buffers (rotary frequencies) keep their dtype."""
    swapped = [(p, p.data) for p in model.parameters() if p.is_floating_point() and p.dtype != dtype]
    try:
        for p, original in swapped:
            p.data = original.to(dtype)
        yield
    finally:
        for p, original in swapped:
            p.data = original


@dataclass
class _Row:
    """One window of one request: the token ids it feeds and the first of them it scores."""

    request: Request
    ids: list[int]
    first: int
    nll: np.ndarray | None = None
    greedy: bool = True


def _rows(requests: Sequence[Request], max_len: int | None) -> list[list[_Row]]:
    """The window rows of each request, in sequence order (one list per request)."""
    out: list[list[_Row]] = []
    for req in requests:
        if len(req.context) == 0:
            raise ValueError("every request needs a non-empty context (BOS at least)")
        full = list(req.context) + list(req.continuation)
        out.append([_Row(req, full[start:end], first - start)
                    for start, first, end in _windows(len(req.context), len(full), max_len)])
    return out


def loglikelihood(model, requests: Sequence[Request], *, batch_size: int = 16, precision: str = "auto",
                  pad_id: int = 0, max_length: int | None = None,
                  on_progress: Callable[[int, int], None] | None = None) -> Sequence[Request]:
    """Score every request in place (``nll``, ``is_greedy``) in one batched pass; returns ``requests``.

    ``max_length`` defaults to the model's maximum positions; longer requests
    use strided windows. ``precision``: ``fp32``, ``bf16`` or ``auto`` (:func:`scoring_dtype`;
    the parameters are cast for the pass and the caller's own put back).
    ``on_progress(done_rows, total_rows)`` is called after every batch.
    """
    dtype = scoring_dtype(precision, model)  # refuses an unknown precision
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    per_request = _rows(requests, max_length if max_length is not None else model_max_length(model))
    order = sorted((row for rows in per_request for row in rows), key=lambda r: -len(r.ids))

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with _parameters_in(model, dtype), torch.inference_mode():
            head = _decoder_and_head(model)
            done = 0
            for batch in _batches(order, batch_size, device):
                if done == 0 and head is not None and not _same_as_full_pass(model, head, batch[-1:], pad_id, device):
                    head = None
                _forward(model, batch, pad_id, device, head)
                done += len(batch)
                if on_progress is not None:
                    on_progress(done, len(order))
    finally:
        model.train(was_training)
    for req, rows in zip(requests, per_request):
        req.nll = np.concatenate([r.nll for r in rows]) if rows else np.zeros(0)   # no continuation
        req.is_greedy = all(r.greedy for r in rows)
    return requests


# On a CPU a batch ends early where its next row is shorter than PAD_SPLIT of the batch's first (longest) row,
# once the batch holds SPLIT_FROM_POSITIONS token positions
PAD_SPLIT = 0.9
SPLIT_FROM_POSITIONS = 512


def _batches(order: list[_Row], batch_size: int, device: torch.device) -> list[list[_Row]]:
    """``order`` (longest first) cut into batches of at most ``batch_size`` rows. On a CPU a batch that holds
    ``SPLIT_FROM_POSITIONS`` positions also ends before a row shorter than ``PAD_SPLIT`` of its first row, so
    that a row carries at most a tenth of padding: a CPU's products compute every padding position at full
    cost, and from a few hundred positions on they run at their full rate (SmolLM2-135M's shapes, 2 threads,
    the 2-core AMD EPYC family 25 model 17: 160-197 GFLOP/s at 600 positions, 175-198 at 2,400), so the
    smaller batches cost nothing there; the floor keeps a batch of one short row from running at a small
    product's rate. On an accelerator, where a batch's rows run in parallel and small batches leave it
    idle, fixed batches."""
    out: list[list[_Row]] = []
    for row in order:
        cur = out[-1] if out else None
        if cur is None or len(cur) == batch_size or (
                device.type == "cpu" and len(row.ids) < PAD_SPLIT * len(cur[0].ids)
                and len(cur) * len(cur[0].ids) >= SPLIT_FROM_POSITIONS):
            out.append([row])
        else:
            cur.append(row)
    return out


def _decoder_and_head(model):
    """(decoder, output layer) of a model whose logits may be ``head(decoder(ids).last_hidden_state)``,
    else None. Only a candidate: ``_same_as_full_pass`` checks it on the first batch."""
    try:
        decoder, head = model.get_decoder(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if decoder is None or decoder is model or not isinstance(head, torch.nn.Linear):
        return None
    return decoder, head


def _same_as_full_pass(model, head, batch: list[_Row], pad_id: int, device: torch.device) -> bool:
    """Whether the gathered-rows pass gives the full pass's NLLs and greedy flags on ``batch``."""
    _forward(model, batch, pad_id, device, None)
    full = [(row.nll, row.greedy) for row in batch]
    try:
        _forward(model, batch, pad_id, device, head)
    except Exception:  # noqa: BLE001 - a decoder that wants other arguments: use the full pass
        return False
    # 1e-4: two float32 products of the same rows in another blocking differ by ~1e-5 nats at logits of
    # ~20 (SmolLM2-135M); a model that scales or soft-caps its logits differs by far more
    return all(g == row.greedy and np.allclose(n, row.nll, rtol=1e-4, atol=1e-4)
               for (n, g), row in zip(full, batch))


def _forward(model, batch: list[_Row], pad_id: int, device: torch.device, head=None) -> None:
    """One right-padded forward pass over ``batch``; fills each row's ``nll`` and ``greedy``.

    With ``head`` (decoder, output layer) only the scored positions go through the output layer. ``use_cache=False``
    (:func:`_no_cache`): a model whose config says ``use_cache: true`` (SmolLM2's) otherwise keeps every layer's keys
    and values until the pass ends (a 1B Llama's 16 layers at 16 x 2,048 tokens: 2.1 GB in float32) for a cache
    nothing reads."""
    width = len(batch[0].ids)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    for j, row in enumerate(batch):
        ids[j, :len(row.ids)] = torch.tensor(row.ids, dtype=torch.long)
    ids = ids.to(device)
    # position t's logits predict token t+1: a row scores positions first-1 .. n-2
    spans = [(j, row.first - 1, len(row.ids) - 1) for j, row in enumerate(batch)]
    targets = torch.cat([ids[j, a + 1:b + 1] for j, a, b in spans])
    if targets.numel() == 0:  # nothing to score (empty continuations): no pass
        for row in batch:
            row.nll, row.greedy = np.zeros(0, dtype=np.float64), True
        return
    # the longest row's last token predicts nothing scored, and in every other row that column is padding:
    # the pass feeds width - 1 positions (a causal model's earlier positions do not see later ones)
    ids = ids[:, :-1]
    if head is not None:
        decoder, out = head
        hidden = decoder(input_ids=ids, **_no_cache(decoder)).last_hidden_state
        rows = torch.cat([hidden[j, a:b] for j, a, b in spans])
        if device.type == "cpu" and 4 * rows.shape[0] * out.weight.shape[0] > HEAD_BLOCKS_FROM:
            nll, hit = _head_nll_and_greedy(rows, out.weight, out.bias, targets)
        else:
            nll, hit = _nll_and_greedy(out(rows), targets)
    else:
        full = model(input_ids=ids, **_no_cache(model)).logits
        logits = torch.cat([full[j, a:b] for j, a, b in spans])
        del full
        nll, hit = _nll_and_greedy(logits, targets)
    at = 0
    for (_, a, b), row in zip(spans, batch):
        row.nll, row.greedy = nll[at:at + b - a], bool(hit[at:at + b - a].all())
        at += b - a


def _no_cache(module) -> dict:
    """``{"use_cache": False}`` for a forward that takes it (every transformers model), else nothing (a wrapper
    whose forward names its own arguments)."""
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return {}
    takes = any(p.name == "use_cache" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    return {"use_cache": False} if takes else {}


def _nll_and_greedy(logits: torch.Tensor, targets: torch.Tensor,
                    chunk: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """-log_softmax(logits)[target] (float64) and whether the target is the argmax, per row.

    The numbers of ``log_softmax``, ``gather`` and ``argmax == target`` (log-softmax to float rounding,
    below), but ``argmax`` (unvectorised on CPUs: 5x the time of ``amax``) runs only on rows whose target logit
    equals the row's maximum, to find whether an earlier class ties it (``argmax`` returns
    the first maximum). Rows go in chunks (``chunk`` rows; default :func:`_chunk_rows`): on a
    CPU a chunk's float32 copy and log-softmax stay in cache, and the result does not depend
    on the chunk (each row is its own softmax)."""
    chunk = chunk or _chunk_rows(logits)
    nll, hit = [], []
    for start in range(0, logits.shape[0], chunk):
        lg = logits[start:start + chunk].float()
        t = targets[start:start + chunk, None]
        top, picked = lg.amax(-1, keepdim=True), lg.gather(-1, t)
        # max + log(sum(exp(x - max))) - x_t, not log_softmax: torch's CPU log_softmax kernel comes out low by
        # about 1e-5 nats a token on SmolLM2's logits (-8.5e-7 on random ones, tests/test_scoring_requests.py);
        # this form has the blocked output layer's accuracy (_head_nll_and_greedy), whichever of the two a batch takes
        nll.append((top + (lg - top).exp_().sum(-1, keepdim=True).log_() - picked)[:, 0])
        best = picked[:, 0] == top[:, 0]
        rows = best.nonzero()[:, 0]
        if len(rows):
            best[rows] = lg[rows].argmax(-1) == t[rows, 0]
        hit.append(best)
    return torch.cat(nll).double().cpu().numpy(), torch.cat(hit).cpu().numpy()  # one device sync per batch


# Output-layer columns per block of :func:`_head_nll_and_greedy` on a CPU, and the size of a batch's
# float32 logits (bytes) from which the blocks pay (see there).
HEAD_BLOCK = 1024
HEAD_BLOCKS_FROM = 32 << 20


def _head_nll_and_greedy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor, block: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_nll_and_greedy` of ``hidden @ weight.T + bias`` without writing those logits out.

    The output layer goes a block of ``block`` vocabulary columns at a time over all rows, and each
    block is reduced while it is still in cache: its maximum, the sum of exponentials against the
    running maximum (the running sum rescaled, as in online softmax), the target's logit when the
    target is in the block, and the first index of a new running maximum (``argmax`` only on rows
    whose maximum rose: ties keep the earlier class, as ``argmax`` over the whole row does). NLL =
    max + log(sum) - target logit, in float32 whatever the compute dtype (a block's logits are cast
    as the full pass casts them), so the values equal ``log_softmax``'s to float rounding.

    Why: a whole (rows x vocab) float32 logit matrix does not stay in any CPU cache (1,300 rows of a
    49,152-word vocabulary are 255 MB), so the matrix product writes it to memory and the
    log-softmax reads it back. On the 2-core development CPU (Intel Xeon family 6 model 167, two
    threads) 2,048 rows of hidden size 384 took 0.28 s in blocks of 1,024 against 0.39 s for the
    product plus the chunked log-softmax, 0.40 against 0.57 s at hidden size 576 (one thread: 0.61
    against 0.87 s). A logit matrix that stays in the last-level cache gains nothing: there the blocks'
    extra small operations cost more (1,300 rows x 4,096 words, 21 MB: 0.71-0.84x; 300 x 16,384, 20 MB:
    0.85-0.92x; 300 x 32,000, 38 MB: 1.34-1.75x; 1,300 x 32,000: 1.52-2.03x), so the scorer takes this
    path from 32 MB of float32 logits per batch (``HEAD_BLOCKS_FROM``). ``benchmarks/score_throughput.py
    --head`` measures both ways on any machine."""
    n, vocab = hidden.shape[0], weight.shape[0]
    block = block or HEAD_BLOCK
    run_max = torch.full((n,), -float("inf"), device=hidden.device)
    run_sum = torch.zeros(n, device=hidden.device)
    picked = torch.empty(n, device=hidden.device)
    first = torch.zeros(n, dtype=torch.long, device=hidden.device)
    for start in range(0, vocab, block):
        end = min(vocab, start + block)
        lg = hidden @ weight[start:end].t()
        if bias is not None:
            lg += bias[start:end]
        lg = lg.float()
        top = lg.amax(1)
        rose = (top > run_max).nonzero()[:, 0]
        if len(rose):
            first[rose] = lg[rose].argmax(1) + start
        here = ((targets >= start) & (targets < end)).nonzero()[:, 0]
        if len(here):
            picked[here] = lg[here, targets[here] - start]
        new_max = torch.maximum(run_max, top)
        run_sum = run_sum * torch.exp(run_max - new_max) + lg.sub_(new_max[:, None]).exp_().sum(1)
        run_max = new_max
    nll = run_max + run_sum.log() - picked
    return nll.double().numpy(), (first == targets).numpy()


def _chunk_rows(logits: torch.Tensor) -> int:
    """Rows per chunk of :func:`_nll_and_greedy`: on a CPU, as many as fit 8 MB of float32 (42 rows of a
    49,152-word vocabulary), because a chunk that stays in cache is faster than 1,024 rows that do not:
    2,048 rows of that vocabulary on the idle 2-core development CPU took 0.035 s instead of 0.18 s in
    fp32 and 0.042 s instead of 0.28 s in bf16. On an accelerator 1,024 rows, few enough kernel launches."""
    if logits.device.type != "cpu":
        return 1024
    return max(1, (8 << 20) // (4 * max(1, logits.shape[-1])))


def request_nlls(model, requests: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                 batch_size: int = 16, precision: str = "auto", pad_id: int = 0,
                 max_length: int | None = None,
                 on_progress: Callable[[int, int], None] | None = None) -> list[np.ndarray]:
    """NLL arrays of bare (context, continuation) pairs: :func:`loglikelihood` for older callers."""
    reqs = [Request(ctx, cont, trace=i) for i, (ctx, cont) in enumerate(requests)]
    loglikelihood(model, reqs, batch_size=batch_size, precision=precision, pad_id=pad_id,
                  max_length=max_length, on_progress=on_progress)
    return [r.nll for r in reqs]
