"""Which machine a benchmark ran on (issue 24): printed at the start of every benchmark in benchmarks/.

    from _machine import print_machine      # benchmarks/ is on sys.path when run as python benchmarks/x.py
    info = print_machine(threads)           # prints the lines below and returns machine_info()'s dict

The CPU model (name, family and model numbers), logical cores and the cores this process may use, the
CPU flags torch's kernels depend on, the load average, torch's version and CPU capability, the GPU if
CUDA is available, and the measured rate of n x n ``torch.mm`` (best of 5, GFLOP/s) in fp32 and bf16 at
1 thread and at the process's thread count, on the device a benchmark would use (the GPU where CUDA is
available, else the CPU). Figures from two machines compare only next to these lines: a CPU without
AVX512_BF16/AMX emulates bf16 (slower than fp32), and a shared machine's load average moves everything.
``ONEDNN_MAX_CPU_ISA=AVX512_CORE`` in the environment makes a CPU with bf16 units compute torch's bf16
products without them (oneDNN's documented cap), which is how a machine with fast bf16 measures what
rbridge does on one without; the header names the cap when it is set.
"""

from __future__ import annotations

import os
import platform

# The flags that matter for torch on CPUs: AVX2/AVX-512 vector units, and bf16/fp16/int8 units (oneDNN).
FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16", "avx_vnni")


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ({} where there is none)."""
    out: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                out.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return out


def machine_info(threads: int | None = None) -> dict:
    """The machine as a dict (JSON-ready). ``threads``: the run's thread count (default torch's)."""
    import torch

    from rbridge.proxy.peak import _measured, mm_rate
    from rbridge.proxy.precision import onednn_cap

    cpu = _cpuinfo()
    flags = set(cpu.get("flags", "").split())
    load = os.getloadavg() if hasattr(os, "getloadavg") else None  # before our own products add to it
    threads = threads or torch.get_num_threads()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    capability = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", None)

    def _int(key: str) -> int | None:
        return int(cpu[key]) if cpu.get(key, "").isdigit() else None

    # (n, threads) -> GFLOP/s per precision. The large size goes through peak._measured (also what
    # peak_flops/MFU use, cached per process, so a benchmark's MFU is against the very figure printed).
    small, large = (1024, 8192) if cuda else (512, 1024)
    rates = []
    for n in (small, large):
        for t in ([1] if cuda else sorted({1, threads})):  # threads do not change a GPU's products
            row: dict = {"n": n, "threads": t}
            for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
                flops = (_measured(device.type, device.index, precision, t) if n == large
                         else mm_rate(device, n, dtype, t))
                row[precision] = round(flops / 1e9, 1)
            row["bf16_over_fp32"] = round(row["bf16"] / row["fp32"], 2)
            rates.append(row)
    return {
        "cpu_model": cpu.get("model name") or platform.processor() or platform.machine(),
        "cpu_family": _int("cpu family"),
        "cpu_model_number": _int("model"),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "flags": {f: f in flags for f in FLAGS} if flags else None,  # None: not known (no /proc/cpuinfo)
        "load_average": [round(x, 2) for x in load] if load else None,
        "torch": torch.__version__,
        "cpu_capability": capability() if callable(capability) else None,
        "gpu": torch.cuda.get_device_name(device) if cuda else None,
        "threads": threads,
        "matmul_device": str(device),
        "onednn_max_cpu_isa": onednn_cap(),  # where set, part of the machine (rbridge.proxy.precision)
        "matmul_gflops": rates,
    }


def machine_lines(threads: int | None = None, info: dict | None = None) -> list[str]:
    """machine_info()'s dict (measured now unless given) as the lines print_machine prints."""
    m = info or machine_info(threads)
    fam = "" if m["cpu_family"] is None else f" (family {m['cpu_family']} model {m['cpu_model_number']})"
    load = ", ".join(f"{x:.2f}" for x in m["load_average"]) if m["load_average"] else "?"
    cap = m.get("onednn_max_cpu_isa")
    if m["flags"] is None:
        flags = "unknown"
    else:
        flags = " ".join(f for f, on in m["flags"].items() if on) or "none"
        missing = [f for f, on in m["flags"].items() if not on]
        flags += f" (absent: {' '.join(missing)})" if missing else ""
    lines = [
        f"machine: {m['cpu_model']}{fam}, {m['logical_cores']} logical cores, {m['usable_cores']} usable; "
        f"load average {load}",
        f"  cpu flags: {flags}",
        f"  torch {m['torch']}, cpu capability {m['cpu_capability']}, {m['threads']} threads; "
        f"gpu: {m['gpu'] or 'none'}" + (f"; oneDNN capped at {cap} (ONEDNN_MAX_CPU_ISA)" if cap else ""),
        f"  torch.mm GFLOP/s on {m['matmul_device']} (n x n, best of 5):",
    ]
    for r in m["matmul_gflops"]:
        lines.append(f"    n={r['n']:<5} {r['threads']:>3} thread(s)  fp32 {r['fp32']:9,.1f}  bf16 {r['bf16']:9,.1f}  "
                     f"bf16/fp32 {r['bf16_over_fp32']:.2f}")
    return lines


def print_machine(threads: int | None = None) -> dict:
    """Print the machine's lines (flushed, before a benchmark's own output); return machine_info()'s dict."""
    info = machine_info(threads)
    print("\n".join(machine_lines(info=info)), flush=True)
    return info


if __name__ == "__main__":
    print_machine()
