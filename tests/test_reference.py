"""fastlora.reference against PEFT's own layers, and its backward formulas against autograd.

1. ``reference.lora_linear`` (+ autograd) vs ``peft.tuners.lora.bnb.Linear4bit`` over a
   ``bnb.nn.Linear4bit`` (nf4, double quant, compute dtype bf16) holding the same weights: Y, dX, dA,
   dB with dropout 0. Both compute in the same dtypes (bf16 base, fp32 adapters), so they agree to the
   last bit, or, where PyTorch picks a different fp32 GEMM kernel for ``F.linear`` than for ``@``, to
   one rounding of the fp32 LoRA term (checked with the low-precision tolerance rule).
2. The same for the dense ``peft.tuners.lora.layer.Linear`` over a bf16 ``nn.Linear``.
3. ``reference.lora_linear_backward`` (DESIGN's formulas) vs autograd of ``reference.lora_linear``
   in float64, with a dropout mask.
rsLoRA scaling is read from ``layer.scaling``, never recomputed.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import DEVICE, ON_GPU, assert_within_rule
from torch import nn

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.tuners.lora import Linear as PeftLinear  # noqa: E402
from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit  # noqa: E402

from fastlora import reference as ref  # noqa: E402

K, N, R = (96, 40, 8) if not ON_GPU else (1024, 768, 16)
LEAD = (2, 5)  # batch, sequence


class _Tiny(nn.Module):
    def __init__(self, proj):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


def _peft(base: nn.Module, *, rslora: bool, r: int = R, alpha: int = 16):
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"], lora_dropout=0.0, bias="none",
                     use_rslora=rslora, init_lora_weights=True)
    tiny = _Tiny(base)
    # transformers sets this on a model loaded in 4 bit; PEFT then wraps Linear4bit in its bnb layer
    tiny.is_loaded_in_4bit = isinstance(base, bnb.nn.Linear4bit)
    model = get_peft_model(tiny, cfg)
    layer = model.base_model.model.proj
    with torch.no_grad():  # PEFT starts B at 0; a trained B is not, and dA would be 0 with B = 0
        layer.lora_B["default"].weight.normal_(0.0, 0.5)
    return model, layer


def _close_or_equal(name, got, ref_lowp, ref_exact):
    """Bit-equal on the CPU (same dtypes, same PyTorch kernels: checked). On a GPU, cuBLAS may pick
    different kernels for differently strided operands, so there the tolerance rule applies:
    |got - exact| <= 2 |ref_lowp - exact| + small atol."""
    assert got.dtype == ref_lowp.dtype, f"{name}: dtype {got.dtype} != reference {ref_lowp.dtype}"
    if torch.equal(got, ref_lowp):
        return
    if ON_GPU:
        assert_within_rule(name, got, ref_exact, ref_lowp, atol=1e-6)
        return
    diff = (got.double() - ref_lowp.double()).abs()
    idx = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
    raise AssertionError(f"{name}: PEFT and the reference differ in {(diff > 0).sum().item()} of {diff.numel()} "
                         f"elements; worst at {idx}: PEFT {got[idx].item()!r}, reference {ref_lowp[idx].item()!r}")


def _reference_and_grads(x, w, A, B, s, bias, dy, **kw):
    xr = x.detach().clone().requires_grad_()
    Ar = A.detach().clone().requires_grad_()
    Br = B.detach().clone().requires_grad_()
    y = ref.lora_linear(xr, w, Ar, Br, s, bias, **kw)
    y.backward(dy)
    return y.detach(), xr.grad, Ar.grad, Br.grad


def _exact(x, w, A, B, s, bias, dy):
    y = ref.lora_linear(x.double(), w.double(), A.double(), B.double(), s,
                        None if bias is None else bias.double())
    return (y, *ref.lora_linear_backward(dy.double(), x.double(), w.double(), A.double(), B.double(), s))


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_matches_peft_linear4bit(rslora):
    base = bnb.nn.Linear4bit(K, N, bias=True, compute_dtype=torch.bfloat16, quant_type="nf4",
                             compress_statistics=True, quant_storage=torch.uint8)
    with torch.no_grad():
        base.bias.normal_()
    base = base.to(DEVICE)                       # quantizes
    model, layer = _peft(base, rslora=rslora)
    assert isinstance(layer, PeftLinear4bit), type(layer)
    A = layer.lora_A["default"].weight
    B = layer.lora_B["default"].weight
    s = layer.scaling["default"]
    assert A.dtype == torch.float32 and B.dtype == torch.float32   # PEFT upcasts adapters to fp32
    assert s == pytest.approx(16 / math.sqrt(R) if rslora else 16 / R)

    x = torch.randn(*LEAD, K, device=DEVICE).to(torch.bfloat16)
    dy = torch.randn(*LEAD, N, device=DEVICE).to(torch.bfloat16)
    xp = x.clone().requires_grad_()
    y = model(xp)
    y.backward(dy)
    assert y.dtype == torch.bfloat16

    # what bitsandbytes multiplies with: W dequantized, in x's dtype; the bias in the compute dtype
    w = bnb.functional.dequantize_4bit(base.weight, base.weight.quant_state).to(torch.bfloat16)
    bias = base.bias.to(torch.bfloat16)
    y_ref, dx_ref, dA_ref, dB_ref = _reference_and_grads(x, w, A, B, s, bias, dy)
    y_ex, dx_ex, dA_ex, dB_ex = _exact(x, w, A, B, s, bias, dy)

    _close_or_equal("Y", y, y_ref, y_ex)
    _close_or_equal("dX", xp.grad, dx_ref, dx_ex)
    _close_or_equal("dA", A.grad, dA_ref, dA_ex)
    _close_or_equal("dB", B.grad, dB_ref, dB_ex)
    assert base.weight.grad is None and not base.weight.requires_grad
    # the comparison can tell the two PEFT layers' ways of adding the fp32 LoRA term apart
    y_dense_rule = ref.lora_linear(x, w, A.detach(), B.detach(), s, bias, peft_layer="linear")
    assert not torch.equal(y.detach(), y_dense_rule), "one rounding instead of two went unseen"


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_matches_peft_dense_linear(rslora):
    base = nn.Linear(K, N, bias=True, device=DEVICE, dtype=torch.bfloat16)
    model, layer = _peft(base, rslora=rslora)
    assert isinstance(layer, PeftLinear) and not isinstance(layer, PeftLinear4bit), type(layer)
    A = layer.lora_A["default"].weight
    B = layer.lora_B["default"].weight
    s = layer.scaling["default"]
    assert A.dtype == torch.float32

    x = torch.randn(*LEAD, K, device=DEVICE).to(torch.bfloat16)
    dy = torch.randn(*LEAD, N, device=DEVICE).to(torch.bfloat16)
    xp = x.clone().requires_grad_()
    y = model(xp)
    y.backward(dy)
    assert y.dtype == torch.bfloat16

    w, bias = base.weight.detach(), base.bias.detach()
    y_ref, dx_ref, dA_ref, dB_ref = _reference_and_grads(x, w, A, B, s, bias, dy, peft_layer="linear")
    y_ex, dx_ex, dA_ex, dB_ex = _exact(x, w, A, B, s, bias, dy)

    _close_or_equal("Y", y, y_ref, y_ex)
    _close_or_equal("dX", xp.grad, dx_ref, dx_ex)
    _close_or_equal("dA", A.grad, dA_ref, dA_ex)
    _close_or_equal("dB", B.grad, dB_ref, dB_ex)
    # the comparison can tell the two PEFT layers' ways of adding the fp32 LoRA term apart
    y_4bit_rule = ref.lora_linear(x, w, A.detach(), B.detach(), s, bias, peft_layer="linear4bit")
    assert not torch.equal(y.detach(), y_4bit_rule), "bf16 rounding of the LoRA term before the add went unseen"


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("shape", [((7,), 33, 17, 4), ((2, 3), 64, 48, 8)], ids=["M7", "M6x"])
def test_backward_formulas_match_autograd(shape, p):
    lead, K_, N_, r = shape
    x = torch.randn(*lead, K_, dtype=torch.float64, device=DEVICE)
    w = torch.randn(N_, K_, dtype=torch.float64, device=DEVICE)
    A = torch.randn(r, K_, dtype=torch.float64, device=DEVICE, requires_grad=True)
    B = torch.randn(N_, r, dtype=torch.float64, device=DEVICE, requires_grad=True)
    bias = torch.randn(N_, dtype=torch.float64, device=DEVICE)
    dy = torch.randn(*lead, N_, dtype=torch.float64, device=DEVICE)
    keep = torch.rand(*lead, K_, device=DEVICE) >= p if p > 0 else None
    s = 16 / math.sqrt(r)
    xg = x.clone().requires_grad_()

    y = ref.lora_linear(xg, w, A, B, s, bias, keep, p)
    y.backward(dy)
    dx, dA, dB = ref.lora_linear_backward(dy, x, w, A.detach(), B.detach(), s, keep, p)

    for name, got, want in [("dX", dx, xg.grad), ("dA", dA, A.grad), ("dB", dB, B.grad)]:
        assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != autograd {tuple(want.shape)}"
        err = (got - want).abs()
        tol = 1e-12 * max(1.0, want.abs().max().item())
        assert err.max() <= tol, (f"{name}: formula vs autograd differ by {err.max().item():.3e} at "
                                  f"{tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape))} "
                                  f"(tolerance {tol:.1e})")


def test_dropout_mask_is_applied_and_rescaled():
    """D(x) zeroes dropped values and scales kept ones by 1/(1-p) (the known peer bug omits it)."""
    x = torch.randn(4, 16, dtype=torch.float64)
    keep = torch.rand(4, 16) >= 0.25
    d = ref.dropout(x, keep, 0.25)
    assert torch.equal(d[~keep], torch.zeros_like(d[~keep]))
    assert torch.equal(d[keep], x[keep] / 0.75)
    assert ref.dropout(x, None, 0.0) is x
    # and lora_linear uses it: with every element dropped, only the base term is left
    w, A, B = torch.randn(8, 16, dtype=torch.float64), torch.randn(2, 16, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    none_kept = torch.zeros(4, 16, dtype=torch.bool)
    assert torch.equal(ref.lora_linear(x, w, A, B, 2.0, None, none_kept, 0.5), x @ w.t())
    assert not torch.equal(ref.lora_linear(x, w, A, B, 2.0, None, keep, 0.5), x @ w.t())


def test_peft_dropout_matches_reference_with_its_mask():
    """PEFT's nn.Dropout with a fixed RNG state gives a mask; the reference fed that mask agrees."""
    base = nn.Linear(32, 24, bias=False, dtype=torch.float64, device=DEVICE)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], lora_dropout=0.4, init_lora_weights=False)
    model = get_peft_model(_Tiny(base), cfg).train()
    layer = model.base_model.model.proj
    A, B, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    x = torch.randn(5, 32, dtype=torch.float64, device=DEVICE)
    torch.manual_seed(7)
    y = model(x)
    torch.manual_seed(7)
    keep = layer.lora_dropout["default"](torch.ones_like(x)) != 0     # the same draw, as a mask
    y_ref = ref.lora_linear(x, base.weight.detach(), A.detach(), B.detach(), s, None, keep, 0.4)
    err = (y.detach() - y_ref).abs().max().item()
    assert err <= 1e-12, f"PEFT with dropout 0.4 vs reference with its mask: max error {err:.3e}"
