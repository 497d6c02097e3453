"""Data for proxies: sources, the tokenizer, packed token shards, mixtures, held-out rows.

Typical use (what the planner does for one candidate)::

    srcs = {n: SourceConfig(n, path=..., base_dir=spec_dir) for n in ...}
    tok = train_tokenizer(srcs, vocab_size=8192, cache_dir=cache)     # or load_tokenizer(DIR)
    shards = {n: tokenize_source(s, tok, cache) for n, s in srcs.items()}
    rows, stats = build_mixture({"austen": 0.8, "cot": 0.2}, shards,
                                n_tokens=1_000_000, seq_len=256, seed=seed, cache_dir=cache)
    evals = heldout_rows(shards, seq_len=256, max_rows=64)             # {source: (n, 256)}
"""

from importlib import import_module

# Imported lazily (as in rbridge.scoring and rbridge.proxy): reading or writing documents
# (rbridge.data.sources) needs neither numpy nor tokenizers.
_NAMES = {
    "DATA_FORMAT_VERSION": "_cache", "default_cache_dir": "_cache",
    "Mixture": "mixture", "MixtureStats": "mixture", "allocate_rows": "mixture", "build_mixture": "mixture",
    "SourceShards": "shards", "heldout_rows": "shards", "token_dtype": "shards", "tokenize_source": "shards",
    "DEFAULT_HELDOUT_FRACTION": "sources", "SourceConfig": "sources", "iter_documents": "sources",
    "iter_labelled": "sources", "iter_split": "sources", "source_fingerprint": "sources",
    "write_documents": "sources",
    "SPECIAL_TOKEN": "tokenizer", "load_tokenizer": "tokenizer", "separator_id": "tokenizer",
    "tokenizer_fingerprint": "tokenizer", "train_tokenizer": "tokenizer",
}

__all__ = sorted(_NAMES)


def __getattr__(name: str):
    if name in _NAMES:
        return getattr(import_module(f"rbridge.data.{_NAMES[name]}"), name)
    raise AttributeError(f"module 'rbridge.data' has no attribute {name!r}")
