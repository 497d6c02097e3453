"""`rbridge score` and `rbridge traces ...` (issue 3 fills these in)."""

from rbridge.cli import main  # noqa: F401
