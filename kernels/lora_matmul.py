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

Merged launches: ``_lora_multi_kernel`` runs up to two independent products of one layer call and
W's dequantization (``quant4.dequant_block``) in one launch, each program doing exactly what it
would in a launch of its own (``launch_together``): a layer call then costs the GPU and the host
fewer launches (the dequant strategy: H, or G with dB, with W's dequantization; dA with dX's
epilogue pass).

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
from .quant4 import (Packed4bit, _dequant_4bit_kernel, check_device, decode_4bit, decode_4bit_rows, dequant_block,
                     dequantize_4bit, kernel_args, nibble_table, pair_table, wide_decode_ok)

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


@triton.jit(do_not_specialize=["seed_lo", "seed_hi"])
def _lora_matmul_kernel(
    a_ptr, stride_am, stride_ai, w_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
    stride_wn, stride_wk, Kw, l_ptr, stride_lm, stride_lr, r_ptr, stride_rr, stride_rj, bias_ptr,
    out_ptr, stride_om, stride_oj, part_ptr, count_ptr, M, J, I, rank, out_scale, lora_scale,
    seed_ptr, seed_lo, seed_hi, p, keep_scale,
    TRANS_W: tl.constexpr, IS_4BIT: tl.constexpr, NESTED: tl.constexpr, BLOCKSIZE: tl.constexpr,
    BLOCKSIZE2: tl.constexpr, HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr,
    ACC_OUT: tl.constexpr, DROPOUT: tl.constexpr, ROUND_BASE: tl.constexpr, COMPUTE: tl.constexpr,
    FAST_4BIT: tl.constexpr, SWAP_AB: tl.constexpr, SPLIT: tl.constexpr, MAIN: tl.constexpr,
    SCALE_A: tl.constexpr, SEED_PTR: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr, ROUND_TERM: tl.constexpr,
):
    """One product: grid (output tiles, splits)."""
    _product(tl.program_id(0), tl.program_id(1), tl.num_programs(1),
             a_ptr, stride_am, stride_ai, w_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr,
             offset_ptr, stride_wn, stride_wk, Kw, l_ptr, stride_lm, stride_lr, r_ptr, stride_rr,
             stride_rj, bias_ptr, out_ptr, stride_om, stride_oj, part_ptr, count_ptr, M, J, I,
             rank, out_scale, lora_scale, seed_ptr, seed_lo, seed_hi, p, keep_scale, TRANS_W,
             IS_4BIT, NESTED, BLOCKSIZE, BLOCKSIZE2, HAS_LORA, HAS_BIAS, ACC_OUT, DROPOUT,
             ROUND_BASE, COMPUTE, FAST_4BIT, SWAP_AB, SPLIT, MAIN, SCALE_A, SEED_PTR, BLOCK_M,
             BLOCK_J, BLOCK_I, BLOCK_R, GROUP_M, ROUND_TERM)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi"])
def _lora_multi_kernel(
    # segment 0: a product (its programs first: tiles0 · splits0 of them)
    a_ptr, stride_am, stride_ai, w_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
    stride_wn, stride_wk, Kw, l_ptr, stride_lm, stride_lr, r_ptr, stride_rr, stride_rj, bias_ptr,
    out_ptr, stride_om, stride_oj, part_ptr, count_ptr, M, J, I, rank, out_scale, lora_scale,
    # segment 1 (SEG1): a second product of the same layer call (tiles1 · splits1 programs)
    a_ptr_1, stride_am_1, stride_ai_1, w_ptr_1, code_ptr_1, absmax_ptr_1, absmax2_ptr_1,
    code2_ptr_1, offset_ptr_1, stride_wn_1, stride_wk_1, Kw_1, l_ptr_1, stride_lm_1, stride_lr_1,
    r_ptr_1, stride_rr_1, stride_rj_1, bias_ptr_1, out_ptr_1, stride_om_1, stride_oj_1, part_ptr_1,
    count_ptr_1, M_1, J_1, I_1, rank_1, out_scale_1, lora_scale_1,
    # the call's dropout (one seed and p for every segment; a segment without dropout ignores them)
    seed_ptr, seed_lo, seed_hi, p, keep_scale,
    # segment 2 (DEQ): W [N, K] dequantized from 4 bits into dq_out_ptr, DQ_BLOCK elements per program
    dq_w_ptr, dq_code_ptr, dq_absmax_ptr, dq_absmax2_ptr, dq_code2_ptr, dq_offset_ptr, dq_out_ptr, dq_numel,
    dq_nbytes,
    tiles0, splits0, tiles1, splits1,
    TRANS_W: tl.constexpr, IS_4BIT: tl.constexpr, NESTED: tl.constexpr, BLOCKSIZE: tl.constexpr,
    BLOCKSIZE2: tl.constexpr, HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr,
    ACC_OUT: tl.constexpr, DROPOUT: tl.constexpr, ROUND_BASE: tl.constexpr, COMPUTE: tl.constexpr,
    FAST_4BIT: tl.constexpr, SWAP_AB: tl.constexpr, SPLIT: tl.constexpr, MAIN: tl.constexpr,
    SCALE_A: tl.constexpr, SEED_PTR: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr, ROUND_TERM: tl.constexpr,
    TRANS_W_1: tl.constexpr, IS_4BIT_1: tl.constexpr, NESTED_1: tl.constexpr,
    BLOCKSIZE_1: tl.constexpr, BLOCKSIZE2_1: tl.constexpr, HAS_LORA_1: tl.constexpr,
    HAS_BIAS_1: tl.constexpr, ACC_OUT_1: tl.constexpr, DROPOUT_1: tl.constexpr,
    ROUND_BASE_1: tl.constexpr, COMPUTE_1: tl.constexpr, FAST_4BIT_1: tl.constexpr,
    SWAP_AB_1: tl.constexpr, SPLIT_1: tl.constexpr, MAIN_1: tl.constexpr, SCALE_A_1: tl.constexpr,
    SEED_PTR_1: tl.constexpr, BLOCK_M_1: tl.constexpr, BLOCK_J_1: tl.constexpr,
    BLOCK_I_1: tl.constexpr, BLOCK_R_1: tl.constexpr, GROUP_M_1: tl.constexpr,
    ROUND_TERM_1: tl.constexpr,
    SEG1: tl.constexpr, DEQ: tl.constexpr, DQ_BLOCKSIZE: tl.constexpr, DQ_BLOCKSIZE2: tl.constexpr,
    DQ_NESTED: tl.constexpr, DQ_BLOCK: tl.constexpr, DQ_GROUP: tl.constexpr,
):
    """Independent pieces of work of one layer call in one launch (a 1-D grid): segment 0's
    programs, then segment 1's, then the dequant's. Each program runs exactly what it would run in a
    launch of its own (the same tile, split and epilogue); only the launch is shared."""
    pid = tl.program_id(0)
    n0 = tiles0 * splits0
    if pid < n0:
        _product(pid % tiles0, pid // tiles0, splits0,
                 a_ptr, stride_am, stride_ai, w_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr,
                 offset_ptr, stride_wn, stride_wk, Kw, l_ptr, stride_lm, stride_lr, r_ptr,
                 stride_rr, stride_rj, bias_ptr, out_ptr, stride_om, stride_oj, part_ptr,
                 count_ptr, M, J, I, rank, out_scale, lora_scale, seed_ptr, seed_lo, seed_hi, p,
                 keep_scale, TRANS_W, IS_4BIT, NESTED, BLOCKSIZE, BLOCKSIZE2, HAS_LORA, HAS_BIAS,
                 ACC_OUT, DROPOUT, ROUND_BASE, COMPUTE, FAST_4BIT, SWAP_AB, SPLIT, MAIN, SCALE_A,
                 SEED_PTR, BLOCK_M, BLOCK_J, BLOCK_I, BLOCK_R, GROUP_M, ROUND_TERM)
    else:
        pid = pid - n0
        n1 = tiles1 * splits1
        if pid < n1:
            if SEG1:
                # segment 1's split-K counters follow segment 0's
                _product(pid % tiles1, pid // tiles1, splits1,
                         a_ptr_1, stride_am_1, stride_ai_1, w_ptr_1, code_ptr_1, absmax_ptr_1,
                         absmax2_ptr_1, code2_ptr_1, offset_ptr_1, stride_wn_1, stride_wk_1, Kw_1,
                         l_ptr_1, stride_lm_1, stride_lr_1, r_ptr_1, stride_rr_1, stride_rj_1,
                         bias_ptr_1, out_ptr_1, stride_om_1, stride_oj_1, part_ptr_1,
                         count_ptr_1 + tiles0, M_1, J_1, I_1, rank_1, out_scale_1, lora_scale_1,
                         seed_ptr, seed_lo, seed_hi, p, keep_scale, TRANS_W_1, IS_4BIT_1, NESTED_1,
                         BLOCKSIZE_1, BLOCKSIZE2_1, HAS_LORA_1, HAS_BIAS_1, ACC_OUT_1, DROPOUT_1,
                         ROUND_BASE_1, COMPUTE_1, FAST_4BIT_1, SWAP_AB_1, SPLIT_1, MAIN_1,
                         SCALE_A_1, SEED_PTR_1, BLOCK_M_1, BLOCK_J_1, BLOCK_I_1, BLOCK_R_1,
                         GROUP_M_1, ROUND_TERM_1)
        else:
            if DEQ:
                dequant_block(pid - n1, dq_w_ptr, dq_code_ptr, dq_absmax_ptr, dq_absmax2_ptr, dq_code2_ptr,
                              dq_offset_ptr, dq_out_ptr, dq_numel, dq_nbytes, DQ_BLOCKSIZE, DQ_BLOCKSIZE2,
                              DQ_NESTED, DQ_BLOCK, DQ_GROUP)


@triton.jit
def _product(
    # the program's output tile (before the grouped order is applied), its split and the split count
    pid, pid_s, nsplit,
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
    # split-K: fp32 partial sums [splits, M, J] (contiguous) and one int32 arrival counter per output
    # tile (zero between launches: the last program of a tile puts it back to zero)
    part_ptr, count_ptr,
    M, J, I, rank,
    out_scale, lora_scale, seed_ptr, seed_lo, seed_hi, p, keep_scale,
    TRANS_W: tl.constexpr, IS_4BIT: tl.constexpr, NESTED: tl.constexpr,
    BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr,
    HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, ACC_OUT: tl.constexpr, DROPOUT: tl.constexpr,
    ROUND_BASE: tl.constexpr, COMPUTE: tl.constexpr, FAST_4BIT: tl.constexpr, SWAP_AB: tl.constexpr,
    SPLIT: tl.constexpr, MAIN: tl.constexpr, SCALE_A: tl.constexpr, SEED_PTR: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, ROUND_TERM: tl.constexpr,
):
    """One program of one product: output tile ``pid`` (in launch order), split ``pid_s`` of
    ``nsplit``. Its own kernel (:func:`_lora_matmul_kernel`) or a segment of a merged launch
    (:func:`_lora_multi_kernel`) runs it."""
    # -- grouped program order: GROUP_M row-blocks share each column-block of W while it is hot --
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
        if SEED_PTR:
            seed = tl.load(seed_ptr)                                      # drawn on the device
        else:
            seed = (seed_hi.to(tl.int64) << 31) | seed_lo.to(tl.int64)    # drawn on the host
    if FAST_4BIT:
        pairs = pair_table(code_ptr) if FAST_4BIT != 2 else nibble_table(code_ptr)   # in registers

    # -- main loop over the reduction dimension; split-K: program (·, s) takes the s-th run of
    #    BLOCK_I steps (grid axis 1 has one program per split, a single one without split) --------
    #    MAIN = False: an epilogue-only pass (the product is in ``out`` or in the partials): no loop is
    #    compiled at all, so the pass is sized for its real work
    if MAIN:
        steps_per_split = tl.cdiv(tl.cdiv(I, BLOCK_I), nsplit)
        i_lo = pid_s * steps_per_split * BLOCK_I
        i_hi = tl.minimum(I, i_lo + steps_per_split * BLOCK_I)
        for i0 in range(i_lo, i_hi, BLOCK_I):
            offs_i = i0 + tl.arange(0, BLOCK_I).to(tl.int64)                # [BLOCK_I]
            mask_i = offs_i < I
            a_mask = mask_m[:, None] & mask_i[None, :]
            a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_i[None, :] * stride_ai,
                        mask=a_mask, other=0.0)                               # [BLOCK_M, BLOCK_I]
            if DROPOUT == 1:
                keep = _keep(seed, offs_m, i0, I, p, BLOCK_I)
                # a product with the mask's 0 or 1/(1-p), as torch's dropout computes it (inf·0 = NaN)
                a = a.to(tl.float32) * tl.where(keep, keep_scale, 0.0)
            if SCALE_A:
                # s·dY rounded to COMPUTE before the product, as PEFT's backward forms it (so a
                # non-finite s gives PEFT's inf/NaN pattern); padding stays 0, not 0·s
                a = tl.where(a_mask, a.to(COMPUTE).to(tl.float32) * out_scale, 0.0)
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
                    t = t.to(tl.float32) * tl.where(keep, keep_scale, 0.0)
            t = t.to(COMPUTE)
            if COMPUTE == tl.float32:
                acc = tl.dot(a, t, acc, input_precision="ieee")
            elif SWAP_AB:
                acc = tl.dot(tl.trans(t), tl.trans(a), acc)                   # [BLOCK_J, BLOCK_M]
            else:
                acc = tl.dot(a, t, acc)

    if SWAP_AB:
        acc = tl.trans(acc)
    if SCALE_A:
        out_scale = 1.0                      # applied to the A operand already
    if SPLIT:
        # split-K: each program stores its partial sum to slice s of the fp32 partials and counts
        # itself in at the tile's counter; the program that arrives last adds the slices in the
        # fixed order s = 0, 1, ... (the same sum whatever the arrival order: deterministic), runs
        # the epilogue and puts the counter back to zero for the next launch
        splits = nsplit
        # int64 scalars (M·J·splits may pass 2³¹) plus int32 offsets within the tile: a [BLOCK_M,
        # BLOCK_J] tensor of 64-bit pointers kept across the sum would cost registers the big tiles
        # do not have (it spilled on sm_80)
        slice_elems = (pid_s.to(tl.int64) * 0 + M) * J
        tile_base = (pid_m * BLOCK_M).to(tl.int64) * J + pid_j * BLOCK_J
        tl.store(part_ptr + (pid_s * slice_elems + tile_base)
                 + (tl.arange(0, BLOCK_M)[:, None] * J + tl.arange(0, BLOCK_J)[None, :]), acc,
                 mask=mask_m[:, None] & mask_j[None, :])
        tl.debug_barrier()                   # every thread's partial stored before the tile counts in
        arrived = tl.atomic_add(count_ptr + pid, 1, sem="acq_rel")
        # no branch on the arrival: the last program sums `splits` slices, the others none, and only
        # its stores take effect (an epilogue inside a data-dependent branch made ptxas save
        # registers to the stack around it on sm_86 / sm_89)
        last = arrived == splits - 1
        # the same predicate per row, to mask with (Triton's interpreter mis-types a scalar one)
        mask_last = mask_m & ((offs_m * 0 + arrived) == splits - 1)
        local = tl.arange(0, BLOCK_M)[:, None] * J + tl.arange(0, BLOCK_J)[None, :]
        tile_mask = mask_last[:, None] & mask_j[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_J), dtype=tl.float32)
        for s in range(0, tl.where(last, splits, 0)):
            acc += tl.load(part_ptr + (s * slice_elems + tile_base) + local, mask=tile_mask, other=0.0,
                           cache_modifier=".cg")
        # back to zero for the next launch: the last program takes the `splits` arrivals off (the
        # others add nothing; an atomic each, so no program's count is lost whatever the order)
        tl.atomic_add(count_ptr + pid, tl.where(last, -splits, 0))
        _epilogue(acc, offs_m, offs_j, pid_j * BLOCK_J, mask_last, mask_j, l_ptr, stride_lm, stride_lr, r_ptr,
                  stride_rr, stride_rj, bias_ptr, out_ptr, stride_om, stride_oj, J, rank, out_scale, lora_scale,
                  seed, p, keep_scale, HAS_LORA, HAS_BIAS, ACC_OUT, DROPOUT, ROUND_BASE, COMPUTE,
                  BLOCK_M, BLOCK_J, BLOCK_R, ROUND_TERM)
    else:
        _epilogue(acc, offs_m, offs_j, pid_j * BLOCK_J, mask_m, mask_j, l_ptr, stride_lm, stride_lr, r_ptr, stride_rr, stride_rj,
                  bias_ptr, out_ptr, stride_om, stride_oj, J, rank, out_scale, lora_scale, seed, p, keep_scale,
                  HAS_LORA, HAS_BIAS, ACC_OUT, DROPOUT, ROUND_BASE, COMPUTE, BLOCK_M, BLOCK_J, BLOCK_R,
                  ROUND_TERM)


@triton.jit
def _epilogue(acc, offs_m, offs_j, j0, mask_m, mask_j, l_ptr, stride_lm, stride_lr, r_ptr, stride_rr, stride_rj,
              bias_ptr, out_ptr, stride_om, stride_oj, J, rank, out_scale, lora_scale, seed, p, keep_scale,
              HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, ACC_OUT: tl.constexpr, DROPOUT: tl.constexpr,
              ROUND_BASE: tl.constexpr, COMPUTE: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_R: tl.constexpr, ROUND_TERM: tl.constexpr):
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
            term = term * tl.where(keep, keep_scale, 0.0)   # dropout's backward: a product (NaN stays NaN)
        if ROUND_TERM:
            # PEFT's fp16 sum: the frozen product and the LoRA term each rounded to out's dtype on
            # their own, then added (an fp16 term alone may overflow where the fp32 sum would not)
            OUT_DT: tl.constexpr = out_ptr.dtype.element_ty
            acc = acc.to(OUT_DT).to(tl.float32)
            term = term.to(OUT_DT).to(tl.float32)
        acc += term
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_j[None, :] * stride_oj
    out_mask = mask_m[:, None] & mask_j[None, :]
    if ACC_OUT:
        acc += tl.load(out_ptrs, mask=out_mask, other=0.0).to(tl.float32)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


# ----------------------------------------------------------------------------------------------
# block-size policy: the tables of configs.py
# ----------------------------------------------------------------------------------------------

# row-blocks of the output that take their column-blocks in turn, so that a column-block of W is
# read by GROUP_M programs while it is in L2 (Triton's matmul tutorial's grouped ordering)
GROUP_M = 8
# the epilogue walks the rank in chunks of 16..32 (the smallest tensor-core K, and a bound on the
# epilogue's registers whatever r is: r = 256 works too)
RANK_CHUNK_MIN, RANK_CHUNK_MAX = 16, 32
# 4-bit tiles with at most this many rows put W first in the MMA: W's tile is the big one, and the
# MMA's first operand must have at least 64 (wgmma) / 16 (mma.sync) rows
SWAP_AB_MAX_M = 32


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _kind(is_4bit: bool, skip_main: bool, compute_dtype: torch.dtype, wide: bool = True,
          adapter: bool = False, lora32: bool = False) -> str:
    """Which row of the launch-configuration tables a product uses (see ``configs.py``); ``lora32``:
    the product's epilogue adds an fp32 LoRA term."""
    if skip_main:
        return "epilogue"
    if is_4bit:
        return ("frozen4_lora32" if lora32 else "frozen4") if wide else "frozen4_flat"
    if compute_dtype == torch.float32:
        return "lora"
    return "lora16" if adapter else "dense"


# ----------------------------------------------------------------------------------------------
# launch plans: what a call resolves once and then only looks up
# ----------------------------------------------------------------------------------------------


class _Plan:
    """Everything about one product that depends only on its specialization class (see
    :func:`_plan_key`): the configuration, the split count, the grid, the constexprs, the launch."""

    __slots__ = ("launch", "cfg", "splits", "tiles", "consts", "part_shape", "ints", "gemv")


_PLANS: dict = {}
# int32 split-K arrival counters per (device, stream): zero between launches
_COUNTERS: dict = {}


def _sig(t: torch.Tensor) -> tuple:
    """What of a tensor argument decides Triton's specialization (and so the compiled kernel):
    dtype, shape, strides (integers equal to 1 or divisible by 16) and 16-byte alignment."""
    return (t.dtype, t.shape, t.stride(), t.data_ptr() % 16 == 0)


def _plan_key(a, w, out, lora_l, lora_r, bias, seed, flags, target, config):
    # one flat tuple (built and compared on every call); _GENERATION: configs.generation()
    return (flags, target, configs._GENERATION[0], config, a.device,
            a.dtype, a.shape, a.stride(), a.data_ptr() % 16 == 0,
            w.spec if isinstance(w, Packed4bit) else _sig(w),
            out.dtype, out.shape, out.stride(), out.data_ptr() % 16 == 0,
            None if lora_l is None else (_sig(lora_l), _sig(lora_r)),
            None if bias is None else _sig(bias), isinstance(seed, torch.Tensor))


def _validate(a, w, out, lora_l, lora_r, compute_dtype, dropout, seed, trans_w):
    """The shapes, dtypes and devices of a call; raises ValueError / TypeError naming what is wrong.
    Returns (M, J, I, Nw, Kw, rank)."""
    if a.dim() != 2 or out.dim() != 2:
        raise ValueError(f"a and out must be 2-D, got {tuple(a.shape)} and {tuple(out.shape)}")
    if compute_dtype not in _TL_DTYPES:
        raise TypeError(f"compute dtype must be float16, bfloat16 or float32, got {compute_dtype}")
    M, I = a.shape
    if isinstance(w, Packed4bit):
        Nw, Kw = w.N, w.K
        check_device(w, a, out, lora_l, lora_r, what="an input of the fused LoRA op")
    else:
        if w.dim() != 2:
            raise ValueError(f"w must be 2-D, got shape {tuple(w.shape)}")
        Nw, Kw = w.shape
        _launch.require_runnable(a.device, "the input")
    J = Nw if not trans_w else Kw
    if (Kw if not trans_w else Nw) != I:
        raise ValueError(f"inner dimensions differ: a is [{M}, {I}] but W is [{Nw}, {Kw}] (trans_w={trans_w})")
    if tuple(out.shape) != (M, J):
        raise ValueError(f"out must be [{M}, {J}], got {tuple(out.shape)}")
    rank = lora_l.shape[1] if lora_l is not None else 0
    if lora_l is not None and (tuple(lora_l.shape) != (M, rank) or tuple(lora_r.shape) != (rank, J)):
        raise ValueError(f"LoRA factors must be [{M}, r] and [r, {J}], got {tuple(lora_l.shape)}, {tuple(lora_r.shape)}")
    if dropout == DROP_W and not trans_w:
        raise ValueError("dropout on W (DROP_W) indexes W as X [M, K] with trans_w=True (dA = s·Gᵀ·D(X))")
    if dropout != DROP_NONE:
        if isinstance(seed, torch.Tensor):
            if seed.numel() != 1 or seed.device != a.device or seed.dtype != torch.int64:
                raise ValueError("dropout's seed tensor must be a one-element int64 tensor on the input's device")
        elif not isinstance(seed, int) or not 0 <= seed < SEED_RANGE:
            raise ValueError(f"dropout needs its seed: an int in [0, 2**62) or a one-element int64 device tensor, "
                             f"got {seed!r}")
    return M, J, I, Nw, Kw, rank


def _configure(kind, M, J, I, target, is_4bit, w_elt, a_elt, skip_main, config, trans_w):
    """The tile configuration and split count of one product (configs' table or the measured
    choice, or ``config``)."""
    cfg = configs.select(kind, M, J, I, target, trans_w=trans_w) if config is None else config
    BM, BJ, BI = cfg.block_m, cfg.block_j, cfg.block_i
    tiles = _cdiv(M, BM) * _cdiv(J, BJ)
    if skip_main:
        return cfg, 1, tiles
    # bytes one BLOCK_I step reads (the a tile and W's tile: half a byte per 4-bit weight), and what
    # one more program of a split writes to the fp32 partials and its last program reads back
    step_bytes = int(min(BM, M) * BI * a_elt + BI * min(BJ, J) * w_elt)
    per_sm = configs.GEMV_PROGRAMS_PER_SM if is_gemv(kind, cfg) else 1
    splits = configs.splits(cfg, tiles, I, target, step_bytes, configs.partial_bytes(min(BM, M), min(BJ, J), 1),
                            per_sm=per_sm)
    return cfg, splits, tiles


def is_gemv(kind: str, cfg: configs.TileConfig) -> bool:
    """Whether a product of ``kind`` with tile ``cfg`` runs as :func:`_lora_matmul_gemv_kernel`: a 4-bit
    frozen product with the wide decode whose tile has fewer rows than a tensor-core tile."""
    return kind in configs.GEMV_KINDS and cfg.block_m < configs.MMA_MIN_ROWS


def _build_plan(a, w, out, lora_l, bias, seed, *, trans_w, compute_dtype, accumulate, dropout, skip_main,
                round_base, round_term, adapter, scale_a, target, config, M, J, I, Nw, Kw, rank) -> _Plan:
    is_4bit = isinstance(w, Packed4bit)
    wide = is_4bit and wide_decode_ok(w)
    kind = _kind(is_4bit, skip_main, compute_dtype, wide, adapter,
                 lora32=lora_l is not None and lora_l.dtype == torch.float32)
    cfg, splits, tiles = _configure(kind, M, J, I, target, is_4bit, 0.5 if is_4bit else w.element_size(),
                                    a.element_size(), skip_main, config, trans_w)
    BM = cfg.block_m
    consts = dict(
        TRANS_W=trans_w, IS_4BIT=is_4bit, NESTED=is_4bit and w.nested,
        BLOCKSIZE=w.blocksize if is_4bit else 64, BLOCKSIZE2=w.blocksize2 if is_4bit else 256,
        HAS_LORA=lora_l is not None, HAS_BIAS=bias is not None, ACC_OUT=accumulate, DROPOUT=dropout,
        ROUND_BASE=round_base, ROUND_TERM=round_term, COMPUTE=_TL_DTYPES[compute_dtype],
        FAST_4BIT=(2 if cfg.nibbles else True) if wide and not skip_main else False,   # 2: nibble table
        SWAP_AB=is_4bit and not skip_main and compute_dtype != torch.float32 and BM <= SWAP_AB_MAX_M,
        SPLIT=splits > 1, MAIN=not skip_main, SCALE_A=scale_a, SEED_PTR=isinstance(seed, torch.Tensor),
        BLOCK_M=BM, BLOCK_J=cfg.block_j, BLOCK_I=cfg.block_i,
        BLOCK_R=max(RANK_CHUNK_MIN, min(RANK_CHUNK_MAX, _pow2(rank))), GROUP_M=GROUP_M,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=False,
    )
    kernel = _lora_matmul_kernel
    if is_gemv(kind, cfg) and not skip_main:
        # the loop over W pipelined by tl.range, the epilogue's rank loop not at all
        kernel = _lora_matmul_gemv_kernel
        consts.update(STAGES=cfg.num_stages, EPI_M=GEMV_EPILOGUE_M, num_stages=1)
        if GEMV_MAXNREG:
            consts["maxnreg"] = GEMV_MAXNREG
    plan = _Plan()
    plan.cfg, plan.splits, plan.tiles, plan.consts = cfg, splits, tiles, consts
    plan.ints = None
    plan.part_shape = (splits, M, J) if splits > 1 else None
    plan.gemv = kernel is not _lora_matmul_kernel
    plan.launch = _launch.Prepared(kernel, (tiles, splits), consts,
                                   a.device.index if a.device.type == "cuda" else None)
    return plan


def _counters(device: torch.device, n: int) -> torch.Tensor:
    """At least ``n`` int32 split-K counters for launches on ``device``'s current stream (kernels on
    one stream run in order, so the launches of a stream share them; another stream gets its own)."""
    stream = torch._C._cuda_getCurrentRawStream(device.index) if device.type == "cuda" else 0
    key = (device, stream)
    c = _COUNTERS.get(key)
    if c is None or c.numel() < n:
        c = _COUNTERS[key] = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
    return c


# ----------------------------------------------------------------------------------------------
# launcher
# ----------------------------------------------------------------------------------------------

# host-drawn dropout seeds lie in [0, 2**62): two non-negative 31-bit halves, so the kernel's seed
# arguments are always Triton i32 (a value past 2**31 would change the compiled signature)
SEED_RANGE = 1 << 62


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
    seed=None,
    skip_main: bool = False,
    round_base: bool = False,
    round_term: bool = False,
    adapter: bool = False,
    scale_a: bool = False,
    config: Optional[configs.TileConfig] = None,
    defer: bool = False,
):
    """out[M, J] = out_scale · a[M, I] · T[I, J]  (+ lora_scale · lora_l[M, r] · lora_r[r, J], + bias[J],
    + out if accumulate), T = Wᵀ (trans_w False) or W (trans_w True).

    a:      [M, I] any strides, fp16/bf16/fp32
    w:      :class:`Packed4bit` for W [N, K], or a dense 2-D tensor (any strides)
    out:    [M, J], any strides, written in place (and read when accumulate)
    lora_l: [M, r] (H or G), lora_r: [r, J] (a strided view of Bᵀ or A), any float dtype; the term
            is computed in lora_l's dtype (16-bit: tensor cores, lora_r cast to it; fp32: IEEE)
    dropout: DROP_* selects where the keep-mask of X [M', K'] applies (see the module docstring)
    seed:   the dropout seed (required when dropout != DROP_NONE): an int in [0, 2**62) drawn on the
            host, or an int64 [1] tensor on the device (drawn by a kernel: CUDA-graph capture)
    skip_main: run only the epilogue (the frozen product is already in ``out``)
    round_base: round out_scale·a·T + bias to compute_dtype before the LoRA term is added (with no
            LoRA term: the result is rounded to compute_dtype before it is stored in out's dtype)
    round_term: round the frozen product (+ bias) and the LoRA term to out's dtype each on its own,
            then add them (PEFT's sum of the two branches in fp16)
    adapter: the product is one of the adapter products (H, G, dA, dB: one dimension is the rank),
            which has its own tiles when 16-bit
    scale_a: apply out_scale to a (rounded to compute_dtype, then the product), as PEFT's backward
            scales dY before lora_B's, instead of to the product
    config: a tile configuration instead of the table's (the tuner's candidates)
    defer:  resolve the product but do not launch it: returns a :class:`Pending` for
            :func:`launch_together` (None when the product is empty)

    The first call of a specialization class (dtypes, shapes, strides, alignment, flags, target)
    validates it and resolves its plan; later calls look the plan up and launch.
    """
    target = _launch.launch_target(a.device)
    flags = (trans_w, compute_dtype, accumulate, dropout, skip_main, round_base, round_term, adapter, scale_a)
    key = _plan_key(a, w, out, lora_l, lora_r, bias, seed, flags, target, config)
    plan = _PLANS.get(key)
    if plan is None:
        M, J, I, Nw, Kw, rank = _validate(a, w, out, lora_l, lora_r, compute_dtype, dropout, seed, trans_w)
        if M == 0 or J == 0:
            return None if defer else out
        _interpreter.ensure()
        plan = _build_plan(
            a, w, out, lora_l, bias, seed, trans_w=trans_w, compute_dtype=compute_dtype, accumulate=accumulate,
            dropout=dropout, skip_main=skip_main, round_base=round_base, round_term=round_term, adapter=adapter,
            scale_a=scale_a,
            target=target, config=config, M=M, J=J, I=I, Nw=Nw, Kw=Kw, rank=rank)
        swn, swk = (w.K, 1) if isinstance(w, Packed4bit) else w.stride()
        l_, r_ = (lora_l, lora_r) if lora_l is not None else (out, out)
        plan.ints = (a.stride(0), a.stride(1), swn, swk, Kw, l_.stride(0), l_.stride(1), r_.stride(0), r_.stride(1),
                     out.stride(0), out.stride(1), M, J, 0 if skip_main else I, rank)
        _PLANS[key] = plan
    # strides and sizes from the plan: its key holds every tensor's shape and strides
    sa0, sa1, swn, swk, Kw, sl0, sl1, sr0, sr1, so0, so1, M, J, I_, rank = plan.ints
    wargs = kernel_args(w) if isinstance(w, Packed4bit) else (w,) * 6   # dense: decode pointers unread
    if plan.part_shape is not None:
        # the partials' buffer is given at launch (_with_partials)
        part, counts = None, _counters(out.device, plan.tiles)
    else:
        part = counts = out
    if lora_l is None:
        l_ = r_ = out
    else:
        l_, r_ = lora_l, lora_r
    if isinstance(seed, torch.Tensor) or seed is None:
        seed_t, lo, hi = (seed if seed is not None else out), 0, 0
    else:
        seed_t, lo, hi = out, seed & 0x7FFFFFFF, seed >> 31
    keep_scale = 1.0 / (1.0 - dropout_p) if dropout != DROP_NONE else 1.0
    args = (
        a, sa0, sa1,
        *wargs, swn, swk, Kw,
        l_, sl0, sl1,
        r_, sr0, sr1,
        bias if bias is not None else out,
        out, so0, so1,
        part, counts,
        M, J, I_, rank,
        float(out_scale), float(lora_scale), seed_t, lo, hi, float(dropout_p), keep_scale,
    )
    if defer:
        return Pending(key, plan, args)
    plan.launch(*_with_partials(args, plan))
    return out


# ----------------------------------------------------------------------------------------------
# merged launches: independent products (and W's dequantization) of one layer call in one launch
# ----------------------------------------------------------------------------------------------

# a product's runtime arguments: its own (_N_OWN of them) and then the call's dropout (seed, p)
_N_OWN = 30
_COUNT_ARG = 23   # count_ptr's index among them


class Pending:
    """A product resolved by ``lora_matmul(..., defer=True)``: its plan and runtime arguments."""

    __slots__ = ("key", "plan", "args")

    def __init__(self, key, plan, args):
        self.key, self.plan, self.args = key, plan, args


class _MultiPlan:
    __slots__ = ("launch", "counters", "deq_programs")


_MULTI_PLANS: dict = {}


def _suffixed(consts: dict) -> dict:
    return {k + "_1": v for k, v in consts.items() if k not in _LAUNCH_OPTIONS}


_LAUNCH_OPTIONS = ("num_warps", "num_stages", "enable_fp_fusion", "maxnreg")
# A merged kernel's register budget per thread, stated to ptxas (.maxnreg): the most a thread may hold.
# Left to itself, ptxas held some merged kernels of 8 warps at 64 registers (4 programs per SM) and kept
# a value on the stack across the main loop (sm_80, sm_86, sm_89, sm_100); given a budget it allocates
# what the kernel needs. A tighter one (128, 2 programs of 8 warps per SM) spilled the per-element
# decode of odd shapes.
MERGED_MAXNREG = 255


def _dequant_config(q: Packed4bit, device) -> configs.TileConfig:
    return configs.select("dequant", q.N, q.K, 1, _launch.launch_target(device))


def _build_multi(first: Pending, second: Optional[Pending], q: Optional[Packed4bit], device) -> _MultiPlan:
    p0 = first.plan
    consts = {k: v for k, v in p0.consts.items()}
    if second is not None:
        consts.update(_suffixed(second.plan.consts))
    else:
        consts.update(_suffixed(p0.consts))   # never compiled (SEG1 off); the signature needs them
    consts.update(SEG1=second is not None, DEQ=q is not None, maxnreg=MERGED_MAXNREG)
    plan = _MultiPlan()
    plan.deq_programs = 0
    if q is not None:
        BLOCK = _dequant_config(q, device).block_j
        plan.deq_programs = _cdiv(q.N * q.K, BLOCK)
        consts.update(DQ_BLOCKSIZE=q.blocksize, DQ_BLOCKSIZE2=q.blocksize2, DQ_NESTED=q.nested, DQ_BLOCK=BLOCK,
                      DQ_GROUP=min(BLOCK, q.blocksize))
    else:
        consts.update(DQ_BLOCKSIZE=64, DQ_BLOCKSIZE2=256, DQ_NESTED=False, DQ_BLOCK=16, DQ_GROUP=16)
    programs = p0.tiles * p0.splits + (second.plan.tiles * second.plan.splits if second is not None else 0)
    plan.counters = p0.tiles + (second.plan.tiles if second is not None else 0)
    plan.launch = _launch.Prepared(_lora_multi_kernel, (programs + plan.deq_programs,), consts,
                                   device.index if device.type == "cuda" else None)
    return plan


def launch_together(first: Optional[Pending], second: Optional[Pending] = None, dequant=None) -> None:
    """Launch ``first`` and ``second`` (products resolved with ``defer=True``, independent of each
    other) and ``dequant`` = (Packed4bit W, out [N, K]: W dequantized into it) as one launch; each
    program computes what it would in a launch of its own. ``first`` decides the launch's warps and
    pipeline stages (put the product with the main loop that matters most first). Empty products
    (None) are left out; with nothing left to merge the piece is launched on its own."""
    if first is None:
        first, second = second, None
    q, dq_out = dequant if dequant is not None else (None, None)
    if first is None:
        if q is not None:
            dequantize_4bit(q, dq_out.dtype, out=dq_out)
        return
    if (second is None and q is None) or first.plan.gemv or (second is not None and second.plan.gemv):
        # a GEMV has a kernel of its own, which the merged kernel does not run: each piece alone
        first.plan.launch(*_with_partials(first.args, first.plan))
        if second is not None:
            second.plan.launch(*_with_partials(second.args, second.plan))
        if q is not None:
            dequantize_4bit(q, dq_out.dtype, out=dq_out)
        return
    device = first.args[0].device
    key = (first.key, None if second is None else second.key,
           None if q is None else (q.spec, _sig(dq_out)))
    plan = _MULTI_PLANS.get(key)
    if plan is None:
        if q is not None:
            if dq_out.shape != (q.N, q.K) or not dq_out.is_contiguous() or dq_out.device != q.device:
                raise ValueError(f"dequant out must be a contiguous [{q.N}, {q.K}] tensor on {q.device}")
            check_device(q, first.args[0])
        plan = _MULTI_PLANS[key] = _build_multi(first, second, q, device)
    a0, a1 = _partials_together(first, second)
    a1 = a1 if second is not None else a0
    own0, own1 = list(a0[:_N_OWN]), list(a1[:_N_OWN])
    if first.plan.splits > 1 or (second is not None and second.plan.splits > 1):
        counts = _counters(device, plan.counters)
        own0[_COUNT_ARG] = own1[_COUNT_ARG] = counts
    shared = a1[_N_OWN:] if second is not None and second.plan.consts["DROPOUT"] != DROP_NONE else a0[_N_OWN:]
    if q is not None:
        numel = q.N * q.K
        deq = (*kernel_args(q), dq_out, numel, (numel + 1) // 2)
    else:
        deq = (a0[0],) * 7 + (0, 0)
    p1 = second.plan if second is not None else None
    plan.launch(*own0, *own1, *shared, *deq, first.plan.tiles, first.plan.splits,
                p1.tiles if p1 is not None else 0, p1.splits if p1 is not None else 0)
    if _launch.recording_active():
        # what each segment would be as a launch of its own, for fastlora inspect's model
        parts = [_launch.Launch(_lora_matmul_kernel, (first.plan.tiles, first.plan.splits), a0,
                                {k: v for k, v in first.plan.consts.items()})]
        if second is not None:
            parts.append(_launch.Launch(_lora_matmul_kernel, (p1.tiles, p1.splits), a1,
                                        {k: v for k, v in p1.consts.items()}))
        if q is not None:
            dq = _dequant_config(q, device)
            parts.append(_launch.Launch(_dequant_4bit_kernel, (plan.deq_programs,), deq,
                                        dict(BLOCKSIZE=q.blocksize, BLOCKSIZE2=q.blocksize2, NESTED=q.nested,
                                             BLOCK=dq.block_j, GROUP=min(dq.block_j, q.blocksize),
                                             num_warps=dq.num_warps, num_stages=dq.num_stages,
                                             enable_fp_fusion=False)))
        _launch.last_recorded().parts = parts


@triton.jit(do_not_specialize=["seed_lo", "seed_hi"])
def _keep_mask_kernel(out_ptr, M, K, seed_ptr, seed_lo, seed_hi, p, SEED_PTR: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = tl.program_id(1) * BLOCK_K
    cols = k0 + tl.arange(0, BLOCK_K)
    if SEED_PTR:
        seed = tl.load(seed_ptr)
    else:
        seed = (seed_hi.to(tl.int64) << 31) | seed_lo.to(tl.int64)
    keep = _keep(seed, rows, k0, K, p, BLOCK_K)
    tl.store(out_ptr + rows[:, None] * K + cols[None, :], keep.to(tl.int8),
             mask=(rows[:, None] < M) & (cols[None, :] < K))


def seed_tensor(seed: int, device) -> torch.Tensor:
    """A dropout seed as a device tensor: int64 [1] on ``device``, written by a fill kernel (no copy
    from the host: a CUDA graph can capture it, and each replay writes the same seed)."""
    return torch.full((1,), int(seed), dtype=torch.int64, device=device)


def dropout_keep_mask(M: int, K: int, p: float, seed, device) -> torch.Tensor:
    """The bool keep-mask [M, K] the kernels apply for (seed, p); ``seed`` an int in [0, 2**62) or
    a seed tensor. For tests and debugging only: the fused op never materializes it."""
    _interpreter.ensure()
    out = torch.empty((M, K), dtype=torch.int8, device=device)
    if M * K:
        BM, BK = 16, 64
        if isinstance(seed, torch.Tensor):
            args = (seed, 0, 0)
        else:
            args = (out, int(seed) & 0x7FFFFFFF, int(seed) >> 31)
        _launch.launch(_keep_mask_kernel, (_cdiv(M, BM), _cdiv(K, BK)), out, M, K, *args, float(p),
                       SEED_PTR=isinstance(seed, torch.Tensor), BLOCK_M=BM, BLOCK_K=BK, device=out.device)
    return out.bool()


# ----------------------------------------------------------------------------------------------
# GEMV: the frozen 4-bit product at a few tokens, without the tensor cores
# ----------------------------------------------------------------------------------------------

# the row count the epilogue's LoRA term runs at (its tl.dot needs 16 rows; a GEMV tile has <= 8)
GEMV_EPILOGUE_M = 16
# the GEMV's register budget per thread, stated to ptxas: left to itself it held fp16's dY·W at M = 1
# to 72 registers and kept 8 B on the stack on sm_86 (as with the merged kernel, MERGED_MAXNREG)
GEMV_MAXNREG = 255


@triton.jit(do_not_specialize=["seed_lo", "seed_hi"])
def _lora_matmul_gemv_kernel(
    a_ptr, stride_am, stride_ai, w_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
    stride_wn, stride_wk, Kw, l_ptr, stride_lm, stride_lr, r_ptr, stride_rr, stride_rj, bias_ptr,
    out_ptr, stride_om, stride_oj, part_ptr, count_ptr, M, J, I, rank, out_scale, lora_scale,
    seed_ptr, seed_lo, seed_hi, p, keep_scale,
    TRANS_W: tl.constexpr, IS_4BIT: tl.constexpr, NESTED: tl.constexpr, BLOCKSIZE: tl.constexpr,
    BLOCKSIZE2: tl.constexpr, HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr,
    ACC_OUT: tl.constexpr, DROPOUT: tl.constexpr, ROUND_BASE: tl.constexpr, COMPUTE: tl.constexpr,
    FAST_4BIT: tl.constexpr, SWAP_AB: tl.constexpr, SPLIT: tl.constexpr, MAIN: tl.constexpr,
    SCALE_A: tl.constexpr, SEED_PTR: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr, ROUND_TERM: tl.constexpr,
    STAGES: tl.constexpr, EPI_M: tl.constexpr,
):
    """The frozen product of a 4-bit W (the wide decode) at M <= BLOCK_M <= 8 rows per program: the
    same arguments, semantics and epilogue as :func:`_lora_matmul_kernel`, but the decoded W tile
    is multiplied on the FMA units where it lies in registers (one row of ``a`` at a time), so it
    never goes through shared memory to a tensor-core tile that would be 16 rows of mostly padding.
    Grid (row-block · column-block, splits); split-K sums as the GEMM does (the last program of a
    tile adds the fp32 partials in split order). The loop over W is software-pipelined STAGES deep."""
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    nsplit = tl.num_programs(1)
    num_j = tl.cdiv(J, BLOCK_J)
    pid_m = pid // num_j
    pid_j = pid % num_j
    m0 = pid_m * BLOCK_M
    offs_j = (pid_j * BLOCK_J + tl.arange(0, BLOCK_J)).to(tl.int64)
    mask_j = offs_j < J
    # the tile's rows, padded to the epilogue's EPI_M (rows past BLOCK_M or M are masked off)
    rows = tl.arange(0, EPI_M)
    offs_m = (m0 + rows).to(tl.int64)
    mask_m = (offs_m < M) & (rows < BLOCK_M)
    pairs = pair_table(code_ptr) if FAST_4BIT != 2 else nibble_table(code_ptr)
    # accumulators laid out like the decoded W tile, so that no row's sum changes layout in the loop:
    # forward [BLOCK_J, EPI_M] (W's rows are the outputs), backward [EPI_M, BLOCK_J]
    if TRANS_W:
        acc = tl.zeros((EPI_M, BLOCK_J), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_J, EPI_M), dtype=tl.float32)
    steps_per_split = tl.cdiv(tl.cdiv(I, BLOCK_I), nsplit)
    i_lo = pid_s * steps_per_split * BLOCK_I
    i_hi = tl.minimum(I, i_lo + steps_per_split * BLOCK_I)
    for i0 in tl.range(i_lo, i_hi, BLOCK_I, num_stages=STAGES):
        offs_i = i0 + tl.arange(0, BLOCK_I).to(tl.int64)
        mask_i = offs_i < I
        if TRANS_W:
            # W[i0 : i0 + BLOCK_I, columns of this tile]: [BLOCK_I, BLOCK_J]
            t = decode_4bit_rows(w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, pairs,
                                 offs_i, mask_i, pid_j * BLOCK_J, Kw, BLOCK_J, BLOCKSIZE, BLOCKSIZE2, NESTED)
        else:
            # W[rows of this tile, i0 : i0 + BLOCK_I]: [BLOCK_J, BLOCK_I]
            t = decode_4bit_rows(w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, pairs,
                                 offs_j, mask_j, i0, Kw, BLOCK_I, BLOCKSIZE, BLOCKSIZE2, NESTED)
        t = t.to(COMPUTE).to(tl.float32)          # the weight as the MMA (and the dequant) sees it
        for mm in tl.static_range(BLOCK_M):
            row_ok = mask_i & ((offs_i * 0 + m0 + mm) < M)
            a = tl.load(a_ptr + (m0 + mm).to(tl.int64) * stride_am + offs_i * stride_ai, mask=row_ok, other=0.0)
            if SCALE_A:
                a = tl.where(row_ok, a.to(COMPUTE).to(tl.float32) * out_scale, 0.0)
            a = a.to(COMPUTE).to(tl.float32)
            if TRANS_W:
                part = tl.sum(t * a[:, None], axis=0)                               # [BLOCK_J]
                acc += tl.where(rows[:, None] == mm, part[None, :], 0.0)
            else:
                part = tl.sum(t * a[None, :], axis=1)                               # [BLOCK_J]
                acc += tl.where(rows[None, :] == mm, part[:, None], 0.0)
    if not TRANS_W:
        acc = tl.trans(acc)                                                          # [EPI_M, BLOCK_J]
    if SCALE_A:
        out_scale = 1.0
    if SPLIT:
        slice_elems = (pid_s.to(tl.int64) * 0 + M) * J
        local = offs_m[:, None] * J + offs_j[None, :]                               # int64, [EPI_M, BLOCK_J]
        tl.store(part_ptr + pid_s * slice_elems + local, acc, mask=mask_m[:, None] & mask_j[None, :])
        tl.debug_barrier()
        arrived = tl.atomic_add(count_ptr + pid, 1, sem="acq_rel")
        last = arrived == nsplit - 1
        mask_m = mask_m & ((offs_m * 0 + arrived) == nsplit - 1)
        tile_mask = mask_m[:, None] & mask_j[None, :]
        acc = tl.zeros((EPI_M, BLOCK_J), dtype=tl.float32)
        for s in range(0, tl.where(last, nsplit, 0)):
            acc += tl.load(part_ptr + s * slice_elems + local, mask=tile_mask, other=0.0, cache_modifier=".cg")
        tl.atomic_add(count_ptr + pid, tl.where(last, -nsplit, 0))
    seed = 0
    if DROPOUT != 0:
        if SEED_PTR:
            seed = tl.load(seed_ptr)
        else:
            seed = (seed_hi.to(tl.int64) << 31) | seed_lo.to(tl.int64)
    _epilogue(acc, offs_m, offs_j, pid_j * BLOCK_J, mask_m, mask_j, l_ptr, stride_lm, stride_lr, r_ptr, stride_rr,
              stride_rj, bias_ptr, out_ptr, stride_om, stride_oj, J, rank, out_scale, lora_scale, seed, p, keep_scale,
              HAS_LORA, HAS_BIAS, ACC_OUT, DROPOUT, ROUND_BASE, COMPUTE, EPI_M, BLOCK_J, BLOCK_R, ROUND_TERM)


# ----------------------------------------------------------------------------------------------
# split-K's partial sums: one buffer per device and stream, reused by every launch
# ----------------------------------------------------------------------------------------------

# A launch's partial sums are written and read back within that launch (each tile's last program
# adds them), and the launches of one stream run one after another, so every launch of a stream
# can use the same buffer: a split product then costs no allocation per call (a torch.empty on a GPU
# costs the host about 6 µs; a training step at M <= 16 had four). Two products in one launch take
# regions of their own. During CUDA-graph capture, and for tensor subclasses (fake tensors), each
# call allocates its own, as before: a graph keeps the addresses it captured.
_PARTIALS: dict = {}
# region offsets in fp32 elements: multiples of 64 (256 B), the alignment torch.empty gives, which
# Triton specializes the pointer on (16 B)
PARTIALS_ALIGN = 64


def _partials_buffer(like: torch.Tensor, numel: int) -> torch.Tensor:
    """An fp32 buffer of at least ``numel`` elements for split-K partials on ``like``'s device."""
    device = like.device
    if type(like) is not torch.Tensor or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        return torch.empty(numel, dtype=torch.float32, device=device)
    key = (device, torch._C._cuda_getCurrentRawStream(device.index) if device.type == "cuda" else 0)
    buf = _PARTIALS.get(key)
    if buf is None or buf.numel() < numel:
        # the old buffer goes back to the caching allocator, which reuses it only for work queued
        # on its stream after the launches that used it
        buf = _PARTIALS[key] = torch.empty(numel, dtype=torch.float32, device=device)
    return buf


def _part_numel(plan) -> int:
    s, m, j = plan.part_shape
    return -(-(s * m * j) // PARTIALS_ALIGN) * PARTIALS_ALIGN


def _with_partials(args: tuple, plan, offset: int = 0, buf: Optional[torch.Tensor] = None) -> tuple:
    """``args`` with the partial sums' buffer in place (at ``offset`` elements into ``buf``), for a
    product with split-K; unchanged otherwise."""
    if plan.part_shape is None:
        return args
    if buf is None:
        buf = _partials_buffer(args[0], offset + _part_numel(plan))
    part = buf if offset == 0 else buf[offset:]
    return args[:_COUNT_ARG - 1] + (part,) + args[_COUNT_ARG:]


def _partials_together(first: Pending, second: Optional[Pending]):
    """The two products' arguments for one merged launch: disjoint regions of one buffer."""
    n0 = _part_numel(first.plan) if first.plan.part_shape is not None else 0
    if second is None or second.plan.part_shape is None:
        return _with_partials(first.args, first.plan), (second.args if second is not None else None)
    buf = _partials_buffer(first.args[0], n0 + _part_numel(second.plan))
    return _with_partials(first.args, first.plan, 0, buf), _with_partials(second.args, second.plan, n0, buf)


def release_partials() -> int:
    """Frees the split-K partial-sum buffers (the next split product allocates again); returns the
    bytes released. Peak-memory measurements call it first, so that what a call needs is counted
    within the call."""
    n = sum(b.numel() * b.element_size() for b in _PARTIALS.values())
    _PARTIALS.clear()
    return n

