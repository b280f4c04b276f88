"""The fused LoRA layer op (fastlora.lora_linear): output and every gradient against the reference.

Each case compares the kernel with an exact (float64) evaluation of the reference module on the same
quantized weight, within 2x the error plain PyTorch makes in PEFT's own low precision (plus a small
atol), for Y, dX, dA and dB. Dropout cases hand the reference the very keep-mask the kernel draws.
"""

from __future__ import annotations

import math

import bitsandbytes.functional as bnbF
import pytest
import torch
from helpers import DEVICE, ON_GPU, assert_within_rule

import fastlora
from fastlora import reference as ref
from fastlora.kernels.lora_matmul import dropout_keep_mask
from peft import LoraConfig

SEED = 1234


def _quantize(N, K, dtype, quant_type="nf4", nested=True, blocksize=64):
    w = torch.randn(N, K, device=DEVICE, dtype=torch.float32) * (1.0 / math.sqrt(K))
    packed, qs = bnbF.quantize_4bit(w.to(dtype), blocksize=blocksize, quant_type=quant_type,
                                    compress_statistics=nested)
    return packed, qs


def _case(M, K, N, r, *, xdtype=torch.bfloat16, adtype=torch.float32, bias=True, p=0.0, nested=True,
          quant_type="nf4", strategy="fused", rslora=False, blocksize=64, dense=False, lead=None, ldtype=None):
    """ldtype: the op's lora_dtype (None: its default, the adapters' dtype); the low-precision
    reference runs the adapter path in it, as PEFT under autocast does (A and B cast to it, x cast
    to it after the dropout)."""
    alpha = 16
    scaling = alpha / math.sqrt(r) if rslora else alpha / r
    if dense:
        weight = (torch.randn(N, K, device=DEVICE) / math.sqrt(K)).to(xdtype)
        qs = None
        w_exact = weight.double()
        w_lowp = weight
    else:
        weight, qs = _quantize(N, K, xdtype, quant_type, nested, blocksize)
        w_lowp = bnbF.dequantize_4bit(weight, qs).to(xdtype)       # what bitsandbytes multiplies with
        w_exact = w_lowp.double()
    shape = (M, K) if lead is None else (*lead, K)
    x = torch.randn(*shape, device=DEVICE).to(xdtype)
    A = (torch.randn(r, K, device=DEVICE) / math.sqrt(K)).to(adtype)
    B = (torch.randn(N, r, device=DEVICE) * 0.5).to(adtype)  # PEFT inits B = 0; trained B is not
    b = torch.randn(N, device=DEVICE).to(xdtype) if bias else None
    dy = torch.randn(*shape[:-1], N, device=DEVICE).to(xdtype)
    Mflat = x.numel() // K
    keep = dropout_keep_mask(Mflat, K, p, SEED, DEVICE).reshape(shape) if p > 0 else None

    # the kernel
    xk = x.clone().requires_grad_()
    Ak, Bk = A.clone().requires_grad_(), B.clone().requires_grad_()
    y = fastlora.lora_linear(xk, weight, Ak, Bk, scaling, bias=b, quant_state=qs, dropout_p=p,
                             strategy=strategy, seed=SEED, lora_dtype=ldtype)
    y.backward(dy)

    # exact: float64, same quantized weight, same mask
    bd = None if b is None else b.double()
    y_ex = ref.lora_linear(x.double(), w_exact, A.double(), B.double(), scaling, bd, keep, p)
    dx_ex, dA_ex, dB_ex = ref.lora_linear_backward(dy.double(), x.double(), w_exact, A.double(), B.double(),
                                                   scaling, keep, p)

    # PyTorch in PEFT's precision: base in x's dtype, LoRA path in the adapter dtype
    xl = x.clone().requires_grad_()
    Al, Bl = A.clone().requires_grad_(), B.clone().requires_grad_()
    ld = ldtype or A.dtype
    y_lp = ref.lora_linear(xl, w_lowp, Al.to(ld), Bl.to(ld), scaling, b, keep, p)
    y_lp.backward(dy)

    assert y.dtype == x.dtype and y.shape == (*shape[:-1], N)
    assert xk.grad.dtype == x.dtype and Ak.grad.dtype == A.dtype and Bk.grad.dtype == B.dtype
    assert_within_rule("Y", y, y_ex, y_lp)
    assert_within_rule("dX", xk.grad, dx_ex, xl.grad)
    assert_within_rule("dA", Ak.grad, dA_ex, Al.grad)
    assert_within_rule("dB", Bk.grad, dB_ex, Bl.grad)


# Shapes: K and N not powers of two, multiples of the blocksize (128, 192) and not (96, 80, 200).
BASE = dict(M=37, K=96, N=80, r=8)
if ON_GPU:
    BASE = dict(M=37, K=1000, N=1536, r=8)


@pytest.mark.parametrize("strategy", ["fused", "dequant"])
@pytest.mark.parametrize("M", [1, 37, 128] + ([2048] if ON_GPU else []))
def test_tokens(M, strategy):
    _case(M, BASE["K"], BASE["N"], BASE["r"], strategy=strategy)


@pytest.mark.parametrize("strategy", ["fused", "dequant"])
@pytest.mark.parametrize("K,N", [(128, 192), (200, 80), (64, 1), (130, 45)])
def test_shapes(K, N, strategy):
    _case(19, K, N, 8, strategy=strategy)


@pytest.mark.parametrize("r", [1, 8, 16, 64, 100])
@pytest.mark.parametrize("rslora", [False, True])
def test_ranks_and_scaling(r, rslora):
    _case(23, BASE["K"], BASE["N"], r, rslora=rslora)


@pytest.mark.parametrize("strategy", ["fused", "dequant"])
@pytest.mark.parametrize("xdtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("adtype", ["fp32", "x"])
def test_dtypes(xdtype, adtype, strategy):
    _case(21, BASE["K"], BASE["N"], 8, xdtype=xdtype, adtype=torch.float32 if adtype == "fp32" else xdtype,
          strategy=strategy)


@pytest.mark.parametrize("strategy", ["fused", "dequant"])
@pytest.mark.parametrize("xdtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("p", [0.0, 0.05])
def test_adapters_in_autocast_dtype(xdtype, p, strategy):
    """fp32 adapters run in 16 bits, as PEFT runs them under autocast (lora_dtype = the autocast
    dtype: tensor-core products, H and G kept in 16 bits): every gradient within the rule against
    PyTorch doing the same in that dtype."""
    ld = torch.float16 if xdtype == torch.float16 else torch.bfloat16
    _case(35, BASE["K"], BASE["N"], 16, xdtype=xdtype, p=p, strategy=strategy, ldtype=ld)


@pytest.mark.parametrize("M,r", [(1, 1), (37, 100), (130, 16)])
def test_adapters_in_16_bits_ranks_and_tokens(M, r):
    """The 16-bit adapter products at M = 1, a rank that is no power of two and one past a tile."""
    _case(M, BASE["K"], BASE["N"], r, ldtype=torch.bfloat16, p=0.05)


def test_lora_dtype_changes_the_adapter_path_only():
    """lora_dtype decides the adapter products' precision: fp32 and bf16 adapters products give
    different low bits (so the argument is really honoured), and the frozen product is the same."""
    torch.manual_seed(SEED)
    weight, qs = _quantize(64, 128, torch.bfloat16)
    x = torch.randn(9, 128, device=DEVICE, dtype=torch.bfloat16)
    A = torch.randn(8, 128, device=DEVICE) / 11
    B = torch.randn(64, 8, device=DEVICE)
    y32 = fastlora.lora_linear(x, weight, A, B, 2.0, quant_state=qs, lora_dtype=torch.float32)
    y16 = fastlora.lora_linear(x, weight, A, B, 2.0, quant_state=qs, lora_dtype=torch.bfloat16)
    y0 = fastlora.lora_linear(x, weight, A, B * 0, 2.0, quant_state=qs, lora_dtype=torch.bfloat16)
    assert not torch.equal(y32, y16)
    assert torch.equal(y0, fastlora.lora_linear(x, weight, A, B * 0, 2.0, quant_state=qs))
    exact = ref.lora_linear(x.double(), bnbF.dequantize_4bit(weight, qs).double(), A.double(), B.double(), 2.0)
    lowp = ref.lora_linear(x, bnbF.dequantize_4bit(weight, qs), A.to(torch.bfloat16), B.to(torch.bfloat16), 2.0)
    assert_within_rule("Y bf16 adapters", y16, exact, lowp)
    with pytest.raises(TypeError, match="lora_dtype"):
        fastlora.lora_linear(x, weight, A, B, 2.0, quant_state=qs, lora_dtype=torch.int8)


@pytest.mark.parametrize("strategy", ["fused", "dequant"])
@pytest.mark.parametrize("p", [0.0, 0.05, 0.5])
@pytest.mark.parametrize("bias", [True, False])
def test_dropout_and_bias(p, bias, strategy):
    _case(33, BASE["K"], BASE["N"], 8, p=p, bias=bias, strategy=strategy)


@pytest.mark.parametrize("strategy", ["fused", "dequant"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("blocksize", [64, 128])
def test_formats(quant_type, nested, blocksize, strategy):
    _case(17, 130, 60, 8, quant_type=quant_type, nested=nested, blocksize=blocksize, strategy=strategy)


@pytest.mark.parametrize("strategy", ["fused", "dequant"])
@pytest.mark.parametrize("xdtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("p", [0.0, 0.05])
def test_dense_base(xdtype, p, strategy):
    _case(29, BASE["K"], BASE["N"], 16, xdtype=xdtype, p=p, dense=True, strategy=strategy)


@pytest.mark.parametrize("target", ["sm_75", "sm_80", "sm_86", "sm_89", "sm_90"])
@pytest.mark.parametrize("strategy", ["fused", "dequant"])
def test_gpu_tile_sizes(strategy, target):
    """Each GPU family's tiles (from the tables of ``configs.py``) on shapes that leave partial tiles
    in every dimension: under the interpreter too, so CPU runs check the masks and loop trips of the
    tiles each GPU runs."""
    from fastlora.kernels import _launch, configs
    from fastlora.kernels.targets import get_target

    t = get_target(target)
    cfg = configs.select("frozen4", 130, 200, 136, t)
    assert cfg.block_m > 16 or t.cc < 80, "M = 130 must take a large-M row of the table"
    with _launch.tiles_for(target):
        _case(130, 200, 136, 8, p=0.05, strategy=strategy,
              xdtype=torch.bfloat16 if t.has_bf16 else torch.float16)   # no bf16 below sm_80


def test_bf16_below_sm80_is_a_clear_error():
    """On a T4 (sm_75) bf16 is not supported (no bf16 tensor cores; torch.cuda.is_bf16_supported() is
    False there): the op says so, naming the device and what to use instead."""
    from fastlora.kernels import _launch

    K, N, r = BASE["K"], BASE["N"], 8
    packed, qs = _quantize(N, K, torch.bfloat16)
    x = torch.randn(3, K, device=DEVICE).to(torch.bfloat16)
    A, B = torch.randn(r, K, device=DEVICE), torch.randn(N, r, device=DEVICE)
    with _launch.tiles_for("sm_75"), pytest.raises(TypeError, match="bfloat16 is not supported on sm_75.*float16"):
        fastlora.lora_linear(x, packed, A, B, 2.0, quant_state=qs)
    fastlora.lora_linear(x, packed, A, B, 2.0, quant_state=qs)          # the same call elsewhere runs


# (N, K, blocksize, wide): K even and a multiple of the blocksize takes the wide decode (each row run of
# a tile is whole bytes and whole absmax blocks, or lies inside one block); otherwise the per-element
# decode. Under the interpreter BLOCK_I = BLOCK_J = 64, so the cases cover one block per row run
# (64, 64), two blocks per run (blocksize 32), a run inside a block (128), straddling blocks (96) and
# odd K, where a byte holds the last element of one row and the first of the next.
DECODE_CASES = [(80, 128, 64, True), (48, 128, 32, True), (24, 256, 128, True), (80, 96, 64, False),
                (37, 75, 64, False)]


@pytest.mark.parametrize("trans", [False, True], ids=["XWt", "dYW"])
@pytest.mark.parametrize("xdtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("nested", [True, False], ids=["nested", "plain"])
@pytest.mark.parametrize("N,K,blocksize,wide", DECODE_CASES, ids=lambda v: str(v))
def test_decode_paths(N, K, blocksize, wide, nested, xdtype, trans):
    """The frozen product alone (X·Wᵀ, and dY·W as in dX) on both decode paths of the fused kernel,
    against fastlora's reference dequant (a plain PyTorch model of bitsandbytes' layout), within the
    tolerance rule."""
    from fastlora.format import from_bnb
    from fastlora.kernels.lora_matmul import lora_matmul
    from fastlora.kernels.quant4 import wide_decode_ok

    packed, qs = _quantize(N, K, xdtype, "nf4" if nested else "fp4", nested, blocksize)
    q = from_bnb(packed, qs)
    assert wide_decode_ok(q) == wide
    w_lowp = ref.dequantize_4bit(q, xdtype)                                  # [N, K], rounded once
    M = 19
    I, J = (N, K) if trans else (K, N)
    a = torch.randn(M, I, device=DEVICE).to(xdtype)
    out = torch.empty(M, J, device=DEVICE, dtype=xdtype)
    lora_matmul(a, q, out, trans_w=trans, compute_dtype=xdtype)
    t = w_lowp if trans else w_lowp.t()
    assert_within_rule(f"{'dY·W' if trans else 'X·Wᵀ'} ({'wide' if wide else 'per-element'} decode)",
                       out, a.double() @ t.double(), a @ t)


def test_3d_input_and_auto_strategy():
    _case(None, BASE["K"], BASE["N"], 8, lead=(3, 7), strategy="auto", p=0.05)


def test_non_contiguous_x():
    K, N, r = BASE["K"], BASE["N"], 8
    packed, qs = _quantize(N, K, torch.bfloat16)
    xt = torch.randn(K, 13, device=DEVICE).to(torch.bfloat16).t()      # [13, K], strides (1, 13)
    assert not xt.is_contiguous()
    A = torch.randn(r, K, device=DEVICE) * 0.1
    B = torch.randn(N, r, device=DEVICE) * 0.1
    y1 = fastlora.lora_linear(xt, packed, A, B, 2.0, quant_state=qs)
    y2 = fastlora.lora_linear(xt.contiguous(), packed, A, B, 2.0, quant_state=qs)
    assert torch.equal(y1, y2)


def test_empty_batch():
    K, N, r = BASE["K"], BASE["N"], 8
    packed, qs = _quantize(N, K, torch.bfloat16)
    x = torch.randn(0, 5, K, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    A = (torch.randn(r, K, device=DEVICE) * 0.1).requires_grad_()
    B = (torch.randn(N, r, device=DEVICE) * 0.1).requires_grad_()
    y = fastlora.lora_linear(x, packed, A, B, 2.0, quant_state=qs, dropout_p=0.1)
    assert y.shape == (0, 5, N) and y.dtype == torch.bfloat16
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.count_nonzero(A.grad) == 0 and torch.count_nonzero(B.grad) == 0


@pytest.mark.parametrize("strategy", ["fused", "dequant"])
def test_nothing_weight_sized_is_saved(strategy):
    """Backward keeps X, H, the seed and references to the module's own tensors: never a float [N, K]."""
    M, K, N, r = 4, 256, 192, 8
    packed, qs = _quantize(N, K, torch.bfloat16)
    x = torch.randn(M, K, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    A = (torch.randn(r, K, device=DEVICE) * 0.1).requires_grad_()
    B = (torch.randn(N, r, device=DEVICE) * 0.1).requires_grad_()
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fastlora.lora_linear(x, packed, A, B, 2.0, quant_state=qs, dropout_p=0.05, strategy=strategy)
    assert saved, "the op saved nothing: the hook did not see the autograd node"
    # what the node keeps as plain attributes of its context (the hook above does not see those)
    node = y.grad_fn
    # the registered op's node (traced calls) or its eager twin, ops.LoraLinearFunction
    while node is not None and not any(n in type(node).__name__ for n in ("fastlora_lora_linear", "LoraLinearFunction")):
        node = node.next_functions[0][0]
    assert node is not None, "the fused op's autograd node was not found"
    kept = list(saved)
    for value in vars(node).values():
        for t in value if isinstance(value, tuple) else (value,):
            if isinstance(t, torch.Tensor):
                kept.append(t)
    assert any(t.data_ptr() == packed.data_ptr() for t in kept), "the packed weight is not referenced as is"
    big = [(tuple(t.shape), t.dtype) for t in kept if t.is_floating_point() and t.numel() >= N * K]
    assert not big, f"weight-sized float tensors kept for backward: {big}"
    y.sum().backward()


@pytest.mark.parametrize("strategy", ["fused", "dequant"])
def test_wider_activations_round_like_bitsandbytes(strategy):
    """fp32 activations, bf16 compute (after prepare_model_for_kbit_training): bitsandbytes returns
    X·Wᵀ + bias rounded to bf16 and PEFT adds the fp32 LoRA term to that. Both strategies must round
    at the same place, so they agree with PEFT to fp32 precision nearly everywhere (one bf16 ulp where
    a different summation order flips a rounding), not just to half a bf16 ulp."""
    M, K, N, r, s = 37, 96, 80, 8, 2.0
    packed, qs = _quantize(N, K, torch.bfloat16)
    x = torch.randn(M, K, device=DEVICE)
    A = torch.randn(r, K, device=DEVICE) * 0.1
    B = torch.randn(N, r, device=DEVICE) * 0.1
    b = torch.randn(N, device=DEVICE).to(torch.bfloat16)
    y = fastlora.lora_linear(x, packed, A, B, s, bias=b, quant_state=qs, compute_dtype=torch.bfloat16,
                             strategy=strategy)
    assert y.dtype == torch.float32
    wd = bnbF.dequantize_4bit(packed, qs)
    base = torch.nn.functional.linear(x.to(torch.bfloat16), wd, b).float()      # what bitsandbytes returns
    y_peft = base + (x @ A.t()) @ B.t() * s
    diff = (y - y_peft).abs()
    ulp = torch.exp2(torch.floor(torch.log2(base.abs().clamp_min(1e-30))) - 7)   # bf16 spacing at |base|
    tiny = 1e-5 * y_peft.abs().max().item()
    assert (diff <= ulp + tiny).all(), f"differs from PEFT by more than one bf16 ulp: {diff.max().item():.3e}"
    same = (diff <= tiny).float().mean().item()
    assert same > 0.9, f"only {same:.0%} of outputs equal PEFT's to fp32 precision: rounding placed differently"


def test_needs_input_grad_is_honoured():
    K, N, r = BASE["K"], BASE["N"], 8
    packed, qs = _quantize(N, K, torch.bfloat16)
    x = torch.randn(9, K, device=DEVICE, dtype=torch.bfloat16)             # no grad for x
    A = (torch.randn(r, K, device=DEVICE) * 0.1).requires_grad_()
    B = torch.randn(N, r, device=DEVICE) * 0.1                             # frozen B
    y = fastlora.lora_linear(x, packed, A, B, 2.0, quant_state=qs)
    y.float().sum().backward()
    assert A.grad is not None and B.grad is None and x.grad is None


# -- dropout: statistics of the counter-based RNG ----------------------------------------------------


def test_dropout_keep_fraction_and_reproducibility():
    M, K, p = 64, 320, 0.05
    keep = dropout_keep_mask(M, K, p, 7, DEVICE)
    n = keep.numel()
    frac = keep.float().mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(frac - (1 - p)) < 5 * sigma, f"keep fraction {frac:.4f}, expected {1 - p} +- {5 * sigma:.4f}"
    assert torch.equal(keep, dropout_keep_mask(M, K, p, 7, DEVICE)), "same seed must give the same mask"
    other = dropout_keep_mask(M, K, p, 8, DEVICE)
    assert not torch.equal(keep, other), "different seeds gave the same mask"
    # rows and columns are not correlated: each row's and column's keep fraction is plausible
    assert keep.float().mean(1).min().item() > 1 - p - 6 * math.sqrt(p * (1 - p) / K)


@pytest.mark.parametrize("K", [320, 131])
def test_dropout_mask_lanes_are_independent(K):
    """One Philox call serves four neighbouring columns: each of the four lanes keeps 1 - p of its
    elements, and neighbours (the same call's outputs, and the next call's) are uncorrelated."""
    M, p = 192, 0.5
    keep = dropout_keep_mask(M, K, p, 11, DEVICE).float()
    for lane in range(4):
        col = keep[:, lane::4]
        sigma = math.sqrt(p * (1 - p) / col.numel())
        assert abs(col.mean().item() - (1 - p)) < 5 * sigma, (lane, col.mean().item())
    for shift in (1, 2, 3, 4):
        a, b = keep[:, :-shift].flatten() - (1 - p), keep[:, shift:].flatten() - (1 - p)
        corr = (a * b).mean().item() / (p * (1 - p))
        assert abs(corr) < 5 / math.sqrt(a.numel()), (shift, corr)
    # rows do not repeat each other (each row has its own counters, also when K is not a multiple of 4)
    assert not torch.equal(keep[0], keep[1])


@pytest.mark.parametrize("strategy", ["fused", "dequant"])
@pytest.mark.parametrize("K,N", [(130, 45), (131, 40)])
def test_dropout_k_not_multiple_of_four(K, N, strategy):
    """The mask is regenerated in three places (H's input, dA's X, dX's term): with K not a multiple
    of 4 every row's last Philox quad is partial; all gradients still see one mask."""
    _case(19, K, N, 8, p=0.3, strategy=strategy, nested=False, blocksize=64)


def test_dropout_expectation_matches_no_dropout():
    """E over seeds of the dropped-out forward equals the p = 0 forward (unbiased 1/(1-p) rescale)."""
    M, K, N, r, p, S = 8, 64, 32, 8, 0.3, 96
    packed, qs = _quantize(N, K, torch.float32, nested=False)
    x = torch.randn(M, K, device=DEVICE)
    A = torch.randn(r, K, device=DEVICE) * 0.3
    B = torch.randn(N, r, device=DEVICE) * 0.3
    y0 = fastlora.lora_linear(x, packed, A, B, 2.0, quant_state=qs, dropout_p=0.0).double()
    ys = torch.stack([fastlora.lora_linear(x, packed, A, B, 2.0, quant_state=qs, dropout_p=p, seed=s).double()
                      for s in range(S)])
    mean, stderr = ys.mean(0), ys.std(0) / math.sqrt(S)
    z = ((mean - y0).abs() / (stderr + 1e-6)).max().item()
    assert z < 6.0, f"dropout output mean deviates from the p=0 output by {z:.1f} standard errors"
    assert ys.std(0).mean().item() > 0, "dropout changed nothing"


def test_dropout_seed_drawn_from_torch_generator():
    K, N, r = 64, 32, 8
    packed, qs = _quantize(N, K, torch.bfloat16)
    x = torch.randn(8, K, device=DEVICE, dtype=torch.bfloat16)
    A, B = torch.randn(r, K, device=DEVICE), torch.randn(N, r, device=DEVICE)
    torch.manual_seed(5)
    y1 = fastlora.lora_linear(x, packed, A, B, 2.0, quant_state=qs, dropout_p=0.5)
    torch.manual_seed(5)
    y2 = fastlora.lora_linear(x, packed, A, B, 2.0, quant_state=qs, dropout_p=0.5)
    y3 = fastlora.lora_linear(x, packed, A, B, 2.0, quant_state=qs, dropout_p=0.5)
    assert torch.equal(y1, y2) and not torch.equal(y1, y3)


# -- against PEFT's own layers ---------------------------------------------------------------------


def _peft_linear4bit(K, N, r, alpha, bias, use_rslora=False):
    import bitsandbytes as bnb
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    dense = torch.nn.Linear(K, N, bias=bias, dtype=torch.bfloat16)
    base = bnb.nn.Linear4bit(K, N, bias=bias, compute_dtype=torch.bfloat16, quant_type="nf4",
                             compress_statistics=True)
    base.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                    compress_statistics=True)
    if bias:
        base.bias = torch.nn.Parameter(dense.bias.data.clone(), requires_grad=False)
    base = base.to(DEVICE)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, use_rslora=use_rslora)
    layer = LoraLinear4bit(base, "default", config=config, r=r, lora_alpha=alpha, lora_dropout=0.0,
                           use_rslora=use_rslora)
    torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.2)         # trained B is not zero
    return layer.to(DEVICE)


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("strategy", ["fused", "dequant"])
def test_matches_peft_linear4bit(strategy, use_rslora):
    K, N, r = 96, 80, 16
    layer = _peft_linear4bit(K, N, r, 32, bias=True, use_rslora=use_rslora)
    base = layer.base_layer
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    scaling = layer.scaling["default"]
    assert math.isclose(scaling, 32 / math.sqrt(r) if use_rslora else 32 / r)
    x = torch.randn(2, 11, K, device=DEVICE, dtype=torch.bfloat16)
    dy = torch.randn(2, 11, N, device=DEVICE, dtype=torch.bfloat16)

    xp = x.clone().requires_grad_()
    y_peft = layer(xp)
    y_peft.backward(dy)
    g_peft = (xp.grad, A.grad.clone(), B.grad.clone())
    A.grad = B.grad = None

    xk = x.clone().requires_grad_()
    y = fastlora.lora_linear(xk, base.weight, A, B, scaling, bias=base.bias, quant_state=base.weight.quant_state,
                             compute_dtype=base.compute_dtype, strategy=strategy)
    y.backward(dy)
    g = (xk.grad, A.grad, B.grad)

    w = bnbF.dequantize_4bit(base.weight, base.weight.quant_state).double()
    y_ex = ref.lora_linear(x.double(), w, A.double(), B.double(), scaling, base.bias.double())
    g_ex = ref.lora_linear_backward(dy.double(), x.double(), w, A.double(), B.double(), scaling)
    assert y.dtype == y_peft.dtype
    assert_within_rule("Y vs PEFT", y, y_ex, y_peft)
    for name, mine, theirs, exact in zip(("dX", "dA", "dB"), g, g_peft, g_ex):
        assert mine.dtype == theirs.dtype
        assert_within_rule(f"{name} vs PEFT", mine, exact, theirs)


def test_matches_peft_dense_linear():
    from peft.tuners.lora.layer import Linear as LoraLinear

    K, N, r = 96, 80, 8
    base = torch.nn.Linear(K, N, bias=True, dtype=torch.bfloat16, device=DEVICE).requires_grad_(False)
    layer = LoraLinear(base, "default", config=LoraConfig(r=r, lora_alpha=16), r=r, lora_alpha=16, lora_dropout=0.0)
    torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.2)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x = torch.randn(13, K, device=DEVICE, dtype=torch.bfloat16)
    dy = torch.randn(13, N, device=DEVICE, dtype=torch.bfloat16)
    xp = x.clone().requires_grad_()
    layer(xp).backward(dy)
    g_peft = (xp.grad, A.grad.clone(), B.grad.clone())
    A.grad = B.grad = None
    xk = x.clone().requires_grad_()
    y = fastlora.lora_linear(xk, base.weight, A, B, layer.scaling["default"], bias=base.bias)
    y.backward(dy)
    w = base.weight.double()
    g_ex = ref.lora_linear_backward(dy.double(), x.double(), w, A.double(), B.double(), layer.scaling["default"])
    y_ex = ref.lora_linear(x.double(), w, A.double(), B.double(), layer.scaling["default"], base.bias.double())
    with torch.no_grad():
        y_peft = layer(x)
    assert_within_rule("Y vs PEFT", y, y_ex, y_peft)
    for name, mine, theirs, exact in zip(("dX", "dA", "dB"), (xk.grad, A.grad, B.grad), g_peft, g_ex):
        assert_within_rule(f"{name} vs PEFT", mine, exact, theirs)


# -- bad input ---------------------------------------------------------------------------------------


def test_bad_input_messages():
    K, N, r = 64, 32, 4
    packed, qs = _quantize(N, K, torch.bfloat16)
    x = torch.randn(3, K, device=DEVICE, dtype=torch.bfloat16)
    A, B = torch.randn(r, K, device=DEVICE), torch.randn(N, r, device=DEVICE)
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., 64\]"):
        fastlora.lora_linear(torch.randn(3, K + 1, device=DEVICE, dtype=torch.bfloat16), packed, A, B, 1.0,
                             quant_state=qs)
    with pytest.raises(TypeError, match="x must be float16, bfloat16 or float32, got torch.int32"):
        fastlora.lora_linear(x.to(torch.int32), packed, A, B, 1.0, quant_state=qs)
    with pytest.raises(TypeError, match="float64"):
        fastlora.lora_linear(x.double(), packed, A, B, 1.0, quant_state=qs)
    with pytest.raises(ValueError, match="lora_A"):
        fastlora.lora_linear(x, packed, A[:, :-1], B, 1.0, quant_state=qs)
    with pytest.raises(ValueError, match="lora_B"):
        fastlora.lora_linear(x, packed, A, B[:-1], 1.0, quant_state=qs)
    with pytest.raises(ValueError, match="bias must be"):
        fastlora.lora_linear(x, packed, A, B, 1.0, quant_state=qs, bias=torch.zeros(N + 1, device=DEVICE))
    with pytest.raises(ValueError, match="dropout_p"):
        fastlora.lora_linear(x, packed, A, B, 1.0, quant_state=qs, dropout_p=1.0)
    with pytest.raises(ValueError, match="strategy"):
        fastlora.lora_linear(x, packed, A, B, 1.0, quant_state=qs, strategy="fastest")
    with pytest.raises(ValueError, match=r"x is on .* but lora_A is on meta"):
        fastlora.lora_linear(x, packed, A.to("meta"), B, 1.0, quant_state=qs)
    with pytest.raises(TypeError, match="dense 2-D float tensor"):
        fastlora.lora_linear(x, torch.zeros(N, K, dtype=torch.int8, device=DEVICE), A, B, 1.0)
    dense = torch.randn(N, K, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    with pytest.raises(ValueError, match="requires grad"):
        fastlora.lora_linear(x, dense, A, B, 1.0)


def test_bad_argument_types_name_the_argument():
    K, N, r = 64, 32, 4
    packed, qs = _quantize(N, K, torch.bfloat16)
    x = torch.randn(3, K, device=DEVICE, dtype=torch.bfloat16)
    A, B = torch.randn(r, K, device=DEVICE), torch.randn(N, r, device=DEVICE)
    with pytest.raises(TypeError, match="dropout_p must be a real number, got str '0.1'"):
        fastlora.lora_linear(x, packed, A, B, 1.0, quant_state=qs, dropout_p="0.1")
    with pytest.raises(TypeError, match="scaling must be a real number, got str '2'"):
        fastlora.lora_linear(x, packed, A, B, "2", quant_state=qs)
    with pytest.raises(TypeError, match="scaling must be a real number, got NoneType"):
        fastlora.lora_linear(x, packed, A, B, None, quant_state=qs)
    s = torch.tensor(2.0, device=DEVICE, requires_grad=True)
    with pytest.raises(ValueError, match="scaling is a tensor that requires grad"):
        fastlora.lora_linear(x, packed, A, B, s, quant_state=qs)
    with pytest.raises(TypeError, match="scaling must be a number, got a torch.float32 tensor of shape \\(2,\\)"):
        fastlora.lora_linear(x, packed, A, B, torch.ones(2, device=DEVICE), quant_state=qs)
    # a one-element tensor that needs no gradient is read as its value
    y_t = fastlora.lora_linear(x, packed, A, B, s.detach(), quant_state=qs)
    y_f = fastlora.lora_linear(x, packed, A, B, 2.0, quant_state=qs)
    assert torch.equal(y_t, y_f)
    # the seed: an int that fits the kernels' int64
    for bad in (2**63, -(2**63) - 1):
        with pytest.raises(ValueError, match=r"seed must fit in int64.*got " + str(bad)):
            fastlora.lora_linear(x, packed, A, B, 1.0, quant_state=qs, dropout_p=0.1, seed=bad)
    with pytest.raises(TypeError, match="seed must be an int or None, got float"):
        fastlora.lora_linear(x, packed, A, B, 1.0, quant_state=qs, dropout_p=0.1, seed=1.5)
    for edge in (2**63 - 1, -(2**63)):
        y = fastlora.lora_linear(x, packed, A, B, 1.0, quant_state=qs, dropout_p=0.1, seed=edge)
        assert torch.isfinite(y.float()).all()


@pytest.mark.parametrize("bias", [True, False])
def test_zero_input_features(bias):
    """K = 0 is legal for nn.Linear(0, N): Y = bias (or 0), dX is empty, dA is [r, 0], dB is 0."""
    M, N, r = 5, 24, 4
    w = torch.empty(N, 0, device=DEVICE, dtype=torch.float32)
    b = torch.randn(N, device=DEVICE) if bias else None
    x = torch.randn(2, M, 0, device=DEVICE, requires_grad=True)
    A = torch.empty(r, 0, device=DEVICE, requires_grad=True)
    B = torch.randn(N, r, device=DEVICE, requires_grad=True)
    y = fastlora.lora_linear(x, w, A, B, 2.0, bias=b, dropout_p=0.1)
    ref = torch.nn.functional.linear(x, w, b)
    assert y.shape == (2, M, N) and torch.equal(y, ref)
    y.sum().backward()
    assert x.grad.shape == x.shape and A.grad.shape == (r, 0)
    assert torch.count_nonzero(B.grad) == 0
