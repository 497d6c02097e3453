"""Make frontier traces with a local model (METHOD.md section 3).

Two ways, both with the paper's prompt (:func:`build_messages`): system "You
are a helpful assistant that solves [task] problems."; user: the question,
then ``\\nRespond ONLY with a JSON object in this exact format: { "reasoning":
"your step by step reasoning", "final_answer": "your final answer" }``, put
through the model's chat template with the generation prompt.

- :func:`generate_traces`: the model answers (greedy, raw per-token logprobs
  from the unprocessed logits; :func:`rbridge.scoring.decoding.generate`, one
  question at a time, stopping at the tokenizer's EOS and every EOS id of the
  model's generation config). The value of ``"reasoning"`` is found inside
  the generated token stream (:mod:`rbridge.scoring.completions`: JSON escapes
  mapped back to characters, each character given to the token that completes
  it). Malformed output (no JSON object with a non-empty string ``reasoning``
  and a ``final_answer``, or the template's placeholder reasoning copied back)
  is retried once: with twice the token budget when the first try ran out of
  tokens, otherwise by sampling at ``retry_temperature`` with a seed derived
  from the question's index (greedy again would repeat the same output). A
  question malformed twice is dropped and counted. A ``final_answer`` of JSON
  ``null`` is written as the answer text ``"null"`` (the importers write ``""``).
- :func:`rescore_solutions`: given worked solutions (e.g. a benchmark's gold
  solutions) are teacher forced as the assistant turn
  (:func:`rbridge.scoring.requests.loglikelihood`, fp32), so the model supplies
  the probabilities a frontier model would have attached had it written them.
  ``assistant_format="plain"`` (default): the assistant turn is the solution
  text itself; ``"json"``: the assistant turn is the JSON object the prompt asks
  for (``{"reasoning": <solution>, "final_answer": <answer>}``) and the
  reasoning span is recovered as for generated output.

Tokens that complete no reasoning character are left out of
``frontier.tokens``, so the token texts concatenate exactly to the reasoning.
Logprobs are rounded to 6 decimals (and clamped to <= 0) so files regenerate
byte for byte on the same software.

The prompt's JSON instruction (``INSTRUCTION``, ``PLACEHOLDER``) and the
completion readers (``stream_texts``, ``split_by_offsets``, ``find_reasoning``,
``reasoning_tokens``) moved to :mod:`rbridge.scoring.completions`, which the
importers share without importing torch; they are still importable from here.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import rbridge
from rbridge._textio import json_object_lines, read_text
from rbridge.errors import InputError
from rbridge.scoring import decoding, forward_attr
from rbridge.scoring.completions import (INSTRUCTION, answer_text, find_reasoning, reasoning_tokens,
                                         split_by_offsets, stream_texts)
from rbridge.scoring.requests import Request, loglikelihood
from rbridge.scoring.traces import Frontier, Trace, check_out_path, write_traces

PROMPT_NAME = "rbridge-paper-json"


@dataclass
class Question:
    """One benchmark question; ``solution`` is a worked solution for rescoring."""

    id: str
    question: str
    answer: str | None = None      # the gold short answer ("72")
    label: str | None = None       # the benchmark's full gold answer text
    solution: str | None = None    # worked solution text (the reasoning to rescore)
    source: str | None = None      # provenance, e.g. "file.jsonl#3"


@dataclass
class GenerationResult:
    traces: list[Trace]
    dropped: list[str] = field(default_factory=list)   # ids of questions malformed twice
    retried: list[str] = field(default_factory=list)   # ids that needed the second attempt


# ---------------------------------------------------------------- questions

_CALC = re.compile(r"<<[^<>]*>>")


def split_gsm8k_answer(text: str) -> tuple[str, str]:
    """GSM8K gold answer -> (worked solution without calculator annotations, final answer).

    The solution is the text before the last ``#### N`` line with every
    ``<<48/2=24>>`` annotation removed; the answer is ``N``.
    """
    head, sep, tail = text.rpartition("####")
    if not sep:
        raise ValueError("no '#### N' line")
    return _CALC.sub("", head).strip(), tail.strip()


def load_questions(path: str | Path, *, benchmark: str, limit: int | None = None) -> list[Question]:
    """Read a questions file: JSONL, one object per line (blank lines skipped).

    Fields: ``question`` (required); ``answer`` (optional; GSM8K style -- a
    worked solution ending in a ``#### N`` line -- gives the solution, the
    short answer and the label; any other text is taken as the short answer);
    optional ``id`` (default ``<benchmark>-<i>``, ``i`` the 0-based index of
    the question in the file), ``solution`` and ``label`` override what
    ``answer`` gives. ``limit`` keeps the first questions in file order.
    """
    path = Path(path)
    out: list[Question] = []
    for lineno, obj in json_object_lines(path, read_text(path, "questions file"), "a question"):
        if limit is not None and len(out) >= limit:
            break
        q = obj.get("question")
        if not isinstance(q, str) or not q.strip():
            raise InputError("missing or empty text field", file=path, line=lineno, field="question")
        solution = answer = label = None
        if "answer" in obj:
            a = obj["answer"]
            a = a if isinstance(a, str) else json.dumps(a, ensure_ascii=False)
            if "####" in a:
                solution, answer = split_gsm8k_answer(a)
                label = a
            else:
                answer = label = a
        if isinstance(obj.get("solution"), str):
            solution = obj["solution"]
        if isinstance(obj.get("label"), str):
            label = obj["label"]
        qid = str(obj["id"]) if "id" in obj else f"{benchmark}-{len(out)}"
        out.append(Question(id=qid, question=q, answer=answer, label=label, solution=solution,
                            source=f"{path.name}#{len(out)}"))
    if not out:
        raise InputError("questions file holds no questions", file=path)
    return out


# ---------------------------------------------------------------- prompt

def build_messages(question: str, task: str) -> list[dict[str, str]]:
    """The paper's chat: system line naming the task, user question + JSON instruction."""
    return [{"role": "system", "content": f"You are a helpful assistant that solves {task} problems."},
            {"role": "user", "content": question + INSTRUCTION}]


def prompt_ids(tokenizer, question: str, task: str) -> list[int]:
    """Token ids of the chat prompt, ending with the assistant generation prompt."""
    text = tokenizer.apply_chat_template(build_messages(question, task), tokenize=False,
                                         add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


# ---------------------------------------------------------------- generation

def _generate_once(model, tokenizer, ids: list[int], *, max_new_tokens: int,
                   temperature: float | None, seed: int) -> tuple[list[int], list[float], bool]:
    """One completion: (new token ids without the stop id, raw logprobs, hit the token limit)."""
    stop = decoding.stop_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stop[0] if stop else 0)
    (g,) = decoding.generate(model, [ids], max_new_tokens=max_new_tokens, stop=stop, pad_id=pad,
                             temperature=temperature, seed=seed, logprobs=True)
    return g.ids, g.logprobs, g.truncated


def generate_traces(model, tokenizer, questions: Sequence[Question], task: str = "grade school math",
                    *, benchmark: str = "gsm8k", max_new_tokens: int = 512,
                    retry_temperature: float = 0.7, seed: int = 0, model_name: str | None = None,
                    metadata: dict[str, Any] | None = None, progress=None) -> GenerationResult:
    """Greedy traces from ``model`` with the paper's prompt; see the module docstring."""
    name = model_name or getattr(model.config, "_name_or_path", None) or type(model).__name__
    result = GenerationResult(traces=[])
    for k, q in enumerate(questions):
        ids = prompt_ids(tokenizer, q.question, task)
        attempt, temp, budget, parsed = 0, None, max_new_tokens, None
        while attempt < 2 and parsed is None:
            attempt += 1
            new, lps, truncated = _generate_once(model, tokenizer, ids, max_new_tokens=budget,
                                                 temperature=temp, seed=seed * 1_000_003 + k)
            texts = stream_texts(tokenizer, new) if new else []
            found = find_reasoning("".join(texts))
            if found is not None:
                parsed = (texts, lps, found)
            elif truncated:
                budget = 2 * budget
            else:
                temp = retry_temperature
        if parsed is None:
            result.dropped.append(q.id)
        else:
            texts, lps, (chars, ends, final) = parsed
            if attempt == 2:
                result.retried.append(q.id)
            meta = {"method": "generated", "frontier_model": name, "prompt": PROMPT_NAME,
                    "task": task, "attempts": attempt, **(metadata or {})}
            if q.source:
                meta.setdefault("questions_source", q.source)
            result.traces.append(Trace(
                id=q.id, benchmark=benchmark, question=q.question, reasoning="".join(chars),
                answer=answer_text(final, null="null"), label=q.label,
                frontier=Frontier(model=name, tokens=reasoning_tokens(texts, lps, (chars, ends))),
                metadata=meta))
        if progress:
            progress(k + 1, len(questions))
    return result


# ---------------------------------------------------------------- rescoring

def rescore_solutions(model, tokenizer, items: Sequence[Question], task: str = "grade school math",
                      *, benchmark: str = "gsm8k", assistant_format: str = "plain",
                      batch_size: int = 8, model_name: str | None = None,
                      metadata: dict[str, Any] | None = None) -> list[Trace]:
    """Frontier probabilities for given worked solutions, by teacher forcing (fp32).

    Each item needs ``solution`` (the reasoning) and ``answer``. The context is
    the paper's chat prompt; the continuation is the solution
    (``assistant_format="plain"``) or the JSON object the prompt asks for
    (``"json"``), tokenized separately from the prompt.
    """
    if assistant_format not in ("plain", "json"):
        raise ValueError("assistant_format must be plain or json")
    name = model_name or getattr(model.config, "_name_or_path", None) or type(model).__name__
    jobs: list[tuple[Question, str, list[tuple[int, int]], Request]] = []
    for k, q in enumerate(items):
        if not q.solution:
            raise InputError("no worked solution to rescore", field=f"{q.id}.solution")
        if assistant_format == "plain":
            completion = q.solution
        else:
            completion = json.dumps({"reasoning": q.solution, "final_answer": q.answer or ""},
                                    ensure_ascii=False)
        enc = tokenizer(completion, add_special_tokens=False, return_offsets_mapping=True)
        req = Request(prompt_ids(tokenizer, q.question, task), list(enc["input_ids"]), trace=k,
                      kind="solution")
        jobs.append((q, completion, [tuple(o) for o in enc["offset_mapping"]], req))
    loglikelihood(model, [job[3] for job in jobs], batch_size=batch_size, precision="fp32")
    traces = []
    for q, completion, offs, req in jobs:
        lps = [-float(x) for x in req.nll]
        texts = split_by_offsets(completion, offs)
        if assistant_format == "plain":
            reasoning = (list(completion), list(range(1, len(completion) + 1)))
        else:
            found = find_reasoning(completion)
            assert found is not None
            reasoning = (found[0], found[1])
        meta = {"method": "rescored", "frontier_model": name, "prompt": PROMPT_NAME, "task": task,
                "assistant_format": assistant_format, **(metadata or {})}
        if q.source:
            meta.setdefault("questions_source", q.source)
        traces.append(Trace(
            id=q.id, benchmark=benchmark, question=q.question, reasoning=q.solution,
            answer=q.answer or "", label=q.label,
            frontier=Frontier(model=name, tokens=reasoning_tokens(texts, lps, reasoning)),
            metadata=meta))
    return traces


# ---------------------------------------------------------------- entry point

def package_of(path: str | Path) -> str | None:
    """``name@version`` of the installed or unpacked wheel that holds ``path``, if any."""
    p = Path(path).resolve()
    for root in list(p.parents)[:4]:
        for info in sorted(root.glob("*.dist-info")):
            try:
                record = (info / "RECORD").read_text(encoding="utf-8")
                meta = (info / "METADATA").read_text(encoding="utf-8")
            except OSError:
                continue
            rel = p.relative_to(root).as_posix()
            if any(line.split(",")[0] == rel for line in record.splitlines()):
                fields = dict(line.split(": ", 1) for line in meta.splitlines()[:10] if ": " in line)
                return f"{fields.get('Name')}@{fields.get('Version')}"
    return None


def _default_benchmark(questions_path: Path) -> str:
    stem = questions_path.stem
    return questions_path.parent.name if stem in ("test", "train", "validation", "dev") else stem


def main_generate(model_path: str | Path, questions_path: str | Path, out_path: str | Path,
                  rescore: bool = False, limit: int | None = None, *, benchmark: str | None = None,
                  task: str = "grade school math", max_new_tokens: int = 512,
                  assistant_format: str = "plain", date: str | None = None, device: str = "auto",
                  progress=None) -> dict[str, Any]:
    """``rbridge traces generate``: questions file -> rbridge traces JSONL.

    ``rescore=False`` generates (dropping questions malformed twice);
    ``rescore=True`` teacher forces the questions' worked solutions. The
    benchmark name defaults to the questions file's stem (its folder's name
    for ``test``/``train``/... files). Returns a summary dict (written, dropped,
    retried, seconds, mean frontier tokens per trace).
    """
    check_out_path(out_path)  # before loading a model
    import time

    t0 = time.time()
    questions_path, model_path = Path(questions_path), Path(model_path)
    bench = benchmark or _default_benchmark(questions_path)
    questions = load_questions(questions_path, benchmark=bench, limit=limit)
    from rbridge.scoring.api import load_model

    model, tokenizer, name = load_model(model_path, device=device)
    meta: dict[str, Any] = {"date": date or _dt.date.today().isoformat(), "rbridge": rbridge.__version__}
    src = package_of(model_path if model_path.is_file() else next(iter(sorted(model_path.glob("*.gguf"))), model_path))
    if src:
        meta["frontier_source"] = src
    qsrc = package_of(questions_path)
    if qsrc:
        for q in questions:
            q.source = f"{qsrc}:{questions_path.parent.name}/{q.source}"
    if rescore:
        traces = rescore_solutions(model, tokenizer, questions, task, benchmark=bench,
                                   assistant_format=assistant_format, model_name=name, metadata=meta)
        dropped, retried = [], []
    else:
        res = generate_traces(model, tokenizer, questions, task, benchmark=bench,
                              max_new_tokens=max_new_tokens, model_name=name, metadata=meta,
                              progress=progress)
        traces, dropped, retried = res.traces, res.dropped, res.retried
    if not traces:
        raise InputError("no question produced a well-formed trace; nothing written", file=out_path)
    write_traces(out_path, traces)
    n_tok = [len(t.frontier.tokens) for t in traces]
    return {"written": len(traces), "dropped": dropped, "retried": retried, "benchmark": bench,
            "method": "rescored" if rescore else "generated", "model": name,
            "mean_frontier_tokens": sum(n_tok) / len(n_tok), "seconds": round(time.time() - t0, 1),
            "out": str(out_path)}


def __getattr__(name: str):   # moved to completions with the readers above, still importable from here
    return forward_attr(__name__, name, {"PLACEHOLDER": "rbridge.scoring.completions"})
