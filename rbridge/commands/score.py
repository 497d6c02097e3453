"""`rbridge score` and `rbridge traces generate|import` (thin wrappers over rbridge.scoring)."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.table import Table

from rbridge.commands._base import console, err_console, guard, main
from rbridge.errors import InputError
from rbridge.scoring.config import AGGREGATES, CONTEXTS, METRICS, MINMAX, ScoreOptions

_PATH = click.Path(path_type=Path)


@main.command()
@click.option("--model", "model_path", required=True, type=_PATH,
              help="Hugging Face causal LM directory, a .gguf file (or a directory holding one), or a plan's "
                   "run folder (stores/<plan>.runs/<stage>/<candidate>: its exported proxy).")
@click.option("--traces", "traces_path", required=True, type=_PATH, help="rbridge traces JSONL.")
@click.option("--context", type=click.Choice(CONTEXTS), default=ScoreOptions().context,
              show_default=True, help="What the proxy sees before the reasoning (after BOS).")
@click.option("--fewshot-k", type=click.IntRange(min=0), default=3, show_default=True,
              help="Solved examples in the fewshot context (same benchmark, never the scored trace).")
@click.option("--minmax", type=click.Choice(MINMAX), default=ScoreOptions().minmax, show_default=True,
              help="How the frontier's token weights are scaled to [0, 1] before weighting the NLL: per trace "
                   "(the paper's algorithm), over the whole benchmark (a draft of the paper), or none (raw "
                   "weights). METHOD.md section 2.")
@click.option("--aggregate", type=click.Choice(AGGREGATES), default=ScoreOptions().aggregate, show_default=True,
              help="A trace's score: mean (sum of weighted NLLs over the number of tokens: the paper's) or "
                   "weighted (over the sum of the weights).")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True,
              help="auto: bf16 where forward passes of this model measured at least 1.15x fp32's speed on "
                   "this machine (measured once per machine and model shape, cached; RBRIDGE_BF16_SPEEDUP=X "
                   "gives the ratio instead), else fp32, also for a model saved in bf16 (its weights upcast, exactly); "
                   "fp32 for exact comparisons.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True,
              help="Traces per forward pass (memory, not results: scores do not depend on it).")
@click.option("--max-length", type=click.IntRange(min=2), default=None,
              help="Window length for long traces (default: the model's maximum positions).")
@click.option("--baselines/--no-baselines", default=True, show_default=True,
              help="Label NLL and multiple-choice baselines where the traces allow them.")
@click.option("--accuracy", is_flag=True,
              help="Also greedy-generation accuracy for benchmarks with an answer checker (GSM8K); slow.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=128, show_default=True,
              help="Generation budget for --accuracy.")
@click.option("--per-trace", is_flag=True, help="Include per-trace values in --json output.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, ...")
@click.option("--no-cache", is_flag=True, help="Neither read nor write the score cache.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@guard
def score(model_path: Path, traces_path: Path, context: str, fewshot_k: int, minmax: str, aggregate: str,
          precision: str, batch_size: int, max_length: int | None, baselines: bool, accuracy: bool,
          max_new_tokens: int, per_trace: bool, device: str, no_cache: bool, as_json: bool) -> None:
    """Score any local causal LM on frontier traces (rBridge and baselines; lower NLL is better)."""
    from rbridge.scoring.api import score_file

    doc, cached = score_file(model_path, traces_path, context=context, minmax=minmax, aggregate=aggregate,
                             precision=precision, batch_size=batch_size, fewshot_k=fewshot_k,
                             max_length=max_length, baselines=baselines, accuracy=accuracy,
                             max_new_tokens=max_new_tokens, per_trace=per_trace, device=device,
                             use_cache=not no_cache)
    doc["cached"] = cached
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    table = Table(title=f"rbridge score - {doc['model']} on {traces_path.name} (nats, lower is better)"
                        + (" [cached]" if cached else ""))
    values = (*METRICS, "label_nll", "norm_correct_prob", "acc_cloze", "acc_greedy")
    cols = ("benchmark", *values, "traces", "tokens")
    for c in cols:
        table.add_column(c, justify="left" if c == "benchmark" else "right")
    for name, b in doc["benchmarks"].items():
        def f(k):
            return "-" if b.get(k) is None else f"{b[k]:.4f}"
        table.add_row(name, *(f(k) for k in values), str(b["n_traces"]), f"{b['n_tokens']:,}")
    console.print(table)
    first = next(iter(doc["benchmarks"].values()))
    console.print(f"context {first['context']}, minmax {first['minmax']}, aggregate {first['aggregate']}"
                  + (f", computed in {doc['precision']}" if doc.get("precision") else "")
                  + ("; from the cache (--no-cache to recompute)" if cached
                     else f"; scored in {doc['seconds']['score']:.1f} s"))


@main.group()
def traces() -> None:
    """Make or convert frontier traces (canonical rbridge JSONL)."""


@traces.command("generate")
@click.option("--model", "model", required=True,
              help="Frontier model: a HF directory or .gguf file; with --endpoint, the model name the server serves.")
@click.option("--questions", "questions_path", required=True, type=_PATH,
              help="Questions JSONL (question, optional answer/solution/label/id).")
@click.option("--out", "out_path", required=True, type=_PATH,
              help="Traces JSONL to write (with --endpoint: appended to, and a rerun skips what it holds).")
@click.option("--endpoint", default=None, metavar="URL",
              help="An OpenAI-compatible server's API root (vLLM, SGLang, llama.cpp, a hosted API), such as "
                   "http://localhost:8000/v1: the server answers, with token log-probabilities.")
@click.option("--chat/--completions", "chat", default=True, show_default=True,
              help="With --endpoint: /chat/completions with the paper's messages, or /completions with a raw text "
                   "prompt (the system line, question and instruction; no chat template) for base models.")
@click.option("--concurrency", type=click.IntRange(min=1), default=None,
              help="With --endpoint: requests in flight at once [default: 4].")
@click.option("--temperature", type=click.FloatRange(min=0.0, max=2.0), default=None,
              help="With --endpoint: sampling temperature [default: 0, greedy].")
@click.option("--top-p", type=click.FloatRange(min=0.0, max=1.0, min_open=True), default=None,
              help="With --endpoint: nucleus sampling mass [default: 1].")
@click.option("--seed", type=int, default=None, help="With --endpoint: the sampling seed sent [default: 0].")
@click.option("--api-key-env", default=None, metavar="VAR",
              help="With --endpoint: the environment variable holding the API key (sent as a Bearer token).")
@click.option("--retries", type=click.IntRange(min=0), default=None,
              help="With --endpoint: tries again after a 429, a 5xx, a timeout or a refused connection, with "
                   "exponential backoff [default: 6, about 30 s in all].")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=1.0), default=None,
              help="With --endpoint: seconds to wait for one answer [default: 600].")
@click.option("--rescore", is_flag=True,
              help="Teacher force the questions' worked solutions instead of generating (local model).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the first N questions.")
@click.option("--task", default="grade school math", show_default=True,
              help="The [task] of the paper's system prompt.")
@click.option("--benchmark", default=None, help="Benchmark name (default: from the questions file name).")
@click.option("--max-new-tokens", "--max-tokens", "max_new_tokens", type=click.IntRange(min=1), default=512,
              show_default=True, help="Longest completion generated per question (tokens).")
@click.option("--assistant-format", type=click.Choice(["plain", "json"]), default="plain", show_default=True,
              help="With --rescore: the assistant turn is the solution, or the paper's JSON object.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, ... (local model).")
@click.option("--json", "as_json", is_flag=True, help="With --endpoint: print the summary as JSON.")
@guard
def traces_generate(model: str, questions_path: Path, out_path: Path, endpoint: str | None, chat: bool,
                    concurrency: int | None, temperature: float | None, top_p: float | None, seed: int | None,
                    api_key_env: str | None, retries: int | None, timeout_s: float | None, rescore: bool,
                    limit: int | None, task: str, benchmark: str | None, max_new_tokens: int, assistant_format: str,
                    device: str, as_json: bool) -> None:
    """Write frontier traces: the paper's JSON prompt, with token log-probabilities.

    With a local model (HF directory or .gguf): greedy generation in this process. With --endpoint: an
    OpenAI-compatible server answers, --concurrency requests at a time, retried on 429/5xx/timeouts; each
    finished trace is appended to --out at once with the exact request it came from, and the same command
    run again skips the questions done (keyed by question, prompt, model and sampling settings).
    """
    ctx = click.get_current_context()
    server_only = {"concurrency": concurrency, "temperature": temperature, "top_p": top_p, "seed": seed,
                   "api_key_env": api_key_env, "retries": retries, "timeout_s": timeout_s}
    if endpoint is None:
        given = [k for k, v in server_only.items() if v is not None]
        if ctx.get_parameter_source("chat") == click.core.ParameterSource.COMMANDLINE:
            given.append("chat")
        if given:
            names = {"chat": "--chat/--completions", "timeout_s": "--timeout"}
            raise InputError("only with --endpoint (a local model generates greedily in this process)",
                             field=", ".join(names.get(k, "--" + k.replace("_", "-")) for k in given))
        _generate_local(Path(model), questions_path, out_path, rescore, limit, task, benchmark, max_new_tokens,
                        assistant_format, device)
        return
    for flag, name in ((rescore, "--rescore"), (ctx.get_parameter_source("device") ==
                                                 click.core.ParameterSource.COMMANDLINE, "--device"),
                       (ctx.get_parameter_source("assistant_format") == click.core.ParameterSource.COMMANDLINE,
                        "--assistant-format")):
        if flag:
            raise InputError("is for a local model; with --endpoint see `rbridge traces rescore` for existing "
                             "solutions" if name == "--rescore" else "is for a local model, not --endpoint",
                             field=name)
    _generate_on_server(model, questions_path, out_path, endpoint, "chat" if chat else "completions",
                        concurrency or 4, temperature, top_p, seed, api_key_env, retries, timeout_s, limit, task,
                        benchmark, max_new_tokens, as_json)


def _generate_local(model_path: Path, questions_path: Path, out_path: Path, rescore: bool, limit: int | None,
                    task: str, benchmark: str | None, max_new_tokens: int, assistant_format: str,
                    device: str) -> None:
    from rbridge.scoring.generate import main_generate

    def progress(i, n):
        err_console.print(f"  {i}/{n}", end="\r")

    s = main_generate(model_path, questions_path, out_path, rescore=rescore, limit=limit, benchmark=benchmark,
                      task=task, max_new_tokens=max_new_tokens, assistant_format=assistant_format,
                      device=device, progress=progress)
    console.print(f"{s['out']}: {s['written']} traces ({s['method']}, benchmark {s['benchmark']}, "
                  f"model {s['model']}), {len(s['dropped'])} dropped, {len(s['retried'])} retried, "
                  f"{s['mean_frontier_tokens']:.1f} frontier tokens per trace, {s['seconds']} s")
    if s["dropped"]:
        console.print(f"dropped (malformed twice): {', '.join(s['dropped'])}")


def _generate_on_server(model: str, questions_path: Path, out_path: Path, endpoint: str, mode: str,
                        concurrency: int, temperature: float | None, top_p: float | None, seed: int | None,
                        api_key_env: str | None, retries: int | None, timeout_s: float | None, limit: int | None,
                        task: str, benchmark: str | None, max_tokens: int, as_json: bool) -> None:
    import sys

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from rbridge.scoring.server import Endpoint, Sampling, ServerError, api_key, base_url, generate_from_server

    base_url(endpoint)  # a wrong URL or key variable: exit 2 before anything else
    key = api_key(api_key_env)
    sampling = Sampling(max_tokens=max_tokens, temperature=0.0 if temperature is None else temperature,
                        top_p=1.0 if top_p is None else top_p, seed=0 if seed is None else seed)
    ep = Endpoint(endpoint, model, key, retries=6 if retries is None else retries,
                  timeout_s=600.0 if timeout_s is None else timeout_s)
    started = [0.0]
    with Progress(TextColumn("[bold]traces"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                  TimeElapsedColumn(), console=err_console, transient=True,
                  disable=as_json or not err_console.is_terminal) as bar:
        task_id = bar.add_task("traces", total=None, rate="")

        def progress(done: int, total: int, tokens: int) -> None:
            import time

            if not started[0]:
                started[0] = time.time()
            rate = tokens / max(1e-9, time.time() - started[0])
            bar.update(task_id, completed=done, total=total, rate=f"{rate:,.0f} tokens/s")

        try:
            s = generate_from_server(ep, questions_path, out_path, sampling=sampling, mode=mode,
                                     concurrency=concurrency, limit=limit, benchmark=benchmark, task=task,
                                     progress=progress)
        except ServerError as exc:
            from rbridge.scoring.server import read_done

            _keys, _settings, n = read_done(Path(out_path))
            err_console.print(f"error: {exc}\n{out_path}: {n} traces kept; run the same command again to continue",
                              soft_wrap=True, markup=False)
            sys.exit(1)
        except KeyboardInterrupt:
            err_console.print(f"interrupted; the finished traces are in {out_path}: run the same command again to "
                              "continue")
            sys.exit(130)
        finally:
            ep.close()
    if as_json:
        console.print_json(json.dumps(s.to_json()))
        return
    console.print(f"{s.out}: {s.written} traces written, {s.skipped} already there, {len(s.dropped)} dropped "
                  f"(malformed twice), {s.retried_answers} answers asked again, {s.retried_requests} requests "
                  f"retried; model {s.model}, {s.completion_tokens:,} completion tokens in {s.seconds} s")
    for d in s.dropped:
        console.print(f"  dropped: {d}")


@traces.command("rescore")
@click.argument("traces_path", type=_PATH)
@click.option("--endpoint", required=True, metavar="URL",
              help="An OpenAI-compatible server's API root, such as http://localhost:8000/v1.")
@click.option("--model", required=True, help="The model name the server serves.")
@click.option("--out", "out_path", required=True, type=_PATH, help="Traces JSONL to write (written at the end).")
@click.option("--task", default="grade school math", show_default=True,
              help="The [task] of the paper's system line in the prompt before each reasoning.")
@click.option("--concurrency", type=click.IntRange(min=1), default=4, show_default=True,
              help="Requests in flight at once.")
@click.option("--api-key-env", default=None, metavar="VAR",
              help="The environment variable holding the API key (sent as a Bearer token).")
@click.option("--retries", type=click.IntRange(min=0), default=6, show_default=True,
              help="Tries again after a 429, a 5xx, a timeout or a refused connection, with exponential backoff.")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=1.0), default=600.0, show_default=True,
              help="Seconds to wait for one answer.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@guard
def traces_rescore(traces_path: Path, endpoint: str, model: str, out_path: Path, task: str, concurrency: int,
                   api_key_env: str | None, retries: int, timeout_s: float, as_json: bool) -> None:
    """The server's token log-probabilities for traces that already exist (worked solutions written by
    people, traces of another model), teacher forced after a raw-text prompt through /completions
    (`echo` with max_tokens 1, or vLLM's `prompt_logprobs`).

    The server is probed first: it generates a few greedy tokens, then its prompt log-probabilities of
    the same text must give the same tokens and values (within 0.1 nats). A server that fails is refused,
    naming what it did, and nothing is written (llama-cpp-python's server echoes wrong values).
    """
    import sys

    from rbridge.scoring.server import Endpoint, ServerError, api_key, base_url, rescore_on_server

    base_url(endpoint)
    ep = Endpoint(endpoint, model, api_key(api_key_env), retries=retries, timeout_s=timeout_s)
    try:
        s = rescore_on_server(ep, traces_path, out_path, task=task, concurrency=concurrency)
    except ServerError as exc:
        err_console.print(f"error: {exc}\nnothing written to {out_path}", soft_wrap=True, markup=False)
        sys.exit(1)
    finally:
        ep.close()
    if as_json:
        console.print_json(json.dumps(s))
        return
    console.print(f"{s['out']}: {s['written']} traces rescored by {s['model']} ({s['probe']['method']}; probe: "
                  f"{s['probe']['tokens']} generated tokens echoed within {s['probe']['max_abs_diff']:.2g} nats), "
                  f"{s['seconds']} s")


@traces.command("import")
@click.option("--format", "fmt", required=True, type=click.Choice(["openai", "per-token", "rbridge"]),
              help="Input format (see rbridge.scoring.importers).")
@click.argument("files", nargs=-1, required=True, type=_PATH)
@click.option("--out", "out_path", required=True, type=_PATH, help="rbridge traces JSONL to write.")
@click.option("--benchmark", default=None, help="Benchmark name where the input does not give one.")
@click.option("--model", "model_name", default=None, help="Frontier model name where the input does not give one.")
@click.option("--option", "-o", "options", multiple=True, metavar="NAME=VALUE",
              help="per-token field names, e.g. -o key=qid -o token=tok (repeatable).")
@guard
def traces_import(fmt: str, files: tuple[Path, ...], out_path: Path, benchmark: str | None,
                  model_name: str | None, options: tuple[str, ...]) -> None:
    """Convert OpenAI logprob output, the paper's per-token layout, or rbridge files to rbridge JSONL.

    \b
    --format openai: chat completions requested with logprobs: true (a JSONL file, a JSON
    array or one object; Batch API output lines too). The frontier tokens are the
    completion's logprobs.content; the reasoning span is, in order:
      json               the "reasoning" string of the paper's JSON answer
                         ({"reasoning": ..., "final_answer": ...}), answer its final_answer
      reasoning_content  a server's separate reasoning field (vLLM, SGLang reasoning
                         parsers) when the logprobs cover it followed by the content;
                         the answer is found in the content
      think              the text inside <think>...</think>; answer found after it
      text               otherwise the whole content, without whitespace at its ends
    The answer is found as: the text after the last ####, else the last \\boxed{...},
    else (benchmarks named gsm8k...) the last number, else the answer text itself
    (reasoning_content and think, up to 200 characters), else empty. Each trace
    records its rule in metadata.reasoning_span. A completion whose tokens do not
    concatenate to its content, or whose logprobs miss the reasoning, is refused.
    """
    from rbridge.scoring.importers import import_traces

    opts = {}
    for o in options:
        name, sep, value = o.partition("=")
        if not sep or not name:
            raise InputError(f"expected NAME=VALUE, got {o!r}", field="--option")
        opts[name.strip()] = value.strip()
    if opts and fmt != "per-token":
        raise InputError("--option applies to --format per-token only", field="--option")
    s = import_traces(fmt, list(files), out_path, options=opts or None, benchmark=benchmark, model=model_name)
    per = ", ".join(f"{k} {v}" for k, v in s["benchmarks"].items())
    console.print(f"{s['out']}: {s['written']} traces ({per}), {s['frontier_tokens']:,} frontier tokens")
    if s.get("skipped_no_tokens"):
        console.print(f"skipped {len(s['skipped_no_tokens'])} completions without token rows: "
                      f"{', '.join(s['skipped_no_tokens'][:10])}{' ...' if len(s['skipped_no_tokens']) > 10 else ''}")
