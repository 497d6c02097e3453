"""Data for proxies: sources, the tokenizer, packed token shards, mixtures, held-out rows.

Typical use (what the planner does for one candidate)::

    srcs = {n: SourceConfig(n, path=..., base_dir=spec_dir) for n in ...}
    tok = train_tokenizer(srcs, vocab_size=8192, cache_dir=cache)     # or load_tokenizer(DIR)
    shards = {n: tokenize_source(s, tok, cache) for n, s in srcs.items()}
    rows, stats = build_mixture({"austen": 0.8, "cot": 0.2}, shards,
                                n_tokens=1_000_000, seq_len=256, seed=seed, cache_dir=cache)
    evals = heldout_rows(shards, seq_len=256, max_rows=64)             # {source: (n, 256)}
"""

from rbridge.data._cache import DATA_FORMAT_VERSION, default_cache_dir
from rbridge.data.mixture import Mixture, MixtureStats, allocate_rows, build_mixture
from rbridge.data.shards import SourceShards, heldout_rows, token_dtype, tokenize_source
from rbridge.data.sources import (DEFAULT_HELDOUT_FRACTION, SourceConfig, iter_documents, iter_labelled,
                                  iter_split, source_fingerprint, write_documents)
from rbridge.data.tokenizer import (SPECIAL_TOKEN, load_tokenizer, separator_id, tokenizer_fingerprint,
                                    train_tokenizer)

__all__ = [
    "DATA_FORMAT_VERSION", "DEFAULT_HELDOUT_FRACTION", "SPECIAL_TOKEN",
    "Mixture", "MixtureStats", "SourceConfig", "SourceShards",
    "allocate_rows", "build_mixture", "default_cache_dir", "heldout_rows", "iter_documents",
    "iter_labelled", "iter_split", "load_tokenizer", "separator_id", "source_fingerprint",
    "token_dtype", "tokenize_source", "tokenizer_fingerprint", "train_tokenizer", "write_documents",
]
