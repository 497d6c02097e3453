"""The ``rbridge`` command: thin click wrappers over library functions.

The group, consoles and error guard live in rbridge.commands._base; each module
of rbridge.commands registers its commands on that group when imported, and this
module imports them all. Nothing imports this module but the entry point.

Exit codes: 0 success, 2 bad input (one message naming the file, line or field),
1 anything else. Set RBRIDGE_DEBUG=1 for tracebacks.
"""

from __future__ import annotations

from rbridge.commands import analysis as _analysis  # noqa: F401 - registers its commands
from rbridge.commands import plan as _plan  # noqa: F401
from rbridge.commands import score as _score  # noqa: F401
from rbridge.commands._base import console, err_console, guard, main

__all__ = ["main", "console", "err_console", "guard"]

if __name__ == "__main__":  # pragma: no cover
    main()
