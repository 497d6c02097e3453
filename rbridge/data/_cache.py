"""Cache plumbing shared by the data modules: the cache root, content keys,
and publishing a finished cache entry atomically.

Every cache entry is a directory ``<cache_dir>/<kind>/<key>/`` holding data
files and a ``manifest.json``. An entry is built in a private temporary
directory next to it, the manifest is written last, and the directory is then
renamed into place, so a crash mid-write leaves only a stray temporary
directory, never a half entry that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

# Bump when the bytes a cache entry holds would change for the same inputs
# (document splitting, held-out rule, shard layout, window selection ...).
DATA_FORMAT_VERSION = 2

MANIFEST = "manifest.json"


def default_cache_dir() -> Path:
    """The cache root: ``$RBRIDGE_CACHE`` if set, else ``~/.cache/rbridge``."""
    env = os.environ.get("RBRIDGE_CACHE")
    return Path(env).expanduser() if env else Path("~/.cache/rbridge").expanduser()


def content_key(payload: Any, length: int = 20) -> str:
    """A short stable hex key for a JSON-serialisable payload."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


def read_manifest(entry: Path) -> dict | None:
    """The manifest of a complete cache entry, or None when it is absent or unreadable."""
    try:
        with open(entry / MANIFEST, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def new_entry_dir(root: Path, key: str) -> Path:
    """A fresh private directory in ``root`` to build the entry ``key`` in."""
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=root))


def publish_entry(tmp: Path, final: Path, manifest: dict) -> Path:
    """Write ``manifest`` into ``tmp`` (atomically, last), then move ``tmp`` to ``final``.

    If ``final`` already holds a complete entry (another process won the race),
    ours is discarded and theirs is kept. An incomplete ``final`` (no manifest)
    is replaced.
    """
    part = tmp / (MANIFEST + ".part")
    with open(part, "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(part, tmp / MANIFEST)
    if final.exists():
        if read_manifest(final) is not None:
            shutil.rmtree(tmp, ignore_errors=True)
            return final
        shutil.rmtree(final, ignore_errors=True)
    try:
        os.replace(tmp, final)
    except OSError:
        # Lost a race to a concurrent writer that published in between.
        if read_manifest(final) is None:
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def discard_entry(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
