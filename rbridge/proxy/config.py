"""The proxy's part of a stage: its shape and its training settings, validated when a spec loads.

A leaf module (pydantic only, no torch or transformers), so ``rbridge validate``
checks every proxy setting in a fraction of a second. ``presets.proxy_config``
turns a checked ``ProxyShape`` into the ``LlamaConfig`` the trainer builds, with
the same rules: nothing here and there can disagree, because it calls
``ProxyShape.llama_values``.

Which LlamaConfig fields a spec may set is read from the installed transformers'
source (``configuration_llama.py``, parsed with ``ast``, not imported: importing
it costs seconds because it pulls in torch), so the check follows the installed
version (``rope_theta`` in 4.x, ``rope_parameters`` in 5.x).
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel, model_validator

from rbridge.errors import FieldError

# name -> shape; the name is the approximate non-embedding parameter count (table in presets.py).
PRESETS: dict[str, dict[str, int]] = {
    name: dict(hidden_size=h, num_hidden_layers=n_layers, num_attention_heads=heads,
               num_key_value_heads=kv, intermediate_size=inter)
    for name, (h, n_layers, heads, kv, inter) in {
        "0.5M": (128, 2, 2, 2, 512),
        "2M": (192, 4, 3, 3, 576),
        "8M": (384, 4, 6, 6, 1280),
        "20M": (512, 6, 8, 8, 1408),
        "60M": (768, 10, 12, 4, 1920),
        "150M": (1024, 12, 16, 4, 3072),
        "400M": (1536, 16, 24, 8, 4096),
        "1B": (2048, 16, 32, 8, 8192),
    }.items()
}

# Fields rbridge sets from the tokenizer; a spec may not set them.
SET_BY_RBRIDGE = ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")

# Defaults that differ from LlamaConfig's (which describe a 7B model).
DEFAULTS: dict[str, Any] = dict(
    tie_word_embeddings=True,   # small models (SmolLM, Llama-3.2-1B) tie; halves embedding params
    use_cache=False,            # training only; generation code can turn it back on
    initializer_range=0.02,
)

_INT_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "intermediate_size", "max_position_embeddings", "head_dim")


@functools.lru_cache(maxsize=1)
def llama_fields() -> frozenset[str] | None:
    """LlamaConfig's own fields in the installed transformers, read from its source; None if unreadable.

    4.x declares them as ``__init__`` keyword arguments, 5.x as class annotations;
    both are collected. tests/test_proxy.py checks this equals the imported class's.
    """
    try:
        spec = importlib.util.find_spec("transformers")
        if spec is None or spec.origin is None:
            return None
        source = Path(spec.origin).parent / "models" / "llama" / "configuration_llama.py"
        tree = ast.parse(source.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError, ImportError):
        return None
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "LlamaConfig":
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    names.add(item.target.id)
                elif isinstance(item, ast.FunctionDef) and item.name == "__init__":
                    args = item.args
                    names.update(a.arg for a in args.args[1:] + args.kwonlyargs)
    names = {n for n in names if not n.startswith("_") and n not in ("model_type", "keys_to_ignore_at_inference",
                                                                    "base_model_tp_plan", "base_model_pp_plan",
                                                                    "attribute_map", "default_theta")}
    return frozenset(names) or None


def count_params(values: dict[str, Any], vocab_size: int) -> tuple[int, int]:
    """(total, non_embedding) parameters of LlamaForCausalLM with these LlamaConfig values, analytically.

    ``total`` counts tied input/output embeddings once, like ``model.parameters()``;
    ``non_embedding`` leaves out the token embedding and the output projection (the
    Kaplan et al. convention) and does not depend on the vocabulary. Missing values
    take LlamaConfig's defaults. Needs no transformers (status and compute use it).
    """
    h, n_layers = values["hidden_size"], values["num_hidden_layers"]
    heads = values.get("num_attention_heads") or max(1, h // 64)
    kv = values.get("num_key_value_heads") or heads
    inter = values.get("intermediate_size") or default_intermediate(h)
    head_dim = values.get("head_dim") or h // heads
    q, k = heads * head_dim, kv * head_dim
    attn = h * q + 2 * h * k + q * h                      # q, k, v, o projections
    if values.get("attention_bias"):
        attn += q + 2 * k + h
    mlp = 3 * h * inter                                   # gate, up, down
    if values.get("mlp_bias"):
        mlp += 2 * inter + h
    norms = 2 * h                                         # input and post-attention RMSNorm
    non_embedding = n_layers * (attn + mlp + norms) + h   # + final norm
    embedding = vocab_size * h
    lm_head = 0 if values.get("tie_word_embeddings", True) else vocab_size * h
    return non_embedding + embedding + lm_head, non_embedding


def default_intermediate(hidden: int) -> int:
    """Llama's SwiGLU width: 8/3 of hidden, rounded up to a multiple of 64."""
    return 64 * math.ceil(8 * hidden / 3 / 64)


class ProxyShape(RootModel[dict[str, Any]]):
    """A stage's ``proxy``: ``{preset: NAME, ...overrides}`` or explicit LlamaConfig fields.

    Checked when the spec loads: a known preset, known LlamaConfig fields that rbridge
    does not set itself, positive integer sizes, heads that divide the hidden size and
    key/value heads that divide the heads. The mapping is kept as written (run
    fingerprints hash it).
    """

    @model_validator(mode="after")
    def _check(self):
        self.llama_values(seq_len=None)
        return self

    def llama_values(self, seq_len: int | None) -> dict[str, Any]:
        """The LlamaConfig keyword values of this shape (without the tokenizer's ids and vocabulary).

        With ``seq_len``, ``max_position_embeddings`` defaults to it and must be at least it.
        Raises FieldError with the path inside ``proxy``.
        """
        spec = dict(self.root)
        values: dict[str, Any] = dict(DEFAULTS)
        preset = spec.pop("preset", None)
        if preset is not None:
            if not isinstance(preset, str) or preset not in PRESETS:
                raise FieldError(("preset",), f"unknown preset {preset!r}; presets are: {', '.join(PRESETS)}")
            values.update(PRESETS[preset])
        known = llama_fields()
        for key in spec:
            if key in SET_BY_RBRIDGE:
                raise FieldError((key,), f"{key} is set by rbridge (from the tokenizer), not by the spec")
            if known is not None and key not in known:
                raise FieldError((key,), f"unknown LlamaConfig field {key!r}")
        values.update(spec)
        for key in _INT_FIELDS:  # a size written as null means "the default", as if left out
            if key in values and values[key] is None:
                del values[key]
        for key in ("hidden_size", "num_hidden_layers"):
            if key not in values:
                raise FieldError((key,), "required when no preset is given")
        for key in _INT_FIELDS:
            v = values.get(key)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise FieldError((key,), f"must be a positive integer (got {v!r})")
        hidden = values["hidden_size"]
        values.setdefault("num_attention_heads", max(1, hidden // 64))
        values.setdefault("num_key_value_heads", values["num_attention_heads"])
        values.setdefault("intermediate_size", default_intermediate(hidden))
        heads, kv = values["num_attention_heads"], values["num_key_value_heads"]
        if values.get("head_dim") is None and hidden % heads:
            raise FieldError(("num_attention_heads",),
                             f"hidden_size {hidden} is not divisible by num_attention_heads {heads}")
        if heads % kv:
            raise FieldError(("num_key_value_heads",),
                             f"num_attention_heads {heads} is not divisible by num_key_value_heads {kv}")
        if seq_len is not None:
            values.setdefault("max_position_embeddings", seq_len)
            if values["max_position_embeddings"] < seq_len:
                raise FieldError(("max_position_embeddings",), f"must be at least seq_len {seq_len}")
        return values


_STRICT = ConfigDict(extra="forbid")
# Token counts are stored as 64-bit integers (and multiplied by 6 x params for FLOPs, as floats).
MAX_TOKENS = 2**63 - 1


class TrainingConfig(BaseModel):
    """How a stage trains each proxy. Every field may be left out of a stage and is then inherited
    from the previous stage (the first stage falls back to ``TRAINING_DEFAULTS``)."""

    model_config = _STRICT
    tokens: int | None = Field(None, gt=0, le=MAX_TOKENS,
                               description="training tokens per proxy (the stage's budget)")
    seq_len: int | None = Field(None, gt=1, description="tokens per packed row")
    batch_size: int | None = Field(None, gt=0, description="rows per optimizer step (global, all processes)")
    micro_batch_size: int | None = Field(None, gt=0, description=(
        "rows per forward/backward pass; batch_size must be a multiple of micro_batch_size x processes. "
        "Fixing it makes a run independent of the number of processes"))
    lr: float | None = Field(None, gt=0, description="peak learning rate (AdamW)")
    warmup: float | None = Field(None, ge=0, lt=1, description="fraction of the steps spent warming up")
    precision: Literal["auto", "fp32", "bf16"] | None = None

    def check_complete(self) -> None:
        """Cross-field checks of a resolved stage (every field filled)."""
        if self.micro_batch_size is not None and self.batch_size % self.micro_batch_size:
            raise FieldError(("micro_batch_size",), f"batch_size {self.batch_size} is not a multiple of "
                                                    f"micro_batch_size {self.micro_batch_size}")

    def run_settings(self) -> dict[str, Any]:
        """The settings a run's numbers depend on, as stored in runs.config and hashed in fingerprints.

        ``micro_batch_size`` appears only when set, so runs recorded before it existed keep their fingerprints.
        """
        out = self.model_dump()
        if out["micro_batch_size"] is None:
            del out["micro_batch_size"]
        return out


TRAINING_DEFAULTS: dict[str, Any] = {"seq_len": 256, "batch_size": 16, "lr": 3e-3, "warmup": 0.05,
                                     "precision": "auto"}
