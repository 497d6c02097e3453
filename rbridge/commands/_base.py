"""What every command module shares: the click group, the consoles, the error guard, a rich reporter.

Command modules (rbridge.commands.*) import this module, never rbridge.cli;
rbridge.cli imports the command modules so that they register on ``main``.

Exit codes: 0 success, 2 bad input (one message naming the file, line or field),
1 anything else. Set RBRIDGE_DEBUG=1 for tracebacks.
"""

from __future__ import annotations

import functools
import os
import sys
from contextlib import contextmanager
from typing import Iterator

import click
from rich.console import Console
from rich.markup import escape

from rbridge.errors import InputError, StoreBusy
from rbridge.reporting import Progress, Reporter

# Piped output (CI logs, files) gets wide tables instead of rich's 80-column default.
console = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, highlight=False)


def guard(fn):
    """Turn InputError into exit 2 and other failures into exit 1, each with one clear line."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except InputError as exc:
            err_console.print(f"[red]error:[/] {escape(str(exc))}", markup=True, highlight=False, soft_wrap=True)
            sys.exit(2)
        except StoreBusy as exc:
            err_console.print(f"[red]busy:[/] {escape(str(exc))}", soft_wrap=True)
            sys.exit(1)
        except (click.exceptions.Exit, click.ClickException, SystemExit, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence
            if os.environ.get("RBRIDGE_DEBUG"):
                raise
            err_console.print(f"[red]failed:[/] {type(exc).__name__}: {escape(str(exc))}  "
                              "(RBRIDGE_DEBUG=1 for a traceback)",
                              soft_wrap=True)
            sys.exit(1)

    return wrapper


class _LazyGroup(click.Group):
    """The rbridge group: a command's module is imported when that command runs.

    rbridge.cli names the module of each command (``modules``); `rbridge accuracy`
    then imports rbridge.commands.analysis alone, not what `rbridge score` and
    `rbridge plan` need (pydantic, the spec models): a read command answers in a
    fraction of a second. Listing the commands (``--help``) imports every module, and
    so does a name no module is known for, so a command is never missed.
    """

    modules: dict[str, str] = {}  # command name -> module registering it on this group
    every_module: tuple[str, ...] = ()

    def _load(self, module: str) -> None:
        import importlib

        importlib.import_module(module)

    def list_commands(self, ctx: click.Context) -> list[str]:
        for module in self.every_module:
            self._load(module)
        return super().list_commands(ctx)

    def main(self, *args, **kwargs):
        try:
            return super().main(*args, **kwargs)  # exits through SystemExit
        finally:
            # The work is done and every store closed. Freezing the objects left spares the
            # interpreter's last garbage collections over them: with torch and transformers
            # loaded, the process then ends about 0.2 s after its last line instead of 1.5 s (CPython's gc.freeze;
            # every local worker of a plan, and the plan itself, end that much sooner).
            import gc

            gc.freeze()

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.commands:
            for module in ([self.modules[name]] if name in self.modules else self.every_module):
                self._load(module)
        return super().get_command(ctx, name)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="rbridge")
def main() -> None:
    """rbridge: choose pre-training data for reasoning models with tiny proxies scored by rBridge."""



class RichReporter(Reporter):
    """The CLI's reporter: news lines on the console, live progress bars on a terminal only
    (logs and pipes get the one line per rung the planner reports)."""

    def __init__(self, out: Console):
        self.console = out
        self.live = bool(out.is_terminal)

    def say(self, text: str) -> None:
        self.console.print(text)

    @contextmanager
    def progress(self, description: str, total: int, completed: int = 0) -> Iterator[Progress]:
        if not self.live:
            yield Progress()
            return
        from rich.progress import BarColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
        from rich.progress import Progress as Bars

        with Bars(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed:,}/{task.total:,}"),
                  TextColumn("{task.fields[note]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                  console=self.console, transient=True) as bars:
            task = bars.add_task(description, total=total, completed=completed, note="")

            class _Bar(Progress):
                def update(self, done: int, total: int | None = None, note: str | None = None) -> None:
                    extra = {"total": total} if total is not None else {}
                    if note is not None:
                        extra["note"] = note
                    bars.update(task, completed=done, **extra)

            yield _Bar()


def store_or_latest(store: str | None) -> str:
    """The --store given, else the most recently written store under ./stores."""
    from rbridge.store import latest_store

    if store is not None:
        return store
    found = latest_store("stores")
    if found is None:
        raise InputError("no store found under stores/; pass --store", file="stores/")
    return str(found)


def open_for_reading(store: str):
    """The store for a command that only reads (``status``, ``accuracy``).

    A SQLite file of this rbridge's schema is read with sqlite3 alone
    (rbridge.store.sqlite_read): importing SQLAlchemy and SQLModel would take half a
    second, longer than the reads. Anything else (PostgreSQL, an older schema to
    upgrade first) opens as ``open_store(..., read_only=True)``. Both answer
    ``query``, ``rows``, ``reading`` and ``close``; neither changes the store.
    """
    from rbridge.store.sqlite_read import open_reader

    reader = open_reader(store)
    if reader is not None:
        return reader
    from rbridge.store import open_store

    return open_store(store, create=False, read_only=True)


