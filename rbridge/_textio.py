"""Reading user files: one place for the messages every reader gives on bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from rbridge.errors import InputError


def read_text(path: str | Path, what: str = "file", encoding: str = "utf-8") -> str:
    """The text of a user's file, or an InputError naming it ("traces file not found", ...)."""
    path = Path(path)
    try:
        return path.read_text(encoding=encoding)
    except FileNotFoundError:
        raise InputError(f"{what} not found", file=path) from None
    except UnicodeDecodeError as e:
        raise InputError(f"not UTF-8 text ({e.reason} at byte {e.start})", file=path) from None
    except OSError as e:
        raise InputError(f"cannot read {what}: {e.strerror or e}", file=path) from None


def json_object_lines(path: str | Path, text: str, what: str = "each line") -> Iterator[tuple[int, dict[str, Any]]]:
    """(1-based line number, object) for every non-blank line of JSON-lines ``text``."""
    for lineno, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise InputError(f"not valid JSON: {e.msg} at column {e.colno}", file=path, line=lineno) from None
        if not isinstance(obj, dict):
            raise InputError(f"{what} must be a JSON object", file=path, line=lineno)
        yield lineno, obj
