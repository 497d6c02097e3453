"""What ``precision: auto`` measured: fp32 and bf16 rates and the choice they make (rbridge.proxy.precision).

A module without torch, so that ``rbridge status`` reads the rates a store recorded without importing it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

THRESHOLD = 1.15  # bf16 must reach this multiple of fp32's rate for auto to take it


@dataclass(frozen=True)
class Rates:
    """Measured rates of one kind of work in fp32 and bf16 (tokens/s), and how they were obtained."""

    fp32: float
    bf16: float
    how: str            # "training steps ...", "matrix products ...", "forward passes ...", or the override
    machine: str = ""   # the machine they were measured on (machine_name)
    threads: int = 0

    @property
    def speedup(self) -> float:
        return self.bf16 / self.fp32 if self.fp32 > 0 else 0.0

    @property
    def choice(self) -> str:
        """"bf16" when it reaches THRESHOLD times fp32's rate, else "fp32"."""
        return "bf16" if self.speedup >= THRESHOLD else "fp32"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Rates | None:
        """The rates a store recorded ('' or damaged text: None)."""
        try:
            d = json.loads(text) if text else None
            return cls(float(d["fp32"]), float(d["bf16"]), str(d["how"]), str(d.get("machine", "")),
                       int(d.get("threads", 0))) if isinstance(d, dict) else None
        except (ValueError, KeyError, TypeError):
            return None

    def describe(self) -> str:
        """One line for status and logs: ``bf16 2.31x fp32 (training steps ..., 2 threads)``."""
        th = f", {self.threads} thread{'s' if self.threads != 1 else ''}" if self.threads else ""
        return f"bf16 {self.speedup:.2f}x fp32 ({self.how}{th}; auto takes bf16 from {THRESHOLD:.2f}x)"
