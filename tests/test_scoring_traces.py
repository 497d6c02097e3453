"""Trace files: validation with file:line errors, round trips, and the JSON reasoning importer."""

import json
import math

import pytest

from rbridge.errors import InputError
from rbridge.scoring.generate import (find_reasoning, load_questions, reasoning_tokens,
                                      split_by_offsets, split_gsm8k_answer)
from rbridge.scoring.traces import Trace, load_traces, write_traces

ln = math.log


def good(**over):
    t = {"id": "g-1", "benchmark": "gsm8k", "question": "1+1?", "reasoning": "1+1=2",
         "answer": "2", "frontier": {"model": "m", "tokens": [
             {"text": "1+1", "logprob": -0.5}, {"text": "=2", "logprob": 0.0}]}}
    t.update(over)
    return t


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_round_trip(tmp_path):
    p = write_lines(tmp_path / "t.jsonl", [json.dumps(good()), "",
                                           json.dumps(good(id="g-2", answer=2, label="x",
                                                           metadata={"method": "rescored"}))])
    traces = load_traces(p)
    assert [t.id for t in traces] == ["g-1", "g-2"]
    assert traces[1].answer == "2" and traces[1].metadata == {"method": "rescored"}
    out = tmp_path / "out.jsonl"
    write_traces(out, traces)
    assert load_traces(out) == traces
    first = json.loads(out.read_text(encoding="utf-8").splitlines()[0])
    assert "label" not in first and "metadata" not in first


@pytest.mark.parametrize("line2, field, words", [
    ("{not json", None, "not valid JSON"),
    (json.dumps({k: v for k, v in good().items() if k != "reasoning"}), "reasoning", "missing"),
    (json.dumps(good(frontier={"model": "m"})), "frontier.tokens", "missing"),
    (json.dumps(good(reasoning="1+1=3")), None, "do not concatenate"),
    (json.dumps(good(frontier={"model": "m", "tokens": [
        {"text": "1+1", "logprob": -0.5}, {"text": "=2", "logprob": 0.25}]})),
     "frontier.tokens[1].logprob", "<= 0"),
    (json.dumps(good(reasoning="", frontier={"model": "m", "tokens": []})), "reasoning", "empty"),
    (json.dumps(good(choices=["a"], gold=3)), None, "gold"),
    ("[1, 2]", None, "JSON object"),
    (json.dumps(good(id="g-0")), "id", "duplicate"),
])
def test_malformed_files_name_file_and_line(tmp_path, line2, field, words):
    p = write_lines(tmp_path / "bad.jsonl", [json.dumps(good(id="g-0")), line2])
    with pytest.raises(InputError) as e:
        load_traces(p)
    err = e.value
    assert err.file == str(p) and err.line == 2 and err.field == field
    assert words in err.message
    assert str(err).startswith(f"{p}:2")


def test_empty_reasoning_has_a_clear_message(tmp_path):
    p = write_lines(tmp_path / "e.jsonl", [json.dumps(good(reasoning="", frontier={"model": "m", "tokens": []}))])
    with pytest.raises(InputError, match=r"e\.jsonl:1: reasoning: reasoning is empty"):
        load_traces(p)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_traces(tmp_path / "nope.jsonl")
    with pytest.raises(InputError, match="no traces"):
        load_traces(write_lines(tmp_path / "blank.jsonl", [""]))


def test_nan_logprob_rejected():
    with pytest.raises(Exception):
        Trace.model_validate(good(frontier={"model": "m", "tokens": [
            {"text": "1+1", "logprob": float("nan")}, {"text": "=2", "logprob": 0.0}]}))


# ---- the JSON reasoning span inside a frontier token stream

def test_json_escapes_map_back_to_characters_and_tokens():
    texts = ['{"reasoning": "caf', '\\u00e9', ' \\ud83d', '\\ude00 ok\\', 'n2',
             '\\"x\\"', '", "final_answer": "2"}']
    probs = [0.9, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05]
    found = find_reasoning("".join(texts))
    assert found is not None
    chars, ends, final = found
    assert "".join(chars) == 'café 😀 ok\n2"x"' and final == "2"
    toks = reasoning_tokens(texts, [ln(p) for p in probs], (chars, ends))
    # é comes whole from token 1; 😀 is completed by token 3 (low surrogate);
    # the escape \n is split "\" | "n" and belongs to token 4, which completes it.
    assert [(t.text, round(math.exp(t.logprob), 4)) for t in toks] == [
        ("caf", 0.9), ("é", 0.5), (" ", 0.4), ("😀 ok", 0.3), ("\n2", 0.2), ('"x"', 0.1)]
    assert "".join(t.text for t in toks) == 'café 😀 ok\n2"x"'


def test_find_reasoning_tolerates_wrappers_and_rejects_malformed():
    out = 'Sure!\n```json\n{ "final_answer": 72, "reasoning": "a\\tb\\\\c\\/d" }\n```'
    chars, ends, final = find_reasoning(out)
    assert "".join(chars) == "a\tb\\c/d" and final == 72
    assert ends[-1] == out.index('" }')
    assert find_reasoning('{"reasoning": "unterminated') is None
    assert find_reasoning('{"reasoning": "no answer"}') is None
    assert find_reasoning('{"reasoning": "  ", "final_answer": "1"}') is None
    assert find_reasoning('{"reasoning": "\\ud83d alone", "final_answer": "1"}') is None
    assert find_reasoning("no json at all") is None


def test_split_by_offsets_completing_token():
    # byte-level: token 0 = "a" + first bytes of 😀 (reports (0, 2)), token 1 = rest (1, 2)
    assert split_by_offsets("a😀b", [(0, 2), (1, 2), (2, 3)]) == ["a", "😀", "b"]
    # a character no token covers goes to the next token
    assert split_by_offsets("a b", [(0, 1), (2, 3)]) == ["a", " b"]
    assert split_by_offsets("ab ", [(0, 1), (1, 2)]) == ["a", "b "]


def test_gsm8k_answers_and_questions_file(tmp_path):
    sol, ans = split_gsm8k_answer("She sells 16 - 3 - 4 = <<16-3-4=9>>9 eggs.\nSo $<<9*2=18>>18.\n#### 18")
    assert sol == "She sells 16 - 3 - 4 = 9 eggs.\nSo $18." and ans == "18"
    p = write_lines(tmp_path / "q.jsonl", [
        json.dumps({"question": "Q0?", "answer": "A is <<1+1=2>>2\n#### 2"}), "",
        json.dumps({"question": "Q1?", "answer": "7", "id": "x"}),
        json.dumps({"question": "Q2?"})])
    qs = load_questions(p, benchmark="gsm8k")
    assert [(q.id, q.solution, q.answer) for q in qs] == [
        ("gsm8k-0", "A is 2", "2"), ("x", None, "7"), ("gsm8k-2", None, None)]
    assert qs[0].label == "A is <<1+1=2>>2\n#### 2"
    assert len(load_questions(p, benchmark="gsm8k", limit=1)) == 1
    bad = write_lines(tmp_path / "bad.jsonl", [json.dumps({"question": "ok"}), json.dumps({"q": 1})])
    with pytest.raises(InputError) as e:
        load_questions(bad, benchmark="b")
    assert e.value.line == 2 and e.value.field == "question"
