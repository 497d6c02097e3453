"""The CLI's commands, one module per group of commands, each registered on ``_base.main``.

Each module defines click commands with ``@main.command()``, importing ``main``,
``console`` and ``guard`` from ``rbridge.commands._base`` (never from rbridge.cli,
which imports these modules). Keep them thin: parse arguments, call library code.
"""
