"""Mixtures as {source: weight}: checked, normalised, and read from a mixtures CSV.

Every mixture is keyed by source name. Vectors exist only inside a fit, in the order of
:func:`source_order` (sorted names), so a file with its columns in another order gives the same
mixtures, fits, predictions and proposals.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from rbridge._textio import read_text
from rbridge.errors import InputError

SUM_TOLERANCE = 0.02  # weights written with 3 decimals (RegMix's files) sum to 0.999..1.001


def source_order(mixtures: Sequence[Mapping[str, float]]) -> list[str]:
    """Every source any mixture names, sorted: the one column order of all vectors."""
    return sorted({s for m in mixtures for s in m})


def as_matrix(mixtures: Sequence[Mapping[str, float]], sources: Sequence[str]) -> np.ndarray:
    return np.array([[float(m.get(s, 0.0)) for s in sources] for m in mixtures], dtype=float)


def normalise(weights: Mapping[str, float], *, where: str = "", file: str | Path | None = None,
              line: int | None = None) -> dict[str, float]:
    """Weights >= 0 summing to 1 (within SUM_TOLERANCE, then rescaled); zero weights dropped."""
    bad = [k for k, v in weights.items() if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0)]
    if bad:
        raise InputError(f"weight of {bad[0]!r} must be a number >= 0 (got {weights[bad[0]]!r})", file=file,
                         line=line, field=where or bad[0])
    total = math.fsum(weights.values())  # exact: the same total whatever the order of the columns
    if total <= 0:
        raise InputError("all weights are 0", file=file, line=line, field=where or None)
    if abs(total - 1.0) > SUM_TOLERANCE:
        raise InputError(f"weights sum to {total:.4f}, not 1", file=file, line=line, field=where or None)
    return {k: float(v) / total for k, v in sorted(weights.items()) if v > 0}


def kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """KL(p || q) in nats for each row of ``p`` against the vector ``q`` (0 log 0 = 0)."""
    p = np.atleast_2d(p)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * (np.log(p) - np.log(np.maximum(q, 1e-300))), 0.0)
    return terms.sum(axis=1)


def read_mixtures_csv(path: str | Path) -> dict[str, dict[str, float]]:
    """{candidate: {source: weight}} from a CSV with a ``candidate`` (or ``name``) column and one column per
    source; each row's weights checked and normalised. Empty cells are 0."""
    path = Path(path)
    text = read_text(path, "mixtures file")
    rows = list(csv.reader(io.StringIO(text)))
    if not rows:
        raise InputError("mixtures file is empty", file=path)
    header = [h.strip() for h in rows[0]]
    key = next((h for h in ("candidate", "name") if h in header), None)
    if key is None:
        raise InputError("needs a 'candidate' column (and one column per source)", file=path, line=1)
    if len(set(header)) != len(header):
        dup = next(h for h in header if header.count(h) > 1)
        raise InputError(f"column {dup!r} appears twice", file=path, line=1)
    sources = [h for h in header if h != key]
    if not sources:
        raise InputError("no source columns beside the candidate column", file=path, line=1)
    out: dict[str, dict[str, float]] = {}
    for lineno, row in enumerate(rows[1:], start=2):
        if not any(c.strip() for c in row):
            continue
        if len(row) != len(header):
            raise InputError(f"{len(row)} cells, the header has {len(header)}", file=path, line=lineno)
        cells = dict(zip(header, (c.strip() for c in row)))
        name = cells[key]
        if not name:
            raise InputError("empty candidate name", file=path, line=lineno, field=key)
        if name in out:
            raise InputError(f"candidate {name!r} appears twice", file=path, line=lineno, field=key)
        weights = {}
        for s in sources:
            try:
                weights[s] = float(cells[s]) if cells[s] else 0.0
            except ValueError:
                raise InputError(f"not a number: {cells[s]!r}", file=path, line=lineno, field=s) from None
        out[name] = normalise(weights, file=path, line=lineno)
    if not out:
        raise InputError("mixtures file holds no rows", file=path)
    return out
