"""Local worker processes: `rbridge plan` uses the whole machine.

The runs of a rung that are ready train at the same time in ``rbridge worker``
processes on this machine, beside the plan's own worker: the same claim protocol
as workers on other machines (rbridge.planner.worker), so a run's numbers, and
the decisions made from them, do not depend on how many processes share the
plan. How many: on a CPU, the cores divided by the threads one run uses (one
thread for small proxies: ``threads_for``); on GPUs, the GPUs
times ``runs_per_gpu``, each process seeing its one GPU.

The processes start before the plan prepares its data, and wait: each imports
torch, transformers and Accelerate (seconds) while the plan process reads and
checks its inputs, then blocks on its stdin until ``release()`` writes that the
store and the plan row exist, so the first rung's runs start together. Closing
stdin without a word (a plan that failed its checks) makes them exit quietly.

While the plan runs, a process that has nothing to claim (its rung's other runs
still training elsewhere) waits for news rather than sleeping a whole poll
interval: the plan writes a newline to the processes' stdin whenever it sees the
plan move (``nudge``: a run recorded, a rung decided), and it wakes itself on any
line a process prints (each prints when it claims, records or decides). At every
rung's end the next rung starts within milliseconds, not up to ``RBRIDGE_POLL_S``
(2 s) later; the polls remain, for workers on other machines.

Each process's lines are relayed through the plan's reporter, prefixed with
``w<i>|``. A polite stop of the plan (SIGTERM, Ctrl-C) is passed on to them;
when the plan ends they exit by themselves (``--until-idle``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from rbridge.reporting import SILENT, Reporter

_DEFAULT_THREADS = torch.get_num_threads()  # before anything sets it
# Below this many non-embedding parameters CPU proxies train one thread a run, as many runs at once as
# there are cores: a second thread speeds one small run up by less than a second run side by side does,
# whose products run at the core's own rate. benchmarks/proxy_throughput.py on a 2-core AMD EPYC (family 25
# model 17, 2026-12-05, fp32, medians of 3 rounds), one run at 1 thread / at 2 threads: 0.5M 10.0k / 18.5k
# tokens/s, 2M 4.1k / 7.1k, 8M 1.36k / 2.44k; two one-thread runs side by side each train at the one-thread
# rate (0.5M bf16: 13.1k and 12.7k against 12.7k alone, the same minute). (An older machine and torch
# gave 0.5M 5.9k on 1 thread against 3.4k on 2.) benchmarks/plan_throughput.py has the whole plans.
SMALL_PROXY_PARAMS = 10_000_000


# The number of rbridge processes sharing this GPU host's cores, set by `rbridge plan` for its local processes
HOST_PROCESSES_ENV = "RBRIDGE_HOST_PROCESSES"


def threads_for(non_embedding_params: int, requested: int | None = None, host_processes: int | None = None) -> int:
    """CPU threads one run of a stage's proxies uses: ``requested`` (the CLI's --threads) wins;
    otherwise one thread for small proxies on a CPU-only machine (the other cores run other runs
    in other local processes). On a GPU host, torch's default divided among the ``host_processes``
    processes sharing it (default: ``RBRIDGE_HOST_PROCESSES``, which `rbridge plan` gives its local
    processes, else 1): there a run's CPU work is the Python that launches kernels, the data and the
    host side of scoring, and with ``runs_per_gpu: 4`` four processes at torch's default would run four
    times as many threads as cores, each one's spinning OpenMP threads taking the cores the others'
    kernel launches wait for. Else torch's default. Fixed per stage, so a resumed stage computes with
    the same thread count."""
    if requested:
        return requested
    if torch.cuda.is_available():
        if host_processes is None:
            value = os.environ.get(HOST_PROCESSES_ENV, "")
            host_processes = int(value) if value.isdigit() else 1
        return max(1, _DEFAULT_THREADS // max(1, host_processes))
    if non_embedding_params < SMALL_PROXY_PARAMS:
        return 1
    return _DEFAULT_THREADS


@dataclass(frozen=True)
class Layout:
    """How many local processes serve a plan (the plan's own worker included) and what each sees."""

    processes: int
    gpus: int
    runs_per_gpu: int
    threads: int | None  # CPU threads per run when fixed for every stage; None: per stage (threads_for)

    def child_env(self, index: int) -> dict[str, str]:
        """Environment of local process ``index`` (1-based; 0 is the plan's own worker)."""
        env = dict(os.environ, RBRIDGE_LOCAL_WORKER=str(index))
        if self.gpus:
            env[HOST_PROCESSES_ENV] = str(self.processes)  # their CPU threads: threads_for
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            ids = visible.split(",") if visible else [str(i) for i in range(self.gpus)]
            env["CUDA_VISIBLE_DEVICES"] = ids[index % self.gpus]
        return env


# Below this much work in a whole plan (plan_work_flops: training and scoring, every candidate in every
# stage: an upper bound) no second local process is started: it would spend seconds of CPU importing
# torch, transformers and Accelerate (about 4 s on the 2-core development machine) for a plan that is
# over in about that time. benchmarks/local_workers.py on that machine (Intel Xeon family 6 model 167,
# 2 cores, idle, 2026-12-03), a two-stage plan of tiny proxies (hidden 16 then 32, one layer), medians
# of 3, wall of two processes / wall of one: 2.6 GFLOP (2,048 tokens a run, 6 traces) 1.05x, with 1.7x
# the CPU; 28 GFLOP (32,768 tokens, 6 traces) 0.88x; 36 GFLOP (2,048 tokens, 200 traces) 0.93x; 62 GFLOP
# 0.87x. The threshold sits below the sizes where the second process already paid.
LOCAL_WORKERS_FROM_FLOPS = 1e10


def plan_work_flops(stages, n_candidates: int, vocab_size: int | None, trace_tokens: int) -> float | None:
    """An upper bound of a plan's compute: per run 6·N·D of training and 2·N per scored token at every
    rung, with N every parameter of the stage's proxy (embedding and output layer included: for tiny
    proxies they are most of it), every candidate in every stage (before any pruning), each stage's full
    tokens; ``trace_tokens`` bounds the tokens of one scoring of all benchmarks (UTF-8 bytes of the
    contexts and reasonings: a byte-level tokenizer makes at most one token of a byte). None when the
    vocabulary is not known before the data is prepared (a tokenizer loaded from a folder) or a stage
    generates (accuracy): no estimate, every core is used."""
    if vocab_size is None or any(st.evaluate for st in stages):
        return None
    from rbridge.proxy.config import count_params  # a leaf: no transformers

    total = 0.0
    for st in stages:
        n = len(st.candidates) if st.candidates else n_candidates
        params = count_params(st.proxy.llama_values(st.training.seq_len), vocab_size=vocab_size)[0]
        total += n * params * (6.0 * st.training.tokens + 2.0 * trace_tokens * st.pruning.evals)
    return total


def too_small_for_workers(work_flops: float | None) -> bool:
    """Whether a plan of ``work_flops`` (:func:`plan_work_flops`; None: unknown) is done by its own process alone."""
    return work_flops is not None and work_flops < LOCAL_WORKERS_FROM_FLOPS


def trace_tokens_bound(benchmarks, traces: dict) -> int:
    """At most how many tokens one scoring of every benchmark feeds a byte-level tokenizer's model: the
    UTF-8 bytes of each trace's question and reasoning, and for a few-shot context three more traces."""
    total = 0
    for b in benchmarks:
        group = traces.get(b.name, [])
        n = sum(len(t.question.encode()) + len(t.reasoning.encode()) + 2 for t in group)
        total += n * (4 if b.context == "fewshot" else 1)
    return total


def layout(requested: int | None, stage_threads: list[int], runs_per_gpu: int = 1,
           work_flops: float | None = None) -> Layout:
    """The local processes for a plan: ``requested`` (``--workers``) wins; else every core or GPU is used,
    unless the plan's whole work (``work_flops``, :func:`plan_work_flops`) is below
    ``LOCAL_WORKERS_FROM_FLOPS``: then the plan's own process does it alone.

    ``stage_threads``: the CPU threads one run of each stage uses; the most of them
    decides how many runs fit on the cores at once.
    """
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if requested is not None:
        n = requested
    elif too_small_for_workers(work_flops):
        n = 1
    elif gpus:
        n = gpus * max(1, runs_per_gpu)
    else:
        n = max(1, (os.cpu_count() or 1) // max(stage_threads or [1]))
    return Layout(processes=max(1, n), gpus=gpus, runs_per_gpu=runs_per_gpu,
                  threads=stage_threads[0] if len(set(stage_threads)) == 1 else None)


def stdin_waiter(poll: Callable[[float], None] = time.sleep) -> Callable[[float], None]:
    """For a local process (``rbridge worker --ready-on-stdin``): wait up to the given seconds, waking
    early on a line from the plan (``LocalWorkers.nudge``); once the plan closes stdin, or where pipes
    cannot be selected (Windows), plain ``poll``. Reads the descriptor itself: no buffer hides a nudge."""
    import select

    fd = sys.stdin.fileno()
    state = {"open": True}

    def wait(seconds: float) -> None:
        if not state["open"]:
            return poll(seconds)
        try:
            ready, _, _ = select.select([fd], [], [], seconds)
            if ready and not os.read(fd, 65536):
                state["open"] = False  # end of input: the plan is ending
        except (OSError, ValueError):
            state["open"] = False
            poll(seconds)
    return wait


def read_line_from_stdin() -> str:
    """One line of stdin read from the descriptor, byte by byte (nothing buffered past it); '' at its end."""
    fd, out = sys.stdin.fileno(), bytearray()
    while not out.endswith(b"\n"):
        b = os.read(fd, 1)
        if not b:
            break
        out += b
    return out.decode()


class LocalWorkers:
    """``rbridge worker --until-idle`` processes serving one plan, for the life of a ``with`` block."""

    def __init__(self, store_url: str, plan: str, plan_layout: Layout, heartbeat_timeout: float,
                 threads: int | None = None, report: Reporter = SILENT):
        self.store_url = store_url
        self.plan = plan
        self.layout = plan_layout
        self.heartbeat_timeout = heartbeat_timeout
        self.threads = threads
        self.report = report
        self.procs: list[subprocess.Popen] = []
        self._pumps: list[threading.Thread] = []
        self._released = False
        self._news = threading.Event()  # set by the pumps on every line a process prints

    def __enter__(self) -> "LocalWorkers":
        for i in range(1, self.layout.processes):
            cmd = [sys.executable, "-m", "rbridge.cli", "worker", "--store", self.store_url, "--plan", self.plan,
                   "--until-idle", "--heartbeat-timeout", str(self.heartbeat_timeout), "--ready-on-stdin"]
            if self.threads:
                cmd += ["--threads", str(self.threads)]
            proc = subprocess.Popen(cmd, env=self.layout.child_env(i), stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                    start_new_session=True)  # a terminal's Ctrl-C reaches them through us
            self.procs.append(proc)
            pump = threading.Thread(target=self._pump, args=(i, proc), daemon=True)
            pump.start()
            self._pumps.append(pump)
        if self.procs:
            self.report.say(f"local workers: {len(self.procs)} more process(es) beside this one"
                            + (f", {self.layout.gpus} GPU(s) x {self.layout.runs_per_gpu} run(s)"
                               if self.layout.gpus else ""))
        return self

    def release(self) -> None:
        """Tell the waiting processes that the store and the plan row exist: they open it and take runs.
        Their stdin stays open for ``nudge``, written without blocking, until the block ends."""
        self._hand_over("go\n", keep_open=True)

    def _hand_over(self, word: str, keep_open: bool = False) -> None:
        if self._released:
            return
        self._released = True
        for proc in self.procs:
            try:
                if word:
                    proc.stdin.write(word)
                    proc.stdin.flush()
                if keep_open:
                    os.set_blocking(proc.stdin.fileno(), False)  # a process not reading never stalls the plan
                else:
                    proc.stdin.close()
            except (BrokenPipeError, OSError):  # it died already; wait() collects its code
                pass

    def nudge(self) -> None:
        """Wake the processes waiting for news (PlanWorker.changed: this process saw the plan move)."""
        for proc in self.procs:
            if self._released and not proc.stdin.closed:
                try:
                    os.write(proc.stdin.fileno(), b"\n")
                except OSError:  # gone, or a full pipe: it is not waiting then, or will poll
                    pass

    def wait_for_news(self, seconds: float) -> None:
        """Sleep up to ``seconds``, waking as soon as a local process prints a line."""
        self._news.wait(seconds)
        self._news.clear()

    def _close_stdin(self) -> None:
        for proc in self.procs:
            try:
                proc.stdin.close()
            except OSError:
                pass

    def _pump(self, index: int, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            line = line.rstrip()
            if line:  # the reporter reads rich markup: the relayed text's brackets are escaped
                self.report.say(f"w{index}| " + line.replace("[", "\\["))
            self._news.set()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Pass a polite stop on: each checkpoints its running proxy and exits."""
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    proc.send_signal(sig)
                except ProcessLookupError:
                    pass

    def wait(self, timeout: float | None = None) -> list[int]:
        codes = []
        for proc in self.procs:
            try:
                codes.append(proc.wait(timeout=timeout))
            except subprocess.TimeoutExpired:
                proc.kill()
                codes.append(proc.wait())
        for pump in self._pumps:
            pump.join(timeout=5)
        return codes

    def __exit__(self, exc_type, exc, tb) -> None:
        self._hand_over("")  # never released (the plan failed before its store was ready): they exit quietly
        self._close_stdin()  # released: no more nudges; they poll from here on
        if exc_type is not None:  # stopped or failed: the others checkpoint and stop too
            self.stop()
        # At the plan's end they see it done within one poll; a stopped one checkpoints first.
        self.wait(timeout=300)
