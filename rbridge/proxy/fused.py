"""The proxy's training forward in fewer passes over memory: RMSNorm, rotary embedding, fused projections.

LlamaForCausalLM's modules compute a training step in many small element-wise operations, each of
which reads and writes a whole activation, forwards and again backwards: an RMSNorm is six (square,
mean, add, rsqrt, two products) and about twice that in its backward; the rotary embedding is a
product, a slice, a negation, a concatenation, a second product and a sum for the queries and again
for the keys; the q/k/v and gate/up projections each read (under autocast: cast) the same input.
Profiled on the 2M preset at one thread (torch.profiler, batch 8 x 256, fp32), matrix products took
53-58% of a step at about 90% of the core's fp32 rate, attention 12%, and element-wise passes most
of the rest.

``decoder_forward`` computes the same function as ``LlamaModel.forward`` (no cache, no padding mask,
SiLU MLP, no biases or dropout; ``supports`` says when; the rotary tables are transformers' own) with:

- RMSNorm as one autograd function: forward squares-and-sums, scales and multiplies by the gain; the
  backward is the closed form (Zhang and Sennrich 2019), which reuses the saved per-row scale;
- the rotary embedding as one autograd function over the queries and keys together, two fused
  multiply-adds per half in each direction, written straight in the (batch, heads, time, head_dim)
  layout that attention reads;
- the query/key/value projections as one matrix product, and the MLP's gate and up projections as
  another (their weights concatenated each step: a few hundred KB, against activations of MBs);
- attention through ``scaled_dot_product_attention(is_causal=True)``, as transformers' "sdpa" path.

Parameters, state dict and everything outside a training forward stay LlamaForCausalLM's. The result
equals transformers' forward up to float rounding: in fp32 the same loss and gradients within 1e-6
relative; under bf16 autocast no further from the fp32 gradients than transformers' own bf16 forward
(tests/test_proxy.py). What it gains (benchmarks/proxy_throughput.py --variants rbridge hf-decoder,
2-core AMX Xeon, 0.5M/2M/8M presets, 1 and 2 threads): 0.95-1.06x in fp32 (nothing beyond the noise), where the remaining
passes are few next to the products, and 1.02-1.11x under bf16 autocast, where the products are fast
and one cast of each input replaces three. Torch has no fused RMSNorm kernel on CPUs (F.rms_norm is
composite there) nor a rotary-embedding op, and torch.compile, which could fuse all of it, costs
tens of seconds of compilation in every new process (docs/SPEED.md), so these functions are
written out here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _RMSNorm(torch.autograd.Function):
    """``weight * (x * rsqrt(mean(x^2) + eps))`` with transformers' dtypes: the normalisation in fp32,
    cast back to ``x``'s dtype, then the product with the gain (type promotion as in LlamaRMSNorm)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float):
        xf = x.float()
        rstd = torch.rsqrt(xf.square().mean(-1, keepdim=True).add_(eps))
        out = (xf * rstd).to(x.dtype)
        out = out.mul_(weight) if out.dtype == torch.promote_types(out.dtype, weight.dtype) else weight * out
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        xhat = x.float() * rstd
        dyf = dy.float()
        dweight = (dyf * xhat).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        g = dyf * weight.float()
        # d/dx of x * rstd(x): rstd * (g - xhat * mean(g * xhat))
        dot = (g * xhat).mean(-1, keepdim=True)
        dx = g.sub_(xhat.mul_(dot)).mul_(rstd)
        return dx.to(x.dtype), dweight, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _RMSNorm.apply(x, weight, eps)


class _RotaryQKV(torch.autograd.Function):
    """Split the fused projection ``qkv`` (batch, time, n_q + 2 n_kv, head_dim) into queries, keys and
    values in the (batch, heads, time, head_dim) layout attention reads, rotating the queries and keys.
    ``cos``/``sin`` (time, head_dim // 2): transformers' two halves are equal, so the rotation is
    ``[x1 c - x2 s, x2 c + x1 s]`` and its transpose (the backward) ``[g1 c + g2 s, g2 c - g1 s]``. The
    backward writes the whole gradient of ``qkv`` in place; autograd's slices would zero-fill it first."""

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_q: int, n_kv: int):
        b, t, _, d = qkv.shape
        half = d // 2
        x = qkv[:, :, : n_q + n_kv].transpose(1, 2)              # (b, heads, t, d) views
        x1, x2 = x[..., :half], x[..., half:]
        # bf16 projections (autocast) rotated by fp32 tables come out fp32, as in transformers.
        qk = torch.empty((b, n_q + n_kv, t, d), dtype=torch.promote_types(qkv.dtype, cos.dtype), device=qkv.device)
        o1, o2 = qk[..., :half], qk[..., half:]
        torch.mul(x1, cos, out=o1)
        o1.sub_(x2 * sin)
        torch.mul(x2, cos, out=o2)
        o2.add_(x1 * sin)
        v = qkv[:, :, n_q + n_kv:].transpose(1, 2).contiguous()
        ctx.save_for_backward(cos, sin)
        ctx.shape, ctx.dtype, ctx.n_q = qkv.shape, qkv.dtype, n_q
        return qk[:, :n_q], qk[:, n_q:], v

    @staticmethod
    def backward(ctx, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor):
        cos, sin = ctx.saved_tensors
        b, t, heads, d = ctx.shape
        half = d // 2
        n_q = ctx.n_q
        dqkv = torch.empty((b, heads, t, d), dtype=ctx.dtype, device=dv.device)  # strided as qkv, transposed
        for g, lo, hi in ((dq, 0, n_q), (dk, n_q, n_q + dk.shape[1])):
            g1, g2 = g[..., :half], g[..., half:]
            d1, d2 = dqkv[:, lo:hi, :, :half], dqkv[:, lo:hi, :, half:]
            d1.copy_(g1 * cos + g2 * sin)
            d2.copy_(g2 * cos - g1 * sin)
        dqkv[:, heads - dv.shape[1]:] = dv
        return dqkv.transpose(1, 2), None, None, None, None


class _SwiGLU(torch.autograd.Function):
    """``silu(gate) * up`` of the fused projection ``gu`` = [gate | up]; the backward writes the gradient
    of ``gu`` in its two halves (torch's fused silu_backward for the gate) instead of zero-filled slices."""

    @staticmethod
    def forward(ctx, gu: torch.Tensor):
        gate, up = gu.chunk(2, dim=-1)
        act = F.silu(gate)
        ctx.save_for_backward(gu, act)
        return act * up

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        gu, act = ctx.saved_tensors
        gate, up = gu.chunk(2, dim=-1)
        dgu = torch.empty(gu.shape, dtype=torch.promote_types(gu.dtype, dy.dtype), device=gu.device)
        dgate, dup = dgu.chunk(2, dim=-1)
        torch.mul(dy, act, out=dup)
        torch.ops.aten.silu_backward.grad_input(dy * up, gate, grad_input=dgate)
        return dgu.to(gu.dtype)


def supports(model, attention_mask, kwargs: dict) -> bool:
    """Whether ``decoder_forward`` computes exactly what ``model.model`` would for this call."""
    cfg = model.config
    if attention_mask is not None and not bool(attention_mask.all()):
        return False
    if set(kwargs) - {"use_cache"}:
        return False
    return (cfg.hidden_act == "silu" and not cfg.attention_bias and not cfg.mlp_bias
            and not cfg.attention_dropout and getattr(model.model, "rotary_emb", None) is not None
            and getattr(cfg, "_attn_implementation", "sdpa") in ("sdpa", None)
            and getattr(cfg, "pretraining_tp", 1) == 1
            and not _checkpointing(model))


def _checkpointing(model) -> bool:
    flag = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") \
        else "is_gradient_checkpointing"  # transformers < 5.x
    return bool(getattr(model, flag, False))


def decoder_forward(model, input_ids: torch.Tensor) -> torch.Tensor:
    """The final hidden states (after the last norm) of ``model.model`` (a LlamaModel) for ``input_ids``."""
    inner, cfg = model.model, model.config
    b, t = input_ids.shape
    x = inner.embed_tokens(input_ids)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    n_q, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    # transformers' own tables (any rope type and scaling), (1, t, head_dim) in the embedding's dtype (fp32
    # under autocast too, so bf16 queries and keys are rotated into fp32 and attention casts them back).
    # Every rope type repeats its frequencies over the two halves; the rotation needs one half.
    cos, sin = inner.rotary_emb(x, torch.arange(t, device=x.device)[None])
    cos, sin = cos[0, :, : head_dim // 2], sin[0, :, : head_dim // 2]
    eps = cfg.rms_norm_eps
    for layer in inner.layers[: cfg.num_hidden_layers]:
        attn, mlp = layer.self_attn, layer.mlp
        h = rms_norm(x, layer.input_layernorm.weight, eps)
        qkv = F.linear(h, torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
        q, k, v = _RotaryQKV.apply(qkv.view(b, t, n_q + 2 * n_kv, head_dim), cos, sin, n_q, n_kv)
        if n_q != n_kv:  # grouped-query attention: each key/value head serves n_q // n_kv query heads
            k, v = k.repeat_interleave(n_q // n_kv, dim=1), v.repeat_interleave(n_q // n_kv, dim=1)
        scale = getattr(attn, "scaling", head_dim ** -0.5)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        x = x + F.linear(o.transpose(1, 2).reshape(b, t, n_q * head_dim), attn.o_proj.weight)
        h = rms_norm(x, layer.post_attention_layernorm.weight, eps)
        gu = F.linear(h, torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
        x = x + F.linear(_SwiGLU.apply(gu), mlp.down_proj.weight)
    return rms_norm(x, inner.norm.weight, cfg.rms_norm_eps)
