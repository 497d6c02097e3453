"""``precision: auto`` decided by measurement: bf16 where it is clearly faster on the work itself.

CPU flags do not say how fast bf16 is. An AMD EPYC with AVX512_BF16 trained proxies 1.9-3.1x
faster in bf16 than in fp32; a Xeon whose flags also list avx512_bf16 multiplied bf16 matrices
at half its fp32 rate and trained at 0.60-0.88x; a Xeon with AMX tiles multiplies them 4-8x
faster. So ``auto`` times fp32 against bf16 on the work it is about to do and takes bf16 only
at >= :data:`THRESHOLD` times fp32's rate (a margin so that noise never flips a close call into
the less accurate precision):

- training (:func:`training_rates`): a few optimizer steps of the run's own model shape and
  micro-batch (random weights and tokens; the speed does not depend on them), fp32 and bf16
  autocast interleaved, as :class:`rbridge.proxy.train.ProxyTrainer` computes them. Models over
  :data:`STEPS_MAX_PARAMS` non-embedding parameters are timed on the matrix products of their
  sizes instead (forward and both backward products of every linear layer and the output layer,
  the weights cast to bf16 as autocast casts them), which dominate their steps and need no
  second copy of a large model and its optimizer state in memory. A CPU is timed on at most
  :data:`STEP_TOKENS` (:data:`MATMUL_TOKENS`) tokens, where its rate per token has levelled off; a
  GPU, whose rate keeps growing with the work, on the run's own micro-batch up to :data:`GPU_TOKENS`;
- scoring (:func:`scoring_rates`): the scorer's own pass of the model itself over random tokens
  (one row of 256 on a CPU), fp32 against its parameters cast to bf16, as the scorer computes
  (rbridge.scoring.requests.measured_pass).

Each measurement is made once per machine and cached in ``<cache>/precision.json`` (``$RBRIDGE_CACHE``
or ``~/.cache/rbridge``), keyed by the CPU's model name and flags (or the GPU's name), torch's
version, the device kind, the thread count and the work's shape. ``RBRIDGE_BF16_SPEEDUP=X``
skips the measurement and takes bf16's rate as X times fp32's (tests inject rates with it; a
user who knows a machine can too). A plan records the rates with the stage's precision
(``runs.precision_rates``) and ``rbridge status`` shows them; a stage keeps the precision its
first run recorded whatever a later machine measures.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from rbridge.proxy.rates import THRESHOLD, Rates

__all__ = ["THRESHOLD", "Rates", "bf16_possible", "machine_name", "onednn_cap", "scoring_rates",
           "training_rates"]

STEPS_MAX_PARAMS = 10e6    # larger training shapes are timed on their matrix products (seconds a step)
BUDGET_S = 1.0             # seconds of timing per precision after the warm-up (at least MIN_ROUNDS rounds)
MIN_ROUNDS = 2
STEP_TOKENS = 1024         # a CPU: tokens per timed training step at most: rates per token hold from here on
MATMUL_TOKENS = 512        # a CPU: rows of the timed matrix products
# A GPU's rate per token keeps growing with the work until the GPU is full, so a small shape measures
# kernel launches, not arithmetic. On an H200 (benchmarks/gpu_check.sh, 2026-12-04), timed at 2x512
# tokens bf16 trained an 8M proxy at 0.91x fp32 and matrix products of 512 rows put a 60M at 1.21-1.45x,
# while at 32x256 tokens bf16 trained them at 1.22x and 3.6x (an auto chose fp32 for that 60M there: 0.28x
# its bf16 speed). A GPU is timed at the run's own micro-batch, up to this many tokens, which is still cheap.
GPU_TOKENS = 8192
GPU_SCORE_TOKENS = 4096    # a GPU's scoring forward passes: 16 rows of 256, the scorer's default batch
CACHE_FILE = "precision.json"
CACHE_VERSION = 2          # 2: GPUs timed at GPU_TOKENS (version 1's GPU figures measured launches)
OVERRIDE_ENV = "RBRIDGE_BF16_SPEEDUP"
_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16", "avx_vnni")


# ---- the machine ---------------------------------------------------------------------------

@functools.cache
def _cpuinfo() -> tuple[str, tuple[str, ...]]:
    """(CPU model name, the flags of _FLAGS it has) from /proc/cpuinfo, else platform's name."""
    name, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not name:
                    name = value.strip()
                elif key == "flags" and not flags:
                    flags = set(value.split())
                if name and flags:
                    break
    except OSError:
        pass
    return name or platform.processor() or platform.machine(), tuple(f for f in _FLAGS if f in flags)


def machine_name(device_type: str = "cpu") -> str:
    """What a measurement is keyed by: the CPU's model and relevant flags (or the GPU's name), and torch."""
    if device_type == "cuda":
        return f"{torch.cuda.get_device_name()}; torch {torch.__version__}"
    name, flags = _cpuinfo()
    cap = onednn_cap()
    return (f"{name} [{' '.join(flags) or 'no avx2'}]" + (f" oneDNN<={cap}" if cap else "")
            + f"; torch {torch.__version__}")


def onednn_cap() -> str | None:
    """oneDNN's instruction-set cap where the environment sets one (``ONEDNN_MAX_CPU_ISA``, or its older name
    ``DNNL_MAX_CPU_ISA``), upper-cased. It changes what bf16 costs on the same CPU (``AVX512_CORE`` keeps bf16
    products off a CPU's bf16 units; docs/SPEED.md), so it is part of the machine a measurement holds for."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    return cap.upper() if cap else None


def bf16_possible(device_type: str) -> bool:
    """Whether bf16 can run at all (the measurement decides whether it pays): every CPU (oneDNN
    emulates it where there are no bf16 units), CUDA devices that support it."""
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device_type == "cpu"


# ---- the cache -----------------------------------------------------------------------------

def _cache_path() -> Path:
    from rbridge.data._cache import default_cache_dir

    return default_cache_dir() / CACHE_FILE


def _cached(key: str) -> Rates | None:
    try:
        entry = json.loads(_cache_path().read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        return None
    return Rates.from_json(json.dumps(entry)) if entry else None


def _store(key: str, rates: Rates) -> None:
    """Add one entry, written to a temporary file and renamed (a reader never sees half a file; two
    processes measuring at once both write valid files, the last one's entries win)."""
    path = _cache_path()
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            data = {}
    except (OSError, ValueError):
        data = {}
    data[key] = json.loads(rates.to_json())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".precision.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs a new measurement next time


def _key(kind: str, device_type: str, threads: int, shape: dict) -> str:
    payload = json.dumps({"v": CACHE_VERSION, "kind": kind, "device": device_type, "threads": threads,
                          "machine": machine_name(device_type), "shape": shape}, sort_keys=True)
    return f"{kind}:{device_type}:{threads}:" + hashlib.sha256(payload.encode()).hexdigest()[:16]


def _override(threads: int, device_type: str) -> Rates | None:
    raw = os.environ.get(OVERRIDE_ENV, "").strip()
    if not raw:
        return None
    try:
        x = float(raw)
        if not x > 0:
            raise ValueError
    except ValueError:
        from rbridge.errors import InputError

        raise InputError(f"must be a positive number, the bf16/fp32 speed ratio (got {raw!r})",
                         field=OVERRIDE_ENV) from None
    return Rates(1.0, x, f"given by {OVERRIDE_ENV}", machine_name(device_type), threads)


_MEMO: dict[str, Rates] = {}  # this process's measurements and cache reads


def _measure_cached(kind: str, device: torch.device, threads: int, shape: dict, measure) -> Rates:
    given = _override(threads, device.type)
    if given is not None:
        return given
    key = _key(kind, device.type, threads, shape)
    hit = _MEMO.get(key) or _cached(key)
    if hit is None:
        with _measuring():  # another process measuring the same work: wait for its result instead
            hit = _cached(key)
            if hit is None:
                before = torch.get_num_threads()
                torch.set_num_threads(threads)
                try:
                    fp32, bf16, how = measure()
                finally:
                    torch.set_num_threads(before)
                hit = Rates(fp32, bf16, how, machine_name(device.type), threads)
                _store(key, hit)
    _MEMO[key] = hit
    return hit


@contextlib.contextmanager
def _measuring():
    """One measurement at a time on this machine: an exclusive lock on ``<cache>/precision.lock``.

    A plan's local processes start a stage together, and each measured it (the default plan's two stages
    were measured four times on a 2-core machine, each measurement sharing the cores with the other); the
    second now waits and reads the first's result from the cache. Where the cache folder cannot be
    written, or flock does not exist (Windows), nothing is locked."""
    try:
        import fcntl

        path = _cache_path().with_suffix(".lock")
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "a")
    except (ImportError, OSError):
        yield
        return
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _interleaved(fns: dict[str, Callable[[], object]], device: torch.device, budget_s: float = BUDGET_S,
                 rounds: tuple[int, int] = (MIN_ROUNDS, 12)) -> dict[str, float]:
    """Median seconds of each function, called in turns (each once to warm up, then at least
    rounds[0] and at most rounds[1] times each, stopping once ``budget_s`` per function is spent):
    turns share whatever else the machine does, so the ratio holds under load."""
    for fn in fns.values():
        fn()
    _sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    start = time.perf_counter()
    for r in range(rounds[1]):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[k].append(time.perf_counter() - t0)
        if r + 1 >= rounds[0] and time.perf_counter() - start > budget_s * len(fns):
            break
    return {k: statistics.median(v) for k, v in times.items()}


# ---- training --------------------------------------------------------------------------------

def _shape(config) -> dict:
    fields = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "vocab_size", "tie_word_embeddings")
    return {f: getattr(config, f, None) for f in fields}


def training_rates(config, micro_batch: int, seq_len: int, device: torch.device | str = "cpu",
                   threads: int | None = None) -> Rates:
    """Training tokens/s of ``config``'s proxy at ``micro_batch`` x ``seq_len`` tokens per pass, fp32
    against bf16 autocast, on ``device`` at ``threads`` CPU threads (cached; module docstring)."""
    device = torch.device(device)
    threads = threads or torch.get_num_threads()
    from rbridge.proxy.presets import param_counts

    non_embedding = param_counts(config)[1]
    shape = {**_shape(config), "micro_batch": micro_batch, "seq_len": seq_len}
    if non_embedding > STEPS_MAX_PARAMS:
        tokens = min(micro_batch * seq_len, token_cap(device.type, MATMUL_TOKENS))
        return _measure_cached("train-mm", device, threads, shape, lambda: _matmul_rates(config, tokens, device))
    rows = max(1, min(micro_batch, token_cap(device.type, STEP_TOKENS) // seq_len))
    return _measure_cached("train", device, threads, shape, lambda: _step_rates(config, rows, seq_len, device))


def token_cap(device_type: str, cpu_tokens: int) -> int:
    """Tokens a measurement on ``device_type`` is timed on at most: ``cpu_tokens`` on a CPU, where the rate
    per token has levelled off by then; :data:`GPU_TOKENS` elsewhere (module docstring)."""
    return cpu_tokens if device_type == "cpu" else GPU_TOKENS


def _step_rates(config, micro_batch: int, seq_len: int, device: torch.device) -> tuple[float, float, str]:
    from rbridge.proxy.model import ProxyLlamaForCausalLM

    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):  # the measurement leaves the process's RNG where it was
        torch.manual_seed(0)
        model = ProxyLlamaForCausalLM(config).to(device)
    try:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    except (RuntimeError, ValueError):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    rows = torch.randint(0, config.vocab_size, (micro_batch, seq_len), generator=gen).to(device)

    def step(bf16: bool):
        def run():
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = model(rows, labels=rows).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return run

    t = _interleaved({"fp32": step(False), "bf16": step(True)}, device)
    tokens = rows.numel()
    return tokens / t["fp32"], tokens / t["bf16"], f"training steps of {micro_batch}x{seq_len} tokens"


def _linear_shapes(config) -> list[tuple[int, int, int]]:
    """(in, out, count) of the model's matrix products per token: each layer's projections and the output."""
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    head = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * head, config.num_key_value_heads * head
    return [(h, q, layers), (h, kv, 2 * layers), (q, h, layers), (h, i, 2 * layers), (i, h, layers),
            (h, config.vocab_size, 1)]


def _matmul_rates(config, tokens: int, device: torch.device) -> tuple[float, float, str]:
    """Forward (x W^T) and backward (dy W, dy^T x) products of every distinct linear shape, weighted
    by how often a step computes it, over ``tokens`` rows; bf16 casts the fp32 weight first, as
    autocast does."""
    gen = torch.Generator().manual_seed(0)
    mats = []
    for n_in, n_out, count in _linear_shapes(config):
        x = torch.randn(tokens, n_in, generator=gen).to(device)
        w = torch.randn(n_out, n_in, generator=gen).to(device)
        dy = torch.randn(tokens, n_out, generator=gen).to(device)
        mats.append((x, w, dy, count))

    def products(dtype) -> float:
        """Seconds of one step's products: each shape timed once, weighted by its count."""
        total = 0.0
        for x, w, dy, count in mats:
            _sync(device)
            t0 = time.perf_counter()
            xc, wc, dyc = x.to(dtype), w.to(dtype), dy.to(dtype)
            torch.mm(xc, wc.t())
            torch.mm(dyc, wc)
            torch.mm(dyc.t(), xc)
            _sync(device)
            total += (time.perf_counter() - t0) * count
        return total

    products(torch.float32), products(torch.bfloat16)  # warm-up
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    start = time.perf_counter()
    for r in range(12):  # interleaved, as _interleaved
        times["fp32"].append(products(torch.float32))
        times["bf16"].append(products(torch.bfloat16))
        if r + 1 >= MIN_ROUNDS and time.perf_counter() - start > 2 * BUDGET_S:
            break
    fp32, bf16 = statistics.median(times["fp32"]), statistics.median(times["bf16"])
    return tokens / fp32, tokens / bf16, f"matrix products of a {tokens}-token step"


# ---- scoring ---------------------------------------------------------------------------------

def scoring_rates(model, scoring_pass, threads: int | None = None, tokens: int = 256) -> Rates:
    """Scoring tokens/s of ``model`` (a float32 or bfloat16 causal LM) with its parameters in fp32 and in
    bf16: ``scoring_pass(ids, dtype)`` is the scorer's own pass over the token rows ``ids`` with the
    parameters in ``dtype`` (rbridge.scoring.requests.measured_pass: its decoder, then the output layer on
    the scored half of each row, as the scorer takes it), timed over ``tokens`` random tokens in
    rows of at most 256, on a GPU at least :data:`GPU_SCORE_TOKENS` (cached; module docstring).

    Why the scorer's own pass: it is the work being chosen for, and it is cheaper than a whole forward
    with a full-vocabulary log-softmax, which the scorer never computes. On a CPU bf16 is timed where it
    is slow, so this cost is paid mostly in bf16: SmolLM2-135M as a CPU without fast bf16 (the 2-core AMD
    EPYC with oneDNN capped at AVX512_CORE) took 9.8-10.7 s to measure on 2 x 256 tokens with the full
    output layer, and takes 4.6-5.5 s on one row of 256 with the scorer's own pass."""
    param = next(model.parameters())
    device = param.device
    if device.type != "cpu":
        tokens = max(tokens, GPU_SCORE_TOKENS)
    threads = threads or torch.get_num_threads()
    config = model.config
    seq = min(256, tokens, getattr(config, "max_position_embeddings", 256) or 256)
    rows = max(1, tokens // seq)
    shape = {**_shape(config), "arch": type(model).__name__, "rows": rows, "seq_len": seq, "work": "scorer"}

    def measure():
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, config.vocab_size, (rows, seq), generator=gen).tolist()
        t = _interleaved({"fp32": lambda: scoring_pass(ids, torch.float32),
                          "bf16": lambda: scoring_pass(ids, torch.bfloat16)}, device)
        return rows * seq / t["fp32"], rows * seq / t["bf16"], f"scoring passes of {rows}x{seq} tokens"

    return _measure_cached("score", device, threads, shape, measure)
