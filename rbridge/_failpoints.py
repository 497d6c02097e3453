"""Fail points: named places where a test can make the process die on purpose.

``RBRIDGE_FAILPOINT=name[:n]`` makes the n-th pass (default the first) through
``failpoint(name)`` SIGKILL the process, so crash-and-resume tests hit each phase
(mid-step, mid-checkpoint, mid-transaction, ...) exactly, instead of racing a
timer. Unset, a fail point costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

_passes: dict[str, int] = {}


def failpoint(name: str) -> None:
    spec = os.environ.get("RBRIDGE_FAILPOINT")
    if not spec:
        return
    want, _, nth = spec.partition(":")
    if want != name:
        return
    _passes[name] = _passes.get(name, 0) + 1
    if _passes[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def raise_point(name: str, key: str) -> None:
    """``RBRIDGE_RAISE=name:key`` makes this place raise RuntimeError every time for that key (e.g.
    ``train:filter/cot``: a run whose training always fails), for the failed-run tests."""
    if os.environ.get("RBRIDGE_RAISE") == f"{name}:{key}":
        raise RuntimeError(f"injected failure ({name} of {key}, RBRIDGE_RAISE)")
