"""The processes of one worker started by ``accelerate launch`` (or torchrun).

Rank 0 alone talks to the store: it claims a run, sends the run to the other
ranks, and all of them train it together (ProxyTrainer shards every global
batch by rank; DDP averages the gradients); rank 0 then scores and records it.
While rank 0 waits for work it sends "wait" every poll, so the other ranks'
collective calls never reach their timeout.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from rbridge.errors import InputError
from rbridge.planner.steps import RunContext, prepare_data, train_run
from rbridge.spec import parse_spec


class Ranks:
    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        self.rank = 0
        if self.world > 1:
            from accelerate import PartialState
            from accelerate.utils import parse_flag_from_env

            # Joins the process group (NCCL on GPUs; gloo on CPUs, where PartialState, unlike
            # the Accelerator, does not read ACCELERATE_USE_CPU itself).
            state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
            if state.num_processes != self.world:
                raise InputError(f"this is one of {self.world} launched processes but Accelerate did not start "
                                 "distributed training; on a machine without GPUs set ACCELERATE_USE_CPU=1 for "
                                 "accelerate launch --multi_gpu", field="WORLD_SIZE")
            self.rank = state.process_index

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def send(self, message) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.broadcast_object_list([message], src=0)

    def receive(self):
        import torch.distributed as dist

        box = [None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        """Leave together: free what still holds the process group, meet, destroy the group on
        every rank (a gloo group torn down at interpreter exit after the other rank left can hang)."""
        if self.world <= 1:
            return
        import gc

        import torch.distributed as dist

        if dist.is_initialized():
            gc.collect()
            dist.barrier()
            dist.destroy_process_group()


def run_message(ctx: RunContext, spec_hash: str, tokens: int, threads: int) -> dict:
    """What rank 0 sends the other ranks so that they train the same run with it."""
    spec = ctx.spec
    return {"spec_hash": spec_hash, "spec_text": spec.text,
            "spec_path": str(spec.path.resolve()) if spec.path else "",
            "stage": ctx.stage.name, "candidate": ctx.candidate, "mix": ctx.mix,
            "threads": threads, "tokens": tokens,
            "checkpoint": str(ctx.checkpoint_dir.resolve()), "seed": ctx.seed, "model_seed": ctx.model_seed,
            "run_key": ctx.run_key, "precision": ctx.precision}


def follow(ranks: Ranks, threads: int | None = None) -> int:
    """Ranks > 0: train whatever rank 0 sends until it sends None; returns rungs trained."""
    plans: dict[str, tuple] = {}
    n = 0
    while True:
        message = ranks.receive()
        if message is None:
            return n
        if message == "wait":
            continue
        key = message["spec_hash"]
        if key not in plans:
            spec = parse_spec(message["spec_text"], Path(message["spec_path"] or "spec.yaml"))
            plans[key] = (spec, prepare_data(spec))
        spec, data = plans[key]
        stage = next(st for st in spec.resolved_stages() if st.name == message["stage"])
        torch.set_num_threads(message["threads"])  # rank 0's count for this run
        ctx = RunContext(spec, stage, message["candidate"], message["mix"], data, {}, Path(message["checkpoint"]),
                         seed=message["seed"], model_seed=message["model_seed"], run_key=message["run_key"],
                         precision=message["precision"])
        train_run(ctx, message["tokens"])
        n += 1
