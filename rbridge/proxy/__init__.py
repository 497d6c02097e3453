"""Proxy models: size presets -> LlamaConfig, parameter and FLOP counts, a resumable training loop.

Public names are imported lazily (as in rbridge.scoring), so the spec can use the
leaf ``rbridge.proxy.config`` (shapes and training settings) without importing torch.
"""

from importlib import import_module

_NAMES = {
    "PRESETS": "config", "ProxyShape": "config", "TrainingConfig": "config",
    "param_counts": "presets", "preset_table": "presets", "proxy_config": "presets",
    "proxy_train_flops": "presets", "train_flops": "presets",
    "ProxyLlamaForCausalLM": "model", "linear_cross_entropy": "model",
    "ProxyTrainer": "train", "latest_checkpoint": "train", "lr_factor": "train", "resolve_precision": "train",
}

__all__ = sorted(_NAMES)


def __getattr__(name: str):
    if name in _NAMES:
        return getattr(import_module(f"rbridge.proxy.{_NAMES[name]}"), name)
    raise AttributeError(f"module 'rbridge.proxy' has no attribute {name!r}")
