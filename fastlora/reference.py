"""The pure-PyTorch reference: what fastlora's kernels must compute. Tests and benchmarks import it.

Nothing here is fast. Every function is written to be read against ``DESIGN``'s formulas and
PEFT's code:

    forward   Y  = X·Wᵀ + bias + s · (D(X)·Aᵀ)·Bᵀ          A: [r, K], B: [N, r]
    backward  dX = dY·W + D'( s · (dY·B)·A )
              dA = s · (dY·B)ᵀ · D(X)
              dB = s · dYᵀ · H,        H = D(X)·Aᵀ

D is dropout: kept values scaled by 1/(1-p). The reference takes the keep-mask explicitly, so a
test can hand it the very mask a kernel drew.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .kernels.quant4 import Packed4bit


def dequantize_4bit(q: Packed4bit, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W [N, K] from a Packed4bit, step by step as bitsandbytes defines it."""
    numel = q.N * q.K
    packed = q.packed.to(torch.int32)
    nibbles = torch.stack([(packed >> 4) & 0xF, packed & 0xF], dim=1).reshape(-1)[:numel]  # high first
    values = q.code[nibbles]                                                     # fp32
    if q.nested:
        absmax = q.code2[q.absmax.to(torch.long)]
        scale2 = q.absmax2.repeat_interleave(q.blocksize2)[: absmax.numel()]
        absmax = absmax * scale2          # rounded to fp32 ...
        absmax = absmax + q.offset        # ... then the offset added: two roundings, as bitsandbytes
    else:
        absmax = q.absmax
    block = torch.arange(numel, device=values.device) // q.blocksize
    return (values * absmax[block]).reshape(q.N, q.K).to(dtype)


def dropout(x: torch.Tensor, keep: Optional[torch.Tensor], p: float) -> torch.Tensor:
    """D(x): zero where ``keep`` is False, scale the rest by 1/(1-p). Identity when p == 0."""
    if p == 0.0 or keep is None:
        return x
    return torch.where(keep, x / (1.0 - p), torch.zeros((), dtype=x.dtype, device=x.device))


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    bias: Optional[torch.Tensor] = None,
    keep: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    *,
    peft_layer: str = "linear4bit",
) -> torch.Tensor:
    """PEFT's LoRA forward over a dense (already dequantized) base weight, in PEFT's dtypes.

    x [..., K] in the activation dtype; weight [N, K] in the activation dtype (bitsandbytes
    dequantizes to it); lora_A [r, K], lora_B [N, r] in the adapter dtype; keep [..., K] bool.
    With autocast off, the base result is computed in x's dtype and x is cast to the adapter dtype
    for the LoRA path. The two PEFT layers then add the LoRA output differently:

    - ``peft_layer="linear4bit"`` (``peft.tuners.lora.bnb.Linear4bit``): the LoRA output is cast to
      the result dtype, then added in it (two roundings when the adapters are fp32 and x is bf16);
    - ``peft_layer="linear"`` (``peft.tuners.lora.layer.Linear``): the result is added to the LoRA
      output in the promoted dtype (fp32), and the sum is cast back once.

    With everything in fp32 (or fp64) the two agree; run it so for the exact reference.
    """
    if peft_layer not in ("linear4bit", "linear"):
        raise ValueError(f"peft_layer must be 'linear4bit' or 'linear', got {peft_layer!r}")
    result = torch.nn.functional.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
    xa = dropout(x.to(lora_A.dtype), keep, dropout_p)
    lora = (xa @ lora_A.t()) @ lora_B.t() * scaling
    if peft_layer == "linear":
        return (result + lora).to(result.dtype)
    return result + lora.to(result.dtype)


def lora_linear_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    keep: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
):
    """(dX, dA, dB) by DESIGN's formulas, everything in dy's dtype (use fp32/fp64)."""
    K = x.shape[-1]
    N = dy.shape[-1]
    x2 = x.reshape(-1, K).to(dy.dtype)
    dy2 = dy.reshape(-1, N)
    dx_keep = None if keep is None else keep.reshape(-1, K)
    A, B, W = lora_A.to(dy.dtype), lora_B.to(dy.dtype), weight.to(dy.dtype)
    dx_in = dropout(x2, dx_keep, dropout_p)          # D(X)
    h = dx_in @ A.t()                                 # H = D(X)·Aᵀ     [M, r]
    g = dy2 @ B                                       # G = dY·B        [M, r]
    dx = dy2 @ W + dropout(scaling * (g @ A), dx_keep, dropout_p)
    dA = scaling * g.t() @ dx_in
    dB = scaling * dy2.t() @ h
    return dx.reshape(x.shape), dA, dB


def tolerance_rule(out: torch.Tensor, exact: torch.Tensor, lowp: torch.Tensor, atol: float = 1e-5,
                   factor: float = 2.0):
    """The project's tolerance rule (flash-attention's): a result ``out`` is right when

        max|out - exact| <= factor · max|lowp - exact| + atol · max(1, max|exact|)

    where ``exact`` is this module's answer in fp64 (or fp32) and ``lowp`` plain PyTorch's answer in
    the same low precision as ``out``. Returns (worst error, bound, index of the worst element); a
    non-finite element of ``out`` is an infinite error at its index; an empty tensor gives
    (0.0, atol, None). Raises ValueError when the shapes differ."""
    out, exact, lowp = out.detach().double(), exact.detach().double(), lowp.detach().double()
    if out.shape != exact.shape:
        raise ValueError(f"shape {tuple(out.shape)} != reference {tuple(exact.shape)}")
    if out.numel() == 0:
        return 0.0, atol, None
    err_lowp = (lowp - exact).abs().max().item()
    bound = factor * err_lowp + atol * max(1.0, exact.abs().max().item())
    err = (out - exact).abs()
    bad = ~torch.isfinite(out)
    flat = int(bad.reshape(-1).nonzero()[0].item()) if bad.any() else int(err.argmax().item())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), out.shape))
    return (math.inf if bad.any() else err.reshape(-1)[flat].item()), bound, index
