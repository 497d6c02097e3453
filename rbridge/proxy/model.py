"""The proxy model: LlamaForCausalLM whose training loss never materialises the logits.

A proxy's vocabulary is large next to its width (0.5M preset: hidden 128, vocab
4,096 to 32,000), so the output layer and the cross-entropy over it are most of a
training step: ``LlamaForCausalLM(input_ids, labels=...)`` writes the whole
(tokens x vocab) logit matrix, log-softmaxes it, and on the way back writes a
zero-filled gradient of the same size and the log-softmax backward over it; five
passes over a matrix that does not fit in any cache.

``linear_cross_entropy`` computes the loss and both gradients a chunk of rows at
a time, in the forward pass: logits of the chunk, max, exp, sum (one pass), then
the gradient of the logits is softmax minus one-hot, written in place, and goes
straight into the two matmuls that give the hidden states' and the weight's
gradients. The backward pass only scales the stored gradients. This is the
fused linear cross-entropy of Liger-Kernel and Apple's Cut Cross-Entropy; both
are Triton kernels for GPUs, and PyTorch has no such op, so rbridge has its own,
in plain PyTorch, which runs on CPUs and GPUs alike. Measured on the 2-core
development machine, one thread, 0.5M preset, batch 8 x 256, vocab 4,096: a
training step takes 0.74x the time of LlamaForCausalLM's own loss
(benchmarks/proxy_throughput.py compares the two in one run).

The loss is the same mean over non-ignored next-token targets as transformers'
``ForCausalLMLoss``, in fp32; the two agree to float rounding (tests/test_proxy.py).
Only a training forward with labels and gradients takes this path; evaluation,
scoring and generation use LlamaForCausalLM's forward unchanged, and the weights
and state dict are exactly LlamaForCausalLM's.
"""

from __future__ import annotations

import torch
from transformers import LlamaForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast

from rbridge.proxy import fused

IGNORE_INDEX = -100
# Rows per chunk: the chunk's fp32 logits take about this many bytes (a CPU's L2/L3 cache; on a GPU
# the kernels want large chunks, and memory, not cache, is the limit).
_CHUNK_BYTES = {"cpu": 8 << 20}
_CHUNK_BYTES_DEFAULT = 512 << 20


def _chunk_rows(n_rows: int, vocab: int, device: torch.device) -> int:
    budget = _CHUNK_BYTES.get(device.type, _CHUNK_BYTES_DEFAULT)
    return max(1, min(n_rows, budget // (4 * vocab)))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, chunk: int):
        n = hidden.shape[0]
        valid = (target != IGNORE_INDEX).to(torch.float32)
        safe = target.clamp(min=0)                       # ignored rows pick class 0, then weigh 0
        count = valid.sum().clamp(min=1.0)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk):
            end = min(n, start + chunk)
            h, t, v = hidden[start:end], safe[start:end, None], valid[start:end, None]
            logits = (h @ weight.t()).float()            # (rows, vocab); bf16 under autocast, fp32 here
            peak = logits.amax(dim=1, keepdim=True)
            picked = logits.gather(1, t)
            probs = logits.sub_(peak).exp_()             # in place: the chunk's only extra buffer
            norm = probs.sum(dim=1, keepdim=True)
            total += ((peak + norm.log() - picked) * v).sum()
            probs.mul_(v / norm)                         # softmax, zero on ignored rows
            probs.scatter_add_(1, t, -v)                 # minus one-hot: d loss_row / d logits
            g = probs.to(hidden.dtype)
            grad_hidden[start:end] = g @ weight
            if g.dtype == torch.float32 and h.dtype == torch.float32:
                # fp32 also under bf16 autocast (addmm_ is not an autocast op), on purpose: a bf16 product here, as
                # autocast computes a Linear's weight gradient, made a 2M step 1.05x faster at one thread (2-core AMD
                # EPYC) but moved a 4-candidate plan's scores 0.006-0.35 nats from fp32 training's, against 0.02-0.05
                # with this product in fp32 (tests/test_proxy.py keeps it closer to fp32 than transformers' own)
                grad_weight.addmm_(g.t(), h)
            else:
                grad_weight += (g.t() @ h).float()
        grad_hidden.div_(count)
        grad_weight.div_(count)
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return total / count

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_out, grad_weight * grad_out, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                         chunk_rows: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``target`` (``-100`` ignored), fp32, without
    materialising the logits: ``hidden`` (..., d), ``weight`` (vocab, d), ``target`` (...)."""
    h = hidden.reshape(-1, hidden.shape[-1])
    t = target.reshape(-1)
    chunk = chunk_rows or _chunk_rows(h.shape[0], weight.shape[0], h.device)
    return _LinearCrossEntropy.apply(h, weight, t, chunk)


class ProxyLlamaForCausalLM(LlamaForCausalLM):
    """LlamaForCausalLM, with the chunked fused loss for training forwards with labels.

    Same modules, parameters and state dict; ``logits`` is None on the fused path (training never
    reads them). The decoder runs through rbridge.proxy.fused where it computes the same function
    (``fused.supports``; ``fused_decoder = False`` turns it off, for comparisons). Every other call
    (eval mode, no labels, no gradients) is LlamaForCausalLM's forward.
    """

    fused_decoder = True

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        if labels is None or not self.training or not torch.is_grad_enabled() \
                or set(kwargs) - {"position_ids", "use_cache"}:
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        if self.fused_decoder and fused.supports(self, attention_mask, kwargs):
            hidden = fused.decoder_forward(self, input_ids)
        else:
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        loss = linear_cross_entropy(hidden[:, :-1], self.lm_head.weight, labels[:, 1:])
        return CausalLMOutputWithPast(loss=loss, logits=None)
