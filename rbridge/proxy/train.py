"""Train one proxy LlamaForCausalLM on packed token rows, with resumable checkpoints.

The loop, top to bottom (``ProxyTrainer._train_step``):

    for each of this rank's k micro-batches m:     # B rows = n_micro micro-batches of M rows
        rows  = data[(step*B + m*M + j) mod n_rows for j in 0..M-1]
        loss  = model(rows, labels=rows).loss / k   # bf16 autocast if precision says so
        backward (gradients summed locally; DDP all-reduces after the last one)
    clip grad norm, AdamW step, LR schedule step
    step += 1; tokens_seen = step * B * seq_len    # global tokens, whatever the world size

The learning-rate schedule (linear warmup, cosine decay to ``min_lr_ratio * lr``)
always spans the full ``total_tokens``, so training to a rung, checkpointing,
and continuing in a fresh process follows the same trajectory as one
uninterrupted run. Accelerate places the model, wraps it for multi-process
runs (``accelerate launch``) and saves/loads model, optimizer, scheduler and
RNG states (``save_state`` / ``load_state``); this module adds the atomic
``step_<n>/`` directories around it.

Several processes: ``accelerate launch --multi_gpu --num_processes N`` (or the
user's accelerate config) on GPUs; on CPUs Accelerate needs
``ACCELERATE_USE_CPU=1`` in the environment as well, or each of the N processes
trains alone (``--cpu --num_processes N`` starts one process unless mpirun is
configured). Accelerate then uses gloo and DistributedDataParallel. Every rank
builds the same model from the same seed, trains on its micro-batches of each
global batch, and DDP averages gradients.

Micro-batches make a run independent of the number of processes. Without
``micro_batch_size`` each rank computes one forward/backward over its
B/N rows, so one process (one pass over B rows) and two (two passes over B/2,
averaged) compute the same mean gradient in different float order; AdamW
divides by sqrt(v), which magnifies those few ulps wherever a gradient is near
zero, and proxy scores of 1 and 2 processes then differ by 1e-5 to 1e-3. With a
fixed ``micro_batch_size`` M every world size runs the same passes over the
same M rows; scaling a loss by 1/k is exact (a power of two for the usual
sizes) and so is a+b == b+a, so one process with two micro-batches and two
processes with one each produce bitwise-identical gradients (DDP divides by
the world size and sums; tests/test_distributed.py checks equality). With more
micro-batches per rank, or more than two ranks, the all-reduce adds the partial
sums in another order than one process does, and results agree to rounding.

Checkpoints hold one copy of the unwrapped model, optimizer and schedule plus
one RNG file per rank (unused: training draws no random numbers), so a
checkpoint written by any number of processes resumes in any other number.
``checkpoint_dir`` must be shared by all machines. ``trainer.json`` records the
size and SHA-256 of every file; a checkpoint whose files do not match (a
truncated or overwritten file, a missing one, an unreadable ``trainer.json``) is
renamed ``step_<n>.damaged`` (never deleted) and the run resumes from the
previous complete checkpoint, which is why two are kept.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast, gather_object, set_seed
from transformers import LlamaConfig, LlamaForCausalLM

from rbridge._failpoints import failpoint
from rbridge.errors import InputError
from rbridge.proxy.model import ProxyLlamaForCausalLM

if TYPE_CHECKING:
    from rbridge.proxy.precision import Rates


class _TiedWeightsNotice(logging.Filter):
    """Drop Accelerate's "Removed shared tensor {'lm_head.weight'}" warning.

    Proxies tie input and output embeddings, so safetensors stores the shared
    tensor once; the reload restores the tie and the resume tests check it bitwise.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "Removed shared tensor" not in record.getMessage()


logging.getLogger("accelerate.utils.other").addFilter(_TiedWeightsNotice())

MARKER = "COMPLETE"          # written last; a step_<n>/ without it is ignored
STATE_FILE = "trainer.json"  # step, tokens, wall time and the run's identity
KEEP_CHECKPOINTS = 2  # default keep_checkpoints: a damaged newest checkpoint falls back to the one before
LOSS_READ_EVERY = 16  # steps between reads of the loss on an accelerator (each read waits for the device)


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak LR used by optimizer step ``step`` (0-based).

    Linear warmup reaches the peak at step ``warmup_steps - 1``; cosine decay then
    reaches ``min_lr_ratio`` exactly at the last step ``total_steps - 1``.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - 1 - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class TrainShape:
    """The work ``precision: auto`` is measured on: a proxy config, rows per pass, tokens per row and
    CPU threads (0: the process's current count)."""

    config: LlamaConfig
    micro_batch: int
    seq_len: int
    threads: int = 0


def auto_rates(device: torch.device, shape: TrainShape) -> Rates | None:
    """fp32 and bf16 training rates of ``shape`` on ``device`` (rbridge.proxy.precision, measured once per
    machine and cached), or None where bf16 cannot run at all (a GPU without bf16, other devices)."""
    from rbridge.proxy.precision import bf16_possible, training_rates

    if not bf16_possible(device.type):
        return None
    return training_rates(shape.config, shape.micro_batch, shape.seq_len, device, shape.threads or None)


def resolve_precision(precision: str, device: torch.device, shape: TrainShape | None = None) -> str:
    """"auto" -> "bf16" where bf16 trains ``shape`` clearly faster than fp32 on ``device`` (measured:
    rbridge.proxy.precision, at least THRESHOLD times fp32's tokens/s), else "fp32".

    bf16 here is mixed precision: fp32 weights and optimizer state, matrix products in bf16
    under autocast. CPU flags do not decide it: an AMD EPYC with AVX512_BF16 trained the 0.5M,
    2M and 8M presets 1.9x, 2.1x and 3.1x faster than fp32 on one thread, a Xeon whose flags
    also list avx512_bf16 trained them at 0.60-0.88x, one with AMX tiles at 1.5-2.6x. A plan
    records each stage's resolved precision (and the rates) with its first run and trains the
    rest of the stage in it on every machine (rbridge.planner.worker), so a plan's numbers do
    not depend on which machine took which run. Without a ``shape``, ``auto`` measures the
    0.5M preset at 8 x 256 tokens.
    """
    if precision not in ("auto", "fp32", "bf16"):
        raise InputError(f"must be auto, fp32 or bf16 (got {precision!r})", field="precision")
    if precision != "auto":
        return precision
    rates = auto_rates(device, shape or _default_shape())
    return rates.choice if rates is not None else "fp32"


def _default_shape() -> TrainShape:
    from rbridge.proxy.presets import proxy_config

    return TrainShape(proxy_config({"preset": "0.5M"}, vocab_size=8192, seq_len=256), 8, 256)


def planned_precision(precision: str, accelerator: Accelerator | None = None, *, legacy: bool = False,
                      shape: TrainShape | None = None) -> str:
    """What a ProxyTrainer on ``accelerator`` (default: a new one in this process) computes in when asked
    for ``precision``: the accelerator's own mixed precision (accelerate launch --mixed_precision)
    if it has one, else resolve_precision on its device for ``shape``. ``legacy``: the rule from
    before runs recorded their precision (store schema 7), under which ``auto`` meant fp32 on
    every CPU; a stage started then goes on in it."""
    acc = accelerator if accelerator is not None else Accelerator()
    if legacy and precision == "auto" and acc.device.type == "cpu" and acc.mixed_precision == "no":
        return "fp32"
    if acc.mixed_precision != "no":
        if precision not in ("auto", "fp32", "bf16"):
            resolve_precision(precision, acc.device)  # the error for a bad name
        return _precision_with(acc, precision, precision)
    return resolve_precision(precision, acc.device, shape)


def latest_checkpoint(checkpoint_dir: str | Path | None) -> Path | None:
    """The complete ``step_<n>/`` with the largest n under ``checkpoint_dir``, or None."""
    found = _complete_checkpoints(checkpoint_dir)
    return found[-1] if found else None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _file_sums(folder: Path) -> dict[str, list]:
    """{relative path: [bytes, sha256]} of every file a checkpoint holds but its state and marker."""
    return {str(p.relative_to(folder)): [p.stat().st_size, _sha256(p)]
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in (STATE_FILE, MARKER)}


def checkpoint_problem(path: Path) -> str | None:
    """Why a complete checkpoint cannot be trusted (a missing, truncated or changed file, an unreadable
    ``trainer.json``), or None. Checkpoints written before checksums existed are checked for their state only."""
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError) as exc:
        return f"{STATE_FILE} is unreadable ({type(exc).__name__})"
    if not isinstance(state, dict) or not {"step", "identity", "wall_time_s"} <= set(state):
        return f"{STATE_FILE} lacks the run's state"
    for rel, (size, digest) in (state.get("files") or {}).items():
        f = path / rel
        if not f.is_file():
            return f"{rel} is missing"
        if f.stat().st_size != size:
            return f"{rel} has {f.stat().st_size} bytes, {size} were written"
        if _sha256(f) != digest:
            return f"{rel} does not match the checksum written with it"
    return None


def set_aside(path: Path) -> Path:
    """Rename a damaged checkpoint to ``step_<n>.damaged`` (``.damaged-2``, ...): kept for a look, never
    deleted, and no longer a checkpoint that resuming or pruning sees."""
    target = path.with_name(f"{path.name}.damaged")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.damaged-{n}")
    os.replace(path, target)
    return target


def _complete_checkpoints(checkpoint_dir: str | Path | None) -> list[Path]:
    if checkpoint_dir is None or not Path(checkpoint_dir).is_dir():
        return []
    found = []
    for p in Path(checkpoint_dir).iterdir():
        name = p.name
        if name.startswith("step_") and name[5:].isdigit() and (p / MARKER).is_file():
            found.append((int(name[5:]), p))
    return [p for _, p in sorted(found)]


class ProxyTrainer:
    """Train a proxy from ``data`` rows for ``total_tokens``, in rungs via ``train_to``.

    ``data`` is an int array of shape (n_rows, seq_len), already shuffled; row
    order is data order, wrapping around when exhausted. Under ``accelerate
    launch`` each rank trains on its slice of every global batch, so the run is
    the same whatever the world size (``batch_size`` must divide evenly).
    A fresh trainer resumes from the latest complete checkpoint in
    ``checkpoint_dir``. A passed ``accelerator`` must not have prepared anything
    else: its ``save_state`` saves everything it prepared.
    """

    def __init__(self, model_config: LlamaConfig, data: np.ndarray, *, total_tokens: int, batch_size: int,
                 lr: float, warmup_frac: float = 0.05, min_lr_ratio: float = 0.1, weight_decay: float = 0.1,
                 betas: tuple[float, float] = (0.9, 0.95), grad_clip: float | None = 1.0, seed: int,
                 precision: str = "auto", checkpoint_dir: str | Path | None = None,
                 save_every_s: float | None = None, accelerator: Accelerator | None = None,
                 micro_batch_size: int | None = None, run_key: str | None = None,
                 keep_checkpoints: int = KEEP_CHECKPOINTS):
        _check_data(data, model_config)
        _check_positive(total_tokens=total_tokens, batch_size=batch_size, lr=lr)
        if not 0.0 <= warmup_frac < 1.0:
            raise InputError(f"must be in [0, 1) (got {warmup_frac})", field="warmup_frac")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise InputError(f"must be in [0, 1] (got {min_lr_ratio})", field="min_lr_ratio")
        if save_every_s is not None and save_every_s <= 0:
            raise InputError(f"must be positive (got {save_every_s})", field="save_every_s")
        if save_every_s is not None and checkpoint_dir is None:
            raise InputError("needs checkpoint_dir", field="save_every_s")
        if isinstance(keep_checkpoints, bool) or not isinstance(keep_checkpoints, int) or keep_checkpoints < 1:
            raise InputError(f"must be a whole number >= 1 (got {keep_checkpoints!r})", field="keep_checkpoints")
        self.keep_checkpoints = keep_checkpoints

        self.accelerator = accelerator if accelerator is not None else Accelerator()
        acc = self.accelerator
        launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if acc.num_processes == 1 and launched > 1:
            raise InputError(f"this is one of {launched} launched processes (WORLD_SIZE={launched}) but Accelerate "
                             "did not start distributed training, so each would train alone as rank 0; on a "
                             "machine without GPUs set ACCELERATE_USE_CPU=1 for accelerate launch --multi_gpu",
                             field="num_processes")
        if any(getattr(acc, name, None) for name in ("_models", "_optimizers", "_custom_objects")):
            raise ValueError("the accelerator already prepared other objects; give each ProxyTrainer its own")
        if batch_size % acc.num_processes:
            raise InputError(f"batch_size {batch_size} is not divisible by the {acc.num_processes} processes",
                             field="batch_size")
        # Rows per forward/backward pass; None keeps one pass per rank over its share of the batch.
        micro = micro_batch_size if micro_batch_size is not None else batch_size // acc.num_processes
        if isinstance(micro, bool) or not isinstance(micro, int) or micro < 1 \
                or batch_size % (micro * acc.num_processes):
            share = batch_size // acc.num_processes
            fits = ", ".join(str(m) for m in range(1, share + 1) if share % m == 0)
            raise InputError(f"batch_size {batch_size} is not a multiple of micro_batch_size {micro} x "
                             f"{acc.num_processes} process(es); with {acc.num_processes} process(es) use one of: "
                             f"{fits}", field="micro_batch_size")
        self.precision = planned_precision(precision, acc, shape=TrainShape(model_config, micro, data.shape[1]))

        self.data = data
        self.seq_len = data.shape[1]
        self.batch_size = batch_size
        self.micro_batch_size = micro
        self.micro_per_rank = batch_size // (micro * acc.num_processes)
        self.total_tokens = total_tokens
        self.tokens_per_step = batch_size * self.seq_len
        self.total_steps = math.ceil(total_tokens / self.tokens_per_step)
        self.warmup_steps = min(self.total_steps, max(1, round(warmup_frac * self.total_steps)))
        self.grad_clip = grad_clip
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.save_every_s = save_every_s

        # Same seed on every rank: identical initial weights, identical data order.
        set_seed(seed)
        model = ProxyLlamaForCausalLM(model_config)  # LlamaForCausalLM with a fused loss (proxy/model.py)
        # nanoGPT's rule: decay matrices and embeddings, not norm gains or biases.
        decay = [p for p in model.parameters() if p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.dim() < 2]
        # AdamW's fused kernel: one launch for every tensor on a GPU instead of one per tensor and
        # operation; on a CPU 3-7% more tokens/s than the default for-loop for 0.5M-2M proxies
        # (benchmarks/proxy_throughput.py --variants rbridge fused-adamw, interleaved). Older torch
        # without a fused kernel for the device gets the default.
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        try:
            optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)
        except (RuntimeError, ValueError):
            optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas)
        schedule = functools.partial(lr_factor, warmup_steps=self.warmup_steps, total_steps=self.total_steps,
                                     min_lr_ratio=min_lr_ratio)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        self._model, self.optimizer = acc.prepare(model, optimizer)
        # Not prepare()d: an AcceleratedScheduler steps once per process unless split_batches,
        # but our global batch is already split across ranks, so one step per optimizer step.
        acc.register_for_checkpointing(self.scheduler)

        # Everything that tells two runs apart; a checkpoint of another run is refused.
        config_fields = {k: v for k, v in model_config.to_diff_dict().items() if k != "transformers_version"}
        self._identity = dict(config=config_fields, n_rows=int(data.shape[0]), seq_len=self.seq_len,
                              total_tokens=total_tokens, batch_size=batch_size, lr=lr, warmup_frac=warmup_frac,
                              min_lr_ratio=min_lr_ratio, weight_decay=weight_decay, betas=list(betas),
                              grad_clip=grad_clip, seed=seed, precision=self.precision)
        if micro_batch_size is not None:  # only when given: checkpoints written before it existed still resume
            self._identity["micro_batch_size"] = micro_batch_size
        # Which run the checkpoints belong to (the planner's run fingerprint): a checkpoint another run wrote
        # into this folder (a worker still saving a run that a spec edit superseded) is set aside, not loaded.
        self.run_key = run_key
        self._step = 0
        self._wall_time_s = 0.0
        self._last_loss = float("nan")
        # The newest checkpoint whose files match their checksums; damaged ones are set aside (by the main
        # process, before any rank looks), and the run resumes from the one before, or from the start.
        self.set_aside: list[tuple[Path, Path, str]] = []  # (checkpoint, renamed to, what was wrong)
        if acc.is_main_process:
            for candidate in reversed(_complete_checkpoints(self.checkpoint_dir)):
                problem = checkpoint_problem(candidate) or self._foreign(candidate)
                if problem is None:
                    break
                self.set_aside.append((candidate, set_aside(candidate), problem))
        acc.wait_for_everyone()
        ckpt = latest_checkpoint(self.checkpoint_dir)
        if acc.num_processes > 1:
            # Every rank must resume from the same step, or DDP would average gradients of different models.
            seen = gather_object([ckpt.name if ckpt is not None else "none"])
            if len(set(seen)) > 1:
                raise InputError(f"the {acc.num_processes} processes see different latest checkpoints in "
                                 f"{self.checkpoint_dir} ({', '.join(f'rank {i}: {s}' for i, s in enumerate(seen))})"
                                 "; it must be one directory shared by all machines", field="checkpoint_dir")
        if ckpt is not None:
            self._load_checkpoint(ckpt)

    # ---- progress --------------------------------------------------------------------------

    @property
    def step(self) -> int:
        """Optimizer steps taken."""
        return self._step

    @property
    def tokens_seen(self) -> int:
        """Global training tokens consumed (all ranks): step * batch_size * seq_len."""
        return self._step * self.tokens_per_step

    @property
    def wall_time_s(self) -> float:
        """Seconds spent in training steps, summed over resumed runs."""
        return self._wall_time_s

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_seen / self._wall_time_s if self._wall_time_s > 0 else 0.0

    @property
    def model(self) -> LlamaForCausalLM:
        """The trained model, unwrapped from DDP and in eval mode (training puts it back in train mode)."""
        model = self.accelerator.unwrap_model(self._model)
        model.eval()
        return model

    def lr_at(self, step: int) -> float:
        """Learning rate used by optimizer step ``step``."""
        return self.scheduler.base_lrs[0] * self.scheduler.lr_lambdas[0](step)

    # ---- training --------------------------------------------------------------------------

    def train_to(self, tokens: int, on_step: Callable[[int, float], None] | None = None) -> float:
        """Train until ``tokens_seen >= tokens`` (capped at ``total_tokens``); return the last loss.

        ``on_step(tokens_seen, loss)`` is called after every step, on every rank, with
        the loss averaged over ranks (record it on the main process only); on an accelerator
        the loss is read every ``LOSS_READ_EVERY`` steps, and between reads it is the last read. With ``save_every_s`` a checkpoint is written whenever
        that many seconds have passed since the last one.
        """
        target = min(int(tokens), self.total_tokens)
        last_save = time.monotonic()
        # Reading the loss (.item()) waits for the device; on a GPU that stalls the queue of kernels
        # every step, so the loss is read every LOSS_READ_EVERY steps there (and at the last step).
        read_every = 1 if self.accelerator.device.type == "cpu" else LOSS_READ_EVERY
        while self.tokens_seen < target and self._step < self.total_steps:
            t0 = time.perf_counter()
            loss = self._train_step()
            last = self.tokens_seen >= target or self._step >= self.total_steps
            if last or self._step % read_every == 0:
                self._last_loss = loss.item()
            self._wall_time_s += time.perf_counter() - t0
            if on_step is not None:
                on_step(self.tokens_seen, self._last_loss)
            if self.save_every_s is not None and self._save_due(last_save):
                self.save_checkpoint()
                last_save = time.monotonic()
        return self._last_loss

    def _save_due(self, last_save: float) -> bool:
        """Whether ``save_every_s`` has passed, by the main process's clock on every rank.

        Each rank's own clock could disagree near the deadline, and a rank that saves
        alone would wait in ``save_checkpoint``'s barrier while the others train on.
        """
        due = time.monotonic() - last_save >= self.save_every_s
        if self.accelerator.num_processes == 1:
            return due
        flag = torch.tensor([int(due)], dtype=torch.int32, device=self.accelerator.device)
        return bool(broadcast(flag, from_process=0).item())

    def _train_step(self) -> torch.Tensor:
        acc, k = self.accelerator, self.micro_per_rank
        self._model.train()
        total = None
        for j in range(k):
            batch = self._micro_batch(self._step, j)
            # DDP all-reduces the summed gradients once, after the rank's last micro-batch.
            with contextlib.nullcontext() if j == k - 1 else acc.no_sync(self._model):
                with self._autocast():
                    loss = self._model(input_ids=batch, labels=batch).loss
                acc.backward(loss / k if k > 1 else loss)
            total = loss.detach() if total is None else total + loss.detach()
        if self.grad_clip:
            acc.clip_grad_norm_(self._model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._step += 1
        return acc.reduce(total / k if k > 1 else total, reduction="mean")

    def _micro_batch(self, step: int, j: int) -> torch.Tensor:
        """Rows of this rank's ``j``-th micro-batch of global batch ``step``.

        The global batch is rows (step*B + i) mod n_rows, i in 0..B-1, cut into micro-batches of M rows;
        rank r takes micro-batches r*k .. r*k + k-1, so its rows are one contiguous slice.
        """
        first = step * self.batch_size + (self.accelerator.process_index * self.micro_per_rank + j) \
            * self.micro_batch_size
        rows = (first + np.arange(self.micro_batch_size)) % self.data.shape[0]
        return torch.from_numpy(np.asarray(self.data[rows], dtype=np.int64)).to(self.accelerator.device)

    def _batch(self, step: int) -> torch.Tensor:
        """This rank's rows of global batch ``step`` (all its micro-batches): rows (step*B + i) mod n_rows."""
        return torch.cat([self._micro_batch(step, j) for j in range(self.micro_per_rank)])

    def _autocast(self):
        # torch.autocast instead of Accelerator(mixed_precision="bf16"): Accelerate keeps the
        # precision in a process-wide singleton that cannot change once set, and rbridge trains
        # proxies in fp32 and bf16 within one process (tests, benchmarks, a planner). When the
        # accelerator itself was made with bf16 (accelerate launch --mixed_precision bf16),
        # prepare() already wrapped forward in autocast and this is a no-op.
        if self.precision == "bf16" and self.accelerator.mixed_precision == "no":
            return torch.autocast(device_type=self.accelerator.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ---- checkpoints -----------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """Write ``checkpoint_dir/step_<n>/`` atomically and keep the newest ``keep_checkpoints``; return its path.

        Accelerate's ``save_state`` writes model, optimizer, scheduler and every rank's
        RNG states into ``step_<n>.tmp/``; then ``trainer.json`` (with every file's size
        and SHA-256) and the ``COMPLETE`` marker are written and the folder is renamed, so a crash leaves either a complete
        checkpoint or one that ``latest_checkpoint`` ignores. With several processes every
        rank must call this at the same step; the main process alone clears, marks, renames
        and prunes, between barriers, so no rank sees a half-written ``step_<n>/``.
        """
        if self.checkpoint_dir is None:
            raise ValueError("this trainer has no checkpoint_dir")
        acc = self.accelerator
        final = self.checkpoint_dir / f"step_{self._step}"
        tmp = self.checkpoint_dir / f"step_{self._step}.tmp"
        if (final / MARKER).is_file():
            return final
        if acc.is_main_process:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            for stale in (tmp, final):           # leftovers of a crash at this very step
                if stale.exists():
                    shutil.rmtree(stale)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        failpoint("checkpoint-write")
        if acc.is_main_process:
            state = dict(step=self._step, tokens_seen=self.tokens_seen, wall_time_s=self._wall_time_s,
                         last_loss=self._last_loss, identity=self._identity, files=_file_sums(tmp))
            if self.run_key:
                state["run_key"] = self.run_key
            _write_synced(tmp / STATE_FILE, json.dumps(state, indent=1))
            _write_synced(tmp / MARKER, "")
            os.replace(tmp, final)
            for old in _complete_checkpoints(self.checkpoint_dir)[:-self.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def _foreign(self, path: Path) -> str | None:
        """Why a sound checkpoint is not this run's (another ``run_key``), or None. Checkpoints without a
        key (written before keys existed, or by a trainer given none) are this run's."""
        theirs = json.loads((path / STATE_FILE).read_text()).get("run_key")
        if self.run_key and theirs and theirs != self.run_key:
            return f"written by another run ({theirs[:12]}), not this one ({self.run_key[:12]})"
        return None

    def _load_checkpoint(self, path: Path) -> None:
        state = json.loads((path / STATE_FILE).read_text())
        saved = json.loads(json.dumps(state["identity"]))
        current = json.loads(json.dumps(self._identity))
        if saved != current:
            diff = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
            raise InputError(f"{path} belongs to another run (differs in: {', '.join(diff)})",
                             field="checkpoint_dir")
        self.accelerator.load_state(str(path))
        self._step = state["step"]
        self._wall_time_s = state["wall_time_s"]
        self._last_loss = state["last_loss"]


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _precision_with(acc: Accelerator, resolved: str, asked: str) -> str:
    """Reconcile the asked precision with an accelerator that already has one."""
    if acc.mixed_precision == "no":
        return resolved
    if asked == "auto" or (asked, acc.mixed_precision) == ("bf16", "bf16"):
        return acc.mixed_precision
    raise InputError(f"precision {asked!r} conflicts with the accelerator's mixed_precision "
                     f"{acc.mixed_precision!r}", field="precision")


def _check_positive(**values) -> None:
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            raise InputError(f"must be positive (got {v!r})", field=name)


def _check_data(data: np.ndarray, config: LlamaConfig) -> None:
    if not isinstance(data, np.ndarray) or data.ndim != 2 or not np.issubdtype(data.dtype, np.integer):
        raise InputError("must be an integer array of shape (n_rows, seq_len)", field="data")
    if data.shape[0] < 1 or data.shape[1] < 2:
        raise InputError(f"needs at least 1 row of at least 2 tokens (shape {data.shape})", field="data")
    if data.shape[1] > config.max_position_embeddings:
        raise InputError(f"seq_len {data.shape[1]} exceeds max_position_embeddings "
                         f"{config.max_position_embeddings}", field="data")
    lo, hi = int(data.min()), int(data.max())
    if lo < 0 or hi >= config.vocab_size:
        raise InputError(f"token ids must be in [0, {config.vocab_size}) (found {lo}..{hi})", field="data")
