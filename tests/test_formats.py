"""Corpora in the formats they ship in (issue 13): each format gives the same documents, and so the same
token stream, as the same documents in plain JSON lines; a damaged or wrong file is refused naming the file
and the row (or byte offset).

tests/fixtures/hf_sotu is a real `datasets` save_to_disk folder (scripts/make_hf_fixture.py) of
specs/data/sotu.jsonl.gz's documents (public domain; specs/data/SOURCES.md).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from rbridge.data import SourceConfig, iter_documents, tokenize_source, train_tokenizer
from rbridge.data.formats import list_chunks
from rbridge.errors import InputError

REPO = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).parent / "fixtures" / "hf_sotu"
sys.path.insert(0, str(REPO / "scripts"))
from make_hf_fixture import fixture_docs  # noqa: E402

DOCS = fixture_docs()


def _jsonl(docs, key="text") -> bytes:
    return "".join(json.dumps({key: d, "n": i}) + "\n" for i, d in enumerate(docs)).encode()


def _write_all(d: Path) -> dict[str, SourceConfig]:
    """The same documents in every format; returns a source per format."""
    (d / "ref.jsonl").write_bytes(_jsonl(DOCS))
    cctx = zstandard.ZstdCompressor(level=3)
    (d / "docs.jsonl.zst").write_bytes(cctx.compress(_jsonl(DOCS)))
    # Dolma-style: .json.zst, written as several concatenated zstd frames, the text under another key
    half = len(DOCS) // 2
    (d / "docs.json.zst").write_bytes(cctx.compress(_jsonl(DOCS[:half], "body"))
                                      + cctx.compress(_jsonl(DOCS[half:], "body")))
    table = pa.table({"id": list(range(len(DOCS))), "text": DOCS})
    pq.write_table(table, d / "docs.parquet", row_group_size=7)  # several row groups
    (d / "shards").mkdir()
    for i in range(3):  # a glob of Parquet shards
        pq.write_table(table.slice(i * 20, 20), d / "shards" / f"part-{i:05d}.parquet", row_group_size=6)
    with pa.OSFile(str(d / "docs.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        for batch in table.to_batches(max_chunksize=9):
            w.write_batch(batch)
    return {
        "ref": SourceConfig("ref", path=d / "ref.jsonl"),
        "jsonl.zst": SourceConfig("z", path=d / "docs.jsonl.zst"),
        "json.zst": SourceConfig("j", path=d / "docs.json.zst", field="body"),
        "parquet": SourceConfig("p", path=d / "docs.parquet"),
        "parquet glob": SourceConfig("g", glob=str(d / "shards" / "*.parquet")),
        "arrow file": SourceConfig("a", path=d / "docs.arrow"),
        "datasets folder": SourceConfig("h", path=FIXTURE),
    }


def test_every_format_gives_the_same_documents_and_tokens(tmp_path):
    srcs = _write_all(tmp_path)
    assert list(iter_documents(srcs["ref"])) == DOCS
    assert srcs["parquet glob"].fmt == "parquet" and srcs["datasets folder"].fmt == "arrow"
    assert len(list_chunks(srcs["parquet"].files(), "parquet", "p")) == -(-len(DOCS) // 7)
    tok = train_tokenizer({"ref": srcs["ref"]}, 400, tmp_path / "cache")
    ref = tokenize_source(srcs["ref"], tok, tmp_path / "cache")
    for fmt, src in srcs.items():
        assert list(iter_documents(src)) == DOCS, fmt
        sh = tokenize_source(src, tok, tmp_path / "cache")
        assert np.array_equal(sh.train, ref.train) and np.array_equal(sh.heldout, ref.heldout), fmt
        assert (sh.n_train_docs, sh.n_heldout_docs) == (ref.n_train_docs, ref.n_heldout_docs)


def test_a_large_jsonl_file_is_read_in_byte_ranges_with_the_same_documents(tmp_path, monkeypatch):
    from rbridge.data import formats

    (tmp_path / "big.jsonl").write_bytes(_jsonl(DOCS))
    monkeypatch.setattr(formats, "RANGE_BYTES", 4096)  # a range boundary falls inside many lines
    src = SourceConfig("big", path=tmp_path / "big.jsonl")
    chunks = src.chunks()
    assert len(chunks) > 10 and all(c.part is not None for c in chunks)
    assert list(iter_documents(src)) == DOCS


def _damaged(d: Path) -> dict[str, tuple[str, list[str]]]:
    """name -> (spec source line, what the message must name)."""
    _write_all(d)
    cases = {}
    data = (d / "docs.parquet").read_bytes()
    (d / "footer.parquet").write_bytes(data[:-20])  # the footer cut off
    cases["bad Parquet footer"] = ("{path: footer.parquet}", ["footer.parquet", "Parquet"])
    shutil.copy(d / "docs.parquet", d / "nocol.parquet")
    cases["missing column"] = ("{path: nocol.parquet, field: body}", ["nocol.parquet", "'body'", "columns: id, text"])
    frames = zstandard.ZstdCompressor().compress(_jsonl(DOCS))
    (d / "frame.jsonl.zst").write_bytes(frames[:40] + bytes(b ^ 0x5A for b in frames[40:200]) + frames[200:])
    cases["bad zstd frame"] = ("{path: frame.jsonl.zst}", ["frame.jsonl.zst", "zstd"])
    lines = _jsonl(DOCS).decode().splitlines(keepends=True)
    lines[6] = '{"text": "unterminated\n'
    (d / "row.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress("".join(lines).encode()))
    cases["invalid JSON on row 7"] = ("{path: row.jsonl.zst}", ["row.jsonl.zst:7", "bad JSON"])
    arrow = (d / "docs.arrow").read_bytes()
    (d / "cut.arrow").write_bytes(arrow[: len(arrow) // 2])
    cases["truncated Arrow file"] = ("{path: cut.arrow}", ["cut.arrow", "Arrow"])
    (d / "ds").mkdir()
    (d / "ds" / "state.json").write_text('{"_data_files": [{"filename": "gone.arrow"}]}')
    cases["datasets folder missing a shard"] = ("{path: ds}", ["gone.arrow", "missing"])
    return cases


SPEC = """\
name: fmt
sources:
  x: SOURCE
candidates:
  - {name: x, mix: {x: 1.0}}
benchmarks:
  - {name: gsm8k, traces: traces.jsonl}
stages:
  - name: s
    proxy: {preset: 0.5M}
    tokens: 2048
"""


def test_each_damaged_or_wrong_file_is_refused_by_validate_naming_file_and_row(tmp_path):
    cases = _damaged(tmp_path)
    lines = (REPO / "specs/traces/gsm8k.jsonl").read_text().splitlines()[:2]
    (tmp_path / "traces.jsonl").write_text("\n".join(lines) + "\n")
    env = dict(os.environ, RBRIDGE_CACHE=str(tmp_path / "cache"))
    for what, (source, named) in cases.items():
        (tmp_path / "s.yaml").write_text(SPEC.replace("SOURCE", source))
        res = subprocess.run([sys.executable, "-m", "rbridge.cli", "validate", "s.yaml"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 2, (what, res.stdout, res.stderr)
        assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1, (what, res.stderr)
        assert all(n in res.stderr for n in named), (what, res.stderr)


def test_a_glob_mixing_formats_and_field_on_text_are_refused(tmp_path):
    _write_all(tmp_path)
    shutil.copy(tmp_path / "ref.jsonl", tmp_path / "shards" / "part-99999.parquet.jsonl")
    (tmp_path / "shards" / "odd.jsonl").write_bytes(_jsonl(DOCS[:2]))
    with pytest.raises(InputError, match="another format") as e:
        SourceConfig("g", glob=str(tmp_path / "shards" / "*"), format="parquet").files()
    assert "part-99999.parquet.jsonl" in str(e.value) or "odd.jsonl" in str(e.value)
    (tmp_path / "t.txt").write_text("a\n\nb\n")
    with pytest.raises(InputError, match="'field' applies only"):
        SourceConfig("t", path=tmp_path / "t.txt", field="body").files()


# ---------------------------------------------------------------------------- sampling


def _shards(d: Path, n: int = 200) -> SourceConfig:
    """``n`` Parquet shards of 3 documents each (the fixture's documents, cycled and numbered)."""
    d.mkdir()
    for i in range(n):
        docs = [f"shard {i} doc {j}: {DOCS[(3 * i + j) % len(DOCS)][:300]}" for j in range(3)]
        pq.write_table(pa.table({"text": docs}), d / f"part-{i:05d}.parquet")
    return SourceConfig("web", glob=str(d / "*.parquet"), sampled=True)


def test_a_sample_reads_only_the_shards_it_needs_from_across_the_corpus_and_extends(tmp_path, monkeypatch):
    from rbridge.data import formats, sample

    src = _shards(tmp_path / "web")
    tok = train_tokenizer({"ref": SourceConfig("ref", path=FIXTURE)}, 400, tmp_path / "cache")
    opened: list[str] = []
    real = formats.read_chunk

    def counting(chunk, *a):
        opened.append(chunk.file.name)
        return real(chunk, *a)

    monkeypatch.setattr(sample, "read_chunk", counting)
    first, read = sample.sample_shards(src, tok, 3000, tmp_path / "cache", heldout_fraction=0.05, workers=1)
    assert first.n_train_tokens >= 3000 and first.n_heldout_docs >= 1
    assert read.chunks == len(opened) == read.tokenized_now and read.chunks_total == 200
    assert read.chunks < 60                                       # a small plan reads few shards ...
    shard_ids = sorted(int(name[5:10]) for name in opened)
    assert shard_ids[0] < 50 and shard_ids[-1] > 150              # ... from across the corpus
    assert len({i // 50 for i in shard_ids}) == 4

    opened.clear()  # a plan needing more extends the cached sample: only the new shards are read
    more, read2 = sample.sample_shards(src, tok, 9000, tmp_path / "cache", heldout_fraction=0.05, workers=1)
    assert read2.tokenized_now == len(opened) == read2.chunks - read.chunks > 0
    assert np.array_equal(more.train[: first.n_train_tokens], first.train)
    opened.clear()  # and the small plan still gets exactly its first streams, from the cache
    again, read3 = sample.sample_shards(src, tok, 3000, tmp_path / "cache", heldout_fraction=0.05, workers=1)
    assert opened == [] and read3.tokenized_now == 0 and again.key == first.key
    assert np.array_equal(again.train, first.train) and np.array_equal(again.heldout, first.heldout)


def test_worker_processes_give_the_same_sample_as_one(tmp_path):
    from rbridge.data import sample

    src = _shards(tmp_path / "web", 40)
    tok = train_tokenizer({"ref": SourceConfig("ref", path=FIXTURE)}, 400, tmp_path / "cache")
    one, _ = sample.sample_shards(src, tok, 4000, tmp_path / "c1", heldout_fraction=0.05, workers=1)
    two, read = sample.sample_shards(src, tok, 4000, tmp_path / "c2", heldout_fraction=0.05, workers=2)
    assert read.tokenized_now >= read.chunks  # the chunks in flight when the need was met are kept too
    assert one.key == two.key and np.array_equal(one.train, two.train) and np.array_equal(one.heldout, two.heldout)
