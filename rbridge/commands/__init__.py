"""CLI command groups beyond the core plan commands, each registered on ``rbridge.cli.main``.

Each module defines click commands with ``@main.command()`` (importing ``main``,
``console`` and ``guard`` from ``rbridge.cli``); ``rbridge.cli`` imports them at
its end so they register. Keep them thin: parse arguments, call library code.
"""
