"""Sources already tokenized: ``.npy`` (1-D integer array) and nanoGPT / llm.c ``.bin`` files.

A token file holds documents as a flat stream of token ids, each document preceded
by the end-of-text token (llm.c writes ``[EOT] + encode(doc)`` per document; rbridge
shards use the same layout). It is only meaningful with the tokenizer it was made
with, so a token source names that tokenizer (``tokenizer: DIR``) and the plan must
load the same one (``tokenizer: {path: DIR}``): the two are compared by what they do
(rbridge.data.tokenizer.tokenizer_fingerprint), and the file's dtype, its largest
id (against the vocabulary) and its end-of-text id are checked before any training.

``.bin`` files with llm.c's header (256 int32: magic 20240520, version 1 = uint16
tokens or 2 = uint32, token count) are read as the header says; a ``.bin`` without
it (nanoGPT's ``prepare.py`` writes raw uint16) needs ``dtype:`` in the spec.

A token source is read like a sampled text source (rbridge.data.sample): in chunks
of about ``CHUNK_TOKENS`` tokens, each owning the documents whose end-of-text token
falls in its range, in a seeded order across the file(s).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rbridge.data.formats import Chunk
from rbridge.errors import InputError

LLMC_MAGIC = 20240520
LLMC_HEADER_INTS = 256
LLMC_DTYPES = {1: np.dtype(np.uint16), 2: np.dtype(np.uint32)}
DTYPES = ("uint16", "uint32", "int32", "int64")
CHUNK_TOKENS = 16 << 20
_SALT = b"rbridge-heldout-tokens-v1\0"


@dataclass(frozen=True)
class TokenFile:
    path: Path
    offset: int        # bytes before the first token
    dtype: np.dtype
    n_tokens: int

    def array(self) -> np.ndarray:
        if self.n_tokens == 0:
            return np.zeros(0, dtype=self.dtype)
        return np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.offset, shape=(self.n_tokens,))


def token_file(path: Path, dtype: str | None, name: str) -> TokenFile:
    """How a token file stores its ids; InputError naming the file when it cannot be read as one."""
    where = {"file": path, "field": f"sources.{name}"}
    size = path.stat().st_size
    if path.suffix.lower() == ".npy":
        try:
            with open(path, "rb") as fh:
                version = np.lib.format.read_magic(fh)
                read = {(1, 0): np.lib.format.read_array_header_1_0,
                        (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                if read is None:
                    raise ValueError(f".npy format version {version}")
                shape, _fortran, dt = read(fh)
                offset = fh.tell()
        except (ValueError, OSError) as exc:
            raise InputError(f"not a readable .npy file: {exc}", **where) from None
        if len(shape) != 1 or dt.kind not in "iu" or dt.byteorder == ">":
            raise InputError(f".npy token file must be a 1-D little-endian integer array, not {dt} {shape}",
                             **where)
        if offset + shape[0] * dt.itemsize != size:
            raise InputError(f".npy file is truncated ({size} bytes, {offset + shape[0] * dt.itemsize} expected)",
                             **where)
        return TokenFile(path, offset, np.dtype(dt), int(shape[0]))
    header = np.fromfile(path, dtype=np.int32, count=LLMC_HEADER_INTS) if size >= 4 * LLMC_HEADER_INTS else None
    if header is not None and int(header[0]) == LLMC_MAGIC:
        version, n = int(header[1]), int(header[2])
        if version not in LLMC_DTYPES:
            raise InputError(f"llm.c token file version {version} is not 1 (uint16) or 2 (uint32)", **where)
        dt = LLMC_DTYPES[version]
        offset = 4 * LLMC_HEADER_INTS
        if offset + n * dt.itemsize != size:
            raise InputError(f"llm.c token file is truncated: its header says {n} tokens, the file holds "
                             f"{(size - offset) // dt.itemsize}", **where)
        if dtype is not None and np.dtype(dtype) != dt:
            raise InputError(f"dtype {dtype} disagrees with the file's llm.c header ({dt})",
                             file=path, field=f"sources.{name}.dtype")
        return TokenFile(path, offset, dt, n)
    if dtype is None:
        raise InputError("a .bin token file without llm.c's header needs dtype: (nanoGPT writes uint16)",
                         file=path, field=f"sources.{name}.dtype")
    dt = np.dtype(dtype)
    if size % dt.itemsize:
        raise InputError(f"{size} bytes is not a whole number of {dtype} tokens", **where)
    return TokenFile(path, 0, dt, size // dt.itemsize)


def token_chunks(files: list[TokenFile]) -> list[Chunk]:
    """Nominal [start, stop) token ranges of every file, in file order."""
    out = []
    for tf in files:
        for start in range(0, max(tf.n_tokens, 1), CHUNK_TOKENS):
            stop = min(tf.n_tokens, start + CHUNK_TOKENS)
            out.append(Chunk(tf.path, (start, stop), (stop - start) * tf.dtype.itemsize, None))
    return out


def _doc_hash(ids: np.ndarray) -> int:
    return int.from_bytes(hashlib.sha1(_SALT + ids.astype("<u4", copy=False).tobytes()).digest(), "big")


def split_chunk(tf: TokenFile, chunk: Chunk, eos: int, vocab: int, threshold: int, name: str
                ) -> tuple[np.ndarray, np.ndarray, int, int]:
    """The chunk's documents (those whose leading end-of-text id lies in its range; the first chunk
    also owns tokens before the file's first one), each as [EOS] + ids, split into (train, held-out,
    n_train_docs, n_heldout_docs). Ids outside the vocabulary are refused, naming the position."""
    arr = tf.array()
    start, stop = chunk.part
    n = tf.n_tokens
    # The first end-of-text at or after each boundary: documents belong to the range their EOS starts in.
    def next_eos(pos: int) -> int:
        while pos < n:
            window = np.asarray(arr[pos:pos + (1 << 20)])
            hit = np.flatnonzero(window == eos)
            if hit.size:
                return pos + int(hit[0])
            pos += window.size
        return n
    lo = 0 if start == 0 else next_eos(start)
    hi = next_eos(stop) if stop < n else n
    seg = np.asarray(arr[lo:hi]).astype(np.int64)
    if seg.size:
        bad = np.flatnonzero((seg < 0) | (seg >= vocab))
        if bad.size:
            raise InputError(f"source {name!r}: token id {int(seg[bad[0]])} at position {lo + int(bad[0])} is "
                             f"outside the plan tokenizer's vocabulary of {vocab}: made with another tokenizer?",
                             file=tf.path, field=f"sources.{name}.tokenizer")
    cuts = np.flatnonzero(seg == eos)
    bounds = list(cuts) + [seg.size]
    if not cuts.size or cuts[0] != 0:
        bounds = [0] + bounds
    parts = {False: [], True: []}
    docs = {False: 0, True: 0}
    for a, b in zip(bounds[:-1], bounds[1:]):
        body = seg[a + 1:b] if seg[a] == eos else seg[a:b]
        if body.size == 0:
            continue
        held = _doc_hash(body) >= threshold
        parts[held] += [np.array([eos]), body]
        docs[held] += 1
    join = lambda xs: np.concatenate(xs) if xs else np.zeros(0, dtype=np.int64)  # noqa: E731
    return join(parts[False]), join(parts[True]), docs[False], docs[True]


def check_dtype(tf: TokenFile, vocab: int, name: str) -> None:
    limit = np.iinfo(tf.dtype).max
    if vocab - 1 > limit:
        raise InputError(f"{tf.dtype} ids cannot hold the plan tokenizer's vocabulary of {vocab}: "
                         "made with another tokenizer?", file=tf.path, field=f"sources.{name}.dtype")
