"""Sample, don't swallow: tokenize a large source only as far as a plan needs, on every core.

A plan draws a small share of a large corpus: the most any stage takes from the
source (``need`` tokens, margin included) plus its held-out slice. A sampled source
is read chunk by chunk (rbridge.data.formats: Parquet row groups, Arrow batch runs,
byte ranges, files) in a seeded order that spans the whole corpus, and tokenized
until the training stream holds ``need`` tokens and at least one held-out document
exists. The order depends only on the source's content, so every plan reading the
same corpus reads it in the same order: the cache entry under
``cache_dir/samples/<key>/`` holds the chunks tokenized so far, and a plan that
needs more extends it (appends the next chunks) instead of redoing it. A plan
uses the shortest prefix of that order that meets its need, so its streams (and
its runs) are the same whoever extended the entry since.

Held-out documents follow the rule of small sources (sha1 of the text past the
last ``heldout_fraction`` of hash space), applied per document, so a document is
on the same side of the split in a sample as in a full read.

Chunks are tokenized by worker processes (spawned: the parent may hold torch),
each writing its chunk's token streams to a part file; the parent appends the
parts in order, so memory stays at a few chunks whatever the corpus size, and the
result does not depend on the number of workers.
"""

from __future__ import annotations

import concurrent.futures as cf
import fcntl
import json
import multiprocessing
import os
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rbridge.data._cache import DATA_FORMAT_VERSION, content_key
from rbridge.data.formats import Chunk, read_chunk
from rbridge.data.shards import SourceShards, pack, token_dtype
from rbridge.data.sources import SourceConfig, _doc_hash, chunk_order, heldout_threshold, source_fingerprint
from rbridge.errors import InputError
from rbridge.reporting import SILENT, Reporter

SAMPLE_VERSION = 1
_BATCH_CHARS = 1 << 20
STATE = "chunks.json"


@dataclass(frozen=True)
class SampleRead:
    """How much of a sampled source a plan read."""

    chunks: int
    chunks_total: int
    bytes: int
    bytes_total: int
    tokenized_now: int  # chunks tokenized by this call (0: all from the cache)


# ---------------------------------------------------------------------------- one chunk (in a worker)

_worker: dict = {}


def _init_worker(tokenizer_json: str, sep: int, dtype: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker process
    from tokenizers import Tokenizer

    _worker.update(tok=Tokenizer.from_str(tokenizer_json), sep=sep, dtype=np.dtype(dtype))


def _tokenize_chunk(chunk: Chunk, fmt: str, field: str | None, name: str, threshold: int, out: str) -> dict:
    """Tokenize one chunk into ``out.train`` / ``out.heldout`` (EOS before every document)."""
    tok, sep, dtype = _worker["tok"], _worker["sep"], _worker["dtype"]
    counts = {"train": 0, "heldout": 0, "train_docs": 0, "heldout_docs": 0}
    files = {side: open(f"{out}.{side}", "wb") for side in ("train", "heldout")}
    batches: dict[str, list[str]] = {"train": [], "heldout": []}
    chars = {"train": 0, "heldout": 0}

    def flush(side: str) -> None:
        if not batches[side]:
            return
        encoded = [e.ids for e in tok.encode_batch_fast(batches[side], add_special_tokens=False)]
        arr = pack(encoded, sep, dtype)
        arr.tofile(files[side])
        counts[side] += len(arr)
        counts[f"{side}_docs"] += len(encoded)
        batches[side], chars[side] = [], 0

    try:
        for doc, _where in read_chunk(chunk, fmt, field, name):
            side = "heldout" if _doc_hash(doc) >= threshold else "train"
            batches[side].append(doc)
            chars[side] += len(doc)
            if chars[side] >= _BATCH_CHARS:
                flush(side)
        flush("train")
        flush("heldout")
    finally:
        for fh in files.values():
            fh.close()
    return counts


def _split_tokens(chunk: Chunk, tf, eos: int, vocab: int, threshold: int, name: str, out: str) -> dict:
    """A token file's chunk (rbridge.data.tokens) into ``out.train`` / ``out.heldout``."""
    from rbridge.data.tokens import split_chunk

    dtype = _worker.get("dtype") or np.dtype(np.uint32)
    train, held, n_train, n_held = split_chunk(tf, chunk, eos, vocab, threshold, name)
    train.astype(dtype).tofile(f"{out}.train")
    held.astype(dtype).tofile(f"{out}.heldout")
    return {"train": int(train.size), "heldout": int(held.size), "train_docs": n_train, "heldout_docs": n_held}


# ---------------------------------------------------------------------------- the cache entry


@contextmanager
def _locked(path: Path):
    """An exclusive lock on ``path`` (another process extending the same sample waits)."""
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _read_state(entry: Path) -> list[dict]:
    try:
        state = json.loads((entry / STATE).read_text())
        return list(state["chunks"])
    except (OSError, ValueError, KeyError, TypeError):
        return []


def _write_state(entry: Path, chunks: list[dict], meta: dict) -> None:
    part = entry / (STATE + ".part")
    with open(part, "w") as fh:
        json.dump({**meta, "chunks": chunks}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(part, entry / STATE)


def _prefix(done: list[dict], need: int) -> int | None:
    """The shortest prefix of the tokenized chunks meeting the need (train tokens and one held-out
    document), or None."""
    train = held = 0
    for k, c in enumerate(done, start=1):
        train += c["train"]
        held += c["heldout_docs"]
        if train >= need and held > 0:
            return k
    return None


def _append(dst: Path, src: Path, keep_bytes: int) -> None:
    with open(dst, "ab") as out:
        out.truncate(keep_bytes)  # a crash mid-append left bytes past the state: drop them
        out.seek(keep_bytes)
        with open(src, "rb") as fh:
            while block := fh.read(8 << 20):
                out.write(block)
        out.flush()
        os.fsync(out.fileno())
    src.unlink()


def sample_shards(src: SourceConfig, tokenizer, need: int, cache_dir: Path, *, heldout_fraction: float,
                  workers: int | None = None, report: Reporter = SILENT):
    """The token streams of a sampled source: at least ``need`` training tokens (when the source has
    them), read in the sample order and cached; returns (SourceShards, SampleRead)."""
    from rbridge.data.tokenizer import separator_id, tokenizer_fingerprint

    threshold = heldout_threshold(heldout_fraction)
    chunks = src.chunks()
    fp = source_fingerprint(src)
    order = chunk_order(fp, len(chunks))
    dtype = token_dtype(len(tokenizer))
    sep = separator_id(tokenizer)
    base = content_key({"source": fp, "tokenizer": tokenizer_fingerprint(tokenizer),
                        "heldout_fraction": heldout_fraction, "version": DATA_FORMAT_VERSION,
                        "sample": SAMPLE_VERSION})
    entry = Path(cache_dir) / "samples" / base
    entry.mkdir(parents=True, exist_ok=True)
    meta = {"key": base, "source": src.name, "dtype": dtype.name, "eos_id": sep, "n_chunks": len(chunks)}
    tokenized = 0
    with _locked(entry / ".lock"):
        done = _read_state(entry)
        if _prefix(done, need) is None and len(done) < len(chunks):
            tokenized = _extend(src, tokenizer, chunks, order, done, need, entry, meta, threshold, sep, dtype,
                                workers, report)
    k = _prefix(done, need) or len(done)
    used = done[:k]
    if not used or sum(c["train_docs"] for c in used) == 0:
        raise InputError(f"source {src.name!r} holds no documents", field=f"sources.{src.name}")
    if sum(c["heldout_docs"] for c in used) == 0:
        raise InputError(f"source {src.name!r}: no document of the whole source falls in the held-out slice "
                         f"(heldout_fraction {heldout_fraction}); raise it", field=f"sources.{src.name}")
    n_train, n_held = sum(c["train"] for c in used), sum(c["heldout"] for c in used)

    def stream(name: str, n: int) -> np.ndarray:
        return np.memmap(entry / name, dtype=dtype, mode="r", shape=(n,)) if n else np.zeros(0, dtype=dtype)

    shards = SourceShards(name=src.name, key=content_key({"sample": base, "chunks": k}), dir=entry,
                          train=stream("train.bin", n_train), heldout=stream("heldout.bin", n_held),
                          n_train_docs=sum(c["train_docs"] for c in used),
                          n_heldout_docs=sum(c["heldout_docs"] for c in used), eos_id=sep,
                          cached=tokenized == 0)
    by_index = {int(i): c for i, c in enumerate(chunks)}
    read = SampleRead(chunks=k, chunks_total=len(chunks), bytes=sum(by_index[c["chunk"]].nbytes for c in used),
                      bytes_total=sum(c.nbytes for c in chunks), tokenized_now=tokenized)
    return shards, read


def _extend(src, tokenizer, chunks, order, done, need, entry, meta, threshold, sep, dtype, workers,
            report: Reporter) -> int:
    """Tokenize the next chunks in the sample order and append them until the need is met; returns how
    many chunks were tokenized. ``done`` is extended in place and the state saved after every chunk."""
    sizes = {"train": sum(c["train"] for c in done) * dtype.itemsize,
             "heldout": sum(c["heldout"] for c in done) * dtype.itemsize}
    for side in sizes:  # the files as the state says (a crash may have appended past it)
        with open(entry / f"{side}.bin", "ab") as fh:
            fh.truncate(sizes[side])
    todo = [int(i) for i in order[len(done):]]
    n_workers = max(1, min(workers or os.cpu_count() or 1, len(todo)))
    tok_json = tokenizer.backend_tokenizer.to_str()
    if src.fmt == "tokens":
        files = {tf.path: tf for tf in src.token_files()}
        work = _split_tokens
        args = lambda i: (chunks[i], files[chunks[i].file], sep, len(tokenizer), threshold, src.name,  # noqa: E731
                          str(entry / f"part-{i}"))
    else:
        work = _tokenize_chunk
        args = lambda i: (chunks[i], src.fmt, src.field, src.name, threshold, str(entry / f"part-{i}"))  # noqa: E731
    have = sum(c["train"] for c in done)
    t0, n = time.perf_counter(), 0
    read_bytes = 0
    with report.progress(f"  sample {src.name} ({n_workers} processes)", total=need,
                         completed=min(have, need)) as bar:
        def take(i: int, counts: dict) -> None:
            nonlocal have, n, read_bytes
            for side in ("train", "heldout"):
                _append(entry / f"{side}.bin", entry / f"part-{i}.{side}", sizes[side])
                sizes[side] += counts[side] * dtype.itemsize
            done.append({"chunk": i, **counts})
            _write_state(entry, done, meta)
            have += counts["train"]
            n += 1
            read_bytes += chunks[i].nbytes
            bar.update(min(have, need), note=f"tokens, {read_bytes / 1e6:,.0f} MB read")

        if n_workers == 1:
            _init_worker(tok_json, sep, dtype.name)
            for i in todo:
                take(i, work(*args(i)))
                if _prefix(done, need) is not None:
                    break
        else:
            ctx = multiprocessing.get_context("spawn")
            with cf.ProcessPoolExecutor(n_workers, mp_context=ctx, initializer=_init_worker,
                                        initargs=(tok_json, sep, dtype.name)) as pool:
                queue = deque(todo)
                running: deque = deque()

                def expected(i: int) -> float:
                    """Tokens a chunk should give: its bytes at the rate measured so far (first guess: one
                    token per 4 bytes, byte-level BPE on prose and code; token files: their size)."""
                    seen = sum(chunks[c["chunk"]].nbytes for c in done)
                    rate = sum(c["train"] for c in done) / seen if seen else 0.25
                    return chunks[i].nbytes * (1.0 / dtype.itemsize if src.fmt == "tokens" else rate)

                def fill() -> None:
                    # At most two chunks per worker in flight (memory stays bounded), and no more than the
                    # need calls for: a small plan on a huge corpus tokenizes only what it uses.
                    while queue and len(running) < 2 * n_workers and (
                            not running or have + sum(expected(j) for j, _ in running) < need):
                        i = queue.popleft()
                        running.append((i, pool.submit(work, *args(i))))

                fill()
                while running:
                    i, fut = running.popleft()
                    take(i, fut.result())  # in order; an InputError of the chunk is raised here
                    if _prefix(done, need) is not None:
                        for j, f in running:  # chunks already tokenizing are appended (later plans use them)
                            take(j, f.result())
                        break
                    fill()
    el = time.perf_counter() - t0
    report.say(f"  source {src.name}: tokenized {n} more chunk(s), {read_bytes / 1e6:,.1f} MB in {el:.1f} s "
               f"with {n_workers} process(es)")
    return n
