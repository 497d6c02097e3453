"""A polite stop: SIGTERM or SIGINT asks a plan or worker to stop at its next training step.

The CLI installs ``polite_signals`` around ``rbridge plan`` and ``rbridge worker``.
The first signal only sets a flag; the training loop checks it after every step,
writes a checkpoint, gives the run back (pending, for a resume or another worker)
and raises ``Stopped``, which the CLI turns into exit 143 (SIGTERM) or 130 (SIGINT),
the shells' convention. A second Ctrl-C interrupts at once. Resuming continues from
that checkpoint and ends with the scores of an uninterrupted plan.
"""

from __future__ import annotations

import signal
from contextlib import contextmanager
from typing import Iterator

_requested: int | None = None


class Stopped(BaseException):
    """Raised where a stop was asked for; a BaseException, so no ``except Exception`` treats it as a failure."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def request(signum: int, _frame=None) -> None:
    global _requested
    if _requested is not None and signum == signal.SIGINT:
        raise KeyboardInterrupt  # a second Ctrl-C: now
    _requested = signum


def check() -> None:
    """Raise Stopped if a stop was asked for."""
    if _requested is not None:
        raise Stopped(_requested)


@contextmanager
def polite_signals() -> Iterator[None]:
    """SIGTERM and SIGINT ask for a stop while the block runs (main thread only)."""
    global _requested
    _requested = None
    old = {s: signal.signal(s, request) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        _requested = None
