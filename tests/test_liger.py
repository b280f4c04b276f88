"""``fastlora.patch(model, liger=...)``: Liger-Kernel's ops bound on one model instance (fastlora.liger).

The model is the QLoRA recipe's tiny Llama (tests/models.py: NF4, double quant, bf16 compute, r=16,
the seven projections, B randomized). Numerics follow the tolerance rule of tests/helpers.py: the
loss and every LoRA gradient of the patched model (fastlora's LoRA layers + Liger's pieces) are
compared with an fp32 reference — the same model with the same NF4 weights, compute dtype fp32 and
every other parameter cast to fp32 — and must be within twice PEFT's own bf16 error against that
reference, plus a small atol.

On a CPU the Triton kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
What Liger 0.8.5 runs there (measured with triton 3.9):

- fused linear cross-entropy: runs, bf16 included: checked for real.
- RoPE: runs and is exact in fp32, but gives NaN for bf16 q/k (the model's dtype) in the interpreter;
  on a CPU the real kernel runs on fp32 copies of q, k, cos, sin and the result is cast back.
- RMSNorm, SwiGLU: fail in the interpreter (``'float' object has no attribute 'to'`` inside the
  kernels); on a CPU Liger's function is replaced by its PyTorch definition, which checks that the
  bound forwards call it with the right tensors.

The kernels' own bf16 numerics for RoPE, RMSNorm and SwiGLU are a GPU test (skipped without CUDA).
"""

from __future__ import annotations

import copy
import inspect
import sys

import pytest
import torch

pytest.importorskip("liger_kernel")

import liger_kernel.transformers.functional as LF  # noqa: E402

import fastlora  # noqa: E402
from fastlora import liger as fl_liger  # noqa: E402

from helpers import DEVICE, ON_GPU, assert_within_rule  # noqa: E402
from models import cached_checkpoint, load_llama_4bit, lora_config, randomize_lora_B  # noqa: E402

N_LAYERS = 2
EXPECTED = {"rms_norm": 2 * N_LAYERS + 1, "swiglu": N_LAYERS, "rope": N_LAYERS, "fused_linear_cross_entropy": 1}
CPU_PIECES = ("rope", "fused_linear_cross_entropy")  # Liger's kernels run in Triton's interpreter
GPU_PIECES = ("rope", "rms_norm", "swiglu")  # their bf16 kernels: on a GPU only (module docstring)


def _patch(pm, **kw):
    """fastlora.patch with fastlora's own chunked loss off where patch() has it, so that Liger's
    fused linear cross-entropy is the one that computes the loss."""
    if "chunked_loss" in inspect.signature(fastlora.patch).parameters:
        kw.setdefault("chunked_loss", False)
    return fastlora.patch(pm, **kw)


def _llama():
    from peft import get_peft_model

    torch.manual_seed(0)
    model = load_llama_4bit(cached_checkpoint(), device=DEVICE)
    model.config.use_cache = False
    torch.manual_seed(0)
    pm = get_peft_model(model, lora_config())
    randomize_lora_B(pm, seed=1)
    return pm.train()


def _fp32(pm):
    """The fp32 reference: the same NF4 weights dequantized to fp32, everything else cast to fp32."""
    import bitsandbytes as bnb

    ref = copy.deepcopy(pm)
    for m in ref.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.compute_dtype = torch.float32
    for p in ref.parameters():
        if not isinstance(p, bnb.nn.Params4bit) and p.dtype.is_floating_point:
            p.data = p.data.float()
    return ref


def _batch():
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 128, (2, 12), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100  # a prompt the loss ignores
    return ids.to(DEVICE), labels.to(DEVICE)


def _step(pm):
    """Loss and LoRA gradients of one training forward/backward with labels."""
    ids, labels = _batch()
    pm.zero_grad(set_to_none=True)
    out = pm(input_ids=ids, labels=labels)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    return out, grads


def _check_against_reference(pm, patched_out, patched_grads):
    ref_out, ref_grads = _step(_fp32(pm))
    fastlora.unpatch(pm)
    peft_out, peft_grads = _step(pm)
    assert_within_rule("loss", patched_out.loss, ref_out.loss, peft_out.loss)
    assert patched_grads.keys() == ref_grads.keys() == peft_grads.keys()
    for name in sorted(ref_grads):
        assert_within_rule(name, patched_grads[name], ref_grads[name], peft_grads[name])


class _Spy:
    """Counts the calls of Liger functional ops; ``replace`` maps a name to the function that runs."""

    def __init__(self, monkeypatch, names, replace=None):
        self.calls = dict.fromkeys(names, 0)
        for name in names:
            real = (replace or {}).get(name, getattr(LF, name))

            def spy(*args, _real=real, _name=name, **kwargs):
                self.calls[_name] += 1
                return _real(*args, **kwargs)

            monkeypatch.setattr(LF, name, spy)


def _torch_rms_norm(X, W, eps, offset=0.0, casting_mode="llama", in_place=True):
    # Liger's "llama" casting: the statistics in fp32, the normalized X back in X's dtype, then W
    assert offset == 0.0 and casting_mode == "llama"
    x = X.float()
    return W * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).to(X.dtype)


def _torch_swiglu(a, b):
    return torch.nn.functional.silu(a) * b


_REAL_ROPE = LF.liger_rope


def _fp32_rope(q, k, cos, sin, *args):
    """Liger's RoPE kernel on fp32 copies (the interpreter gives NaN for bf16), cast back."""
    qo, ko = _REAL_ROPE(q.float(), k.float(), cos.float(), sin.float(), *args)
    return qo.to(q.dtype), ko.to(k.dtype)


def _interpreter_stand_ins():
    """What runs in place of Liger's functions on a CPU (module docstring); nothing on a GPU."""
    if ON_GPU:
        return {}
    return {"liger_rope": _fp32_rope, "liger_rms_norm": _torch_rms_norm, "liger_swiglu": _torch_swiglu}


# ------------------------------------------------------------------------------------------------
# numerics
# ------------------------------------------------------------------------------------------------


def test_rope_and_fused_cross_entropy_within_rule(monkeypatch):
    """Liger's fused linear cross-entropy and RoPE kernels (RoPE in fp32 on a CPU) with fastlora's
    LoRA layers: loss and every LoRA gradient within the rule of PEFT's bf16 error."""
    pm = _llama()
    spy = _Spy(monkeypatch, ["liger_rope", "liger_fused_linear_cross_entropy"], _interpreter_stand_ins())
    report = _patch(pm, liger=CPU_PIECES)
    assert {p: len(n) for p, n in report.liger_applied.items()} == {p: EXPECTED[p] for p in CPU_PIECES}, report.summary()
    assert not report.liger_skipped, report.liger_skipped
    out, grads = _step(pm)
    assert out.logits is None  # the fused loss never materializes them
    assert spy.calls == {"liger_rope": N_LAYERS, "liger_fused_linear_cross_entropy": 1}
    assert report.fused_calls == 7 * N_LAYERS and not report.fallback_calls, dict(report.fallback_calls)
    _check_against_reference(pm, out, grads)


def test_all_pieces_wired_on_cpu(monkeypatch):
    """Every piece applied; on a CPU RMSNorm and SwiGLU run their PyTorch definition in place of
    Liger's kernels (which the interpreter cannot run), so this checks what the bound forwards pass
    to Liger: the loss and LoRA gradients within the rule, and each op called once per module."""
    pm = _llama()
    names = ["liger_rms_norm", "liger_swiglu", "liger_rope", "liger_fused_linear_cross_entropy"]
    spy = _Spy(monkeypatch, names, _interpreter_stand_ins())
    report = _patch(pm, liger=True)
    assert {p: len(n) for p, n in report.liger_applied.items()} == EXPECTED, report.summary()
    assert "Liger: rms_norm×5, swiglu×2, rope×2, fused_linear_cross_entropy×1" in report.summary()
    out, grads = _step(pm)
    assert spy.calls == {"liger_rms_norm": EXPECTED["rms_norm"], "liger_swiglu": N_LAYERS,
                         "liger_rope": N_LAYERS, "liger_fused_linear_cross_entropy": 1}, spy.calls
    _check_against_reference(pm, out, grads)


@pytest.mark.skipif(not ON_GPU, reason="Liger 0.8.5's RMSNorm and SwiGLU kernels do not run in Triton's CPU "
                                       "interpreter ('float' object has no attribute 'to') and its RoPE gives NaN "
                                       "there for bf16; their bf16 kernels are checked on a GPU")
@pytest.mark.parametrize("piece", GPU_PIECES)
def test_bf16_kernels_within_rule_on_gpu(piece, monkeypatch):
    pm = _llama()
    name = {"rope": "liger_rope", "rms_norm": "liger_rms_norm", "swiglu": "liger_swiglu"}[piece]
    spy = _Spy(monkeypatch, [name])
    report = _patch(pm, liger=(piece,))
    assert len(report.liger_applied[piece]) == EXPECTED[piece]
    out, grads = _step(pm)
    assert spy.calls[name] == EXPECTED[piece]
    _check_against_reference(pm, out, grads)


# ------------------------------------------------------------------------------------------------
# what is bound, and unpatch
# ------------------------------------------------------------------------------------------------


def _module_classes():
    from transformers.models.llama import modeling_llama as ml

    return ml, {"rms_norm": ml.LlamaRMSNorm, "swiglu": ml.LlamaMLP, "rope": ml.LlamaAttention,
                "fused_linear_cross_entropy": ml.LlamaForCausalLM}


def test_applies_to_the_instance_only():
    """The bound forwards live in the instances' __dict__; the modeling module, its classes and
    another Llama in the process are untouched."""
    ml, classes = _module_classes()
    before = {k: getattr(ml, k) for k in ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP")}
    forwards = {c: c.__dict__["forward"] for c in classes.values()}
    pm, other = _llama(), _llama()
    report = _patch(pm, liger=True)
    for piece, names in report.liger_applied.items():
        modules = dict(pm.named_modules())
        for n in names:
            m = modules[n]
            assert type(m) is classes[piece] and fl_liger.applied_piece(m) == piece and "forward" in m.__dict__
    assert {k: getattr(ml, k) for k in before} == before
    assert {c: c.__dict__["forward"] for c in classes.values()} == forwards
    assert not any("forward" in m.__dict__ or fl_liger.applied_piece(m) for m in other.get_base_model().modules()
                   if type(m) in classes.values())


def test_unpatch_restores_everything(tmp_path, monkeypatch):
    _Spy(monkeypatch, ["liger_rms_norm", "liger_swiglu", "liger_rope"], _interpreter_stand_ins())
    pm = _llama()
    pm.save_pretrained(tmp_path / "before")
    sd = {k: v.clone() for k, v in pm.state_dict().items()}
    loss_before = _step(pm)[0].loss.detach()
    bound = {n: ("forward" in m.__dict__, dict(m.__dict__)) for n, m in pm.named_modules()}
    report = _patch(pm, liger=True)
    _step(pm)  # exercise the bound forwards (and an optimizer-free backward) before restoring
    restored = fastlora.unpatch(pm)
    names = [n for ns in report.liger_applied.values() for n in ns]
    assert set(names) <= set(restored) and len(names) == sum(EXPECTED.values())
    for n, m in pm.named_modules():
        assert ("forward" in m.__dict__) == bound[n][0], n
        assert m.__dict__.keys() == bound[n][1].keys(), (n, m.__dict__.keys() ^ bound[n][1].keys())
        assert m.forward.__func__ is type(m).forward, n
    after = pm.state_dict()
    assert after.keys() == sd.keys()
    for k, v in sd.items():
        assert v.dtype == after[k].dtype and torch.equal(v, after[k]), f"state_dict[{k}] changed"
    pm.save_pretrained(tmp_path / "after")
    from safetensors.torch import load_file

    a = load_file(tmp_path / "before" / "adapter_model.safetensors")
    b = load_file(tmp_path / "after" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    pm.zero_grad(set_to_none=True)
    assert torch.equal(_step(pm)[0].loss.detach(), loss_before)  # PEFT's forward again, bit for bit


def test_patch_twice_and_a_later_wrapper():
    pm = _llama()
    _patch(pm, liger=("rope",))
    again = _patch(pm, liger=("rope",))
    assert not again.liger_applied and "already bound" in again.liger_skipped["rope"]
    attn = pm.get_base_model().model.layers[0].self_attn
    ours = attn.__dict__["forward"]
    attn.__dict__["forward"] = lambda *a, **k: ours(*a, **k)  # something wraps it after patch()
    with pytest.warns(UserWarning, match="wrapped after"):
        fastlora.unpatch(pm)
    assert fl_liger.applied_piece(attn) == "rope"  # left bound: removing it would drop the wrapper
    del attn.__dict__["forward"]


@pytest.mark.skipif("chunked_loss" not in inspect.signature(fastlora.patch).parameters,
                    reason="fastlora.patch has no chunked_loss keyword")
def test_fastlora_chunked_loss_keeps_liger_cross_entropy_off():
    pm = _llama()
    report = fastlora.patch(pm, liger=True)  # chunked_loss on (its default)
    assert "fused_linear_cross_entropy" not in report.liger_applied
    assert "chunked_loss=False" in report.liger_skipped["fused_linear_cross_entropy"]
    assert len(report.liger_applied["rope"]) == N_LAYERS
    fastlora.unpatch(pm)


def test_eval_and_no_labels_return_logits(monkeypatch):
    """The fused loss runs only in training with labels; otherwise the class's forward, with logits."""
    pm = _llama()
    spy = _Spy(monkeypatch, ["liger_fused_linear_cross_entropy"])
    _patch(pm, liger=("fused_linear_cross_entropy",))
    ids, labels = _batch()
    with torch.no_grad():
        assert pm(input_ids=ids).logits.shape == (2, 12, 128)
        pm.eval()
        out = pm(input_ids=ids, labels=labels)
    assert out.logits is not None and out.loss is not None and spy.calls["liger_fused_linear_cross_entropy"] == 0


# ------------------------------------------------------------------------------------------------
# arguments and architectures
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arg, exc, match", [
    ("rope", TypeError, "not the string 'rope'.*valid names: rms_norm, swiglu, rope, fused_linear_cross_entropy"),
    (("rope", "bogus"), ValueError, r"unknown Liger piece\(s\) \['bogus'\]; valid names: rms_norm, swiglu"),
    (3, TypeError, "got int"),
])
def test_bad_arguments(arg, exc, match):
    pm = _llama()
    with pytest.raises(exc, match=match):
        fastlora.patch(pm, liger=arg)
    assert not any("forward" in m.__dict__ for m in pm.modules())  # nothing was changed


def test_missing_liger_names_the_extra(monkeypatch):
    pm = _llama()
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.functional", None)  # import fails
    with pytest.raises(ImportError, match=r"pip install fastlora\[liger\]"):
        fastlora.patch(pm, liger=True)
    assert not any("forward" in m.__dict__ for m in pm.modules())
    report = _patch(pm, liger=None)  # off: Liger is not needed
    assert not report.liger_applied and not report.liger_skipped and "Liger" not in report.summary()
    fastlora.unpatch(pm)


def _dense_peft(config, targets):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16).to(DEVICE)
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets)).train()


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_mistral_and_qwen2_supported(arch, monkeypatch):
    from transformers import AutoConfig

    config = AutoConfig.for_model(arch, vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    pm = _dense_peft(config, ["q_proj", "v_proj"])
    names = ["liger_rms_norm", "liger_swiglu", "liger_rope", "liger_fused_linear_cross_entropy"]
    spy = _Spy(monkeypatch, names, _interpreter_stand_ins())
    report = _patch(pm, liger=True)
    assert {p: len(n) for p, n in report.liger_applied.items()} == EXPECTED, report.summary()
    ids, labels = _batch()
    out = pm(input_ids=ids, labels=labels)
    out.loss.backward()
    assert torch.isfinite(out.loss) and spy.calls == {"liger_rms_norm": EXPECTED["rms_norm"], "liger_swiglu": N_LAYERS,
                                                      "liger_rope": N_LAYERS, "liger_fused_linear_cross_entropy": 1}
    fastlora.unpatch(pm)
    assert not any(fl_liger.applied_piece(m) for m in pm.modules())


def test_unsupported_architecture_applies_nothing():
    from transformers import OPTConfig

    config = OPTConfig(vocab_size=128, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                       max_position_embeddings=64, word_embed_proj_dim=64)
    pm = _dense_peft(config, ["q_proj", "v_proj"])
    report = _patch(pm, liger=True)
    assert not report.liger_applied
    assert set(report.liger_skipped) == set(fl_liger.PIECES)
    assert all("architecture 'opt'" in r and "supported: llama, mistral, qwen2" in r
               for r in report.liger_skipped.values()), report.liger_skipped
    assert "Liger: nothing (skipped: rms_norm: architecture 'opt'" in report.summary()
    assert not any(fl_liger.applied_piece(m) for m in pm.modules())
    fastlora.unpatch(pm)


def test_whole_stack_within_rule(monkeypatch):
    """Everything fastlora offers at once, as a long-context QLoRA run would use it: the LoRA kernels,
    the chunked loss (on by default), Liger's RoPE and the checkpoints in host memory, with gradient
    checkpointing on. Loss and every LoRA gradient within the rule of PEFT's bf16 error against an fp32
    reference (the same NF4 weights, computed unpatched in fp32)."""
    from fastlora import offload

    pm = _llama()
    base = pm.get_base_model()
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.enable_input_require_grads()
    spy = _Spy(monkeypatch, ["liger_rope"], _interpreter_stand_ins())
    report = fastlora.patch(pm, liger=("rope",), offload_checkpoints=True)
    assert report.loss == "LlamaForCausalLM" and report.offload, report.summary()
    out, grads = _step(pm)
    assert out.logits is None
    assert spy.calls == {"liger_rope": 2 * N_LAYERS}       # forward, then the recompute in backward
    assert offload.stats(pm)["calls"] == N_LAYERS and not offload.stats(pm)["fallback"]
    assert report.fused_calls == 2 * 7 * N_LAYERS      # forward, then the recompute in backward

    ref = _fp32(pm)
    fastlora.unpatch(ref)
    ref_out, ref_grads = _step(ref)
    fastlora.unpatch(pm)
    peft_out, peft_grads = _step(pm)
    assert peft_out.logits is not None
    assert_within_rule("loss", out.loss, ref_out.loss, peft_out.loss)
    assert grads.keys() == ref_grads.keys() == peft_grads.keys()
    for name in sorted(ref_grads):
        assert_within_rule(name, grads[name], ref_grads[name], peft_grads[name])
