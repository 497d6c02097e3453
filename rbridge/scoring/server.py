"""Traces from the frontier model a user serves: an OpenAI-compatible server (vLLM, SGLang, llama.cpp, hosted APIs).

``rbridge traces generate --endpoint URL --model NAME`` (:func:`generate_from_server`) asks the server
to answer each question with the paper's prompt (the same messages as the local generation,
rbridge.scoring.generate.build_messages), with ``logprobs: true``, and turns each answer into a trace
exactly as ``rbridge traces import --format openai`` does (rbridge.scoring.importers.trace_from_completion:
the paper's JSON or free text, reasoning parsers' ``reasoning_content``/``reasoning`` fields, think
delimiters; token texts that do not concatenate to the reasoning are refused, never written).

Why httpx and a thread pool rather than the openai client: the client drops fields it does not model
(vLLM's ``prompt_logprobs``, SGLang's extras) and retries on its own terms; here every request is one
plain JSON POST whose retries (429, 5xx, timeouts, a server that is down) and failures we decide, and a
few threads keep ``--concurrency`` requests in flight without an event loop.

Resumable: each finished trace is appended to ``--out`` at once (flushed and synced), with the key of the
request that made it (``metadata.request_key``: a hash of the question's messages, the model and the
sampling settings). A rerun of the same command skips the questions whose key is in the file, so a
killed run or a dead server loses at most the requests in flight. A file made with other settings is
refused rather than mixed.

``rbridge traces rescore`` (:func:`rescore_on_server`): a server's log-probabilities for traces that exist,
through prompt log-probabilities (``echo`` with ``max_tokens: 1`` on /completions, or vLLM's
``prompt_logprobs``), after a probe that compares them with the log-probabilities of the same tokens
generated greedily: a server that fails it is refused with what it did, and nothing is written.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import rbridge
from rbridge.errors import InputError
from rbridge.scoring.completions import INSTRUCTION, align_pieces
from rbridge.scoring.traces import Trace, check_out_path, parse_trace

RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


class ServerError(Exception):
    """The server kept failing after the retries (or answered what cannot be used): exit 1, traces kept."""


@dataclass(frozen=True)
class Sampling:
    max_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = 0

    def check(self) -> None:
        if self.max_tokens < 1:
            raise InputError(f"must be at least 1 (got {self.max_tokens})", field="--max-tokens")
        if not 0.0 <= self.temperature <= 2.0:
            raise InputError(f"must be between 0 and 2 (got {self.temperature})", field="--temperature")
        if not 0.0 < self.top_p <= 1.0:
            raise InputError(f"must be in (0, 1] (got {self.top_p})", field="--top-p")


def base_url(url: str) -> str:
    """The server's API root as the OpenAI client takes it (``http://host:8000/v1``): a bare
    ``http://host:port`` gets ``/v1``; a path ending in ``/chat/completions`` or ``/completions`` is cut."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise InputError(f"must be an http:// or https:// URL such as http://localhost:8000/v1 (got {url!r})",
                         field="--endpoint")
    path = parts.path.rstrip("/")
    for tail in ("/chat/completions", "/completions"):
        if path.endswith(tail):
            path = path[: -len(tail)]
    if not path:
        path = "/v1"
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def api_key(env_var: str | None) -> str | None:
    if env_var is None:
        return None
    value = os.environ.get(env_var)
    if not value:
        raise InputError(f"the environment variable {env_var} is not set (or empty)", field="--api-key-env")
    return value


class Endpoint:
    """One server: JSON POSTs with retries and backoff on 429, 5xx, timeouts and refused connections."""

    def __init__(self, url: str, model: str, key: str | None = None, *, retries: int = 6, timeout_s: float = 600.0,
                 backoff_s: float = 0.5, stop: threading.Event | None = None):
        try:
            import httpx
        except ImportError:  # pragma: no cover - the extra is named in the message
            raise InputError("needs httpx: pip install 'rbridge[server]'", field="--endpoint") from None
        self.url = base_url(url)
        self.model = model
        self.retries = retries
        self.backoff_s = backoff_s
        self.stop = stop or threading.Event()
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._httpx = httpx
        self.client = httpx.Client(base_url=self.url, headers=headers,
                                   timeout=httpx.Timeout(timeout_s, connect=min(30.0, timeout_s)))
        self.retried = 0  # requests sent again, for the summary

    def close(self) -> None:
        self.client.close()

    def get(self, path: str) -> Any:
        r = self.client.get(path)
        r.raise_for_status()
        return r.json()

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """The JSON answer to a POST; retried with exponential backoff (and the server's Retry-After)
        on what passes (429, 5xx, timeouts, a server down or restarting); other 4xx fail at once."""
        httpx = self._httpx
        last = ""
        for attempt in range(self.retries + 1):
            if self.stop.is_set():
                raise ServerError("stopped")
            wait_s = min(30.0, self.backoff_s * 2 ** attempt) * (0.75 + 0.5 * random.random())
            try:
                r = self.client.post(path, json=body)
            except (httpx.TimeoutException, httpx.TransportError) as exc:
                last = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            else:
                if r.status_code == 200:
                    try:
                        return r.json()
                    except ValueError:
                        last = f"200 with a body that is not JSON: {r.text[:200]!r}"
                elif r.status_code in RETRY_STATUS:
                    last = f"{r.status_code} {r.text[:300].strip()}"
                    after = r.headers.get("retry-after")
                    if after and after.replace(".", "", 1).isdigit():
                        wait_s = min(60.0, max(wait_s, float(after)))
                else:
                    raise ServerError(_refusal(self.url + path, r.status_code, r.text))
            if attempt < self.retries:
                self.retried += 1
                if self.stop.wait(wait_s):
                    raise ServerError("stopped")
        raise ServerError(f"{self.url}{path} failed {self.retries + 1} times; last: {last}")


def _refusal(url: str, status: int, text: str) -> str:
    try:
        said = json.loads(text)
        said = said.get("error", said) if isinstance(said, dict) else said
        said = said.get("message", said) if isinstance(said, dict) else said
    except ValueError:
        said = text
    hint = {401: " (--api-key-env: the key is missing or wrong)", 403: " (--api-key-env: the key may not use it)",
            404: " (--endpoint: the URL's API root, such as http://host:8000/v1, or --model)"}.get(status, "")
    return f"{url} answered {status}{hint}: {str(said)[:400]}"


# ---------------------------------------------------------------- requests

def request_body(question: str, task: str, model: str, sampling: Sampling, mode: str) -> dict[str, Any]:
    """The JSON body sent for a question: the paper's chat (``chat``), or for ``completions`` a raw text prompt
    (:func:`raw_prompt`) for servers of base models."""
    from rbridge.scoring.generate import build_messages

    body: dict[str, Any] = {"model": model}
    if mode == "chat":
        body["messages"] = build_messages(question, task)
        # top_logprobs 1: llama-cpp-python's server returns no log-probabilities without it
        body.update(logprobs=True, top_logprobs=1)
    else:
        body["prompt"] = raw_prompt(question, task)
        body["logprobs"] = 1
    body.update(max_tokens=sampling.max_tokens, temperature=sampling.temperature, top_p=sampling.top_p)
    if sampling.seed is not None:
        body["seed"] = sampling.seed
    return body


def request_key(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:24]


def as_chat_completion(resp: dict[str, Any]) -> dict[str, Any]:
    """A /completions answer in the chat layout the trace reader takes: ``logprobs.tokens`` /
    ``token_logprobs`` become ``logprobs.content`` and ``text`` the message content."""
    choice = (resp.get("choices") or [{}])[0]
    if "message" in choice:
        return resp
    lp = choice.get("logprobs") or {}
    toks, vals = lp.get("tokens"), lp.get("token_logprobs")
    content = None
    if isinstance(toks, list) and isinstance(vals, list) and len(toks) == len(vals):
        content = [{"token": t, "logprob": v} for t, v in zip(toks, vals)]
    return {**resp, "choices": [{"index": 0, "finish_reason": choice.get("finish_reason"),
                                 "message": {"role": "assistant", "content": choice.get("text")},
                                 "logprobs": {"content": content}}]}


# ---------------------------------------------------------------- the output file

def read_done(out: Path) -> tuple[set[str], dict[str, Any] | None, int]:
    """(request keys already in ``out``, the generation settings its traces record, traces) -- an
    unfinished last line (a killed writer) is cut off, said by the caller through the count it returns."""
    if not out.exists():
        return set(), None, 0
    data = out.read_bytes()
    if data and not data.endswith(b"\n"):  # the last append did not finish: drop it
        cut = data.rfind(b"\n") + 1
        with out.open("r+b") as f:
            f.truncate(cut)
        data = data[:cut]
    keys: set[str] = set()
    settings = None
    n = 0
    for lineno, raw in enumerate(data.decode("utf-8", errors="strict").splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise InputError(f"not valid JSON ({e.msg}); --out must be a traces file this command wrote",
                             file=out, line=lineno) from None
        trace = parse_trace(obj, file=out, line=lineno)
        meta = trace.metadata or {}
        if "request_key" not in meta or "generation" not in meta:
            raise InputError("holds traces that `rbridge traces generate --endpoint` did not write; choose another "
                             "--out", file=out, line=lineno)
        if settings is None:
            settings = meta["generation"]
        keys.add(meta["request_key"])
        n += 1
    return keys, settings, n


def _append(out: Path, trace: Trace) -> None:
    with out.open("a", encoding="utf-8", newline="\n") as f:
        f.write(trace.to_json_line() + "\n")
        f.flush()
        os.fsync(f.fileno())


# ---------------------------------------------------------------- generate

@dataclass
class GenerateSummary:
    written: int = 0
    skipped: int = 0            # already in --out
    dropped: list[str] = field(default_factory=list)   # ids malformed twice
    retried_answers: int = 0    # malformed once, asked again with sampling
    retried_requests: int = 0   # requests sent again (429, 5xx, timeouts, server down)
    completion_tokens: int = 0
    seconds: float = 0.0
    model: str = ""
    out: str = ""
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def generate_from_server(endpoint: Endpoint, questions_path: str | Path, out_path: str | Path, *,
                         sampling: Sampling = Sampling(), mode: str = "chat", concurrency: int = 4,
                         limit: int | None = None, benchmark: str | None = None, task: str = "grade school math",
                         retry_temperature: float = 0.7,
                         progress: Callable[[int, int, int], None] | None = None) -> GenerateSummary:
    """Questions -> traces appended to ``out_path`` (see the module docstring). Validates every input
    before the first request; raises ServerError (traces kept) when the server keeps failing."""
    from rbridge.scoring.generate import _default_benchmark, load_questions

    if mode not in ("chat", "completions"):
        raise InputError("must be chat or completions", field="--chat/--completions")
    if concurrency < 1:
        raise InputError(f"must be at least 1 (got {concurrency})", field="--concurrency")
    sampling.check()
    out = check_out_path(out_path)
    questions_path = Path(questions_path)
    bench = benchmark or _default_benchmark(questions_path)
    questions = load_questions(questions_path, benchmark=bench, limit=limit)
    seen_ids: dict[str, int] = {}
    for k, q in enumerate(questions):
        if q.id in seen_ids:
            raise InputError(f"question id {q.id!r} is also question {seen_ids[q.id] + 1}: ids must be unique",
                             file=questions_path, field="id")
        seen_ids[q.id] = k
    settings = {"endpoint_model": endpoint.model, "mode": mode, "task": task, **asdict(sampling)}
    done, had, n_had = read_done(out)
    if had is not None and had != settings:
        diff = ", ".join(f"{k} {had.get(k)!r} -> {v!r}" for k, v in settings.items() if had.get(k) != v)
        raise InputError(f"holds {n_had} traces made with other settings ({diff}); choose another --out, or "
                         "rerun with the settings it was made with", file=out)
    jobs = []
    for k, q in enumerate(questions):
        body = request_body(q.question, task, endpoint.model, sampling, mode)
        key = request_key(body)
        if key not in done:
            jobs.append((k, q, body, key))
    summary = GenerateSummary(skipped=len(questions) - len(jobs), model=endpoint.model, out=str(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    _check_models(endpoint)
    t0 = time.time()
    path = "/chat/completions" if mode == "chat" else "/completions"
    meta_common = {"method": "generated", "prompt": "rbridge-paper-json", "task": task, "generation": settings,
                   "date": _dt.date.today().isoformat(), "rbridge": rbridge.__version__}

    def one(k: int, q, body: dict[str, Any], key: str) -> tuple[Trace | None, int, int, str]:
        """(trace or None when malformed twice, completion tokens, answers retried, why dropped)."""
        from rbridge.scoring.importers import trace_from_completion

        tokens, tries, why = 0, 0, ""
        sent = body
        for attempt in (1, 2):
            if attempt == 2:  # malformed: once more with sampling, seeded by the question (greedy repeats)
                sent = {**body, "temperature": retry_temperature, "seed": (sampling.seed or 0) * 1_000_003 + k}
                tries = 1
            resp = as_chat_completion(endpoint.post(path, sent))
            usage = resp.get("usage") or {}
            tokens += int(usage.get("completion_tokens") or 0)
            choice = (resp.get("choices") or [{}])[0]
            if choice.get("finish_reason") not in ("stop", "length", "eos", None):
                # an interrupted answer (llama-cpp-python's server cuts a request short when another
                # arrives, unless started with --interrupt_requests False): not the model's answer
                why = f"finish_reason {choice.get('finish_reason')!r}"
                continue
            if not ((choice.get("logprobs") or {}).get("content")) and (choice.get("message") or {}).get("content"):
                raise ServerError(f"{endpoint.url}{path} answered without token log-probabilities (sent "
                                  f"{ {k: sent[k] for k in ('logprobs', 'top_logprobs') if k in sent} }); "
                                  "this server cannot make traces" + (", try --completions" if mode == "chat" else ""))
            rec = {"id": q.id, "benchmark": bench, "question": q.question, "response": resp}
            if q.label is not None:
                rec["label"] = q.label
            meta = {**meta_common, "request_key": key, "request": sent, "frontier_model_id": resp.get("model"),
                    "usage": usage, "finish_reason": choice.get("finish_reason"), "attempts": attempt}
            if q.source:
                meta["questions_source"] = q.source
            try:
                trace = trace_from_completion(rec, resp, index=k, benchmark=bench, model=resp.get("model")
                                              or endpoint.model, file=out, line=None,
                                              source=f"{endpoint.url}{path}", metadata=meta)
            except InputError as exc:
                why = f"{exc.field}: {exc.message}" if exc.field else exc.message
                continue
            return trace, tokens, tries, ""
        return None, tokens, tries, why

    stop = endpoint.stop
    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="rbridge-request")
    pending: dict[Future, tuple[int, Any]] = {}
    queue = list(jobs)
    failure: BaseException | None = None
    try:
        while queue or pending:
            while queue and len(pending) < concurrency and failure is None:
                job = queue.pop(0)
                pending[pool.submit(one, *job)] = (job[0], job[1])
            if not pending:
                break
            finished, _ = wait(list(pending), return_when=FIRST_COMPLETED)
            for fut in finished:
                k, q = pending.pop(fut)
                try:
                    trace, tokens, tries, why = fut.result()
                except ServerError as exc:
                    if failure is None and str(exc) != "stopped":
                        failure = exc
                        stop.set()  # the others stop retrying; answers already on their way are kept
                    continue
                summary.completion_tokens += tokens
                summary.retried_answers += tries
                if trace is None:
                    summary.dropped.append(f"{q.id} ({why})")
                else:
                    _append(out, trace)
                    summary.written += 1
                if progress:
                    progress(summary.written + len(summary.dropped), len(jobs), summary.completion_tokens)
            if failure is not None:
                queue.clear()
    except KeyboardInterrupt:
        stop.set()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        summary.retried_requests = endpoint.retried
        summary.seconds = round(time.time() - t0, 1)
    if failure is not None:
        summary.error = str(failure)
        raise ServerError(str(failure)) from None
    return summary


# ---------------------------------------------------------------- rescore

PROBE_TOLERANCE = 0.1  # nats: a server's echo of tokens it generated, against its own generation log-probabilities


def raw_prompt(question: str, task: str) -> str:
    """The paper's messages as one raw text (the system line, the question and the instruction; no chat
    template): what ``--completions`` generation sends, and the text before a reasoning being rescored."""
    from rbridge.scoring.generate import build_messages

    msgs = build_messages(question, task)
    return msgs[0]["content"] + "\n\n" + msgs[1]["content"] + "\n\n"


def prompt_logprobs(endpoint: Endpoint, text: str) -> tuple[list[str], list[float | None], str]:
    """(token texts partitioning ``text``, their log-probabilities (None where the server gives none, the
    first), how they were asked for) -- by ``echo`` with ``max_tokens: 1`` (the token generated after the text
    is dropped), else vLLM's ``prompt_logprobs``. Raises ServerError saying what
    the server returned when neither covers the text."""
    tried = []
    # max_tokens 1, the generated token dropped: llama-cpp-python reads 0 as "up to the context's end"
    try:
        resp = endpoint.post("/completions", {"model": endpoint.model, "prompt": text, "temperature": 0.0,
                                              "logprobs": 1, "echo": True, "max_tokens": 1})
    except ServerError as exc:
        tried.append(f"echo: {exc}")
    else:
        choice = (resp.get("choices") or [{}])[0]
        lp = choice.get("logprobs") or {}
        toks, vals = lp.get("tokens"), lp.get("token_logprobs")
        if isinstance(toks, list) and isinstance(vals, list) and len(toks) == len(vals) and toks:
            texts = align_pieces(text, toks)
            if texts is not None:
                return texts, [None if v is None else float(v) for v in vals[:len(texts)]], "echo"
            tried.append(f"echo: {len(toks)} log-probabilities whose tokens are not the prompt's "
                         f"({''.join(map(str, toks))[:60]!r}...)")
        else:
            tried.append("echo: no log-probabilities of the prompt's tokens")
    try:  # vLLM: prompt_logprobs
        resp = endpoint.post("/completions", {"model": endpoint.model, "prompt": text, "max_tokens": 1,
                                              "temperature": 0.0, "prompt_logprobs": 0})
        plp = (resp.get("choices") or [{}])[0].get("prompt_logprobs") or resp.get("prompt_logprobs")
        if isinstance(plp, list) and plp:
            texts, vals = [], []
            for entry in plp:
                if entry is None:
                    texts.append(None)
                    vals.append(None)
                    continue
                (_tid, info), *_ = sorted(entry.items(), key=lambda kv: kv[1].get("rank", 0) != 1)
                texts.append(info.get("decoded_token"))
                vals.append(info.get("logprob"))
            aligned = None
            if texts[0] is None:  # the first token is not given (vLLM): it covers what the others leave
                for k in range(1, min(len(text), 64) + 1):
                    rest = align_pieces(text[k:], texts[1:])
                    if rest is not None and len(rest) == len(texts) - 1:
                        aligned = [text[:k]] + rest
                        break
            else:
                aligned = align_pieces(text, texts)
            if aligned is not None and len(aligned) == len(texts):
                return aligned, [None if v is None else float(v) for v in vals], "prompt_logprobs"
            tried.append("prompt_logprobs: tokens that do not spell the prompt")
        else:
            tried.append("prompt_logprobs: none returned")
    except ServerError as exc:
        tried.append(f"prompt_logprobs: {exc}")
    raise ServerError("the server gives no log-probabilities of a prompt's tokens (" + "; ".join(tried) + ")")


def probe(endpoint: Endpoint, prompt: str, n_tokens: int = 8) -> dict[str, Any]:
    """Whether the server's prompt log-probabilities are right, on its own words: generate ``n_tokens``
    greedily after ``prompt``, then ask for the prompt log-probabilities of prompt + those tokens; the count
    and the values of the generated tokens must agree (within PROBE_TOLERANCE nats). Raises ServerError naming
    what differs."""
    resp = as_chat_completion(endpoint.post("/completions", {"model": endpoint.model, "prompt": prompt,
                                                             "max_tokens": n_tokens, "temperature": 0.0,
                                                             "logprobs": 1}))
    content = resp["choices"][0]["logprobs"]["content"] or []
    gen = [(c["token"], float(c["logprob"])) for c in content if isinstance(c.get("logprob"), (int, float))]
    generated = "".join(t for t, _ in gen)
    if not gen or not generated:
        raise ServerError("the probe's generation returned no tokens with log-probabilities")
    texts, vals, how = prompt_logprobs(endpoint, prompt + generated)
    # Compare the tokens that cover the same characters in both: a text tokenized back need not give the
    # pieces it was generated in (BPE's canonical split), but where it does, the values must agree.
    def spans(pieces: list[str], start: int) -> list[tuple[int, int]]:
        out, at = [], start
        for p in pieces:
            out.append((at, at + len(p)))
            at += len(p)
        return out

    # Only up to the first token split otherwise: after it the contexts differ, and so may honest values.
    echoed = {sp: v for sp, v in zip(spans(texts, 0), vals)}
    pairs = []
    for (t, lp), sp in zip(gen, spans([t for t, _ in gen], len(prompt))):
        if sp not in echoed:
            break
        pairs.append((t, lp, echoed[sp]))
    if len(pairs) < min(2, len(gen)):
        raise ServerError(f"the server's {how} tokenizes its own greedy output differently from its second token "
                          "on: cannot check its values")
    token, generated_lp, echoed_lp = max(pairs, key=lambda p: abs((p[2] if p[2] is not None else 1e9) - p[1]))
    diff = abs((echoed_lp if echoed_lp is not None else float("inf")) - generated_lp)
    if diff > PROBE_TOLERANCE:
        raise ServerError(f"the server's prompt log-probabilities ({how}) disagree with its own generation: token "
                          f"{token!r} has {generated_lp:.3f} generated but {echoed_lp} echoed "
                          f"(more than {PROBE_TOLERANCE} nats apart); its rescoring would be wrong")
    return {"method": how, "tokens": len(pairs), "max_abs_diff": round(diff, 6)}


def rescore_on_server(endpoint: Endpoint, traces_path: str | Path, out_path: str | Path, *,
                      task: str = "grade school math", concurrency: int = 4) -> dict[str, Any]:
    """Traces that exist, rescored with the server's log-probabilities (see the module docstring); the
    whole file is written at the end, and nothing when the probe fails."""
    from rbridge.scoring.completions import reasoning_tokens
    from rbridge.scoring.traces import Frontier, load_traces, write_traces

    if concurrency < 1:
        raise InputError(f"must be at least 1 (got {concurrency})", field="--concurrency")
    out = check_out_path(out_path)
    traces = load_traces(traces_path)
    if not traces:
        raise InputError("holds no traces", file=traces_path)
    t0 = time.time()
    _check_models(endpoint)
    checked = probe(endpoint, raw_prompt(traces[0].question, task))

    def one(trace: Trace) -> Trace:
        prompt = raw_prompt(trace.question, task)
        texts, vals, how = prompt_logprobs(endpoint, prompt + trace.reasoning)
        ends = list(range(len(prompt) + 1, len(prompt) + len(trace.reasoning) + 1))
        lps = [v if v is not None else 0.0 for v in vals]
        first = next(i for i, t in enumerate(texts) if sum(map(len, texts[:i + 1])) > len(prompt))
        if vals[first] is None:
            raise ServerError(f"trace {trace.id}: no log-probability for the reasoning's first token")
        toks = reasoning_tokens(texts, lps, (list(trace.reasoning), ends), digits=None)
        if "".join(t.text for t in toks) != trace.reasoning:  # never written: the tokens must spell the reasoning
            raise ServerError(f"trace {trace.id}: the server's tokens do not spell its reasoning")
        meta = {**(trace.metadata or {}), "method": "rescored", "rescored_from": trace.frontier.model,
                "prompt": "rbridge-raw-completions", "task": task, "rescore": how,
                "request": {"model": endpoint.model, "prompt": prompt + trace.reasoning},
                "date": _dt.date.today().isoformat(), "rbridge": rbridge.__version__}
        return trace.model_copy(update={"frontier": Frontier(model=endpoint.model, tokens=toks), "metadata": meta})

    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="rbridge-rescore") as pool:
        try:
            done = list(pool.map(one, traces))
        except BaseException:
            endpoint.stop.set()
            raise
    write_traces(out, done)
    return {"written": len(done), "out": str(out), "model": endpoint.model, "probe": checked,
            "seconds": round(time.time() - t0, 1), "retried_requests": endpoint.retried}


def _check_models(endpoint: Endpoint) -> None:
    """``--model`` among the server's models where it lists them (GET /models); servers without the list pass."""
    try:
        listed = endpoint.get("/models")
    except Exception:  # noqa: BLE001 - no list (404, no route, auth): the first request says what is wrong
        return
    ids = [m.get("id") for m in (listed.get("data") or []) if isinstance(m, dict)] if isinstance(listed, dict) else []
    if ids and endpoint.model not in ids:
        raise InputError(f"the server at {endpoint.url} serves {', '.join(map(repr, ids[:8]))}, not "
                         f"{endpoint.model!r}", field="--model")


__all__ = ["Endpoint", "GenerateSummary", "INSTRUCTION", "Sampling", "ServerError", "base_url", "generate_from_server",
           "probe", "request_body", "request_key", "rescore_on_server"]
