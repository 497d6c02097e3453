"""One proxy trained by two processes under ``accelerate launch`` (CPU, gloo), resumed by one.

The launch runs ``tests/dist_train_proxy.py`` in two real processes. Both ranks
build the same model from the same seed, train on their half of every global
batch, and DistributedDataParallel averages the gradients, so the run must
follow the one-process trajectory. The only difference is float rounding: each
rank averages the loss over its 4 rows and gloo averages the two gradients,
where one process takes a single mean over 8 rows, i.e. a different summation
order, a few ulps (~1e-7 relative in fp32) per step. Twelve AdamW steps carry
that to ~1e-6 in losses (about 5.5) and weights (measured: under 1e-6), so the
tolerance is 2e-5. Any real fault is about 100x larger, since every step moves
every weight by up to lr = 3e-3: in this run, an LR schedule one step off from
step 5 changes the final weights by 1.7e-3, one step on half the batch (a rank
without the allreduce) by 4.3e-3, a repeated batch by 6.5e-3.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from accelerate import Accelerator

from dist_train_proxy import BATCH, SEQ, VOCAB, make_trainer
from rbridge.errors import InputError

SCRIPT = Path(__file__).with_name("dist_train_proxy.py")
STEPS = 12
TOL = 2e-5

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """The launched ranks run one thread each; so does the reference here (conftest.one_torch_thread)."""


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def accelerate_launch_cmd(args, tmp_path, *, num_processes=2):
    """``accelerate launch`` with the CPU recipe: --multi_gpu spawns the ranks (torchrun),
    ACCELERATE_USE_CPU=1 makes Accelerate use gloo on the CPU. ``--cpu --num_processes 2``
    would start a single process (it expects mpirun), and so would a MULTI_CPU config.
    Returns the command and its environment; ``args`` are the script (or ``-m module``) and its arguments."""
    config = tmp_path / "accelerate.yaml"      # explicit, so a user's default config cannot interfere
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nnum_machines: 1\n"
                      f"num_processes: {num_processes}\nmixed_precision: 'no'\n")
    env = dict(os.environ, ACCELERATE_USE_CPU="1", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
           "--main_process_port", "0", *args]              # port 0: a free one (parallel tests)
    return cmd, env


def accelerate_launch(args, tmp_path, *, num_processes=2):
    cmd, env = accelerate_launch_cmd([str(SCRIPT), *args], tmp_path, num_processes=num_processes)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    return output


def test_two_processes_train_and_one_resumes(tmp_path):
    data = np.random.default_rng(0).integers(0, VOCAB, size=(40, SEQ), dtype=np.int32)
    np.save(tmp_path / "data.npy", data)

    whole = make_trainer(data, STEPS)                                   # the uninterrupted 1-process run
    whole_losses = []
    whole.train_to(10**9, on_step=lambda _, loss: whole_losses.append(loss))

    # b: 4 steps in 1 process (resumed by 2 processes below); c0 holds a copy only rank 0 will see
    first = make_trainer(data, STEPS, checkpoint_dir=tmp_path / "b")
    b_losses = []
    first.train_to(4 * BATCH * SEQ, on_step=lambda _, loss: b_losses.append(loss))
    shutil.copytree(first.save_checkpoint(), tmp_path / "c0" / "step_4")
    (tmp_path / "c1").mkdir()

    # a: 2 processes from scratch to step 5, saving after every step; b: 2 processes resume 4 -> 8;
    # c: rank 0 and rank 1 see different checkpoint dirs (as on machines without a shared disk)
    t0 = time.perf_counter()
    output = accelerate_launch([str(tmp_path / "data.npy"), str(tmp_path / "out"), "--steps", str(STEPS),
                                "--save-every-s", "1e-9", "--job", f"{tmp_path / 'a'}:5",
                                "--job", f"{tmp_path / 'b'}:8", "--job", f"{tmp_path / 'c{rank}'}:8"], tmp_path)
    launch_s = time.perf_counter() - t0
    assert "random states" not in output.lower()           # resuming at another world size is silent

    ranks = [json.loads((tmp_path / "out" / f"rank_{r}.json").read_text()) for r in range(2)]
    for r, seen in enumerate(ranks):
        assert (seen["rank"], seen["world_size"], seen["backend"]) == (r, 2, "gloo")
        assert seen["distributed_type"].endswith("MULTI_CPU")
    a = [seen["jobs"][0] for seen in ranks]
    b = [seen["jobs"][1] for seen in ranks]
    assert [(j["resumed_at"], j["step"]) for j in a + b] == [(0, 5), (0, 5), (4, 8), (4, 8)]
    for job, first_step in ((a, 0), (b, 4)):
        assert job[0]["losses"] == job[1]["losses"]        # the loss is averaged over ranks
        for i, (rows0, rows1) in enumerate(zip(job[0]["first_tokens"], job[1]["first_tokens"])):
            step = first_step + i                           # the ranks split the 1-process global batch
            assert rows0 + rows1 == data[(step * BATCH + np.arange(BATCH)) % len(data), 0].tolist()
            assert len(rows0) == len(rows1) == BATCH // 2
    for c in (seen["jobs"][2] for seen in ranks):
        assert "different latest checkpoints" in c["error"] and "shared" in c["error"]
        assert "rank 0: step_4, rank 1: none" in c["error"]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["step_4", "step_5"]   # main rank pruned
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in (tmp_path / "a" / "step_5").iterdir()}

    # 1 process resumes both 2-process checkpoints and finishes the run
    a_losses = list(a[0]["losses"])
    resumed = make_trainer(data, STEPS, checkpoint_dir=tmp_path / "a")
    assert resumed.step == 5
    resumed.train_to(10**9, on_step=lambda _, loss: a_losses.append(loss))
    b_losses += b[0]["losses"]
    resumed_b = make_trainer(data, STEPS, checkpoint_dir=tmp_path / "b")
    assert resumed_b.step == 8
    resumed_b.train_to(10**9, on_step=lambda _, loss: b_losses.append(loss))

    want = weights(whole.model)
    figures = {}
    for name, losses, trainer in (("2 procs -> 1", a_losses, resumed), ("1 -> 2 procs -> 1", b_losses, resumed_b)):
        assert len(losses) == STEPS and trainer.step == STEPS
        loss_diff = float(np.max(np.abs(np.array(losses) - np.array(whole_losses))))
        param_diff = max_diff(weights(trainer.model), want)
        figures[name] = (loss_diff, param_diff)
        assert loss_diff <= TOL and param_diff <= TOL, (name, loss_diff, param_diff)
    print(f"accelerate launch took {launch_s:.1f} s; max |loss diff|, max |param diff| vs 1 process: {figures}")


def test_processes_that_did_not_join_are_refused(monkeypatch):
    # `accelerate launch --multi_gpu` on a CPU machine without ACCELERATE_USE_CPU=1 starts N processes
    # that each see one process; training on would make N rank-0s write the same checkpoints.
    Accelerator()                                   # this test process: one process, already set up
    data = np.zeros((4, SEQ), dtype=np.int32)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(InputError, match="ACCELERATE_USE_CPU=1") as e:
        make_trainer(data, STEPS)
    assert e.value.field == "num_processes"
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert make_trainer(data, STEPS).accelerator.num_processes == 1


def test_micro_batches_make_two_processes_equal_one_bitwise(tmp_path):
    """With micro_batch_size fixed, 1 process (two micro-batches of 4 rows, gradients accumulated) and 2
    processes (one micro-batch each, DDP averages) run the same passes over the same rows, and the sums
    match: 1 process computes g1/2 + g2/2, DDP (g1 + g2)/2, equal in floats. Without it the two differ
    by ~1e-6 here (one pass over 8 rows vs two over 4), which AdamW can magnify to 1e-3 in proxy scores."""
    data = np.random.default_rng(0).integers(0, VOCAB, size=(40, SEQ), dtype=np.int32)
    np.save(tmp_path / "data.npy", data)
    one = make_trainer(data, STEPS, micro_batch_size=BATCH // 2)
    one_losses = []
    one.train_to(10**9, on_step=lambda _, loss: one_losses.append(loss))
    accelerate_launch([str(tmp_path / "data.npy"), str(tmp_path / "out"), "--steps", str(STEPS),
                       "--micro-batch-size", str(BATCH // 2), "--job", f"{tmp_path / 'two'}:{STEPS}"], tmp_path)
    ranks = [json.loads((tmp_path / "out" / f"rank_{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["jobs"][0]["losses"] == ranks[1]["jobs"][0]["losses"] == one_losses
    # The 2-process checkpoint resumes in 1 process (same identity) at the last step, with the same weights.
    two = make_trainer(data, STEPS, micro_batch_size=BATCH // 2, checkpoint_dir=tmp_path / "two")
    assert two.step == STEPS
    want, got = weights(one.model), weights(two.model)
    assert all(torch.equal(want[k], got[k]) for k in want), max_diff(want, got)
