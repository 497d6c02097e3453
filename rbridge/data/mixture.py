"""Candidate datasets as token-share mixtures of sources, packed into training rows.

A mixture of ``n_tokens`` at ``seq_len`` is ``n_rows = ceil(n_tokens / seq_len)``
rows, each a contiguous ``seq_len``-token window of one source's training
stream. Rows are allocated to sources by the declared token shares
(largest-remainder rounding, ties in name order), so the measured shares match
the declared ones up to one row.

Within a source, one epoch is a partition of its stream into non-overlapping
windows starting at a random offset (the stream is read cyclically, so the
last window may wrap to the start). A source needing fewer rows than an
epoch holds gets a random subset of that epoch's windows, so a short budget
samples the whole corpus rather than its beginning; a source needing more
repeats in further epochs, each with a fresh offset, and the stats report
its epochs. All rows are then shuffled. Everything random derives from the
seed, so the rows (and their order) are a pure function of
(seed, mix, source shards, n_tokens, seq_len): a resumed training run reading
row ``i`` at step ``i`` sees what an uninterrupted one saw.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, NamedTuple

import numpy as np

from rbridge.data._cache import (DATA_FORMAT_VERSION, content_key, default_cache_dir, discard_entry,
                                 new_entry_dir, publish_entry, read_manifest)
from rbridge.data.shards import SourceShards, heldout_rows  # noqa: F401  (heldout_rows re-exported)
from rbridge.errors import InputError

SHARE_TOLERANCE = 1e-6
_CHUNK_ROWS = 2048
_SHUFFLE_TAG = 0x5348_5546  # separates the shuffle stream from per-source streams


@dataclass(frozen=True)
class MixtureStats:
    """What a built mixture holds, per source (all dicts keyed by source name)."""

    declared: dict[str, float]
    rows: dict[str, int]
    tokens: dict[str, int]
    measured_share: dict[str, float]
    epochs: dict[str, float]     # tokens drawn / training tokens available; > 1 means repeated data
    n_rows: int
    seq_len: int
    n_tokens: int                # n_rows * seq_len (the request rounded up to whole rows)
    key: str
    cached: bool = False
    repeated: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


class Mixture(NamedTuple):
    """``rows``: read-only ``(n_rows, seq_len)`` memmap of token ids (the shards' dtype); ``stats``."""

    rows: np.ndarray
    stats: MixtureStats


def _name_seed(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big")


def _validate(mix: Mapping[str, float], shards: Mapping[str, SourceShards], n_tokens: int,
              seq_len: int, where: str) -> dict[str, float]:
    if not isinstance(mix, Mapping) or not mix:
        raise InputError("a mixture needs at least one source", field=where)
    weights: dict[str, float] = {}
    for name, w in mix.items():
        if name not in shards:
            known = ", ".join(sorted(shards)) or "none"
            raise InputError(f"unknown source {name!r} (known: {known})", field=f"{where}.{name}")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0:
            raise InputError(f"weight must be a number > 0, got {w!r}", field=f"{where}.{name}")
        if shards[name].n_train_tokens == 0:
            raise InputError(f"source {name!r} has no training tokens", field=f"{where}.{name}")
        weights[name] = float(w)
    total = sum(weights.values())
    if abs(total - 1.0) > SHARE_TOLERANCE:
        raise InputError(f"weights are token shares and must sum to 1, they sum to {total:.8g}", field=where)
    for value, label in ((n_tokens, "tokens"), (seq_len, "seq_len")):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise InputError(f"must be a positive integer, got {value!r}", field=label)
    return weights


def planned_epochs(mix: Mapping[str, float], train_tokens: Mapping[str, int], n_tokens: int,
                   seq_len: int) -> dict[str, float]:
    """{source: tokens a run of ``n_tokens`` draws from it / its training tokens} for a mixture, by the
    rows ``build_mixture`` allocates (> 1: the source repeats). ``train_tokens``: {source: training tokens}."""
    total = sum(mix.values())
    n_rows = -(-n_tokens // seq_len)
    rows = allocate_rows({k: v / total for k, v in mix.items()}, n_rows)
    return {src: rows[src] * seq_len / max(1, train_tokens[src]) for src in sorted(rows)}


def allocate_rows(weights: Mapping[str, float], n_rows: int) -> dict[str, int]:
    """Rows per source by largest-remainder rounding of ``weight * n_rows`` (ties in name order)."""
    names = sorted(weights)
    quotas = {n: weights[n] * n_rows for n in names}
    rows = {n: int(math.floor(quotas[n])) for n in names}
    left = n_rows - sum(rows.values())
    by_remainder = sorted(names, key=lambda n: -(quotas[n] - rows[n]))  # stable: name order on ties
    for n in by_remainder[:left]:
        rows[n] += 1
    return rows


def _window_starts(n_stream: int, n_rows: int, seq_len: int, rng: np.random.Generator) -> np.ndarray:
    """Start positions (into the cyclic stream) of ``n_rows`` windows, epoch by epoch."""
    per_epoch = max(1, n_stream // seq_len)
    starts: list[np.ndarray] = []
    left = n_rows
    while left > 0:
        offset = int(rng.integers(0, min(seq_len, n_stream)))
        take = min(left, per_epoch)
        ks = np.arange(per_epoch) if take == per_epoch else np.sort(rng.choice(per_epoch, take, replace=False))
        starts.append((offset + ks.astype(np.int64) * seq_len) % n_stream)
        left -= take
    return np.concatenate(starts) if starts else np.zeros(0, dtype=np.int64)


def mixture_cache_key(weights: Mapping[str, float], shards: Mapping[str, SourceShards], n_tokens: int,
                      seq_len: int, seed: int) -> str:
    return content_key({"mix": [[n, repr(float(weights[n]))] for n in sorted(weights)],
                        "shards": {n: shards[n].key for n in sorted(weights)},
                        "n_tokens": int(n_tokens), "seq_len": int(seq_len), "seed": int(seed),
                        "version": DATA_FORMAT_VERSION})


def build_mixture(mix: Mapping[str, float], shards: Mapping[str, SourceShards], n_tokens: int,
                  seq_len: int, seed: int, cache_dir: str | Path | None = None, *,
                  where: str = "mix") -> Mixture:
    """Pack a token-share mixture of the sources' training streams into shuffled rows.

    ``mix`` maps source names (keys of ``shards``) to token shares: each > 0,
    summing to 1 within 1e-6 (else InputError whose field is ``where`` or
    ``where.<source>``). Returns ``Mixture(rows, stats)``; ``rows`` is a
    read-only memmap cached under ``cache_dir/mixtures/<key>/``.
    """
    weights = _validate(mix, shards, n_tokens, seq_len, where)
    n_rows = -(-int(n_tokens) // int(seq_len))
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = mixture_cache_key(weights, shards, n_tokens, seq_len, seed)
    final = root / "mixtures" / key
    dtype = np.dtype(np.uint32) if any(shards[n].dtype.itemsize > 2 for n in weights) else np.dtype(np.uint16)

    manifest = read_manifest(final)
    if manifest is not None:
        hit = _load(final, manifest, n_rows, seq_len, dtype)
        if hit is not None:
            return hit

    names = sorted(weights)
    alloc = allocate_rows(weights, n_rows)
    src_of_row = np.concatenate([np.full(alloc[n], i, dtype=np.int32) for i, n in enumerate(names)])
    starts = np.concatenate([
        _window_starts(shards[n].n_train_tokens, alloc[n], seq_len,
                       np.random.default_rng(np.random.SeedSequence([int(seed) & (2**63 - 1), _name_seed(n)])))
        for n in names])
    perm = np.random.default_rng(np.random.SeedSequence([int(seed) & (2**63 - 1), _SHUFFLE_TAG])).permutation(n_rows)
    src_of_row, starts = src_of_row[perm], starts[perm]

    tmp = new_entry_dir(final.parent, key)
    try:
        out = np.memmap(tmp / "rows.bin", dtype=dtype, mode="w+", shape=(n_rows, seq_len))
        window = np.arange(seq_len, dtype=np.int64)
        for lo in range(0, n_rows, _CHUNK_ROWS):
            hi = min(n_rows, lo + _CHUNK_ROWS)
            chunk_src, chunk_starts = src_of_row[lo:hi], starts[lo:hi]
            block = np.empty((hi - lo, seq_len), dtype=dtype)
            for i, n in enumerate(names):
                sel = np.nonzero(chunk_src == i)[0]
                if sel.size:
                    stream = shards[n].train
                    idx = (chunk_starts[sel, None] + window[None, :]) % stream.shape[0]
                    block[sel] = stream[idx]
            out[lo:hi] = block
        out.flush()
        del out
        tokens = {n: alloc[n] * seq_len for n in names}
        total = n_rows * seq_len
        epochs = {n: tokens[n] / shards[n].n_train_tokens for n in names}
        stats = MixtureStats(declared=dict(sorted(weights.items())), rows=alloc, tokens=tokens,
                             measured_share={n: tokens[n] / total for n in names}, epochs=epochs,
                             n_rows=n_rows, seq_len=int(seq_len), n_tokens=total, key=key,
                             repeated=[n for n in names if epochs[n] > 1.0])
        publish_entry(tmp, final, {"dtype": dtype.name, "stats": stats.to_dict()})
    except BaseException:
        discard_entry(tmp)
        raise
    loaded = _load(final, read_manifest(final) or {}, n_rows, seq_len, dtype, cached=False)
    if loaded is None:
        raise RuntimeError(f"mixture cache entry {final} is unreadable right after writing it")
    return loaded


def _load(entry: Path, manifest: dict, n_rows: int, seq_len: int, dtype: np.dtype,
          cached: bool = True) -> Mixture | None:
    try:
        if np.dtype(manifest["dtype"]) != dtype:
            return None
        if (entry / "rows.bin").stat().st_size != n_rows * seq_len * dtype.itemsize:
            return None
        fields = dict(manifest["stats"])
        fields["cached"] = cached
        stats = MixtureStats(**fields)
        rows = np.memmap(entry / "rows.bin", dtype=dtype, mode="r", shape=(n_rows, seq_len))
        return Mixture(rows, stats)
    except (KeyError, TypeError, ValueError, OSError):
        return None
