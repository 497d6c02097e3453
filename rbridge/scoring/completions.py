"""Read a frontier model's completion: the reasoning span inside its JSON, and the token of each character.

Shared by trace generation (``generate.py``) and the importers
(``importers.py``), which meet the same problem: a completion is a stream of
tokens with a logprob each, the paper's prompt makes it a JSON object
``{"reasoning": ..., "final_answer": ...}``, and a trace needs the frontier
tokens over exactly the reasoning text.

- :func:`stream_texts` / :func:`split_by_offsets`: the text each token adds.
- :func:`find_reasoning`: the first JSON object with a non-empty string
  ``reasoning`` and a ``final_answer``; JSON escapes (``\\n \\t \\" \\\\ \\/
  \\b \\f \\r \\uXXXX``, surrogate pairs included) are mapped back to
  characters, keeping each character's raw end position. The prompt's
  placeholder "your step by step reasoning" copied back is malformed.
- :func:`reasoning_tokens`: frontier tokens over exactly the reasoning.
- :func:`answer_text`: the trace's ``answer`` text from a ``final_answer`` value.

Which token a character belongs to: a reasoning character belongs to the token
that *completes* it -- for a character whose UTF-8 bytes span several tokens,
the token holding its last byte; for a JSON escape split over tokens
(``\\`` | ``n``), the token holding the escape's last character. Tokens that
complete no reasoning character (the partial ones, the JSON wrapper) are left
out, so the token texts concatenate exactly to the reasoning.
"""

from __future__ import annotations

import bisect
import json
import re
from collections.abc import Sequence
from typing import Any

from rbridge.scoring.traces import FrontierToken

# The paper's instruction after the question (METHOD.md section 3), and its template reasoning.
INSTRUCTION = ('\nRespond ONLY with a JSON object in this exact format: '
               '{ "reasoning": "your step by step reasoning", "final_answer": "your final answer" }')
PLACEHOLDER = "your step by step reasoning"   # small models copy the template; that is malformed


def stream_texts(tokenizer, ids: Sequence[int]) -> list[str]:
    """Text each token adds to the decoded stream (completing-token rule).

    Decodes growing prefixes; a trailing U+FFFD (an incomplete UTF-8
    character) is held back until the token that completes it.
    """
    texts, emitted = [], ""
    for i in range(len(ids)):
        full = tokenizer.decode(list(ids[:i + 1]), skip_special_tokens=False,
                                clean_up_tokenization_spaces=False)
        stable = full if i == len(ids) - 1 else full.rstrip("\ufffd")
        if not stable.startswith(emitted):
            raise ValueError("the tokenizer does not decode incrementally; cannot align tokens")
        texts.append(stable[len(emitted):])
        emitted = stable
    return texts


def split_by_offsets(text: str, offsets: Sequence[tuple[int, int]]) -> list[str]:
    """Partition ``text`` among tokens given character offsets (completing-token rule).

    A character belongs to the last token whose span holds it (byte-level
    tokens that split a character all report it); characters no token covers
    go to the next token (the last one at the end). The pieces concatenate to
    ``text``.
    """
    n = len(text)
    if not offsets:
        raise ValueError("no tokens")
    owner = [-1] * n
    for i, (s, e) in enumerate(offsets):
        for c in range(max(0, s), min(n, e)):
            owner[c] = i
    nxt = len(offsets) - 1
    for c in range(n - 1, -1, -1):
        if owner[c] < 0:
            owner[c] = nxt
        else:
            nxt = owner[c]
    pieces = [[] for _ in offsets]
    running = 0
    for c in range(n):
        running = max(running, owner[c])   # keep pieces contiguous
        pieces[running].append(text[c])
    return ["".join(p) for p in pieces]


_SIMPLE_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_WS = " \t\n\r"


def _scan_string(text: str, i: int) -> tuple[list[str], list[int], int]:
    """Scan the JSON string starting at ``text[i] == '"'``.

    Returns decoded characters, for each the raw index one past its escape,
    and the index after the closing quote. Raises ValueError when malformed.
    """
    if text[i] != '"':
        raise ValueError("expected a string")
    chars: list[str] = []
    ends: list[int] = []
    j = i + 1
    while True:
        if j >= len(text):
            raise ValueError("unterminated string")
        c = text[j]
        if c == '"':
            return chars, ends, j + 1
        if c == "\\":
            e = text[j + 1:j + 2]
            if e in _SIMPLE_ESCAPES:
                chars.append(_SIMPLE_ESCAPES[e])
                j += 2
            elif e == "u":
                code = int(text[j + 2:j + 6], 16) if re.fullmatch(r"[0-9a-fA-F]{4}", text[j + 2:j + 6]) else None
                if code is None:
                    raise ValueError("bad \\u escape")
                j += 6
                if 0xD800 <= code < 0xDC00 and text[j:j + 2] == "\\u" \
                        and re.fullmatch(r"[0-9a-fA-F]{4}", text[j + 2:j + 6]):
                    low = int(text[j + 2:j + 6], 16)
                    if 0xDC00 <= low < 0xE000:
                        code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)
                        j += 6
                if 0xD800 <= code < 0xE000:
                    raise ValueError("lone surrogate in \\u escape")
                chars.append(chr(code))
            else:
                raise ValueError("bad escape")
            ends.append(j)
        else:
            if ord(c) < 0x20:
                raise ValueError("control character in string")
            chars.append(c)
            j += 1
            ends.append(j)


def find_reasoning(text: str) -> tuple[list[str], list[int], Any] | None:
    """Locate the first JSON object in ``text`` with a string ``reasoning`` and a ``final_answer``.

    Returns (reasoning characters, raw end index of each, final_answer value),
    or None when the output is malformed: no such object, an empty reasoning,
    or the prompt's placeholder "your step by step reasoning" copied back.
    """
    decoder = json.JSONDecoder()
    for m in re.finditer(r"\{", text):
        try:
            obj, _ = decoder.raw_decode(text, m.start())
        except json.JSONDecodeError:
            continue
        if not (isinstance(obj, dict) and isinstance(obj.get("reasoning"), str)
                and "final_answer" in obj and obj["reasoning"].strip()
                and obj["reasoning"].strip().lower() != PLACEHOLDER):
            continue
        # Walk the object again, keeping raw positions of the reasoning value.
        found = None
        j = m.start() + 1
        try:
            while True:
                while text[j] in _WS:
                    j += 1
                if text[j] == "}":
                    break
                key_chars, _, j = _scan_string(text, j)
                while text[j] in _WS:
                    j += 1
                j += 1  # ':'
                while text[j] in _WS:
                    j += 1
                if "".join(key_chars) == "reasoning" and text[j] == '"':
                    chars, ends, j = _scan_string(text, j)
                    found = (chars, ends)   # the last duplicate wins, as in json.loads
                else:
                    _, j = decoder.raw_decode(text, j)
                while text[j] in _WS:
                    j += 1
                if text[j] == ",":
                    j += 1
        except (ValueError, IndexError):
            continue
        if found is None or "".join(found[0]) != obj["reasoning"]:
            continue
        return found[0], found[1], obj["final_answer"]
    return None


def _clean_logprob(lp: float, digits: int | None = 6) -> float:
    v = min(0.0, float(lp))
    if digits is not None:
        v = round(v, digits)
    return 0.0 if v == 0 else v


def reasoning_tokens(token_texts: Sequence[str], logprobs: Sequence[float],
                     reasoning: tuple[list[str], list[int]], *,
                     digits: int | None = 6) -> list[FrontierToken]:
    """Frontier tokens over exactly the reasoning, from a tokenized completion.

    ``token_texts`` partition the completion text; ``reasoning`` is what
    :func:`find_reasoning` returned (characters and raw end indices).
    ``digits``: logprobs are rounded to this many decimals (None: kept exact,
    as importers do); either way they are clamped to <= 0.
    """
    starts, pos = [], 0
    for t in token_texts:
        starts.append(pos)
        pos += len(t)
    chars, ends = reasoning
    out: list[FrontierToken] = []
    cur_tok, cur_text = None, []
    for ch, end in zip(chars, ends):
        tok = bisect.bisect_right(starts, end - 1) - 1
        while tok > 0 and len(token_texts[tok]) == 0:   # empty pieces complete nothing
            tok -= 1
        if tok != cur_tok and cur_text:
            out.append(FrontierToken(text="".join(cur_text), logprob=_clean_logprob(logprobs[cur_tok], digits)))
            cur_text = []
        cur_tok = tok
        cur_text.append(ch)
    if cur_text:
        out.append(FrontierToken(text="".join(cur_text), logprob=_clean_logprob(logprobs[cur_tok], digits)))
    return out



def answer_text(value: Any, *, null: str = "") -> str:
    """The ``answer`` text of a trace from a completion's ``final_answer`` value.

    Strings are kept; numbers, lists and objects become their JSON text. A JSON
    ``null`` (no answer) becomes ``null`` -- the empty string by default (the
    importers); ``rbridge traces generate`` passes ``null="null"``, the text it
    has always written, so its files stay byte for byte as they were.
    """
    if value is None:
        return null
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def align_pieces(text: str, toks: list) -> list[str] | None:
    """Token texts that partition ``text``, from the token strings a server returned without their bytes (tokens
    past the end of ``text``, such as one generated after an echoed prompt, are left out), or None when the
    tokens do not spell it. Servers decode each token alone, so the pieces of a
    character split over several tokens come back as U+FFFD: such a run of tokens covers the text up to
    where the next token matches, and its characters go to the run's last token (the one that completes
    them, as everywhere in rbridge), the others get empty texts. ``text_offset`` is not used: servers count
    it over those replacement characters."""
    if not all(isinstance(t, str) for t in toks):
        return None
    out: list[str] = []
    pos, i = 0, 0
    while i < len(toks) and pos < len(text):
        t = toks[i]
        if text.startswith(t, pos) and t:
            out.append(t)
            pos += len(t)
            i += 1
            continue
        if "\ufffd" not in t:
            return None
        j = i
        while j < len(toks) and "\ufffd" in toks[j] and not text.startswith(toks[j], pos):
            j += 1
        if j == len(toks):
            q = len(text)
        else:
            q = next((k for k in range(pos + 1, len(text) + 1) if text.startswith(toks[j], k)), -1)
            if q < 0:
                return None
        out += [""] * (j - i - 1) + [text[pos:q]]
        pos, i = q, j
    return out if pos == len(text) else None
