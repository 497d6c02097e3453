"""Disk use of folders (no rbridge imports: status, the report and the planner's disk rules use it)."""

from __future__ import annotations

import os
from pathlib import Path


def folder_bytes(path: str | Path) -> int:
    """Bytes of the files under ``path`` (0 when it does not exist); hard links counted once."""
    total, seen = 0, set()
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                st = os.lstat(os.path.join(root, f))
            except OSError:  # removed while we walked
                continue
            key = (st.st_dev, st.st_ino)
            if key not in seen:
                seen.add(key)
                total += st.st_size
    return total


def human_bytes(n: float) -> str:
    for unit, div in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n:.0f} B"
