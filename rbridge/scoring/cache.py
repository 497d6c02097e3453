"""A small SQLite cache of ``rbridge score`` results, keyed by (model, traces, options).

File: ``<cache dir>/score_cache.sqlite`` (``rbridge.data.default_cache_dir()``:
``$RBRIDGE_CACHE`` or ``~/.cache/rbridge``), one table::

    score_cache(key TEXT PRIMARY KEY, model_fp TEXT, traces_fp TEXT, options TEXT,
                result TEXT, created TEXT)

- model fingerprint: sha256 over the model's files (name, size, mtime in ns)
  and the full text of every small JSON file (config, tokenizer files); a
  ``.gguf`` file: its name, size and mtime. Rewriting a checkpoint in place
  changes its mtime and so the key.
- traces fingerprint: sha256 of the traces file's bytes.
- options: every option that can change a number (context, minmax, aggregate,
  precision, fewshot_k, max_length, baselines, accuracy settings, the device
  type, the rbridge version), as sorted JSON. The batch size is not part of it.

``result`` is the JSON document ``rbridge score --json`` prints. The cache is
best effort: an unreadable or locked cache file is ignored, never an error.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import sqlite3
from pathlib import Path
from typing import Any

_SCHEMA = ("CREATE TABLE IF NOT EXISTS score_cache (key TEXT PRIMARY KEY, model_fp TEXT NOT NULL, "
           "traces_fp TEXT NOT NULL, options TEXT NOT NULL, result TEXT NOT NULL, created TEXT NOT NULL)")


def cache_path() -> Path:
    from rbridge.data import default_cache_dir

    return default_cache_dir() / "score_cache.sqlite"


def model_fingerprint(path: str | Path) -> str:
    path = Path(path).resolve()
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for p in files:
        st = p.stat()
        rel = p.name if p == path else p.relative_to(path).as_posix()
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        if p.suffix == ".json" and st.st_size < 20_000_000:
            h.update(p.read_bytes())
    return h.hexdigest()


def traces_fingerprint(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def cache_key(model_fp: str, traces_fp: str, options: dict[str, Any]) -> tuple[str, str]:
    opts = json.dumps(options, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(f"{model_fp}\0{traces_fp}\0{opts}".encode()).hexdigest(), opts


def _connect(path: Path | None) -> sqlite3.Connection:
    path = path or cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(str(path), timeout=5)
    con.execute(_SCHEMA)
    return con


def get(key: str, path: Path | None = None) -> dict[str, Any] | None:
    try:
        con = _connect(path)
        try:
            row = con.execute("SELECT result FROM score_cache WHERE key = ?", (key,)).fetchone()
        finally:
            con.close()
        return json.loads(row[0]) if row else None
    except (sqlite3.Error, OSError, ValueError):
        return None


def put(key: str, model_fp: str, traces_fp: str, options: str, result: dict[str, Any],
        path: Path | None = None) -> bool:
    try:
        con = _connect(path)
        try:
            with con:
                con.execute("INSERT OR REPLACE INTO score_cache VALUES (?, ?, ?, ?, ?, ?)",
                            (key, model_fp, traces_fp, options, json.dumps(result),
                             _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")))
        finally:
            con.close()
        return True
    except (sqlite3.Error, OSError):
        return False
