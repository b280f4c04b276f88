"""One GEMM kernel for every product of a (Q)LoRA layer, 4-bit decode in its main loop.

Every product the layer needs has the shape  out[M, J] = oscale · Σ_i  Aop[m, i] · T[i, j]  (+ epilogue)
where T is a view of a weight-like matrix W [Nw, Kw]:

    TRANS_W = False  ->  T[i, j] = W[j, i]     (reduce over W's columns:  X·Wᵀ)
    TRANS_W = True   ->  T[i, j] = W[i, j]     (reduce over W's rows:     dY·W)

W is either bitsandbytes 4-bit (IS_4BIT: decoded tile by tile with ``quant4.decode_4bit``; no
[N, K] float copy of W ever exists) or any strided dense tensor. The layer's products:

    forward  Y  = X·Wᵀ   (+ s·H·Bᵀ + bias in the epilogue)     Aop = X,   W = W4,  TRANS_W = False
             H  = D(X)·Aᵀ                                       Aop = X,   W = A,   dropout on Aop
    backward dX = dY·W   (+ D'(s·G·A) in the epilogue)          Aop = dY,  W = W4,  TRANS_W = True
             G  = dY·B                                          Aop = dY,  W = B,   TRANS_W = True
             dA = s·Gᵀ·D(X)                                     Aop = Gᵀ,  W = X,   dropout on W
             dB = s·dYᵀ·H                                       Aop = dYᵀ, W = H,   TRANS_W = True

The epilogue adds a bias, then (ROUND_BASE) rounds the frozen product to COMPUTE as bitsandbytes'
result is rounded before PEFT adds the LoRA term to it (matters when ``out`` is wider than COMPUTE,
e.g. fp32 activations with bf16 compute), then (HAS_LORA) adds  s · L[m, :r] · R[:r, j]  with L = H
(fwd) or G (bwd), R = Bᵀ or A, in rank chunks of BLOCK_R (on the tensor cores when L is 16-bit: the
adapters run in the autocast or adapter dtype, as PEFT's do; in fp32 with IEEE precision when L is
fp32), optionally masked by dropout
(DROPOUT = 3), then the existing contents of ``out`` (ACC_OUT, for the dequantize-then-cuBLAS
strategy whose frozen product comes from cuBLAS).

Dropout is a counter-based RNG (Philox 4x32-10, Triton's ``randint4x``): one Philox call per quad
of four consecutive elements of a row of X [M, K], counter  m·⌈K/4⌉ + k//4, its four outputs taken
in order; element (m, k) is kept iff its uniform float >= p, and kept values are scaled by 1/(1-p).
The same (seed, counter) regenerates the same mask wherever it is needed (DROPOUT = 1: on Aop,
= 2: on W, = 3: on the epilogue term; every tile starts at a multiple of 4 along k), so nothing
mask-sized is stored. The seed is read from a one-element device tensor, drawn from the device's generator: no
host sync, and activation checkpointing (which restores that generator) regenerates the same mask.
Offsets are int64 (M·K may pass 2³¹).

Accumulation is fp32. Operands are cast to COMPUTE: the frozen product's dtype (bf16/fp16, tensor
cores); for the adapter products H, G, dA, dB the dtype PEFT runs its adapters in (the autocast dtype
under autocast, else the adapters' own): bf16/fp16 on the tensor cores, or fp32 with IEEE precision,
as PyTorch computes an fp32 matmul.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import _interpreter, _launch, configs
from .quant4 import Packed4bit, check_device, decode_4bit, decode_4bit_rows, kernel_args, pair_table, wide_decode_ok

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}

# DROPOUT switch values
DROP_NONE, DROP_AOP, DROP_W, DROP_EPILOGUE = 0, 1, 2, 3


@triton.jit
def _keep(seed, rows, k0, K, p, BLOCK_K: tl.constexpr):
    """The keep-mask [len(rows), BLOCK_K] of X [M, K] at rows ``rows`` (int64) and columns
    k0 + arange(BLOCK_K), k0 a multiple of 4: one Philox call gives a quad of 4 columns."""
    quads = (k0 // 4 + tl.arange(0, BLOCK_K // 4)).to(tl.int64)
    counter = rows[:, None] * ((K + 3) // 4) + quads[None, :]                   # [R, BLOCK_K / 4]
    u0, u1, u2, u3 = tl.rand4x(seed, counter)
    # tl.join stacks on a new last axis: join(join(u0, u2), join(u1, u3))[..., a, b] is u0, u2 for
    # b = 0 and u1, u3 for b = 1, so the flattened (a, b) = 0, 1, 2, 3 read u0, u1, u2, u3: column order
    u = tl.join(tl.join(u0, u2), tl.join(u1, u3))                               # [R, BLOCK_K / 4, 2, 2]
    return tl.reshape(u, (rows.shape[0], BLOCK_K)) >= p


@triton.jit
def _lora_matmul_kernel(
    # Aop [M, I], any strides
    a_ptr, stride_am, stride_ai,
    # W [Nw, Kw]: 4-bit (decode args) or dense (w_ptr + strides)
    w_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
    stride_wn, stride_wk, Kw,
    # epilogue operands: L [M, rank] (fp32 or the adapters' 16-bit dtype), R [rank, J] any strides, bias [J]
    l_ptr, stride_lm, stride_lr,
    r_ptr, stride_rr, stride_rj,
    bias_ptr,
    # out [M, J]
    out_ptr, stride_om, stride_oj,
    # split-K partial sums: fp32 [splits, M, J], contiguous
    part_ptr, splits,
    M, J, I, rank,
    out_scale, lora_scale, seed_ptr, p, keep_scale,
    TRANS_W: tl.constexpr, IS_4BIT: tl.constexpr, NESTED: tl.constexpr,
    BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr,
    HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, ACC_OUT: tl.constexpr, DROPOUT: tl.constexpr,
    ROUND_BASE: tl.constexpr, COMPUTE: tl.constexpr, FAST_4BIT: tl.constexpr, SWAP_AB: tl.constexpr,
    SPLIT_OUT: tl.constexpr, PARTIALS: tl.constexpr, MAIN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # -- grouped program order: GROUP_M row-blocks share each column-block of W while it is hot --
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_j = tl.cdiv(J, BLOCK_J)
    group_size = GROUP_M * num_j
    first_m = (pid // group_size) * GROUP_M
    rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % rows
    pid_j = (pid % group_size) // rows

    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)     # [BLOCK_M]
    offs_j = (pid_j * BLOCK_J + tl.arange(0, BLOCK_J)).to(tl.int64)     # [BLOCK_J]
    mask_m = offs_m < M
    mask_j = offs_j < J
    if SWAP_AB:
        acc = tl.zeros((BLOCK_J, BLOCK_M), dtype=tl.float32)          # outᵀ tile: W is the MMA's A
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_J), dtype=tl.float32)
    seed = 0
    if DROPOUT != 0:
        seed = tl.load(seed_ptr)
    if FAST_4BIT:
        pairs = pair_table(code_ptr)                                      # [256] int64, in registers

    # -- main loop over the reduction dimension; split-K: program (·, s) takes the s-th run of
    #    BLOCK_I steps (grid axis 1 has one program per split, a single one without split) --------
    #    MAIN = False: an epilogue-only pass (the product is in ``out`` or in the partials): no loop is
    #    compiled at all, so the pass is sized for its real work
    if MAIN:
        steps_per_split = tl.cdiv(tl.cdiv(I, BLOCK_I), tl.num_programs(1))
        i_lo = tl.program_id(1) * steps_per_split * BLOCK_I
        i_hi = tl.minimum(I, i_lo + steps_per_split * BLOCK_I)
        for i0 in range(i_lo, i_hi, BLOCK_I):
            offs_i = i0 + tl.arange(0, BLOCK_I).to(tl.int64)                # [BLOCK_I]
            mask_i = offs_i < I
            a_mask = mask_m[:, None] & mask_i[None, :]
            a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_i[None, :] * stride_ai,
                        mask=a_mask, other=0.0)                               # [BLOCK_M, BLOCK_I]
            if DROPOUT == 1:
                keep = _keep(seed, offs_m, i0, I, p, BLOCK_I)
                a = tl.where(keep, a.to(tl.float32) * keep_scale, 0.0)
            a = a.to(COMPUTE)
            # T tile [BLOCK_I, BLOCK_J] as (n, k) indices of W
            if TRANS_W:
                n_idx = offs_i[:, None]
                k_idx = offs_j[None, :]
            else:
                n_idx = offs_j[None, :]
                k_idx = offs_i[:, None]
            t_mask = mask_i[:, None] & mask_j[None, :]
            if FAST_4BIT:
                if TRANS_W:
                    t = decode_4bit_rows(w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, pairs,
                                         offs_i, mask_i, pid_j * BLOCK_J, Kw,
                                         BLOCK_J, BLOCKSIZE, BLOCKSIZE2, NESTED)        # [BLOCK_I, BLOCK_J]
                else:
                    t = tl.trans(decode_4bit_rows(w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, pairs,
                                                  offs_j, mask_j, i0, Kw,
                                                  BLOCK_I, BLOCKSIZE, BLOCKSIZE2, NESTED))  # [BLOCK_I, BLOCK_J]
            elif IS_4BIT:
                t = decode_4bit(w_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                                n_idx * Kw + k_idx, t_mask, BLOCKSIZE, BLOCKSIZE2, NESTED)
            else:
                t = tl.load(w_ptr + n_idx * stride_wn + k_idx * stride_wk, mask=t_mask, other=0.0)
                if DROPOUT == 2:
                    keep = _keep(seed, offs_i, pid_j * BLOCK_J, Kw, p, BLOCK_J)
                    t = tl.where(keep, t.to(tl.float32) * keep_scale, 0.0)
            t = t.to(COMPUTE)
            if COMPUTE == tl.float32:
                acc = tl.dot(a, t, acc, input_precision="ieee")
            elif SWAP_AB:
                acc = tl.dot(tl.trans(t), tl.trans(a), acc)                   # [BLOCK_J, BLOCK_M]
            else:
                acc = tl.dot(a, t, acc)

    if SWAP_AB:
        acc = tl.trans(acc)
    if SPLIT_OUT:
        # split-K: this program's partial sum, unscaled, to slice s of the fp32 partials; the
        # PARTIALS pass (I = 0) adds the slices up and runs the epilogue once
        part_ptrs = part_ptr + tl.program_id(1).to(tl.int64) * M * J + offs_m[:, None] * J + offs_j[None, :]
        tl.store(part_ptrs, acc, mask=mask_m[:, None] & mask_j[None, :])
    else:
        if PARTIALS:
            for s in range(0, splits):
                acc += tl.load(part_ptr + s * M * J + offs_m[:, None] * J + offs_j[None, :],
                               mask=mask_m[:, None] & mask_j[None, :], other=0.0)
        _epilogue(acc, offs_m, offs_j, pid_j * BLOCK_J, mask_m, mask_j, l_ptr, stride_lm, stride_lr, r_ptr, stride_rr, stride_rj,
                  bias_ptr, out_ptr, stride_om, stride_oj, J, rank, out_scale, lora_scale, seed, p, keep_scale,
                  HAS_LORA, HAS_BIAS, ACC_OUT, DROPOUT, ROUND_BASE, COMPUTE, BLOCK_M, BLOCK_J, BLOCK_R)


@triton.jit
def _epilogue(acc, offs_m, offs_j, j0, mask_m, mask_j, l_ptr, stride_lm, stride_lr, r_ptr, stride_rr, stride_rj,
              bias_ptr, out_ptr, stride_om, stride_oj, J, rank, out_scale, lora_scale, seed, p, keep_scale,
              HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, ACC_OUT: tl.constexpr, DROPOUT: tl.constexpr,
              ROUND_BASE: tl.constexpr, COMPUTE: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_R: tl.constexpr):
    # the LoRA term's dtype is L's (H or G): 16-bit -> tensor cores, R cast to it as autocast casts
    # the adapter weight; fp32 -> IEEE fp32
    LORA_DT: tl.constexpr = l_ptr.dtype.element_ty
    acc = acc * out_scale
    # -- epilogue: + bias, round as bitsandbytes' result, + s·L·R (dropout-masked), + out ---------
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_j, mask=mask_j, other=0.0).to(tl.float32)[None, :]
    if ROUND_BASE:
        acc = acc.to(COMPUTE).to(tl.float32)
    if HAS_LORA:
        term = tl.zeros((BLOCK_M, BLOCK_J), dtype=tl.float32)
        for r0 in range(0, rank, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            mask_r = offs_r < rank
            lo = tl.load(l_ptr + offs_m[:, None] * stride_lm + offs_r[None, :] * stride_lr,
                         mask=mask_m[:, None] & mask_r[None, :], other=0.0)                 # [BLOCK_M, BLOCK_R]
            ro = tl.load(r_ptr + offs_r[:, None] * stride_rr + offs_j[None, :] * stride_rj,
                         mask=mask_r[:, None] & mask_j[None, :], other=0.0).to(LORA_DT)    # [BLOCK_R, BLOCK_J]
            if LORA_DT == tl.float32:
                term = tl.dot(lo, ro, term, input_precision="ieee")                        # [BLOCK_M, BLOCK_J]
            else:
                term = tl.dot(lo, ro, term)
        if LORA_DT != tl.float32:
            term = term.to(LORA_DT).to(tl.float32)   # lora_B's (or, backward, lora_A's) output, as PEFT rounds it
        term = term * lora_scale
        if DROPOUT == 3:
            keep = _keep(seed, offs_m, j0, J, p, BLOCK_J)
            term = tl.where(keep, term * keep_scale, 0.0)
        acc += term
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_j[None, :] * stride_oj
    out_mask = mask_m[:, None] & mask_j[None, :]
    if ACC_OUT:
        acc += tl.load(out_ptrs, mask=out_mask, other=0.0).to(tl.float32)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


# ----------------------------------------------------------------------------------------------
# block-size policy: the tables of configs.py
# ----------------------------------------------------------------------------------------------


def _kind(is_4bit: bool, skip_main: bool, compute_dtype: torch.dtype, wide: bool = True,
          adapter: bool = False) -> str:
    """Which row of the launch-configuration tables a product uses (see ``configs.py``)."""
    if skip_main:
        return "epilogue"
    if is_4bit:
        return "frozen4" if wide else "frozen4_flat"
    if compute_dtype == torch.float32:
        return "lora"
    return "lora16" if adapter else "dense"


# ----------------------------------------------------------------------------------------------
# launcher
# ----------------------------------------------------------------------------------------------


def _strides2(t: torch.Tensor, what: str):
    if t.dim() != 2:
        raise ValueError(f"{what} must be 2-D, got shape {tuple(t.shape)}")
    return t.stride(0), t.stride(1)


def lora_matmul(
    a: torch.Tensor,
    w,
    out: torch.Tensor,
    *,
    trans_w: bool,
    compute_dtype: torch.dtype,
    out_scale: float = 1.0,
    lora_l: Optional[torch.Tensor] = None,
    lora_r: Optional[torch.Tensor] = None,
    lora_scale: float = 1.0,
    bias: Optional[torch.Tensor] = None,
    accumulate: bool = False,
    dropout: int = DROP_NONE,
    dropout_p: float = 0.0,
    seed: Optional[torch.Tensor] = None,
    skip_main: bool = False,
    round_base: bool = False,
    adapter: bool = False,
) -> torch.Tensor:
    """out[M, J] = out_scale · a[M, I] · T[I, J]  (+ lora_scale · lora_l[M, r] · lora_r[r, J], + bias[J],
    + out if accumulate), T = Wᵀ (trans_w False) or W (trans_w True).

    a:      [M, I] any strides, fp16/bf16/fp32
    w:      :class:`Packed4bit` for W [N, K], or a dense 2-D tensor (any strides)
    out:    [M, J], any strides, written in place (and read when accumulate)
    lora_l: [M, r] (H or G), lora_r: [r, J] (a strided view of Bᵀ or A), any float dtype; the term
            is computed in lora_l's dtype (16-bit: tensor cores, lora_r cast to it; fp32: IEEE)
    dropout: DROP_* selects where the keep-mask of X [M', K'] applies (see the module docstring)
    seed:   int64 [1] on the device (required when dropout != DROP_NONE)
    skip_main: run only the epilogue (the frozen product is already in ``out``)
    round_base: round out_scale·a·T + bias to compute_dtype before the LoRA term is added
    adapter: the product is one of the adapter products (H, G, dA, dB: one dimension is the rank),
            which has its own tiles when 16-bit
    """
    if a.dim() != 2 or out.dim() != 2:
        raise ValueError(f"a and out must be 2-D, got {tuple(a.shape)} and {tuple(out.shape)}")
    if compute_dtype not in _TL_DTYPES:
        raise TypeError(f"compute dtype must be float16, bfloat16 or float32, got {compute_dtype}")
    M, I = a.shape
    is_4bit = isinstance(w, Packed4bit)
    if is_4bit:
        Nw, Kw = w.N, w.K
        check_device(w, a, out, lora_l, lora_r, bias, what="an input of the fused LoRA op")
        wargs = kernel_args(w)
        stride_wn, stride_wk = Kw, 1
        blocksize, blocksize2, nested = w.blocksize, w.blocksize2, w.nested
    else:
        Nw, Kw = w.shape
        stride_wn, stride_wk = _strides2(w, "w")
        wargs = (w,) * 6  # the decode pointers go unread: IS_4BIT is off
        blocksize, blocksize2, nested = 64, 256, False
        _launch.require_runnable(a.device, "the input")
    J = Nw if not trans_w else Kw
    if (Kw if not trans_w else Nw) != I:
        raise ValueError(f"inner dimensions differ: a is [{M}, {I}] but W is [{Nw}, {Kw}] (trans_w={trans_w})")
    if tuple(out.shape) != (M, J):
        raise ValueError(f"out must be [{M}, {J}], got {tuple(out.shape)}")
    has_lora = lora_l is not None
    rank = lora_l.shape[1] if has_lora else 0
    if has_lora and (tuple(lora_l.shape) != (M, rank) or tuple(lora_r.shape) != (rank, J)):
        raise ValueError(f"LoRA factors must be [{M}, r] and [r, {J}], got {tuple(lora_l.shape)}, {tuple(lora_r.shape)}")
    if dropout == DROP_W and not trans_w:
        raise ValueError("dropout on W (DROP_W) indexes W as X [M, K] with trans_w=True (dA = s·Gᵀ·D(X))")
    if dropout != DROP_NONE and (seed is None or seed.numel() != 1 or seed.device != a.device):
        raise ValueError("dropout needs its seed as a one-element int64 tensor on the input's device")
    if M == 0 or J == 0:
        return out
    _interpreter.ensure()

    target = _launch.launch_target(a.device)
    kind = _kind(is_4bit, skip_main, compute_dtype, is_4bit and wide_decode_ok(w), adapter)
    cfg = configs.select(kind, M, J, I, target)
    BM, BJ, BI, warps, stages = cfg.as_tuple()
    # the wide decode where the layout allows it; the MMA with W as its first operand for the small-M
    # 4-bit tiles (W's tile is the big one)
    main = dict(FAST_4BIT=is_4bit and not skip_main and wide_decode_ok(w),
                SWAP_AB=is_4bit and not skip_main and compute_dtype != torch.float32 and BM <= 32)
    no_main = dict(FAST_4BIT=False, SWAP_AB=False, MAIN=False)
    main["MAIN"] = not skip_main
    # rank chunks of at most 32: bounds the epilogue's registers whatever r is (r = 256 works too)
    BR = configs._pow2_clamp(rank, 16, 32)
    tiles = triton.cdiv(M, BM) * triton.cdiv(J, BJ)
    # bytes one BLOCK_I step reads (the a tile and W's tile: half a byte per 4-bit weight), and what
    # one more program of a split writes to the fp32 partials and the sum pass reads back
    w_elt = 0.5 if is_4bit else w.element_size()
    step_bytes = int(min(BM, M) * BI * a.element_size() + BI * min(BJ, J) * w_elt)
    splits = 1 if skip_main else configs.splits(cfg, tiles, I, target, step_bytes, 2 * min(BM, M) * min(BJ, J) * 4)
    l_ = lora_l if has_lora else out
    r_ = lora_r if has_lora else out
    keep_scale = 1.0 / (1.0 - dropout_p) if dropout != DROP_NONE else 1.0
    seed_ = seed if seed is not None else out
    common = (
        a, a.stride(0), a.stride(1),
        *wargs, stride_wn, stride_wk, Kw,
        l_, l_.stride(0), l_.stride(1),
        r_, r_.stride(0), r_.stride(1),
        bias if bias is not None else out,
        out, out.stride(0), out.stride(1),
    )
    scalars = (float(out_scale), float(lora_scale), seed_, float(dropout_p), float(keep_scale))
    shape = dict(TRANS_W=trans_w, IS_4BIT=is_4bit, NESTED=nested, BLOCKSIZE=blocksize, BLOCKSIZE2=blocksize2,
                 COMPUTE=_TL_DTYPES[compute_dtype], GROUP_M=8, enable_fp_fusion=False)
    epilogue = dict(HAS_LORA=has_lora, HAS_BIAS=bias is not None, ACC_OUT=accumulate, ROUND_BASE=round_base)
    if splits == 1:
        _launch.launch(
            _lora_matmul_kernel, (tiles, 1),
            *common, out, 1, M, J, 0 if skip_main else I, rank, *scalars,
            **shape, **epilogue, **main, DROPOUT=dropout, SPLIT_OUT=False, PARTIALS=False,
            BLOCK_M=BM, BLOCK_J=BJ, BLOCK_I=BI, BLOCK_R=BR, num_warps=warps, num_stages=stages,
        )
        return out
    # split-K: `splits` programs per output tile write fp32 partial sums [splits, M, J] (the main
    # loop's dropout only; no epilogue), then one pass adds them up and runs the epilogue
    part = torch.empty((splits, M, J), dtype=torch.float32, device=out.device)
    _launch.launch(
        _lora_matmul_kernel, (tiles, splits),
        *common, part, splits, M, J, I, rank, *scalars,
        **shape, **main, HAS_LORA=False, HAS_BIAS=False, ACC_OUT=False, ROUND_BASE=False,
        DROPOUT=dropout if dropout in (DROP_AOP, DROP_W) else DROP_NONE, SPLIT_OUT=True, PARTIALS=False,
        BLOCK_M=BM, BLOCK_J=BJ, BLOCK_I=BI, BLOCK_R=BR, num_warps=warps, num_stages=stages,
    )
    ecfg = configs.select("epilogue", M, J, 0, target)
    etiles = triton.cdiv(M, ecfg.block_m) * triton.cdiv(J, ecfg.block_j)
    _launch.launch(
        _lora_matmul_kernel, (etiles, 1),
        *common, part, splits, M, J, 0, rank, *scalars,
        **shape, **epilogue, **no_main, DROPOUT=dropout if dropout == DROP_EPILOGUE else DROP_NONE,
        SPLIT_OUT=False, PARTIALS=True,
        BLOCK_M=ecfg.block_m, BLOCK_J=ecfg.block_j, BLOCK_I=ecfg.block_i, BLOCK_R=BR,
        num_warps=ecfg.num_warps, num_stages=ecfg.num_stages,
    )
    return out


@triton.jit
def _keep_mask_kernel(out_ptr, M, K, seed_ptr, p, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = tl.program_id(1) * BLOCK_K
    cols = k0 + tl.arange(0, BLOCK_K)
    keep = _keep(tl.load(seed_ptr), rows, k0, K, p, BLOCK_K)
    tl.store(out_ptr + rows[:, None] * K + cols[None, :], keep.to(tl.int8),
             mask=(rows[:, None] < M) & (cols[None, :] < K))


def seed_tensor(seed: int, device) -> torch.Tensor:
    """A dropout seed as the kernels take it: int64 [1] on ``device``."""
    return torch.tensor([int(seed)], dtype=torch.int64, device=device)


def dropout_keep_mask(M: int, K: int, p: float, seed, device) -> torch.Tensor:
    """The bool keep-mask [M, K] the kernels apply for (seed, p); ``seed`` an int or the op's seed
    tensor. For tests and debugging only: the fused op never materializes it."""
    _interpreter.ensure()
    if not isinstance(seed, torch.Tensor):
        seed = seed_tensor(seed, device)
    out = torch.empty((M, K), dtype=torch.int8, device=device)
    if M * K:
        BM, BK = 16, 64
        _launch.launch(_keep_mask_kernel, (triton.cdiv(M, BM), triton.cdiv(K, BK)), out, M, K, seed, float(p),
                       BLOCK_M=BM, BLOCK_K=BK)
    return out.bool()
