"""Packed token shards: one source tokenized into two flat token streams.

``train.bin`` holds the training split, ``heldout.bin`` the held-out split,
each a flat array of token ids (uint16 when the vocabulary fits, else uint32)
in which every document is preceded by the tokenizer's EOS token (its BOS when
it has no EOS): ``EOS d1 EOS d2 ...``. Each document thus starts the way the
proxy sees a scored context start (after BOS/EOS), and the stream ends at a
document boundary.

Shards are cached under ``cache_dir/shards/<key>/`` with the key covering the
source's content fingerprint, the tokenizer's fingerprint, the held-out
fraction and the data-format version.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rbridge.data._cache import (DATA_FORMAT_VERSION, content_key, default_cache_dir, discard_entry,
                                 new_entry_dir, publish_entry, read_manifest)
from rbridge.data.sources import DEFAULT_HELDOUT_FRACTION, SourceConfig, iter_labelled, source_fingerprint
from rbridge.data.tokenizer import separator_id, tokenizer_fingerprint
from rbridge.errors import InputError

# Documents are encoded in batches of about this many characters; the fast
# tokenizer parallelises within a batch, so no multiprocessing is needed here.
_BATCH_CHARS = 1 << 20
_BATCH_DOCS = 4096


@dataclass(frozen=True)
class SourceShards:
    """The token streams of one source. ``train`` and ``heldout`` are read-only memmaps."""

    name: str
    key: str
    dir: Path
    train: np.ndarray
    heldout: np.ndarray
    n_train_docs: int
    n_heldout_docs: int
    eos_id: int
    cached: bool

    @property
    def n_train_tokens(self) -> int:
        return int(self.train.shape[0])

    @property
    def n_heldout_tokens(self) -> int:
        return int(self.heldout.shape[0])

    @property
    def dtype(self) -> np.dtype:
        return self.train.dtype


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocabulary of at most 65535 tokens), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


def shard_cache_key(src: SourceConfig, tokenizer, *,
                    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION) -> str:
    return content_key({"source": source_fingerprint(src), "tokenizer": tokenizer_fingerprint(tokenizer),
                        "heldout_fraction": heldout_fraction, "version": DATA_FORMAT_VERSION})


def _open_stream(path: Path, dtype: np.dtype, n: int) -> np.ndarray:
    if n == 0:  # numpy cannot memory-map an empty file
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(n,))


def _load(src: SourceConfig, key: str, entry: Path, manifest: dict, cached: bool) -> SourceShards | None:
    try:
        dtype = np.dtype(manifest["dtype"])
        n_train, n_held = int(manifest["n_train_tokens"]), int(manifest["n_heldout_tokens"])
        for fname, n in (("train.bin", n_train), ("heldout.bin", n_held)):
            if (entry / fname).stat().st_size != n * dtype.itemsize:
                return None
        return SourceShards(name=src.name, key=key, dir=entry,
                            train=_open_stream(entry / "train.bin", dtype, n_train),
                            heldout=_open_stream(entry / "heldout.bin", dtype, n_held),
                            n_train_docs=int(manifest["n_train_docs"]),
                            n_heldout_docs=int(manifest["n_heldout_docs"]),
                            eos_id=int(manifest["eos_id"]), cached=cached)
    except (KeyError, TypeError, ValueError, OSError):
        return None


def pack(encoded: list[list[int]], sep: int, dtype: np.dtype) -> np.ndarray:
    """Documents' token ids as one stream, ``sep`` before each: the shard layout (whole and sampled)."""
    out = np.empty(sum(len(ids) for ids in encoded) + len(encoded), dtype=dtype)
    pos = 0
    for ids in encoded:
        out[pos] = sep
        out[pos + 1:pos + 1 + len(ids)] = ids
        pos += 1 + len(ids)
    return out


class _StreamWriter:
    def __init__(self, path: Path, dtype: np.dtype):
        self.fh = open(path, "wb")
        self.dtype = dtype
        self.n_tokens = 0
        self.n_docs = 0

    def write(self, encoded: list[list[int]], sep: int) -> None:
        out = pack(encoded, sep, self.dtype)
        out.tofile(self.fh)
        self.n_tokens += len(out)
        self.n_docs += len(encoded)

    def close(self) -> None:
        self.fh.flush()
        self.fh.close()


def _encoder(tokenizer):
    """A function from a list of texts to lists of ids, without special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        fast = getattr(backend, "encode_batch_fast", None) or backend.encode_batch  # fast: no offsets
        return lambda texts: [e.ids for e in fast(texts, add_special_tokens=False)]
    return lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"]


def tokenize_source(src: SourceConfig, tokenizer, cache_dir: str | Path | None = None, *,
                    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION) -> SourceShards:
    """Tokenize ``src`` into its train and held-out token streams, or reuse them from the cache.

    The returned :class:`SourceShards` has ``cached=True`` when nothing was
    tokenized. A cache entry becomes visible only once complete (its manifest
    is written last and the directory is renamed into place).
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = shard_cache_key(src, tokenizer, heldout_fraction=heldout_fraction)
    final = root / "shards" / key
    manifest = read_manifest(final)
    if manifest is not None:
        hit = _load(src, key, final, manifest, cached=True)
        if hit is not None:
            return hit

    dtype = token_dtype(len(tokenizer))
    sep = separator_id(tokenizer)
    encode = _encoder(tokenizer)
    tmp = new_entry_dir(final.parent, key)
    writers: dict[bool, _StreamWriter] = {}
    try:
        writers[False] = _StreamWriter(tmp / "train.bin", dtype)
        writers[True] = _StreamWriter(tmp / "heldout.bin", dtype)
        batches: dict[bool, list[str]] = {False: [], True: []}
        chars = {False: 0, True: 0}

        def flush(side: bool) -> None:
            if batches[side]:
                writers[side].write(encode(batches[side]), sep)
                batches[side], chars[side] = [], 0

        for doc, held in iter_labelled(src, heldout_fraction=heldout_fraction):
            batches[held].append(doc)
            chars[held] += len(doc)
            if chars[held] >= _BATCH_CHARS or len(batches[held]) >= _BATCH_DOCS:
                flush(held)
        flush(False)
        flush(True)
        for w in writers.values():
            w.close()
        tr, ho = writers[False], writers[True]
        manifest = {"key": key, "source": src.name, "dtype": dtype.name, "eos_id": sep,
                    "n_train_tokens": tr.n_tokens, "n_train_docs": tr.n_docs,
                    "n_heldout_tokens": ho.n_tokens, "n_heldout_docs": ho.n_docs,
                    "heldout_fraction": heldout_fraction, "vocab_size": len(tokenizer),
                    "source_fingerprint": source_fingerprint(src),
                    "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer)}
        publish_entry(tmp, final, manifest)
    except BaseException:
        for w in writers.values():
            w.fh.close()
        discard_entry(tmp)
        raise
    loaded = _load(src, key, final, read_manifest(final) or {}, cached=False)
    if loaded is None:
        raise RuntimeError(f"shard cache entry {final} is unreadable right after writing it")
    return loaded


def heldout_rows(shards: SourceShards | Mapping[str, SourceShards], seq_len: int,
                 max_rows: int) -> np.ndarray | dict[str, np.ndarray]:
    """Held-out evaluation rows: ``(n, seq_len)`` int64 windows of the held-out stream.

    The ``n = min(max_rows, n_heldout_tokens // seq_len)`` windows are
    non-overlapping and spread evenly over the stream (no randomness, so
    every proxy is evaluated on the same tokens). A held-out stream shorter
    than ``seq_len`` gives one shorter row ``(1, n_heldout_tokens)``.
    Given a mapping of shards, returns a dict of such arrays, one per source.
    """
    if isinstance(shards, Mapping):
        return {name: heldout_rows(s, seq_len, max_rows) for name, s in shards.items()}
    if seq_len <= 0 or max_rows <= 0:
        raise InputError(f"seq_len and max_rows must be positive, got {seq_len} and {max_rows}",
                         field="seq_len")
    stream = shards.heldout
    n_windows = stream.shape[0] // seq_len
    if n_windows == 0:
        return np.asarray(stream, dtype=np.int64).reshape(1, -1)
    n = min(max_rows, n_windows)
    starts = (np.arange(n, dtype=np.int64) * n_windows // n) * seq_len
    idx = starts[:, None] + np.arange(seq_len, dtype=np.int64)[None, :]
    return np.asarray(stream[idx], dtype=np.int64)
