"""A small OpenAI-compatible server for the tests: a Hugging Face causal LM on the CPU behind the routes and
response layouts that rbridge's server client reads, computing every log-probability honestly with
transformers (one forward pass over prompt + completion).

    python tests/openai_server.py MODEL_DIR --port P [--name NAME] [--layout openai|vllm|sglang]
                                  [--fail-every-post] [--wrong-echo] [--no-echo]

Routes: GET /v1/models; POST /v1/chat/completions (greedy or sampled generation, ``logprobs.content`` with
token, logprob, bytes); POST /v1/completions (generation with ``logprobs.tokens``/``token_logprobs``/
``text_offset``; ``echo: true`` puts the prompt's tokens first, its first log-probability null, as
OpenAI's legacy API does; vLLM's ``prompt_logprobs: 0`` returns ``choices[0].prompt_logprobs``, a list
with null first and ``{token_id: {logprob, rank, decoded_token}}`` after). ``--layout vllm`` also moves a
``<think>...</think>`` block into ``message.reasoning`` (vLLM's reasoning parser), ``--layout sglang``
into ``message.reasoning_content``; the log-probabilities still cover it, as those servers do.
``--fail-every-post`` answers 500 to every POST (a broken server); ``--wrong-echo`` returns prompt
log-probabilities from another position (a server whose echo values are wrong); ``--no-echo`` ignores
``echo`` and returns the generated tokens only (as llama.cpp's server did, #27174).
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--name", default="tiny")
    ap.add_argument("--layout", default="openai", choices=["openai", "vllm", "sglang"])
    ap.add_argument("--fail-every-post", action="store_true")
    ap.add_argument("--wrong-echo", action="store_true")
    ap.add_argument("--no-echo", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    lock = threading.Lock()  # one forward pass at a time
    # A tiny random model would emit byte pieces that are not UTF-8 text; the server picks among the tokens
    # that are whole characters (their log-probabilities stay the model's, over the whole vocabulary).
    whole = torch.tensor([_is_text(_bytes_of(tok, i)) for i in range(len(tok))])

    def logprobs_of(ids: list[int]) -> list[float | None]:
        """log p(ids[i] | ids[:i]) for every position (None for the first)."""
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float()
        lp = torch.log_softmax(logits, dim=-1)
        return [None] + [float(lp[i - 1, ids[i]]) for i in range(1, len(ids))]

    def generate(ids: list[int], max_tokens: int, temperature: float, seed: int | None) -> tuple[list[int], str]:
        gen = torch.Generator().manual_seed(seed or 0)
        out: list[int] = []
        for _ in range(max_tokens):
            with torch.no_grad():
                logits = model(torch.tensor([ids + out])).logits[0, -1].float()
            logits = logits.masked_fill(~whole, float("-inf"))
            if temperature > 0:
                nxt = int(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=gen))
            else:
                nxt = int(logits.argmax())
            if nxt == tok.eos_token_id:
                return out, "stop"
            out.append(nxt)
        return out, "length"

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):  # quiet
            pass

        def _send(self, code: int, obj) -> None:
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path.rstrip("/") == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": args.name, "object": "model"}]})
            else:
                self._send(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
            if args.fail_every_post:
                self._send(500, {"error": {"message": "internal error (the test server is told to fail)"}})
                return
            try:
                with lock:
                    if self.path == "/v1/chat/completions":
                        answer = chat(body)
                    elif self.path == "/v1/completions":
                        answer = completions(body)
                    else:
                        self._send(404, {"error": {"message": f"no route {self.path}"}})
                        return
            except Exception as exc:  # noqa: BLE001 - a test server: say it, as servers do
                self._send(500, {"error": {"message": f"{type(exc).__name__}: {exc}"}})
                return
            self._send(200, answer)

    def chat(body):
        text = tok.apply_chat_template(body["messages"], tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        new, finish = generate(ids, int(body.get("max_tokens", 64)), float(body.get("temperature", 0.0)),
                               body.get("seed"))
        lps = logprobs_of(ids + new)[len(ids):]
        content = []
        for i, lp in zip(new, lps):
            b = _bytes_of(tok, i)
            content.append({"token": b.decode("utf-8", "replace"), "logprob": lp, "bytes": list(b)})
        full = b"".join(_bytes_of(tok, i) for i in new).decode("utf-8", "replace")
        message = {"role": "assistant", "content": full}
        if args.layout != "openai" and "<think>" in full and "</think>" in full:
            head, _, rest = full.partition("</think>")
            field = "reasoning" if args.layout == "vllm" else "reasoning_content"
            message = {"role": "assistant", "content": rest, field: head.replace("<think>", "")}
        return {"id": f"chatcmpl-{time.time_ns()}", "object": "chat.completion", "model": args.name,
                "choices": [{"index": 0, "message": message, "finish_reason": finish,
                             "logprobs": {"content": content} if body.get("logprobs") else None}],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": len(new),
                          "total_tokens": len(ids) + len(new)}}

    def completions(body):
        prompt = body["prompt"]
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        max_tokens = int(body.get("max_tokens", 16))
        new, finish = generate(ids, max_tokens, float(body.get("temperature", 0.0)), body.get("seed")) \
            if max_tokens > 0 else ([], "length")
        lps = logprobs_of(ids + new)
        if args.wrong_echo:  # prompt values shifted by one position: the count is right, the values are not
            lps = [None] + [lps[i + 1] if i + 1 < len(ids) else lps[i] for i in range(1, len(ids))] + lps[len(ids):]
        echo = body.get("echo") and not args.no_echo  # --no-echo: generated tokens only (llama.cpp #27174)
        shown = (ids + new) if echo else new
        shown_lps = lps if echo else lps[len(ids):]
        texts = [_bytes_of(tok, i).decode("utf-8", "replace") for i in shown]
        offsets, at = [], 0
        for t in texts:
            offsets.append(at)
            at += len(t)
        choice = {"index": 0, "text": "".join(texts), "finish_reason": finish, "logprobs": None}
        if body.get("logprobs") is not None:
            choice["logprobs"] = {"tokens": texts, "token_logprobs": shown_lps, "text_offset": offsets,
                                  "top_logprobs": None}
        if body.get("prompt_logprobs") is not None:  # vLLM's extension
            choice["prompt_logprobs"] = [None] + [
                {str(i): {"logprob": lp, "rank": 1, "decoded_token": _bytes_of(tok, i).decode("utf-8", "replace")}}
                for i, lp in zip(ids[1:], lps[1:len(ids)])]
        return {"id": f"cmpl-{time.time_ns()}", "object": "text_completion", "model": args.name,
                "choices": [choice], "usage": {"prompt_tokens": len(ids), "completion_tokens": len(new),
                                               "total_tokens": len(ids) + len(new)}}

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    print(f"serving on http://127.0.0.1:{args.port}/v1", flush=True)
    server.serve_forever()


def _is_text(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _byte_of_char() -> dict[str, int]:
    """Byte-level BPE's printable stand-in for each byte (GPT-2's table): printable Latin-1 bytes stand for
    themselves, the others are shifted past 255 in order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def _bytes_of(tok, i: int) -> bytes:
    """The UTF-8 bytes a byte-level BPE token stands for."""
    table = _byte_of_char()
    piece = tok.convert_ids_to_tokens(i)
    if piece in tok.all_special_tokens:
        return piece.encode()
    return bytes(table[c] for c in piece)


if __name__ == "__main__":
    main()
