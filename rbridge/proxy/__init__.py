"""Proxy models: size presets -> LlamaConfig, parameter and FLOP counts, a resumable training loop."""

from rbridge.proxy.presets import (PRESETS, param_counts, preset_table, proxy_config, proxy_train_flops,
                                   train_flops)
from rbridge.proxy.train import ProxyTrainer, latest_checkpoint, lr_factor, resolve_precision

__all__ = ["PRESETS", "ProxyTrainer", "latest_checkpoint", "lr_factor", "param_counts", "preset_table",
           "proxy_config", "proxy_train_flops", "resolve_precision", "train_flops"]
