"""bitsandbytes 4-bit (NF4 / FP4) weights: the packed layout, the in-kernel decode, a dequant kernel.

Layout (bitsandbytes >= 0.45; the flat order is what matters, the tensor's shape does not):

    W [N, K] (out_features x in_features), flattened row-major:  w_0 w_1 w_2 ... w_{N*K-1}

    packed byte j  =  | w_{2j} : high nibble | w_{2j+1} : low nibble |      ([-1.0, 1.0] -> 0x0F)
                          bits 7..4              bits 3..0

    absmax block b covers flat elements [b*BLOCKSIZE, (b+1)*BLOCKSIZE); when K is not a multiple of
    BLOCKSIZE a block straddles two rows, so blocks are indexed by flat position, never by (n, k).

    value(w_f) = code[nibble_f] * absmax[f // BLOCKSIZE]          (fp32, then one rounding to out dtype)

    double quant ("nested"): absmax is stored as uint8 codes q[b] and
        absmax[b] = code2[q[b]] * absmax2[b // BLOCKSIZE2] + offset  (multiply, round, add, round:
                                                                      as bitsandbytes, no FMA)

``code`` is the 16-entry table of the quant type (NF4 or FP4), ``code2`` the 256-entry table of the
second level, BLOCKSIZE2 is 256 in every bitsandbytes release.

Two decodes, both ``@triton.jit`` helpers used by the fused GEMM (``lora_matmul.py``):

- :func:`decode_4bit_rows` (K even, K % BLOCKSIZE == 0, the common case): a W tile [R, C] is R runs
  of C/2 whole bytes, read as [R, C/2] uint8 vectors, decoded by gathers from a table in registers
  that Triton stages in shared memory: the pair table (:func:`decode_bytes`, one read per byte) or
  the nibble table (:func:`decode_nibbles`, one per nibble, no bank conflicts; see its section);
  one absmax per (row, block) is broadcast. Why tables: in the compiled SASS for sm_89 (static
  counts, ``fastlora inspect``), the per-element decode spends several times the instructions per
  weight in the main loop, and a warp-local gather from the 16-entry table (shuffles) about 3.5x.
- :func:`decode_4bit` (any layout: odd K, blocks straddling rows): per element, by flat position.

The values stay code·absmax in fp32 rounded once, as bitsandbytes' dequant, so the fused product
multiplies exactly the weights the dequant path multiplies. The dequant kernel decodes by flat
position with the same pair table: BLOCK/2 bytes per program in 16-byte reads, GROUP elements per absmax. Launchers here take plain tensors packed
in a :class:`Packed4bit`; reading them out of bitsandbytes objects is ``fastlora.format``'s job.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from . import _interpreter, _launch, configs

_OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class Packed4bit:
    """Everything a kernel needs to decode a bitsandbytes 4-bit weight W [N, K].

    packed:   uint8 [ceil(N*K/2)]  two elements per byte, first one in the high nibble
    code:     fp32  [16]           NF4 or FP4 table
    absmax:   fp32  [ceil(N*K/blocksize)] when not nested; uint8 codes when nested
    absmax2:  fp32  [ceil(len(absmax)/blocksize2)]   (nested only)
    code2:    fp32  [256]                           (nested only)
    offset:   fp32  [1]  on the device (nested only; a tensor, so reading it never syncs the GPU)
    All tensors are contiguous, on one device, and are views of the caller's storage (no copies).
    """

    packed: torch.Tensor
    N: int
    K: int
    blocksize: int
    code: torch.Tensor
    absmax: torch.Tensor
    quant_type: str = "nf4"
    absmax2: Optional[torch.Tensor] = None
    code2: Optional[torch.Tensor] = None
    blocksize2: int = 256
    offset: Optional[torch.Tensor] = None
    dtype: Optional[torch.dtype] = None  # the compute dtype bitsandbytes recorded, if any

    @property
    def nested(self) -> bool:
        return self.absmax2 is not None

    @functools.cached_property
    def spec(self) -> tuple:
        """What of this weight decides a kernel's compiled specialization: its sizes, its layout and
        the 16-byte alignment of its tensors (computed once: the tensors of a Packed4bit are fixed)."""
        return (self.N, self.K, self.blocksize, self.blocksize2, self.nested, self.absmax.dtype,
                tuple(t.data_ptr() % 16 == 0 for t in kernel_args(self)))

    @property
    def device(self) -> torch.device:
        return self.packed.device


# ----------------------------------------------------------------------------------------------
# jit helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def decode_4bit(
    w_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
    flat, mask,
    BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
):
    """Decode the 4-bit elements at flat positions ``flat`` (int64, any block shape) to fp32.

    Masked-off lanes read byte 0 and (plain absmax) absmax 0; with double quant they decode to
    code[0]·offset. Callers mask the other operand of the dot or the store, so they add nothing.
    """
    byte = tl.load(w_ptr + (flat >> 1), mask=mask, other=0).to(tl.int32)
    # even flat index -> high nibble (shift 4), odd -> low nibble (shift 0)
    shift = (1 - (flat & 1).to(tl.int32)) * 4
    nibble = (byte >> shift) & 0xF
    value = tl.load(code_ptr + nibble)                       # 16-entry table gather, fp32
    absmax = block_absmax(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, flat // BLOCKSIZE, mask,
                          BLOCKSIZE2, NESTED)
    return value * absmax


@triton.jit
def block_absmax(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, block, mask,
                 BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr):
    """The fp32 absmax of the blocks ``block`` (int64, any shape); double quant decoded as bitsandbytes."""
    if NESTED:
        q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale2 = tl.load(absmax2_ptr + block // BLOCKSIZE2, mask=mask, other=0.0)
        absmax = tl.load(code2_ptr + q) * scale2 + tl.load(offset_ptr)   # fp fusion off: no FMA
    else:
        absmax = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return absmax


@triton.jit
def pair_table(code_ptr):
    """[256] int64: entry b holds the fp32 bits of code[b >> 4] (low word) and code[b & 15] (high
    word), the two values a packed byte b decodes to, so one table read decodes two elements."""
    b = tl.arange(0, 256)
    first = tl.load(code_ptr + (b >> 4)).to(tl.uint32, bitcast=True).to(tl.int64)
    second = tl.load(code_ptr + (b & 15)).to(tl.uint32, bitcast=True).to(tl.int64)
    return first | (second << 32)


@triton.jit
def decode_bytes(byte, pairs):
    """Packed bytes [..., C] (uint8) -> code values [..., 2C] fp32, element 2c from the high nibble
    of byte c and 2c+1 from the low one; one gather from the 256-entry pair table per byte."""
    shape: tl.constexpr = byte.shape
    n: tl.constexpr = byte.numel
    pair = tl.reshape(tl.gather(pairs, tl.reshape(byte.to(tl.int32), (n,)), 0), shape)
    first = (pair & 0xFFFFFFFF).to(tl.uint32).to(tl.float32, bitcast=True)
    second = (pair >> 32).to(tl.uint32).to(tl.float32, bitcast=True)
    return tl.interleave(first, second)


@triton.jit
def decode_4bit_rows(
    w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, pairs,
    offs_n, mask_n, k0, Kw,
    BLOCK_C: tl.constexpr, BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
):
    """W[offs_n, k0 : k0 + BLOCK_C] as fp32 [R, BLOCK_C], for Kw even and Kw % BLOCKSIZE == 0 (k0 a
    multiple of BLOCK_C): each row's run is BLOCK_C // 2 whole bytes and covers whole absmax blocks
    (or lies inside one). ``pairs``: :func:`pair_table` or :func:`nibble_table`. Masked rows: 0."""
    offs_b = k0 // 2 + tl.arange(0, BLOCK_C // 2)                          # [BLOCK_C // 2] bytes in the row
    mask = mask_n[:, None] & (offs_b < Kw // 2)[None, :]
    byte = tl.load(w_ptr + offs_n[:, None] * (Kw // 2) + offs_b[None, :], mask=mask, other=0)  # [R, C/2] u8
    value = decode_bytes(byte, pairs) if pairs.dtype == tl.int64 else decode_nibbles(byte, pairs)  # [R, C]
    R: tl.constexpr = byte.shape[0]
    if BLOCK_C <= BLOCKSIZE:
        block = offs_n * (Kw // BLOCKSIZE) + k0 // BLOCKSIZE              # [R]: one block per row run
        absmax = block_absmax(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, block, mask_n,
                              BLOCKSIZE2, NESTED)
        value = value * absmax[:, None]
    else:
        NG: tl.constexpr = BLOCK_C // BLOCKSIZE                           # whole blocks per row run
        offs_g = k0 // BLOCKSIZE + tl.arange(0, NG)
        block = offs_n[:, None] * (Kw // BLOCKSIZE) + offs_g[None, :]     # [R, NG]
        absmax = block_absmax(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, block,
                              mask_n[:, None] & (offs_g < Kw // BLOCKSIZE)[None, :], BLOCKSIZE2, NESTED)
        value = tl.reshape(tl.reshape(value, (R, NG, BLOCKSIZE)) * absmax[:, :, None], (R, BLOCK_C))
    return value


# ----------------------------------------------------------------------------------------------
# dequant kernel: W [N, K] packed -> W [N, K] in fp16 / bf16 / fp32
# ----------------------------------------------------------------------------------------------


@triton.jit
def _dequant_4bit_kernel(
    w_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
    out_ptr, numel, nbytes,
    BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
    BLOCK: tl.constexpr, GROUP: tl.constexpr,
):
    dequant_block(tl.program_id(0), w_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                  out_ptr, numel, nbytes, BLOCKSIZE, BLOCKSIZE2, NESTED, BLOCK, GROUP)


@triton.jit
def dequant_block(
    pid, w_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
    out_ptr, numel, nbytes,
    BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
    BLOCK: tl.constexpr, GROUP: tl.constexpr,
):
    """out[f] = code[nibble_f] · absmax[f // BLOCKSIZE] for the BLOCK flat positions of block ``pid``
    (the dequant kernel's program, or a program of a merged launch's dequant segment).

    Flat positions are all the dequant needs (a block straddling rows is no special case here): the
    program reads BLOCK // 2 bytes as one run, splits the nibbles in registers, and scales groups of
    GROUP = min(BLOCK, BLOCKSIZE) consecutive elements by one absmax each.
    """
    pid = pid.to(tl.int64)
    pairs = pair_table(code_ptr)                                         # [256] int64
    offs_b = pid * (BLOCK // 2) + tl.arange(0, BLOCK // 2)               # [BLOCK // 2] bytes
    # nbytes = ceil(numel / 2) as an argument: when it is a multiple of 16 (Triton specializes that),
    # the mask is uniform over 16-byte chunks and the read is 16-byte vectors, not single bytes
    byte = tl.load(w_ptr + offs_b, mask=offs_b < nbytes, other=0)
    value = decode_bytes(byte, pairs)                                    # [BLOCK] fp32 codes
    NG: tl.constexpr = BLOCK // GROUP
    block = (pid * BLOCK) // BLOCKSIZE + tl.arange(0, NG)                # [NG] absmax blocks
    absmax = block_absmax(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, block,
                          block * BLOCKSIZE < numel, BLOCKSIZE2, NESTED)
    w = tl.reshape(tl.reshape(value, (NG, GROUP)) * absmax[:, None], (BLOCK,))
    flat = pid * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + flat, w.to(out_ptr.dtype.element_ty), mask=flat < numel)


def wide_decode_ok(q: Packed4bit) -> bool:
    """Whether the fused GEMM can decode ``q`` with :func:`decode_4bit_rows`: K even (a row starts on
    a byte) and a multiple of the blocksize (no absmax block straddles two rows). Otherwise it falls
    back to the per-element :func:`decode_4bit`, correct for any layout."""
    return q.K % 2 == 0 and q.K % q.blocksize == 0


def kernel_args(q: Packed4bit):
    """The pointer/scalar arguments every kernel that decodes ``q`` takes, in decode_4bit's order."""
    if q.nested:
        return (q.packed, q.code, q.absmax, q.absmax2, q.code2, q.offset)
    # unused pointers still need a valid tensor; the NESTED constexpr keeps them unread
    return (q.packed, q.code, q.absmax, q.absmax, q.code, q.code)


def check_device(q: Packed4bit, *others: torch.Tensor, what: str = "input") -> None:
    for t in others:
        if t is not None and t.device != q.device:
            raise ValueError(f"{what} is on {t.device} but the 4-bit weight is on {q.device}")
    if q.device.type == "meta" and not (_launch.recording_active() or _launch.stub_active()):
        # a meta tensor has no data: without this, the interpreter fails deep inside with
        # "Cannot copy out of meta tensor" and a GPU launch with an invalid pointer
        raise ValueError("the 4-bit weight is on the meta device (it has no data): load or move the model "
                         "to a GPU before calling fastlora's kernels")
    _launch.require_runnable(q.device, "the 4-bit weight")


def dequantize_4bit(q: Packed4bit, dtype: torch.dtype = torch.bfloat16, out: Optional[torch.Tensor] = None):
    """W [N, K] in ``dtype`` from a :class:`Packed4bit`; bit-exact with bitsandbytes' dequantize_4bit."""
    if dtype not in _OUT_DTYPES:
        raise TypeError(f"dequantize: dtype must be one of float16, bfloat16, float32, got {dtype}")
    check_device(q)
    _interpreter.ensure()
    if out is None:
        out = torch.empty((q.N, q.K), dtype=dtype, device=q.device)
    elif out.shape != (q.N, q.K) or out.dtype != dtype or not out.is_contiguous() or out.device != q.device:
        raise ValueError(
            f"dequantize: out must be a contiguous {dtype} tensor of shape {(q.N, q.K)} on {q.device}, got "
            f"{out.dtype} {tuple(out.shape)} on {out.device} (contiguous={out.is_contiguous()})"
        )
    numel = q.N * q.K
    if numel == 0:
        return out
    # elements per program from the table (4096: 2 KiB of packed bytes read as one run)
    cfg = configs.select("dequant", q.N, q.K, 1, _launch.launch_target(q.device))
    BLOCK = cfg.block_j
    grid = (-(-numel // BLOCK),)
    _launch.launch(
        _dequant_4bit_kernel, grid,
        *kernel_args(q), out, numel, (numel + 1) // 2,
        BLOCKSIZE=q.blocksize, BLOCKSIZE2=q.blocksize2, NESTED=q.nested, BLOCK=BLOCK,
        GROUP=min(BLOCK, q.blocksize), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        enable_fp_fusion=False, device=q.device,
    )
    return out


# ----------------------------------------------------------------------------------------------
# the nibble-table decode: the same values, table reads without shared-memory bank conflicts
# ----------------------------------------------------------------------------------------------
# The pair table's reads are data-dependent 8-byte loads from one 2 KiB table: on the bytes of a
# Gaussian weight quantized to NF4 they cost about 6 shared-memory wavefronts per warp-wide read
# where 2 are the least (``fastlora.sm_model``: lanes whose entries differ but share a bank are
# served one after another). The nibble table holds the 16 code values 33 entries apart (entry 33·c
# = code[c], on bank c): lanes reading one value share its address, lanes reading different values
# read different banks, so every warp-wide read is one wavefront, whatever the bytes, at the price
# of two reads per byte (one per nibble). It has 512 entries so that Triton stages it in shared
# memory (a table that fits in a warp's registers is gathered with shuffles, several times the
# instructions). :func:`decode_4bit_rows` takes either table and dispatches on its dtype.
NIBBLE_STRIDE = tl.constexpr(33)


@triton.jit
def nibble_table(code_ptr):
    """[512] fp32: entry i = code[i // 32], so entry 33·c (c < 16) holds code[c]."""
    i = tl.arange(0, 512)
    return tl.load(code_ptr + (i >> 5))


@triton.jit
def decode_nibbles(byte, table):
    """Packed bytes [R, C] (uint8) -> code values [R, 2C] fp32, as :func:`decode_bytes` (element 2c
    from the high nibble of byte c, 2c+1 from the low one), one read of :func:`nibble_table` per
    nibble, at entry 33·nibble."""
    R: tl.constexpr = byte.shape[0]
    C: tl.constexpr = byte.shape[1]
    b = byte.to(tl.int32)
    idx = tl.reshape(tl.interleave((b >> 4) * NIBBLE_STRIDE, (b & 15) * NIBBLE_STRIDE), (2 * R * C,))
    return tl.reshape(tl.gather(table, idx, 0), (R, 2 * C))
