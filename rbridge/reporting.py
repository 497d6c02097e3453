"""How library code tells its caller what it is doing, without printing.

The planner and the data preparation report through a ``Reporter``: one line
of news (``say``) or a unit of work with a progress count (``progress``). This
base class does nothing, so library calls are silent by default; the CLI passes
a reporter that prints with rich (rbridge.commands._base.RichReporter), and a
notebook or a service can pass its own. A leaf module: it imports nothing.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator


def si(n: float) -> str:
    """1234567 -> '1.2M': compact counts for tables and messages."""
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.1f}{unit}"
    return f"{n:.0f}"


class Progress:
    """A running unit of work; ``update`` may be called as often as the work likes."""

    def update(self, completed: int, total: int | None = None, note: str | None = None) -> None:
        """``completed`` of ``total`` units; ``note``: a short text shown beside the bar (bytes read)."""


class Reporter:
    """Silent. Subclass and override ``say`` and ``progress`` to show news and progress."""

    #: Whether live progress bars are worth drawing (a terminal); callers may skip progress otherwise.
    live: bool = False

    def say(self, text: str) -> None:
        """One line of news, with rich markup (``[bold]...[/]``) that a plain reporter may strip."""

    @contextmanager
    def progress(self, description: str, total: int, completed: int = 0) -> Iterator[Progress]:
        yield Progress()


SILENT = Reporter()
