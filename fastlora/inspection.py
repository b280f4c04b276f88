"""``fastlora inspect``: what fastlora's kernels cost on a GPU, worked out on a machine without one.

For a layer call (shape, tokens M, rank, dropout, dtype, 4-bit or dense, strategy, training step or
inference) and a GPU target, this module

1. **records** the launches the real op makes: :func:`fastlora.lora_linear` runs, forward and (for
   a training step) backward, on ``meta`` tensors inside ``kernels._launch.recording(target)``; every
   launcher picks its configuration for that target exactly as on the device, and the launch is
   recorded instead of run (kernel, grid, arguments, keywords);
2. **compiles** each distinct launch for the target through Triton's own JIT entry point
   (``kernels._launch.compile_launch``: the argument specialization of a real launch, a stand-in
   driver that reports the target), to PTX and a cubin, with the ptxas that ships in Triton's wheel;
3. **reads** the cubin: shared memory (Triton's metadata) against the target's per-block limit,
   registers and stack (spill) bytes (``cuobjdump --dump-resource-usage``), and the SASS
   (``cuobjdump -sass``): tensor-core instructions (HMMA / HGMMA), global-load widths, and the main
   loop — found as the backward branch whose body holds the most tensor-core instructions (the
   longest body when none holds any) — with its instructions per decoded weight element;
4. **models** the time of each launch: the largest of instruction issue (or the busiest execution
   pipe), DRAM bytes / bandwidth, tensor-core work, shared-memory wavefronts (the 4-bit decode's
   table reads with their bank conflicts over real NF4 bytes) and DRAM latency not covered by loads
   in flight (``fastlora.sm_model``), the per-SM terms counted in whole programs on the busiest SM,
   plus the split-K sum pass as a serial tail and a fixed per-launch latency; and the kernels PyTorch
   launches inside the call (cuBLAS GEMMs, elementwise ops), seen by a dispatch mode while the call is
   recorded, at their floor plus the same latency. Next to it the physical floor of the same call,
   max(bytes / bandwidth, FLOPs / peak). This is a static *model* (every figure it prints is
   labelled so), not a measurement.

The formulas (per launch; all figures of a target come from ``kernels.targets.TARGETS``):

    programs      = product of the grid
    resident      = programs per SM that fit at once = min(max blocks, max warps / warps,
                    65536 / (regs·32·warps), smem per SM / (shared + 1 KiB reserved per block, sm_80+))
    per SM        = ceil(programs / SMs): the whole programs the busiest SM runs
    waves         = ceil(programs / (resident · SMs))
    instr/program = SASS instructions outside the main loop + loop body × trips, trips =
                    ceil(ceil(I / BLOCK_I) / splits) (splits: grid axis 1, split-K); with split-K, less
                    the sum loop's own code (SUM_CODE_TRIPS trips of it), which every program but a
                    tile's last one skips (the sum's instructions are in the sum tail)
    issue time    = per SM · warps · instr/program / (min(4, warps·min(resident, per SM)) · clock)
                                                                          (one warp-instr per scheduler-clock)
                    where a loop trip's instructions are replaced by its busiest pipe's clocks when
                    more (sm_model.loop_cycles: the ALU and IMAD at half rate, conversions at 1/8)
    shared time   = per SM · warps · (wavefronts per trip · trips + outside the loop) / clock: one
                    wavefront per clock per SM; every shared access conflict-free except the decode's
                    table reads, each at its simulated wavefronts (sm_model.gather_wavefronts: the
                    compiled index layout's lanes reading a Gaussian weight's NF4 bytes)
    latency time  = ceil(per SM / resident) · trips · DRAM_LATENCY_CYCLES / max(1, stages - 1) / clock
    bytes         = every operand read once and the output written once (re-reads across programs
                    assumed to hit L2): A M·I·e, W J·I·e (4-bit: J·I/2 + absmax), out M·J·e
                    (twice when accumulated), LoRA factors, bias; split-K: the fp32 partials,
                    splits·M·J·4 written by the programs of a split and read back by each tile's last
    FLOPs         = 2·M·J·I (+ 2·M·J·r for the LoRA epilogue)
    tensor time   = per SM · one program's tensor work / (tensor peak / SMs); one program's work is
                    its whole tile, padding included (the MMA instructions compute it):
                    2·BLOCK_M·BLOCK_J·BLOCK_I·trips for a 16-bit main loop, + 2·BLOCK_M·BLOCK_J·r (r
                    rounded up to BLOCK_R) for a 16-bit LoRA epilogue; only where the SASS has
                    tensor-core instructions (fp32 products run on FMA: their work is in the issue time)
    DRAM time     = bytes / bandwidth (no waves: the bandwidth is the whole GPU's)
    sum tail      = split-K only: each tile's last program adds the `splits` slices after the others
                    have stored theirs; the sums of the tiles whose last program runs in the last wave
                    (tail tiles = min(tiles, programs in the last wave): all tiles for a one-wave grid)
                    are a tail after the main pass, the other tiles' sums overlap the last waves (their
                    reads are in the DRAM time, their instructions in the issue time):
                    max(chain, sum issue on the busiest SM, the tail tiles' partials / bandwidth),
                    chain = (2 + ceil(splits / SUM_UNROLL)) · L2_ROUND_TRIP_CYCLES / clock + one sum's
                    issue (the release fence and the arrival atomic, then the sum loop, which ptxas
                    unrolls SUM_UNROLL times and which issues the next loads only after adding the last);
                    sum issue = ceil(tail tiles / SMs) · warps · splits · instr/trip / (min(4, warps·
                    ceil(tail tiles / SMs)) · clock), instr/trip = e + e/2 + 2·e/v + 2 per thread (e = BLOCK_M·BLOCK_J
                    / (32·warps) fp32 elements: the adds, the zero fills of the masked loads (two
                    registers per CS2R), the v-wide loads (v = min(4, e)) with their addresses, the loop)
    launch time   = max(issue, DRAM time of all but the tail's read-back, tensor time, shared time,
                    latency time) + sum tail + KERNEL_LATENCY_US
    floor         = max(bytes / bandwidth, FLOPs / peak), peak = tensor peak of the compute dtype
                    (fp32 FMA peak for fp32 products)

Whole waves: a program's tensor time is one program's work at its SM's share of the peak, and the
busiest SM runs ceil(programs / SMs) programs one after another. With one resident program per SM
(the big tiles) that is exactly the wave count, each wave costing one program's tensor time (sm_86,
q/o Y at M = 512: 128 programs on 82 SMs are 2 waves, not 128/82 = 1.56); with R resident programs
the SM's tensor cores are shared by them, so a full wave costs R programs' work and a last, partial
wave only the programs it holds. The issue time counts the same whole programs per SM. The DRAM
time has no wave structure here (see below).

The kernels PyTorch launches inside a call, observed as ATen ops (everything but views and
allocations; a factory op without tensor inputs, such as the one-time zeroed split-K counters, is
setup, not part of a call): a GEMM (``mm``, ``addmm``, ...: cuBLAS, the "dequant" strategy's frozen
product) at max(bytes / bandwidth, 2·m·n·k / tensor peak of its dtype); any other op (the fp16
``add_`` that sums the frozen product and the LoRA term on the "dequant" path, a ``copy_`` or cast
where dtypes differ) at bytes / bandwidth, bytes = every tensor it reads + what it writes; each plus
KERNEL_LATENCY_US. dA and dB need no cast kernel: the kernel stores them in the parameter's dtype.

A step's floor: the frozen GEMMs at the tensor peak (4·M·N·K FLOPs for a training step, 2·M·N·K for
inference) against the 4-bit weight read once per frozen GEMM (N·K/2 bytes + absmax) plus the
activations it must move (X, Y; dY, dX); the larger of the two. The eager step adds LAUNCH_US per
launch (the gap between dependent launches, which a CUDA graph removes) to the modelled GPU time.

What the model leaves out:

- latency other than its named terms (KERNEL_LATENCY_US per launch, the sum tail's L2 round trips,
  the main loop's DRAM latency): the pipeline fill, dependency stalls, barrier waits; bank conflicts
  other than the decode's table reads (the rest is assumed conflict-free: Triton swizzles its tiles);
- caches: re-reads across programs are assumed to hit L2 and cost nothing, L2 capacity misses are
  not modelled, and the split-K partials count as DRAM traffic though they mostly stay in L2;
- a per-SM bandwidth limit beyond the latency term: a grid with few programs is assumed to draw the
  whole DRAM bandwidth when it has enough loads in flight;
- clock changes (power and thermal limits): every rate is the table's;
- the inside of cuBLAS: its GEMMs at their floor, without tiles, waves or split-K;
- overlap between kernels: each launch's time is added to the last;
- the host (only with ``--host``, measured) and, in the GPU time, the launch gaps (LAUNCH_US);
- the sum loop's code is modelled from its tile, not read from the SASS;
- what lies outside the layer call: gradient accumulation's adds into ``.grad`` (every micro-batch
  after the first), the optimizer, activation checkpointing's recompute.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

from . import sm_model
from .kernels import _launch, configs
from .kernels.quant4 import NIBBLE_STRIDE, Packed4bit
from .kernels.targets import DEFAULT_TARGETS, TARGETS, Target, get_target

_NIBBLE_STRIDE = int(getattr(NIBBLE_STRIDE, "value", NIBBLE_STRIDE))   # entry 33·c holds code[c]

#: Llama-3-8B's projections as (N, K) = (out_features, in_features)
LLAMA3_8B_SHAPES = {
    "q_proj/o_proj": (4096, 4096),
    "k_proj/v_proj": (1024, 4096),
    "gate_proj/up_proj": (14336, 4096),
    "down_proj": (4096, 14336),
}
DEFAULT_M = (1, 16, 256, 4096)
MODEL = "model"   # the word every modelled figure carries
# An assumed figure, not a measurement: the gap between one kernel's end and the next dependent
# kernel's start on one stream, for kernels launched eagerly (a few µs on recent GPUs). Each launch
# of a step, cuBLAS's included, adds it to the GPU's time; CUDA graphs remove most of it.
LAUNCH_US = 3.0
# An assumed figure: the GPU time every kernel takes beyond its throughput terms (dispatching its
# first programs, their first DRAM loads before any arithmetic, the drain of the last stores and
# the completion), so no launch is modelled below it: profilers report ~2 µs for the smallest
# kernels (a few-element elementwise op) on A100 / H100. Added to every launch's modelled time,
# cuBLAS's and PyTorch's included; unlike LAUNCH_US, a CUDA graph does not remove it.
KERNEL_LATENCY_US = 2.0
# An assumed figure: an SM's round trip to L2 and back, in SM clocks (microbenchmarks of Ampere,
# Ada and Hopper measure ~200-300 cycles for an L2 hit, the far partition of A100 / H100 included).
L2_ROUND_TRIP_CYCLES = 300
# The split-K sum loop as ptxas lays it out (the SASS of the sum shows it): the body unrolled four
# times, the next four partial loads issued only after the last four were added, then a two-trip
# block and a one-trip loop for the rest; SUM_CODE_TRIPS trips of code in all, run once per
# program only by a tile's last program (the others run the loop zero times)
SUM_UNROLL = 4
SUM_CODE_TRIPS = 7
# shared memory the CUDA runtime reserves per block from compute capability 8.0 on
SMEM_RESERVED_PER_BLOCK = 1024

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_ELT = {torch.float16: 2, torch.bfloat16: 2, torch.float32: 4, torch.uint8: 1, torch.int64: 8, torch.int8: 1}


# ----------------------------------------------------------------------------------------------
# 1. the launches of one layer call, as the launchers make them
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """One layer call to inspect."""

    N: int
    K: int
    M: int
    rank: int = 16
    dropout: float = 0.05
    dtype: str = "bf16"            # activations and compute dtype
    quant: str = "nf4"             # "nf4", "fp4" or "dense"
    nested: bool = True            # double-quantized absmax
    blocksize: int = 64
    strategy: str = "fused"        # "fused" or "dequant"
    mode: str = "train"            # "train" (forward + backward) or "infer" (forward, no grad, no dropout)
    shape_name: str = ""
    # the adapter products' dtype: "autocast" = the compute dtype (fp32 adapters under bf16/fp16
    # autocast, the QLoRA recipe, Trainer bf16=True), "fp32" = fp32 adapters without autocast
    adapters: str = "autocast"

    @property
    def lora_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype] if self.adapters == "autocast" else torch.float32

    @property
    def is_4bit(self) -> bool:
        return self.quant != "dense"


def _meta_packed(c: Call) -> Packed4bit:
    n = c.N * c.K
    blocks = -(-n // c.blocksize)
    kw = dict(packed=torch.empty(-(-n // 2), dtype=torch.uint8, device="meta"), N=c.N, K=c.K,
              blocksize=c.blocksize, code=torch.empty(16, device="meta"), quant_type=c.quant,
              dtype=_DTYPES[c.dtype])
    if c.nested:
        kw.update(absmax=torch.empty(blocks, dtype=torch.uint8, device="meta"),
                  absmax2=torch.empty(-(-blocks // 256), device="meta"), code2=torch.empty(256, device="meta"),
                  offset=torch.empty(1, device="meta"))
    else:
        kw.update(absmax=torch.empty(blocks, device="meta"))
    return Packed4bit(**kw)


def _label(launch: _launch.Launch, c: Call, frozen, A, B) -> str:
    """What a recorded launch computes, read off its arguments (which tensor is its W operand); a
    merged launch: its segments' labels joined by " + "."""
    if launch.parts:
        for P in launch.parts:
            P.label = _label(P, c, frozen, A, B)
        return " + ".join(P.label for P in launch.parts)
    if "dequant" in launch.name:
        return "dequant W"
    if "lora_matmul" not in launch.name:
        return launch.name
    a = dict(zip(launch.kernel.arg_names, launch.args))
    a.update(launch.kwargs)
    w, trans = a["w_ptr"], bool(a["TRANS_W"])
    if a["I"] == 0:
        step = "epilogue"
    else:
        step = ""
    if w is frozen:
        what = "dX" if trans else "Y"
    elif w is A:
        what = "H"
    elif w is B:
        what = "G"
    else:
        what = "dA" if a["M"] == c.rank and a["J"] == c.K else "dB"
    return f"{what} {step}".strip()


def record_call(c: Call, target) -> List[_launch.Launch]:
    """The launches one layer call makes on ``target``, in order, labelled (Y, H, dX, G, dA, dB, ...)."""
    from . import ops

    target = get_target(target)
    dt = _DTYPES[c.dtype]
    train = c.mode == "train"
    w = _meta_packed(c) if c.is_4bit else torch.empty(c.N, c.K, dtype=dt, device="meta")
    x = torch.empty(c.M, c.K, dtype=dt, device="meta")
    A = torch.empty(c.rank, c.K, device="meta")
    B = torch.empty(c.N, c.rank, device="meta")
    p = c.dropout if train else 0.0
    seed = 12345 if p > 0 else None   # an eager call's seed: drawn on the host (a device tensor only in graphs)
    wargs = ops.weight_args(w)
    # the op's own forward and backward implementations (``torch.ops.fastlora.lora_linear`` runs its
    # fake implementation on meta tensors, so its real one is called directly, as the op calls it)
    with _launch.recording(target) as launches:
        y, h = ops._forward_impl(x, A, B, *wargs, None, 2.0, p, seed, dt, c.lora_dtype, c.strategy)
        n_forward = len(launches)
        if train:
            ops._backward_impl(torch.empty_like(y), x, h, A, B, *wargs, 2.0, p, seed, dt, c.lora_dtype,
                               c.strategy, True, True, True)
    frozen = w.packed if c.is_4bit else w
    for i, L in enumerate(launches):
        L.label = _label(L, c, frozen, A, B)
        L.phase = "forward" if i < n_forward else "backward"
        for P in L.parts:
            P.phase = L.phase
    return launches


# ----------------------------------------------------------------------------------------------
# 2-3. compile for the target, read the cubin and the SASS
# ----------------------------------------------------------------------------------------------


def _nvidia_tool(name: str) -> str:
    """A CUDA binary tool (cuobjdump) from Triton's wheel, or from FASTLORA_NVIDIA_TOOLS where set: a
    worker compiling with another Triton reads its cubins with the installed Triton's tools (an older
    Triton's cuobjdump may not disassemble every architecture its ptxas targets; what a cubin holds
    does not depend on the tool that reads it)."""
    import triton

    folder = os.environ.get("FASTLORA_NVIDIA_TOOLS") or os.path.join(
        os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        raise RuntimeError(f"{name} not found in Triton's wheel ({path})")
    return path


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


@dataclass
class Sass:
    instructions: List[tuple]        # (address, opcode, operands)

    @classmethod
    def parse(cls, text: str) -> "Sass":
        out = []
        for line in text.splitlines():
            m = _SASS_LINE.search(line)
            if m:
                out.append((int(m.group(1), 16), m.group(3), m.group(4).strip()))
        return cls(out)

    def count(self, pred, lo: int = 0, hi: int = 1 << 62) -> int:
        return sum(1 for a, op, _ in self.instructions if lo <= a <= hi and pred(op))

    def loops(self):
        """(start, end) address of every backward branch's body."""
        res = []
        for a, op, rest in self.instructions:
            if op.startswith("BRA"):
                m = re.search(r"0x([0-9a-f]+)", rest)
                if m and int(m.group(1), 16) < a:
                    res.append((int(m.group(1), 16), a))
        return res


def is_mma(op: str) -> bool:
    """A tensor-core instruction: HMMA / IMMA (mma.sync, sm_75 and up), HGMMA (wgmma, sm_90) or a
    tcgen05 UTC*MMA (UTCHMMA for 16-bit operands, sm_100)."""
    head = op.split(".")[0]
    return head.startswith(("HMMA", "HGMMA", "IMMA")) or (head.startswith("UTC") and head.endswith("MMA"))


def _load_width(op: str) -> int:
    parts = op.split(".")
    for p in parts[1:]:
        if p in ("128", "64"):
            return int(p)
        if p in ("U8", "S8"):
            return 8
        if p in ("U16", "S16"):
            return 16
    return 32


@dataclass
class KernelFacts:
    """What the compiler made of one launch on one target (cubin + SASS)."""

    compiled: bool
    error: Optional[str] = None
    shared: int = 0
    registers: int = 0
    stack: int = 0
    local: int = 0
    num_warps: int = 0
    num_stages: int = 0
    sass_instructions: int = 0
    mma: int = 0
    mma_in_loop: int = 0
    ldg_widths: Dict[str, int] = field(default_factory=dict)
    loop_instructions: int = 0
    loop_found: str = ""
    ptx_fma: int = 0     # fp32 fused multiply-adds in the PTX (none where fp fusion is off and no dot runs on FMA)
    # the main loop per warp and trip: instructions by pipe (sm_model.PIPES), conflict-free
    # shared-memory wavefronts; outside the loop: the latter
    loop_pipes: Dict[str, int] = field(default_factory=dict)
    loop_smem: float = 0.0
    other_smem: float = 0.0
    # the 4-bit decode's table gather (tt.gather): table reads per thread and trip when it is in
    # the main loop (0 otherwise), bytes per entry, elements per program, the index layout (TTGIR)
    gather_lds: int = 0
    gather_in_loop: bool = False
    gather_entry_bytes: int = 0
    gather_table: int = 0          # table entries: 256 (the pair table) or 512 (the nibble table)
    gather_numel: int = 0
    gather_layout: str = ""


_FACTS_CACHE: Dict[tuple, KernelFacts] = {}


def kernel_facts(launch: _launch.Launch, target) -> KernelFacts:
    """Compile ``launch`` for ``target`` and read its resources and SASS (cached per compiled kernel)."""
    target = get_target(target)
    try:
        ck = _launch.compile_launch(launch, target)
    except Exception as e:  # the compiler's own error is the answer
        msg = f"{type(e).__name__}: {e}".strip().splitlines()
        return KernelFacts(compiled=False, error=" | ".join(msg[:3])[:400])
    key = (target.name, ck.hash)
    if key in _FACTS_CACHE:
        return _FACTS_CACHE[key]
    md = ck.metadata
    with tempfile.TemporaryDirectory() as d:
        cubin = os.path.join(d, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(ck.asm["cubin"])
        res = subprocess.run([_nvidia_tool("cuobjdump"), "--dump-resource-usage", cubin],
                             capture_output=True, text=True, check=True).stdout
        sass_text = subprocess.run([_nvidia_tool("cuobjdump"), "-sass", cubin],
                                   capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", res)
    regs, stack, _, local = (int(g) for g in m.groups())
    sass = Sass.parse(sass_text)
    widths: Dict[str, int] = {}
    for _, op, _ in sass.instructions:
        if op.startswith(("LDG", "LDGSTS")):
            k = ("LDGSTS" if op.startswith("LDGSTS") else "LDG") + f".{_load_width(op)}"
            widths[k] = widths.get(k, 0) + 1
    loops = sass.loops()
    loop_n, loop_mma, how = 0, 0, "no loop"
    if loops:
        scored = [(sass.count(is_mma, lo, hi), sass.count(lambda o: True, lo, hi), lo, hi) for lo, hi in loops]
        # the main loop: the one with the most tensor-core instructions, and of those the longest; the
        # GEMV's main loop has none (its epilogue's rank loop has the kernel's only ones): the longest
        gemv = "gemv" in launch.name
        best = max(scored, key=lambda s: (s[1],) if gemv else (s[0], s[1]))
        loop_mma, loop_n, lo, hi = best
        how = (f"backward BRA at {hi:#x} to {lo:#x}: the loop body with the most tensor-core instructions "
               f"({loop_mma})" if loop_mma else f"backward BRA at {hi:#x} to {lo:#x}: the longest loop body "
                                                 "(no tensor-core instructions in any loop)")
    lo, hi = (loops and best[2:]) or (1, 0)
    in_loop = [(op, rest) for a, op, rest in sass.instructions if lo <= a <= hi]
    loop_smem = sum(sm_model.smem_wavefronts(op, rest) for op, rest in in_loop)
    gather = sm_model.find_gather(ck.asm.get("ttgir", ""))
    gather_lds, gather_in_loop = 0, False
    if gather is not None:   # its reads: in the main loop, or (a kernel without one) anywhere
        per_thread = gather.numel // (32 * int(md.num_warps))
        where = in_loop if loops else [(op, rest) for _, op, rest in sass.instructions]
        reads = sum(1 for op, _ in where if op.startswith("LDS") and
                    sm_model.smem_wavefronts(op) * 4 == gather.entry_bytes)
        gather_lds = per_thread if reads >= per_thread else 0
        gather_in_loop = bool(loops) and gather_lds > 0
    facts = KernelFacts(
        loop_pipes=sm_model.count_pipes([op for op, _ in in_loop]), loop_smem=loop_smem,
        other_smem=sum(sm_model.smem_wavefronts(op, rest) for _, op, rest in sass.instructions) - loop_smem,
        gather_lds=gather_lds, gather_in_loop=gather_in_loop, gather_entry_bytes=gather.entry_bytes if gather else 0,
        gather_table=gather.table if gather else 0,
        gather_numel=gather.numel if gather else 0, gather_layout=gather.layout if gather else "",
        compiled=True, shared=int(md.shared), registers=regs, stack=stack, local=local,
        num_warps=int(md.num_warps), num_stages=int(md.num_stages), sass_instructions=len(sass.instructions),
        mma=sass.count(is_mma), mma_in_loop=loop_mma, ldg_widths=dict(sorted(widths.items())),
        loop_instructions=loop_n, loop_found=how,
        ptx_fma=len(re.findall(r"\bfma\.rn(?:\.ftz)?\.f32\b", ck.asm["ptx"])),
    )
    _FACTS_CACHE[key] = facts
    return facts


# ----------------------------------------------------------------------------------------------
# 4. the speed-of-light model
# ----------------------------------------------------------------------------------------------


def _nbytes(t) -> int:
    return t.numel() * _ELT.get(t.dtype, t.element_size()) if isinstance(t, torch.Tensor) else 0


def _launch_work(launch: _launch.Launch, c: Call):
    """(FLOPs, DRAM bytes, decoded weights, trips of the main loop, compute dtype) of one launch."""
    a = dict(zip(launch.kernel.arg_names, launch.args))
    a.update(launch.kwargs)
    if "dequant" in launch.name:
        numel = a["numel"]
        out = a["out_ptr"]
        absmax = _nbytes(a["absmax_ptr"]) + (_nbytes(a["absmax2_ptr"]) if a.get("NESTED") else 0)
        return 0, -(-numel // 2) + absmax + numel * out.element_size(), numel, 1, None
    M, J, I, rank = a["M"], a["J"], a["I"], a["rank"]
    compute = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(
        str(a["COMPUTE"]).replace("tl.", "").replace("float32", "fp32").replace("bfloat16", "bf16")
        .replace("float16", "fp16"), torch.float32)
    out = a["out_ptr"]
    byts = M * J * out.element_size() * (2 if a["ACC_OUT"] else 1)
    if a.get("SPLIT"):   # split-K: each split writes its fp32 partial sums; a tile's last program reads them all
        byts += configs.partial_bytes(M, J, int(launch.grid[1]))
    flops = 0
    decoded = 0
    if I > 0:
        flops += 2 * M * J * I
        byts += M * I * a["a_ptr"].element_size()
        if a["IS_4BIT"]:
            decoded = I * J
            blocks = -(-decoded // a["BLOCKSIZE"])
            byts += decoded // 2 + (blocks + -(-blocks // 256) * 4 if a["NESTED"] else blocks * 4)
        else:
            byts += I * J * a["w_ptr"].element_size()
    if a["HAS_LORA"]:
        flops += 2 * M * J * rank
        byts += M * rank * a["l_ptr"].element_size() + rank * J * a["r_ptr"].element_size()
    if a["HAS_BIAS"]:
        byts += J * a["bias_ptr"].element_size()
    # split-K: grid axis 1 holds the splits, each program takes its share of the BLOCK_I steps
    splits = int(launch.grid[1]) if len(launch.grid) > 1 else 1
    trips = -(-(-(-I // a["BLOCK_I"])) // splits) if I > 0 and a.get("MAIN", True) else 0
    return flops, byts, decoded, trips, compute


def _launch_args(launch: _launch.Launch) -> dict:
    a = dict(zip(launch.kernel.arg_names, launch.args))
    a.update(launch.kwargs)
    return a


def _program_tensor_flops(a: dict, trips: int) -> Dict[str, int]:
    """The tensor-core work of one program of a ``_lora_matmul_kernel`` launch, its whole tile
    (padding included), by operand dtype: {"main": ..., "lora": ...}, 0 for a part that is fp32
    (FMA) or absent."""
    bm, bj = a["BLOCK_M"], a["BLOCK_J"]
    main = 2 * bm * bj * a["BLOCK_I"] * trips if "float32" not in str(a["COMPUTE"]) else 0
    if "EPI_M" in a:        # the GEMV kernel: its main loop on the FMA units, its epilogue EPI_M rows
        main, bm = 0, a["EPI_M"]
    lora = 0
    if a["HAS_LORA"] and a["rank"] and a["l_ptr"].dtype != torch.float32:
        br = a["BLOCK_R"]
        lora = 2 * bm * bj * -(-a["rank"] // br) * br
    return {"main": main, "lora": lora}


@dataclass(frozen=True)
class SumPass:
    """The split-K sum of one launch: each tile's last program adds ``splits`` fp32 slices."""

    splits: int
    tiles: int
    elements: int            # fp32 partial elements per thread per slice
    instr_per_trip: float    # per thread (= per warp), one slice
    read_bytes: int          # the partials read back


def _sum_pass(launch: _launch.Launch, warps: int) -> Optional[SumPass]:
    """The split-K sum pass of a ``_lora_matmul_kernel`` launch (None without split-K), modelled from
    its tile: per thread and slice e = BLOCK_M·BLOCK_J/(32·warps) fp32 elements, loaded v = min(4, e)
    at a time: e adds, e/2 zero fills (the masked loads' ``other``: two registers per CS2R), e/v
    loads and e/v address computations, 2 for the loop."""
    a = _launch_args(launch)
    if "lora_matmul" not in launch.name or not a.get("SPLIT") or len(launch.grid) < 2:
        return None
    splits = int(launch.grid[1])
    e = max(1, a["BLOCK_M"] * a["BLOCK_J"] // (32 * warps))
    v = min(4, e)
    loads = -(-e // v)
    return SumPass(splits=splits, tiles=int(launch.grid[0]), elements=e,
                   instr_per_trip=e + e / 2 + 2 * loads + 2, read_bytes=splits * a["M"] * a["J"] * 4)


def _occupancy(f: KernelFacts, t: Target) -> int:
    warps = max(1, f.num_warps)
    regs = max(1, -(-max(f.registers, 1) // 8) * 8)
    by_regs = t.regs_per_sm // (regs * 32 * warps)
    reserved = SMEM_RESERVED_PER_BLOCK if t.cc >= 80 else 0
    by_smem = t.smem_per_sm // (f.shared + reserved) if f.shared else t.max_blocks_per_sm
    return max(0, min(t.max_blocks_per_sm, t.max_warps_per_sm // warps, by_regs, by_smem))


@dataclass
class LaunchReport:
    label: str
    phase: str                           # "forward" or "backward"
    kernel: str
    grid: List[int]
    programs: int
    config: Dict[str, int]
    facts: KernelFacts
    fits: bool
    smem_limit: int
    resident_per_sm: int
    flops: int
    bytes: int
    instr_per_weight: Optional[float]   # thread-instructions per decoded weight in the main loop
    issue_us: float
    dram_us: float
    tensor_us: float
    model_us: float                      # max(issue, DRAM, tensor) + sum tail + latency: a model, not a measurement
    floor_us: float
    waves: int = 1                       # ceil(programs / (resident · SMs))
    per_sm: int = 1                      # whole programs on the busiest SM: ceil(programs / SMs)
    sum_us: float = 0.0                  # the split-K sum tail (0 without split-K): a model
    sum_instructions: float = 0.0        # per thread, one tile's whole sum (splits × per trip)
    sum_tail_bytes: int = 0              # the partials read back in the sum tail (the last wave's tiles)
    latency_us: float = 0.0              # KERNEL_LATENCY_US
    pipe: str = "issue"                  # what binds a main-loop trip: the issue or a pipe (sm_model)
    bound: str = ""                      # the largest term: the issue or a pipe, dram, tensor, smem, latency
    smem_us: float = 0.0                 # shared-memory wavefronts of the busiest SM at one per clock
    dram_latency_us: float = 0.0         # Little's law: trips waiting out DRAM latency (sm_model)
    gather_wavefronts: Optional[float] = None       # per warp-wide table read, real NF4 bytes
    gather_wavefronts_free: Optional[float] = None  # the same read without bank conflicts
    smem_per_weight: Optional[float] = None         # main-loop wavefronts per decoded weight
    smem_per_weight_free: Optional[float] = None    # the same, every access conflict-free
    # a merged launch: each segment modelled as the launch of its own it would otherwise be (with
    # the facts of that kernel compiled alone); the launch's own facts are ``facts``
    parts: List["LaunchReport"] = field(default_factory=list)


def _merged_report(launch: _launch.Launch, t: Target, f: KernelFacts, parts: List["LaunchReport"]) -> LaunchReport:
    """A merged launch, modelled as its segments one after another (each as its own launch would be,
    less the launch latencies it saves): the overlap of segments bound by different units is left out,
    so this errs slow. Fit and resources are the merged kernel's own compile."""
    occ = _occupancy(f, t) if f.compiled else 0
    programs = launch.programs
    latency = KERNEL_LATENCY_US
    dram = sum(P.dram_us for P in parts)
    # a floor: the segments' bytes at full bandwidth against their math at full peak (each part's
    # floor is max(its DRAM, its math); where its math decides, that figure is its math floor)
    math = sum(P.floor_us for P in parts if P.floor_us > P.dram_us)
    ipw = [P.instr_per_weight for P in parts if P.instr_per_weight is not None]
    return LaunchReport(
        label=launch.label or launch.name, phase=launch.phase or "forward", kernel=launch.name,
        grid=list(launch.grid), programs=programs, config=dict(parts[0].config), facts=f,
        fits=f.compiled and f.shared <= t.smem_per_block and f.stack == 0 and f.local == 0,
        smem_limit=t.smem_per_block, resident_per_sm=occ, flops=sum(P.flops for P in parts),
        bytes=sum(P.bytes for P in parts), instr_per_weight=ipw[0] if ipw else None,
        issue_us=sum(P.issue_us for P in parts), dram_us=dram, tensor_us=sum(P.tensor_us for P in parts),
        model_us=sum(P.model_us for P in parts) - (len(parts) - 1) * latency, floor_us=max(dram, math),
        waves=-(-programs // (max(1, occ) * t.sms)), per_sm=-(-programs // t.sms),
        sum_us=sum(P.sum_us for P in parts), sum_instructions=sum(P.sum_instructions for P in parts),
        sum_tail_bytes=sum(P.sum_tail_bytes for P in parts), latency_us=latency, parts=parts,
        smem_us=sum(P.smem_us for P in parts), dram_latency_us=sum(P.dram_latency_us for P in parts),
    )


def model_launch(launch: _launch.Launch, c: Call, t: Target, f, part_facts=None, sm_terms: bool = True) -> LaunchReport:
    """One launch's model; a merged launch (``launch.parts``) takes ``part_facts``: the facts of
    each segment compiled as a launch of its own (without them, the merged kernel's own for each).
    ``sm_terms=False`` leaves out the pipes, shared memory and DRAM latency (``sm_model``): the model
    as it was without them, for comparing the two against measurements."""
    if launch.parts:
        parts = [model_launch(P, c, t, pf, sm_terms=sm_terms)
                 for P, pf in zip(launch.parts, part_facts or [f] * len(launch.parts))]
        return _merged_report(launch, t, f, parts)
    flops, byts, decoded, trips, compute = _launch_work(launch, c)
    kw = launch.kwargs
    matmul = "lora_matmul" in launch.name
    programs = launch.programs
    occ = _occupancy(f, t) if f.compiled else 0
    per_sm = -(-programs // t.sms)                     # whole programs on the busiest SM
    waves = -(-programs // (max(1, occ) * t.sms))
    warps = max(1, f.num_warps or kw.get("num_warps", 4))
    clock = t.clock_ghz * 1e9
    bw = t.dram_gbs * 1e9
    sp = _sum_pass(launch, warps) if matmul else None
    other = max(0, f.sass_instructions - f.loop_instructions)
    if sp is not None:   # the sum loop's code: only a tile's last program runs it (in the sum tail)
        other = max(0, other - SUM_CODE_TRIPS * sp.instr_per_trip)
    # a trip costs a warp its instructions or, where more, its busiest pipe's clocks (sm_model)
    loop_cyc, pipe = (sm_model.loop_cycles(f.loop_instructions, f.loop_pipes, t) if f.loop_pipes and sm_terms
                      else (float(f.loop_instructions), "issue"))
    instr_pp = other + loop_cyc * trips if matmul else f.sass_instructions
    sched = min(t.schedulers_per_sm, warps * max(1, min(occ or 1, per_sm)))
    issue = per_sm * warps * instr_pp / (sched * clock)
    # shared memory: one wavefront per clock per SM; the decode's table reads at their wavefronts
    # over real NF4 bytes (bank conflicts), every other access conflict-free
    gw = _gather_wavefronts(f, kw) if f.gather_lds else None
    free = sm_model.conflict_free_wavefronts(f.gather_entry_bytes) if gw is not None else None
    conflicts = f.gather_lds * (gw - free) if gw is not None else 0.0
    smem_trip = f.loop_smem + (conflicts if f.gather_in_loop else 0.0)
    other_smem = max(0.0, f.other_smem) + (0.0 if f.gather_in_loop else conflicts)
    smem = per_sm * warps * (smem_trip * (trips if matmul else 0) + other_smem) / clock if sm_terms else 0.0
    stages = int(kw.get("STAGES", f.num_stages or kw.get("num_stages", 1)) or 1)
    mem_lat = (sm_model.latency_bound_s(trips, per_sm, occ, stages, clock)
               if matmul and f.compiled and sm_terms else 0.0)
    dram = byts / bw
    peak = t.tensor_tflops(compute) if compute is not None else None
    tensor = 0.0
    if f.mma and matmul:
        a = _launch_args(launch)
        work = _program_tensor_flops(a, trips)
        lora_peak = t.tensor_tflops(a["l_ptr"].dtype) if a["HAS_LORA"] else None
        for part, pk in (("main", peak), ("lora", lora_peak)):
            if work[part] and pk:   # per SM: its whole programs, each at the SM's share of the peak
                tensor += per_sm * work[part] / (pk * 1e12 / t.sms)
    elif f.mma and peak:
        tensor = flops / (peak * 1e12 * min(1.0, programs / t.sms))
    tail = 0.0
    tail_bytes = 0
    main_dram = dram
    if sp is not None:
        # the tiles whose last program runs in the last wave sum after the main pass: a tail; the
        # others' sums overlap the last waves (their reads in the DRAM time, their adds in the issue)
        last_wave = programs - (waves - 1) * max(1, occ) * t.sms
        tail_tiles = max(1, min(sp.tiles, last_wave))
        tail_bytes = sp.read_bytes * tail_tiles // sp.tiles
        main_dram = (byts - tail_bytes) / bw
        early_per_sm = -(-(sp.tiles - tail_tiles) // t.sms)
        issue += early_per_sm * warps * sp.splits * sp.instr_per_trip / (sched * clock)
        last_per_sm = -(-tail_tiles // t.sms)         # the tiles' last programs, spread over the SMs
        one = warps * sp.splits * sp.instr_per_trip / (min(t.schedulers_per_sm, warps) * clock)
        all_sums = (last_per_sm * warps * sp.splits * sp.instr_per_trip
                    / (min(t.schedulers_per_sm, warps * last_per_sm) * clock))
        chain = (2 + -(-sp.splits // SUM_UNROLL)) * L2_ROUND_TRIP_CYCLES / clock + one
        tail = max(chain, all_sums, tail_bytes / bw)
    latency = KERNEL_LATENCY_US * 1e-6
    floor_peak = (peak if peak else t.fp32_tflops) * 1e12
    floor = max(dram, flops / floor_peak)
    ipw = None
    spw = spw_free = None
    if decoded and f.loop_instructions and matmul:
        ipw = f.loop_instructions * warps * 32 / (kw["BLOCK_I"] * kw["BLOCK_J"])
        spw = smem_trip * warps / (kw["BLOCK_I"] * kw["BLOCK_J"])
        spw_free = f.loop_smem * warps / (kw["BLOCK_I"] * kw["BLOCK_J"])
    elif decoded and "dequant" in launch.name:
        ipw = f.sass_instructions * warps * 32 / kw["BLOCK"]
    cfg = {k: kw[k] for k in ("BLOCK_M", "BLOCK_J", "BLOCK_I", "BLOCK", "num_warps", "num_stages") if k in kw}
    return LaunchReport(
        label=launch.label or launch.name, phase=launch.phase or "forward",
        kernel=launch.name, grid=list(launch.grid), programs=programs,
        config=cfg, facts=f, fits=f.compiled and f.shared <= t.smem_per_block and f.stack == 0 and f.local == 0,
        smem_limit=t.smem_per_block, resident_per_sm=occ, flops=flops, bytes=byts, instr_per_weight=ipw,
        issue_us=issue * 1e6, dram_us=dram * 1e6, tensor_us=tensor * 1e6,
        model_us=(max(issue, main_dram, tensor, smem, mem_lat) + tail + latency) * 1e6, floor_us=floor * 1e6,
        waves=waves, per_sm=per_sm, sum_us=tail * 1e6, sum_tail_bytes=tail_bytes,
        sum_instructions=sp.splits * sp.instr_per_trip if sp is not None else 0.0, latency_us=latency * 1e6,
        pipe=pipe, bound=max({pipe: issue, "dram": main_dram, "tensor": tensor, "smem": smem, "latency": mem_lat}.items(),
                             key=lambda kv: kv[1])[0] if f.compiled else "",
        smem_us=smem * 1e6, dram_latency_us=mem_lat * 1e6, gather_wavefronts=gw,
        gather_wavefronts_free=free, smem_per_weight=spw, smem_per_weight_free=spw_free,
    )


_GATHER_CACHE: Dict[tuple, float] = {}


def _gather_wavefronts(f: KernelFacts, kw: dict) -> Optional[float]:
    """Wavefronts of one warp-wide table read of the decode, over real NF4 bytes (sm_model), the
    W tile's bytes [rows of W, columns / 2] read in the compiled index layout; None if the layout
    cannot be read."""
    # the nibble table (quant4.decode_nibbles) reads a nibble per index element, at entry 33·c
    nibbles = f.gather_table == 512 and f.gather_entry_bytes == 4
    per = 1 if nibbles else 2                # weights per index element
    if "BLOCK_J" in kw:
        rows, cols = ((kw["BLOCK_I"], kw["BLOCK_J"] // per) if kw.get("TRANS_W")
                      else (kw["BLOCK_J"], kw["BLOCK_I"] // per))
    else:                    # the dequant kernel: a flat run of bytes
        rows, cols = 1, f.gather_numel
    if rows * cols != f.gather_numel:
        rows, cols = 1, f.gather_numel
    key = (f.gather_layout, f.gather_numel, f.num_warps, rows, cols, f.gather_entry_bytes, nibbles)
    if key not in _GATHER_CACHE:
        try:
            offs = sm_model.lane_offsets(f.gather_layout, f.gather_numel, max(1, f.num_warps))
        except (ValueError, AttributeError):
            return None
        _GATHER_CACHE[key] = sm_model.gather_wavefronts(
            offs, rows, cols, f.gather_entry_bytes, nibbles=nibbles,
            slot=(lambda c, lane: c * _NIBBLE_STRIDE) if nibbles else None)
    return _GATHER_CACHE[key]


@dataclass
class TorchLaunchReport:
    """A kernel PyTorch launches inside the call (an ATen op: a cuBLAS GEMM, an elementwise op),
    modelled at its floor + KERNEL_LATENCY_US."""

    label: str                # "cuBLAS mm", "torch add_"
    op: str                   # the ATen op, "aten.mm.out"
    phase: str                # "forward" or "backward"
    after: int                # how many of the call's Triton launches run before it
    flops: int
    bytes: int
    model_us: float           # floor + KERNEL_LATENCY_US: a model, not a measurement
    floor_us: float


@dataclass
class CallReport:
    call: Call
    target: str
    launches: List[LaunchReport]
    cublas_us: float          # the cuBLAS GEMMs (the dequant strategy's), modelled at their floor + latency
    model_us: float           # Σ launches + Σ PyTorch's kernels (cuBLAS's included): a model
    compute_floor_us: float
    memory_floor_us: float
    launch_us: float = 0.0    # launches (cuBLAS's and PyTorch's included) × LAUNCH_US: a model
    host_us: Optional[float] = None   # the call's host time, measured on this CPU (``--host``), or None
    torch_launches: List[TorchLaunchReport] = field(default_factory=list)   # PyTorch's kernels of the call

    @property
    def eager_us(self) -> float:
        """An eager step: the GPU's modelled time with its launch gaps, unless the host is slower."""
        return max(self.model_us + self.launch_us, self.host_us or 0.0)

    @property
    def floor_us(self) -> float:
        return max(self.compute_floor_us, self.memory_floor_us)

    @property
    def ok(self) -> bool:
        return all(L.fits for L in self.launches)

    @property
    def n_launches(self) -> int:
        return len(self.launches) + len(self.torch_launches)

    def phase_us(self, phase: str) -> float:
        """The modelled time of the forward or the backward launches (PyTorch's kernels included)."""
        return (sum(L.model_us for L in self.launches if L.phase == phase)
                + sum(L.model_us for L in self.torch_launches if L.phase == phase))


def _gemm_floor(M, N, K, dt, t: Target, nbytes: Optional[int] = None) -> float:
    """Seconds: a GEMM [M, K]·[K, N] at the tensor peak of ``dt`` (the fp32 FMA peak for fp32)
    against its bytes (default: both operands read and the product written once, 16-bit)."""
    peak = t.tensor_tflops(dt) or t.fp32_tflops
    if nbytes is None:
        nbytes = (M * K + N * K + M * N) * 2
    return max(2 * M * N * K / (peak * 1e12), nbytes / (t.dram_gbs * 1e9))


# ATen ops PyTorch runs as GEMMs (cuBLAS); ops that launch no kernel besides views
_GEMM_OPS = ("mm", "addmm", "bmm", "baddbmm", "matmul")
_NO_KERNEL_OPS = ("empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh",
                  "resize_", "set_", "_local_scalar_dense", "sym_size", "sym_stride", "sym_numel",
                  "sym_storage_offset", "is_same_size", "_has_compatible_shallow_copy_type")


def _torch_kernels(c: Call, t: Target) -> List[TorchLaunchReport]:
    """The kernels PyTorch launches inside the call on ``t``: the call is recorded again under a
    dispatch mode that sees its ATen ops; every op but views, allocations and factories without
    tensor inputs launches a kernel, modelled at its floor (a GEMM: bytes / bandwidth against
    2·m·n·k at the tensor peak of its dtype; any other op: bytes / bandwidth) + KERNEL_LATENCY_US."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    seen = []

    class _Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            name = func.overloadpacket.__name__
            if not func.is_view and name not in _NO_KERNEL_OPS:
                ins = [x for x in tree_flatten((args, {k: v for k, v in kwargs.items() if k != "out"}))[0]
                       if isinstance(x, torch.Tensor)]
                outs = [x for x in tree_flatten(out)[0] if isinstance(x, torch.Tensor)]
                if ins:   # a factory without tensor inputs is setup (split-K's counters, once)
                    rec = _launch._recorder()
                    seen.append((func, name, ins, outs, len(rec.launches) if rec is not None else 0))
            return out

    with _Ops():
        launches = record_call(c, t)
    res = []
    bw = t.dram_gbs * 1e9
    for func, name, ins, outs, after in seen:
        nbytes = sum(_nbytes(x) for x in ins) + sum(_nbytes(x) for x in outs)
        phase = (launches[after - 1].phase if after else "forward") or "forward"
        if name in _GEMM_OPS and outs and len(ins) >= 2:
            a = [x for x in ins if x.dim() >= 2][0]
            k = a.shape[-1]
            flops = 2 * outs[0].numel() * k
            m = outs[0].numel() // outs[0].shape[-1]
            floor = _gemm_floor(m, outs[0].shape[-1], k, a.dtype, t, nbytes)
            label = f"cuBLAS {name}"
        else:
            flops, floor, label = 0, nbytes / bw, f"torch {name}"
        res.append(TorchLaunchReport(label=label, op=str(func), phase=phase, after=after, flops=flops,
                                     bytes=nbytes, model_us=floor * 1e6 + KERNEL_LATENCY_US,
                                     floor_us=floor * 1e6))
    return res


def _call_report(c: Call, t: Target, launches, facts: Sequence[KernelFacts], part_facts=None) -> CallReport:
    """``part_facts``: per launch, the facts of its segments compiled alone (a merged launch), else None."""
    part_facts = part_facts or [None] * len(launches)
    reports = [model_launch(L, c, t, f, pf) for L, f, pf in zip(launches, facts, part_facts)]
    torch_launches = _torch_kernels(c, t)
    dt = _DTYPES[c.dtype]
    gemms = 2 if c.mode == "train" else 1
    cublas = sum(L.model_us for L in torch_launches if L.label.startswith("cuBLAS"))
    peak = (t.tensor_tflops(dt) or t.fp32_tflops) * 1e12
    compute_floor = gemms * 2 * c.M * c.N * c.K / peak
    wbytes = c.N * c.K / 2 + c.N * c.K / c.blocksize * (1 if c.nested else 4) if c.is_4bit else c.N * c.K * 2
    act = (c.M * c.K + c.M * c.N) * 2
    memory_floor = gemms * (wbytes + act) / (t.dram_gbs * 1e9)
    n_launches = len(reports) + len(torch_launches)
    model = sum(r.model_us for r in reports) + sum(r.model_us for r in torch_launches)
    return CallReport(c, target_key(t), reports, cublas, model, compute_floor * 1e6, memory_floor * 1e6,
                      n_launches * LAUNCH_US, torch_launches=torch_launches)


def measure_host(c: Call, target, reps: int = 30) -> float:
    """The host µs of one layer call (forward + backward for "train"), the minimum over ``reps``,
    measured on this CPU through Triton's real launch path with a driver that launches nothing
    (``kernels._launch.stubbed``), on meta tensors: what the call costs the host up to the driver."""
    import time

    from . import ops

    t = get_target(target)
    dt = _DTYPES[c.dtype]
    train = c.mode == "train"
    w = _meta_packed(c) if c.is_4bit else torch.empty(c.N, c.K, dtype=dt, device="meta")
    x = torch.empty(c.M, c.K, dtype=dt, device="meta", requires_grad=train)
    A = torch.empty(c.rank, c.K, device="meta", requires_grad=train)
    B = torch.empty(c.N, c.rank, device="meta", requires_grad=train)
    dy = torch.empty(c.M, c.N, dtype=dt, device="meta")
    p = c.dropout if train else 0.0

    def call():
        y = ops.lora_linear(x, w, A, B, 2.0, dropout_p=p, lora_dtype=c.lora_dtype, strategy=c.strategy)
        if train:
            y.backward(dy)
            A.grad = B.grad = x.grad = None

    best = float("inf")
    with _launch.stubbed(t), torch.set_grad_enabled(train):
        for i in range(reps + 3):      # the first calls compile (or load) the kernels and plan
            t0 = time.perf_counter_ns()
            call()
            if i >= 3:
                best = min(best, time.perf_counter_ns() - t0)
    return best / 1e3


def inspect_call(c: Call, target) -> CallReport:
    """Record, compile, read and model one layer call on ``target``."""
    t = get_target(target)
    launches = record_call(c, t)
    return _call_report(c, t, launches, [kernel_facts(L, t) for L in launches],
                        [[kernel_facts(P, t) for P in L.parts] if L.parts else None for L in launches])


def _spec_key(launch: _launch.Launch, t: Target) -> tuple:
    """Identifies what Triton compiles for a launch: target, kernel, argument specialization, keywords."""
    spec = _launch.specialization(launch, t)
    return (t.name, launch.name, repr(sorted(spec.items())),
            repr(sorted((k, str(v)) for k, v in launch.kwargs.items())))


_POOL_JOBS: list = []


def _facts_job(i: int) -> KernelFacts:
    t, launch = _POOL_JOBS[i]
    return kernel_facts(launch, t)


# ----------------------------------------------------------------------------------------------
# the command
# ----------------------------------------------------------------------------------------------


def kernels_compilable() -> bool:
    """False when the kernels were decorated for the CPU interpreter (then inspect needs a new process)."""
    from triton.runtime.jit import JITFunction

    from .kernels import lora_matmul

    return isinstance(lora_matmul._lora_matmul_kernel, JITFunction)


def calls_for(shapes: Dict[str, tuple], ms: Sequence[int], *, rank=16, dropout=0.05, dtype="bf16", quant="nf4",
              nested=True, strategies=("fused", "dequant"), modes=("train", "infer"),
              adapters="autocast") -> List[Call]:
    if adapters not in ("autocast", "fp32"):
        raise ValueError(f"adapters must be 'autocast' or 'fp32', got {adapters!r}")
    return [Call(N, K, M, rank, dropout, dtype, quant, nested, 64, s, mode, name, adapters)
            for name, (N, K) in shapes.items() for M in ms for s in strategies for mode in modes]


def target_key(t: Target) -> str:
    """How reports name a target: its arch ("sm_90") for the arch's own entry, else its board ("H100
    PCIe"), so that several boards of one arch can be inspected side by side."""
    return t.name if TARGETS.get(t.name) is t else t.gpu


def run(calls: Sequence[Call], targets: Sequence[str], jobs: Optional[int] = None,
        host: bool = False, triton_path: Optional[str] = None, parts: bool = True) -> List[CallReport]:
    """Inspect ``calls`` on ``targets``: each distinct specialization is compiled once, ``jobs``
    compiles at a time (default: the CPU count); ``host``: also measure each call's host time on
    this CPU (:func:`measure_host`). In a process whose kernels run in Triton's interpreter this
    starts a fresh process without TRITON_INTERPRET and returns its answer. ``triton_path``: a
    folder holding another Triton (``pip install --target DIR triton==X``), put first on the
    worker's import path: the same launches compiled by that Triton's compiler. ``parts`` (default
    on): compile each segment of a merged launch alone too, for the segment's model; off, segments
    are modelled with the merged kernel's facts (enough where only the launches' resources matter)."""
    if triton_path is not None or not kernels_compilable():
        return _run_elsewhere(calls, targets, jobs, host, triton_path, parts)
    recorded = []                      # (call, target, launches, keys)
    distinct: Dict[tuple, tuple] = {}  # key -> (target, launch)
    for tname in targets:
        t = get_target(tname)
        for c in calls:
            if c.dtype == "bf16" and not t.has_bf16:
                continue
            launches = record_call(c, t)
            keys = [_spec_key(L, t) for L in launches]
            part_keys = [[_spec_key(P, t) for P in L.parts] if parts else [] for L in launches]
            for k, L in zip(keys, launches):
                distinct.setdefault(k, (t, L))
            for ks, L in zip(part_keys, launches):
                for k, P in zip(ks, L.parts):
                    distinct.setdefault(k, (t, P))
            recorded.append((c, t, launches, keys, part_keys))
    order = list(distinct)
    jobs = jobs or os.cpu_count() or 1
    global _POOL_JOBS
    _POOL_JOBS = [distinct[k] for k in order]
    try:
        if jobs > 1 and len(order) > 1:
            import concurrent.futures
            import multiprocessing

            # fork: the workers inherit the recorded launches (kernels and meta tensors do not pickle)
            with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as ex:
                facts = list(ex.map(_facts_job, range(len(order)), chunksize=1))
        else:
            facts = [_facts_job(i) for i in range(len(order))]
    finally:
        _POOL_JOBS = []
    by_key = dict(zip(order, facts))
    reports = [_call_report(c, t, launches, [by_key[k] for k in keys],
                            [[by_key[k] for k in ks] if ks else None for ks in part_keys])
               for c, t, launches, keys, part_keys in recorded]
    if host:
        for r in reports:
            r.host_us = measure_host(r.call, r.target)
    return reports


def _run_elsewhere(calls, targets, jobs=None, host=False, triton_path=None, parts=True) -> List[CallReport]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if triton_path is not None:
        env["PYTHONPATH"] = os.pathsep.join([os.path.abspath(triton_path)] + (
            [env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        env.setdefault("FASTLORA_NVIDIA_TOOLS", os.path.dirname(_nvidia_tool("cuobjdump")))
    payload = json.dumps({"calls": [asdict(c) for c in calls], "targets": list(targets), "jobs": jobs,
                          "host": host, "parts": parts})
    proc = subprocess.run([sys.executable, "-m", "fastlora.inspection", "--worker"], input=payload,
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"fastlora inspect worker failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return [_report_from_dict(d) for d in json.loads(proc.stdout)]


def report_to_dict(r: CallReport) -> dict:
    d = asdict(r)
    d["floor_us"] = r.floor_us
    d["eager_us"] = r.eager_us
    d["ok"] = r.ok
    d["note"] = ("model_us, floor_us, issue_us, dram_us, tensor_us, sum_us, latency_us, smem_us, dram_latency_us, "
                 "cublas_us, launch_us are "
                 "a static speed-of-light model, not measurements")
    return d


def _report_from_dict(d: dict) -> CallReport:
    def launch_report(L: dict) -> LaunchReport:
        L = dict(L)
        L["facts"] = KernelFacts(**L["facts"])
        L["parts"] = [launch_report(P) for P in L.get("parts", [])]
        return LaunchReport(**L)

    launches = [launch_report(L) for L in d["launches"]]
    return CallReport(Call(**d["call"]), d["target"], launches, d["cublas_us"], d["model_us"],
                      d["compute_floor_us"], d["memory_floor_us"], d.get("launch_us", 0.0), d.get("host_us"),
                      [TorchLaunchReport(**x) for x in d.get("torch_launches", [])])


def _fmt_us(x: float) -> str:
    return f"{x:,.1f}" if x >= 10 else f"{x:.2f}"


def _variant(c: Call) -> str:
    """What sets a call apart besides its shape, M and strategy (for the per-projection lines)."""
    bits = [c.mode, c.dtype, c.quant + ("" if c.nested or not c.is_4bit else " no-double-quant")]
    if c.adapters == "fp32":
        bits.append("fp32-adapters")
    if c.rank != 16:
        bits.append(f"r={c.rank}")
    if c.dropout != 0.05:
        bits.append(f"dropout={c.dropout:g}")
    return " ".join(bits)


def _by_projection(rs: Sequence[CallReport]) -> Dict[tuple, Dict[int, Dict[str, CallReport]]]:
    """{(shape, variant): {M: {strategy: report}}}, in the reports' order."""
    out: Dict[tuple, Dict[int, Dict[str, CallReport]]] = {}
    for r in rs:
        c = r.call
        key = (c.shape_name or f"{c.N}x{c.K}", _variant(c))
        out.setdefault(key, {}).setdefault(c.M, {})[c.strategy] = r
    return out


def _pick(c: Call, t: Target) -> str:
    from .ops import choose_strategy

    return choose_strategy(c.M, None, target=t)


def _projection_lines(rs: Sequence[CallReport], t: Target) -> List[str]:
    """Per projection shape (and call variant) and M: each strategy's modelled layer call against
    the call's floor, the strategy fastlora picks marked *; then the sum over the shapes."""
    groups = _by_projection(rs)
    if not groups:
        return []
    lines = [f"per projection, one layer call: {MODEL} / floor per strategy (* = the strategy fastlora picks "
             f"on {t.name}):"]
    width = max(len(s) for s, _ in groups) + 1
    sums: Dict[tuple, Dict[str, List[float]]] = {}
    for (shape, variant), per_m in groups.items():
        for m, by_s in per_m.items():
            cells = []
            for s, r in by_s.items():
                pick = s == _pick(r.call, t)
                cells.append(f"{s}{'*' if pick else ' '} {MODEL} {_fmt_us(r.model_us)} µs / floor "
                             f"{_fmt_us(r.floor_us)} µs = {r.model_us / r.floor_us:.2f}×")
                acc = sums.setdefault((variant, m), {}).setdefault(s, [0.0, 0.0, 0, True])
                acc[0] += r.model_us
                acc[1] += r.floor_us
                acc[2] += 1
                acc[3] = acc[3] and pick
            lines.append(f"  {shape:{width}} {variant:24} M={m:<6} " + "   ".join(cells))
    if len(groups) > 1:
        for (variant, m), by_s in sums.items():
            cells = [f"{s}{'*' if v[3] else ' '} {MODEL} {_fmt_us(v[0])} µs / floor {_fmt_us(v[1])} µs = "
                     f"{v[0] / v[1]:.2f}× ({v[2]} shapes)" for s, v in by_s.items()]
            lines.append(f"  {'Σ shapes':{width}} {variant:24} M={m:<6} " + "   ".join(cells))
    return lines


def format_reports(reports: Sequence[CallReport], detail: bool = True) -> str:
    lines = []
    for tname in dict.fromkeys(r.target for r in reports):
        t = TARGETS.get(tname) or get_target(tname)
        lines.append(f"\n== {tname} ({t.gpu}: {t.sms} SMs, {t.clock_ghz} GHz, {t.dram_gbs:,.0f} GB/s, "
                     f"{t.tensor_tflops_bf16 or '-'} / {t.tensor_tflops_fp16} TFLOP/s bf16/fp16 tensor, "
                     f"{t.smem_per_block:,} B shared/block)")
        header = (f"{'call':44} {'kernel':13} {'fits':5} {'shared':>15} {'reg':>4} {'spill':>5} "
                  f"{'w/s':>4} {'grid':>6} {'occ':>3} {'wav':>3} {'mma':>4} {'ldg widths':18} {'i/wt':>5} "
                  f"{'wf/read':>9} {'bound':>8} {'sum µs':>7} {'model µs':>9} {'floor µs':>9}")
        if detail:
            lines.append(header)
        for r in (r for r in reports if r.target == tname):
            c = r.call
            name = (f"{c.shape_name or f'{c.N}x{c.K}'} M={c.M} {c.strategy} {c.mode}"
                    f"{'' if c.quant != 'dense' else ' dense'}{' fp32-adapters' if c.adapters == 'fp32' else ''}")
            if detail:
                for i, L in enumerate(r.launches + [None]):
                    for T in (T for T in r.torch_launches if T.after == i):   # PyTorch's kernels, in call order
                        left = f"{name:44} {T.label:13} PyTorch ({T.op}, {T.bytes:,} B, {T.flops:,} FLOPs)"
                        lines.append(f"{left:{len(header) - 20}} {_fmt_us(T.model_us):>9} {_fmt_us(T.floor_us):>9}")
                    if L is None:
                        break
                    f = L.facts
                    if not f.compiled:
                        lines.append(f"{name:44} {L.label:13} ERROR {f.error}")
                        continue
                    ldg = ",".join(f"{k.split('.')[0][3:] or ''}{k.split('.')[1]}×{v}" for k, v in f.ldg_widths.items())
                    ipw = f"{L.instr_per_weight:.1f}" if L.instr_per_weight is not None else "-"
                    wf = (f"{L.gather_wavefronts:.2f}/{L.gather_wavefronts_free:g}"
                          if L.gather_wavefronts is not None else "-")
                    lines.append(
                        f"{name:44} {L.label:13} {'yes' if L.fits else 'NO':5} "
                        f"{f.shared:>7,}/{L.smem_limit:<7,} {f.registers:>4} {f.stack + f.local:>5} "
                        f"{f.num_warps:>2}/{f.num_stages:<1} {L.programs:>6} {L.resident_per_sm:>3} {L.waves:>3} "
                        f"{f.mma:>4} {ldg[:18]:18} {ipw:>5} {wf:>9} {L.bound or '-':>8} "
                        f"{_fmt_us(L.sum_us) if L.sum_us else '-':>7} "
                        f"{_fmt_us(L.model_us):>9} {_fmt_us(L.floor_us):>9}")
            other = sum(T.model_us for T in r.torch_launches) - r.cublas_us
            parts = [f"cuBLAS {_fmt_us(r.cublas_us)}" if r.cublas_us else "",
                     f"PyTorch elementwise {_fmt_us(other)}" if r.torch_launches and other > 1e-9 else "",
                     f"sum tails {_fmt_us(sum(L.sum_us for L in r.launches))}" if any(L.sum_us for L in r.launches)
                     else "", f"{r.n_launches} launches × {KERNEL_LATENCY_US} µs latency"]
            extra = f" (of it {', '.join(p for p in parts if p)})"
            lines.append(f"{name:44} STEP ({MODEL}): {_fmt_us(r.model_us)} µs{extra}; floor "
                         f"{_fmt_us(r.floor_us)} µs (compute {_fmt_us(r.compute_floor_us)}, memory "
                         f"{_fmt_us(r.memory_floor_us)}) -> {r.model_us / r.floor_us:.2f}× floor; "
                         f"{'all kernels fit, no spills' if r.ok else 'SOME KERNEL DOES NOT FIT OR SPILLS'}")
            host = (f"; host {_fmt_us(r.host_us)} µs (measured on this CPU, launches stubbed)"
                    if r.host_us is not None else "")
            lines.append(f"{'':44} + {round(r.launch_us / LAUNCH_US)} launches × {LAUNCH_US} µs ({MODEL}){host} -> "
                         f"eager step {_fmt_us(r.eager_us)} µs")
        lines += [""] + _projection_lines([r for r in reports if r.target == tname], t)
    lines.append(f"\nEvery µs figure above is a static speed-of-light {MODEL} (see fastlora/inspection.py), "
                 "not a measurement.")
    return "\n".join(lines)


def format_markdown(reports: Sequence[CallReport]) -> str:
    """Per target: do all kernels fit, their largest register count and spill bytes, and per M the
    training step of the strategy fastlora picks there (``choose_strategy``), model against floor,
    summed over the shapes inspected; then a second table with the same per projection shape."""
    from .ops import choose_strategy

    ms = sorted({r.call.M for r in reports})
    head = ("| target | GPU | every kernel fits | max registers | spill bytes | "
            + " | ".join(f"M = {m}: step {MODEL} / floor (µs)" for m in ms) + " |")
    lines = [head, "|" + "---|" * (5 + len(ms))]
    for tname in dict.fromkeys(r.target for r in reports):
        t = get_target(tname)
        rs = [r for r in reports if r.target == tname]
        launches = [L for r in rs for L in r.launches]
        cells = []
        for m in ms:
            picked = [r for r in rs if r.call.M == m and r.call.mode == "train"
                      and r.call.strategy == choose_strategy(m, None, target=t)]
            if not picked:
                cells.append("–")
                continue
            model = sum(r.model_us for r in picked)
            floor = sum(r.floor_us for r in picked)
            eager = ""
            if all(r.host_us is not None for r in picked):
                eager = (f"; eager {sum(r.eager_us for r in picked):,.0f} (host "
                         f"{sum(r.host_us for r in picked):,.0f})")
            cells.append(f"{picked[0].call.strategy}: {model:,.0f} / {floor:,.0f} ({model / floor:.2f}×){eager}")
        lines.append(f"| {tname} | {t.gpu} | {'yes' if all(L.fits for L in launches) else 'NO'} | "
                     f"{max(L.facts.registers for L in launches)} | "
                     f"{sum(L.facts.stack + L.facts.local for L in launches)} | " + " | ".join(cells) + " |")
    lines += ["", _projection_markdown(reports, ms)]
    return "\n".join(lines)


def _projection_markdown(reports: Sequence[CallReport], ms: Sequence[int]) -> str:
    """Per target and projection shape (and call variant, where the reports hold more than one), per M:
    the training step (inference where no training call was inspected) of the strategy fastlora picks,
    model against floor and their ratio."""
    mode = "train" if any(r.call.mode == "train" for r in reports) else "infer"
    rs_all = [r for r in reports if r.call.mode == mode]
    variants = {_variant(r.call) for r in rs_all}
    lines = [f"| target | projection ({'training step' if mode == 'train' else 'inference'}) | "
             + " | ".join(f"M = {m}: {MODEL} / floor (µs)" for m in ms) + " |",
             "|" + "---|" * (2 + len(ms))]
    for tname in dict.fromkeys(r.target for r in rs_all):
        t = get_target(tname)
        for (shape, variant), per_m in _by_projection([r for r in rs_all if r.target == tname]).items():
            cells = []
            for m in ms:
                by_s = per_m.get(m, {})
                r = next((r for s, r in by_s.items() if s == _pick(r.call, t)), None)
                cells.append("–" if r is None else f"{r.call.strategy}: {_fmt_us(r.model_us)} / "
                             f"{_fmt_us(r.floor_us)} ({r.model_us / r.floor_us:.2f}×)")
            label = shape if len(variants) == 1 else f"{shape} ({variant})"
            lines.append(f"| {tname} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _parse_shapes(items: Optional[Sequence[str]]) -> Dict[str, tuple]:
    if not items:
        return dict(LLAMA3_8B_SHAPES)
    shapes = {}
    for s in items:
        try:
            n, k = (int(v) for v in s.lower().replace("x", ",").split(","))
        except ValueError:
            raise SystemExit(f"fastlora inspect: --shapes takes N,K pairs (out,in features), got {s!r}")
        if n <= 0 or k <= 0:
            raise SystemExit(f"fastlora inspect: shape {s!r} must be positive")
        shapes[f"{n}x{k}"] = (n, k)
    return shapes


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="fastlora inspect", description=(
        "Compile fastlora's kernels for GPU targets (no GPU needed) and report shared memory, registers, "
        "spills, tensor-core use, instructions per decoded weight and a static speed-of-light model."))
    ap.add_argument("--shapes", nargs="*", help="N,K pairs (out_features,in_features); default: Llama-3-8B projections")
    ap.add_argument("--m", default=",".join(map(str, DEFAULT_M)), help="token counts M, comma separated")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16")
    ap.add_argument("--quant", choices=("nf4", "fp4", "dense"), default="nf4")
    ap.add_argument("--no-double-quant", action="store_true", help="plain fp32 absmax instead of double quant")
    ap.add_argument("--adapters", choices=("autocast", "fp32"), default="autocast",
                    help="the adapter products' dtype: 'autocast' = --dtype (fp32 adapters under bf16/fp16 "
                         "autocast, e.g. Trainer bf16=True: PEFT runs them in the autocast dtype), 'fp32' = "
                         "fp32 adapters without autocast (PEFT runs them in fp32)")
    ap.add_argument("--strategy", choices=("fused", "dequant", "both"), default="both")
    ap.add_argument("--mode", choices=("train", "infer", "both"), default="both")
    ap.add_argument("--arch", default=",".join(DEFAULT_TARGETS),
                    help="targets, comma separated: archs (sm_75, sm_80, sm_86, sm_89, sm_90, sm_100, sm_120, "
                         "sm_121: each arch's reference board) or boards ('H100 PCIe', 'L40S', 'RTX PRO 6000', ...)")
    ap.add_argument("--summary", action="store_true", help="one line per call and target, no per-kernel rows")
    ap.add_argument("--markdown", action="store_true",
                    help="one markdown table: per target, fits / registers / spills and the training step of "
                         "fastlora's pick against its floor per M (summed over the shapes)")
    ap.add_argument("--json", metavar="PATH", help="also write the full report as JSON ('-' for stdout only)")
    ap.add_argument("--host", action="store_true",
                    help="also measure each call's host time on this CPU (Triton's launch path, launches "
                         "stubbed) and show the eager step as max(GPU model + launch gaps, host)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        payload = json.loads(sys.stdin.read())
        reports = run([Call(**c) for c in payload["calls"]], payload["targets"], payload.get("jobs"),
                      payload.get("host", False), parts=payload.get("parts", True))
        sys.stdout.write(json.dumps([report_to_dict(r) for r in reports]))
        return 0
    try:
        ms = [int(v) for v in args.m.split(",") if v.strip()]
        targets = [target_key(get_target(a)) for a in args.arch.split(",") if a.strip()]
    except ValueError as e:
        raise SystemExit(f"fastlora inspect: {e}")
    if any(m <= 0 for m in ms):
        raise SystemExit("fastlora inspect: --m values must be positive")
    calls = calls_for(_parse_shapes(args.shapes), ms, rank=args.rank, dropout=args.dropout, dtype=args.dtype,
                      quant=args.quant, nested=not args.no_double_quant, adapters=args.adapters,
                      strategies=("fused", "dequant") if args.strategy == "both" else (args.strategy,),
                      modes=("train", "infer") if args.mode == "both" else (args.mode,))
    skipped = [t for t in targets if args.dtype == "bf16" and not get_target(t).has_bf16]
    reports = run(calls, targets, host=args.host)
    if args.markdown:
        print(format_markdown(reports))
        print(f"\nThe µs figures are a static speed-of-light {MODEL} (fastlora/inspection.py), not measurements.")
    elif args.json != "-":
        print(format_reports(reports, detail=not args.summary))
        for t in skipped:
            print(f"{t}: no bf16 support (compute capability < 8.0): fastlora falls back to PEFT there; "
                  f"inspect with --dtype fp16")
    if args.json:
        text = json.dumps({"targets": {t: get_target(t).as_dict() for t in targets},
                           "reports": [report_to_dict(r) for r in reports]}, indent=1)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as fh:
                fh.write(text)
    return 0 if all(r.ok for r in reports) else 1


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    sys.exit(main())
