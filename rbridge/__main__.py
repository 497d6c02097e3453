"""`python -m rbridge` runs the CLI."""

from rbridge.cli import main

main()
