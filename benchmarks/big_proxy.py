"""A large proxy preset end to end: build, train, checkpoint, SIGKILL, resume, score, export, rescore.

    python benchmarks/big_proxy.py [--preset 1B] [--steps 4] [--kill-at 2] [--seq-len 256]
        [--batch-size 2] [--lr 1e-4] [--micro-batch-size 1] [--precision auto|fp32|bf16] [--traces 20]
        [--workdir DIR] [--device auto|cpu|cuda] [--keep]

Every part is rbridge's own code path, as a plan's run takes it (rbridge.planner.steps.train_run
and score_run): a byte-level BPE tokenizer trained offline by rbridge.data on the questions and
reasoning of specs/traces/gsm8k.jsonl, its token shards and a packed mixture (rbridge.data), the
preset's LlamaConfig (rbridge.proxy.proxy_config), ProxyTrainer with its accelerate checkpoints,
score_traces on the live model, export_model (the run's ``model/`` folder) and ``rbridge score``
on the export in a new process.

1. Child A builds the trainer, trains ``--kill-at`` steps, writes a checkpoint, trains one more step
   (its loss is recorded) and is SIGKILLed by this process during the step after.
2. Child B is a new process on the same checkpoint folder: it must resume at step ``--kill-at``
   (not from scratch), its next step must give child A's loss, then it trains to ``--steps``,
   writes a checkpoint, scores the first ``--traces`` traces with the live model in the precision
   it trained in (as score_run does), and exports the model.
3. Child C is ``rbridge score --model <run folder> --precision <same>`` on the export; its scores
   must agree with the live model's.

Reported: each phase's peak resident memory (VmHWM, reset between phases through
/proc/self/clear_refs; on CUDA also the peak of allocated device memory) and each process's (the
largest of its phases'; wait4's ru_maxrss for ``rbridge score``, whose process resets nothing),
seconds per step (the first step of each process separately: allocator and kernel warm-up),
checkpoint write and load time, checkpoint size on disk, export time and size, and the score
differences. Checkpoints are deleted at the end unless ``--keep``. Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TRACES = ROOT / "specs" / "traces" / "gsm8k.jsonl"
TAG = "@@ "  # a child's machine-readable lines
GB = 1e9


# ---- helpers shared by the parent and the children -------------------------------------------

def _status_kb(field: str) -> int:
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


_PROCESS_PEAK = 0  # the largest VmHWM before any reset: clear_refs also resets wait4's ru_maxrss


def _reset_peak() -> None:
    """Reset this process's VmHWM (Linux: "5" into clear_refs) and CUDA's peak counter."""
    global _PROCESS_PEAK
    _PROCESS_PEAK = max(_PROCESS_PEAK, _status_kb("VmHWM"))
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _peaks() -> dict:
    import torch

    out = {"rss": _status_kb("VmHWM"), "rss_now": _status_kb("VmRSS")}
    out["process_peak"] = max(_PROCESS_PEAK, out["rss"])
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.max_memory_allocated()
    return out


def _emit(event: str, **fields) -> None:
    print(TAG + json.dumps({"event": event, **fields}), flush=True)


def _available() -> int:
    """MemAvailable of /proc/meminfo in bytes (0 where there is none)."""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def _gb(n: float) -> str:
    return f"{n / GB:.2f} GB"


def print_machine() -> None:
    try:
        from _machine import print_machine as shared  # benchmarks/_machine.py, when present
    except ImportError:
        shared = None
    if shared is not None:
        shared()
        return
    import torch

    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 platform.processor() or "unknown")
    print(f"machine: {model}, {os.cpu_count()} cores, torch {torch.__version__}"
          + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""), flush=True)


# ---- data: the same functions a plan's prepare_data and train_run use ------------------------

def _data(args):
    """(tokenizer, rows, traces) from rbridge.data, cached under the work folder (children reuse them)."""
    from rbridge.data import build_mixture, tokenize_source, train_tokenizer
    from rbridge.data.sources import SourceConfig
    from rbridge.scoring.traces import load_traces

    work = Path(args.workdir)
    corpus = work / "corpus.jsonl"
    traces = load_traces(TRACES)
    if not corpus.exists():
        work.mkdir(parents=True, exist_ok=True)
        with open(corpus.with_suffix(".tmp"), "w") as f:
            for t in traces:
                f.write(json.dumps({"text": f"{t.question}\n{t.reasoning}"}) + "\n")
        os.replace(corpus.with_suffix(".tmp"), corpus)
    subset = work / f"traces{args.traces}.jsonl"
    if not subset.exists():
        lines = TRACES.read_text().splitlines(keepends=True)[:args.traces]
        subset.write_text("".join(lines))
    cache = work / "cache"
    src = SourceConfig(name="gsm8k", path=corpus, field="text")
    tok = train_tokenizer([src], args.vocab, cache)
    shards = tokenize_source(src, tok, cache)
    # Enough rows for every step without wrapping where the corpus allows it; ProxyTrainer wraps
    # around the rows otherwise (their order does not matter to memory or speed).
    need = args.steps * args.batch_size * args.seq_len
    n_tokens = max(args.seq_len * args.batch_size, min(need, shards.n_train_tokens - args.seq_len))
    mixture = build_mixture({"gsm8k": 1.0}, {"gsm8k": shards}, n_tokens=n_tokens, seq_len=args.seq_len,
                            seed=0, cache_dir=cache)
    return tok, mixture.rows, load_traces(subset), subset


def _config(args, tok):
    from rbridge.proxy import proxy_config

    eos = tok.eos_token_id
    return proxy_config({"preset": args.preset}, vocab_size=len(tok), seq_len=args.seq_len,
                        bos_token_id=tok.bos_token_id if tok.bos_token_id is not None else eos, eos_token_id=eos,
                        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else eos)


# ---- the training child ----------------------------------------------------------------------

def child(args) -> None:
    import torch
    from accelerate import Accelerator

    from rbridge.planner.steps import EXPORT_DIR, export_model
    from rbridge.proxy import ProxyTrainer, param_counts
    from rbridge.proxy.train import latest_checkpoint
    from rbridge.scoring.scorer import score_traces

    if args.threads:
        torch.set_num_threads(args.threads)
    tok, rows, traces, _ = _data(args)
    cfg = _config(args, tok)
    total, non_emb = param_counts(cfg)
    run = Path(args.workdir) / "run"
    found = latest_checkpoint(run)
    _reset_peak()
    t0 = time.perf_counter()
    acc = Accelerator(cpu=args.device == "cpu")
    trainer = ProxyTrainer(cfg, rows, total_tokens=args.steps * args.batch_size * args.seq_len,
                           batch_size=args.batch_size, lr=args.lr, seed=0, precision=args.precision,
                           checkpoint_dir=run, accelerator=acc, micro_batch_size=args.micro_batch_size,
                           run_key=f"big_proxy-{args.preset}")
    _emit("built", seconds=time.perf_counter() - t0, step=trainer.step, checkpoint=found.name if found else None,
          precision=trainer.precision, device=str(acc.device), params=total, non_embedding=non_emb,
          vocab=len(tok), threads=torch.get_num_threads(), **_peaks())

    def sync():
        if acc.device.type == "cuda":
            torch.cuda.synchronize()

    def step() -> None:
        _reset_peak()
        t = time.perf_counter()
        loss = trainer.train_to(trainer.tokens_seen + trainer.tokens_per_step)
        sync()
        _emit("step", step=trainer.step, loss=loss, seconds=time.perf_counter() - t, **_peaks())

    def checkpoint() -> None:
        _reset_peak()
        t = time.perf_counter()
        path = trainer.save_checkpoint()
        sync()
        _emit("checkpoint", step=trainer.step, seconds=time.perf_counter() - t, path=str(path), bytes=_du(path),
              files={str(p.relative_to(path)): p.stat().st_size for p in path.rglob("*") if p.is_file()},
              **_peaks())

    if args.child == "A":
        while trainer.step < args.kill_at:
            step()
        checkpoint()
        while trainer.step < trainer.total_steps:  # the parent kills this process during these steps
            step()
        _emit("not-killed")
        return
    while trainer.step < trainer.total_steps:
        step()
    checkpoint()
    model = trainer.model  # unwrapped, eval mode: what train_run scores and exports
    precision = "bf16" if trainer.precision == "bf16" else "fp32"
    _reset_peak()
    t = time.perf_counter()
    res = score_traces(model, tok, traces, precision=precision)
    _emit("score", seconds=time.perf_counter() - t, precision=precision, rbridge=res.rbridge, nll=res.nll,
          per_trace=[x.nll for x in res.traces], n_tokens=res.n_tokens, **_peaks())
    _reset_peak()
    t = time.perf_counter()
    folder = export_model(model, tok, run / EXPORT_DIR)
    _emit("export", seconds=time.perf_counter() - t, path=str(folder), bytes=_du(folder), **_peaks())


# ---- the parent ------------------------------------------------------------------------------

def _run_child(argv: list[str], kill_when=None) -> tuple[list[dict], int, int]:
    """Run a child, echo its output, collect its tagged events; ``kill_when(event)`` True -> SIGKILL it.
    Returns (events, exit status, peak RSS in bytes from wait4)."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, bufsize=1)
    events: list[dict] = []
    killed = False
    for line in proc.stdout:
        if line.startswith(TAG):
            ev = json.loads(line[len(TAG):])
            events.append(ev)
            print("   ", {k: v for k, v in ev.items() if k not in ("files", "per_trace")}, flush=True)
            if kill_when is not None and not killed and kill_when(ev):
                os.kill(proc.pid, signal.SIGKILL)
                killed = True
                print(f"    -> SIGKILL sent to pid {proc.pid}", flush=True)
        else:
            print("    | " + line.rstrip(), flush=True)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return events, proc.returncode, usage.ru_maxrss * 1024


def _child_argv(args, which: str) -> list[str]:
    argv = [sys.executable, __file__, "--child", which]
    for name in ("preset", "steps", "kill_at", "seq_len", "lr", "batch_size", "micro_batch_size", "precision", "traces",
                 "workdir", "device", "vocab", "threads"):
        argv += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    return argv


def _phase_line(name: str, ev: dict) -> str:
    cuda = f", CUDA peak {_gb(ev['cuda'])}" if "cuda" in ev else ""
    return f"  {name:<28} {ev['seconds']:8.2f} s   peak RSS {_gb(ev['rss'])}{cuda}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="1B")
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps in all (child A and B)")
    ap.add_argument("--kill-at", type=int, default=2, help="child A checkpoints at this step, is killed after it")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (cosine schedule over --steps)")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--micro-batch-size", type=int, default=1)
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--traces", type=int, default=20, help="the first N traces of specs/traces/gsm8k.jsonl")
    ap.add_argument("--vocab", type=int, default=8192, help="BPE vocabulary trained on the traces' text")
    ap.add_argument("--workdir", default=None, help="default: /tmp/rbridge-big-proxy-<preset>")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints and the export")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.workdir = args.workdir or f"/tmp/rbridge-big-proxy-{args.preset}"
    if not 1 <= args.kill_at < args.steps - 1:
        ap.error("--kill-at must be at least 1 and leave two steps after it (child A trains one of them)")
    if args.child:
        child(args)
        return

    print_machine()
    print(f"preset {args.preset}, {args.steps} steps (kill after the checkpoint at step {args.kill_at}), "
          f"seq_len {args.seq_len}, batch {args.batch_size} in micro-batches of {args.micro_batch_size}, "
          f"precision {args.precision}, device {args.device}, {args.traces} traces, work folder {args.workdir}; "
          f"load average {os.getloadavg()[0]:.1f}, {_available() / GB:.1f} GB of memory available", flush=True)
    run = Path(args.workdir) / "run"
    shutil.rmtree(run, ignore_errors=True)  # a fresh run: child A must start from scratch
    t = time.perf_counter()
    _data(args)  # tokenizer, shards, mixture and the traces subset, cached for the children
    print(f"data ready in {time.perf_counter() - t:.1f} s", flush=True)
    failures: list[str] = []

    print("child A: build, train, checkpoint, SIGKILL", flush=True)
    ev_a, rc_a, rss_a = _run_child(_child_argv(args, "A"), kill_when=lambda e: e["event"] == "step"
                                   and e["step"] == args.kill_at + 1)
    if rc_a != -signal.SIGKILL:
        failures.append(f"child A was not killed (exit status {rc_a})")
    from rbridge.proxy.train import latest_checkpoint

    ck = latest_checkpoint(run)
    left = sorted(p.name for p in run.iterdir()) if run.exists() else []
    print(f"  after the kill: latest checkpoint {ck.name if ck else None}; folder holds {left}", flush=True)

    print("child B: resume, train, checkpoint, score, export", flush=True)
    ev_b, rc_b, rss_b = _run_child(_child_argv(args, "B"))
    if rc_b != 0:
        failures.append(f"child B exited with {rc_b}")

    by = lambda evs, name: [e for e in evs if e["event"] == name]  # noqa: E731
    built_a, built_b = by(ev_a, "built"), by(ev_b, "built")
    steps_a, steps_b = by(ev_a, "step"), by(ev_b, "step")
    ckpts = by(ev_a, "checkpoint") + by(ev_b, "checkpoint")
    score, export = by(ev_b, "score"), by(ev_b, "export")
    if built_b and built_b[0]["step"] != args.kill_at:
        failures.append(f"child B resumed at step {built_b[0]['step']}, not {args.kill_at}")
    after_a = [e for e in steps_a if e["step"] == args.kill_at + 1]
    after_b = [e for e in steps_b if e["step"] == args.kill_at + 1]
    # Bitwise on a CPU; a GPU's kernels may reorder sums between processes, so there within 1e-4.
    tol = 0.0 if built_b and built_b[0]["device"] == "cpu" else 1e-4 * abs(after_a[0]["loss"]) if after_a else 0.0
    if after_a and after_b and abs(after_a[0]["loss"] - after_b[0]["loss"]) > tol:
        failures.append(f"step {args.kill_at + 1} loss after the resume {after_b[0]['loss']!r} differs from "
                        f"the uninterrupted process's {after_a[0]['loss']!r}")

    doc, rc_c, rss_c = None, None, 0
    if export:
        print("child C: rbridge score on the export", flush=True)
        precision = score[0]["precision"]
        argv = [sys.executable, "-m", "rbridge", "score", "--model", str(run), "--traces",
                str(Path(args.workdir) / f"traces{args.traces}.jsonl"), "--precision", precision, "--json",
                "--per-trace", "--no-baselines", "--no-cache"]
        if args.device != "auto":
            argv += ["--device", args.device]
        t = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        rc_c, rss_c, wall_c = os.waitstatus_to_exitcode(status), usage.ru_maxrss * 1024, time.perf_counter() - t
        if rc_c != 0:
            failures.append(f"rbridge score exited with {rc_c}")
        else:
            doc = json.loads(out)

    # ---- the report ----
    print("\n== results", flush=True)
    if built_a:
        b = built_a[0]
        print(f"  {args.preset}: {b['params'] / 1e6:,.0f}M parameters ({b['non_embedding'] / 1e6:,.0f}M non-embedding,"
              f" vocab {b['vocab']}), precision {b['precision']}, device {b['device']}, {b['threads']} threads")
    # Resetting VmHWM between phases resets ru_maxrss too: a training child's peak is the largest of its
    # phases' (and of wait4's figure, which covers the time after the last reset).
    peak_a = max([rss_a] + [e.get("process_peak", 0) for e in ev_a])
    peak_b = max([rss_b] + [e.get("process_peak", 0) for e in ev_b])
    print(f"  peak RSS per process: child A {_gb(peak_a)} (killed), child B {_gb(peak_b)}, "
          f"rbridge score on the export {_gb(rss_c)} (wait4)")
    print("  phase                          seconds   peak memory")
    for name, ev in (("A: build (fresh)", built_a), ("B: build + load checkpoint", built_b)):
        if ev:
            print(_phase_line(name, ev[0]))
    for who, steps in (("A", steps_a), ("B", steps_b)):
        for e in steps:
            print(_phase_line(f"{who}: step {e['step']}" + (" (first)" if e is steps[0] else ""), e)
                  + f"   loss {e['loss']:.6f}")
    for e in ckpts:
        print(_phase_line(f"checkpoint step {e['step']}", e) + f"   {_gb(e['bytes'])} on disk")
    if score:
        print(_phase_line(f"score {args.traces} traces (live)", score[0]))
    if export:
        print(_phase_line("export (model/)", export[0]) + f"   {_gb(export[0]['bytes'])} on disk")
    if doc is not None:
        print(f"  {'rbridge score on the export':<28} {wall_c:8.2f} s   peak RSS {_gb(rss_c)} (whole process: "
              f"load {doc['seconds']['load']:.1f} s, score {doc['seconds']['score']:.1f} s)")
    steady = [e["seconds"] for e in steps_a[1:] + steps_b[1:]]
    first = [e["seconds"] for e in steps_a[:1] + steps_b[:1]]
    if steady:
        print(f"  seconds per step: {sum(steady) / len(steady):.2f} (mean of {len(steady)} after each process's "
              f"first; first steps {', '.join(f'{s:.2f}' for s in first)})")
    if ckpts:
        c = ckpts[-1]
        print(f"  checkpoint: {_gb(c['bytes'])} on disk ("
              + ", ".join(f"{k} {_gb(v)}" for k, v in sorted(c["files"].items()) if v > 1e6)
              + f"), written in {c['seconds']:.1f} s; loaded in {built_b[0]['seconds']:.1f} s with the build"
              if built_b else "")
    if after_a and after_b:
        print(f"  resume: child B started at step {built_b[0]['step']}; step {args.kill_at + 1} loss "
              f"{after_b[0]['loss']:.8f} after the resume vs {after_a[0]['loss']:.8f} before the kill")
    if score and doc is not None:
        live = score[0]
        bench = next(iter(doc["benchmarks"].values()))
        d_r, d_n = abs(live["rbridge"] - bench["rbridge"]), abs(live["nll"] - bench["nll"])
        per = [t["nll"] for t in bench.get("traces", [])] if isinstance(bench.get("traces"), list) else []
        d_t = max((abs(a - b) for a, b in zip(live["per_trace"], per) if a is not None and b is not None),
                  default=float("nan"))
        print(f"  score of {bench['n_traces']} traces in {live['precision']}: live rbridge {live['rbridge']:.6f} "
              f"nll {live['nll']:.6f}; export rbridge {bench['rbridge']:.6f} nll {bench['nll']:.6f}; "
              f"|diff| rbridge {d_r:.2e}, nll {d_n:.2e}, largest per-trace nll {d_t:.2e}")
        if d_r > 1e-4 or d_n > 1e-4:
            failures.append(f"live and exported scores differ (rbridge {d_r:.2e}, nll {d_n:.2e})")
    if not args.keep:
        shutil.rmtree(run, ignore_errors=True)
    print(f"  load average at the end {os.getloadavg()[0]:.1f} (other processes on the machine slow the steps)")
    for f in failures:
        print(f"FAILED: {f}")
    print("all checks passed" if not failures else f"{len(failures)} check(s) failed", flush=True)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
