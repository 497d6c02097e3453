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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


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
                            output_logits=logprobs, return_dict_in_generate=True)


def generate(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, stop: Sequence[int],
             pad_id: int, batch_size: int = 16, temperature: float | None = None, seed: int = 0,
             logprobs: bool = False) -> list[Generation]:
    """One :class:`Generation` per prompt, in prompt order (see the module docstring)."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    cfg = _config(max_new_tokens, stop, pad_id, temperature, logprobs)
    stops = set(stop)
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[Generation | None] = [None] * len(prompts)
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        width = len(prompts[idx[0]])
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
                out[i] = Generation(new, lps, len(new) >= max_new_tokens)
    return out
