"""Launch configurations as data: one small table per GPU family, looked up by the kind of product and M.

A launcher asks :func:`select` with the kind of product it runs, its problem size and a
:class:`~fastlora.kernels.targets.Target` (the device's, or one named explicitly: that is how
``fastlora inspect`` and the tests ask on a CPU what an RTX 4090 would run). The answer is the first
row of the family's table for that kind whose ``max_m`` is at least M, with the tiles then narrowed
to the problem where a dimension is smaller than the tile (a rank-16 product does not get a 128-wide
tile). Nothing about tiles is decided anywhere else.

Kinds of product (see ``lora_matmul.py`` for the products themselves):

    frozen4     Y = X·Wᵀ / dX = dY·W with W decoded from 4 bits in the main loop (the wide decode:
                K even and a multiple of the blocksize, every Llama/Qwen/Mistral projection)
    frozen4_flat  the same with the per-element decode (odd K, blocks straddling rows)
    dense       the same over a dense fp16/bf16 W
    lora        H = D(X)·Aᵀ, G = dY·B, dA, dB: fp32 products with one small dimension (the rank)
    lora16      the same products in bf16/fp16 on the tensor cores (adapters under autocast, or
                16-bit adapters): the tile is narrowed to the rank on its small side, so the big
                side is what fills an SM; split-K fills the GPU
    epilogue    the LoRA term + bias + mask on an output cuBLAS already holds (no main loop)

A frozen4 row whose tile has fewer than 16 rows (``GEMV_ROW``) runs ``lora_matmul._lora_matmul_gemv_kernel``:
the decoded W multiplied on the FMA units, no tensor-core tile of padding rows.
    dequant     W [N, K] from 4 bits (``quant4.dequantize_4bit``): BLOCK elements per program

Families: ``sm_90`` (Hopper, 227 KB shared memory per block), ``sm_100`` (datacenter Blackwell: B200,
227 KB, tcgen05 tensor cores), ``sm_80`` (A100, 163 KB), ``sm_8x`` (sm_86 / sm_89 and any sm_8x-or-newer
part with at most 99 KB per block below sm_120: RTX 30xx/40xx, A10, A40, L4, L40S), ``sm_12x``
(consumer Blackwell, 99 KB: RTX 50xx, RTX PRO 6000 Blackwell, GB10), ``sm_75`` (Turing, 64 KB, fp16
only, no tensor-core lowering in Triton). A device is put in the family its compute capability *and*
its shared memory per block allow.

Every row is compiled for every target of its family by ``tests/test_gpu_targets.py`` (shared
memory within the target's limit, zero spill bytes, tensor-core instructions where it multiplies
16×16 tiles or more); ``fastlora inspect`` shows the same figures.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Tuple

from .targets import TARGETS, Target


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_j: int
    block_i: int
    num_warps: int
    num_stages: int
    split: int = 1        # most splits of the reduction (split-K); see :func:`splits`
    # 4-bit kinds with the wide decode: read the code values from the nibble table (no shared-memory
    # bank conflicts, two reads per byte: ``quant4.decode_nibbles``) instead of the pair table (one
    # read per byte, conflicting on real NF4 bytes)
    nibbles: bool = False

    def as_tuple(self):
        return (self.block_m, self.block_j, self.block_i, self.num_warps, self.num_stages)


KINDS = ("frozen4", "frozen4_lora32", "frozen4_flat", "dense", "lora", "lora16", "epilogue", "dequant")

_C = TileConfig
_INF = 1 << 62

# (max_m, config) rows per kind; first row with M <= max_m wins. dequant rows: block_j = elements
# per program (block_m / block_i unused, 1). The sm_80-and-up rows fit, without spills, on sm_80,
# sm_86, sm_89 and sm_90 (tests/test_gpu_targets.py); ``fastlora inspect`` prints, per target, the
# shared memory, registers and instructions per decoded weight each row compiles to. Why these rows:
#   frozen4, M <= 16: a 16-row tile (the smallest MMA tile), split-K up to 32 ways to fill the GPU:
#     at small M the product reads the weight once, and only the decode's instructions and the bytes
#     matter. 128 wide with 8 warps: 16 x 256 x 128 reached 255 registers and spilled 8 B on sm_86 /
#     sm_89 once each tile's last split program adds the partials up
#   frozen4, M > 16: 128 x 128 x 64 with 8 warps: twice the MMA work per decoded weight of 128 x 64,
#     and no spills with the dropout mask's one Philox call per four elements
#   lora16: 8 warps for the 128-row tile: with 4, odd K (unaligned rows, no cp.async) spilled
_SM80_UP = {
    "frozen4": [(16, _C(16, 128, 128, 8, 2, 32)), (_INF, _C(128, 128, 64, 8, 3, 32))],
    # an fp32 LoRA term (fp32 adapters without autocast) in the epilogue: 128 x 64 for M > 16, where
    # 128 x 128 spilled 8 B on sm_80..sm_89 with split-K's sum and the fp32 term in one launch; and a
    # 32-deep step with 2 stages: 128 x 64 x 64 with 3 stages held X·Wᵀ at 255 registers, and Triton
    # 3.6 spilled 16 B there (with 2 stages, both Tritons spilled 16-32 B); 128 x 64 x 32 with 2
    # stages: at most 255 registers in dY·W and no spills under 3.6 or 3.9 on sm_80 / sm_86 / sm_89
    "frozen4_lora32": [(16, _C(16, 128, 128, 8, 2, 32)), (_INF, _C(128, 64, 32, 8, 2, 32))],
    "frozen4_flat": [(16, _C(16, 64, 32, 4, 1, 8)), (_INF, _C(32, 64, 32, 4, 1))],
    "dense": [(16, _C(16, 128, 64, 4, 3, 8)), (_INF, _C(128, 64, 64, 8, 3))],
    "lora": [(_INF, _C(64, 32, 32, 4, 2, 32))],
    "lora16": [(64, _C(64, 64, 64, 4, 3, 32)), (_INF, _C(128, 64, 64, 8, 3, 32))],
    "epilogue": [(_INF, _C(64, 64, 16, 8, 1))],
    "dequant": [(_INF, _C(1, 4096, 1, 4, 1))],
}

TABLES: Dict[str, Dict[str, List[Tuple[int, TileConfig]]]] = {
    # M <= 16: 16 x 128 x 128, 4 warps, 1 stage: half the split-K partials of a 256-wide tile, and
    # no software pipelining, so the loads go straight to registers (no staging through shared
    # memory) and the decode takes fewer instructions per weight than the sm_8x row (static counts).
    # What no static count sees: memory latency is then hidden only by the resident programs and each
    # thread's loads in flight; measured choices (fastlora.tuning) replace this row on a real H100.
    # M > 16: 2 stages: with 3, X·Wᵀ with an fp32 LoRA epilogue (fp32 adapters, no autocast) spills
    "sm_90": {**_SM80_UP, "frozen4": [(16, _C(16, 128, 128, 4, 1, 32)), (_INF, _C(128, 128, 64, 8, 2, 32))],
              "frozen4_lora32": [(16, _C(16, 128, 128, 4, 1, 32)), (_INF, _C(128, 64, 64, 8, 2, 32))]},
    "sm_80": dict(_SM80_UP),
    # 99 KB per block: the small-M dense tile with 2 stages, not 3. The M <= 16 4-bit tile with 1
    # stage: with 2, ptxas held X·Wᵀ and dY·W to 128 registers and spilled 8-16 B on sm_86 / sm_89
    # (at most 198 with 1 stage, and the same modelled time)
    "sm_8x": {**_SM80_UP, "dense": [(16, _C(16, 128, 64, 4, 2, 8)), (_INF, _C(128, 64, 64, 8, 3))],
              "frozen4": [(16, _C(16, 128, 128, 8, 1, 32)), (_INF, _C(128, 128, 64, 8, 3, 32))],
              "frozen4_lora32": [(16, _C(16, 128, 128, 8, 1, 32)), (_INF, _C(128, 64, 32, 8, 2, 32))]},
    "sm_75": {
        # Triton lowers tl.dot to FMA here: the frozen product goes to cuBLAS (ops' strategy rule),
        # the fused rows exist so that an explicit strategy="fused" still launches within 64 KB
        "frozen4": [(_INF, _C(16, 64, 32, 4, 1))],
        "frozen4_lora32": [(_INF, _C(16, 64, 32, 4, 1))],
        "frozen4_flat": [(_INF, _C(16, 64, 32, 4, 1))],
        "dense": [(_INF, _C(32, 64, 32, 4, 1))],
        "lora": [(_INF, _C(32, 32, 32, 4, 1, 16))],
        "lora16": [(_INF, _C(32, 32, 32, 4, 1, 16))],
        "epilogue": [(_INF, _C(32, 64, 16, 4, 1))],
        "dequant": [(_INF, _C(1, 4096, 1, 4, 1))],
    },
}

# consumer Blackwell (sm_120: RTX 50xx, RTX PRO 6000 Blackwell; sm_121: GB10): 99 KB per block like
# sm_8x, and sm_8x's rows but these. The M > 16 4-bit tile: 128 x 128 x 64 with 3 stages reached 255
# registers and spilled 8-56 B there (2 stages: up to 48 B; 128 x 64 x 64: 8 B); 128 x 128 x 32 keeps
# the MMA work per decoded weight, at 218-234 registers and no spills
TABLES["sm_12x"] = {**TABLES["sm_8x"],
                    "frozen4": [(16, _C(16, 128, 128, 8, 1, 32)), (_INF, _C(128, 128, 32, 8, 3, 32))]}
# the fp32-LoRA-epilogue tile for M > 16 there: 128 x 64 x 16 with 3 stages, at 80-210 registers and
# no stack under Triton 3.6 and 3.9. 128 x 64 x 64 reached 255 registers and spilled 8-16 B under both;
# with 128 x 64 x 32 ptxas held some kernels at 128 registers with 8 B on the stack (fp16's X·Wᵀ under
# 3.6 with 3 or 4 stages, q_proj's dY·W under 3.9 with 2), and stating a register budget (.maxnreg
# 216-255) made others spill 8-32 B
TABLES["sm_12x"]["frozen4_lora32"] = [(16, _C(16, 128, 128, 8, 1, 32)), (_INF, _C(128, 64, 16, 8, 3, 32))]
# datacenter Blackwell (sm_100: B200): Hopper's rows but these. The 16-bit adapter products' M > 64
# tile with 3 stages: 24 B of stack in G (dY·B) at 48 registers; with 2 stages none
# The per-element decode's M <= 16 tile with 1 stage: 8 B of stack in dY·W (M = 1); with 2 none under
# Triton 3.9 but 8 B under 3.6; with 3 none under either (at most 167 registers)
TABLES["sm_100"] = {**TABLES["sm_90"], "lora16": [(64, _C(64, 64, 64, 4, 3, 32)), (_INF, _C(128, 64, 64, 8, 2, 32))],
                    "frozen4_flat": [(16, _C(16, 64, 32, 4, 3, 8)), (_INF, _C(32, 64, 32, 4, 1))]}
# fp32 adapter products (IEEE, on FMA): with 2 stages H = D(X)·Aᵀ kept one value on the stack across
# the main loop (8 B, at 72 registers) for down_proj's K = 14336 on sm_100 and sm_12x; with 1 stage
# none on sm_12x, but G = dY·B did on sm_100 (8 B at 48 registers); with 3 stages none there
TABLES["sm_100"]["lora"] = [(_INF, _C(128, 64, 16, 8, 3, 32))]
TABLES["sm_12x"]["lora"] = [(_INF, _C(128, 64, 16, 8, 3, 32))]
# 16-bit adapter products up to M = 64 (and dA / dB, narrowed to the rank) there: 64 x 64 x 64 kept 8 B
# on the stack in dA (at 48-96 registers) under Triton 3.6 with 3 stages and under 3.9 with 2;
# 64 x 64 x 32 with 3 stages kept 8 B in split-K dB (64 x 16 x 32 at 80 registers, the odd shapes'
# N <= 64 at M = 300) under 3.6; with 4 stages none under either (at most 87 registers, 22 KB)
TABLES["sm_12x"]["lora16"] = [(64, _C(64, 64, 32, 4, 4, 32)), (_INF, _C(128, 64, 16, 8, 3, 32))]

# The token count M from which the "dequant" strategy (dequantize W, cuBLAS) replaces the fused 4-bit
# GEMM, per family, where no measured choice exists (fastlora.tuning measures both on the user's GPU
# and keeps the faster). Set where fastlora inspect's model of a whole training step (forward +
# backward, the four Llama-3-8B projections summed, r = 16, dropout 0.05, NF4 double quant, bf16,
# adapters under autocast) puts the crossover, at M = 1, 16, 24..64, 128, 256, 512, 1024, ..., 32768
# (with the shared-memory term and the nibble table's tensor-core rows):
#   sm_8x (sm_86, sm_89) and sm_12x (sm_121): the fused kernel ahead at every M (it saves writing
#     and re-reading the dequantized W), so dequant only from 32768; on sm_120 the two are within
#     2.5% of each other from M = 1024 on (a tie for a model)
#   sm_80: crosses between M = 256 (fused / dequant 0.98) and 512 (1.16): dequant from 512
#   sm_90: the model crosses between 256 (0.91) and 512 (1.23), where the measurement below does
#   sm_100 (B200): fused only while the M <= 16 row applies: its 4-bit main loops with tcgen05 take
#     30 (X·Wᵀ) and 77 (dY·W) thread-instructions per decoded weight at M > 16 (the decoded tile goes
#     through shared memory to the tensor cores), so from M = 24 dequant + cuBLAS is ahead (12% at 24,
#     9x at 4096)
#   sm_75: no tensor cores for Triton's tl.dot: always cuBLAS
# `fastlora inspect --strategy both --mode train --m ...` prints the per-call figures at this commit.
# A model, not a measurement: replace with the layer benchmark's crossover once a GPU run exists.
#   sm_90, measured (NVIDIA H200, Triton 3.6, torch 2.11; `fastlora tune`, CUDA events, median, L2
#     flushed; benchmarks/results/nvidia-h200/): the model without its shared-memory term was wrong
#     here (it had the fused kernel ahead at every M); the one with it agrees. The fused GEMM runs at
#     about 120-145 TFLOP/s from M = 512 on, cuBLAS on the dequantized W at 500-600, so dequant is
#     ahead at M >= 512 for gate/up/down (1.9-2.4x in X·Wᵀ at 512) and by 1.35-4.7x for every
#     projection from 2048 on (k/v's 1024x4096 excepted up to 2048); the fused kernel is ahead at every
#     Llama-3-8B projection and phase at M = 16, 64, 128 and 256 (its one launch against a dequant
#     kernel and cuBLAS, where the host decides). Summed over the step: fused / dequant = 0.72 at 16,
#     1.07 at 512, 2.44 at 2048, 3.78 at 8192. So dequant from 512.
# the families whose threshold comes from a GPU measurement (the model no longer decides there)
MEASURED_THRESHOLDS = {"sm_90": "benchmarks/results/nvidia-h200/ (NVIDIA H200, 2026-12-04)"}
DEQUANT_MIN_TOKENS = {"sm_90": 512, "sm_80": 512, "sm_8x": 32768, "sm_75": 0, "sm_100": 17, "sm_12x": 32768}

# the fewest rows of a tensor-core tile (tl.dot); a 4-bit row with fewer (GEMV_KINDS) runs as a GEMV
# (``lora_matmul._lora_matmul_gemv_kernel``: the decoded W multiplied on the FMA units, no MMA tile of padding)
MMA_MIN_ROWS = 16
GEMV_KINDS = ("frozen4", "frozen4_lora32")
# the resident programs per SM a GEMV's split count plans for (its programs are 4 warps and small:
# one per SM, as the tensor-core tiles plan, would leave most of an SM's loads unissued)
GEMV_PROGRAMS_PER_SM = 4
# the GEMV row, first in every family's 4-bit tables but sm_75's, for X·Wᵀ only (dY·W takes the next
# row): M = 1 as 1 x 64 x 64, 4 warps, no pipelining, split-K up to 32 ways (2 KB of packed bytes a
# step, 32 weights per thread). Measured on the H200 (benchmarks/results/nvidia-h200/run5/, Triton 3.6,
# the product alone, GPU time): at M = 1, X·Wᵀ took 0.55-0.9x the M <= 16 tensor-core row's time over
# the four Llama-3-8B projections; at M = 4 and 8 it took 1.1-1.5x, and dY·W 1.1-1.4x at M = 1 and
# 3-6x at M = 8 (its reduction runs across warps, one shared-memory round trip per row of dY a step).
# Other families: not measured; the tuner (fastlora.tuning) measures this row against the others
GEMV_ROW = (1, _C(1, 64, 64, 4, 1, 32))
# The 4-bit tensor-core rows decode through the nibble table (``quant4.decode_nibbles``: no
# shared-memory bank conflicts, two table reads per byte), the GEMV row through the pair table (one
# read per byte). Why, from ``fastlora inspect`` (a model, Triton 3.9, Llama-3-8B, r = 16, training
# step): on real NF4 bytes a pair-table read costs about 6.1 wavefronts where 2 are the least, and
# the M <= 16 tiles of sm_80, sm_86, sm_90 and sm_100 are bound by shared memory; with the nibble
# table each of their frozen products models 0.51-0.84x (the step of four projections 0.66-0.68x
# at M = 16; sm_80 and sm_90 0.67-0.83x at every M), sm_89 and sm_121 unchanged (DRAM-bound), no
# step slower. The GEMV becomes issue-bound on the extra reads and models 1.08-1.17x: it keeps the
# pair table. Every row compiles, fits and does not spill either way (tests/test_gpu_targets.py).
# Not measured on a GPU yet: ``benchmarks.bench_gemv`` times both decodes ("mma16 pair"), and the
# tuner measures the other decode as one of its candidates.
# One exception: sm_12x's frozen4_lora32 row for M > 16 (128 x 64 x 16, 8 warps, 3 stages) kept
# 8 B on the stack in dX with the nibble table under Triton 3.6 (at 128 registers); the model has
# that row tensor-bound either way, so it keeps the pair table.
NIBBLE_KINDS = GEMV_KINDS
_PAIR_ROWS = {("sm_12x", "frozen4_lora32", _INF)}
for _family, _table in TABLES.items():
    if _family != "sm_75":
        for _kind in GEMV_KINDS:
            _table[_kind] = [GEMV_ROW] + [
                (m, replace(c, nibbles=True) if _kind in NIBBLE_KINDS and (_family, _kind, m) not in _PAIR_ROWS else c)
                for m, c in _table[_kind] if m > GEMV_ROW[0]]

# under Triton's CPU interpreter (no target named): large tiles mean fewer Python-level program
# instances, which is all that costs time there
INTERPRETER = _C(64, 64, 64, 4, 1)


def family(target: Target) -> str:
    """The table a target uses: by compute capability, then by what its shared memory allows (the
    shared memory per block of the board each family's rows are checked on, in ``targets.TARGETS``)."""
    if target.cc < 80:
        return "sm_75"
    if target.cc >= 90 and target.smem_per_block >= TARGETS["sm_90"].smem_per_block:
        return "sm_100" if target.cc >= 100 else "sm_90"
    if target.smem_per_block >= TARGETS["sm_80"].smem_per_block:
        return "sm_80"
    return "sm_12x" if target.cc >= 120 else "sm_8x"


def _pow2_clamp(n: int, lo: int, hi: int) -> int:
    """The power of two at or above n, within [lo, hi] (plain Python: Triton's next_power_of_2 is a
    ConstexprFunction, microseconds per call on the host)."""
    return max(lo, min(hi, 1 << max(0, n - 1).bit_length()))


def partial_bytes(rows: int, cols: int, splits: int) -> int:
    """DRAM bytes of split-K's fp32 partial sums for an output of rows x cols: each of the ``splits``
    programs of a tile writes its partial, and the tile's last program reads them all back."""
    return 2 * rows * cols * 4 * splits


def splits(cfg: TileConfig, tiles: int, I: int, target: Optional[Target], step_bytes: int = 1,
           split_bytes: int = 0, per_sm: int = 1) -> int:
    """How many ways to split the reduction of a product with ``tiles`` output tiles (at most the
    row's ``split``, at least one BLOCK_I step per split): the s that moves the fewest bytes,

        ceil(tiles·s / (SMs·P)) · SMs·P · ceil(steps / s) · step_bytes  +  tiles · s · split_bytes

    the first term the operand bytes of one BLOCK_I step (``step_bytes``) over the waves the grid
    takes at P = ``per_sm`` resident programs per SM (1 for the tensor-core tiles, GEMV_PROGRAMS_PER_SM
    for the GEMV's small ones), every slot of every wave busy for the longest program (so
    a grid that leaves SMs idle, or a last wave that is mostly empty, costs what it wastes); the
    second the fp32 partials each extra program writes and the tile's last program reads back
    (``split_bytes`` per program). Ties go to the fewer splits.

    No target (Triton's CPU interpreter, whose tiles never split): the configuration's split count as
    it is, at most one per BLOCK_I step, so a tile given to :func:`override` runs split-K there too."""
    if cfg.split <= 1:
        return 1
    steps = -(-I // cfg.block_i)
    if target is None:
        return max(1, min(cfg.split, steps))
    best, best_cost = 1, None
    for s in range(1, max(1, min(cfg.split, steps)) + 1):
        slots = target.sms * per_sm
        waves = -(-(tiles * s) // slots)
        cost = waves * slots * (-(-steps // s)) * step_bytes + (tiles * s * split_bytes if s > 1 else 0)
        if best_cost is None or cost < best_cost:
            best, best_cost = s, cost
    return best


# ----------------------------------------------------------------------------------------------
# measured choices: what on-device tuning found fastest replaces the table's row
# ----------------------------------------------------------------------------------------------

# kind -> TileConfig used for every product of that kind while inside :func:`override` (the tuner
# times a candidate this way)
_OVERRIDES: Dict[str, TileConfig] = {}
# (target name, kind, m_bucket(M), J, I, trans_w) -> TileConfig measured fastest on this process's
# device. trans_w tells forward (X·Wᵀ) from backward (dY·W): for a square W (q_proj, o_proj) J and I
# are the same in both, and the two products are different loops over W
_TUNED: Dict[tuple, TileConfig] = {}
# bumped whenever an override or a tuned entry changes: launch plans cached before are stale
_GENERATION = [0]


def generation() -> int:
    """A number that changes whenever :func:`select` may answer differently for the same problem."""
    return _GENERATION[0]


def m_bucket(M: int) -> int:
    """The token bucket a measured choice is kept for: M rounded up to a power of two (1, 2, 4, ...,
    so a training run with varying batch shapes meets a handful of buckets, not one per shape)."""
    return 1 << max(0, int(M) - 1).bit_length()


@contextlib.contextmanager
def override(kind: str, cfg: TileConfig):
    """Inside, every product of ``kind`` uses ``cfg`` instead of the table's row (tiles still narrowed
    to the problem)."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind of product {kind!r}; one of {KINDS}")
    prev = _OVERRIDES.get(kind)
    _OVERRIDES[kind] = cfg
    _GENERATION[0] += 1
    try:
        yield
    finally:
        if prev is None:
            _OVERRIDES.pop(kind, None)
        else:
            _OVERRIDES[kind] = prev
        _GENERATION[0] += 1


def set_tuned(target: Target, kind: str, M: int, J: int, I: int, cfg: Optional[TileConfig], *,
              trans_w: bool) -> None:
    """Record (``cfg``) or forget (None) the measured choice for products of ``kind`` at M's bucket
    that read W as ``trans_w`` says (False: X·Wᵀ, True: dY·W)."""
    key = (target.name, kind, m_bucket(M), J, I, bool(trans_w))
    if cfg is None:
        _TUNED.pop(key, None)
    else:
        _TUNED[key] = cfg
    _GENERATION[0] += 1


def select(kind: str, M: int, J: int, I: int, target: Optional[Target], trans_w: Optional[bool] = None
           ) -> TileConfig:
    """The launch configuration of one product out[M, J] = Σ_i a[M, I]·T[I, J] on ``target``
    (None: the interpreter's): an :func:`override` in force, else the measured choice for the
    problem (:func:`set_tuned`; ``trans_w`` says whether T is W or Wᵀ, and without it no measured
    choice applies), else the family table's row. Tiles are narrowed to the problem (never below
    16, the smallest tensor-core tile)."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind of product {kind!r}; one of {KINDS}")
    chosen = _OVERRIDES.get(kind) if _OVERRIDES else None
    if chosen is None and _TUNED and target is not None and trans_w is not None:
        chosen = _TUNED.get((target.name, kind, m_bucket(M), J, I, bool(trans_w)))
    if chosen is not None:
        return _narrow(kind, chosen, M, J, I)
    if target is None:
        c = INTERPRETER
        if kind == "dequant":
            return _C(1, 4096, 1, 4, 1)
        return _C(_pow2_clamp(M, 16, c.block_m), _pow2_clamp(J, 16, c.block_j), _pow2_clamp(I, 16, c.block_i),
                  c.num_warps, c.num_stages)
    return _narrow(kind, table_row(kind, M, target, trans_w), M, J, I)


def table_row(kind: str, M: int, target: Target, trans_w: Optional[bool] = None) -> TileConfig:
    """The family table's row for M, as written (not narrowed): the first whose max_m is at least M,
    a GEMV row only for X·Wᵀ (``trans_w`` not True; see GEMV_ROW)."""
    for max_m, cfg in TABLES[family(target)][kind]:
        if M <= max_m and not (trans_w is True and kind in GEMV_KINDS and cfg.block_m < MMA_MIN_ROWS):
            return cfg
    raise ValueError(f"no row of {family(target)}'s {kind!r} table for M = {M}")


def _narrow(kind: str, c: TileConfig, M: int, J: int, I: int) -> TileConfig:
    if kind == "dequant":
        return c
    # a 4-bit row of fewer than MMA_MIN_ROWS rows is a GEMV tile: narrowed to M's power of two
    bm = _pow2_clamp(M, 1 if kind in GEMV_KINDS and c.block_m < MMA_MIN_ROWS else MMA_MIN_ROWS, c.block_m)
    bj = _pow2_clamp(J, 16, c.block_j)
    bi = c.block_i if kind.startswith("frozen4") else _pow2_clamp(I, 16, c.block_i)
    return replace(c, block_m=bm, block_j=bj, block_i=bi)
