"""Proxy presets, counts and the resumable training loop, on real tiny Llamas (CPU, fp32)."""

from __future__ import annotations

import json
import math
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

from rbridge.errors import InputError
from rbridge.proxy import (PRESETS, ProxyTrainer, latest_checkpoint, lr_factor, param_counts, proxy_config,
                           proxy_train_flops, resolve_precision, train_flops)
from rbridge.proxy.train import planned_precision

VOCAB, SEQ, BATCH = 256, 32, 8
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}


def tiny_config(**overrides):
    return proxy_config({**TINY, **overrides}, VOCAB, SEQ)


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """Tiny models train on one CPU thread here (conftest.one_torch_thread)."""


@pytest.fixture(scope="module")
def random_data():
    return np.random.default_rng(0).integers(0, VOCAB, size=(40, SEQ), dtype=np.int32)


def trainer(data, steps=12, **kw):
    args = dict(total_tokens=steps * BATCH * SEQ, batch_size=BATCH, lr=3e-3, seed=7, precision="fp32")
    args.update(kw)
    return ProxyTrainer(tiny_config(), data, **args)


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


# ---- presets and counts ------------------------------------------------------------------------

@pytest.mark.parametrize("overrides", [
    {}, {"tie_word_embeddings": False}, {"num_attention_heads": 4, "num_key_value_heads": 2},
    {"attention_bias": True, "mlp_bias": True, "intermediate_size": 80}, {"head_dim": 8},
])
def test_param_counts_match_model(overrides):
    cfg = tiny_config(**overrides)
    model = LlamaForCausalLM(cfg)
    total, non_emb = param_counts(cfg)
    assert total == sum(p.numel() for p in model.parameters())
    embeddings = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    assert non_emb == sum(p.numel() for p in model.parameters() if id(p) not in embeddings)


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_counts_match_model_and_name(name):
    cfg = proxy_config({"preset": name}, 8192, 256)
    with torch.device("meta"):                       # shapes only: 1B costs nothing
        model = LlamaForCausalLM(cfg)
    total, non_emb = param_counts(cfg)
    assert total == sum(p.numel() for p in model.parameters())
    assert total == non_emb + 8192 * cfg.hidden_size        # tied embeddings
    nominal = float(name[:-1]) * {"M": 1e6, "B": 1e9}[name[-1]]
    assert 0.75 < non_emb / nominal < 1.25
    # status and compute count from the spec's values alone (no transformers): the same numbers
    from rbridge.proxy.config import ProxyShape, count_params
    assert count_params(ProxyShape({"preset": name}).llama_values(256), 8192) == (total, non_emb)


def test_flops():
    cfg = tiny_config()
    total, non_emb = param_counts(cfg)
    assert train_flops(1000, 50) == 300_000
    assert proxy_train_flops(cfg, 10) == {"non_embedding": 60.0 * non_emb, "total": 60.0 * total}


def test_proxy_config_presets_overrides_and_defaults():
    cfg = proxy_config({"preset": "2M", "num_hidden_layers": 2}, 1000, 128, bos_token_id=1, eos_token_id=2)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == (192, 2, 1000)
    assert (cfg.max_position_embeddings, cfg.bos_token_id, cfg.tie_word_embeddings) == (128, 1, True)
    cfg = proxy_config({"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}, 1000, 256)
    assert (cfg.intermediate_size, cfg.num_key_value_heads) == (192, 2)


@pytest.mark.parametrize("spec, field, words", [
    ({"preset": "3M"}, "proxy.preset", ["0.5M", "8M", "1B"]),
    ({**TINY, "hiden_size": 3}, "proxy.hiden_size", ["unknown LlamaConfig field"]),
    ({"preset": "2M", "return_dict": False}, "proxy.return_dict", ["unknown"]),
    ({**TINY, "vocab_size": 10}, "proxy.vocab_size", ["tokenizer"]),
    ({"num_hidden_layers": 2}, "proxy.hidden_size", ["required"]),
    ({**TINY, "num_attention_heads": 3}, "proxy.num_attention_heads", ["divisible"]),
    ({**TINY, "num_key_value_heads": 3}, "proxy.num_key_value_heads", ["divisible"]),
    ({**TINY, "num_hidden_layers": 0}, "proxy.num_hidden_layers", ["positive"]),
    ({**TINY, "max_position_embeddings": 8}, "proxy.max_position_embeddings", ["seq_len"]),
])
def test_proxy_config_errors(spec, field, words):
    with pytest.raises(InputError) as e:
        proxy_config(spec, VOCAB, SEQ)
    assert e.value.field == field
    assert all(w in str(e.value) for w in words)


# ---- schedule, precision, data order ------------------------------------------------------------

def test_warmup_cosine_schedule(random_data):
    f = lambda s: lr_factor(s, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(4) == pytest.approx(0.5) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(10 + 99 // 2) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 49 / 99)))
    assert f(109) == pytest.approx(0.1)
    t = trainer(random_data, steps=40, warmup_frac=0.05)          # 2 warmup steps
    assert (t.total_steps, t.warmup_steps) == (40, 2)
    seen = []
    t.train_to(3 * BATCH * SEQ, on_step=lambda *_: seen.append(t.optimizer.param_groups[0]["lr"]))
    # the lr after step i is the one step i+1 will use
    assert seen == pytest.approx([3e-3, t.lr_at(2), t.lr_at(3)])
    assert t.lr_at(0) == pytest.approx(1.5e-3) and t.lr_at(39) == pytest.approx(3e-4)


def test_precision_resolution(monkeypatch):
    # auto follows fp32 against bf16 as measured (injected here: bf16 slower, equal, faster; the
    # measurement itself is tests/test_precision.py's)
    for speedup, want in (("0.5", "fp32"), ("1", "fp32"), ("2", "bf16")):
        monkeypatch.setenv("RBRIDGE_BF16_SPEEDUP", speedup)
        assert resolve_precision("auto", torch.device("cpu")) == want
        assert resolve_precision("fp32", torch.device("cpu")) == "fp32"
        assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    # a stage started before runs recorded their precision keeps the old rule: fp32 on every CPU
    assert planned_precision("auto", legacy=True) == "fp32"
    assert planned_precision("bf16", legacy=True) == "bf16"
    with pytest.raises(InputError):
        resolve_precision("fp16x", torch.device("cpu"))


def test_bf16_autocast_trains(random_data):
    t = trainer(random_data, steps=2, precision="bf16")
    assert math.isfinite(t.train_to(10**9)) and t.step == 2
    assert next(t.model.parameters()).dtype == torch.float32          # master weights stay fp32


@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_fused_loss_equals_transformers_loss_and_gradients(chunk):
    """The chunked loss (proxy/model.py) against LlamaForCausalLM's own, with ignored targets and chunks
    that do not divide the rows: same loss, same gradients for every parameter, to fp32 rounding."""
    from rbridge.proxy import ProxyLlamaForCausalLM, linear_cross_entropy

    torch.manual_seed(0)
    plain = LlamaForCausalLM(tiny_config())
    fused = ProxyLlamaForCausalLM(tiny_config())
    fused.load_state_dict(plain.state_dict())
    x = torch.randint(0, VOCAB, (3, SEQ))
    labels = x.clone()
    labels[0, 5:9] = -100
    labels[2, :] = -100
    ref = plain(input_ids=x, labels=labels).loss
    ref.backward()
    h = fused.model(input_ids=x).last_hidden_state
    got = linear_cross_entropy(h[:, :-1], fused.lm_head.weight, labels[:, 1:], chunk_rows=chunk)
    (2.0 * got).backward()  # the upstream gradient scales both stored gradients
    assert got.item() == pytest.approx(ref.item(), rel=1e-6, abs=1e-6)
    for (name, p), q in zip(plain.named_parameters(), fused.parameters()):
        assert torch.allclose(2.0 * p.grad, q.grad, rtol=1e-4, atol=1e-6), name
    # The trainer's path: a training forward with labels takes the fused loss and returns no logits;
    # eval or no labels is LlamaForCausalLM's forward, logits and all.
    fused.train()
    out = fused(input_ids=x, labels=labels)
    assert out.logits is None and out.loss.item() == pytest.approx(ref.item(), rel=1e-6)
    fused.eval()
    with torch.no_grad():
        assert torch.equal(fused(input_ids=x).logits, plain.eval()(input_ids=x).logits)
        assert fused(input_ids=x, labels=labels).loss.item() == pytest.approx(ref.item(), rel=1e-6)


def test_global_batch_is_the_same_for_any_world_size_and_micro_batch():
    data = np.arange(10 * 4).reshape(10, 4)

    def batch(step, world, rank, micro=None):
        micro = micro or 4 // world
        fake = SimpleNamespace(batch_size=4, data=data, micro_batch_size=micro, micro_per_rank=4 // (micro * world),
                               accelerator=SimpleNamespace(num_processes=world, process_index=rank,
                                                           device=torch.device("cpu")))
        fake._micro_batch = lambda s, j: ProxyTrainer._micro_batch(fake, s, j)
        return ProxyTrainer._batch(fake, step)

    for step in range(4):
        whole = batch(step, 1, 0)
        assert whole[:, 0].tolist() == [4 * ((step * 4 + j) % 10) for j in range(4)]     # wraps
        assert torch.equal(torch.cat([batch(step, 2, r) for r in range(2)]), whole)
        assert torch.equal(torch.cat([batch(step, 4, r) for r in range(4)]), whole)
        assert torch.equal(batch(step, 1, 0, micro=1), whole)   # four micro-batches of one row, in order
        assert torch.equal(torch.cat([batch(step, 2, r, micro=1) for r in range(2)]), whole)


def test_micro_batch_size_checks_and_default(random_data):
    with pytest.raises(InputError) as e:
        trainer(random_data, micro_batch_size=3)
    assert e.value.field == "micro_batch_size" and "not a multiple" in str(e.value)
    with pytest.raises(InputError):
        trainer(random_data, micro_batch_size=0)
    # The default is one micro-batch of the whole batch (per process): bitwise the run it always was.
    a, b = trainer(random_data, steps=3), trainer(random_data, steps=3, micro_batch_size=BATCH)
    la, lb = a.train_to(10**9), b.train_to(10**9)
    assert la == lb and max_diff(weights(a.model), weights(b.model)) == 0.0
    # The gradient the optimizer sees is the batch mean whatever the micro-batching (a wrong loss scale
    # would hardly show in AdamW's weights, so the gradients themselves are compared, unclipped).
    grads = {}
    for micro in (None, BATCH // 2, 1):
        t = trainer(random_data, steps=3, micro_batch_size=micro, grad_clip=None)
        step = t.optimizer.step

        def capture(*a, _t=t, _micro=micro, _step=step, **k):
            grads.setdefault(_micro, [p.grad.clone() for p in _t.model.parameters()])
            return _step(*a, **k)

        t.optimizer.step = capture
        t.train_to(BATCH * SEQ)
    for micro in (BATCH // 2, 1):
        assert max((g - h).abs().max().item() for g, h in zip(grads[None], grads[micro])) < 1e-6
        assert max(g.abs().max().item() for g in grads[micro]) > 1e-3
    # Two micro-batches: the same training up to float order.
    c = trainer(random_data, steps=3, micro_batch_size=BATCH // 2)
    assert c.micro_per_rank == 2 and abs(c.train_to(10**9) - la) < 1e-4
    assert max_diff(weights(a.model), weights(c.model)) < 1e-4


def test_bad_inputs(random_data):
    with pytest.raises(InputError, match="token ids"):
        trainer(random_data + VOCAB)
    with pytest.raises(InputError) as e:
        trainer(random_data, lr=0)
    assert e.value.field == "lr"
    with pytest.raises(InputError) as e:
        trainer(random_data.astype(np.float32))
    assert e.value.field == "data"


# ---- training and checkpoints ----------------------------------------------------------------

def test_loss_decreases_on_learnable_pattern():
    rng = np.random.default_rng(1)
    starts = rng.integers(0, 16, size=(64, 1))
    data = (starts + np.arange(SEQ)) % 16 * 3                      # next token is a function of this one
    losses = []
    t = trainer(data, steps=60, lr=1e-2)
    t.train_to(10**9, on_step=lambda tokens, loss: losses.append(loss))
    assert len(losses) == 60 and t.tokens_seen == 60 * BATCH * SEQ
    assert losses[0] > 4.5 and np.mean(losses[-5:]) < 1.0
    assert t.tokens_per_s > 0 and t.wall_time_s > 0


def test_resume_from_checkpoint_equals_uninterrupted_run(random_data, tmp_path):
    total = 12 * BATCH * SEQ
    whole = trainer(random_data)
    whole_losses = []
    whole.train_to(total, on_step=lambda _, loss: whole_losses.append(loss))

    first = trainer(random_data, checkpoint_dir=tmp_path)
    losses = []
    first.train_to(5 * BATCH * SEQ - 1, on_step=lambda _, loss: losses.append(loss))  # rung 1: 5 steps
    assert first.step == 5
    first.save_checkpoint()
    first.train_to(total)                  # run on past the checkpoint; the fresh trainer must not see it
    del first

    second = trainer(random_data, checkpoint_dir=tmp_path)
    assert (second.step, second.tokens_seen) == (5, 5 * BATCH * SEQ)
    assert second.train_to(8 * BATCH * SEQ, on_step=lambda _, loss: losses.append(loss)) == losses[-1]
    assert second.step == 8
    second.save_checkpoint()
    second.train_to(total + 10**6, on_step=lambda _, loss: losses.append(loss))      # capped at total
    assert second.step == 12

    assert np.allclose(losses, whole_losses, rtol=0, atol=1e-6)
    assert max_diff(weights(second.model), weights(whole.model)) <= 1e-6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_5", "step_8"]


def test_incomplete_checkpoint_is_ignored_and_old_ones_pruned(random_data, tmp_path):
    t = trainer(random_data, checkpoint_dir=tmp_path, save_every_s=1e-9)
    t.train_to(3 * BATCH * SEQ)                                     # saves after every step
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_2", "step_3"]
    (tmp_path / "step_3" / "COMPLETE").unlink()                     # as if killed mid-write
    shutil.copytree(tmp_path / "step_2", tmp_path / "step_9.tmp")   # a crashed temp folder
    assert latest_checkpoint(tmp_path) == tmp_path / "step_2"
    assert trainer(random_data, checkpoint_dir=tmp_path).step == 2
    assert latest_checkpoint(tmp_path / "missing") is None


def test_checkpoint_of_another_run_is_refused(random_data, tmp_path):
    t = trainer(random_data, checkpoint_dir=tmp_path)
    t.train_to(BATCH * SEQ)
    t.save_checkpoint()
    with pytest.raises(InputError, match="another run") as e:
        trainer(random_data, checkpoint_dir=tmp_path, lr=1e-3)
    assert e.value.field == "checkpoint_dir"


def test_a_checkpoint_another_run_wrote_is_set_aside_not_loaded(random_data, tmp_path):
    """Same shapes and settings, another run (key): e.g. a worker still saving a run that a spec edit
    superseded, into the folder of the run that replaced it. Its checkpoint is set aside, never loaded;
    a checkpoint without a key (written before keys existed) still resumes."""
    old = trainer(random_data, checkpoint_dir=tmp_path, run_key="a" * 64)
    old.train_to(BATCH * SEQ)
    old.save_checkpoint()
    new = trainer(random_data, checkpoint_dir=tmp_path, run_key="b" * 64)
    assert new.step == 0
    [(was, now, why)] = new.set_aside
    assert (was.name, now.name) == ("step_1", "step_1.damaged") and "another run (aaaaaaaaaaaa)" in why
    keyless = trainer(random_data, checkpoint_dir=tmp_path / "k")
    keyless.train_to(BATCH * SEQ)
    keyless.save_checkpoint()
    assert trainer(random_data, checkpoint_dir=tmp_path / "k", run_key="b" * 64).step == 1


def _damage(folder, name, how):
    f = folder / name
    if how == "truncate":
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif how == "garbage":            # same size, other bytes: only the checksum tells
        f.write_bytes(bytes((b + 1) % 256 for b in f.read_bytes()))
    else:
        f.unlink()


@pytest.mark.parametrize("name, how", [
    ("model.safetensors", "truncate"), ("model.safetensors", "garbage"), ("optimizer.bin", "garbage"),
    ("optimizer.bin", "missing"), ("trainer.json", "garbage"), ("trainer.json", "missing"),
    ("random_states_0.pkl", "truncate"), ("custom_checkpoint_0.pkl", "garbage"),
])
def test_a_damaged_newest_checkpoint_is_set_aside_and_the_run_resumes_identically(random_data, tmp_path, name, how):
    whole = trainer(random_data, steps=6)
    whole.train_to(10**9)
    t = trainer(random_data, steps=6, checkpoint_dir=tmp_path)
    t.train_to(2 * BATCH * SEQ)
    t.save_checkpoint()
    t.train_to(4 * BATCH * SEQ)
    t.save_checkpoint()
    state = json.loads((tmp_path / "step_4" / "trainer.json").read_text())
    assert set(state["files"]) >= {"model.safetensors", "optimizer.bin", "random_states_0.pkl"}
    _damage(tmp_path / "step_4", name, how)

    resumed = trainer(random_data, steps=6, checkpoint_dir=tmp_path)
    assert resumed.step == 2                                         # from the checkpoint before
    [(was, now, why)] = resumed.set_aside
    assert (was.name, now.name) == ("step_4", "step_4.damaged") and (name in why or "trainer.json" in why)
    resumed.train_to(10**9)
    assert max_diff(weights(resumed.model), weights(whole.model)) == 0.0   # as if never interrupted
    resumed.save_checkpoint()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_2", "step_4.damaged", "step_6"]  # never deleted
    assert (tmp_path / "step_4.damaged" / "COMPLETE").exists()


def test_every_checkpoint_damaged_means_starting_over(random_data, tmp_path):
    t = trainer(random_data, steps=4, checkpoint_dir=tmp_path)
    t.train_to(BATCH * SEQ)
    t.save_checkpoint()
    _damage(tmp_path / "step_1", "model.safetensors", "garbage")
    again = trainer(random_data, steps=4, checkpoint_dir=tmp_path)
    assert again.step == 0 and [n.name for _, n, _ in again.set_aside] == ["step_1.damaged"]
    (tmp_path / "step_1").mkdir()                                    # a later damage of the same step
    (tmp_path / "step_1" / "COMPLETE").write_text("")
    assert trainer(random_data, steps=4, checkpoint_dir=tmp_path).set_aside[0][1].name == "step_1.damaged-2"


def test_the_spec_reads_the_same_llama_fields_as_the_installed_class():
    """proxy.config reads LlamaConfig's fields from transformers' source (no import at spec load)."""
    from rbridge.proxy.config import llama_fields
    from rbridge.proxy.presets import llama_init_fields

    assert llama_fields() == llama_init_fields()


def _grads(model, x, *, fused: bool, bf16: bool = False, attention_mask=None):
    model.fused_decoder = fused
    model.train()
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(input_ids=x, labels=x, attention_mask=attention_mask).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("kv_heads,rope", [(4, None), (2, None),  # 2: grouped-query attention (60M-1B presets)
                                           (4, {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})])
def test_fused_decoder_equals_transformers_forward_and_gradients(kv_heads, rope):
    """rbridge.proxy.fused (one-function RMSNorm, rotary embedding and q/k/v split, SwiGLU) against
    transformers' decoder: in fp32 the same loss and every gradient to fp32 rounding; under bf16
    autocast no further from the fp32 gradients than transformers' own bf16 forward is."""
    from rbridge.proxy import ProxyLlamaForCausalLM
    from rbridge.proxy.fused import supports

    torch.manual_seed(0)
    extra = {"rope_parameters": rope} if rope else {}
    model = ProxyLlamaForCausalLM(tiny_config(num_attention_heads=4, num_key_value_heads=kv_heads, **extra))
    x = torch.randint(0, VOCAB, (3, SEQ))
    assert supports(model, None, {})
    ref_loss, ref = _grads(model, x, fused=False)
    loss, got = _grads(model, x, fused=True)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    for name in ref:
        assert torch.allclose(got[name], ref[name], rtol=1e-4, atol=1e-7), name

    def err(grads):
        return max(((grads[n] - ref[n]).norm() / ref[n].norm()).item() for n in ref)

    hf_loss, hf16 = _grads(model, x, fused=False, bf16=True)
    fu_loss, fu16 = _grads(model, x, fused=True, bf16=True)
    assert abs(fu_loss - ref_loss) <= 2 * abs(hf_loss - ref_loss) + 1e-3
    assert 1e-4 < err(fu16) <= 1.5 * err(hf16)  # bf16 really ran, and no worse than transformers'


def test_fused_loss_under_bf16_autocast_is_as_close_to_fp32_as_transformers_own():
    """Under bf16 autocast the chunked loss computes the logits and the decoder's gradient in bf16, as
    autocast does, but the output layer's weight gradient as an fp32 product (a bf16 one moved a plan's
    scores up to 0.35 nats from fp32 training's): its loss and every gradient no further from fp32's than
    LlamaForCausalLM's own loss and decoder under the same autocast, the output layer's closer."""
    from transformers import LlamaForCausalLM

    from rbridge.proxy import ProxyLlamaForCausalLM

    torch.manual_seed(0)
    model = ProxyLlamaForCausalLM(tiny_config(num_attention_heads=4, num_key_value_heads=4))
    x = torch.randint(0, VOCAB, (3, SEQ))
    ref_loss, ref = _grads(model, x, fused=True)
    fu_loss, fu16 = _grads(model, x, fused=True, bf16=True)
    model.__class__ = LlamaForCausalLM  # the same modules and weights; transformers' forward and loss
    hf_loss, hf16 = _grads(model, x, fused=False, bf16=True)

    def err(grads, name):
        return ((grads[name] - ref[name]).norm() / ref[name].norm()).item()
    assert abs(fu_loss - ref_loss) <= 2 * abs(hf_loss - ref_loss) + 1e-3
    for name in ref:
        assert err(fu16, name) <= 1.5 * err(hf16, name) + 1e-6, name
    head = "lm_head.weight" if "lm_head.weight" in ref else "model.embed_tokens.weight"  # tied: the same tensor
    assert 1e-4 < err(fu16, head) < err(hf16, head)

    # the weight gradient itself: bf16 logits (autocast), then softmax minus one-hot times the rows in fp32
    from rbridge.proxy.model import linear_cross_entropy

    h = torch.randn(40, 16, requires_grad=True)
    w = (torch.randn(VOCAB, 16) * 0.3).requires_grad_()
    t = torch.randint(0, VOCAB, (40,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        linear_cross_entropy(h, w, t, chunk_rows=16).backward()
    logits = (h.detach().bfloat16() @ w.detach().bfloat16().t()).float()
    g = (logits.softmax(1) - torch.nn.functional.one_hot(t, VOCAB)) / len(t)
    want = g.t() @ h.detach()
    assert torch.allclose(w.grad, want, rtol=1e-5, atol=1e-7)  # a bf16 product differs by ~1e-3 relative


def test_fused_decoder_steps_aside_where_it_would_differ():
    """A padding mask, position ids, an attention bias or activation checkpointing: transformers' forward."""
    from rbridge.proxy import ProxyLlamaForCausalLM
    from rbridge.proxy.fused import supports

    torch.manual_seed(0)
    model = ProxyLlamaForCausalLM(tiny_config())
    x = torch.randint(0, VOCAB, (2, SEQ))
    mask = torch.ones_like(x)
    assert supports(model, mask, {})
    mask[1, :3] = 0
    assert not supports(model, mask, {}) and not supports(model, None, {"position_ids": None})
    assert _grads(model, x, fused=True, attention_mask=mask)[0] == _grads(model, x, fused=False,
                                                                           attention_mask=mask)[0]
    assert not supports(ProxyLlamaForCausalLM(tiny_config(attention_bias=True)), None, {})
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    assert not supports(model, None, {})


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_trainer_takes_the_fused_decoder(random_data, monkeypatch, precision):
    from rbridge.proxy import fused

    calls = []
    real = fused.decoder_forward
    monkeypatch.setattr(fused, "decoder_forward", lambda model, ids: calls.append(ids.shape) or real(model, ids))
    t = trainer(random_data, steps=2, precision=precision)
    t.train_to(10**9)
    assert len(calls) == 2 * t.micro_per_rank
