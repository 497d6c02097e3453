"""``precision: auto`` by measurement (rbridge.proxy.precision): the rule on injected rates (bf16 slower,
equal, faster), the real measurement on this machine, the per-machine cache, and a bad override."""

import json

import pytest
import torch

from rbridge.errors import InputError
from rbridge.proxy import precision as P
from rbridge.proxy.presets import proxy_config
from rbridge.proxy.rates import THRESHOLD, Rates
from rbridge.proxy.train import TrainShape, planned_precision, resolve_precision


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RBRIDGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("RBRIDGE_BF16_SPEEDUP", raising=False)
    monkeypatch.setattr(P, "_MEMO", {})


def tiny(preset="0.5M", vocab=512):
    return proxy_config({"preset": preset}, vocab_size=vocab, seq_len=64)


@pytest.mark.parametrize("bf16, want", [(50.0, "fp32"), (100.0, "fp32"), (114.0, "fp32"), (115.0, "bf16"),
                                        (300.0, "bf16")])
def test_the_rule_on_injected_rates(monkeypatch, bf16, want):
    """bf16 slower, equal, just under and at the threshold, faster: measured rates decide, through the trainer's
    resolution, with the measurement recorded in the cache and reused."""
    calls = []

    def fake(config, micro_batch, seq_len, device):
        calls.append((micro_batch, seq_len))
        return 100.0, bf16, "training steps (injected)"

    monkeypatch.setattr(P, "_step_rates", fake)
    shape = TrainShape(tiny(), 4, 64, threads=1)
    assert resolve_precision("auto", torch.device("cpu"), shape) == want
    assert planned_precision("auto", shape=shape) == want
    assert resolve_precision("fp32", torch.device("cpu"), shape) == "fp32"   # asked for: never measured
    assert resolve_precision("bf16", torch.device("cpu"), shape) == "bf16"
    assert calls == [(4, 64)]  # once: the second resolution read it back
    monkeypatch.setattr(P, "_MEMO", {})
    assert resolve_precision("auto", torch.device("cpu"), shape) == want and len(calls) == 1  # from the file
    entry = next(iter(json.loads((P._cache_path()).read_text()).values()))
    assert entry["bf16"] == bf16 and entry["threads"] == 1 and "torch" in entry["machine"]
    # another thread count or shape is another measurement
    assert resolve_precision("auto", torch.device("cpu"), TrainShape(tiny(), 4, 64, threads=2)) == want
    assert resolve_precision("auto", torch.device("cpu"), TrainShape(tiny(), 8, 64, threads=1)) == want
    assert len(calls) == 3


def test_a_gpu_is_timed_on_the_runs_own_micro_batch(monkeypatch):
    """A CPU's rate per token levels off within a few hundred tokens, so it is timed on a small shape; a GPU's
    keeps growing with the work (an H200 timed at 2x512 tokens put bf16 at 0.91x fp32 for an 8M proxy that it
    trains 1.22x faster in bf16 at 32x256), so there the run's own micro-batch is timed, up to GPU_TOKENS.
    No GPU here: the device only names the work (the measurement itself is replaced)."""
    seen = []
    monkeypatch.setattr(P, "_step_rates", lambda c, rows, seq, d: seen.append(("steps", d.type, rows, seq)) or (1, 2, ""))
    monkeypatch.setattr(P, "_matmul_rates", lambda c, tokens, d: seen.append(("products", d.type, tokens)) or (1, 2, ""))
    monkeypatch.setattr(P, "machine_name", lambda device_type="cpu": f"a {device_type} machine")
    for device in ("cpu", "cuda"):
        P.training_rates(tiny(), 32, 256, torch.device(device), threads=1)                 # 0.5M: training steps
        P.training_rates(tiny("20M", vocab=256), 32, 512, torch.device(device), threads=1)  # matrix products
    assert seen == [("steps", "cpu", P.STEP_TOKENS // 256, 256), ("products", "cpu", P.MATMUL_TOKENS),
                    ("steps", "cuda", 32, 256), ("products", "cuda", P.GPU_TOKENS)]
    assert P.GPU_TOKENS == 32 * 256 < 32 * 512


@pytest.mark.parametrize("speedup, want", [("0.5", "fp32"), ("1", "fp32"), ("1.15", "bf16"), ("4", "bf16")])
def test_the_override_injects_rates_for_training_and_scoring(monkeypatch, model, speedup, want):
    from rbridge.scoring.requests import auto_scoring_precision

    monkeypatch.setenv("RBRIDGE_BF16_SPEEDUP", speedup)
    monkeypatch.setattr(P, "_step_rates", lambda *a: pytest.fail("measured despite the override"))
    r = P.training_rates(tiny(), 4, 64, threads=1)
    assert r.choice == want and r.how == "given by RBRIDGE_BF16_SPEEDUP" and not P._cache_path().exists()
    assert auto_scoring_precision(model) == want


def test_a_bad_override_names_the_variable(monkeypatch):
    monkeypatch.setenv("RBRIDGE_BF16_SPEEDUP", "fast")
    with pytest.raises(InputError, match="RBRIDGE_BF16_SPEEDUP"):
        resolve_precision("auto", torch.device("cpu"), TrainShape(tiny(), 4, 64, threads=1))


def test_the_real_measurement_on_this_machine(model):
    """No injection: training steps of a small shape and matrix products of a large one, fp32 against bf16
    on this CPU; whatever the machine, the choice follows the measured ratio and is cached."""
    threads = torch.get_num_threads()
    small = P.training_rates(tiny(), 4, 64, threads=1)
    assert small.fp32 > 0 and small.bf16 > 0 and small.how.startswith("training steps of 4x64")
    assert small.choice == ("bf16" if small.bf16 >= THRESHOLD * small.fp32 else "fp32")
    assert torch.get_num_threads() == threads  # the measurement's threads are put back
    big = P.training_rates(tiny("20M", vocab=256), 16, 64, threads=1)  # 19M non-embedding: matrix products
    assert big.how.startswith("matrix products") and big.fp32 > 0 and big.bf16 > 0
    from rbridge.scoring.requests import measured_pass

    scoring = P.scoring_rates(model, measured_pass(model), threads=1)
    assert scoring.how.startswith("scoring passes") and scoring.fp32 > 0 and scoring.bf16 > 0
    cached = json.loads(P._cache_path().read_text())
    assert len(cached) == 3 and {Rates.from_json(json.dumps(v)) for v in cached.values()} == {small, big, scoring}
    # the model the scorer measured is untouched
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_a_onednn_instruction_set_cap_is_another_machine(monkeypatch):
    """ONEDNN_MAX_CPU_ISA=AVX512_CORE keeps bf16 products off a CPU's bf16 units (how a machine with them shows
    what one without gets): a measurement cached without the cap must not be taken under it, or the reverse."""
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    plain = P.machine_name("cpu")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx512_core")
    capped = P.machine_name("cpu")
    assert capped != plain and "oneDNN<=AVX512_CORE" in capped and capped.endswith(f"torch {torch.__version__}")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "AVX512_CORE")  # oneDNN's older name
    assert P.machine_name("cpu") == capped


def test_rates_text_round_trips():
    r = Rates(100.0, 250.0, "training steps of 8x256 tokens", "some cpu", 2)
    assert Rates.from_json(r.to_json()) == r and Rates.from_json("") is None and Rates.from_json("{bad") is None
    assert r.describe().startswith("bf16 2.50x fp32 (training steps of 8x256 tokens, 2 threads")


def test_processes_measuring_the_same_work_measure_it_once(monkeypatch):
    """A plan's local processes start a stage together; the second to ask waits for the first's measurement
    (a lock on the cache folder) and reads it instead of measuring again. Two threads with their own lock
    files stand for the two processes (flock locks conflict between separate opens)."""
    import threading
    import time

    measured = []

    def slow(config, rows, seq, device):
        measured.append(threading.current_thread().name)
        time.sleep(0.5)
        return 100.0, 150.0, "training steps (injected)"

    monkeypatch.setattr(P, "_step_rates", slow)
    got = {}

    def ask(name):
        got[name] = P.training_rates(tiny(), 4, 64, threads=1)

    threads = [threading.Thread(target=ask, args=(n,), name=n) for n in ("plan", "w1")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(measured) == 1 and got["plan"] == got["w1"] and got["plan"].choice == "bf16"
    assert P._cache_path().with_suffix(".lock").exists()
