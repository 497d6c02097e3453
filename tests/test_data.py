"""rbridge.data on real files, a real (small) trained tokenizer and real memmaps."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import numpy as np
import pytest

from rbridge.data import (SourceConfig, build_mixture, heldout_rows, iter_documents, iter_labelled, iter_split,
                          load_tokenizer, source_fingerprint, tokenize_source, tokenizer_fingerprint,
                          train_tokenizer)
from rbridge.errors import InputError

VOCAB = 512


def _doc(rng: random.Random, words: list[str], n: int) -> str:
    # A unique tag makes every document findable in a decoded token stream.
    return f"doc{rng.getrandbits(48):012x} " + " ".join(rng.choice(words) for _ in range(n))


def _write_corpus(root: Path) -> dict[str, SourceConfig]:
    rng = random.Random(1234)
    prose = "the a of and to in was it her she said that with for as had not be".split()
    maths = "1 2 3 4 5 6 7 8 9 0 + - = * / x y sum total half twice so answer".split()
    code = "def return if else for in range print self import class None True : ( ) ,".split()
    root.mkdir(parents=True, exist_ok=True)
    (root / "prose.txt").write_text("\n\n\n".join(_doc(rng, prose, 60) for _ in range(200)) + "\n")
    with gzip.open(root / "maths.jsonl.gz", "wt", encoding="utf-8") as fh:
        for _ in range(200):
            fh.write(json.dumps({"body": _doc(rng, maths, 40)}) + "\n")
    for i in range(120):
        sub = root / "code" / f"pkg{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"m{i:03d}.py").write_text(_doc(rng, code, 50) + "\n")
    return {"prose": SourceConfig("prose", path=Path("prose.txt"), base_dir=root),
            "maths": SourceConfig("maths", path=Path("maths.jsonl.gz"), field="body", base_dir=root),
            "code": SourceConfig("code", glob="code/**/*.py", base_dir=root)}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    cache = tmp_path_factory.mktemp("cache")
    srcs = _write_corpus(root)
    tok = train_tokenizer(srcs, VOCAB, cache)
    shards = {n: tokenize_source(s, tok, cache) for n, s in srcs.items()}
    return {"root": root, "cache": cache, "srcs": srcs, "tok": tok, "shards": shards}


# -- reading ------------------------------------------------------------------

def test_plain_text_and_gzip(tmp_path):
    text = "first doc\nline two\n\n\n  \nsecond doc\n\t\nthird\n"
    (tmp_path / "a.txt").write_text(text)
    with gzip.open(tmp_path / "a.txt.gz", "wt") as fh:
        fh.write(text)
    want = ["first doc\nline two", "second doc", "third"]
    assert list(iter_documents(SourceConfig("a", path=tmp_path / "a.txt"))) == want
    assert list(iter_documents(SourceConfig("a", path=Path("a.txt.gz"), base_dir=tmp_path))) == want


def test_jsonl_plain_and_gzip_default_field(tmp_path):
    lines = [json.dumps({"text": "one"}), "", json.dumps({"text": "two", "x": 1})]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as fh:
        fh.write("\n".join(lines) + "\n")
    assert list(iter_documents(SourceConfig("d", path=tmp_path / "d.jsonl"))) == ["one", "two"]
    assert list(iter_documents(SourceConfig("d", path=tmp_path / "d.jsonl.gz"))) == ["one", "two"]


def test_jsonl_bad_line_and_missing_field_name_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "ok"}\n{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(InputError) as err:
        list(iter_documents(SourceConfig("bad", path=p)))
    assert err.value.line == 3 and err.value.file == str(p)
    assert f"{p}:3" in str(err.value)

    p.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(InputError) as err:
        list(iter_documents(SourceConfig("bad", path=p)))
    assert err.value.line == 2 and "text" in str(err.value)


def test_glob_sorted_recursive_one_doc_per_file(tmp_path):
    for rel, body in [("b/z.py", "zed"), ("a.py", "alpha"), ("b/c/y.py", "why"), ("b/skip.txt", "no")]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(body)
    with gzip.open(tmp_path / "b" / "g.py.gz", "wt") as fh:
        fh.write("gzipped")
    src = SourceConfig("c", glob="**/*.py", base_dir=tmp_path)
    assert list(iter_documents(src)) == ["alpha", "why", "zed"]
    src_gz = SourceConfig("c", glob="**/*.py*", base_dir=tmp_path)
    assert list(iter_documents(src_gz)) == ["alpha", "why", "gzipped", "zed"]


def test_empty_and_missing_sources(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n   \n")
    (tmp_path / "empty.jsonl").write_text("")
    for src in [SourceConfig("e", path=tmp_path / "empty.txt"),
                SourceConfig("e", path=tmp_path / "empty.jsonl"),
                SourceConfig("e", path=tmp_path / "missing.txt"),
                SourceConfig("e", glob="nothing/**/*.md", base_dir=tmp_path),
                SourceConfig("e", path=tmp_path / "empty.txt", glob="*.txt"),
                SourceConfig("e", path=tmp_path / "empty.txt", field="text")]:
        with pytest.raises(InputError):
            list(iter_documents(src))
    with pytest.raises(InputError):
        source_fingerprint(SourceConfig("e", path=tmp_path / "missing.txt"))


# -- held-out split -----------------------------------------------------------

def test_heldout_slice_is_deterministic_and_never_trained_on(world):
    src, tok, sh = world["srcs"]["prose"], world["tok"], world["shards"]["prose"]
    labelled = list(iter_labelled(src))
    held = [d for d, h in labelled if h]
    train = [d for d, h in labelled if not h]
    assert 1 <= len(held) < 0.15 * len(labelled)
    assert held == list(iter_split(src, "heldout")) and train == list(iter_split(src, "train"))
    assert sh.n_heldout_docs == len(held) and sh.n_train_docs == len(train)
    train_text = tok.decode(np.asarray(sh.train).tolist())
    held_text = tok.decode(np.asarray(sh.heldout).tolist())
    for d in held:
        assert d not in train_text and d in held_text
    for d in train[:20]:
        assert d in train_text
    # Every document is preceded by EOS.
    assert sh.train[0] == sh.eos_id and int((np.asarray(sh.train) == sh.eos_id).sum()) == len(train)


def test_tiny_source_still_holds_out_one_document(tmp_path):
    (tmp_path / "t.txt").write_text("alpha\n\nbeta\n\ngamma\n")
    src = SourceConfig("t", path=tmp_path / "t.txt")
    assert len(list(iter_split(src, "heldout"))) == 1 and len(list(iter_split(src, "train"))) == 2
    (tmp_path / "one.txt").write_text("only one\n")
    with pytest.raises(InputError):
        list(iter_split(SourceConfig("one", path=tmp_path / "one.txt"), "train"))


# -- tokenizer ----------------------------------------------------------------

def test_tokenizer_cache_hit_gives_identical_ids(world):
    tok = world["tok"]
    again = train_tokenizer(world["srcs"], VOCAB, world["cache"])
    assert again.rbridge_cached and again.rbridge_key == tok.rbridge_key
    text = "the answer is 42 so def f(x): return x"
    assert again(text)["input_ids"] == tok(text)["input_ids"]
    assert tokenizer_fingerprint(again) == tokenizer_fingerprint(tok)
    assert len(tok) <= VOCAB and tok.eos_token == tok.bos_token == tok.pad_token == "<|endoftext|>"
    # A user's tokenizer directory loads through load_tokenizer.
    loaded = load_tokenizer(world["cache"] / "tokenizers" / tok.rbridge_key)
    assert tokenizer_fingerprint(loaded) == tokenizer_fingerprint(tok)
    with pytest.raises(InputError):
        load_tokenizer(world["root"] / "no-such-dir")


def test_offsets_are_character_offsets_and_decode_round_trips(world):
    tok = world["tok"]
    text = "café au lait 🙂 ok"
    enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
    offsets, ids = enc["offset_mapping"], enc["input_ids"]
    assert tok.decode(ids) == text
    assert tok(text)["input_ids"] == ids  # no special tokens added implicitly
    assert max(e for _, e in offsets) == len(text) < len(text.encode("utf-8"))
    covered = set()
    for s, e in offsets:
        assert 0 <= s < e <= len(text)
        covered.update(range(s, e))
    assert covered == set(range(len(text)))  # untrimmed: spaces belong to tokens too
    # Tokens sharing one span (bytes of a multi-byte character) decode to exactly it.
    spans: dict[tuple[int, int], list[int]] = {}
    for tid, span in zip(ids, offsets):
        spans.setdefault(tuple(span), []).append(tid)
    for (s, e), tids in spans.items():
        assert tok.decode(tids) == text[s:e]
    emoji = text.index("🙂")
    assert any(s <= emoji < e for s, e in offsets)


# -- shards -------------------------------------------------------------------

def test_shard_cache_hit_and_invalidation(world, tmp_path):
    tok = world["tok"]
    sh = world["shards"]["maths"]
    assert not sh.cached and sh.train.dtype == np.uint16
    hit = tokenize_source(world["srcs"]["maths"], tok, world["cache"])
    assert hit.cached and hit.key == sh.key and np.array_equal(hit.train, sh.train)

    # A copy of the source in a new place keeps the cache; editing one byte invalidates it.
    p = tmp_path / "p.txt"
    p.write_text("one doc here\n\nanother doc\n\nthird doc\n\nfourth doc\n")
    src = SourceConfig("p", path=p)
    first = tokenize_source(src, tok, world["cache"])
    assert not first.cached and tokenize_source(src, tok, world["cache"]).cached
    p.write_text("one doc here\n\nanother doc!\n\nthird doc\n\nfourth doc\n")
    changed = tokenize_source(src, tok, world["cache"])
    assert not changed.cached and changed.key != first.key


def test_half_written_shard_entry_is_rebuilt(world, tmp_path):
    p = tmp_path / "q.txt"
    p.write_text("alpha beta\n\ngamma delta\n\nepsilon\n")
    src = SourceConfig("q", path=p)
    good = tokenize_source(src, world["tok"], tmp_path / "c")
    (good.dir / "manifest.json").unlink()  # as if the writer died before the manifest
    rebuilt = tokenize_source(src, world["tok"], tmp_path / "c")
    assert not rebuilt.cached and np.array_equal(rebuilt.train, good.train)


# -- mixtures -----------------------------------------------------------------

def _stream_text(stream: np.ndarray) -> bytes:
    return np.asarray(stream).tobytes()


def test_mixture_shares_rows_and_cache(world):
    mix = {"prose": 0.5, "maths": 0.3, "code": 0.2}
    rows, stats = build_mixture(mix, world["shards"], n_tokens=20_000, seq_len=64, seed=0,
                                cache_dir=world["cache"])
    assert rows.shape == (stats.n_rows, 64) == (313, 64)
    for n, w in mix.items():
        assert abs(stats.measured_share[n] - w) < 0.02
    assert sum(stats.rows.values()) == stats.n_rows and not stats.cached
    # Each row is a contiguous window of one source's (cyclic) training stream.
    doubled = {n: _stream_text(np.concatenate([s.train, s.train])) for n, s in world["shards"].items()}
    found = {n: 0 for n in mix}
    for row in np.asarray(rows[:60]):
        owners = [n for n in mix if row.tobytes() in doubled[n]]
        assert owners
        found[owners[0]] += 1
    assert all(found.values())
    again = build_mixture(mix, world["shards"], 20_000, 64, 0, world["cache"])
    assert again.stats.cached and np.array_equal(again.rows, rows)


def test_mixture_determinism_and_repeats(world, tmp_path):
    mix = {"prose": 0.5, "maths": 0.3, "code": 0.2}
    a = build_mixture(mix, world["shards"], 30_000, 32, seed=7, cache_dir=tmp_path / "a")
    b = build_mixture(mix, world["shards"], 30_000, 32, seed=7, cache_dir=tmp_path / "b")
    c = build_mixture(mix, world["shards"], 30_000, 32, seed=8, cache_dir=tmp_path / "a")
    assert not b.stats.cached and np.array_equal(a.rows, b.rows)
    assert not np.array_equal(a.rows, c.rows)
    # More tokens than a source holds: it repeats, and the stats say so.
    n_code = world["shards"]["code"].n_train_tokens
    big = build_mixture({"code": 1.0}, world["shards"], 3 * n_code, 32, seed=1, cache_dir=tmp_path / "a")
    assert big.stats.repeated == ["code"] and 2.9 < big.stats.epochs["code"] < 3.1


def test_mixture_validation(world):
    sh = world["shards"]
    for mix, field in [({"prose": 0.5, "maths": 0.4}, "mix"),
                       ({"prose": 0.5, "nope": 0.5}, "mix.nope"),
                       ({"prose": 1.0, "maths": 0.0}, "mix.maths"),
                       ({"prose": 1.5, "maths": -0.5}, "mix.maths"),
                       ({}, "mix")]:
        with pytest.raises(InputError) as err:
            build_mixture(mix, sh, 1000, 32, 0, world["cache"])
        assert err.value.field == field
    with pytest.raises(InputError):
        build_mixture({"prose": 1.0}, sh, 0, 32, 0, world["cache"])


def test_heldout_rows(world):
    sh = world["shards"]
    rows = heldout_rows(sh["prose"], seq_len=32, max_rows=4)
    assert rows.shape == (min(4, sh["prose"].n_heldout_tokens // 32), 32) and rows.dtype == np.int64
    assert rows[0].astype(np.uint16).tobytes() in _stream_text(sh["prose"].heldout)
    per_source = heldout_rows(sh, seq_len=32, max_rows=2)
    assert set(per_source) == set(sh) and all(r.shape[1] == 32 for r in per_source.values())
    assert np.array_equal(heldout_rows(sh["prose"], 32, 4), rows)


@pytest.mark.parametrize("name", ["kjv.txt.gz", "austen.txt.gz", "cot.jsonl.gz", "code.jsonl.gz"])
def test_write_documents_reproduces_the_shipped_corpora_byte_for_byte(tmp_path, name):
    """scripts/make_corpora.py writes specs/data/ with rbridge.data.write_documents, the inverse of
    iter_documents: reading a shipped corpus and writing its documents again gives the same bytes."""
    from rbridge.data import write_documents

    shipped = Path(__file__).resolve().parents[1] / "specs/data" / name
    docs = list(iter_documents(SourceConfig("x", path=shipped)))
    text_bytes, n_bytes = write_documents(tmp_path / name, docs)
    assert (tmp_path / name).read_bytes() == shipped.read_bytes()
    assert n_bytes == shipped.stat().st_size and text_bytes == sum(len(d.encode()) for d in docs)
    assert list(iter_documents(SourceConfig("y", path=tmp_path / name))) == docs


def test_write_documents_keeps_documents_apart(tmp_path):
    from rbridge.data import write_documents

    docs = ["one\n\n  \ntwo lines", "  indented", "é 😀"]
    write_documents(tmp_path / "t.txt.gz", docs)
    assert list(iter_documents(SourceConfig("t", path=tmp_path / "t.txt.gz"))) == ["one\ntwo lines", "  indented",
                                                                                    "é 😀"]
    write_documents(tmp_path / "t.jsonl.gz", docs)
    assert list(iter_documents(SourceConfig("j", path=tmp_path / "t.jsonl.gz"))) == docs
