"""`rbridge targets|results import`, `rbridge fit`, `rbridge predict` (issue 5 fills these in)."""

from rbridge.cli import main  # noqa: F401
