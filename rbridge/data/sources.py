"""Named raw-text sources: reading documents, content fingerprints, the held-out split.

A source is one file (``path:``), a Hugging Face ``datasets`` folder (``path:`` of a
``save_to_disk`` directory), or a glob of files (``glob:``). Its format comes from
``format:`` or the file names (rbridge.data.formats): plain text (documents separated
by blank lines), JSON lines (the text in ``field``, default ``"text"``), Parquet and
Arrow (the ``field`` column), each optionally gzip- or zstd-compressed where that
applies. A glob of Parquet, JSON-lines or Arrow shards reads each shard in that
format; a glob of anything else reads one document per file (sorted by path, ``**``
recursive).

Every source has a deterministic held-out slice: a document is held out when
the sha1 of its text falls in the last ``heldout_fraction`` of hash space (and
when none does, the one document with the largest hash is). Held-out documents
are never used to train a tokenizer or a proxy; they measure held-out loss.
Because the rule depends only on a document's text, duplicate documents always
land on the same side of the split.
"""

from __future__ import annotations

import functools
import glob as _glob
import gzip
import hashlib
import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from rbridge.data.formats import FORMATS, arrow_files, detect_format, list_chunks, read_chunk
from rbridge.errors import InputError

DEFAULT_HELDOUT_FRACTION = 0.05

_HASH_SPACE = 1 << 160  # sha1 digests are 160-bit integers


@dataclass(frozen=True)
class SourceConfig:
    """One named source: exactly one of ``path`` or ``glob``.

    ``field`` is the key or column holding the text (JSON lines, Parquet, Arrow;
    default "text"); ``format`` overrides the format the file names imply.
    Relative ``path`` and ``glob`` are taken relative to ``base_dir``
    (the spec file's directory; default: the working directory).
    """

    name: str
    path: Path | None = None
    field: str | None = None
    glob: str | None = None
    base_dir: Path | None = None
    format: str | None = None
    # Read as a sample (rbridge.data.sample), not in full: its fingerprint then covers each file's size,
    # head and tail instead of every byte, and the tokenizer trains on its seeded sample order.
    sampled: bool = False
    tokenizer: Path | None = None  # token files: the tokenizer they were made with (rbridge.data.tokens)
    dtype: str | None = None       # token files without a header: their id type

    @property
    def kind(self) -> str:
        """"text", "jsonl" or "glob" for the formats of earlier versions (their cache keys keep these
        names), else the format: "parquet", "arrow"."""
        fmt = self.fmt
        if fmt == "files":
            return "glob"
        if self.glob is not None and fmt in ("text", "jsonl"):
            return f"glob-{fmt}"
        return fmt

    @functools.cached_property  # a glob's format means scanning its folder: once per config
    def fmt(self) -> str:
        """The format documents are read in (rbridge.data.formats.FORMATS)."""
        if self.format is not None:
            return self.format
        if self.glob is not None:
            found = {detect_format(f) for f in self._matches()}
            return found.pop() if len(found) == 1 and found <= {"jsonl", "parquet", "arrow", "tokens"} else "files"
        p = self.resolved_path()
        if p.is_dir():
            return "arrow"
        return detect_format(p)

    def resolved_path(self) -> Path:
        p = Path(self.path).expanduser()
        if not p.is_absolute() and self.base_dir is not None:
            p = Path(self.base_dir) / p
        return p

    def _matches(self) -> list[Path]:
        base = Path(self.base_dir) if self.base_dir is not None else Path.cwd()
        pattern = os.path.join(str(base), os.path.expanduser(self.glob))
        found = [Path(f) for f in _glob.glob(pattern, recursive=True)]
        return sorted((f for f in found if f.is_file()), key=lambda f: f.as_posix())

    def files(self) -> list[Path]:
        """The files this source reads, in reading order. Raises InputError when there are none."""
        self._check()
        if self.glob is None:
            p = self.resolved_path()
            if p.is_dir():
                return arrow_files(p, self.name)
            if not p.is_file():
                raise InputError(f"source {self.name!r}: file not found",
                                 file=p, field=f"sources.{self.name}.path")
            return [p]
        found = self._matches()
        if not found:
            base = Path(self.base_dir) if self.base_dir is not None else Path.cwd()
            raise InputError(f"source {self.name!r}: glob {self.glob!r} matches no files under {base}",
                             field=f"sources.{self.name}.glob")
        if self.fmt in ("parquet", "arrow", "jsonl", "tokens"):
            odd = [f for f in found if detect_format(f) != self.fmt]
            if odd:
                raise InputError(f"source {self.name!r}: a glob of {self.fmt} shards matches a file of "
                                 f"another format", file=odd[0], field=f"sources.{self.name}.glob")
        return found

    def _check(self) -> None:
        where = f"sources.{self.name}"
        if (self.path is None) == (self.glob is None):
            raise InputError("a source needs exactly one of 'path' or 'glob'", field=where)
        if self.format is not None and self.format not in FORMATS:
            raise InputError(f"unknown format {self.format!r} (formats: {', '.join(FORMATS)})",
                             field=f"{where}.format")
        if self.field is not None and self.fmt not in ("jsonl", "parquet", "arrow"):
            raise InputError("'field' applies only to JSON-lines, Parquet and Arrow sources",
                             field=f"{where}.field")
        if self.fmt != "tokens" and (self.tokenizer is not None or self.dtype is not None):
            raise InputError("'tokenizer' and 'dtype' apply only to token files (.npy, .bin)",
                             field=f"{where}.{'tokenizer' if self.tokenizer is not None else 'dtype'}")

    def token_files(self):
        """A token source's files as rbridge.data.tokens.TokenFile (header and dtype checked)."""
        from rbridge.data.tokens import token_file

        return [token_file(f, self.dtype, self.name) for f in self.files()]

    def chunks(self):
        """The source's chunks in natural order (rbridge.data.formats.Chunk)."""
        if self.fmt == "tokens":
            from rbridge.data.tokens import token_chunks

            return token_chunks(self.token_files())
        return list_chunks(self.files(), self.fmt, self.name)


@dataclass(frozen=True)
class SourceSummary:
    name: str
    format: str
    files: int
    chunks: int
    bytes: int


def check_source(src: SourceConfig, full_bytes: int = 64 << 20) -> SourceSummary:
    """Open a source far enough to catch a wrong or damaged file (``rbridge validate``): the metadata
    of every file (Parquet footers, Arrow batches), every document of its first chunks up to
    ``full_bytes``, and the first document of every other file. Raises InputError."""
    chunks = src.chunks()
    if src.fmt == "tokens":  # headers and dtypes (chunks() read them); ids are checked against the plan
        return SourceSummary(src.name, src.fmt, len(src.files()), len(chunks), sum(c.nbytes for c in chunks))
    seen: set[Path] = set()
    budget = full_bytes
    for chunk in chunks:
        if budget > 0:
            budget -= chunk.nbytes
            for _doc in read_chunk(chunk, src.fmt, src.field, src.name):
                pass
        elif chunk.file not in seen:
            for _doc in read_chunk(chunk, src.fmt, src.field, src.name):
                break
        seen.add(chunk.file)
    return SourceSummary(src.name, src.fmt, len(seen), len(chunks), sum(c.nbytes for c in chunks))


def iter_documents(src: SourceConfig) -> Iterator[str]:
    """Every document of ``src`` in a fixed order (empty documents are skipped).

    Raises InputError for a missing file, a glob matching nothing, a damaged file,
    a bad JSON line or missing field or column (naming file and line or row), and a
    source without documents.
    """
    chunks = src.chunks()
    fmt = src.fmt
    empty = True
    for chunk in chunks:
        for doc, _where in read_chunk(chunk, fmt, src.field, src.name):
            empty = False
            yield doc
    if empty:
        files = src.files()
        raise InputError(f"source {src.name!r} holds no documents",
                         file=files[0] if src.glob is None else None,
                         field=f"sources.{src.name}")


def write_documents(path: str | Path, docs: list[str]) -> tuple[int, int]:
    """Write documents as a source ``iter_documents`` reads back, gzip-compressed and byte-reproducible.

    ``*.jsonl.gz``: one ``{"text": ...}`` object per line. Anything else: plain text,
    documents separated by one blank line; a blank (or whitespace-only) line inside a
    document would split it, so such runs become one newline. The gzip header carries no
    name and no time, so the same documents always give the same bytes
    (scripts/make_corpora.py rebuilds specs/data/ this way). Returns (UTF-8 bytes of the
    documents, bytes written).
    """
    path = Path(path)
    if path.name.endswith(".jsonl.gz"):
        payload = "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs)
    else:
        payload = "\n\n".join(_BLANK_RUN.sub("\n", d) for d in docs) + "\n"
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as g:
        g.write(payload.encode("utf-8"))
    path.write_bytes(buf.getvalue())
    return sum(len(d.encode("utf-8")) for d in docs), len(buf.getvalue())


_BLANK_RUN = re.compile(r"\n\s*\n")


# -- fingerprints -----------------------------------------------------------

_file_digests: dict[tuple[str, int, int], str] = {}


def _file_digest(path: Path) -> str:
    st = path.stat()
    memo = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if memo not in _file_digests:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        _file_digests[memo] = h.hexdigest()
    return _file_digests[memo]


_EDGE = 1 << 20


def _file_digest_fast(path: Path) -> str:
    """sha256 of a file's size, first and last MiB (a Parquet footer, a zstd tail): for sampled sources,
    whose bytes are far too many to hash on every plan."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as fh:
        h.update(fh.read(_EDGE))
        if size > _EDGE:
            fh.seek(max(_EDGE, size - _EDGE))
            h.update(fh.read(_EDGE))
    return h.hexdigest()


def source_fingerprint(src: SourceConfig) -> str:
    """sha256 over how the source is read and the bytes of its files.

    The source's name and location are not part of it: renaming a source or
    moving its files keeps its caches; changing one byte invalidates them.
    For a glob, the files' paths relative to the base directory are included
    (they fix the document order). A sampled source hashes each file's size,
    first and last MiB instead of every byte.
    """
    files = src.files()
    h = hashlib.sha256()
    kind = src.kind
    field = (src.field or "text") if src.fmt in ("jsonl", "parquet", "arrow") else None
    extra = {"sampled": True} if src.sampled else {}
    if src.fmt == "tokens":
        extra["dtype"] = src.dtype
    h.update(json.dumps({"kind": kind, "field": field, **extra}, sort_keys=True).encode())
    base = Path(src.base_dir) if src.base_dir is not None else Path.cwd()
    for f in files:
        rel = os.path.relpath(f, base) if src.glob is not None or src.fmt == "arrow" else ""
        digest = _file_digest_fast(f) if src.sampled else _file_digest(f)
        h.update(f"\0{Path(rel).as_posix()}\0{digest}".encode())
    return h.hexdigest()


# -- held-out split ---------------------------------------------------------

# Salted, so the split is independent of any hash-based selection upstream (a corpus
# built by taking documents in sha1 order would otherwise have no held-out slice).
_SPLIT_SALT = b"rbridge-heldout-v2\0"


def _doc_hash(doc: str) -> int:
    return int.from_bytes(hashlib.sha1(_SPLIT_SALT + doc.encode("utf-8", "surrogatepass")).digest(), "big")


def heldout_threshold(heldout_fraction: float) -> int:
    """Documents whose salted hash is at least this are held out (the last ``heldout_fraction`` of
    hash space): the one rule of whole, sampled and tokenized sources."""
    _check_fraction(heldout_fraction)
    return _HASH_SPACE - int(heldout_fraction * _HASH_SPACE)


def _check_fraction(heldout_fraction: float) -> None:
    if not 0.0 < heldout_fraction < 1.0:
        raise InputError(f"held-out fraction must be in (0, 1), got {heldout_fraction}",
                         field="heldout_fraction")


@dataclass(frozen=True)
class _Split:
    threshold: int        # hash >= threshold -> held out
    fallback: int | None  # when no document passes the threshold: the largest hash
    n_docs: int
    n_heldout: int

    def is_heldout(self, doc: str) -> bool:
        h = _doc_hash(doc)
        return h >= self.threshold or h == self.fallback


_splits: dict[tuple[str, float], _Split] = {}


def _split_for(src: SourceConfig, heldout_fraction: float) -> _Split:
    threshold = heldout_threshold(heldout_fraction)
    memo = (source_fingerprint(src), heldout_fraction)
    if memo in _splits:
        return _splits[memo]
    n = n_held = 0
    largest = -1
    for doc in iter_documents(src):
        h = _doc_hash(doc)
        n += 1
        n_held += h >= threshold
        largest = max(largest, h)
    fallback = None
    if n_held == 0:
        fallback = largest
        n_held = 1
    split = _Split(threshold, fallback, n, n_held)
    if n_held >= n:
        raise InputError(f"source {src.name!r} has {n} document(s); all would be held out "
                         "(need at least one training document besides the held-out slice)",
                         field=f"sources.{src.name}")
    _splits[memo] = split
    return split


def iter_split(src: SourceConfig, split: str = "train", *,
               heldout_fraction: float = DEFAULT_HELDOUT_FRACTION) -> Iterator[str]:
    """The documents of one side of the held-out split: ``split`` is "train" or "heldout"."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', not {split!r}")
    want_heldout = split == "heldout"
    for doc, held in iter_labelled(src, heldout_fraction=heldout_fraction):
        if held == want_heldout:
            yield doc


def iter_labelled(src: SourceConfig, *,
                  heldout_fraction: float = DEFAULT_HELDOUT_FRACTION) -> Iterator[tuple[str, bool]]:
    """Every document with whether it is held out, in document order."""
    sp = _split_for(src, heldout_fraction)
    for doc in iter_documents(src):
        yield doc, sp.is_heldout(doc)


# -- sample order (large sources: rbridge.data.sample) -----------------------


def chunk_order(fingerprint: str, n: int):
    """The seeded order a sampled source's chunks are read in: a permutation of range(n) fixed by the
    source's content, so every plan reading the same corpus reads it in the same order."""
    import numpy as np

    seed = int.from_bytes(hashlib.sha256(f"rbridge-sample\0{fingerprint}".encode()).digest()[:8], "big")
    return np.random.default_rng(seed).permutation(n)


def iter_sample_documents(src: SourceConfig, heldout_fraction: float, max_chars: int) -> Iterator[str]:
    """Training documents of a sampled source in its sample order, up to ``max_chars`` characters
    (the tokenizer's bounded seeded sample): held-out documents are skipped."""
    threshold = heldout_threshold(heldout_fraction)
    chunks = src.chunks()
    left = max_chars
    for i in chunk_order(source_fingerprint(src), len(chunks)):
        for doc, _where in read_chunk(chunks[i], src.fmt, src.field, src.name):
            if _doc_hash(doc) >= threshold:
                continue
            yield doc[:left]
            left -= min(len(doc), left)
            if left <= 0:
                return
