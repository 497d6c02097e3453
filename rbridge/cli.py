"""The ``rbridge`` command: thin click wrappers over library functions.

The group, consoles and error guard live in rbridge.commands._base; each module
of rbridge.commands registers its commands on that group when imported, and this
module tells the group which module holds which command (it imports the one a
command line needs). Nothing imports this module but the entry point.

Exit codes: 0 success, 2 bad input (one message naming the file, line or field),
1 anything else. Set RBRIDGE_DEBUG=1 for tracebacks.
"""

from __future__ import annotations

from rbridge.commands._base import console, err_console, guard, main

# Each command module registers its commands on ``main`` when imported; ``main`` imports
# the module of the command that runs (all of them to list them): a read command does not
# pay for the imports of the others.
main.every_module = ("rbridge.commands.plan", "rbridge.commands.score", "rbridge.commands.analysis",
                     "rbridge.commands.launch", "rbridge.commands.mixtures")
main.modules = {
    **dict.fromkeys(("validate", "plan", "resume", "worker", "status", "clean", "presets"), "rbridge.commands.plan"),
    **dict.fromkeys(("score", "traces"), "rbridge.commands.score"),
    **dict.fromkeys(("targets", "results", "fit", "predict", "accuracy", "report"), "rbridge.commands.analysis"),
    "launch": "rbridge.commands.launch",
    "mixtures": "rbridge.commands.mixtures",
}

__all__ = ["main", "console", "err_console", "guard"]

if __name__ == "__main__":  # pragma: no cover
    main()
