"""Train one tiny proxy under ``accelerate launch`` for tests/test_distributed.py.

    accelerate launch ... tests/dist_train_proxy.py DATA.npy OUT_DIR --steps N --job CKPT_DIR:K [--job ...]

For each ``--job``, trains the proxy of ``tests/test_distributed.py`` (tiny
config, random tokens from DATA.npy, ``N`` optimizer steps in all) to step ``K``,
resuming from the latest checkpoint in CKPT_DIR if there is one, and saves a
checkpoint there at the end (``--micro-batch-size M``: M rows per forward/backward pass); ``{rank}`` in CKPT_DIR is replaced by the rank,
and a job whose trainer raises InputError is recorded, not fatal. Every rank writes ``OUT_DIR/rank_<i>.json`` with
what it saw (rank, world size, backend, and per job the step it resumed at, its
losses and the first token of each row it trained on), so the test can tell that
all ranks ran and split each batch. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import faulthandler
import gc
import json
import sys
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator

from rbridge.errors import InputError
from rbridge.proxy import ProxyTrainer, proxy_config

VOCAB, SEQ, BATCH, LR, SEED = 256, 32, 8, 3e-3, 7
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}


def make_trainer(data: np.ndarray, steps: int, **kw) -> ProxyTrainer:
    """The proxy every run of the test trains: the same identity in every world size."""
    return ProxyTrainer(proxy_config(TINY, VOCAB, SEQ), data, total_tokens=steps * BATCH * SEQ, batch_size=BATCH,
                        lr=LR, seed=SEED, precision="fp32", **kw)


def run_job(acc: Accelerator, data: np.ndarray, job: str, steps: int, save_every_s: float | None,
            micro_batch_size: int | None = None) -> dict:
    """One ``CKPT_DIR:TO_STEP`` job; its trainer is freed when this returns."""
    checkpoint_dir, to_step = job.rsplit(":", 1)
    checkpoint_dir = checkpoint_dir.format(rank=acc.process_index)
    try:
        t = make_trainer(data, steps, checkpoint_dir=checkpoint_dir, save_every_s=save_every_s,
                         micro_batch_size=micro_batch_size)
    except InputError as e:          # recorded for the test to check; every rank raises it
        return dict(checkpoint_dir=checkpoint_dir, error=str(e))
    resumed_at = t.step
    losses, rows = [], []

    def on_step(tokens: int, loss: float) -> None:
        losses.append(loss)
        rows.append(t._batch(t.step - 1)[:, 0].tolist())

    t.train_to(int(to_step) * BATCH * SEQ, on_step=on_step)
    t.save_checkpoint()
    return dict(checkpoint_dir=checkpoint_dir, resumed_at=resumed_at, step=t.step, losses=losses, first_tokens=rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data")
    ap.add_argument("out_dir")
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--job", action="append", required=True, help="CKPT_DIR:TO_STEP")
    ap.add_argument("--save-every-s", type=float, default=None)
    ap.add_argument("--micro-batch-size", type=int, default=None)
    args = ap.parse_args()
    # A rank that hangs (a collective the other rank never joins) prints every thread's stack and exits,
    # so the test fails with the place instead of waiting for its timeout.
    faulthandler.dump_traceback_later(180, exit=True, file=sys.stderr)

    torch.set_num_threads(1)
    data = np.load(args.data)
    acc = Accelerator()
    jobs = [run_job(acc, data, job, args.steps, args.save_every_s, args.micro_batch_size) for job in args.job]
    out = dict(rank=acc.process_index, world_size=acc.num_processes, backend=acc.state.backend,
               distributed_type=str(acc.distributed_type), jobs=jobs)
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.out_dir) / f"rank_{acc.process_index}.json").write_text(json.dumps(out))
    # Free every trainer (its DDP model holds the process group; a refused one may sit in a
    # reference cycle) while the group is alive, meet, then destroy the group on all ranks. Before,
    # with the last trainer still alive when main() returned, rank 0 hung in that teardown in about
    # 1 launch of 12 under load (faulthandler: no Python frame left but the call of main()).
    gc.collect()
    acc.wait_for_everyone()
    acc.end_training()


if __name__ == "__main__":
    main()
