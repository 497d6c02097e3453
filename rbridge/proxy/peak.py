"""Model FLOPs utilisation (MFU): the FLOPs a proxy's training does per second over the device's peak.

Model FLOPs per token follow PaLM (Chowdhery et al. 2022, appendix B), the
definition MFU figures are usually quoted with: 6·N for every weight matrix a
token passes through (the non-embedding weights and the output layer; an
embedding lookup does no arithmetic) plus 12·L·d_attn·T for attention scores
and values, T the sequence length. Recomputation and padding are not counted.

The peak:
- on NVIDIA GPUs the dense (no sparsity) peak of the precision trained in, from
  the vendor's data sheets for the GPUs named below (bf16: tensor cores; fp32:
  PyTorch's default, without TF32);
- elsewhere, and on CPUs, which publish no usable figure (it depends on the
  vector units, the clock under load and the cores a run may use), the best rate
  of a large matrix product measured in this process at the run's thread count
  and precision: an *achievable* peak, so a CPU's MFU reads higher than one
  against a theoretical peak would.
"""

from __future__ import annotations

import functools
import time

import torch

# name fragment -> (bf16 dense, fp32) FLOP/s; first match wins, so specific names come first.
GPU_PEAKS: list[tuple[str, tuple[float, float]]] = [
    ("GB200", (2.5e15, 80e12)),
    ("B200", (2.25e15, 80e12)),
    ("H100 PCIe", (756e12, 51e12)),
    ("H100 NVL", (835e12, 60e12)),
    ("H200", (989e12, 67e12)),
    ("GH200", (989e12, 67e12)),
    ("H100", (989e12, 67e12)),   # SXM
    ("H800", (989e12, 67e12)),
    ("A100", (312e12, 19.5e12)),
    ("A800", (312e12, 19.5e12)),
    ("L40S", (362e12, 91.6e12)),
    ("L4", (121e12, 30.3e12)),
]


def model_flops_per_token(config, seq_len: int) -> float:
    """Training FLOPs per token of a Llama config (PaLM's 6·N + 12·L·d_attn·T)."""
    from rbridge.proxy.presets import param_counts

    _, non_embedding = param_counts(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    d_attn = config.num_attention_heads * head_dim
    output_layer = config.vocab_size * config.hidden_size
    return 6.0 * (non_embedding + output_layer) + 12.0 * config.num_hidden_layers * d_attn * seq_len


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return device.type


def peak_flops(device: torch.device, precision: str, threads: int) -> float:
    """FLOP/s of ``device`` at ``precision`` ("fp32" or "bf16"): the data sheet's for the GPUs in
    GPU_PEAKS, else a measured matrix product (module docstring)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for fragment, (bf16, fp32) in GPU_PEAKS:
            if fragment in name:
                return bf16 if precision == "bf16" else fp32
    return _measured(device.type, device.index, precision, threads)


@functools.lru_cache(maxsize=None)
def _measured(kind: str, index: int | None, precision: str, threads: int) -> float:
    """Best FLOP/s of n x n matrix products on the device (n = 1024 on a CPU, 8192 on a GPU)."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    device = torch.device(kind, index) if index is not None else torch.device(kind)
    return mm_rate(device, 8192 if kind == "cuda" else 1024, dtype, threads)


def mm_rate(device: torch.device, n: int, dtype: torch.dtype, threads: int) -> float:
    """Best FLOP/s of 5 n x n matrix products in ``dtype`` on ``device`` at ``threads`` CPU threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        best = float("inf")
        for _ in range(5):
            _sync(device)
            t0 = time.perf_counter()
            torch.mm(a, b)
            _sync(device)
            best = min(best, time.perf_counter() - t0)
        return 2.0 * n ** 3 / best
    finally:
        torch.set_num_threads(before)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
