"""Trace importers: other formats -> canonical rbridge traces (``rbridge traces import``).

Three formats (every error is an :class:`InputError` naming the file, the
1-based line and, where known, the field):

``openai``
    OpenAI chat-completions output with ``logprobs: true``. A file is JSONL
    (one record per line), a JSON array of records, or one JSON object. A
    record is a chat completion (``choices[0].logprobs.content``: ``token``,
    ``logprob``, ``bytes``), a Batch API output line (``{"custom_id": ...,
    "response": {"body": <completion>}}``) or a wrapper that carries the trace
    fields beside the completion (``{"id", "benchmark", "question", "label",
    "choices", "gold", "response" | "completion": <completion>}``). The question
    is taken from the record's ``question``, else from the last user message of
    ``messages`` / ``request.messages`` / ``body.messages`` (the paper's JSON
    instruction stripped), else left empty.

    Token texts are rebuilt from ``bytes`` (UTF-8, decoded incrementally: a
    token carrying only the first bytes of a character adds no text, the token
    with the character's last byte adds the whole character -- the
    completing-token rule of ``completions.py``); without ``bytes`` the ``token``
    string is used. The completion text must equal ``message.content`` when
    that is given (or, with a server's reasoning parser, ``reasoning_content``
    followed by ``content``). Free-text completions (no JSON asked for) are
    taken as they are: ``reasoning_span`` says where their reasoning lies and
    ``rbridge.scoring.answers.free_text_answer`` finds their answer. In the
    paper's JSON, the value of ``"reasoning"`` is found with
    :func:`rbridge.scoring.completions.find_reasoning`, JSON escapes (``\\n \\t
    \\" \\\\ \\/ \\uXXXX``, surrogate pairs) are mapped back to characters, and
    every reasoning character is given to the token that completes it
    (:func:`rbridge.scoring.completions.reasoning_tokens`, logprobs kept exact).

``per-token``
    The layout the paper's authors released: completions files (a JSON array,
    or JSONL, one object per trace) plus token files (JSONL, one row per
    frontier token, grouped by a trace key, possibly spread over several part
    files; a trace's rows may continue from one part into the next). A file is
    a token file when its first row has the token and logprob fields and no
    reasoning field. Rows of one trace are ordered by the position field when
    rows carry it, else by the order of the files as given and of the rows in
    them. Field names are options (:data:`PER_TOKEN_FIELDS`), e.g.
    ``--option key=qid --option token=tok``. When the tokens of a trace
    concatenate to its ``reasoning`` they are taken as they are; otherwise the
    tokens are taken to cover the whole JSON completion and the reasoning is
    found inside it as for ``openai``. The benchmark is the row's benchmark
    field, else the ``benchmark`` option, else the completions file's stem.
    Completions without any token rows are skipped and counted.

``rbridge``
    Canonical rbridge JSONL files, validated line by line and merged (ids must
    be unique across all files).
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rbridge._textio import json_object_lines, read_text
from rbridge.errors import InputError
from rbridge.scoring.answers import free_text_answer
from rbridge.scoring.completions import INSTRUCTION, align_pieces, answer_text, find_reasoning, reasoning_tokens
from rbridge.scoring.traces import Trace, check_out_path, parse_trace, write_traces

FORMATS = ("openai", "per-token", "rbridge")

#: Field names of the ``per-token`` layout and their defaults (override with options).
PER_TOKEN_FIELDS: dict[str, str] = {
    "key": "id",               # trace key in completions rows
    "token_key": "",           # trace key in token rows (default: same as key)
    "token": "token",          # token text in token rows
    "logprob": "logprob",      # token logprob in token rows
    "bytes": "bytes",          # optional UTF-8 bytes of the token (list of ints)
    "position": "position",    # optional token index within its trace
    "token_benchmark": "benchmark",  # optional benchmark name in token rows (disambiguates keys)
    "question": "question",
    "reasoning": "reasoning",  # optional: the reasoning text of the completion
    "answer": "final_answer",  # optional: the frontier's final answer
    "benchmark": "benchmark",  # optional benchmark name in completions rows
    "label": "label",
    "choices": "choices",
    "gold": "gold",
    "model": "model",          # optional frontier model name in completions rows
}


# ---------------------------------------------------------------- reading records

def _read_text(path: Path) -> str:
    return read_text(path)


def read_records(path: str | Path) -> list[tuple[int, Any]]:
    """(1-based line, decoded value) of every record in a JSON array, one JSON object, or JSONL."""
    path = Path(path)
    text = _read_text(path)
    stripped = text.lstrip()
    dec = json.JSONDecoder()
    if stripped.startswith("["):
        pos = len(text) - len(stripped) + 1
        out: list[tuple[int, Any]] = []

        def skip(p: int) -> int:
            while p < len(text) and text[p] in " \t\r\n":
                p += 1
            return p

        pos = skip(pos)
        if pos < len(text) and text[pos] == "]":
            return out
        while True:
            line = text.count("\n", 0, pos) + 1
            try:
                obj, pos = dec.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                raise InputError(f"not valid JSON: {e.msg} at column {e.colno}", file=path,
                                 line=e.lineno) from None
            out.append((line, obj))
            pos = skip(pos)
            if pos < len(text) and text[pos] == ",":
                pos = skip(pos + 1)
                continue
            if pos < len(text) and text[pos] == "]":
                if text[pos + 1:].strip():
                    raise InputError("extra data after the JSON array", file=path,
                                     line=text.count("\n", 0, pos + 1) + 1)
                return out
            raise InputError("not valid JSON: expected ',' or ']' in the array", file=path,
                             line=text.count("\n", 0, pos) + 1)
    lines = text.splitlines()
    if stripped.startswith("{") and len([ln for ln in lines if ln.strip()]) > 1:
        try:  # one pretty-printed object
            return [(len(lines) - len(stripped.splitlines()) + 1, json.loads(text))]
        except json.JSONDecodeError:
            pass   # JSONL: report the bad line below
    out = []
    for lineno, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            out.append((lineno, json.loads(raw)))
        except json.JSONDecodeError as e:
            raise InputError(f"not valid JSON: {e.msg} at column {e.colno}", file=path, line=lineno) from None
    return out


# ---------------------------------------------------------------- token texts

def decode_tokens(tokens: Sequence[Any], *, file: Path, line: int, where: str,
                  token_field: str = "token", logprob_field: str = "logprob",
                  bytes_field: str = "bytes") -> tuple[list[str], list[float]]:
    """Texts (completing-token rule over UTF-8 bytes) and logprobs of frontier tokens."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
    texts: list[str] = []
    lps: list[float] = []
    for k, tok in enumerate(tokens):
        at = f"{where}[{k}]"
        if not isinstance(tok, dict):
            raise InputError("a token must be a JSON object", file=file, line=line, field=at)
        lp = tok.get(logprob_field)
        if lp is None:
            raise InputError("missing required field", file=file, line=line, field=f"{at}.{logprob_field}")
        lps.append(_check_logprob(lp, file=file, line=line, field=f"{at}.{logprob_field}"))
        raw = tok.get(bytes_field)
        if raw is not None:
            if not isinstance(raw, list) or not all(isinstance(b, int) and 0 <= b < 256 for b in raw):
                raise InputError("bytes must be a list of integers 0..255", file=file, line=line,
                                 field=f"{at}.{bytes_field}")
            data = bytes(raw)
        else:
            t = tok.get(token_field)
            if not isinstance(t, str):
                raise InputError("missing required field" if t is None else "must be a string",
                                 file=file, line=line, field=f"{at}.{token_field}")
            data = t.encode("utf-8")
        try:
            texts.append(decoder.decode(data, final=False))
        except UnicodeDecodeError as e:
            raise InputError(f"token bytes are not valid UTF-8 ({e.reason})", file=file, line=line,
                             field=at) from None
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise InputError("the tokens end inside a UTF-8 character", file=file, line=line,
                         field=where) from None
    return texts, lps


def _check_logprob(v: Any, *, file: Path, line: int, field: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise InputError(f"logprob must be a number, got {v!r}", file=file, line=line, field=field)
    v = float(v)
    if v != v or v in (float("inf"), float("-inf")):
        raise InputError(f"logprob must be a finite number, got {v}", file=file, line=line, field=field)
    if v > 0:
        raise InputError(f"logprob must be <= 0 (a log probability), got {v}", file=file, line=line,
                         field=field)
    return v


_THINK = ("<think>", "</think>")


def _span(text: str, a: int, b: int) -> tuple[int, int]:
    """[a, b) without the whitespace at its ends."""
    while a < b and text[a].isspace():
        a += 1
    while b > a and text[b - 1].isspace():
        b -= 1
    return a, b


def reasoning_span(text: str, reasoning_chars: int | None = None) -> tuple[int, int, str, str]:
    """Where a free-text completion's reasoning lies: (start, end, answer text, rule).

    ``reasoning_chars``: the tokens cover a server's separate reasoning field (``reasoning_content``)
    followed by the message content; the reasoning is those first characters, the content is the
    answer text (rule ``reasoning_content``). Else the text inside ``<think>...</think>`` when the
    completion has one, the answer text after it (rule ``think``); else the whole completion,
    which is also where the answer is looked for (rule ``text``). Whitespace at a span's ends is
    not reasoning.
    """
    if reasoning_chars is not None:
        a, b = _span(text, 0, reasoning_chars)
        if text[a:].startswith(_THINK[0]) and text[a:b].endswith(_THINK[1]):
            a, b = _span(text, a + len(_THINK[0]), b - len(_THINK[1]))
        return a, b, text[reasoning_chars:], "reasoning_content"
    open_at = text.find(_THINK[0])
    close_at = text.find(_THINK[1], open_at + 1 if open_at >= 0 else 0)
    if close_at >= 0:  # some servers strip the opening tag from the output
        a = open_at + len(_THINK[0]) if 0 <= open_at < close_at else 0
        a, b = _span(text, a, close_at)
        return a, b, text[close_at + len(_THINK[1]):], "think"
    a, b = _span(text, 0, len(text))
    return a, b, text, "text"


def _frontier_from_completion(texts: list[str], lps: list[float], *, file: Path, line: int, where: str,
                              checker: str | None = None, reasoning_chars: int | None = None
                              ) -> tuple[str, list[dict[str, Any]], Any, str]:
    """(reasoning, frontier token dicts, final answer, rule) from a completion's tokens: the paper's JSON
    (``{"reasoning": ..., "final_answer": ...}``) where the completion holds it, else free text
    (``reasoning_span``; the answer by ``rbridge.scoring.answers.free_text_answer``)."""
    text = "".join(texts)
    found = find_reasoning(text) if reasoning_chars is None else None
    if found is not None:
        chars, ends, final = found
        rule = "json"
    elif reasoning_chars is None and text.lstrip().startswith("{") and '"reasoning"' in text:
        # the paper's JSON was asked for and came back broken: not free text to score
        raise InputError('the completion starts as the paper\'s JSON but holds no object with a non-empty string '
                         '"reasoning" and a "final_answer"', file=file, line=line, field=where)
    else:
        a, b, answer_from, rule = reasoning_span(text, reasoning_chars)
        if a >= b:
            raise InputError(f"the completion holds no reasoning text (rule {rule}: the reasoning is the "
                             "text inside <think>...</think>, else the whole completion)", file=file, line=line,
                             field=where)
        chars, ends = list(text[a:b]), list(range(a + 1, b + 1))
        final = free_text_answer(answer_from, checker)
        if not final and rule != "text":
            final = answer_from.strip() if len(answer_from.strip()) <= 200 else ""
    toks = reasoning_tokens(texts, lps, (chars, ends), digits=None)
    return "".join(chars), [t.model_dump() for t in toks], final, rule


def default_checker(benchmark: str) -> str | None:
    """The answer rule of a benchmark as the spec's default (BenchmarkSpec.answer_checker): ``number`` for
    benchmarks named gsm8k..., else none."""
    return "number" if benchmark.lower().startswith("gsm8k") else None


# ---------------------------------------------------------------- openai

def _question_from_messages(rec: dict[str, Any]) -> str | None:
    for holder in (rec, rec.get("request"), rec.get("body")):
        msgs = holder.get("messages") if isinstance(holder, dict) else None
        if isinstance(msgs, list):
            users = [m.get("content") for m in msgs if isinstance(m, dict) and m.get("role") == "user"]
            if users and isinstance(users[-1], str):
                return users[-1].removesuffix(INSTRUCTION)
    return None


def _completion_of(rec: dict[str, Any]) -> dict[str, Any] | None:
    def is_completion(v: Any) -> bool:
        return (isinstance(v, dict) and isinstance(v.get("choices"), list) and v["choices"]
                and isinstance(v["choices"][0], dict) and "logprobs" in v["choices"][0])

    if is_completion(rec):
        return rec
    for name in ("response", "completion", "output"):
        v = rec.get(name)
        if isinstance(v, dict) and is_completion(v.get("body")):
            return v["body"]
        if is_completion(v):
            return v
    return None


def trace_from_completion(rec: dict[str, Any], comp: dict[str, Any], *, index: int, benchmark: str | None,
                          model: str | None, file: Path, line: int | None, source: str,
                          metadata: dict[str, Any] | None = None) -> Trace:
    """One trace from a chat completion with logprobs (``comp``) and the record that carries it (``rec``, the
    completion itself or a wrapper with the trace's fields); shared by ``import_openai`` and the server
    generation (rbridge.scoring.server). Raises InputError naming ``file``/``line`` and the field."""
    choice = comp["choices"][0]
    content = (choice.get("logprobs") or {}).get("content")
    if not isinstance(content, list) or not content:
        raise InputError("missing required field (request logprobs=true)", file=file, line=line,
                         field="choices[0].logprobs.content")
    texts, lps = decode_tokens(content, file=file, line=line, where="choices[0].logprobs.content")
    message = choice.get("message") or {}
    text = "".join(texts)
    # A server's reasoning parser (vLLM, SGLang) moves the reasoning out of content into
    # reasoning_content (or reasoning); the log-probabilities then cover both, reasoning first.
    said = next((message[k] for k in ("reasoning_content", "reasoning")
                 if isinstance(message.get(k), str) and message[k]), None)
    c = message.get("content")
    reasoning_chars = None
    if said is not None and isinstance(c, str):
        if text != c and text.endswith(c) and said.strip() in text[:len(text) - len(c)]:
            reasoning_chars = len(text) - len(c)  # the reasoning, then the content
        elif said.strip() not in text:
            raise InputError("the log-probabilities do not cover the reasoning the server returned apart "
                             "(message.reasoning_content): ask the server for log-probabilities of the "
                             "reasoning too, or turn its reasoning parser off", file=file, line=line,
                             field="choices[0].logprobs.content")
    if reasoning_chars is None and isinstance(c, str) and c != text and "\ufffd" in text and not any(
            isinstance(tok, dict) and tok.get("bytes") for tok in content):
        # token strings without their bytes (llama.cpp's server): the pieces of a character split over
        # tokens come back as U+FFFD; the content says what they spell
        aligned = align_pieces(c, [tok.get("token") for tok in content])
        if aligned is not None and len(aligned) == len(texts):
            texts, text = aligned, c
    if reasoning_chars is None and isinstance(c, str) and c != text:
        k = next((j for j, (a, b) in enumerate(zip(text, c)) if a != b), min(len(text), len(c)))
        raise InputError(f"the logprob tokens do not concatenate to the message content: they "
                         f"differ at character {k} (tokens give {text[k:k + 20]!r}, content has "
                         f"{c[k:k + 20]!r})", file=file, line=line, field="choices[0].message.content")
    bench = rec.get("benchmark") or benchmark or Path(file).stem
    reasoning, ftoks, final, rule = _frontier_from_completion(
        texts, lps, file=file, line=line, where="choices[0].logprobs.content",
        checker=default_checker(bench), reasoning_chars=reasoning_chars)
    qid = rec.get("id") if comp is not rec else None   # a completion's own id is chatcmpl-...
    qid = qid or rec.get("custom_id") or f"{bench}-{index}"
    question = rec.get("question") if isinstance(rec.get("question"), str) else None
    if question is None:
        question = _question_from_messages(rec) or ""
    obj = {"id": qid, "benchmark": bench, "question": question, "reasoning": reasoning,
           "answer": answer_text(final),
           "frontier": {"model": model or comp.get("model") or "openai", "tokens": ftoks},
           "metadata": {"method": "imported", "format": "openai", "reasoning_span": rule, "source": source,
                        **(metadata or {})}}
    if comp is not rec:
        for k in ("label", "choices", "gold"):
            if k in rec:
                obj[k] = rec[k]
    return parse_trace(obj, file=file, line=line)


def import_openai(paths: Sequence[str | Path], *, benchmark: str | None = None,
                  model: str | None = None) -> list[Trace]:
    """Traces from OpenAI chat-completions output with logprobs (see the module docstring)."""
    traces: list[Trace] = []
    for path in map(Path, paths):
        records = read_records(path)
        if not records:
            raise InputError("file holds no records", file=path)
        for i, (line, rec) in enumerate(records):
            if not isinstance(rec, dict):
                raise InputError("a record must be a JSON object", file=path, line=line)
            comp = _completion_of(rec)
            if comp is None:
                raise InputError("no chat completion with logprobs in the record "
                                 "(expected choices[0].logprobs, or response.body.choices[0].logprobs)",
                                 file=path, line=line, field="choices[0].logprobs")
            traces.append(trace_from_completion(rec, comp, index=i, benchmark=benchmark, model=model, file=path,
                                                line=line, source=f"{path.name}:{line}"))
    return traces


# ---------------------------------------------------------------- per-token

def import_per_token(paths: Sequence[str | Path], *, options: dict[str, str] | None = None,
                     benchmark: str | None = None, model: str | None = None,
                     summary: dict[str, Any] | None = None) -> list[Trace]:
    """Traces from completions files plus per-token part files (see the module docstring)."""
    unknown = set(options or {}) - set(PER_TOKEN_FIELDS)
    if unknown:
        raise InputError(f"unknown per-token option(s) {sorted(unknown)}; known: {sorted(PER_TOKEN_FIELDS)}",
                         field="--option")
    f = {**PER_TOKEN_FIELDS, **(options or {})}
    tkey = f["token_key"] or f["key"]
    completions: list[tuple[Path, int, dict[str, Any]]] = []
    rows: dict[Any, list[tuple[Any, int, dict[str, Any], Path, int]]] = {}
    seq = 0
    for path in map(Path, paths):
        records = read_records(path)
        if not records:
            raise InputError("file holds no records", file=path)
        first = records[0][1]
        is_tokens = (isinstance(first, dict) and f["token"] in first and f["logprob"] in first
                     and f["reasoning"] not in first)
        for line, rec in records:
            if not isinstance(rec, dict):
                raise InputError("a row must be a JSON object", file=path, line=line)
            if not is_tokens:
                if f["key"] not in rec:
                    raise InputError("missing required field", file=path, line=line, field=f["key"])
                completions.append((path, line, rec))
                continue
            for name in (tkey, f["logprob"]):
                if name not in rec:
                    raise InputError("missing required field", file=path, line=line, field=name)
            if f["token"] not in rec and f["bytes"] not in rec:
                raise InputError("missing required field", file=path, line=line, field=f["token"])
            _check_logprob(rec[f["logprob"]], file=path, line=line, field=f["logprob"])
            key = _row_key(rec.get(f["token_benchmark"]), rec[tkey])
            pos = rec.get(f["position"])
            if pos is not None and (isinstance(pos, bool) or not isinstance(pos, int)):
                raise InputError("position must be an integer", file=path, line=line, field=f["position"])
            rows.setdefault(key, []).append((pos, seq, rec, path, line))
            seq += 1
    if not completions:
        raise InputError("no completions file among the inputs (a JSON array or JSONL of completions, "
                         f"each with a {f['key']!r} field)", file=str(paths[0]) if paths else None)
    if not rows:
        raise InputError(f"no token rows among the inputs (JSONL rows with {f['token']!r} and "
                         f"{f['logprob']!r} fields)", file=str(paths[0]))
    keyed_by_bench = any(isinstance(k, tuple) for k in rows)

    traces: list[Trace] = []
    used: set[Any] = set()
    skipped: list[str] = []
    seen_ids: dict[str, tuple[Path, int]] = {}
    for path, line, rec in completions:
        bench = rec.get(f["benchmark"]) or benchmark or path.stem
        key = _row_key(bench if keyed_by_bench else None, rec[f["key"]])
        if key in used:
            raise InputError(f"trace key {rec[f['key']]!r} appears twice among the completions; "
                             f"give token rows a {f['token_benchmark']!r} field or pass one benchmark "
                             "at a time", file=path, line=line, field=f["key"])
        used.add(key)
        group = rows.get(key)
        if not group:
            skipped.append(str(rec[f["key"]]))
            continue
        if any(g[0] is not None for g in group):
            if any(g[0] is None for g in group):
                _, _, _, p, ln = next(g for g in group if g[0] is None)
                raise InputError("some token rows of this trace have a position and some do not",
                                 file=p, line=ln, field=f["position"])
            group = sorted(group, key=lambda g: (g[0], g[1]))
        tok_dicts = [{"token": g[2].get(f["token"]), "logprob": g[2][f["logprob"]],
                      "bytes": g[2].get(f["bytes"])} for g in group]
        g0 = group[0]
        texts, lps = decode_tokens(tok_dicts, file=g0[3], line=g0[4], where=f"tokens of {rec[f['key']]!r}")
        reasoning = rec.get(f["reasoning"])
        final = rec.get(f["answer"])
        if isinstance(reasoning, str) and "".join(texts) == reasoning:
            ftoks = [{"text": t, "logprob": lp} for t, lp in zip(texts, lps)]
        else:
            found = find_reasoning("".join(texts))
            if found is None:
                if isinstance(reasoning, str):
                    raise InputError("the token texts neither concatenate to the reasoning nor hold a JSON "
                                     "object with it", file=path, line=line, field=f["reasoning"])
                raise InputError('the token texts hold no JSON object with a non-empty string "reasoning" '
                                 'and a "final_answer"', file=path, line=line, field=f["key"])
            chars, ends, fa = found
            if isinstance(reasoning, str) and "".join(chars) != reasoning:
                raise InputError("the reasoning inside the tokens differs from the completion's reasoning",
                                 file=path, line=line, field=f["reasoning"])
            reasoning = "".join(chars)
            ftoks = [t.model_dump() for t in reasoning_tokens(texts, lps, (chars, ends), digits=None)]
            if final is None:
                final = fa
        qid = str(rec[f["key"]])
        obj = {"id": qid, "benchmark": bench, "question": rec.get(f["question"]) or "",
               "reasoning": reasoning, "answer": answer_text(final),
               "frontier": {"model": model or rec.get(f["model"]) or "frontier", "tokens": ftoks},
               "metadata": {"method": "imported", "format": "per-token", "source": f"{path.name}:{line}"}}
        for name in ("label", "choices", "gold"):
            if rec.get(f[name]) is not None:
                obj[name] = rec[f[name]]
        trace = parse_trace(obj, file=path, line=line)
        if trace.id in seen_ids:
            trace.id = f"{bench}/{qid}"
        seen_ids[trace.id] = (path, line)
        traces.append(trace)
    orphans = [k for k in rows if k not in used]
    if orphans:
        _, _, _, p, ln = rows[orphans[0]][0]
        raise InputError(f"token rows for trace key {orphans[0]!r} match no completion", file=p, line=ln,
                         field=tkey)
    if summary is not None:
        summary["skipped_no_tokens"] = skipped
    return traces


def _row_key(bench: Any, key: Any) -> Any:
    return (str(bench), str(key)) if bench is not None else str(key)


# ---------------------------------------------------------------- rbridge

def import_rbridge(paths: Sequence[str | Path]) -> list[Trace]:
    """Validate rbridge JSONL files line by line and merge them (ids unique over all files)."""
    traces: list[Trace] = []
    seen: dict[str, tuple[Path, int]] = {}
    for path in map(Path, paths):
        text = _read_text(path)
        n = 0
        for lineno, obj in json_object_lines(path, text, "each trace"):
            t = parse_trace(obj, file=path, line=lineno)
            if t.id in seen:
                p, ln = seen[t.id]
                raise InputError(f"duplicate id {t.id!r} (first in {p}:{ln})", file=path, line=lineno, field="id")
            seen[t.id] = (path, lineno)
            traces.append(t)
            n += 1
        if n == 0:
            raise InputError("traces file holds no traces", file=path)
    return traces


# ---------------------------------------------------------------- entry point

def import_traces(fmt: str, paths: Sequence[str | Path], out: str | Path, *,
                  options: dict[str, str] | None = None, benchmark: str | None = None,
                  model: str | None = None) -> dict[str, Any]:
    """``rbridge traces import``: convert ``paths`` in format ``fmt`` and write rbridge JSONL to ``out``."""
    check_out_path(out)  # before reading anything
    if not paths:
        raise InputError("no input files", field="FILE")
    summary: dict[str, Any] = {}
    if fmt == "openai":
        traces = import_openai(paths, benchmark=benchmark, model=model)
    elif fmt == "per-token":
        traces = import_per_token(paths, options=options, benchmark=benchmark, model=model, summary=summary)
    elif fmt == "rbridge":
        traces = import_rbridge(paths)
    else:
        raise InputError(f"format must be one of {FORMATS}, not {fmt!r}", field="--format")
    if not traces:
        raise InputError("no traces to write", file=out)
    ids: dict[str, int] = {}
    for t in traces:
        if t.id in ids:
            raise InputError(f"two imported traces share the id {t.id!r}", field="id")
        ids[t.id] = 1
    write_traces(out, traces)
    benches: dict[str, int] = {}
    for t in traces:
        benches[t.benchmark] = benches.get(t.benchmark, 0) + 1
    return {"written": len(traces), "benchmarks": benches, "out": str(out),
            "frontier_tokens": sum(len(t.frontier.tokens) for t in traces), **summary}
