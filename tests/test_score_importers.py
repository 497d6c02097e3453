"""Importers: OpenAI chat-completions logprobs, the paper's per-token layout, rbridge merge;
malformed inputs exit 2 naming file and line (through the CLI, in process)."""

import json
import math

import pytest
from click.testing import CliRunner

from rbridge.cli import main
from rbridge.errors import InputError
from rbridge.scoring.generate import INSTRUCTION
from rbridge.scoring.importers import import_openai, import_per_token, import_traces, read_records
from rbridge.scoring.traces import load_traces
from rbridge.scoring.weights import letter_weights

# Raw completion pieces (as the model emitted them) with their probabilities. The completion is
#   {"reasoning": "Caf\u00e9 \"x\" a\\b\nc \ud83d\ude00 d€ ok", "final_answer": "2"}
# with € sent as raw UTF-8 split over two tokens (bytes e2 82 | ac).
PIECES = [
    ('{"reasoning": "', 0.99), ("Caf", 0.9), ("\\u00e9", 0.5), (' \\"', 0.8), ('x\\"', 0.7),
    (" a\\\\", 0.6), ("b\\", 0.4), ("nc ", 0.3), ("\\ud83d", 0.2), ("\\ude00", 0.1), (" d", 0.95),
    (b"\xe2\x82", 0.25), (b"\xac ok", 0.35), ('", "final_answer": "2"}', 0.99)]
REASONING = 'Café "x" a\\b\nc 😀 d€ ok'
EXPECTED = [("Caf", 0.9), ("é", 0.5), (' "', 0.8), ('x"', 0.7), (" a\\", 0.6), ("b", 0.4),
            ("\nc ", 0.3), ("😀", 0.1), (" d", 0.95), ("€ ok", 0.35)]


def logprob_content(pieces=PIECES):
    out = []
    for piece, p in pieces:
        b = piece if isinstance(piece, bytes) else piece.encode()
        token = piece if isinstance(piece, str) else "".join(f"\\x{x:02x}" for x in b)
        out.append({"token": token, "logprob": math.log(p), "bytes": list(b), "top_logprobs": []})
    return out


def completion(pieces=PIECES, content=True):
    text = b"".join(p if isinstance(p, bytes) else p.encode() for p, _ in pieces).decode()
    msg = {"role": "assistant", "content": text if content else None}
    return {"id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-4o-2024-08-06",
            "choices": [{"index": 0, "message": msg, "logprobs": {"content": logprob_content(pieces)},
                         "finish_reason": "stop"}]}


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_openai_escapes_surrogates_and_split_bytes(tmp_path):
    batch_line = {"custom_id": "gsm8k-7", "response": {"status_code": 200, "body": completion()}}
    wrapped = {"id": "arc-1", "benchmark": "arc", "question": "Which?", "choices": ["a", "b"], "gold": 1,
               "response": completion(content=False)}
    messages = {"messages": [{"role": "system", "content": "s"},
                             {"role": "user", "content": "How many?" + INSTRUCTION}], **completion()}
    p = write_jsonl(tmp_path / "gsm8k.jsonl", [batch_line, wrapped, messages])
    traces = import_openai([p])
    assert [t.id for t in traces] == ["gsm8k-7", "arc-1", "gsm8k-2"]
    assert [t.benchmark for t in traces] == ["gsm8k", "arc", "gsm8k"]
    assert traces[2].question == "How many?" and traces[1].choices == ["a", "b"] and traces[1].gold == 1
    for t in traces:
        assert t.reasoning == REASONING and t.answer == "2"
        got = [(x.text, round(math.exp(x.logprob), 12)) for x in t.frontier.tokens]
        assert got == EXPECTED
    t = traces[0]
    letters = letter_weights([x.text for x in t.frontier.tokens], [x.logprob for x in t.frontier.tokens])
    assert letters[REASONING.index("é")] == pytest.approx(0.5)
    assert letters[REASONING.index("😀")] == pytest.approx(0.1)     # completed by the low surrogate
    assert letters[REASONING.index("€")] == pytest.approx(0.35)     # completed by the byte 0xac
    assert letters[REASONING.index("\n")] == pytest.approx(0.3)     # escape "\" | "n": the token with "n"
    assert t.frontier.model == "gpt-4o-2024-08-06"
    # logprobs kept exact (not rounded)
    assert t.frontier.tokens[0].logprob == math.log(0.9)


def test_openai_tokens_without_bytes_and_json_array_file(tmp_path):
    pieces = [('{"final_answer": 3, "reasoning": "1\\t', 0.5), ('2"}', 0.25)]
    comp = completion(pieces)
    for tok in comp["choices"][0]["logprobs"]["content"]:
        del tok["bytes"]
    p = tmp_path / "x.json"
    p.write_text(json.dumps([{"id": 5, "question": "q", "response": comp}], indent=1))
    (t,) = import_openai([p], benchmark="math")
    assert t.id == "5" and t.benchmark == "math" and t.answer == "3" and t.reasoning == "1\t2"
    assert [(x.text, round(math.exp(x.logprob), 9)) for x in t.frontier.tokens] == [("1\t", 0.5), ("2", 0.25)]


def test_per_token_layout_over_two_part_files(tmp_path):
    # Completions array: trace 11's tokens cover the whole JSON answer, trace 12's only its reasoning.
    comps = [{"qid": 11, "question": "Q11?", "choices": ["x", "y"], "gold": 0},
             {"qid": 12, "question": "Q12?", "reasoning": "a😀b", "final_answer": "b"}]
    (tmp_path / "arc.json").write_text(json.dumps(comps, indent=2))
    t11 = [('{"reasoning": "', 0.9), ("Hi\\n", 0.5), ("there", 0.25), ('", "final_answer": "x"}', 0.9)]
    t12 = [("a", 0.8), (b"\xf0\x9f", 0.4), (b"\x98\x80", 0.2), ("b", 0.1)]

    def row(q, i, piece, p):
        b = piece if isinstance(piece, bytes) else piece.encode()
        return {"qid": q, "idx": i, "tok": piece if isinstance(piece, str) else "?", "lp": math.log(p),
                "bytes": list(b)}

    rows11 = [row(11, i, *x) for i, x in enumerate(t11)]
    rows12 = [row(12, i, *x) for i, x in enumerate(t12)]
    # part 0: all of 11 and the first token of 12; part 1: the rest of 12, out of order
    write_jsonl(tmp_path / "tokens-part-0.jsonl", rows11 + rows12[:1])
    write_jsonl(tmp_path / "tokens-part-1.jsonl", [rows12[3], rows12[1], rows12[2]])
    files = [tmp_path / "arc.json", tmp_path / "tokens-part-0.jsonl", tmp_path / "tokens-part-1.jsonl"]
    opts = {"key": "qid", "token": "tok", "logprob": "lp", "position": "idx"}
    a, b = import_per_token(files, options=opts, model="gpt-4o")
    assert (a.id, a.benchmark, a.question, a.reasoning, a.answer) == ("11", "arc", "Q11?", "Hi\nthere", "x")
    assert a.choices == ["x", "y"] and a.gold == 0
    assert [(x.text, round(math.exp(x.logprob), 9)) for x in a.frontier.tokens] == [("Hi\n", 0.5), ("there", 0.25)]
    assert (b.reasoning, b.answer) == ("a😀b", "b")
    assert [(x.text, round(math.exp(x.logprob), 9)) for x in b.frontier.tokens] == [
        ("a", 0.8), ("", 0.4), ("😀", 0.2), ("b", 0.1)]
    # the CLI writes a file load_traces accepts
    out = tmp_path / "out.jsonl"
    r = CliRunner().invoke(main, ["traces", "import", "--format", "per-token", *map(str, files), "--out", str(out),
                                  "-o", "key=qid", "-o", "token=tok", "-o", "logprob=lp", "-o", "position=idx"])
    assert r.exit_code == 0, r.output
    assert [t.id for t in load_traces(out)] == ["11", "12"]
    # a token row whose key matches no completion
    write_jsonl(tmp_path / "tokens-part-2.jsonl", [row(99, 0, "z", 0.5)])
    with pytest.raises(InputError) as e:
        import_per_token(files + [tmp_path / "tokens-part-2.jsonl"], options=opts)
    assert e.value.file.endswith("tokens-part-2.jsonl") and e.value.line == 1


def test_rbridge_merge_and_duplicate_ids(tmp_path):
    tr = {"id": "a", "benchmark": "b", "question": "q", "reasoning": "xy", "answer": "1",
          "frontier": {"model": "m", "tokens": [{"text": "x", "logprob": -0.1}, {"text": "y", "logprob": 0}]}}
    p1 = write_jsonl(tmp_path / "1.jsonl", [tr])
    p2 = write_jsonl(tmp_path / "2.jsonl", [{**tr, "id": "c"}, "", tr])
    with pytest.raises(InputError) as e:
        import_traces("rbridge", [p1, p2], tmp_path / "o.jsonl")
    assert e.value.line == 3 and "duplicate id" in str(e.value)
    s = import_traces("rbridge", [p1, write_jsonl(tmp_path / "3.jsonl", [{**tr, "id": "c"}])], tmp_path / "o.jsonl")
    assert s["written"] == 2 and len(load_traces(tmp_path / "o.jsonl")) == 2


def test_read_records_reports_lines_in_arrays(tmp_path):
    p = tmp_path / "a.json"
    p.write_text('[\n {"a": 1},\n {"a": 2}\n]\n')
    assert read_records(p) == [(2, {"a": 1}), (3, {"a": 2})]


GOOD = completion()


def _bad_logprob():
    c = json.loads(json.dumps(GOOD))
    c["choices"][0]["logprobs"]["content"][3]["logprob"] = 0.25
    return c


def _missing_logprobs():
    c = json.loads(json.dumps(GOOD))
    del c["choices"][0]["logprobs"]["content"]
    return c


def _not_concatenating():
    c = json.loads(json.dumps(GOOD))
    c["choices"][0]["message"]["content"] = c["choices"][0]["message"]["content"].replace("Caf", "Cof")
    return c


@pytest.mark.parametrize("bad,words", [
    ('{"choices": [', "not valid JSON"),
    (_bad_logprob(), "<= 0"),
    (_missing_logprobs(), "missing required field"),
    (_not_concatenating(), "do not concatenate"),
    (completion([('{"reasoning": "x"}', 0.5)]), "final_answer"),
])
def test_malformed_openai_exit_2_with_file_and_line(tmp_path, bad, words):
    p = write_jsonl(tmp_path / "in.jsonl", [GOOD, bad])
    r = CliRunner().invoke(main, ["traces", "import", "--format", "openai", str(p), "--out",
                                  str(tmp_path / "o.jsonl")])
    assert r.exit_code == 2, r.output
    assert "in.jsonl:2" in r.output and words in r.output
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.parametrize("mutate,field,words", [
    (lambda t: t["frontier"]["tokens"].pop(), None, "do not concatenate"),
    (lambda t: t.pop("question"), "question", "missing required field"),
    (lambda t: t["frontier"]["tokens"][0].update(logprob=0.5), "logprob", "<= 0"),
])
def test_malformed_rbridge_exit_2_with_file_and_line(tmp_path, mutate, field, words):
    tr = {"id": "a", "benchmark": "b", "question": "q", "reasoning": "xy", "answer": "1",
          "frontier": {"model": "m", "tokens": [{"text": "x", "logprob": -0.1}, {"text": "y", "logprob": 0}]}}
    bad = json.loads(json.dumps(tr))
    bad["id"] = "z"
    mutate(bad)
    p = write_jsonl(tmp_path / "t.jsonl", [tr, "", bad])
    r = CliRunner().invoke(main, ["traces", "import", "--format", "rbridge", str(p), "--out", str(tmp_path / "o.jsonl")])
    assert r.exit_code == 2 and "t.jsonl:3" in r.output and words in r.output, r.output
    if field:
        assert field in r.output


def test_bad_option_and_per_token_errors(tmp_path):
    r = CliRunner().invoke(main, ["traces", "import", "--format", "per-token", str(tmp_path / "x.json"),
                                  "--out", str(tmp_path / "o"), "-o", "bogus=1"])
    assert r.exit_code == 2 and "bogus" in r.output
    (tmp_path / "c.json").write_text(json.dumps([{"id": 1}]))
    write_jsonl(tmp_path / "p.jsonl", [{"id": 1, "token": "a", "logprob": -0.1}, {"id": 1, "token": "b", "logprob": 3}])
    with pytest.raises(InputError) as e:
        import_per_token([tmp_path / "c.json", tmp_path / "p.jsonl"])
    assert e.value.line == 2 and e.value.field == "logprob"


def test_out_onto_a_directory_exits_2_before_reading(tmp_path):
    (tmp_path / "o.jsonl").mkdir()
    r = CliRunner().invoke(main, ["traces", "import", "--format", "rbridge", str(tmp_path / "missing.jsonl"),
                                  "--out", str(tmp_path / "o.jsonl")])
    assert r.exit_code == 2 and "is a directory" in r.output and "o.jsonl" in r.output, r.output
    assert [p.name for p in tmp_path.iterdir()] == ["o.jsonl"]  # no .tmp left beside it


def _pieces(text: str, size: int = 5) -> list[tuple[str, float]]:
    """``text`` cut into tokens of ``size`` characters with distinct probabilities."""
    return [(text[i:i + size], 0.5 + 0.4 * ((i // size) % 5) / 5) for i in range(0, len(text), size)]


def _tokens_concatenate(trace) -> bool:
    return "".join(t.text for t in trace.frontier.tokens) == trace.reasoning


def test_openai_free_text_completion_reasoning_is_the_content_answer_by_the_checker(tmp_path):
    """Ordinary chat completions (no JSON asked for): the reasoning is the content without surrounding
    whitespace, the answer GSM8K's #### line, else the last number (number checker), every token's
    log-probability kept on the characters it completes."""
    text = "\nNatalia sold 48/2 = 24 clips in May.\nAltogether she sold 48+24 = 72 clips.\n#### 72\n"
    plain = "Tom has 3 apples and buys 4 more, so he has 3 + 4 = 7 apples."
    p = write_jsonl(tmp_path / "gsm8k.jsonl", [completion(_pieces(text)), completion(_pieces(plain, 3))])
    first, second = import_openai([p])
    assert first.reasoning == text.strip() and first.answer == "72" and _tokens_concatenate(first)
    assert second.reasoning == plain and second.answer == "7" and _tokens_concatenate(second)
    assert first.metadata["reasoning_span"] == "text"
    # each frontier token keeps the log-probability of the server's token that completes it
    assert first.frontier.tokens[0].text == "Natal"[: len(first.frontier.tokens[0].text)]
    lps = {round(t.logprob, 9) for t in first.frontier.tokens}
    assert lps <= {round(math.log(p), 9) for _, p in _pieces(text)}


def test_openai_think_block_and_reasoning_content(tmp_path):
    think = "<think>\nAdd 2 and 3 to get 5.\n</think>\n\nThe answer is 5."
    rc_reasoning, rc_content = "Add 2 and 3 to get 5.", "\\boxed{5}"
    rc = completion(_pieces(rc_reasoning + rc_content, 4))
    rc["choices"][0]["message"] = {"role": "assistant", "content": rc_content, "reasoning_content": rc_reasoning}
    p = write_jsonl(tmp_path / "arith.jsonl", [completion(_pieces(think, 4)), rc])
    a, b = import_openai([p])
    assert (a.reasoning, a.answer, a.metadata["reasoning_span"]) == ("Add 2 and 3 to get 5.", "The answer is 5.",
                                                                      "think")
    assert (b.reasoning, b.answer, b.metadata["reasoning_span"]) == (rc_reasoning, "5", "reasoning_content")
    assert _tokens_concatenate(a) and _tokens_concatenate(b)


def test_openai_reasoning_without_logprobs_and_empty_content_are_refused(tmp_path):
    only_answer = completion(_pieces("The answer is 5.", 4))
    only_answer["choices"][0]["message"]["reasoning_content"] = "Add 2 and 3."
    empty = completion([("  ", 0.5), ("\n", 0.9)])
    for bad, words in ((only_answer, "do not cover the reasoning"), (empty, "no reasoning text")):
        p = write_jsonl(tmp_path / "in.jsonl", [completion(_pieces("1 + 1 = 2", 3)), bad])
        r = CliRunner().invoke(main, ["traces", "import", "--format", "openai", str(p), "--out",
                                      str(tmp_path / "o.jsonl")])
        assert r.exit_code == 2 and "in.jsonl:2" in r.output and words in r.output, r.output
        assert not (tmp_path / "o.jsonl").exists()
