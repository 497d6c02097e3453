"""Reading documents from the formats corpora ship in, one chunk at a time.

A source's files are cut into chunks, the unit of reading, sampling and parallel
tokenization: a Parquet row group, a run of record batches of a Hugging Face
``datasets`` Arrow file, a byte range of a large uncompressed JSON-lines file, or
a whole file (plain text, compressed files, small files, one file of a glob).
``list_chunks`` reads metadata only (Parquet footers, Arrow batch headers, file
sizes); ``read_chunk`` yields the chunk's documents with where each came from, so
an error names the file and the row (or byte offset).

Formats, by ``format:`` or by extension:

========== ======================================================= =========================
format     files                                                   document
========== ======================================================= =========================
text       ``.txt`` (``.gz``, ``.zst``), anything else              blank-line separated
jsonl      ``.jsonl`` / ``.json`` (``.gz``, ``.zst``)               ``field`` of each line
parquet    ``.parquet``                                             ``field`` of each row
arrow      a ``datasets`` ``save_to_disk`` folder, or ``.arrow``    ``field`` of each row
files      ``glob:`` of any files                                   one whole file each
========== ======================================================= =========================

``field`` defaults to ``text``. Reading a whole source in natural order gives
exactly the documents earlier rbridge versions read from text, JSONL and glob
sources, so their caches and run fingerprints stay valid.
"""

from __future__ import annotations

import gzip
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator

from rbridge.errors import InputError

FORMATS = ("text", "jsonl", "parquet", "arrow", "files", "tokens")
# An uncompressed JSON-lines file larger than this is read in byte ranges of this size.
RANGE_BYTES = 64 << 20
# Consecutive Arrow record batches are grouped into chunks of about this many bytes.
ARROW_CHUNK_BYTES = 64 << 20
# A Parquet row group larger than this is read as several row ranges of about this size:
# a finer sample and more chunks to tokenize in parallel, for a cheap re-decode of the group.
PARQUET_CHUNK_BYTES = 16 << 20


@dataclass(frozen=True)
class Chunk:
    """One unit of reading: ``part`` is a row group (parquet; or (group, first row, end row) of a large
    one), a [start, stop) batch range (arrow), a [start, stop) byte or token range (large jsonl, token
    files), or None (the whole file)."""

    file: Path
    part: tuple[int, int] | int | None
    nbytes: int  # on disk (compressed where the file is): for sampling budgets and progress
    n_rows: int | None = None  # rows of a parquet row group or arrow batch range

    @property
    def where(self) -> str:
        if isinstance(self.part, int):
            return f"{self.file} row group {self.part}"
        if self.part is not None and len(self.part) == 3:
            return f"{self.file} row group {self.part[0]} rows {self.part[1]}:{self.part[2]}"
        if self.part is not None:
            return f"{self.file} [{self.part[0]}:{self.part[1]}]"
        return str(self.file)


def compression(path: Path) -> str | None:
    suffix = path.suffix.lower()
    return {".gz": "gz", ".zst": "zst", ".zstd": "zst"}.get(suffix)


def detect_format(path: Path) -> str:
    """The format a file's name implies (``text`` when nothing else matches)."""
    name = path.name.lower()
    for ext in (".gz", ".zst", ".zstd"):
        if name.endswith(ext):
            name = name[: -len(ext)]
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".arrow"):
        return "arrow"
    if name.endswith((".npy", ".bin")):
        return "tokens"
    return "text"


# ---------------------------------------------------------------------------- raw bytes


def open_binary(path: Path) -> IO[bytes]:
    """The decompressed bytes of a file (gzip and zstd by extension)."""
    kind = compression(path)
    if kind == "gz":
        return gzip.open(path, "rb")
    if kind == "zst":
        import zstandard

        raw = open(path, "rb")
        # read_across_frames: files written by concatenating frames (zstd -c a b) read whole.
        return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=True)
    return open(path, "rb")


def _lines(path: Path, name: str) -> Iterator[str]:
    """Decoded lines of a whole (possibly compressed) file; undecodable bytes become U+FFFD."""
    try:
        with open_binary(path) as raw, io.TextIOWrapper(raw, encoding="utf-8", errors="replace") as fh:
            yield from fh
    except (OSError, EOFError, ValueError) as exc:  # gzip.BadGzipFile is an OSError; zstd raises ZstdError
        raise InputError(f"source {name!r}: cannot read: {exc}", file=path) from None
    except Exception as exc:  # zstandard.ZstdError (not an OSError subclass)
        if type(exc).__name__ == "ZstdError":
            raise InputError(f"source {name!r}: damaged zstd data: {exc}", file=path) from None
        raise


# ---------------------------------------------------------------------------- documents


def _text_docs(path: Path, name: str) -> Iterator[tuple[str, str]]:
    buf: list[str] = []
    for line in _lines(path, name):
        if line.strip():
            buf.append(line)
        elif buf:
            yield "".join(buf).rstrip("\n"), ""
            buf = []
    if buf:
        yield "".join(buf).rstrip("\n"), ""


def _json_doc(line: str, field: str, path: Path, name: str, lineno: int | None = None,
              offset: int | None = None) -> str | None:
    """The text of one JSON line; an error names the line (whole files) or byte offset (ranges)."""
    at = {"file": path, "line": lineno}
    pre = f"line at byte {offset}: " if offset is not None else ""
    try:
        obj = json.loads(line)
    except ValueError as exc:
        raise InputError(f"{pre}bad JSON: {exc}", **at) from None
    if not isinstance(obj, dict) or field not in obj:
        raise InputError(f"{pre}missing field {field!r}", field=f"sources.{name}.field", **at)
    text = obj[field]
    if not isinstance(text, str):
        raise InputError(f"{pre}field {field!r} is {type(text).__name__}, not a string", **at)
    return text or None


def _jsonl_docs(path: Path, field: str, name: str) -> Iterator[tuple[str, str]]:
    for lineno, line in enumerate(_lines(path, name), start=1):
        if line.strip():
            text = _json_doc(line, field, path, name, lineno=lineno)
            if text is not None:
                yield text, f"line {lineno}"


def _jsonl_range_docs(path: Path, start: int, stop: int, field: str, name: str) -> Iterator[tuple[str, str]]:
    """The lines that start in [start, stop) of an uncompressed file (a line straddling ``start``
    belongs to the range before)."""
    try:
        with open(path, "rb") as fh:
            if start > 0:
                fh.seek(start - 1)
                fh.readline()  # the rest of the line that began before start (or just its newline)
            pos = fh.tell()
            while pos < stop:
                raw = fh.readline()
                if not raw:
                    break
                line = raw.decode("utf-8", errors="replace")
                if line.strip():
                    text = _json_doc(line, field, path, name, offset=pos)
                    if text is not None:
                        yield text, f"byte {pos}"
                pos += len(raw)
    except OSError as exc:
        raise InputError(f"source {name!r}: cannot read: {exc}", file=path) from None


def _column_docs(table, field: str, path: Path, name: str, first_row: int, what: str) -> Iterator[tuple[str, str]]:
    import pyarrow as pa

    if field not in table.column_names:
        raise InputError(f"{what} has no column {field!r} (columns: {', '.join(table.column_names)})",
                         file=path, field=f"sources.{name}.field")
    col = table.column(field)
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        raise InputError(f"column {field!r} is {col.type}, not a string", file=path,
                         field=f"sources.{name}.field")
    row = first_row
    for part in col.chunks:  # converted to Python strings a slice at a time: memory stays at the Arrow buffer
        for start in range(0, len(part), 1024):
            for text in part.slice(start, 1024).to_pylist():
                if text:
                    yield text, f"row {row}"
                row += 1


def _parquet_file(path: Path, name: str):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError for a bad footer or magic
        raise InputError(f"source {name!r}: not a readable Parquet file: {exc}", file=path) from None


def _parquet_docs(path: Path, part, field: str, name: str) -> Iterator[tuple[str, str]]:
    group, lo, hi = (part, None, None) if isinstance(part, int) else part
    pf = _parquet_file(path, name)
    md = pf.metadata
    first = sum(md.row_group(i).num_rows for i in range(group))
    if field not in pf.schema_arrow.names:
        raise InputError(f"Parquet file has no column {field!r} (columns: {', '.join(pf.schema_arrow.names)})",
                         file=path, field=f"sources.{name}.field")
    try:
        table = pf.read_row_group(group, columns=[field])
    except Exception as exc:
        raise InputError(f"source {name!r}: damaged Parquet row group {group} (rows {first}..): {exc}",
                         file=path) from None
    if lo is not None:
        table, first = table.slice(lo, hi - lo), first + lo
    yield from _column_docs(table, field, path, name, first, "Parquet file")


def _arrow_reader(path: Path, name: str):
    import pyarrow as pa

    try:
        source = pa.memory_map(str(path), "r")
        try:
            return pa.ipc.open_stream(source)
        except pa.ArrowInvalid:
            return pa.ipc.open_file(source)
    except Exception as exc:
        raise InputError(f"source {name!r}: not a readable Arrow file: {exc}", file=path) from None


def _arrow_batches(path: Path, name: str) -> Iterator:
    import pyarrow as pa

    reader = _arrow_reader(path, name)
    try:
        if isinstance(reader, pa.ipc.RecordBatchFileReader):
            for i in range(reader.num_record_batches):
                yield reader.get_batch(i)
        else:
            yield from reader
    except Exception as exc:
        raise InputError(f"source {name!r}: damaged Arrow file: {exc}", file=path) from None


def _arrow_docs(path: Path, start: int, stop: int, field: str, name: str) -> Iterator[tuple[str, str]]:
    import pyarrow as pa

    row = 0
    for i, batch in enumerate(_arrow_batches(path, name)):
        if i >= stop:
            break
        if i >= start:
            yield from _column_docs(pa.Table.from_batches([batch]), field, path, name, row, "Arrow file")
        row += batch.num_rows


def read_chunk(chunk: Chunk, fmt: str, field: str | None, name: str) -> Iterator[tuple[str, str]]:
    """The chunk's non-empty documents in order, each with where it is in its file."""
    field = field or "text"
    if fmt == "files":
        text = "".join(_lines(chunk.file, name))
        if text.strip():
            yield text, ""
    elif fmt == "text":
        yield from _text_docs(chunk.file, name)
    elif fmt == "jsonl":
        if chunk.part is None:
            yield from _jsonl_docs(chunk.file, field, name)
        else:
            yield from _jsonl_range_docs(chunk.file, *chunk.part, field, name)
    elif fmt == "parquet":
        yield from _parquet_docs(chunk.file, chunk.part, field, name)
    elif fmt == "arrow":
        yield from _arrow_docs(chunk.file, *chunk.part, field, name)
    elif fmt == "tokens":
        raise InputError(f"source {name!r} holds token ids, not text", file=chunk.file,
                         field=f"sources.{name}.format")
    else:  # pragma: no cover - the spec refuses other formats
        raise InputError(f"unknown format {fmt!r} (formats: {', '.join(FORMATS)})", field=f"sources.{name}.format")


# ---------------------------------------------------------------------------- chunks


def arrow_files(folder: Path, name: str) -> list[Path]:
    """The Arrow files of a ``datasets`` ``save_to_disk`` folder, in its own order (``state.json``)."""
    state = folder / "state.json"
    if state.is_file():
        try:
            files = [folder / f["filename"] for f in json.loads(state.read_text())["_data_files"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise InputError(f"source {name!r}: unreadable datasets state.json: {exc}", file=state) from None
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise InputError(f"source {name!r}: state.json lists a missing file", file=missing[0])
        return files
    files = sorted(folder.glob("*.arrow"))
    if not files:
        raise InputError(f"source {name!r}: a folder source must be a Hugging Face datasets folder "
                         "(save_to_disk: state.json and .arrow files)", file=folder)
    return files


def list_chunks(files: list[Path], fmt: str, name: str) -> list[Chunk]:
    """Every chunk of a source's files in natural order (file order, then position in the file)."""
    out: list[Chunk] = []
    for path in files:
        size = path.stat().st_size
        if fmt == "parquet":
            md = _parquet_file(path, name).metadata
            for g in range(md.num_row_groups):
                rg = md.row_group(g)
                pieces = -(-rg.total_byte_size // PARQUET_CHUNK_BYTES)
                if pieces <= 1 or rg.num_rows < 2:
                    out.append(Chunk(path, g, rg.total_byte_size, rg.num_rows))
                    continue
                step = -(-rg.num_rows // pieces)
                for lo in range(0, rg.num_rows, step):
                    hi = min(rg.num_rows, lo + step)
                    out.append(Chunk(path, (g, lo, hi), rg.total_byte_size * (hi - lo) // rg.num_rows, hi - lo))
        elif fmt == "arrow":
            start, nbytes, rows = 0, 0, 0
            n = 0
            for i, batch in enumerate(_arrow_batches(path, name)):
                nbytes += batch.nbytes
                rows += batch.num_rows
                n = i + 1
                if nbytes >= ARROW_CHUNK_BYTES:
                    out.append(Chunk(path, (start, n), nbytes, rows))
                    start, nbytes, rows = n, 0, 0
            if n > start or n == 0:
                out.append(Chunk(path, (start, max(n, start)), nbytes, rows))
        elif fmt == "jsonl" and compression(path) is None and size > RANGE_BYTES:
            for start in range(0, size, RANGE_BYTES):
                out.append(Chunk(path, (start, min(size, start + RANGE_BYTES)), min(RANGE_BYTES, size - start)))
        else:
            out.append(Chunk(path, None, size))
    return out


def check_readable(chunk: Chunk, fmt: str, field: str | None, name: str) -> None:
    """Open a chunk far enough to catch a wrong format (``rbridge validate``): its first document."""
    for _doc in read_chunk(chunk, fmt, field, name):
        break
