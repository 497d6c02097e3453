"""Named raw-text sources: reading documents, content fingerprints, the held-out split.

Three kinds of source (INTERFACE.md, ``sources:``):

* plain text, ``path: x.txt`` or ``x.txt.gz``: documents are separated by one
  or more blank lines (a line holding only whitespace counts as blank);
* JSONL, ``path: x.jsonl`` or ``x.jsonl.gz``: one document per line, the text
  in ``field`` (default ``"text"``);
* a glob, ``glob: "code/**/*.py"``: one document per matching file (sorted by
  path, ``**`` recursive, ``.gz`` files decompressed).

Every source has a deterministic held-out slice: a document is held out when
the sha1 of its text falls in the last ``heldout_fraction`` of hash space (and
when none does, the one document with the largest hash is). Held-out documents
are never used to train a tokenizer or a proxy; they measure held-out loss.
Because the rule depends only on a document's text, duplicate documents always
land on the same side of the split.
"""

from __future__ import annotations

import glob as _glob
import gzip
import hashlib
import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator

from rbridge.errors import InputError

DEFAULT_HELDOUT_FRACTION = 0.05

_HASH_SPACE = 1 << 160  # sha1 digests are 160-bit integers


@dataclass(frozen=True)
class SourceConfig:
    """One named source: exactly one of ``path`` or ``glob``.

    ``field`` is the JSONL key holding the text (JSONL only; default "text").
    Relative ``path`` and ``glob`` are taken relative to ``base_dir``
    (the spec file's directory; default: the working directory).
    """

    name: str
    path: Path | None = None
    field: str | None = None
    glob: str | None = None
    base_dir: Path | None = None

    @property
    def kind(self) -> str:
        """"text", "jsonl" or "glob"."""
        if self.glob is not None:
            return "glob"
        suffixes = [s.lower() for s in Path(self.path).suffixes] if self.path else []
        if suffixes and suffixes[-1] == ".gz":
            suffixes = suffixes[:-1]
        return "jsonl" if suffixes and suffixes[-1] == ".jsonl" else "text"

    def resolved_path(self) -> Path:
        p = Path(self.path).expanduser()
        if not p.is_absolute() and self.base_dir is not None:
            p = Path(self.base_dir) / p
        return p

    def files(self) -> list[Path]:
        """The files this source reads, in reading order. Raises InputError when there are none."""
        self._check()
        if self.glob is None:
            p = self.resolved_path()
            if not p.is_file():
                raise InputError(f"source {self.name!r}: file not found",
                                 file=p, field=f"sources.{self.name}.path")
            return [p]
        base = Path(self.base_dir) if self.base_dir is not None else Path.cwd()
        pattern = os.path.join(str(base), os.path.expanduser(self.glob))
        found = [Path(f) for f in _glob.glob(pattern, recursive=True)]
        found = sorted((f for f in found if f.is_file()), key=lambda f: f.as_posix())
        if not found:
            raise InputError(f"source {self.name!r}: glob {self.glob!r} matches no files under {base}",
                             field=f"sources.{self.name}.glob")
        return found

    def _check(self) -> None:
        where = f"sources.{self.name}"
        if (self.path is None) == (self.glob is None):
            raise InputError("a source needs exactly one of 'path' or 'glob'", field=where)
        if self.field is not None and self.kind != "jsonl":
            raise InputError("'field' applies only to JSONL sources (.jsonl or .jsonl.gz)",
                             field=f"{where}.field")


def _open_text(path: Path) -> IO[str]:
    # Undecodable bytes become U+FFFD rather than aborting a long corpus read.
    if path.suffix.lower() == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def _read_guarded(src: SourceConfig, path: Path) -> Iterator[str]:
    """Lines of ``path``, with I/O and gzip errors turned into InputError."""
    try:
        with _open_text(path) as fh:
            yield from fh
    except (OSError, EOFError, gzip.BadGzipFile) as exc:  # BadGzipFile is an OSError; explicit for clarity
        raise InputError(f"source {src.name!r}: cannot read: {exc}", file=path) from exc


def _iter_text(src: SourceConfig, path: Path) -> Iterator[str]:
    buf: list[str] = []
    for line in _read_guarded(src, path):
        if line.strip():
            buf.append(line)
        elif buf:
            yield "".join(buf).rstrip("\n")
            buf = []
    if buf:
        yield "".join(buf).rstrip("\n")


def _iter_jsonl(src: SourceConfig, path: Path) -> Iterator[str]:
    field = src.field or "text"
    for lineno, line in enumerate(_read_guarded(src, path), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise InputError(f"bad JSON: {exc}", file=path, line=lineno) from None
        if not isinstance(obj, dict) or field not in obj:
            raise InputError(f"missing field {field!r}", file=path, line=lineno,
                             field=f"sources.{src.name}.field")
        text = obj[field]
        if not isinstance(text, str):
            raise InputError(f"field {field!r} is {type(text).__name__}, not a string",
                             file=path, line=lineno)
        if text:
            yield text


def _iter_glob(src: SourceConfig, files: list[Path]) -> Iterator[str]:
    for path in files:
        text = "".join(_read_guarded(src, path))
        if text.strip():
            yield text


def iter_documents(src: SourceConfig) -> Iterator[str]:
    """Every document of ``src`` in a fixed order (empty documents are skipped).

    Raises InputError for a missing file, a glob matching nothing, a bad JSONL
    line or missing field (naming file and line), and a source without documents.
    """
    files = src.files()
    if src.kind == "glob":
        docs = _iter_glob(src, files)
    elif src.kind == "jsonl":
        docs = _iter_jsonl(src, files[0])
    else:
        docs = _iter_text(src, files[0])
    empty = True
    for doc in docs:
        empty = False
        yield doc
    if empty:
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


def source_fingerprint(src: SourceConfig) -> str:
    """sha256 over how the source is read and the bytes of its files.

    The source's name and location are not part of it: renaming a source or
    moving its files keeps its caches; changing one byte invalidates them.
    For a glob, the files' paths relative to the base directory are included
    (they fix the document order).
    """
    files = src.files()
    h = hashlib.sha256()
    field = (src.field or "text") if src.kind == "jsonl" else None
    h.update(json.dumps({"kind": src.kind, "field": field}, sort_keys=True).encode())
    base = Path(src.base_dir) if src.base_dir is not None else Path.cwd()
    for f in files:
        rel = os.path.relpath(f, base) if src.kind == "glob" else ""
        h.update(f"\0{Path(rel).as_posix()}\0{_file_digest(f)}".encode())
    return h.hexdigest()


# -- held-out split ---------------------------------------------------------

# Salted, so the split is independent of any hash-based selection upstream (a corpus
# built by taking documents in sha1 order would otherwise have no held-out slice).
_SPLIT_SALT = b"rbridge-heldout-v2\0"


def _doc_hash(doc: str) -> int:
    return int.from_bytes(hashlib.sha1(_SPLIT_SALT + doc.encode("utf-8", "surrogatepass")).digest(), "big")


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
    _check_fraction(heldout_fraction)
    memo = (source_fingerprint(src), heldout_fraction)
    if memo in _splits:
        return _splits[memo]
    threshold = _HASH_SPACE - int(heldout_fraction * _HASH_SPACE)
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
