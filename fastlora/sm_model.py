"""What one SM does with a kernel's main loop, for ``fastlora inspect``'s model: which execution pipe
each SASS instruction occupies and at what rate, how many shared-memory wavefronts the loop costs
(the 4-bit decode's table reads counted over the bytes of a real NF4-quantized weight, with the lane
mapping the compiler chose), and how long a loop with few loads in flight waits on DRAM latency.

Pipes (per scheduler, in warp-instructions per clock; NVIDIA's profiling guide names the pipes,
the rates are the architecture whitepapers' lanes per SM partition):

    issue      every instruction                                        1
    alu        integer add / compare / logic / shift / select / byte permute, fp compare and
               select, the packing fp32 -> 16-bit conversion (F2FP)    16 lanes: 1/2
    fmaheavy   integer multiply-add (IMAD*, IMUL)                       16 lanes: 1/2
    fma        fp32 add / multiply / FMA, and IMAD (both halves)        fp32 lanes / 32 (the fp32
                                                                        peak: 1 on sm_86 and later, 1/2 on sm_75/80)
    xu         special functions and conversions (MUFU, F2F, I2F, F2I)  4 lanes: 1/8

A loop trip costs a warp max(issue, each pipe's instructions / its rate) scheduler clocks. Uniform
datapath instructions (U*), branches and barriers count in the issue only.

Shared memory: one wavefront (128 B) per clock per SM. Without bank conflicts a warp-instruction
moving w bits per thread takes w/32 wavefronts (LDS/STS .32: 1, .64: 2, .128: 4; LDSM/STSM .xN: N
8×8 16-bit matrices; LDGSTS, cp.async, its width too). A 64-bit access is served half a warp at a
time, a 128-bit access a quarter warp at a time; within that phase, lanes reading the same address
share it (broadcast), lanes reading different addresses in one bank are served one after another.
So a data-dependent table read costs, per phase, the largest number of distinct entries that fall on
one bank (group): :func:`gather_wavefronts` counts it over the bytes of a Gaussian weight
quantized to NF4 by bitsandbytes, each lane reading the byte the compiled layout gives it. A wgmma
(HGMMA) reads its shared-memory operands too: N·K (and M·K when A is in shared memory) elements per
warpgroup instruction, counted here as wavefronts as well.

Memory latency (Little's law): a program that issues one trip's loads and then waits for them (no
software pipelining, ``num_stages`` 1) waits DRAM_LATENCY_CYCLES per trip; with S stages, S - 1
trips are in flight. The busiest SM runs ceil(per SM / resident) rounds of its programs, so the
loop takes at least rounds · trips · latency / max(1, S - 1), whatever the bandwidth.

Left out: the LSU's own issue limits, register-bank conflicts, dependency stalls inside a trip,
shuffles, and the L1 (the table reads are the only data-dependent accesses modelled).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

# An assumed figure, not a measurement: SM clocks from issuing a global load that misses L2 to its
# data in a register. Microbenchmarks of A100 and H100 report about 600-1,000 clocks.
DRAM_LATENCY_CYCLES = 800
# one shared-memory wavefront: 32 banks of 4 bytes, one per clock per SM
WAVEFRONT_BYTES = 128

_ALU = ("LOP3", "LOP", "PRMT", "IADD3", "IADD", "VIADD", "ISETP", "SHF", "SHL", "SHR", "LEA", "SEL",
        "FSEL", "FSETP", "F2FP", "MOV", "CS2R", "SGXT", "BMSK", "IMNMX", "VIMNMX", "FMNMX", "IABS",
        "PLOP3", "P2R", "R2P")
_FMA_HEAVY = ("IMAD", "IMUL")
_FP32 = ("FFMA", "FMUL", "FADD")
_XU = ("MUFU", "F2F", "I2F", "F2I", "FRND", "I2I")
PIPES = ("alu", "fmaheavy", "fp32", "xu")


def pipe_of(op: str) -> Optional[str]:
    """The pipe (one of PIPES) a SASS opcode occupies besides the issue slot, or None (issue only)."""
    head = op.split(".")[0]
    if head in _FMA_HEAVY:
        return "fmaheavy"
    if head in _FP32:
        return "fp32"
    if head in _XU:
        return "xu"
    if head in _ALU:
        return "alu"
    return None


def count_pipes(ops: Sequence[str]) -> Dict[str, int]:
    """{pipe: instructions} over SASS opcodes."""
    out = {p: 0 for p in PIPES}
    for op in ops:
        p = pipe_of(op)
        if p:
            out[p] += 1
    return out


def fp32_lanes(target) -> float:
    """fp32 FMA lanes per scheduler, from the target's fp32 peak: 32 on sm_86 and later, 16 on sm_80."""
    clock = (target.fp32_clock_ghz or target.clock_ghz) * 1e9
    return target.fp32_tflops * 1e12 / (2 * target.sms * target.schedulers_per_sm * clock)


def loop_cycles(instructions: int, pipes: Dict[str, int], target) -> Tuple[float, str]:
    """Scheduler clocks one warp's trip costs, and what binds it ("issue" or a pipe)."""
    lanes = max(1.0, fp32_lanes(target))
    imad = pipes.get("fmaheavy", 0)
    cand = {
        "issue": float(instructions),
        "alu": 2.0 * pipes.get("alu", 0),
        "fmaheavy": 2.0 * imad,
        "fp32": (pipes.get("fp32", 0) + imad) * 32.0 / lanes,
        "xu": 8.0 * pipes.get("xu", 0),
    }
    which = max(cand, key=lambda k: (cand[k], k == "issue"))
    return cand[which], which


# ----------------------------------------------------------------------------------------------
# shared memory
# ----------------------------------------------------------------------------------------------

_HGMMA_SHAPE = re.compile(r"x(\d+)x(\d+)\.\w+\.(\w+)")
_ELT_BITS = {"BF16": 16, "F16": 16, "TF32": 32, "E4M3": 8, "E5M2": 8, "S8": 8, "U8": 8}


def smem_wavefronts(op: str, rest: str = "") -> float:
    """Conflict-free shared-memory wavefronts of one warp-instruction (0 for one that does not
    touch shared memory). HGMMA: its share (a quarter, one warp of the warpgroup) of the operand
    bytes it reads from shared memory."""
    parts = op.split(".")
    head = parts[0]
    if head in ("LDS", "STS", "LDGSTS", "ATOMS"):
        bits = 32
        for p in parts[1:]:
            if p in ("64", "128"):
                bits = int(p)
        return bits / 32
    if head in ("LDSM", "STSM"):
        n = [int(p) for p in parts[1:] if p.isdigit() and p in ("1", "2", "4")]
        return float(n[-1]) if n else 1.0
    if head == "HGMMA":
        m = _HGMMA_SHAPE.search(rest)
        if not m:
            return 0.0
        n, k, dt = int(m.group(1)), int(m.group(2)), m.group(3)
        elt = _ELT_BITS.get(dt, 16) / 8
        ops_ = [s.strip() for s in rest.split(",")]
        a_smem = len(ops_) > 1 and ops_[1].startswith("gdesc")
        mrows = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 64
        byts = n * k * elt + (mrows * k * elt if a_smem else 0)
        return byts / WAVEFRONT_BYTES / 4
    return 0.0


@dataclass(frozen=True)
class Gather:
    """A ``tt.gather`` from a table in the compiled kernel (Triton stages the table in shared memory)."""

    numel: int          # index elements per program
    table: int          # table entries
    entry_bytes: int    # bytes per table entry
    layout: str         # the index tensor's layout, as the TTGIR writes it


_GATHER = re.compile(r"tt\.gather\s+%\S+\[%\S+\].*?:\s*\(tensor<(\d+)x([a-z]+)(\d+),\s*#(\w+)>,\s*"
                     r"tensor<(\d+)xi\d+,\s*#(\w+)>\)")


def find_gather(ttgir: str) -> Optional[Gather]:
    """The first table gather of a TTGIR module, with its index layout's definition (None if none)."""
    m = _GATHER.search(ttgir)
    if not m:
        return None
    table, bits, idx_numel, idx_layout = int(m.group(1)), int(m.group(3)), int(m.group(5)), m.group(6)
    d = re.search(r"^#" + re.escape(idx_layout) + r"\s*=\s*(.*)$", ttgir, re.M)
    return Gather(numel=idx_numel, table=table, entry_bytes=max(1, bits // 8), layout=d.group(1) if d else "")


def _ints(s: str) -> List[int]:
    return [int(x) for x in re.findall(r"-?\d+", s)]


def lane_offsets(layout: str, numel: int, warps: int) -> List[List[int]]:
    """For a 1-D index tensor of ``numel`` elements in ``layout`` (a ``#ttg.blocked`` or
    ``#ttg.linear`` definition), the elements warp 0's 32 lanes hold, one list of 32 per register:
    what one warp-wide table read takes. Raises ValueError on a layout it cannot read."""
    if "#ttg.blocked" in layout:
        spt = _ints(re.search(r"sizePerThread\s*=\s*\[([^\]]*)\]", layout).group(1))
        tpw = _ints(re.search(r"threadsPerWarp\s*=\s*\[([^\]]*)\]", layout).group(1))
        if len(spt) != 1 or tpw != [32]:
            raise ValueError(f"not a 1-D blocked layout: {layout}")
        s = spt[0]
        chunk = s * 32 * warps
        regs = max(s, numel // (32 * warps))
        return [[((r // s) * chunk + lane * s + r % s) % numel for lane in range(32)] for r in range(regs)]
    if "#ttg.linear" in layout:
        def bases(name):
            m = re.search(name + r"\s*=\s*\[(.*?)\]\s*(,\s*\w+\s*=|\}>)", layout)
            vs = [_ints(b) for b in re.findall(r"\[([^\[\]]*)\]", m.group(1))] if m else []
            if any(len(v) != 1 for v in vs):
                raise ValueError(f"not a 1-D linear layout: {layout}")
            return [v[0] for v in vs]
        reg, lane = bases("register"), bases("lane")
        if len(lane) != 5:
            raise ValueError(f"a linear layout without 5 lane bases: {layout}")

        def xor(bs, i):
            v = 0
            for b, x in enumerate(bs):
                if i >> b & 1:
                    v ^= x
            return v
        return [[xor(reg, r) ^ xor(lane, ln) for ln in range(32)] for r in range(1 << len(reg))]
    raise ValueError(f"unknown layout: {layout}")


@functools.lru_cache(maxsize=2)
def nf4_bytes(rows: int = 512, cols: int = 4096, seed: int = 0) -> torch.Tensor:
    """uint8 [rows, cols / 2]: a Gaussian weight (seeded) quantized to NF4 by bitsandbytes, blocksize
    64, the packed bytes in W's row-major order (two weights per byte)."""
    import bitsandbytes.functional as F

    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    q, _ = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    return q.reshape(rows, cols // 2)


def gather_wavefronts(offsets: Sequence[Sequence[int]], rows: int, cols: int, entry_bytes: int = 8,
                      slot=None, data: Optional[torch.Tensor] = None, samples: int = 64,
                      seed: int = 0, nibbles: bool = False) -> float:
    """Mean shared-memory wavefronts of one warp-wide table read (one LDS per register) over real
    NF4 bytes: the tile is ``rows`` × ``cols`` packed bytes of :func:`nf4_bytes` (random origins,
    seeded), lane l of register r reads the byte at flat tile position ``offsets[r][l]``, the entry
    it reads is ``slot(byte, lane)`` (tensor functions; the byte itself by default) of
    ``entry_bytes`` bytes. ``nibbles``: the index holds nibbles, not bytes (``cols`` of them a row,
    high nibble first): the lane table's reads. Per phase (128 / entry_bytes lanes) the cost is the
    most distinct entries on one bank group (the 128 / entry_bytes groups of banks one entry spans);
    phases add up."""
    data = nf4_bytes() if data is None else data
    if nibbles:
        data = torch.stack((data >> 4, data & 15), -1).reshape(data.shape[0], -1)
    if cols > data.shape[1]:                       # a run longer than a row: the bytes as one stream
        data = data.reshape(-1, cols)
    g = torch.Generator().manual_seed(seed)
    r0 = torch.randint(0, data.shape[0] - rows + 1, (samples,), generator=g)
    c0 = torch.randint(0, data.shape[1] // cols, (samples,), generator=g) * cols
    ar, ac = torch.arange(rows), torch.arange(cols)
    tiles = data[(r0[:, None, None] + ar[None, :, None]), (c0[:, None, None] + ac[None, None, :])]
    tiles = tiles.reshape(samples, rows * cols).to(torch.int64)
    off = torch.tensor(offsets, dtype=torch.int64) % (rows * cols)          # [regs, 32]
    idx = tiles[:, off]                                                   # [S, regs, 32]
    s = slot(idx, torch.arange(32)) if slot is not None else idx
    lanes = max(1, min(32, WAVEFRONT_BYTES // entry_bytes))
    groups = max(1, WAVEFRONT_BYTES // entry_bytes)
    nslots = int(s.max()) + 1
    nslots = -(-nslots // groups) * groups
    ph = s.reshape(samples, off.shape[0], 32 // lanes, lanes)
    present = torch.zeros(*ph.shape[:3], nslots, dtype=torch.bool)
    present.scatter_(3, ph, True)                                         # distinct entries per phase
    per_group = present.reshape(*ph.shape[:3], nslots // groups, groups).sum(3)
    return float(per_group.amax(-1).sum(-1).float().mean())


def conflict_free_wavefronts(entry_bytes: int = 8) -> float:
    """A warp-wide read of ``entry_bytes`` per lane without conflicts."""
    return max(1.0, 32 * entry_bytes / WAVEFRONT_BYTES)


def latency_bound_s(trips: int, per_sm: int, resident: int, stages: int, clock_hz: float) -> float:
    """Little's law: the seconds a loop of ``trips`` on the busiest SM waits on DRAM at least."""
    if trips <= 0:
        return 0.0
    rounds = -(-per_sm // max(1, min(resident, per_sm)))
    return rounds * trips * DRAM_LATENCY_CYCLES / max(1, stages - 1) / clock_hz
