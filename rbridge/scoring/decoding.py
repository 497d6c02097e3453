"""Continue token-id prompts with a causal LM: the one generation loop of rbridge.

Used by the GSM8K accuracy baseline (``rbridge score --accuracy``, greedy,
batched) and by trace generation (``rbridge traces generate``, greedy with raw
logprobs, one question at a time, a sampled retry). Each caller decodes the
returned token ids its own way.

Prompts are sorted by length (longest first), cut into batches of
``batch_size`` and left-padded with ``pad_id`` under an attention mask (a batch
of one needs no padding). Generation stops at any id of ``stop``; a
continuation is cut before its first stop id (what follows it in a batch is
padding). The caller names the stop ids because the two commands differ: the
accuracy baseline stops at the tokenizer's EOS only, trace generation also at
the EOS ids of the model's generation config (see :func:`stop_ids`).

``temperature=None`` is greedy decoding; a temperature samples from the full
distribution (no top-k, no top-p) after ``torch.manual_seed(seed)``. Processors
the model's own generation config asks for (repetition penalty, ...) apply as
in ``model.generate``. ``logprobs=True`` also returns, per new token, its log
probability under the raw (unprocessed) logits; it keeps every step's logits in
memory, so ask for it only where it is used.

Key/value cache: always on. rbridge's proxies are saved with ``use_cache: false``
(a training setting, rbridge.proxy.config), and transformers copies it into the
model's generation config, so ``model.generate`` without an explicit
``use_cache=True`` re-runs the whole sequence at every new token (25x slower on a
tiny Llama, 64 new tokens). The generation config passed here sets it, and a
passed config wins over the model's config and generation config; neither is
changed.

Context: a model's trained context is its maximum positions
(``config.max_position_embeddings``, else ``n_positions``: what
:func:`rbridge.scoring.requests.model_max_length` reads; a proxy's is its stage's
``seq_len``). Generation never goes past it. Prompts are left-padded, so every row
of a batch ends at position ``width + new - 1`` with ``width`` the batch's longest
prompt: a batch generates at most ``context - width`` new tokens. Where that is
below ``max_new_tokens`` the batch's budget is cut to it, and the call warns once
(:class:`ContextWarning`, naming the context, the longest prompt and the cut
budget); a cut continuation that reaches its budget is ``truncated``. A prompt of
``context`` tokens or more leaves no room for a new token: :class:`InputError`
before anything is generated. A model that names no maximum is not limited.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from rbridge.errors import InputError
from rbridge.scoring.requests import model_max_length


class ContextWarning(UserWarning):
    """A generation budget was cut to the model's trained context (see the module docstring)."""


@dataclass
class Generation:
    """New token ids of one prompt (up to, not including, the first stop id) and what came with them."""

    ids: list[int]
    logprobs: list[float] = field(default_factory=list)   # with logprobs=True: one per id
    truncated: bool = False                                # the budget ran out before a stop id


def stop_ids(model, tokenizer) -> list[int]:
    """The tokenizer's EOS and every EOS id of the model's generation config, sorted.

    Chat models often end a turn with an id the tokenizer does not call EOS
    (``<|eot_id|>``); their generation config lists it.
    """
    ids = set()
    for v in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, (list, tuple)):
            ids.update(int(x) for x in v)
    return sorted(ids)


def _config(max_new_tokens: int, stops: Sequence[int], pad_id: int, temperature: float | None,
            logprobs: bool):
    from transformers import GenerationConfig

    sampled = temperature is not None
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=sampled,
                            temperature=temperature if sampled else 1.0,
                            top_k=0 if sampled else None, top_p=1.0,
                            eos_token_id=list(stops) or None, pad_token_id=pad_id,
                            output_logits=logprobs, return_dict_in_generate=True,
                            use_cache=True)   # whatever the model's (training) config says


def budgets(model, widths: Sequence[int], max_new_tokens: int) -> list[int]:
    """New tokens each batch of prompts may take: ``max_new_tokens`` cut to the model's context less the
    batch's width (its longest prompt). Warns once (:class:`ContextWarning`) if any is cut; a width that
    fills the context is an :class:`InputError` (see the module docstring)."""
    limit = model_max_length(model)
    if limit is None or not widths:
        return [max_new_tokens] * len(widths)
    longest = max(widths)
    if longest >= limit:
        raise InputError(f"a prompt of {longest} tokens fills the model's context of {limit} positions "
                         f"(max_position_embeddings): no room to generate a token; shorten the prompt "
                         f"or use a model trained on longer sequences")
    out = [min(max_new_tokens, limit - w) for w in widths]
    if min(out) < max_new_tokens:
        cut = [b for b in out if b < max_new_tokens]
        more = (f"; {len(cut)} of {len(out)} batches are cut, to {min(cut)}-{max(cut)} new tokens"
                if len(cut) > 1 else "")
        warnings.warn(f"generation cut to the model's context of {limit} positions (max_position_embeddings): "
                      f"a prompt of {longest} tokens leaves room for {limit - longest} new tokens, so its batch's "
                      f"budget is cut from {max_new_tokens} to {limit - longest}{more}", ContextWarning, stacklevel=3)
    return out


def generate(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, stop: Sequence[int],
             pad_id: int, batch_size: int = 16, temperature: float | None = None, seed: int = 0,
             logprobs: bool = False) -> list[Generation]:
    """One :class:`Generation` per prompt, in prompt order (see the module docstring)."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    stops = set(stop)
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    starts = range(0, len(order), batch_size)
    allowed = budgets(model, [len(prompts[order[b]]) for b in starts], max_new_tokens)
    out: list[Generation | None] = [None] * len(prompts)
    for b, budget in zip(starts, allowed):
        idx = order[b:b + batch_size]
        width = len(prompts[idx[0]])
        cfg = _config(budget, stop, pad_id, temperature, logprobs)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for j, i in enumerate(idx):
            p = prompts[i]
            ids[j, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
            mask[j, width - len(p):] = 1
        if temperature is not None:
            torch.manual_seed(seed)
        with torch.inference_mode():
            res = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 generation_config=cfg)
        for j, i in enumerate(idx):
            new = res.sequences[j, width:].tolist()
            lps = ([float(torch.log_softmax(lg[j].float(), -1)[t]) for lg, t in zip(res.logits, new)]
                   if logprobs else [])
            cut = next((k for k, t in enumerate(new) if t in stops), None)
            if cut is not None:
                out[i] = Generation(new[:cut], lps[:cut], False)
            else:
                out[i] = Generation(new, lps, len(new) >= budget)
    return out
