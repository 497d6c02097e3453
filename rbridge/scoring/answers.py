"""Final answers in free text (torch-free: the trace importers use it, so do the task checkers).

``last_number``: the GSM8K checker's rule (the last number, commas as thousands separators).
``free_text_answer``: the answer of a completion written as free text (no JSON), for
``rbridge traces import``: the text after the last ``####`` (GSM8K's own marker), else the
content of the last ``\\boxed{...}`` (MATH-style), else, for a benchmark with a number
checker, the last number in the text as written, else nothing.
"""

from __future__ import annotations

import re

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_BOXED = re.compile(r"\\boxed\{")


def last_number(text: str) -> float | None:
    """The last number in ``text`` (commas as thousands separators), or None."""
    found = NUMBER.findall(text or "")
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def _last_boxed(text: str) -> str | None:
    starts = [m.end() for m in _BOXED.finditer(text)]
    if not starts:
        return None
    i, depth = starts[-1], 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j].strip()
    return None


def free_text_answer(text: str, checker: str | None) -> str:
    """The final answer stated in a free-text completion ("" when none is found)."""
    if "####" in text:
        return text.rpartition("####")[2].strip().splitlines()[0].strip() if text.rpartition("####")[2].strip() \
            else ""
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    if checker == "number":
        found = NUMBER.findall(text)
        return found[-1] if found else ""
    return ""
