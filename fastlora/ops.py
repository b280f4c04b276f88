"""``fastlora.lora_linear``: one PEFT LoRA layer as one autograd op over fused Triton kernels.

    Y = X·Wᵀ + bias + s·(D(X)·Aᵀ)·Bᵀ        W frozen: bitsandbytes 4-bit, or a dense fp16/bf16/fp32 tensor

Two strategies compute the frozen product (``choose_strategy`` picks one per call):

- ``"fused"``: W's 4-bit tiles are decoded inside the GEMM's main loop, forward (X·Wᵀ) and backward
  (dY·W); no [N, K] floating copy of W ever exists. The LoRA term, the bias and (backward) the
  dropout mask are applied in the same kernel's epilogue.
- ``"dequant"``: W is dequantized by fastlora's kernel into a temporary, multiplied with
  cuBLAS (with the bias, as bitsandbytes' own path does), and the temporary is freed at once;
  backward dequantizes again. The LoRA term and the mask are still added by the kernel's epilogue,
  in place on the cuBLAS output.

The LoRA products (H = D(X)·Aᵀ, G = dY·B, dA, dB) run through the same kernel in fp32 with IEEE
precision, as PEFT's fp32 adapters do under PyTorch's default (no TF32) matmul.
"""

from __future__ import annotations

import contextlib
from typing import Any, Optional

import torch

from .format import from_bnb
from .kernels.lora_matmul import DROP_AOP, DROP_EPILOGUE, DROP_NONE, DROP_W, lora_matmul, seed_tensor
from .kernels._launch import launch_target
from .kernels.quant4 import Packed4bit, dequantize_4bit

STRATEGIES = ("fused", "dequant")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# The M (tokens) at and above which "dequant" is chosen. A heuristic until the GPU measurements of
# the layer benchmark replace it: at small M the layer is memory bound and reading W as 4 bits inside
# the GEMM wins; at large M it is tensor-core bound, where cuBLAS on a dequantized W is the floor
# (bitsandbytes' own fused 4-bit inference GEMM stops at M = 1536 for the same reason).
DEQUANT_MIN_TOKENS = 1024


def choose_strategy(M: int, N: int, K: int, quantized: bool, device: torch.device, target=None) -> str:
    """The one rule that picks a strategy for a layer call (see DEQUANT_MIN_TOKENS). For a dense base,
    "dequant" means cuBLAS on the weight as it is. ``target`` (a ``kernels.targets.Target``) defaults
    to the device's (``kernels._launch.launch_target``): below compute capability 8.0 Triton lowers
    ``tl.dot`` to FMA instructions (no tensor cores), so there the frozen product always goes to cuBLAS."""
    if target is None:
        target = launch_target(device)
    if target is not None and target.cc < 80:
        return "dequant"
    return "fused" if M < DEQUANT_MIN_TOKENS else "dequant"


def _check_target_dtype(device, compute_dtype, x_dtype) -> None:
    """bf16 needs compute capability 8.0 (no bf16 tensor cores before Ampere; torch reports
    ``is_bf16_supported() == False`` there and bitsandbytes' bf16 compute is not supported either)."""
    target = launch_target(device)
    if target is not None and not target.has_bf16 and torch.bfloat16 in (compute_dtype, x_dtype):
        raise TypeError(f"bfloat16 is not supported on {target.name} ({target.gpu}): compute capability 8.0 or "
                        "newer is needed; use float16 (fp16=True in the Trainer, bnb_4bit_compute_dtype=float16)")


def _frozen_product(a, w, out, *, trans_w, compute_dtype, strategy, bias=None, **epilogue):
    """out = a · (Wᵀ or W) + bias + epilogue, by the chosen strategy.

    Where ``out`` is wider than ``compute_dtype`` the frozen product (+ bias) is rounded to
    ``compute_dtype`` before the LoRA term is added: bitsandbytes returns X·Wᵀ + bias rounded to its
    compute dtype and PEFT adds the LoRA term to that, so both strategies give PEFT's rounding.
    """
    round_base = out.dtype != compute_dtype and compute_dtype != torch.float32
    if strategy == "fused":
        return lora_matmul(a, w, out, trans_w=trans_w, compute_dtype=compute_dtype, bias=bias,
                           round_base=round_base, **epilogue)
    # autocast would re-cast the cuBLAS product; the dtypes here are explicit ("meta": fastlora
    # inspect records the launches of a call on shape-only tensors, which autocast does not know)
    no_autocast = (torch.autocast(device_type=a.device.type, enabled=False) if a.device.type != "meta"
                   else contextlib.nullcontext())
    with no_autocast:
        wd = dequantize_4bit(w, compute_dtype) if isinstance(w, Packed4bit) else w.to(compute_dtype)
        a_c = a.to(compute_dtype)
        wt = wd if trans_w else wd.t()
        direct = out.dtype == compute_dtype and out.is_contiguous()
        if bias is not None:
            b = bias.to(compute_dtype)
            prod = torch.addmm(b, a_c, wt, out=out) if direct else torch.addmm(b, a_c, wt)
        else:
            prod = torch.matmul(a_c, wt, out=out) if direct else torch.matmul(a_c, wt)
        if not direct:
            out.copy_(prod)
        del wd, wt, a_c, prod  # the [N, K] temporary lives only for this one product
    return lora_matmul(a, w, out, trans_w=trans_w, compute_dtype=compute_dtype, accumulate=True,
                       skip_main=True, **epilogue)


class _LoRALinearFn(torch.autograd.Function):
    """Saves for backward: X (as given, no copy), H = D(X)·Aᵀ [M, r] fp32, the dropout seed (int64 [1]
    on the device), and references to A, B and the frozen weight (the module's own storage; never a
    dequantized W)."""

    @staticmethod
    def forward(ctx, x2, lora_A, lora_B, w, bias, scaling, dropout_p, seed, compute_dtype, strategy):
        M, K = x2.shape
        r = lora_A.shape[0]
        N = lora_B.shape[0]
        drop = dropout_p > 0.0
        h = torch.empty((M, r), dtype=torch.float32, device=x2.device)
        lora_matmul(x2, lora_A, h, trans_w=False, compute_dtype=torch.float32,
                    dropout=DROP_AOP if drop else DROP_NONE, dropout_p=dropout_p, seed=seed)
        y = torch.empty((M, N), dtype=x2.dtype, device=x2.device)
        _frozen_product(x2, w, y, trans_w=False, compute_dtype=compute_dtype, strategy=strategy,
                        lora_l=h, lora_r=lora_B.t(), lora_scale=scaling, bias=bias)
        ctx.save_for_backward(x2, h, lora_A, lora_B, seed)
        ctx.w = w
        ctx.cfg = (scaling, dropout_p, compute_dtype, strategy)
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, h, lora_A, lora_B, seed = ctx.saved_tensors
        w = ctx.w
        scaling, dropout_p, compute_dtype, strategy = ctx.cfg
        drop = dropout_p > 0.0
        M, K = x2.shape
        N, r = lora_B.shape
        need_x, need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        dx = dA = dB = None
        g = None
        if need_x or need_a:
            g = torch.empty((M, r), dtype=torch.float32, device=dy.device)   # G = dY·B
            lora_matmul(dy, lora_B, g, trans_w=True, compute_dtype=torch.float32)
        if need_x:
            dx = torch.empty((M, K), dtype=x2.dtype, device=dy.device)
            _frozen_product(dy, w, dx, trans_w=True, compute_dtype=compute_dtype, strategy=strategy,
                            lora_l=g, lora_r=lora_A, lora_scale=scaling,
                            dropout=DROP_EPILOGUE if drop else DROP_NONE, dropout_p=dropout_p, seed=seed)
        if need_a:
            dA = torch.empty((r, K), dtype=torch.float32, device=dy.device)   # s·Gᵀ·D(X)
            lora_matmul(g.t(), x2, dA, trans_w=True, compute_dtype=torch.float32, out_scale=scaling,
                        dropout=DROP_W if drop else DROP_NONE, dropout_p=dropout_p, seed=seed)
            dA = dA.to(lora_A.dtype)
        if need_b:
            dB = torch.empty((N, r), dtype=torch.float32, device=dy.device)   # s·dYᵀ·H
            lora_matmul(dy.t(), h, dB, trans_w=True, compute_dtype=torch.float32, out_scale=scaling)
            dB = dB.to(lora_B.dtype)
        return dx, dA, dB, None, None, None, None, None, None, None


def _check(x, w, N, K, lora_A, lora_B, bias, compute_dtype, dropout_p, strategy):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"x must be [..., {K}] (in_features of the weight), got {tuple(x.shape)}")
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{name} must be a 2-D tensor")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
    r = lora_A.shape[0]
    if tuple(lora_A.shape) != (r, K) or tuple(lora_B.shape) != (N, r):
        raise ValueError(
            f"LoRA shapes do not fit the base weight [{N}, {K}]: lora_A {tuple(lora_A.shape)} must be [r, {K}], "
            f"lora_B {tuple(lora_B.shape)} must be [{N}, r]"
        )
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"bias must be [{N}], got {tuple(bias.shape)}")
    if compute_dtype not in FLOAT_DTYPES:
        raise TypeError(f"compute_dtype must be float16, bfloat16 or float32, got {compute_dtype}")
    if not (0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if strategy not in STRATEGIES + ("auto",):
        raise ValueError(f"strategy must be one of {STRATEGIES + ('auto',)}, got {strategy!r}")
    dev = x.device
    for name, t in (("weight", w.packed if isinstance(w, Packed4bit) else w), ("lora_A", lora_A),
                    ("lora_B", lora_B), ("bias", bias)):
        if t is not None and t.device != dev:
            raise ValueError(f"x is on {dev} but {name} is on {t.device}: move them to one device")
    for name, t in (("weight", w if isinstance(w, torch.Tensor) else None), ("bias", bias)):
        if t is not None and t.requires_grad:
            raise ValueError(f"the base {name} requires grad, but fastlora treats the base layer as frozen "
                             "(as PEFT's LoRA does); set requires_grad=False or use PEFT's own forward")


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    *,
    bias: Optional[torch.Tensor] = None,
    quant_state: Any = None,
    dropout_p: float = 0.0,
    compute_dtype: Optional[torch.dtype] = None,
    strategy: str = "auto",
    seed: Optional[int] = None,
) -> torch.Tensor:
    """What a PEFT LoRA layer computes, as one fused autograd op.

    x:           [..., K], float16 / bfloat16 / float32 (any strides)
    weight:      the frozen base weight: a bitsandbytes 4-bit packed weight (``Params4bit``, with
                 ``quant_state`` given or attached), a :class:`~fastlora.kernels.quant4.Packed4bit`,
                 or a dense [N, K] tensor
    lora_A:      [r, K]; lora_B: [N, r] (fp32 or x's dtype; they get gradients)
    scaling:     PEFT's ``layer.scaling[adapter]`` (alpha/r, or alpha/sqrt(r) with rsLoRA)
    bias:        [N] base bias or None (frozen)
    dropout_p:   LoRA dropout probability (0 in eval); kept values scaled by 1/(1-p)
    compute_dtype: dtype of the frozen product (bitsandbytes' compute_dtype); default x.dtype
    strategy:    "fused", "dequant" or "auto" (see :func:`choose_strategy`)
    seed:        dropout seed (int); when None it is drawn on x's device from that device's generator
                 (no host sync; ``torch.manual_seed`` and activation checkpointing, which restores
                 that generator, reproduce the mask; the CPU random stream is left alone on a GPU)
    Returns [..., N] in x's dtype. No gradient flows to weight or bias.
    """
    if isinstance(weight, Packed4bit):
        w = weight
    elif quant_state is not None or getattr(weight, "quant_state", None) is not None:
        w = from_bnb(weight, quant_state if quant_state is not None else weight.quant_state)
    else:
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.dtype not in FLOAT_DTYPES:
            raise TypeError(
                "weight must be a bitsandbytes 4-bit weight (with its quant_state) or a dense 2-D float tensor, got "
                f"{type(weight).__name__} {getattr(weight, 'dtype', '')} {tuple(getattr(weight, 'shape', ()))}"
            )
        w = weight
    N, K = (w.N, w.K) if isinstance(w, Packed4bit) else tuple(w.shape)
    if compute_dtype is None:
        compute_dtype = x.dtype if isinstance(w, Packed4bit) else w.dtype
    _check(x, w, N, K, lora_A, lora_B, bias, compute_dtype, float(dropout_p), strategy)
    _check_target_dtype(x.device, compute_dtype, x.dtype)
    scaling = float(scaling)
    dropout_p = float(dropout_p)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)  # a view whenever x's strides allow it
    M = x2.shape[0]
    if strategy == "auto":
        strategy = choose_strategy(M, N, K, isinstance(w, Packed4bit), x.device)
    if dropout_p == 0.0:
        seed_t = None
    elif seed is None:
        seed_t = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=x.device)
    else:
        seed_t = seed_tensor(seed, x.device)
    y = _LoRALinearFn.apply(x2, lora_A, lora_B, w, bias, scaling, dropout_p, seed_t, compute_dtype, strategy)
    return y.reshape(*lead, N)
