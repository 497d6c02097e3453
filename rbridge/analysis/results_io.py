"""Importing results measured elsewhere: ``rbridge targets import`` and ``rbridge results import``.

A results file is CSV (header ``candidate,benchmark,metric,value`` and optionally
``higher_is_better,params,tokens,seed``) or JSON lines with the same fields. The
whole file is read and checked first; any problem raises :class:`InputError`
naming the file, line and column, before the store is opened. Then everything is
written in one transaction: new rows inserted, changed values updated with the
change recorded in ``result_changes``, identical rows left untouched (so
re-importing the same file changes nothing).

Seeds: rows that differ only in ``seed`` are averaged (the paper's protocol);
``seed=N`` keeps only seed N.
"""

from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlmodel import select

from rbridge._textio import json_object_lines, read_text
from rbridge.errors import InputError
from rbridge.store import Candidate, Plan, Result, ResultChange, Run, Store
from rbridge.store.models import utcnow
from rbridge.store.results import TARGET_STAGE

REQUIRED = ("candidate", "benchmark", "metric", "value")
OPTIONAL = ("higher_is_better", "params", "tokens", "seed")
COLUMNS = REQUIRED + OPTIONAL

_HIGHER = {"accuracy", "acc", "acc_norm", "em", "exact_match", "f1", "score", "win_rate"}
_LOWER = {"loss", "nll", "rbridge", "bpb", "ppl", "perplexity", "error", "rbridge_no_minmax", "bits"}
_PASS_AT = re.compile(r"^pass@\w+$")
_TRUE = {"true", "1", "yes", "t", "y"}
_FALSE = {"false", "0", "no", "f", "n"}


def default_higher_is_better(metric: str) -> bool | None:
    """Direction by metric name (INTERFACE.md): accuracy, acc, pass@k -> True; loss, nll, rbridge, bpb -> False.

    The name is also split on separators, so ``val_loss`` and ``pile_cc_loss`` are
    losses and ``acc_norm`` an accuracy. None when the name says nothing or both.
    """
    name = metric.strip().lower()
    if name in _HIGHER or _PASS_AT.match(name):
        return True
    if name in _LOWER:
        return False
    parts = [p for p in re.split(r"[^a-z0-9@]+", name) if p]
    hi = any(p in _HIGHER or _PASS_AT.match(p) for p in parts)
    lo = any(p in _LOWER for p in parts)
    if hi != lo:
        return hi
    return None


@dataclass
class Row:
    """One result after seed aggregation, ready to write."""

    candidate: str
    benchmark: str
    metric: str
    value: float
    higher_is_better: bool
    params: int | None
    tokens: int | None
    seed: int | None
    n_seeds: int
    seeds: str
    line: int

    @property
    def key(self) -> tuple:
        return (self.candidate, self.benchmark, self.metric, self.tokens)


@dataclass
class ImportReport:
    plan: str
    stage: str
    kind: str
    source: str
    rows: int = 0
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    changes: list[dict[str, Any]] = field(default_factory=list)
    plan_created: bool = False
    mixtures_added: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# ---------------------------------------------------------------------------- reading
def _records(path: Path) -> tuple[list[tuple[int, dict[str, Any]]], bool]:
    """(line, {column: raw value}) for every data row, and whether the file is JSON lines."""
    text = read_text(path, "results file", encoding="utf-8-sig")  # -sig: spreadsheets write a BOM
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    if not first:
        raise InputError("empty file: no results", file=path)
    is_jsonl = path.suffix.lower() in (".jsonl", ".ndjson", ".json") or first.startswith("{")
    out: list[tuple[int, dict[str, Any]]] = []
    if is_jsonl:
        for no, obj in json_object_lines(path, text):
            unknown = sorted(set(obj) - set(COLUMNS))
            if unknown:
                raise InputError(f"unknown field(s) {', '.join(unknown)}; fields are {', '.join(COLUMNS)}",
                                 file=path, line=no, field=unknown[0])
            out.append((no, obj))
        return out, True
    reader = csv.reader(io.StringIO(text))
    try:
        header = next(reader)
    except csv.Error as exc:
        raise InputError(f"bad CSV: {exc}", file=path, line=1) from None
    header = [h.strip().lower() for h in header]
    for h in header:
        if h not in COLUMNS:
            raise InputError(f"unknown column '{h}'; columns are {', '.join(COLUMNS)}", file=path, line=1,
                             field=h or "(empty)")
    dupes = sorted({h for h in header if header.count(h) > 1})
    if dupes:
        raise InputError(f"column '{dupes[0]}' appears twice", file=path, line=1, field=dupes[0])
    for col in REQUIRED:
        if col not in header:
            raise InputError(f"missing column '{col}'; required: {', '.join(REQUIRED)}", file=path, line=1,
                             field=col)
    start = 2
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise InputError(f"bad CSV: {exc}", file=path, line=reader.line_num) from None
        no, start = start, reader.line_num + 1
        if not any(c.strip() for c in cells):
            continue
        if len(cells) != len(header):
            raise InputError(f"{len(cells)} cells, the header has {len(header)}", file=path, line=no)
        out.append((no, dict(zip(header, cells))))
    return out, False


def _text(v: Any, col: str, path: Path, line: int) -> str:
    s = "" if v is None else str(v).strip()
    if not s:
        raise InputError("empty", file=path, line=line, field=col)
    return s


def _float(v: Any, col: str, path: Path, line: int) -> float:
    if isinstance(v, bool):
        raise InputError(f"not a number: {v!r}", file=path, line=line, field=col)
    try:
        x = float(v.strip() if isinstance(v, str) else v)
    except (TypeError, ValueError):
        raise InputError(f"not a number: {v!r}", file=path, line=line, field=col) from None
    if not math.isfinite(x):
        raise InputError(f"not a finite number: {v!r}", file=path, line=line, field=col)
    return x


def _opt_int(v: Any, col: str, path: Path, line: int, positive: bool) -> int | None:
    if v is None or (isinstance(v, str) and not v.strip()):
        return None
    x = _float(v, col, path, line)
    if x != int(x):
        raise InputError(f"not a whole number: {v!r}", file=path, line=line, field=col)
    if positive and x <= 0:
        raise InputError(f"must be positive: {v!r}", file=path, line=line, field=col)
    return int(x)


def _opt_bool(v: Any, col: str, path: Path, line: int) -> bool | None:
    if v is None or (isinstance(v, str) and not v.strip()):
        return None
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in _TRUE:
        return True
    if s in _FALSE:
        return False
    raise InputError(f"expected true or false, got {v!r}", file=path, line=line, field=col)


def read_results(path: str | Path, seed: int | None = None) -> list[Row]:
    """Read, check and seed-aggregate a results file. Raises InputError naming file, line and column."""
    path = Path(path)
    records, is_jsonl = _records(path)
    if not records:
        raise InputError("no results in the file (only a header?)", file=path)
    parsed: list[dict[str, Any]] = []
    direction: dict[str, tuple[bool, int]] = {}
    for line, rec in records:
        missing = [c for c in REQUIRED if c not in rec]
        if missing:
            raise InputError(f"missing field '{missing[0]}'", file=path, line=line, field=missing[0])
        r = {
            "candidate": _text(rec["candidate"], "candidate", path, line),
            "benchmark": _text(rec["benchmark"], "benchmark", path, line),
            "metric": _text(rec["metric"], "metric", path, line),
            "value": _float(rec["value"], "value", path, line),
            "params": _opt_int(rec.get("params"), "params", path, line, positive=True),
            "tokens": _opt_int(rec.get("tokens"), "tokens", path, line, positive=True),
            "seed": _opt_int(rec.get("seed"), "seed", path, line, positive=False),
            "line": line,
        }
        hib = _opt_bool(rec.get("higher_is_better"), "higher_is_better", path, line)
        if hib is None:
            hib = default_higher_is_better(r["metric"])
            if hib is None:
                raise InputError(f"cannot tell whether higher or lower '{r['metric']}' is better; "
                                 "fill in the higher_is_better column (true/false)", file=path, line=line,
                                 field="higher_is_better")
        prev = direction.get(r["metric"])
        if prev is not None and prev[0] != hib:
            raise InputError(f"metric '{r['metric']}' is higher_is_better={str(prev[0]).lower()} on line "
                             f"{prev[1]} but {str(hib).lower()} here", file=path, line=line,
                             field="higher_is_better")
        direction.setdefault(r["metric"], (hib, line))
        r["higher_is_better"] = hib
        parsed.append(r)

    has_seed_col = any(r["seed"] is not None for r in parsed)
    if seed is not None and not has_seed_col:
        raise InputError(f"--seed {seed} given but the file has no seeds", file=path, field="seed")
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in parsed:
        groups.setdefault((r["candidate"], r["benchmark"], r["metric"], r["tokens"]), []).append(r)
    rows: list[Row] = []
    for key, rs in groups.items():
        seeds_seen: dict[int | None, int] = {}
        for r in rs:
            if r["seed"] in seeds_seen:
                what = f"seed {r['seed']}" if r["seed"] is not None else "no seed"
                raise InputError(f"duplicate result for {key[0]}/{key[1]}/{key[2]}"
                                 + (f" at {key[3]} tokens" if key[3] else "")
                                 + f" ({what}; first on line {seeds_seen[r['seed']]})"
                                 + ("" if r["seed"] is not None else "; add a seed column to average seeds"),
                                 file=path, line=r["line"], field="seed" if r["seed"] is not None else None)
            seeds_seen[r["seed"]] = r["line"]
        if has_seed_col and None in seeds_seen and len(rs) > 1:
            bad = next(r for r in rs if r["seed"] is None)
            raise InputError("seed missing here but given for the same result on other lines",
                             file=path, line=bad["line"], field="seed")
        params = {r["params"] for r in rs if r["params"] is not None}
        if len(params) > 1:
            raise InputError(f"seeds of one result disagree on params ({sorted(params)})", file=path,
                             line=rs[-1]["line"], field="params")
        if seed is not None:
            chosen = [r for r in rs if r["seed"] == seed]
            if not chosen:
                raise InputError(f"no row with seed {seed} for {key[0]}/{key[1]}/{key[2]}", file=path,
                                 line=rs[0]["line"], field="seed")
            use = chosen
        else:
            use = sorted(rs, key=lambda r: (r["seed"] is None, r["seed"] if r["seed"] is not None else 0))
        value = math.fsum(r["value"] for r in use) / len(use)
        seeds = [r["seed"] for r in use if r["seed"] is not None]
        rows.append(Row(candidate=key[0], benchmark=key[1], metric=key[2], value=value,
                        higher_is_better=use[0]["higher_is_better"], params=next(iter(params), None),
                        tokens=key[3], seed=seed, n_seeds=len(use), seeds=",".join(str(s) for s in seeds),
                        line=min(r["line"] for r in rs)))
    return rows


# ---------------------------------------------------------------------------- the store
def default_plan_name(store: Store) -> str:
    """The store file's stem for SQLite stores ('regmix' for stores/regmix.db), else 'imported'."""
    if store.url.startswith("sqlite:///"):
        return Path(store.url[len("sqlite:///"):]).stem or "imported"
    return "imported"


def resolve_plan(s, store: Store, plan_name: str | None, create: bool) -> tuple[Plan | None, bool]:
    """The plan to attach results to: the named one, the store's only one, or a new imported plan."""
    plans = s.exec(select(Plan).order_by(Plan.id)).all()
    if plan_name:
        hit = [p for p in plans if p.name == plan_name]
        if hit:
            return hit[0], False
    elif len(plans) == 1:
        return plans[0], False
    elif len(plans) > 1:
        raise InputError(f"the store holds plans {', '.join(p.name for p in plans)}; pass --plan NAME",
                         file=store.url)
    if not create:
        raise InputError("no plan in this store" + (f" named '{plan_name}'" if plan_name else ""),
                         file=store.url)
    name = plan_name or default_plan_name(store)
    plan = Plan(name=name, spec_text="", spec_hash="", status="imported")
    s.add(plan)
    s.flush()
    return plan, True


def import_results(store: Store, path: str | Path, *, stage: str | None, plan_name: str | None = None,
                   seed: int | None = None, rows: list[Row] | None = None,
                   new_candidates: bool = False, mixtures: dict[str, dict[str, float]] | None = None,
                   mixtures_path: str | Path | None = None) -> ImportReport:
    """Write a results file into the store: targets when ``stage`` is None, else proxy results of ``stage``.

    ``rows`` (from :func:`read_results`) lets the caller validate before opening the store. For a plan
    run from a spec, a candidate that is neither the spec's nor already in the plan's imported results is
    refused as a likely typo, unless ``new_candidates`` (zero-shot transfer to candidates never trained).
    """
    path = Path(path)
    if rows is None:
        rows = read_results(path, seed=seed)
    kind = "target" if stage is None else "proxy"
    stage_name = TARGET_STAGE if stage is None else stage
    if stage is not None and stage.strip().lower() == TARGET_STAGE:
        raise InputError(f"'{TARGET_STAGE}' is reserved for targets; use `rbridge targets import`",
                         field="--stage")
    source = str(path.resolve())
    with store.session() as s:
        plan, created = resolve_plan(s, store, plan_name, create=True)
        report = ImportReport(plan=plan.name, stage=stage_name, kind=kind, source=source, rows=len(rows),
                              plan_created=created)
        if stage is not None:
            planner = s.exec(select(Run.id).where(Run.plan_id == plan.id, Run.stage == stage)).first()
            if planner is not None:
                raise InputError(f"stage '{stage}' of plan '{plan.name}' holds the planner's own runs; "
                                 "import under another stage name", field="--stage")
        if plan.spec_hash and not new_candidates:
            known = set(s.exec(select(Candidate.name).where(Candidate.plan_id == plan.id,
                                                            Candidate.superseded_by == 0)).all())
            known |= set(s.exec(select(Result.candidate).where(Result.plan_id == plan.id)).all())
            unknown = [r for r in rows if r.candidate not in known]
            if unknown:
                names = sorted({r.candidate for r in unknown})
                raise InputError(f"{len(names)} candidate(s) plan '{plan.name}' does not have: "
                                 f"{', '.join(names[:5])}{', ...' if len(names) > 5 else ''} (its candidates: "
                                 f"{', '.join(sorted(known)[:8])}{', ...' if len(known) > 8 else ''}); a typo? "
                                 "Pass --new-candidates to import them anyway", file=path, line=unknown[0].line,
                                 field="candidate")
        if mixtures is not None:
            _add_mixtures(s, plan, rows, mixtures, Path(mixtures_path or "mixtures"), report)
        # A metric's direction is one fact per plan: refuse a file that contradicts the store.
        stored_dir = {m: h for m, h in s.exec(select(Result.metric, Result.higher_is_better)
                                             .where(Result.plan_id == plan.id)).all()}
        for r in rows:
            if r.metric in stored_dir and bool(stored_dir[r.metric]) != r.higher_is_better:
                raise InputError(f"metric '{r.metric}' is stored with higher_is_better="
                                 f"{str(bool(stored_dir[r.metric])).lower()}; this file says "
                                 f"{str(r.higher_is_better).lower()}", file=path, line=r.line,
                                 field="higher_is_better")
        existing = {(x.candidate, x.benchmark, x.metric, x.tokens): x for x in s.exec(
            select(Result).where(Result.plan_id == plan.id, Result.kind == kind, Result.stage == stage_name)).all()}
        now = utcnow()
        for r in rows:
            old = existing.get(r.key)
            if old is None:
                s.add(Result(plan_id=plan.id, kind=kind, stage=stage_name, candidate=r.candidate,
                             benchmark=r.benchmark, metric=r.metric, value=r.value,
                             higher_is_better=r.higher_is_better, params=r.params, tokens=r.tokens, seed=r.seed,
                             n_seeds=r.n_seeds, seeds=r.seeds, source=source, source_line=r.line,
                             imported_at=now, updated_at=now))
                report.inserted += 1
                continue
            diffs = []
            for fld, new in (("value", r.value), ("higher_is_better", r.higher_is_better), ("params", r.params),
                             ("seed", r.seed), ("n_seeds", r.n_seeds)):
                cur = getattr(old, fld)
                if fld == "higher_is_better":
                    cur = bool(cur)
                if cur != new:
                    diffs.append((fld, cur, new))
            if old.seeds != r.seeds and not any(d[0] == "n_seeds" for d in diffs):
                diffs.append(("seeds", None, None))
            if not diffs:
                report.unchanged += 1
                continue
            for fld, cur, new in diffs:
                if fld != "seeds":
                    s.add(ResultChange(result_id=old.id, plan_id=plan.id, kind=kind, stage=stage_name,
                                       candidate=r.candidate, benchmark=r.benchmark, metric=r.metric,
                                       tokens=r.tokens, field=fld,
                                       old_value=None if cur is None else float(cur),
                                       new_value=None if new is None else float(new), source=source,
                                       changed_at=now))
                    report.changes.append({"candidate": r.candidate, "benchmark": r.benchmark,
                                           "metric": r.metric, "tokens": r.tokens, "field": fld,
                                           "old": cur, "new": new})
                setattr(old, fld if fld != "seeds" else "seeds", new if fld != "seeds" else r.seeds)
            old.seeds, old.source, old.source_line, old.updated_at = r.seeds, source, r.line, now
            s.add(old)
            report.updated += 1
    return report


def _add_mixtures(s, plan: Plan, rows: list[Row], mixtures: dict[str, dict[str, float]], path: Path,
                  report: ImportReport) -> None:
    """The mixture of every candidate of ``rows`` (``rbridge results import --mixtures``), as the plan's
    candidates with their ``mix``, so that `rbridge mixtures` fits them. Checked before anything is written
    (the caller's transaction writes all or nothing): every candidate needs a row; a candidate the plan
    already has keeps its mixture, and a file that says another one is refused (an edit never overwrites)."""
    import json as _json

    missing = sorted({r.candidate for r in rows} - set(mixtures))
    if missing:
        raise InputError(f"no mixture for {len(missing)} candidate(s) of the results: "
                         f"{', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}", file=path,
                         field="candidate")
    have = {c.name: c for c in s.exec(select(Candidate).where(Candidate.plan_id == plan.id,
                                                               Candidate.superseded_by == 0)).all()}
    wanted = sorted({r.candidate for r in rows})
    for name in wanted:
        if name in have:
            stored = _json.loads(have[name].mix or "{}")
            if set(stored) != set(mixtures[name]) or any(abs(stored[k] - mixtures[name][k]) > 1e-6 for k in stored):
                raise InputError(f"candidate {name!r} of plan '{plan.name}' has the mixture {stored}; this file "
                                 f"says {mixtures[name]} (import into another --plan)", file=path, field=name)
        elif plan.spec_hash:
            raise InputError(f"candidate {name!r} is not one of plan '{plan.name}''s; mixtures of new candidates "
                             "go into a plan of their own (--plan NAME)", file=path, field=name)
    position = len(have)
    for name in wanted:
        if name not in have:
            s.add(Candidate(plan_id=plan.id, name=name, mix=_json.dumps(mixtures[name], sort_keys=True),
                            position=position))
            position += 1
            report.mixtures_added += 1


__all__ = ["read_results", "import_results", "default_higher_is_better", "resolve_plan", "Row", "ImportReport",
           "COLUMNS"]
