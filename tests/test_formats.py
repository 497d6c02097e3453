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
    return SourceConfig("web", glob="*.parquet", base_dir=d, sampled=True)


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
    assert 10 <= read.chunks < 60                                 # a small plan reads few shards ...
    order = sample.chunk_order(sample.source_fingerprint(src), 200)  # (re-exported from sources)
    assert opened == [f"part-{i:05d}.parquet" for i in order[:read.chunks]]  # ... in the seeded order,
    shard_ids = sorted(int(name[5:10]) for name in opened)
    assert shard_ids[0] < 100 <= shard_ids[-1]                    # ... from across the corpus

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


# ---------------------------------------------------------------------------- token files


def _tokenizer_dir(tmp_path: Path, vocab: int = 400) -> tuple[Path, object]:
    tok = train_tokenizer({"ref": SourceConfig("ref", path=FIXTURE)}, vocab, tmp_path / f"tc{vocab}")
    out = tmp_path / f"tok{vocab}"
    shutil.copytree(next((tmp_path / f"tc{vocab}" / "tokenizers").iterdir()), out)
    return out, tok


def _token_ids(tok, docs) -> list[np.ndarray]:
    eos = tok.eos_token_id
    return [np.array([eos] + tok(d, add_special_tokens=False)["input_ids"]) for d in docs]


def _write_llmc(path: Path, ids: np.ndarray, version: int = 1) -> None:
    header = np.zeros(256, dtype=np.int32)
    header[:3] = (20240520, version, ids.size)
    with open(path, "wb") as fh:
        fh.write(header.tobytes())
        fh.write(ids.astype(np.uint16 if version == 1 else np.uint32).tobytes())


def _docs_of(stream: np.ndarray, eos: int) -> list[tuple]:
    cuts = list(np.flatnonzero(stream == eos)) + [stream.size]
    return [tuple(stream[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]


def test_token_files_give_the_same_documents_as_the_text(tmp_path):
    from rbridge.data.sample import sample_shards

    tokdir, tok = _tokenizer_dir(tmp_path)
    ids = np.concatenate(_token_ids(tok, DOCS))
    _write_llmc(tmp_path / "llmc.bin", ids)
    np.save(tmp_path / "docs.npy", ids.astype(np.uint32))
    ids.astype(np.uint16).tofile(tmp_path / "nanogpt.bin")
    want = sorted(tuple(x) for x in _token_ids(tok, DOCS))
    for src in (SourceConfig("a", path=tmp_path / "llmc.bin", tokenizer=tokdir, sampled=True),
                SourceConfig("b", path=tmp_path / "docs.npy", tokenizer=tokdir, sampled=True),
                SourceConfig("c", path=tmp_path / "nanogpt.bin", tokenizer=tokdir, dtype="uint16", sampled=True)):
        assert src.fmt == "tokens"
        sh, read = sample_shards(src, tok, 10**9, tmp_path / "cache", heldout_fraction=0.2, workers=1)
        got = _docs_of(np.asarray(sh.train), tok.eos_token_id) + _docs_of(np.asarray(sh.heldout), tok.eos_token_id)
        assert sorted(got) == want and sh.n_heldout_docs >= 1 and read.chunks == read.chunks_total == 1


def test_token_files_of_another_tokenizer_or_without_a_dtype_are_refused(tmp_path):
    from rbridge.data.sample import sample_shards
    from rbridge.data.tokenizer import check_tokenizer

    tokdir, tok = _tokenizer_dir(tmp_path)
    otherdir, other = _tokenizer_dir(tmp_path, 600)
    ids = np.concatenate(_token_ids(other, DOCS))  # made with the 600-token vocabulary
    _write_llmc(tmp_path / "other.bin", ids)
    with pytest.raises(InputError, match="vocabulary 600 vs the plan's 400") as e:
        check_tokenizer("x", otherdir, tok, tokdir)
    assert e.value.field == "sources.x.tokenizer"
    with pytest.raises(InputError, match="plan trains its own tokenizer"):
        check_tokenizer("x", otherdir, None, None)
    # Declared with the plan's tokenizer, but its ids say otherwise: refused at the first foreign id.
    src = SourceConfig("x", path=tmp_path / "other.bin", tokenizer=tokdir, sampled=True)
    with pytest.raises(InputError, match=r"token id \d+ at position \d+ is outside the plan tokenizer's "
                                         r"vocabulary of 400") as e:
        sample_shards(src, tok, 10**9, tmp_path / "cache", heldout_fraction=0.05, workers=1)
    assert "other.bin" in str(e.value)
    ids.astype(np.uint16).tofile(tmp_path / "raw.bin")
    with pytest.raises(InputError, match="needs dtype"):
        SourceConfig("r", path=tmp_path / "raw.bin", tokenizer=tokdir).chunks()
    (tmp_path / "cut.bin").write_bytes((tmp_path / "other.bin").read_bytes()[:-10])
    with pytest.raises(InputError, match="truncated"):
        SourceConfig("t", path=tmp_path / "cut.bin", tokenizer=tokdir).chunks()


PLAN = """\
name: corpora
tokenizer: {path: tok400}
sampling: {above: 0, workers: 2}
sources:
  web: {glob: "web/*.parquet"}
  sotu: {path: sotu.bin, tokenizer: TOKENS_TOKENIZER}
candidates:
  - {name: web, mix: {web: 1.0}}
  - {name: sotu, mix: {sotu: 1.0}}
  - {name: both, mix: {web: 0.5, sotu: 0.5}}
benchmarks:
  - {name: gsm8k, traces: traces.jsonl}
stages:
  - name: s
    proxy: {hidden_size: 16, num_hidden_layers: 1, num_attention_heads: 2}
    tokens: 1024
    seq_len: 64
    batch_size: 4
    evals: 1
"""


def test_a_plan_on_parquet_shards_and_a_token_file(tmp_path):
    """The whole path through the CLI: a glob of 200 Parquet shards read as a sample on two worker processes,
    an llm.c token file made with the plan's tokenizer; and the same spec with a token file of another
    tokenizer refused (exit 2, naming the field) before anything is written."""
    _shards(tmp_path / "web")
    tokdir, tok = _tokenizer_dir(tmp_path)
    shutil.move(str(tokdir), tmp_path / "tok400")
    otherdir, other = _tokenizer_dir(tmp_path, 600)
    _write_llmc(tmp_path / "sotu.bin", np.concatenate(_token_ids(tok, [f"{d} ({i})" for i in range(4)
                                                                         for d in DOCS])))
    lines = (REPO / "specs/traces/gsm8k.jsonl").read_text().splitlines()[:3]
    (tmp_path / "traces.jsonl").write_text("\n".join(lines) + "\n")
    env = dict(os.environ, RBRIDGE_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1")
    (tmp_path / "bad.yaml").write_text(PLAN.replace("TOKENS_TOKENIZER", otherdir.name))
    bad = subprocess.run([sys.executable, "-m", "rbridge.cli", "plan", "bad.yaml"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2, bad.stdout + bad.stderr
    assert "sources.sotu.tokenizer" in bad.stderr and "vocabulary 600 vs the plan's 400" in bad.stderr
    assert not (tmp_path / "stores" / "corpora.db").exists()  # (the empty lock file beside it stays)
    (tmp_path / "ok.yaml").write_text(PLAN.replace("TOKENS_TOKENIZER", "tok400"))
    res = subprocess.run([sys.executable, "-m", "rbridge.cli", "plan", "ok.yaml"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    web = next(line for line in res.stdout.splitlines() if "source web:" in line and "sampled" in line)
    k = int(web.split("sampled ")[1].split(" of 200 chunks")[0])
    assert 0 < k < 60, web
    assert "source sotu:" in res.stdout and "done in" in res.stdout


def test_a_large_parquet_row_group_is_read_in_row_ranges_with_the_same_documents(tmp_path, monkeypatch):
    from rbridge.data import formats

    pq.write_table(pa.table({"text": DOCS}), tmp_path / "one.parquet", row_group_size=len(DOCS))
    monkeypatch.setattr(formats, "PARQUET_CHUNK_BYTES", 4096)
    src = SourceConfig("p", path=tmp_path / "one.parquet")
    chunks = src.chunks()
    assert len(chunks) > 5 and all(len(c.part) == 3 and c.part[0] == 0 for c in chunks)
    assert sum(c.n_rows for c in chunks) == len(DOCS)
    assert list(iter_documents(src)) == DOCS
