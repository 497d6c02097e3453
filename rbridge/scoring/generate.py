"""Make frontier traces with a local model (METHOD.md section 3).

Two ways, both with the paper's prompt (:func:`build_messages`): system "You
are a helpful assistant that solves [task] problems."; user: the question,
then ``\\nRespond ONLY with a JSON object in this exact format: { "reasoning":
"your step by step reasoning", "final_answer": "your final answer" }``, put
through the model's chat template with the generation prompt.

- :func:`generate_traces`: the model answers (greedy, raw per-token logprobs
  from the unprocessed logits). The value of ``"reasoning"`` is found inside
  the generated token stream and JSON escapes (``\\n \\t \\" \\\\ \\/ \\b \\f
  \\r \\uXXXX``, surrogate pairs included) are mapped back to characters.
  Malformed output (no JSON object with a non-empty string ``reasoning`` and a
  ``final_answer``, or the template's placeholder reasoning copied back) is retried once: with twice the token budget when the
  first try ran out of tokens, otherwise by sampling at ``retry_temperature``
  with a seed derived from the question's index (greedy again would repeat the
  same output). A question malformed twice is dropped and counted.
- :func:`rescore_solutions`: given worked solutions (e.g. a benchmark's gold
  solutions) are teacher forced as the assistant turn, so the model supplies
  the probabilities a frontier model would have attached had it written them.
  ``assistant_format="plain"`` (default): the assistant turn is the solution
  text itself; ``"json"``: the assistant turn is the JSON object the prompt asks
  for (``{"reasoning": <solution>, "final_answer": <answer>}``) and the
  reasoning span is recovered as for generated output.

Which token a character belongs to: a reasoning character belongs to the token
that *completes* it -- for a character whose UTF-8 bytes span several tokens,
the token holding its last byte; for a JSON escape split over tokens
(``\\`` | ``n``), the token holding the escape's last character. Tokens that
complete no reasoning character (the partial ones, the JSON wrapper) are left
out of ``frontier.tokens``, so the token texts concatenate exactly to the
reasoning. Logprobs are rounded to 6 decimals (and clamped to <= 0) so files
regenerate byte for byte on the same software.
"""

from __future__ import annotations

import bisect
import datetime as _dt
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import rbridge
from rbridge._textio import json_object_lines, read_text
from rbridge.errors import InputError
from rbridge.scoring.scorer import load_model, request_nlls
from rbridge.scoring.traces import Frontier, FrontierToken, Trace, write_traces

INSTRUCTION = ('\nRespond ONLY with a JSON object in this exact format: '
               '{ "reasoning": "your step by step reasoning", "final_answer": "your final answer" }')
PROMPT_NAME = "rbridge-paper-json"
PLACEHOLDER = "your step by step reasoning"   # small models copy the template; that is malformed


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


# ---------------------------------------------------------------- token streams

def stream_texts(tokenizer, ids: Sequence[int]) -> list[str]:
    """Text each token adds to the decoded stream (completing-token rule).

    Decodes growing prefixes; a trailing U+FFFD (an incomplete UTF-8
    character) is held back until the token that completes it.
    """
    texts, emitted = [], ""
    for i in range(len(ids)):
        full = tokenizer.decode(list(ids[:i + 1]), skip_special_tokens=False,
                                clean_up_tokenization_spaces=False)
        stable = full if i == len(ids) - 1 else full.rstrip("\ufffd")
        if not stable.startswith(emitted):
            raise ValueError("the tokenizer does not decode incrementally; cannot align tokens")
        texts.append(stable[len(emitted):])
        emitted = stable
    return texts


def split_by_offsets(text: str, offsets: Sequence[tuple[int, int]]) -> list[str]:
    """Partition ``text`` among tokens given character offsets (completing-token rule).

    A character belongs to the last token whose span holds it (byte-level
    tokens that split a character all report it); characters no token covers
    go to the next token (the last one at the end). The pieces concatenate to
    ``text``.
    """
    n = len(text)
    if not offsets:
        raise ValueError("no tokens")
    owner = [-1] * n
    for i, (s, e) in enumerate(offsets):
        for c in range(max(0, s), min(n, e)):
            owner[c] = i
    nxt = len(offsets) - 1
    for c in range(n - 1, -1, -1):
        if owner[c] < 0:
            owner[c] = nxt
        else:
            nxt = owner[c]
    pieces = [[] for _ in offsets]
    running = 0
    for c in range(n):
        running = max(running, owner[c])   # keep pieces contiguous
        pieces[running].append(text[c])
    return ["".join(p) for p in pieces]


_SIMPLE_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_WS = " \t\n\r"


def _scan_string(text: str, i: int) -> tuple[list[str], list[int], int]:
    """Scan the JSON string starting at ``text[i] == '"'``.

    Returns decoded characters, for each the raw index one past its escape,
    and the index after the closing quote. Raises ValueError when malformed.
    """
    if text[i] != '"':
        raise ValueError("expected a string")
    chars: list[str] = []
    ends: list[int] = []
    j = i + 1
    while True:
        if j >= len(text):
            raise ValueError("unterminated string")
        c = text[j]
        if c == '"':
            return chars, ends, j + 1
        if c == "\\":
            e = text[j + 1:j + 2]
            if e in _SIMPLE_ESCAPES:
                chars.append(_SIMPLE_ESCAPES[e])
                j += 2
            elif e == "u":
                code = int(text[j + 2:j + 6], 16) if re.fullmatch(r"[0-9a-fA-F]{4}", text[j + 2:j + 6]) else None
                if code is None:
                    raise ValueError("bad \\u escape")
                j += 6
                if 0xD800 <= code < 0xDC00 and text[j:j + 2] == "\\u" \
                        and re.fullmatch(r"[0-9a-fA-F]{4}", text[j + 2:j + 6]):
                    low = int(text[j + 2:j + 6], 16)
                    if 0xDC00 <= low < 0xE000:
                        code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)
                        j += 6
                if 0xD800 <= code < 0xE000:
                    raise ValueError("lone surrogate in \\u escape")
                chars.append(chr(code))
            else:
                raise ValueError("bad escape")
            ends.append(j)
        else:
            if ord(c) < 0x20:
                raise ValueError("control character in string")
            chars.append(c)
            j += 1
            ends.append(j)


def find_reasoning(text: str) -> tuple[list[str], list[int], Any] | None:
    """Locate the first JSON object in ``text`` with a string ``reasoning`` and a ``final_answer``.

    Returns (reasoning characters, raw end index of each, final_answer value),
    or None when the output is malformed: no such object, an empty reasoning,
    or the prompt's placeholder "your step by step reasoning" copied back.
    """
    decoder = json.JSONDecoder()
    for m in re.finditer(r"\{", text):
        try:
            obj, _ = decoder.raw_decode(text, m.start())
        except json.JSONDecodeError:
            continue
        if not (isinstance(obj, dict) and isinstance(obj.get("reasoning"), str)
                and "final_answer" in obj and obj["reasoning"].strip()
                and obj["reasoning"].strip().lower() != PLACEHOLDER):
            continue
        # Walk the object again, keeping raw positions of the reasoning value.
        found = None
        j = m.start() + 1
        try:
            while True:
                while text[j] in _WS:
                    j += 1
                if text[j] == "}":
                    break
                key_chars, _, j = _scan_string(text, j)
                while text[j] in _WS:
                    j += 1
                j += 1  # ':'
                while text[j] in _WS:
                    j += 1
                if "".join(key_chars) == "reasoning" and text[j] == '"':
                    chars, ends, j = _scan_string(text, j)
                    found = (chars, ends)   # the last duplicate wins, as in json.loads
                else:
                    _, j = decoder.raw_decode(text, j)
                while text[j] in _WS:
                    j += 1
                if text[j] == ",":
                    j += 1
        except (ValueError, IndexError):
            continue
        if found is None or "".join(found[0]) != obj["reasoning"]:
            continue
        return found[0], found[1], obj["final_answer"]
    return None


def _clean_logprob(lp: float, digits: int | None = 6) -> float:
    v = min(0.0, float(lp))
    if digits is not None:
        v = round(v, digits)
    return 0.0 if v == 0 else v


def reasoning_tokens(token_texts: Sequence[str], logprobs: Sequence[float],
                     reasoning: tuple[list[str], list[int]], *,
                     digits: int | None = 6) -> list[FrontierToken]:
    """Frontier tokens over exactly the reasoning, from a tokenized completion.

    ``token_texts`` partition the completion text; ``reasoning`` is what
    :func:`find_reasoning` returned (characters and raw end indices).
    ``digits``: logprobs are rounded to this many decimals (None: kept exact,
    as importers do); either way they are clamped to <= 0.
    """
    starts, pos = [], 0
    for t in token_texts:
        starts.append(pos)
        pos += len(t)
    chars, ends = reasoning
    out: list[FrontierToken] = []
    cur_tok, cur_text = None, []
    for ch, end in zip(chars, ends):
        tok = bisect.bisect_right(starts, end - 1) - 1
        while tok > 0 and len(token_texts[tok]) == 0:   # empty pieces complete nothing
            tok -= 1
        if tok != cur_tok and cur_text:
            out.append(FrontierToken(text="".join(cur_text), logprob=_clean_logprob(logprobs[cur_tok], digits)))
            cur_text = []
        cur_tok = tok
        cur_text.append(ch)
    if cur_text:
        out.append(FrontierToken(text="".join(cur_text), logprob=_clean_logprob(logprobs[cur_tok], digits)))
    return out


def _answer_text(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)


# ---------------------------------------------------------------- generation

def _eos_ids(model, tokenizer) -> list[int]:
    ids = set()
    for v in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, (list, tuple)):
            ids.update(int(x) for x in v)
    return sorted(ids)


def _generate_once(model, tokenizer, ids: list[int], *, max_new_tokens: int,
                   temperature: float | None, seed: int) -> tuple[list[int], list[float], bool]:
    """One completion: (new token ids without EOS, raw logprobs, hit the token limit)."""
    from transformers import GenerationConfig

    eos = _eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=temperature is not None,
                           temperature=temperature if temperature is not None else 1.0,
                           top_k=0 if temperature is not None else None, top_p=1.0,
                           eos_token_id=eos or None, pad_token_id=pad,
                           output_logits=True, return_dict_in_generate=True)
    device = next(model.parameters()).device
    inp = torch.tensor([ids], dtype=torch.long, device=device)
    if temperature is not None:
        torch.manual_seed(seed)
    with torch.inference_mode():
        out = model.generate(input_ids=inp, attention_mask=torch.ones_like(inp), generation_config=cfg)
    new = out.sequences[0, len(ids):].tolist()
    lps = [float(torch.log_softmax(lg[0].float(), -1)[t]) for lg, t in zip(out.logits, new)]
    stop = next((k for k, t in enumerate(new) if t in eos), None)
    if stop is not None:
        return new[:stop], lps[:stop], False
    return new, lps, len(new) >= max_new_tokens


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
                answer=_answer_text(final), label=q.label,
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
    requests, layouts = [], []
    for q in items:
        if not q.solution:
            raise InputError("no worked solution to rescore", field=f"{q.id}.solution")
        if assistant_format == "plain":
            completion = q.solution
        else:
            completion = json.dumps({"reasoning": q.solution, "final_answer": q.answer or ""},
                                    ensure_ascii=False)
        enc = tokenizer(completion, add_special_tokens=False, return_offsets_mapping=True)
        requests.append((prompt_ids(tokenizer, q.question, task), list(enc["input_ids"])))
        layouts.append((completion, [tuple(o) for o in enc["offset_mapping"]]))
    nlls = request_nlls(model, requests, batch_size=batch_size, precision="fp32")
    traces = []
    for q, (completion, offs), nll in zip(items, layouts, nlls):
        lps = [-float(x) for x in nll]
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
    import time

    t0 = time.time()
    questions_path, model_path = Path(questions_path), Path(model_path)
    bench = benchmark or _default_benchmark(questions_path)
    questions = load_questions(questions_path, benchmark=bench, limit=limit)
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
