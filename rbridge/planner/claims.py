"""Who holds a run: worker identity, the heartbeat that keeps a claim, and when a claim is stale.

A claim is a compare-and-set on the run row (rbridge.store.runs.claim). While the
holder trains, a heartbeat thread bumps ``beats``. Another worker takes the run
over when its beats have not moved for ``heartbeat_timeout`` seconds, measured on
the observer's own monotonic clock (so machines need no synchronised clocks), or
at once when the holder ran on the same machine and its pid is gone.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

from rbridge.store import Store
from rbridge.store import runs as run_ops
from rbridge.store.models import Run

DEFAULT_HEARTBEAT_TIMEOUT_S = 60.0


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8]
    except OSError:
        return "noboot"


def _host() -> str:
    """This machine's name in worker ids: $RBRIDGE_WORKER_HOST (e.g. a node name), else the hostname."""
    return os.environ.get("RBRIDGE_WORKER_HOST") or socket.gethostname()


def worker_id() -> str:
    """host:pid:boot - enough to tell, on the same machine, whether the holder still lives; under SLURM
    with ``:slurm=<job>_<task>`` (or ``:slurm=<job>``) after it, so `rbridge status` names the array task."""
    wid = f"{_host()}:{os.getpid()}:{_boot_id()}"
    job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    if job:
        task = os.environ.get("SLURM_ARRAY_TASK_ID")
        wid += f":slurm={job}" + (f"_{task}" if task is not None and os.environ.get("SLURM_ARRAY_JOB_ID") else "")
    return wid


def holder_is_dead_here(worker: str) -> bool:
    """True when ``worker`` ran on this machine (same host and boot) and its process is gone."""
    host, _, rest = worker.partition(":")
    pid, _, boot = rest.partition(":")
    boot = boot.split(":", 1)[0]  # ":slurm=..." may follow
    if host != _host() or boot != _boot_id() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def beat_interval(heartbeat_timeout: float) -> float:
    """Four beats per timeout, between 0.2 and 10 seconds."""
    return max(0.2, min(10.0, heartbeat_timeout / 4))


class ClaimLost(Exception):
    """Another worker took this run over (our heartbeats stopped reaching the store)."""


class Claim:
    """A run held by this worker, kept alive by a heartbeat thread until stopped or released."""

    def __init__(self, store: Store, run_id: int, lease: int, worker: str, every_s: float):
        self.store, self.run_id, self.lease, self.worker = store, run_id, lease, worker
        self.every_s = every_s
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-run-{run_id}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                if not run_ops.beat(self.store, self.run_id, self.lease, self.worker):
                    self.lost.set()
                    return
            except Exception:  # noqa: BLE001 - a missed beat is retried; the lease decides
                continue

    def check(self) -> None:
        if self.lost.is_set():
            raise ClaimLost(f"run {self.run_id} was taken over by another worker")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def release(self) -> None:
        """Give the run back (after a failure): pending again, for any worker."""
        self.stop()
        try:
            run_ops.release(self.store, self.run_id, self.lease, self.worker)
        except Exception:  # noqa: BLE001 - the lease times out anyway
            pass


class StaleWatch:
    """Tells whether a run may be claimed: pending, or running under a holder that is gone.

    A holder on another machine is gone when its (lease, beats) have not changed for
    the timeout on this process's clock (and for at least three of its own beat intervals).
    """

    def __init__(self, heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT_S):
        self.heartbeat_timeout = heartbeat_timeout
        self._seen: dict[int, tuple[int, int, str, float]] = {}  # run id -> (lease, beats, status, since)

    def claimable(self, run: Run) -> bool:
        if run.status == "pending":
            return True
        if run.status != "running":
            return False
        if not run.worker or holder_is_dead_here(run.worker):
            return True
        now = time.monotonic()
        key = (run.lease, run.beats, run.status)
        seen = self._seen.get(run.id)
        if seen is None or seen[:3] != key:
            self._seen[run.id] = (*key, now)
            return False
        return now - seen[3] >= max(self.heartbeat_timeout, 3 * (run.beat_every_s or 0))
