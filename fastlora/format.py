"""Reading bitsandbytes 4-bit weights into a :class:`fastlora.kernels.quant4.Packed4bit`.

The byte layout itself is drawn in ``kernels/quant4.py``. This module only collects the pieces out
of bitsandbytes' objects, checks that they agree with each other, and never copies or modifies them:

- the packed bytes, whatever ``quant_storage`` dtype holds them (uint8, bf16, fp16, fp32 storage
  hold the same bytes; they are reinterpreted with ``.view(torch.uint8)``), in bitsandbytes 0.50's
  ``(N*K/2, 1)`` layout or the transposed ``(1, N*K/2)`` view earlier releases pass to matmul_4bit;
- N, K from ``quant_state.shape`` (the source of truth), the blocksize, the code table (NF4 or FP4);
- the absmax, plain fp32 or double-quantized (uint8 codes, second-level absmax, table, offset).
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from .kernels.quant4 import Packed4bit

_QUANT_TYPES = ("nf4", "fp4")
_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


def _default_code(quant_type: str, device: torch.device) -> torch.Tensor:
    from bitsandbytes.functional import get_4bit_type

    return get_4bit_type(quant_type, device=device)


def _f32(t: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"quant_state.{what} must be a tensor, got {type(t).__name__}")
    if t.dtype != torch.float32:
        raise TypeError(f"quant_state.{what} must be float32, got {t.dtype}")
    if not t.is_contiguous():
        raise ValueError(f"quant_state.{what} must be contiguous")
    return t


def get_quant_state(module: torch.nn.Module) -> Any:
    """The quant_state of a bitsandbytes Linear4bit, found the way bitsandbytes' forward finds it
    (on the weight, or on the module when a wrapper such as FSDP stripped the Params4bit subclass),
    without modifying the module."""
    qs = getattr(module.weight, "quant_state", None)
    if qs is None:
        qs = getattr(module, "quant_state", None)
    return qs


def from_bnb(weight: torch.Tensor, quant_state: Any) -> Packed4bit:
    """Describe a bitsandbytes 4-bit weight for the kernels. No data is copied or changed."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor holding 4-bit packed bytes, got {type(weight).__name__}")
    if quant_state is None:
        raise ValueError(
            "weight has no quant_state: it is not a quantized bitsandbytes 4-bit weight "
            f"(dtype {weight.dtype}, shape {tuple(weight.shape)}); quantize it first (move the layer to the device)"
        )
    for attr in ("absmax", "shape", "blocksize", "quant_type"):
        if not hasattr(quant_state, attr):
            raise TypeError(f"quant_state of type {type(quant_state).__name__} has no '{attr}': not a bitsandbytes QuantState")
    quant_type = quant_state.quant_type
    if quant_type not in _QUANT_TYPES:
        raise ValueError(f"unknown quant_type {quant_type!r}: fastlora decodes {_QUANT_TYPES}")
    blocksize = int(quant_state.blocksize)
    if blocksize not in _BLOCKSIZES:
        raise ValueError(f"unsupported blocksize {blocksize}: bitsandbytes uses one of {_BLOCKSIZES}")
    shape = tuple(int(s) for s in quant_state.shape)
    if len(shape) != 2:
        raise ValueError(f"quant_state.shape must be [out_features, in_features], got {shape}")
    N, K = shape

    # -- the packed bytes -----------------------------------------------------------------------
    if weight.dim() != 2 or 1 not in tuple(weight.shape):
        raise ValueError(
            "weight is not 4-bit packed: expected shape (N*K/2, 1) (or the transposed (1, N*K/2) view) "
            f"in the quant_storage dtype, got {tuple(weight.shape)} {weight.dtype}"
        )
    if weight.dtype.is_complex or weight.dtype == torch.bool:
        raise TypeError(f"weight dtype {weight.dtype} cannot hold 4-bit packed bytes")
    if not weight.is_contiguous() and not weight.t().is_contiguous():
        raise ValueError("weight must be a contiguous packed 4-bit buffer (or its transpose)")
    packed = weight.reshape(-1)  # (n, 1) and (1, n) are both contiguous 1-D views of the bytes
    if packed.dtype != torch.uint8:
        packed = packed.view(torch.uint8)  # quant_storage bf16/fp16/fp32 hold the same bytes
    expected = (N * K + 1) // 2
    # quant_storage wider than a byte pads the buffer up to a whole element
    elem = weight.element_size()
    if not (expected <= packed.numel() < expected + elem):
        raise ValueError(
            f"weight holds {packed.numel()} bytes but quant_state.shape {list(shape)} needs "
            f"{expected} (N*K/2 = {N}*{K}/2): the weight and its quant_state do not belong together"
        )

    # -- the code table ---------------------------------------------------------------------------
    code = getattr(quant_state, "code", None)
    if code is None:
        code = _default_code(quant_type, weight.device)
    code = _f32(code, "code")
    if code.numel() != 16:
        raise ValueError(f"quant_state.code must have 16 entries for 4-bit, got {code.numel()}")

    # -- the absmax --------------------------------------------------------------------------------
    nblocks = (N * K + blocksize - 1) // blocksize
    absmax = quant_state.absmax
    if not isinstance(absmax, torch.Tensor):
        raise TypeError(f"quant_state.absmax must be a tensor, got {type(absmax).__name__}")
    if absmax.numel() != nblocks:
        raise ValueError(
            f"quant_state.absmax has {absmax.numel()} entries, but shape {list(shape)} with blocksize "
            f"{blocksize} has {nblocks} blocks"
        )
    absmax2 = code2 = None
    blocksize2, offset = 256, None
    nested = bool(getattr(quant_state, "nested", False)) or getattr(quant_state, "state2", None) is not None
    if nested:
        state2 = quant_state.state2
        if absmax.dtype != torch.uint8:
            raise TypeError(f"double-quantized absmax must be uint8 codes, got {absmax.dtype}")
        if not absmax.is_contiguous():
            raise ValueError("quant_state.absmax must be contiguous")
        absmax2 = _f32(state2.absmax, "state2.absmax")
        code2 = _f32(state2.code, "state2.code")
        blocksize2 = int(state2.blocksize)
        if code2.numel() != 256:
            raise ValueError(f"quant_state.state2.code must have 256 entries, got {code2.numel()}")
        if absmax2.numel() != (nblocks + blocksize2 - 1) // blocksize2:
            raise ValueError(
                f"quant_state.state2.absmax has {absmax2.numel()} entries, expected "
                f"ceil({nblocks}/{blocksize2})"
            )
        off = quant_state.offset
        if isinstance(off, torch.Tensor):
            if off.numel() != 1:
                raise ValueError(f"quant_state.offset must be a scalar, got shape {tuple(off.shape)}")
            # a view of bitsandbytes' own scalar: the kernel loads it, no .item() (no GPU sync)
            offset = off.reshape(1) if off.dtype == torch.float32 else off.reshape(1).float()
        else:
            offset = torch.tensor([float(off or 0.0)], dtype=torch.float32, device=weight.device)
    else:
        absmax = _f32(absmax, "absmax")

    tensors = {"code": code, "absmax": absmax, "state2.absmax": absmax2, "state2.code": code2, "offset": offset}
    for name, t in tensors.items():
        if t is not None and t.device != weight.device:
            raise ValueError(f"weight is on {weight.device} but quant_state.{name} is on {t.device}")

    return Packed4bit(
        packed=packed, N=N, K=K, blocksize=blocksize, code=code, absmax=absmax, quant_type=quant_type,
        absmax2=absmax2, code2=code2, blocksize2=blocksize2, offset=offset,
        dtype=getattr(quant_state, "dtype", None),
    )


def from_module(module: torch.nn.Module) -> Packed4bit:
    """:func:`from_bnb` for a bitsandbytes ``Linear4bit`` (reads its weight and quant_state now)."""
    return from_bnb(module.weight, get_quant_state(module))


def dequantize(weight: torch.Tensor, quant_state: Any = None, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """W [N, K] from a bitsandbytes 4-bit weight, computed by fastlora's Triton kernel.

    Bit-exact with ``bitsandbytes.functional.dequantize_4bit`` (NF4 and FP4, plain and double-quant
    absmax, every blocksize). ``dtype`` defaults to ``quant_state.dtype`` (what bitsandbytes itself
    dequantizes to: the weight's dtype before quantization, not the layer's compute_dtype), else bfloat16.
    ``weight`` may also be a bitsandbytes ``Linear4bit`` module (then quant_state is read from it).
    """
    from .kernels.quant4 import dequantize_4bit

    if isinstance(weight, torch.nn.Module):
        if quant_state is None:
            quant_state = get_quant_state(weight)
        weight = weight.weight
    if quant_state is None:
        quant_state = getattr(weight, "quant_state", None)
    q = from_bnb(weight, quant_state)
    if dtype is None:
        dtype = q.dtype if q.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.bfloat16
    return dequantize_4bit(q, dtype)
