"""fastlora.patch / unpatch on PEFT LoRA layers: eligibility, per-call fallbacks, numerics, lifecycle.

Numerics follow the rule in tests/helpers.py: the patched layer's output and gradients (dX, dA, dB)
against an fp64 reference of the same math must be within 2x the error of PEFT's own unpatched
forward (plain PyTorch / bitsandbytes in the same precision) plus a small atol. Every numeric test
asserts that the fused op actually ran (report.fused_calls); every fallback test asserts the reason
and that the result is PEFT's own, bit for bit.

Models and inputs live on ``DEVICE``: on a GPU machine the layers are quantized by bitsandbytes on
the GPU and the fused path runs the compiled kernels; without one everything is on the CPU and the
kernels run in Triton's interpreter. Random values are drawn on the CPU and then moved (``rand``),
so both machines see the same numbers. PEFT's side on CUDA is the same math as on the CPU:
bitsandbytes 0.50 computes X·Wᵀ as dequantize + F.linear there because the toy layer's K = 80 is not
a multiple of its blocksize 64 (its fused small-M 4-bit GEMM needs K % blocksize == 0), and 0.49's
gemv kernel only takes single-token inputs, which no test here feeds.
"""

from __future__ import annotations

import copy
import logging
import math

import bitsandbytes as bnb
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

import fastlora
from fastlora.kernels._interpreter import interpreter_active
from fastlora.kernels.lora_matmul import dropout_keep_mask
from fastlora.patcher import FALLBACK_REASONS, SKIP_REASONS, is_patched

from helpers import DEVICE, ON_GPU, assert_within_rule
from models import randomize_lora_B

K_IN, N_OUT = 80, 48  # K not a multiple of 64: 4-bit blocks straddle rows


def rand(*shape, dtype=None, device=None):
    """torch.randn drawn from the CPU generator (the same values on every machine), moved to DEVICE."""
    t = torch.randn(*shape, dtype=torch.float64 if dtype == torch.float64 else None)
    return t.to(device=device or DEVICE, dtype=dtype)


class Toy(nn.Module):
    """Modules applied in order; an nn.Embedding first takes token ids."""

    def __init__(self, **layers):
        super().__init__()
        for name, layer in layers.items():
            setattr(self, name, layer)
        self.names = list(layers)

    def forward(self, x):
        for name in self.names:
            x = getattr(self, name)(x)
        return x


def make_base(kind, K=K_IN, N=N_OUT, bias=True, dtype=torch.bfloat16, compute_dtype=torch.bfloat16,
              quant_type="nf4", double_quant=True, seed=0, device=None):
    """The frozen base layer on ``device`` (default DEVICE), weights drawn on the CPU."""
    device = device or DEVICE
    g = torch.Generator().manual_seed(seed)
    dense = nn.Linear(K, N, bias=bias)
    with torch.no_grad():
        dense.weight.copy_(torch.randn(N, K, generator=g) * K ** -0.5)
        if bias:
            dense.bias.copy_(torch.randn(N, generator=g) * 0.1)
    if kind == "dense":
        return dense.to(device=device, dtype=dtype).requires_grad_(False)
    q = bnb.nn.Linear4bit(K, N, bias=bias, compute_dtype=compute_dtype, quant_type=quant_type,
                          compress_statistics=double_quant)
    q.load_state_dict(dense.state_dict())
    return q.to(device)  # quantizes (bitsandbytes' Params4bit.to), on the GPU when device is cuda


def make_model(kind="4bit", r=8, dropout=0.0, lora_kw=None, **base_kw):
    """A PEFT LoRA model over one base layer (base_kw: make_base's, device included)."""
    toy = Toy(proj=make_base(kind, **base_kw))
    toy.is_loaded_in_4bit = kind == "4bit"
    cfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=["proj"], **(lora_kw or {}))
    pm = get_peft_model(toy, cfg)
    randomize_lora_B(pm, seed=1, std=0.1)
    return pm


def layer_of(pm, name="proj"):
    return pm.get_submodule(f"base_model.model.{name}")


def base_weight_f64(layer):
    base = layer.base_layer
    if isinstance(base, bnb.nn.Linear4bit):
        w = bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state, quant_type=base.weight.quant_type)
        return w.double()
    return base.weight.detach().double()


def exact_forward(layer, x, adapters, mask=None, p=0.0):
    """fp64 Y = X·Wᵀ + b + Σ s·(D(X)·Aᵀ)·Bᵀ with leaf copies of X, A_i, B_i for the gradients."""
    xd = x.detach().double().requires_grad_(True)
    y = xd @ base_weight_f64(layer).t()
    if layer.base_layer.bias is not None:
        y = y + layer.base_layer.bias.detach().double()
    leaves = {}
    xl = xd if mask is None else xd * mask.double().reshape(xd.shape) / (1.0 - p)
    for a in adapters:
        A = layer.lora_A[a].weight.detach().double().requires_grad_(True)
        B = layer.lora_B[a].weight.detach().double().requires_grad_(True)
        y = y + layer.scaling[a] * (xl @ A.t()) @ B.t()
        leaves[a] = (A, B)
    return y, xd, leaves


def run(pm, x, dy, adapters, name="proj"):
    """Forward + backward through the model; returns Y, dX and {adapter: (dA, dB)}."""
    pm.zero_grad(set_to_none=True)
    xg = x.clone().requires_grad_(True)
    y = pm(xg)
    y.backward(dy.to(y.dtype))
    layer = layer_of(pm, name)
    grads = {a: (layer.lora_A[a].weight.grad, layer.lora_B[a].weight.grad) for a in adapters}
    return y.detach(), xg.grad, grads


def check_against_peft(pm, ref, x, adapters, what, mask=None, p=0.0):
    """Patched pm vs PEFT (ref, never patched) vs fp64: output and every gradient, by the rule."""
    torch.manual_seed(123)
    dy = rand(*x.shape[:-1], N_OUT, dtype=torch.float64)
    y, dx, g = run(pm, x, dy, adapters)
    y_l, dx_l, g_l = run(ref, x, dy, adapters)
    assert y.dtype == y_l.dtype, f"{what}: output dtype {y.dtype}, PEFT gives {y_l.dtype}"
    assert dx.dtype == dx_l.dtype, f"{what}: dX dtype {dx.dtype}, PEFT gives {dx_l.dtype}"
    ye, xd, leaves = exact_forward(layer_of(pm), x, adapters, mask, p)
    ye.backward(dy)
    assert_within_rule(f"{what} Y", y, ye, y_l)
    assert_within_rule(f"{what} dX", dx, xd.grad, dx_l)
    for a in adapters:
        A, B = leaves[a]
        assert g[a][0].dtype == g_l[a][0].dtype
        assert_within_rule(f"{what} dA[{a}]", g[a][0], A.grad, g_l[a][0])
        assert_within_rule(f"{what} dB[{a}]", g[a][1], B.grad, g_l[a][1])


def patched_pair(pm):
    ref = copy.deepcopy(pm)
    report = fastlora.patch(pm)
    return ref, report


# ------------------------------------------------------------------------------------------------
# numerics of the fused path
# ------------------------------------------------------------------------------------------------

CASES = {
    # QLoRA after prepare_model_for_kbit_training: fp32 activations, bf16 compute, fp32 adapters
    "4bit-x32-bf16compute": dict(kind="4bit", x_dtype=torch.float32),
    "4bit-x_bf16": dict(kind="4bit", x_dtype=torch.bfloat16),
    "4bit-fp4-plainabsmax-nobias": dict(kind="4bit", x_dtype=torch.float32, quant_type="fp4",
                                        double_quant=False, bias=False),
    "4bit-fp16compute": dict(kind="4bit", x_dtype=torch.float16, compute_dtype=torch.float16),
    "dense-bf16": dict(kind="dense", x_dtype=torch.bfloat16),
    "dense-fp32-r5": dict(kind="dense", x_dtype=torch.float32, dtype=torch.float32, r=5),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fused_matches_peft(case):
    kw = dict(CASES[case])
    x_dtype = kw.pop("x_dtype")
    pm = make_model(**kw)
    ref, report = patched_pair(pm)
    assert report.patched == ["base_model.model.proj"], report
    x = rand(3, 7, K_IN, dtype=x_dtype)  # M = 21 tokens
    check_against_peft(pm, ref, x, ["default"], case)
    assert report.fused_calls == 1 and not report.fallback_calls, (report.fused_calls, report.fallback_calls)


@pytest.mark.parametrize("case", ["4bit-x32-bf16compute", "4bit-x_bf16", "dense-bf16"])
def test_dequant_strategy_through_the_patcher(case, monkeypatch):
    """The large-M strategy (dequantize, cuBLAS, fused LoRA epilogue) behind the patcher, forced by
    lowering the dispatcher's threshold below this batch."""
    import fastlora.ops as ops

    from fastlora.kernels import configs

    monkeypatch.setattr(ops, "INTERPRETER_DEQUANT_MIN_TOKENS", 1)                       # the interpreter's
    monkeypatch.setattr(configs, "DEQUANT_MIN_TOKENS", dict.fromkeys(configs.TABLES, 1))  # a GPU's
    assert ops.choose_strategy(21, torch.device(DEVICE)) == "dequant"
    kw = dict(CASES[case])
    x_dtype = kw.pop("x_dtype")
    pm = make_model(**kw)
    ref, report = patched_pair(pm)
    check_against_peft(pm, ref, rand(3, 7, K_IN, dtype=x_dtype), ["default"], case)
    assert report.fused_calls == 1 and not report.fallback_calls, (report.fused_calls, report.fallback_calls)


@pytest.mark.parametrize("cuda_like", [False, True])
@pytest.mark.parametrize("kind", ["4bit", "dense"])
def test_fused_under_autocast(kind, cuda_like, monkeypatch):
    """Autocast bf16 on DEVICE over fp32 activations (what Trainer bf16=True does: CPU autocast on a
    CPU, CUDA autocast on a GPU): bitsandbytes' and nn.Linear's inner F.linear run in bf16; the result
    dtype is PEFT's (fp32 for 4-bit, bf16 for dense). Under CUDA autocast PEFT's 4-bit layer also
    skips its cast of x to the adapters' dtype (torch.is_autocast_enabled() is CUDA's), so the GPU
    run covers the patcher's other autocast branch."""
    # bitsandbytes' compute dtype equal to the autocast dtype, as in the QLoRA recipe (bf16 compute,
    # Trainer bf16=True); a different one falls back (test_fallback_autocast_other_compute_dtype)
    if cuda_like and not ON_GPU:
        # PEFT's 4-bit layer asks torch.is_autocast_enabled() with no device, which answers for CUDA
        # only; make it answer for the CPU's autocast, for PEFT and the patcher alike, so the CPU run
        # also takes the branch a GPU run takes (no cast of x to the adapters' dtype)
        orig = torch.is_autocast_enabled
        monkeypatch.setattr(torch, "is_autocast_enabled",
                            lambda *a: orig(*a) if a else orig("cpu"))
    pm = make_model(kind, dtype=torch.float32, compute_dtype=torch.bfloat16)
    ref, report = patched_pair(pm)
    x = rand(2, 9, K_IN)
    torch.manual_seed(5)
    dy = rand(2, 9, N_OUT, dtype=torch.float64)
    outs = []
    for model in (pm, ref):
        model.zero_grad(set_to_none=True)
        xg = x.clone().requires_grad_(True)
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            y = model(xg)
        y.backward(dy.to(y.dtype))
        la = layer_of(model)
        outs.append((y.detach(), xg.grad, la.lora_A["default"].weight.grad, la.lora_B["default"].weight.grad))
    assert report.fused_calls == 1, report
    assert outs[0][0].dtype == outs[1][0].dtype, (outs[0][0].dtype, outs[1][0].dtype)
    # exact reference: the math on bf16-rounded x and W (what autocast feeds F.linear), fp64
    layer = layer_of(pm)
    ye, xd, leaves = exact_forward(layer, x, ["default"])
    ye.backward(dy)
    A, B = leaves["default"]
    for i, (name, exact) in enumerate([("Y", ye), ("dX", xd.grad), ("dA", A.grad), ("dB", B.grad)]):
        assert_within_rule(f"autocast {kind} {name}", outs[0][i], exact, outs[1][i])


def test_fallback_autocast_other_compute_dtype():
    """Autocast bf16 over a layer whose bitsandbytes compute dtype is fp32: bitsandbytes' CUDA path
    then picks the dtype by batch size (its small-batch kernel ignores autocast), so the patcher
    keeps PEFT's forward, with its reason, and the result is PEFT's bit for bit."""
    pm = make_model("4bit", dtype=torch.float32, compute_dtype=torch.float32)
    ref, report = patched_pair(pm)
    x = rand(2, 9, K_IN)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y = pm(x)
        y_ref = ref(x)
    assert report.fused_calls == 0 and report.fallback_calls == {"autocast_compute_dtype": 1}, report
    assert torch.equal(y, y_ref)


def test_dropout_uses_kernel_mask_in_training_only():
    """p is read from the dropout module at call time and applied only in training mode; the mask
    is the kernel's counter-based one, its seed drawn from the generator of x's device (the CPU's
    or the GPU's: torch.manual_seed seeds both, so it can be reproduced on either machine)."""
    p = 0.25
    pm = make_model("4bit", dropout=p)
    ref, report = patched_pair(pm)
    x = rand(2, 5, K_IN)
    pm.train(), ref.train()
    torch.manual_seed(77)
    seed = fastlora.ops.draw_seed(DEVICE)  # what lora_linear draws, without a kernel launch
    mask = dropout_keep_mask(10, K_IN, p, seed, DEVICE)
    torch.manual_seed(77)
    y = pm(x)
    ye, _, _ = exact_forward(layer_of(pm), x, ["default"], mask=mask, p=p)
    # PEFT in the same precision on the same mask: the low-precision reference
    la = layer_of(ref)
    with torch.no_grad():
        base = la.base_layer(x)
        term = la.lora_B["default"](la.lora_A["default"](x * mask.reshape(x.shape) / (1 - p))) * la.scaling["default"]
        y_l = base + term.to(base.dtype)
    assert_within_rule("dropout Y", y, ye, y_l)
    assert 0.6 < mask.float().mean().item() < 0.9, mask.float().mean()
    # eval: no dropout, the same as PEFT's eval output within the rule
    pm.eval(), ref.eval()
    check_against_peft(pm, ref, x, ["default"], "dropout-eval")
    # the module is read at call time: p changed after patching is honoured
    layer_of(pm).lora_dropout["default"].p = 0.0
    pm.train()
    y0 = pm(x)
    pm.eval()
    assert torch.equal(y0, pm(x)), "p=0 in training mode must equal eval"
    assert report.fused_calls == 4 and not report.fallback_calls, report


def test_reads_module_state_at_call_time():
    pm = make_model("4bit")
    ref, report = patched_pair(pm)
    for model in (pm, ref):
        la = layer_of(model)
        la.scaling["default"] = 0.37
        with torch.no_grad():
            la.lora_B["default"].weight.mul_(-3.0)
    check_against_peft(pm, ref, rand(4, K_IN), ["default"], "changed scaling and B")
    assert report.fused_calls == 1


def test_compute_dtype_set_from_first_input_like_bitsandbytes():
    """A Linear4bit with no compute dtype takes it from its first input (bitsandbytes' set_compute_type)."""
    pm = make_model("4bit", compute_dtype=None)
    ref, report = patched_pair(pm)
    assert layer_of(pm).base_layer.compute_type_is_set is False
    check_against_peft(pm, ref, rand(6, K_IN, dtype=torch.bfloat16), ["default"], "compute dtype from input")
    for model in (pm, ref):
        base = layer_of(model).base_layer
        assert base.compute_type_is_set and base.compute_dtype == torch.bfloat16, base.compute_dtype
    assert report.fused_calls == 1


def test_two_active_adapters_sum_like_peft():
    pm = make_model("4bit", r=8)
    pm.add_adapter("other", LoraConfig(r=4, lora_alpha=12, target_modules=["proj"]))
    randomize_lora_B(pm, seed=2, std=0.1)
    pm.base_model.set_adapter(["default", "other"])
    ref, report = patched_pair(pm)
    check_against_peft(pm, ref, rand(2, 6, K_IN), ["default", "other"], "two adapters")
    assert report.fused_calls == 1 and not report.fallback_calls
    # set_adapter switches the fused layer to the other adapter's weights
    for model in (pm, ref):
        model.set_adapter("other")
    check_against_peft(pm, ref, rand(5, K_IN), ["other"], "set_adapter('other')")
    assert report.fused_calls == 2


# ------------------------------------------------------------------------------------------------
# fallbacks: the reason, and PEFT's own result
# ------------------------------------------------------------------------------------------------


def assert_fallback(pm, ref, report, reason, call):
    before = report.fused_calls
    y = call(pm)
    y_ref = call(ref)
    assert report.fallback_calls[reason] >= 1, f"expected fallback {reason!r}, got {dict(report.fallback_calls)}"
    assert report.fused_calls == before, "the fused op ran where it must not"
    assert torch.equal(y, y_ref), f"fallback {reason}: max diff {(y.float() - y_ref.float()).abs().max()}"


def test_fallback_disable_adapter():
    pm = make_model("4bit")
    ref, report = patched_pair(pm)
    x = rand(3, K_IN)

    def call(m):
        with m.disable_adapter():
            return m(x)

    assert_fallback(pm, ref, report, "adapters_disabled", call)
    pm(x)
    assert report.fused_calls == 1, "adapters back on: the fused op runs again"


@pytest.mark.parametrize("kind", ["dense", "4bit"])
def test_fallback_merged_then_unmerged(kind):
    pm = make_model(kind)
    ref, report = patched_pair(pm)
    x = rand(3, K_IN, dtype=torch.bfloat16 if kind == "dense" else torch.float32)
    for m in (pm, ref):
        m.merge_adapter()
    assert_fallback(pm, ref, report, "merged", lambda m: m(x))
    for m in (pm, ref):
        m.unmerge_adapter()
    pm(x)
    assert report.fused_calls == 1


def test_fallback_mixed_batch_adapter_names():
    pm = make_model("4bit")
    pm.add_adapter("other", LoraConfig(r=4, lora_alpha=8, target_modules=["proj"]))
    randomize_lora_B(pm, seed=3, std=0.1)
    ref, report = patched_pair(pm)
    x = rand(3, 2, K_IN)
    names = ["default", "other", "__base__"]
    pm.eval(), ref.eval()  # PEFT accepts adapter_names only in eval mode
    assert_fallback(pm, ref, report, "adapter_names", lambda m: m(x, adapter_names=names))


@pytest.mark.parametrize("kind", ["4bit", "dense"])
def test_extra_keyword_set_to_none_raises_like_peft(kind):
    """PEFT hands every keyword but adapter_names on to the base layer, None or not: ``scale=None``
    makes the base layer raise a TypeError, and the patched layer raises the same one; a lone
    ``adapter_names=None`` is no keyword at all to PEFT and runs fused."""
    pm = make_model(kind)
    ref, report = patched_pair(pm)
    x = rand(3, K_IN, dtype=torch.bfloat16 if kind == "dense" else torch.float32)
    with pytest.raises(TypeError) as theirs:
        layer_of(ref)(x, scale=None)
    with pytest.raises(TypeError) as mine:
        layer_of(pm)(x, scale=None)
    assert str(mine.value) == str(theirs.value)
    assert report.fallback_calls["extra_arguments"] == 1 and report.fused_calls == 0, dict(report.fallback_calls)
    y = layer_of(pm)(x, adapter_names=None)
    assert report.fused_calls == 1
    assert_within_rule("adapter_names=None", y, layer_of(ref)(x).double(), layer_of(ref)(x), atol=1e-2)


def test_dora_skipped_at_patch_time_and_falls_back_per_call(caplog):
    # a model whose only adapter is DoRA: nothing to patch, a warning, PEFT's training unchanged
    pm = make_model("4bit", lora_kw=dict(use_dora=True))
    ref = copy.deepcopy(pm)
    with caplog.at_level(logging.INFO, logger="fastlora"), pytest.warns(UserWarning, match="patched none"):
        report = fastlora.patch(pm)
    assert report.patched == [] and report.skipped["base_model.model.proj"].startswith("no_plain_adapter"), report
    assert "DoraLinearVariant" in report.skipped["base_model.model.proj"]
    assert any("no_plain_adapter" in r.message for r in caplog.records), caplog.text
    x = rand(4, K_IN)
    dy = torch.ones(4, N_OUT, device=DEVICE)
    y, dx, g = run(pm, x, dy, ["default"])
    y_r, dx_r, g_r = run(ref, x, dy, ["default"])
    assert torch.equal(y, y_r) and torch.equal(dx, dx_r) and torch.equal(g["default"][1], g_r["default"][1])
    # plain + DoRA adapters on one layer: patched; the DoRA adapter falls back when active
    pm = make_model("4bit")
    pm.add_adapter("dora", LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], use_dora=True))
    ref, report = patched_pair(pm)
    assert report.patched == ["base_model.model.proj"]
    for m in (pm, ref):
        m.set_adapter("dora")
    assert_fallback(pm, ref, report, "lora_variant", lambda m: m(x))


def test_lora_bias_skipped():
    pm = make_model("dense", lora_kw=dict(lora_bias=True))
    with pytest.warns(UserWarning, match="patched none"):
        report = fastlora.patch(pm)
    assert report.skipped["base_model.model.proj"].startswith("no_plain_adapter: lora_bias"), report.skipped


def test_fallback_lora_bias_adapter_active():
    pm = make_model("dense")
    pm.add_adapter("biased", LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], lora_bias=True))
    ref, report = patched_pair(pm)
    for m in (pm, ref):
        m.set_adapter("biased")
    x = rand(2, K_IN, dtype=torch.bfloat16)
    assert_fallback(pm, ref, report, "lora_bias", lambda m: m(x))


def test_fallback_two_adapters_with_dropout_in_training():
    pm = make_model("dense", dropout=0.1)
    pm.add_adapter("other", LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], lora_dropout=0.1))
    pm.base_model.set_adapter(["default", "other"])
    ref, report = patched_pair(pm)
    pm.train(), ref.train()
    x = rand(2, K_IN, dtype=torch.bfloat16)

    def call(m):
        torch.manual_seed(9)  # PEFT's nn.Dropout masks (CPU or CUDA generator): the same draw in both
        return m(x)

    assert_fallback(pm, ref, report, "multiple_adapters_dropout", call)


def test_fallback_no_active_adapter_on_layer():
    toy = Toy(proj=make_base("dense"), head=make_base("dense", K=N_OUT, N=N_OUT, seed=1))
    pm = get_peft_model(toy, LoraConfig(r=4, lora_alpha=8, target_modules=["proj", "head"]))
    pm.add_adapter("head_only", LoraConfig(r=4, lora_alpha=8, target_modules=["head"]))
    randomize_lora_B(pm, seed=4, std=0.1)
    ref, report = patched_pair(pm)
    assert sorted(report.patched) == ["base_model.model.head", "base_model.model.proj"]
    for m in (pm, ref):
        m.set_adapter("head_only")
    x = rand(3, K_IN, dtype=torch.bfloat16)
    y, y_r = pm(x), ref(x)
    assert report.fallback_calls["no_active_adapter"] == 1 and report.fused_calls == 1, report
    # the head layer ran fused: within bf16 rounding of PEFT, not bit-identical in general
    torch.testing.assert_close(y.float(), y_r.float(), rtol=2e-2, atol=2e-2)


def test_fallback_base_requires_grad():
    pm = make_model("dense", lora_kw=dict(bias="all"))  # PEFT unfreezes the base biases
    ref, report = patched_pair(pm)
    assert layer_of(pm).base_layer.bias.requires_grad
    x = rand(2, K_IN, dtype=torch.bfloat16)
    assert_fallback(pm, ref, report, "base_requires_grad", lambda m: m(x))


@pytest.mark.parametrize("kind", ["4bit", "dense"])
def test_fallback_device_without_interpreter(kind, monkeypatch):
    """CPU tensors with Triton's interpreter off: the kernels cannot run there, PEFT's forward does.
    The model and x are on the CPU on either machine and the interpreter is switched off (on a GPU
    machine it is off already: conftest sets TRITON_INTERPRET only without CUDA; the patcher reads it
    on every call). Then the same patched model where the kernels can run: on a GPU machine moved to
    the GPU, on a CPU machine with the interpreter back on; it runs the fused op."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not interpreter_active()
    pm = make_model(kind, device="cpu")
    ref, report = patched_pair(pm)
    x = rand(2, K_IN, dtype=torch.bfloat16 if kind == "dense" else torch.float32, device="cpu")
    assert_fallback(pm, ref, report, "device", lambda m: m(x))
    assert report.fallback_calls == {"device": 1}, dict(report.fallback_calls)
    if ON_GPU:
        pm.to(DEVICE)  # a 4-bit weight moves with its quant_state
        x = x.to(DEVICE)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    y = pm(x)
    assert report.fused_calls == 1 and report.fallback_calls == {"device": 1}, report
    assert y.device == x.device and y.dtype == x.dtype


def test_fallback_dtype_mismatch_raises_like_peft():
    pm = make_model("dense")  # bf16 weights
    ref, report = patched_pair(pm)
    x = rand(2, K_IN)  # fp32 into a bf16 nn.Linear: PEFT raises
    with pytest.raises(RuntimeError) as e_ref:
        ref(x)
    with pytest.raises(RuntimeError) as e:
        pm(x)
    assert str(e.value) == str(e_ref.value)
    assert report.fallback_calls["dtype"] == 1 and report.fused_calls == 0


def test_unsupported_layer_types_skipped():
    toy = Toy(emb=nn.Embedding(16, K_IN).to(DEVICE), proj=make_base("dense", dtype=torch.float32))
    pm = get_peft_model(toy, LoraConfig(r=4, lora_alpha=8, target_modules=["emb", "proj"]))
    report = fastlora.patch(pm)
    assert report.patched == ["base_model.model.proj"]
    assert report.skipped["base_model.model.emb"].startswith("unsupported_layer_type"), report.skipped
    ids = torch.randint(0, 16, (2, 3)).to(DEVICE)
    pm(ids).sum().backward()
    assert report.fused_calls == 1


def test_reason_lists_are_documented():
    for reason in list(SKIP_REASONS) + list(FALLBACK_REASONS):
        assert reason.isidentifier()
    assert {"lora_variant", "lora_bias", "adapters_disabled", "merged", "adapter_names"} <= set(FALLBACK_REASONS)


# ------------------------------------------------------------------------------------------------
# lifecycle: patch twice, unpatch, errors, save / reload
# ------------------------------------------------------------------------------------------------


def test_patch_twice_patches_nothing_new(caplog):
    pm = make_model("4bit")
    first = fastlora.patch(pm)
    with caplog.at_level(logging.INFO, logger="fastlora"):
        second = fastlora.patch(pm)
    assert second.patched == [] and second.already_patched == first.patched == ["base_model.model.proj"]
    assert "already patched" in caplog.text, caplog.text
    pm(rand(2, K_IN))
    assert first.fused_calls == 1 and second.fused_calls == 0  # the layer still reports to its patcher


@pytest.mark.parametrize("kind", ["4bit", "dense"])
def test_unpatch_restores_bit_identical(kind):
    pm = make_model(kind, dropout=0.1)
    never = copy.deepcopy(pm)
    sd_before = {k: v.clone() for k, v in pm.state_dict().items()}
    report = fastlora.patch(pm)
    layer = layer_of(pm)
    assert is_patched(layer) and "forward" in layer.__dict__
    x = rand(3, K_IN, dtype=torch.bfloat16 if kind == "dense" else torch.float32)
    pm.train()
    pm(x).float().sum().backward()  # exercise the fused path before restoring
    assert report.fused_calls == 1
    restored = fastlora.unpatch(pm)
    assert restored == ["base_model.model.proj"] and not is_patched(layer) and "forward" not in layer.__dict__
    sd_after = pm.state_dict()
    assert sd_after.keys() == sd_before.keys()
    for k, v in sd_before.items():
        assert v.dtype == sd_after[k].dtype and torch.equal(v, sd_after[k]), f"state_dict[{k}] changed"
    pm.zero_grad(set_to_none=True)
    for m in (pm, never):
        m.train()
    outs = []
    for m in (pm, never):
        torch.manual_seed(11)  # the same PEFT dropout mask
        xg = x.clone().requires_grad_(True)
        y = m(xg)
        y.float().pow(2).sum().backward()
        outs.append((y, xg.grad, layer_of(m).lora_A["default"].weight.grad))
    for a, b, what in zip(outs[0], outs[1], ("Y", "dX", "dA")):
        assert torch.equal(a, b), f"after unpatch {what} differs from a never-patched model by {(a - b).abs().max()}"


def test_bad_inputs():
    with pytest.raises(TypeError, match="PEFT LoRA model"):
        fastlora.patch("not a model")
    with pytest.raises(ValueError, match=r"patches PEFT LoRA models.*no PEFT layer at all \(1 nn.Linear"):
        fastlora.patch(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    from peft import IA3Config

    ia3 = get_peft_model(Toy(proj=make_base("dense", dtype=torch.float32)),
                         IA3Config(target_modules=["proj"], feedforward_modules=[]))
    with pytest.raises(ValueError, match="other methods.*Linear"):
        fastlora.patch(ia3)
    with pytest.raises(TypeError):
        fastlora.unpatch(42)


def test_save_reload_then_patch(tmp_path):
    pm = make_model("4bit")
    pm.save_pretrained(tmp_path / "adapter")
    report = fastlora.patch(pm)
    x = rand(2, 4, K_IN)
    y = pm(x)
    # reload the adapter onto a fresh base and patch again: the same fused result
    fresh = Toy(proj=make_base("4bit"))
    fresh.is_loaded_in_4bit = True
    reloaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter")
    report2 = fastlora.patch(reloaded)
    assert report2.patched == report.patched
    y2 = reloaded(x)
    assert report2.fused_calls == 1
    assert torch.equal(y, y2), f"reloaded adapter differs by {(y - y2).abs().max()}"
    # saving from a patched model writes what PEFT writes
    reloaded.save_pretrained(tmp_path / "again")
    from safetensors.torch import load_file

    a = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fallback_base_layer_hooks():
    """A hook on the base layer (what accelerate's offloading installs) is PEFT's to run."""
    pm = make_model("4bit")
    ref, report = patched_pair(pm)
    for m in (pm, ref):
        layer_of(m).base_layer.register_forward_hook(lambda mod, inp, out: out * 2)
    x = rand(2, K_IN)
    assert_fallback(pm, ref, report, "module_hooks", lambda m: m(x))


def test_layer_with_replaced_forward_is_skipped():
    """A layer whose forward something else already replaced on the instance is not patched: the
    fused op would bypass that wrapper."""
    pm = make_model("4bit")
    layer = layer_of(pm)
    calls = []
    original = layer.forward

    def wrapper(x, *args, **kwargs):
        calls.append(1)
        return original(x, *args, **kwargs)

    layer.forward = wrapper
    report = fastlora.patch(pm)
    assert not report.patched and report.skipped["base_model.model.proj"].startswith("instance_forward:"), report
    pm(rand(2, K_IN))
    assert calls == [1] and layer.__dict__["forward"] is wrapper


def test_unpatch_leaves_a_later_wrapper_in_place():
    """A wrapper installed over the patched forward after patch() survives unpatch (with a warning),
    and the layer keeps working through it."""
    pm = make_model("4bit")
    ref = copy.deepcopy(pm)
    report = fastlora.patch(pm)
    layer = layer_of(pm)
    patched = layer.forward
    layer.forward = lambda x, *a, **k: patched(x, *a, **k)
    with pytest.warns(UserWarning, match="left 1 layer"):
        restored = fastlora.unpatch(pm)
    assert restored == [] and is_patched(layer)
    x = rand(2, K_IN)
    y = pm(x)
    assert report.fused_calls == 1
    assert_within_rule("wrapped Y", y, ref(x).double(), ref(x), atol=1e-2)


# ------------------------------------------------------------------------------------------------
# fp16 overflow: inf where PEFT gives inf
# ------------------------------------------------------------------------------------------------


def _overflow_model(kind, v, b):
    """One fp16 layer (4-bit: fp16 compute) built so that row 0 of X·Wᵀ is 80·v in columns 0 and 1,
    the LoRA term at [0, 0] is s·v·b (s = 2) and dX's terms at row 0 are dy[0,0] + dy[0,1] (base) and
    s·dy[0,0]·b/80 (LoRA). W (rows 0 and 1 all ones, zeros elsewhere) is exact in NF4."""
    w = torch.zeros(N_OUT, K_IN)
    w[:2] = 1.0
    dense = nn.Linear(K_IN, N_OUT, bias=False)
    with torch.no_grad():
        dense.weight.copy_(w)
    if kind == "dense":
        base = dense.to(device=DEVICE, dtype=torch.float16).requires_grad_(False)
    else:
        base = bnb.nn.Linear4bit(K_IN, N_OUT, bias=False, compute_dtype=torch.float16, quant_type="nf4",
                                 compress_statistics=True)
        base.load_state_dict(dense.state_dict())
        base = base.to(DEVICE)
    toy = Toy(proj=base)
    toy.is_loaded_in_4bit = kind == "4bit"
    pm = get_peft_model(toy, LoraConfig(r=8, lora_alpha=16, target_modules=["proj"]))
    layer = layer_of(pm)
    with torch.no_grad():
        layer.lora_A["default"].weight.zero_()[0] = 1.0 / K_IN
        layer.lora_B["default"].weight.zero_()[0, 0] = b
    assert layer.scaling["default"] == 2.0 and layer.lora_A["default"].weight.dtype == torch.float32
    return pm


# (v, b, dy[0, 0], dy[0, 1]): which part overflows fp16 on its own, while the fp32 sum would not
OVERFLOW_CASES = {
    # X·Wᵀ = 70000 (inf in fp16), LoRA -20000; dY·W = 70000, LoRA dX -10000
    "base": (875.0, -20000.0 / (2 * 875.0), 35000.0, 35000.0),
    # X·Wᵀ = -10000, LoRA 70000 (inf once rounded to fp16); dY·W = -10000, LoRA dX 70000
    "lora_term": (-125.0, 70000.0 / (2 * -125.0), -10000.0, 0.0),
}


@pytest.mark.parametrize("case", list(OVERFLOW_CASES))
@pytest.mark.parametrize("kind", ["dense", "4bit"])
def test_fp16_overflow_like_peft(kind, case):
    """fp16 activations and compute: Y and dX are inf exactly where PEFT's are (the loss scaler of
    fp16 mixed precision relies on them), and equal PEFT's elsewhere within fp16 rounding. PEFT rounds
    the base result to fp16 before adding the LoRA term; its 4-bit layer also rounds the LoRA term to
    fp16 first (the dense one adds it in fp32); autograd sums the two branches' dX in fp16."""
    v, b, dy00, dy01 = OVERFLOW_CASES[case]
    pm = _overflow_model(kind, v, b)
    ref, report = patched_pair(pm)
    x = (rand(3, K_IN) * 0.5).to(torch.float16)
    x[0] = v
    dy = (rand(3, N_OUT) * 0.5).to(torch.float16)
    dy[0, 0], dy[0, 1] = dy00, dy01
    y, dx, _ = run(pm, x, dy, ["default"])
    y_ref, dx_ref, _ = run(ref, x, dy, ["default"])
    assert report.fused_calls == 1 and not report.fallback_calls, (report.fused_calls, dict(report.fallback_calls))
    assert torch.isinf(y_ref).any() or torch.isinf(dx_ref).any(), "the case overflows nowhere in PEFT: it tests nothing"
    for name, mine, theirs in (("Y", y, y_ref), ("dX", dx, dx_ref)):
        inf_mine, inf_ref = torch.isinf(mine), torch.isinf(theirs)
        assert torch.equal(inf_mine, inf_ref), (
            f"{kind} {case}: {name} is inf at {inf_mine.nonzero().tolist()}, PEFT's at {inf_ref.nonzero().tolist()}")
        assert torch.equal(torch.sign(mine[inf_mine]), torch.sign(theirs[inf_ref]))
        fin = ~inf_ref
        torch.testing.assert_close(mine[fin].float(), theirs[fin].float(), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("kind", ["dense", "4bit"])
def test_fp16_adapters_overflow_like_peft(kind):
    """fp16 adapters: PEFT runs the adapter path in fp16, s applied to dY before lora_B's backward, so
    dH = s·dY·B is what overflows: 2·1000·40 = 80000 is inf in fp16 while dY·B = 40000 is not. dX
    (row 0: inf·A) and dA (row 0: inf·X) are inf or NaN exactly where PEFT's are, finite elsewhere."""
    pm = _overflow_model(kind, 0.5, 40.0)
    layer = layer_of(pm)
    layer.lora_A["default"].half()
    layer.lora_B["default"].half()
    ref, report = patched_pair(pm)
    x = (rand(3, K_IN) * 0.5).to(torch.float16)
    x[0] = 0.5
    dy = (rand(3, N_OUT) * 0.5).to(torch.float16)
    dy[0, 0] = 1000.0
    y, dx, g = run(pm, x, dy, ["default"])
    y_ref, dx_ref, g_ref = run(ref, x, dy, ["default"])
    assert report.fused_calls == 1 and not report.fallback_calls, (report.fused_calls, dict(report.fallback_calls))
    assert torch.isfinite(y_ref).all() and torch.isinf(dx_ref).any(), "the case must overflow in backward only"
    for name, mine, theirs in (("Y", y, y_ref), ("dX", dx, dx_ref), ("dA", g["default"][0], g_ref["default"][0]),
                               ("dB", g["default"][1], g_ref["default"][1])):
        assert mine.dtype == theirs.dtype, (name, mine.dtype, theirs.dtype)
        for what, f in (("inf", torch.isinf), ("nan", torch.isnan)):
            assert torch.equal(f(mine), f(theirs)), (
                f"{kind} {name}: {what} at {f(mine).nonzero().tolist()[:8]}, PEFT's at {f(theirs).nonzero().tolist()[:8]}")
        fin = torch.isfinite(theirs)
        torch.testing.assert_close(mine[fin].float(), theirs[fin].float(), rtol=4e-3, atol=4e-3)


@pytest.mark.parametrize("method", ["IA3", "LOHA"])
def test_other_peft_methods_named_in_the_error(method):
    from peft import IA3Config, LoHaConfig

    toy = Toy(proj=make_base("dense", dtype=torch.float32))
    cfg = (IA3Config(target_modules=["proj"], feedforward_modules=[]) if method == "IA3"
           else LoHaConfig(r=4, alpha=8, target_modules=["proj"]))
    pm = get_peft_model(toy, cfg)
    with pytest.raises(ValueError, match=rf"PEFT layers of other methods \({method} \(peft\.tuners\.\w+\.layer\.Linear\)\)"):
        fastlora.patch(pm)


def test_zero_in_features_like_peft():
    """nn.Linear(0, N): PEFT's output is the bias; the patched layer runs the fused op and agrees."""
    torch.manual_seed(0)
    base = nn.Linear(0, N_OUT).to(DEVICE).requires_grad_(False)
    pm = get_peft_model(Toy(proj=base), LoraConfig(r=4, lora_alpha=8, target_modules=["proj"]))
    ref, report = patched_pair(pm)
    x = torch.empty(3, 0, device=DEVICE, requires_grad=True)
    y = pm(x)
    y_ref = ref(x)
    assert report.fused_calls == 1 and not report.fallback_calls, dict(report.fallback_calls)
    assert torch.equal(y, y_ref)
    y.sum().backward()
    assert x.grad.shape == (3, 0)


@pytest.mark.parametrize("kind", ["4bit", "dense"])
def test_fallback_bf16_below_sm80(kind):
    """On a GPU without bf16 (sm_75, the T4) a bf16 layer keeps PEFT's forward, with its reason, and
    PEFT's result bit for bit. The interpreter is told to launch as on that target."""
    from fastlora.kernels import _launch

    pm = make_model(kind)
    ref, report = patched_pair(pm)
    x = rand(3, K_IN, dtype=torch.bfloat16 if kind == "dense" else torch.float32)
    with _launch.tiles_for("sm_75"):
        assert_fallback(pm, ref, report, "device_dtype", lambda m: m(x))
    pm(x)
    assert report.fused_calls == 1, "on a bf16-capable target the same call runs fused"


@pytest.mark.parametrize("kind", ["4bit", "dense"])
def test_fallback_fp32_products_on_sm100_with_old_triton(kind, monkeypatch):
    """fp32 adapters without autocast on sm_100: Triton 3.6 / 3.7 compile the fp32 adapter products to
    TF32 tensor-core instructions there, so the layer keeps PEFT's forward (reason ``fp32_products``,
    PEFT's result bit for bit); with Triton 3.8 or newer the same call runs fused. ``lora_linear``
    refuses it with the reason. The interpreter is told to launch as on that target."""
    from fastlora import ops
    from fastlora.kernels import _launch

    pm = make_model(kind)
    ref, report = patched_pair(pm)
    x = rand(3, K_IN, dtype=torch.bfloat16 if kind == "dense" else torch.float32)
    monkeypatch.setattr(ops, "_triton_version", lambda: (3, 6))
    with _launch.tiles_for("sm_100"):
        assert_fallback(pm, ref, report, "fp32_products", lambda m: m(x))
        layer = pm.base_model.model.proj
        w = layer.base_layer.weight if kind == "dense" else fastlora.format.from_bnb(
            layer.base_layer.weight, layer.base_layer.weight.quant_state)
        with pytest.raises(NotImplementedError, match="TF32"):
            fastlora.lora_linear(x, w, layer.lora_A["default"].weight, layer.lora_B["default"].weight, 2.0)
        with torch.autocast(DEVICE, dtype=torch.bfloat16):     # 16-bit adapter products: fused
            pm(x)
        assert report.fused_calls == 1
    with _launch.tiles_for("sm_90"):                          # Hopper: FMA under every Triton
        pm(x)
    monkeypatch.setattr(ops, "_triton_version", lambda: (3, 8))
    with _launch.tiles_for("sm_100"):
        pm(x)
    assert report.fused_calls == 3, dict(report.fallback_calls)


@pytest.mark.parametrize("scaling", [float("inf"), 1e38])
@pytest.mark.parametrize("kind,x_dtype", [("4bit", torch.float32), ("4bit", torch.bfloat16), ("dense", torch.bfloat16)])
def test_huge_scaling_nonfinite_like_peft(kind, x_dtype, scaling):
    """A non-finite or huge ``layer.scaling``: Y, dX, dA and dB are inf and NaN exactly where PEFT's
    are. PEFT scales dY before lora_B's backward (s·dY: 0·inf is NaN, a big dY·1e38 overflows), so
    the kernel scales its dY operand, not the product; dropout's backward is a product with the mask
    as in torch (NaN·0 stays NaN); a single zero in a row of dY shows the difference."""
    pm = make_model(kind, dropout=0.1)
    layer = layer_of(pm)
    layer.scaling["default"] = scaling
    ref, report = patched_pair(pm)
    pm.train(), ref.train()
    x = rand(4, K_IN, dtype=x_dtype)
    dy = rand(4, N_OUT, dtype=x_dtype) * 4.0
    dy[1] = 0.0
    dy[2, 0] = 0.0   # s·dY is NaN there in PEFT (0·inf), where s·(dY·B) would be ±inf
    torch.manual_seed(3)
    seed = fastlora.ops.draw_seed(DEVICE)
    mask = dropout_keep_mask(4, K_IN, 0.1, seed, DEVICE)
    if not math.isfinite(scaling):
        # PEFT with the kernel's mask in place of its own dropout (the masks must match to compare NaNs);
        # where the patched layer falls back, both draw torch's dropout mask from the same generator state
        layer_of(ref).lora_dropout["default"] = _FixedMask(mask, 0.1)
    torch.manual_seed(3)
    y, dx, g = run(pm, x, dy, ["default"])
    torch.manual_seed(3)
    y_ref, dx_ref, g_ref = run(ref, x, dy, ["default"])
    if math.isfinite(scaling):
        # beyond MAX_FUSED_SCALING: PEFT's own forward (its overflows depend on its summation order)
        assert report.fallback_calls == {"scaling": 1} and report.fused_calls == 0, dict(report.fallback_calls)
    else:
        assert report.fused_calls == 1 and not report.fallback_calls, (report.fused_calls, dict(report.fallback_calls))
    pairs = (("Y", y, y_ref), ("dX", dx, dx_ref), ("dA", g["default"][0], g_ref["default"][0]),
             ("dB", g["default"][1], g_ref["default"][1]))
    assert any(not torch.isfinite(t).all() for _, _, t in pairs), "PEFT is finite everywhere: the case tests nothing"
    for name, mine, theirs in pairs:
        for what, f in (("inf", torch.isposinf), ("-inf", torch.isneginf), ("nan", torch.isnan)):
            assert torch.equal(f(mine), f(theirs)), (
                f"{kind} {x_dtype} s={scaling}: {name} {what} at {f(mine).nonzero().tolist()[:6]}, "
                f"PEFT's at {f(theirs).nonzero().tolist()[:6]}")


class _FixedMask(nn.Module):
    """Dropout with a given keep-mask (kept values scaled by 1/(1-p)), as torch computes it: a product."""

    def __init__(self, mask, p):
        super().__init__()
        self.mask, self.p = mask, p

    def forward(self, x):
        return x * (self.mask.reshape(x.shape).to(x.dtype) / (1.0 - self.p))


def test_patched_call_runs_no_params4bit_torch_function_handler(monkeypatch):
    """bitsandbytes' Params4bit overrides __torch_function__, which made each read of the 4-bit
    weight's device, requires_grad or data_ptr cost a handler call (about 2.5 µs). A patched layer's
    call (forward and backward, after the first, which builds the weight's view) runs none of them,
    and still gives PEFT's result."""
    pm = make_model("4bit")
    ref, report = patched_pair(pm)
    x = rand(3, K_IN)
    pm(x)                                        # the first call builds the Packed4bit view
    calls = []
    orig = bnb.nn.Params4bit.__torch_function__.__func__

    def counting(cls, func, types, args=(), kwargs=None):
        calls.append(getattr(func, "__name__", str(func)))
        return orig(cls, func, types, args, kwargs)

    monkeypatch.setattr(bnb.nn.Params4bit, "__torch_function__", classmethod(counting))
    xg = x.clone().requires_grad_(True)
    y = pm(xg)
    y.sum().backward()
    assert report.fused_calls == 2 and not report.fallback_calls, report.summary()
    assert calls == [], calls
    with torch.no_grad():
        assert torch.equal(y.detach(), pm(x))
        y_ref = ref(x)
    assert_within_rule("Y", y.detach().double(), exact_forward(layer_of(pm), x, ["default"])[0].detach(), y_ref)
    # the same reads without the patch's care do run the handler: the counter counts
    layer_of(pm).base_layer.weight.device
    assert calls, "the counting handler did not run for a plain attribute read"
