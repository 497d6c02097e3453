"""The SQLite stores this user's plans created, by plan name: ``<cache>/stores.json``.

Relative paths in a spec are relative to the spec's folder; the default store,
``stores/<plan name>.db``, is relative to the folder the command runs in (as a build
folder is), so one spec can run as separate plans from separate folders. The same
spec run from another folder therefore starts a new store and trains everything
again: ``rbridge plan`` looks here first and, when it is about to create a store
while another store of the same plan name exists, says so before anything trains,
with the ``--store`` that continues the other one. Each entry: the store's absolute
path, the spec it ran and when. A missing or unreadable file means no entries
(it is a convenience, never a source of truth).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

FILE = "stores.json"
MAX_PER_PLAN = 20


def _path() -> Path:
    from rbridge.data._cache import default_cache_dir

    return default_cache_dir() / FILE


def _read() -> dict[str, list[dict]]:
    try:
        data = json.loads(_path().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def others(plan_name: str, store: Path) -> list[dict]:
    """Other existing stores recorded for ``plan_name`` (newest first), not ``store`` itself."""
    me = str(store.resolve())
    found = [e for e in _read().get(plan_name, []) if isinstance(e, dict) and e.get("store") != me
             and Path(str(e.get("store", ""))).is_file()]
    return sorted(found, key=lambda e: -float(e.get("at", 0)))


def record(plan_name: str, store: Path, spec_path: Path | None) -> None:
    """Remember that ``store`` holds ``plan_name`` (best effort: a read-only cache is not an error)."""
    data = _read()
    me = str(store.resolve())
    entries = [e for e in data.get(plan_name, []) if isinstance(e, dict) and e.get("store") != me]
    entries.insert(0, {"store": me, "spec": str(spec_path.resolve()) if spec_path else "", "at": time.time()})
    data[plan_name] = entries[:MAX_PER_PLAN]
    path = _path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{FILE}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass
