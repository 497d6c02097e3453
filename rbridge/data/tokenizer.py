"""The proxies' tokenizer: train a byte-level BPE on the sources, or load one.

A trained tokenizer is GPT-2 style: byte-level pre-tokenizer (no prefix space),
BPE, and a single special token ``<|endoftext|>`` serving as BOS, EOS and PAD.
Encoding adds no special tokens on its own (callers put BOS/EOS where they
mean them); offset mappings are character offsets into the input string, and
every character is covered by some token (offsets are not trimmed), which is
what the rBridge letter-to-token weights need.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from rbridge.data._cache import (DATA_FORMAT_VERSION, content_key, default_cache_dir, discard_entry,
                                 new_entry_dir, publish_entry, read_manifest)
from rbridge.data.sources import (DEFAULT_HELDOUT_FRACTION, SourceConfig, iter_sample_documents, iter_split,
                                  source_fingerprint)
from rbridge.errors import InputError

SPECIAL_TOKEN = "<|endoftext|>"
# Text per source used to learn merges: enough for a stable small vocabulary,
# small enough that training takes seconds. The first characters of the
# training split, in document order, so the choice is deterministic.
DEFAULT_MAX_CHARS_PER_SOURCE = 4_000_000
MIN_VOCAB_SIZE = 257  # 256 byte symbols + <|endoftext|>


def _as_list(sources: Iterable[SourceConfig] | Mapping[str, SourceConfig]) -> list[SourceConfig]:
    items = list(sources.values()) if isinstance(sources, Mapping) else list(sources)
    return sorted(items, key=lambda s: s.name)


def _training_text(sources: list[SourceConfig], max_chars: int,
                   heldout_fraction: float) -> Iterator[list[str]]:
    """Batches of training-split documents, at most ``max_chars`` per source."""
    for src in sources:
        left = max_chars
        batch: list[str] = []
        if src.sampled:  # a bounded seeded sample, never a pass over the whole corpus
            docs = iter_sample_documents(src, heldout_fraction, max_chars)
        else:
            docs = iter_split(src, "train", heldout_fraction=heldout_fraction)
        for doc in docs:
            batch.append(doc[:left])
            left -= len(batch[-1])
            if len(batch) >= 1000:
                yield batch
                batch = []
            if left <= 0:
                break
        if batch:
            yield batch


def _new_bpe(vocab_size: int) -> tuple[Tokenizer, trainers.BpeTrainer]:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[SPECIAL_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    return tok, trainer


def tokenizer_cache_key(sources: Iterable[SourceConfig] | Mapping[str, SourceConfig], vocab_size: int, *,
                        heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
                        max_chars_per_source: int = DEFAULT_MAX_CHARS_PER_SOURCE) -> str:
    """The cache key of the tokenizer :func:`train_tokenizer` would train (reads the sources' bytes)."""
    srcs = _as_list(sources)
    return content_key({"kind": "bpe-bytelevel", "vocab_size": int(vocab_size),
                        "sources": [source_fingerprint(s) for s in srcs],
                        "heldout_fraction": heldout_fraction,
                        "max_chars_per_source": max_chars_per_source,
                        "version": DATA_FORMAT_VERSION})


def train_tokenizer(sources: Iterable[SourceConfig] | Mapping[str, SourceConfig], vocab_size: int,
                    cache_dir: str | Path | None = None, *,
                    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
                    max_chars_per_source: int = DEFAULT_MAX_CHARS_PER_SOURCE) -> PreTrainedTokenizerFast:
    """Train (or reuse from the cache) a byte-level BPE on the training split of ``sources``.

    Sources are read in name order, each contributing at most
    ``max_chars_per_source`` characters of its training split; held-out
    documents are never seen. The result is saved under
    ``cache_dir/tokenizers/<key>/`` (a Hugging Face tokenizer directory) and
    the key covers vocab size, the sources' content fingerprints and this
    code's data-format version, so a second call with the same inputs loads
    it. The returned tokenizer has ``rbridge_cached`` (bool) and
    ``rbridge_key`` attributes. The vocabulary may come out smaller than
    ``vocab_size`` when the text has too few distinct merges.
    """
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < MIN_VOCAB_SIZE:
        raise InputError(f"vocab_size must be an integer >= {MIN_VOCAB_SIZE}, got {vocab_size!r}",
                         field="tokenizer.train.vocab_size")
    if vocab_size > 2**32 - 1:
        raise InputError(f"vocab_size {vocab_size} is too large", field="tokenizer.train.vocab_size")
    srcs = _as_list(sources)
    if not srcs:
        raise InputError("no sources to train a tokenizer on", field="sources")
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = tokenizer_cache_key(srcs, vocab_size, heldout_fraction=heldout_fraction,
                              max_chars_per_source=max_chars_per_source)
    final = root / "tokenizers" / key
    cached = read_manifest(final) is not None
    if not cached:
        tok, trainer = _new_bpe(vocab_size)
        tok.train_from_iterator(_training_text(srcs, max_chars_per_source, heldout_fraction), trainer)
        hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIAL_TOKEN,
                                     eos_token=SPECIAL_TOKEN, pad_token=SPECIAL_TOKEN)
        tmp = new_entry_dir(final.parent, key)
        try:
            hf.save_pretrained(str(tmp))
            publish_entry(tmp, final, {"key": key, "vocab_size": len(hf), "requested_vocab_size": vocab_size,
                                       "sources": {s.name: source_fingerprint(s) for s in srcs}})
        except BaseException:
            discard_entry(tmp)
            raise
    # Load back from disk on both paths so a fresh and a cached tokenizer are
    # the same object state (and have the same fingerprint).
    out = AutoTokenizer.from_pretrained(str(final), local_files_only=True)
    out.rbridge_cached = cached
    out.rbridge_key = key
    return out


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load a user's Hugging Face tokenizer directory (must have a fast tokenizer)."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise InputError("tokenizer directory not found", file=p, field="tokenizer.path")
    try:
        tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except Exception as exc:  # transformers raises many types for a bad directory
        raise InputError(f"cannot load a tokenizer: {exc}", file=p, field="tokenizer.path") from None
    if not getattr(tok, "is_fast", False):
        raise InputError("rbridge needs a fast (tokenizers-backed) tokenizer for offset mappings",
                         file=p, field="tokenizer.path")
    tok.rbridge_cached = True
    return tok


def separator_id(tok) -> int:
    """The token placed before each document in a shard: EOS, else BOS."""
    for tid in (tok.eos_token_id, tok.bos_token_id):
        if tid is not None:
            return int(tid)
    raise InputError("the tokenizer has neither an EOS nor a BOS token to separate documents",
                     field="tokenizer")


def tokenizer_fingerprint(tok) -> str:
    """sha256 identifying what a tokenizer does: its serialized pipeline and special tokens."""
    h = hashlib.sha256()
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode("utf-8"))
    else:
        h.update(json.dumps(sorted(tok.get_vocab().items())).encode("utf-8"))
    h.update(json.dumps({"bos": tok.bos_token_id, "eos": tok.eos_token_id, "n": len(tok)}).encode())
    return h.hexdigest()


def check_tokenizer(name: str, src_tokenizer: Path | None, plan_tok, plan_tokenizer_path: Path | None,
                    spec_path: Path | None = None) -> None:
    """A token source's tokenizer must be the plan's: same pipeline, vocabulary and end-of-text id."""
    field = f"sources.{name}.tokenizer"
    if src_tokenizer is None:
        raise InputError(f"source {name!r} is a token file: name the tokenizer it was made with "
                         "(tokenizer: DIR), which the plan must load too", file=spec_path, field=field)
    if plan_tokenizer_path is None:
        raise InputError(f"source {name!r} holds tokens made with {src_tokenizer}; the plan trains its own "
                         f"tokenizer instead: set tokenizer: {{path: {src_tokenizer}}}", file=spec_path,
                         field="tokenizer")
    theirs = load_tokenizer(src_tokenizer)
    problems = []
    if len(theirs) != len(plan_tok):
        problems.append(f"vocabulary {len(theirs)} vs the plan's {len(plan_tok)}")
    if separator_id(theirs) != separator_id(plan_tok):
        problems.append(f"end-of-text id {separator_id(theirs)} vs the plan's {separator_id(plan_tok)}")
    if not problems and tokenizer_fingerprint(theirs) != tokenizer_fingerprint(plan_tok):
        problems.append("another vocabulary or pipeline")
    if problems:
        raise InputError(f"source {name!r} was tokenized with {src_tokenizer}, not the plan's tokenizer "
                         f"{plan_tokenizer_path}: {'; '.join(problems)}", file=spec_path, field=field)
