"""Errors the CLI turns into one clear message and exit code 2."""

from __future__ import annotations

from pathlib import Path


class InputError(Exception):
    """Bad user input: a spec, a traces file, a CSV, an argument, a foreign store.

    The message names the file and, where known, the line or the field path.
    The CLI prints ``str(error)`` and exits with code 2; nothing in the store
    may have been changed before this is raised.
    """

    def __init__(self, message: str, *, file: str | Path | None = None,
                 line: int | None = None, field: str | None = None):
        self.file = str(file) if file is not None else None
        self.line = line
        self.field = field
        self.message = message
        super().__init__(self._format())

    def _format(self) -> str:
        where = ""
        if self.file:
            where = self.file
            if self.line is not None:
                where += f":{self.line}"
        if self.field:
            where = f"{where}: {self.field}" if where else self.field
        return f"{where}: {self.message}" if where else self.message


class StoreBusy(Exception):
    """Another live process is running a plan on this store (the CLI exits 1)."""


class FieldError(ValueError):
    """A validation error that knows its field path, relative to the model that raised it.

    Raised inside pydantic validators; ``rbridge.spec`` joins ``loc`` to the path of
    the model being validated (``stages[1].proxy`` + ``("preset",)``) and finds the line.
    """

    def __init__(self, loc: tuple, message: str):
        self.loc = tuple(loc)
        super().__init__(message)
