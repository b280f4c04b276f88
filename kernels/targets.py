"""The GPUs fastlora's kernels are built for: one table of per-board figures, and the target of a device.

Everything that reasons about a GPU without running on it (the launch-configuration tables in
``configs.py``, the compile checks and the speed-of-light model of ``fastlora inspect``) reads its
figures from this module, and nowhere else. :data:`BOARDS` holds the boards, by name; :data:`TARGETS`
holds one representative board per compute capability, by arch name ("sm_90"). A real launch asks
:func:`device_target`, which takes the compute capability, the SM count and the opt-in shared memory
per block from the device itself and the remaining figures (clock, bandwidth, peaks) from the board
its name matches, or, for a board the table lacks, from the representative of the nearest compute
capability not newer than the device's (and says so in ``figures_from`` / ``figures_note``).

What the figures are:

* ``tensor_tflops_*``: dense (no sparsity), fp16/bf16 operands with fp32 accumulate, which is what the
  kernels use. GeForce boards run that at half their fp16-accumulate rate; the data-center and
  professional boards (A10, A40, RTX A6000, L4, L40S, ...) at the full rate.
* ``fp32_tflops``: the non-tensor FFMA peak (2 FLOPs per FMA).
* ``clock_ghz``: the clock the tensor peak is quoted at: the boost clock for most boards. The Hopper
  and B200 tensor peaks work out to a lower clock than their fp32 peaks (H100 SXM5: 1.83 GHz and
  1.98 GHz); ``fp32_clock_ghz`` then holds the fp32 one. Where NVIDIA publishes no clock it is the
  one the tensor peak implies at the architecture's per-SM rate.
* No derating: the peaks are NVIDIA's, not measured; a floor computed from them is a lower bound.

One source is named per board (``source``): NVIDIA's datasheets (T4, A100, A10, A40, L4, L40S, H100,
H200, RTX PRO 6000 Blackwell), architecture whitepapers (GA102: RTX 3090, RTX A6000; Ada Lovelace:
RTX 4090; RTX Blackwell: RTX 5090), the HGX B200 specifications, and for GB10 the DGX Spark
specifications and NVIDIA's Hot Chips 2025 talk. The H20 has no public datasheet. Where a figure is
derived rather than quoted, or could not be checked, the comment on its row says so (the tensor peaks
of RTX PRO 6000 Blackwell and GB10 are derived).

Shared memory per block is the opt-in maximum, per SM the whole carve-out, and warps / blocks per SM
the occupancy limits, all per compute capability (CUDA C++ Programming Guide, "Compute Capabilities",
technical specifications table); registers are 64 K 32-bit per SM and there are 4 warp schedulers
per SM everywhere here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Dict, Optional

import torch


@dataclass(frozen=True)
class Target:
    """One GPU as the models see it. Rates are per second."""

    name: str                 # the arch: "sm_89" (launch configuration and compilation key on it)
    gpu: str                  # the board the figures are for (a device's own name in device_target)
    cc: int                   # compute capability as an int: 89
    sms: int
    clock_ghz: float          # the clock the tensor peaks are quoted at
    dram_gbs: float           # GB/s
    tensor_tflops_fp16: float  # dense, fp32 accumulate
    tensor_tflops_bf16: Optional[float]  # None: no bf16 tensor cores (sm_75)
    fp32_tflops: float        # FFMA peak (2 FLOPs per FMA)
    smem_per_block: int       # bytes, opt-in maximum for one block
    smem_per_sm: int          # bytes
    max_warps_per_sm: int
    max_blocks_per_sm: int
    regs_per_sm: int = 65536
    schedulers_per_sm: int = 4
    figures_from: Optional[str] = None  # the board whose figures a device borrows (None: its own)
    figures_note: Optional[str] = None  # why, when figures_from is set (or the peaks were rescaled)
    source: str = ""          # the document the board's figures come from
    fp32_clock_ghz: Optional[float] = None  # the fp32 peak's clock, where not clock_ghz

    @property
    def has_bf16(self) -> bool:
        return self.tensor_tflops_bf16 is not None

    def tensor_tflops(self, dtype: torch.dtype) -> Optional[float]:
        """The tensor-core peak for operands of ``dtype`` (None where the device has none)."""
        if dtype == torch.float16:
            return self.tensor_tflops_fp16
        if dtype == torch.bfloat16:
            return self.tensor_tflops_bf16
        return None

    def warp_issue_rate(self) -> float:
        """Warp-instructions the whole GPU can issue per second (one per scheduler per clock)."""
        return self.sms * self.schedulers_per_sm * self.clock_ghz * 1e9

    def as_dict(self) -> dict:
        return dict(self.__dict__)


# per compute capability: (opt-in shared memory per block, shared memory per SM, warps, blocks per SM)
_LIMITS = {
    75: (65536, 65536, 32, 16),
    80: (166912, 167936, 64, 32),    # 163 KB / 164 KB
    86: (101376, 102400, 48, 16),    # 99 KB / 100 KB
    89: (101376, 102400, 48, 24),
    90: (232448, 233472, 64, 32),    # 227 KB / 228 KB
    100: (232448, 233472, 64, 32),
    120: (101376, 102400, 48, 32),
    121: (101376, 102400, 48, 32),
}


def _board(gpu, cc, sms, clock_ghz, dram_gbs, tensor, fp32, source, fp32_clock_ghz=None) -> Target:
    smem, smem_sm, warps, blocks = _LIMITS[cc]
    return Target(f"sm_{cc}", gpu, cc, sms, clock_ghz, float(dram_gbs), tensor, tensor if cc >= 80 else None,
                  fp32, smem, smem_sm, warps, blocks, source=source, fp32_clock_ghz=fp32_clock_ghz)


_AMPERE_WP = "NVIDIA Ampere GA102 GPU architecture whitepaper, board specifications"
_ADA_WP = "NVIDIA Ada Lovelace GPU architecture whitepaper, board specifications"
_H100_DS = "NVIDIA H100 Tensor Core GPU datasheet"
_H200_DS = "NVIDIA H200 Tensor Core GPU datasheet"
_A100_DS = "NVIDIA A100 Tensor Core GPU datasheet (SMs and boost clock: A100 whitepaper)"
_PRO6000_DS = "NVIDIA RTX PRO 6000 Blackwell Workstation Edition datasheet"

# name, cc, SMs, clock GHz, DRAM GB/s, tensor TFLOP/s (fp16/bf16, fp32 accumulate, dense), fp32
# TFLOP/s, source[, fp32 clock GHz]. Peaks of the sparse-quoting datasheets are halved.
BOARDS: Dict[str, Target] = {t.gpu: t for t in (
    _board("Tesla T4", 75, 40, 1.59, 320, 65.0, 8.1, "NVIDIA T4 Tensor Core GPU datasheet"),
    _board("A100 SXM4 40GB", 80, 108, 1.41, 1555, 312.0, 19.5, _A100_DS),
    _board("A100 SXM4 80GB", 80, 108, 1.41, 2039, 312.0, 19.5, _A100_DS),
    _board("A100 PCIe 40GB", 80, 108, 1.41, 1555, 312.0, 19.5, _A100_DS),
    _board("A100 PCIe 80GB", 80, 108, 1.41, 1935, 312.0, 19.5, _A100_DS),
    # A10 / A40: the datasheets give no clock; the one their peaks imply (NVIDIA's boost clocks)
    _board("A10", 86, 72, 1.695, 600, 125.0, 31.2, "NVIDIA A10 Tensor Core GPU datasheet"),
    _board("A40", 86, 84, 1.74, 696, 149.7, 37.4, "NVIDIA A40 datasheet"),
    _board("RTX A6000", 86, 84, 1.80, 768, 154.8, 38.7, _AMPERE_WP + " (RTX A6000)"),
    _board("GeForce RTX 3090", 86, 82, 1.695, 936, 71.0, 35.6, _AMPERE_WP + " (RTX 3090)"),
    _board("L4", 89, 58, 2.04, 300, 121.0, 30.3, "NVIDIA L4 Tensor Core GPU datasheet"),
    # L40S: the datasheet's bf16 362 TFLOP/s works out to 142 SMs at 2.49 GHz, its fp32 91.6 and
    # FP8 733 to the 2.52 GHz boost (where bf16 would be 366); the quoted figure is kept.
    _board("L40S", 89, 142, 2.52, 864, 362.0, 91.6, "NVIDIA L40S datasheet"),
    _board("GeForce RTX 4090", 89, 128, 2.52, 1008, 165.2, 82.6, _ADA_WP + " (RTX 4090)"),
    # Hopper: the datasheets give no clocks; those their peaks imply are 1.83 GHz (SXM) / 1.62 (PCIe)
    # / 1.545 (NVL) for the tensor peaks and 1.98 / 1.755 (the PCIe brief's boost) / 1.776 for fp32
    _board("H100 SXM5 80GB", 90, 132, 1.83, 3350, 989.4, 66.9, _H100_DS + " (SMs: H100 whitepaper)", 1.98),
    _board("H100 PCIe", 90, 114, 1.62, 2000, 756.5, 51.2, _H100_DS + " (SMs, boost: H100 PCIe product brief)",
           1.755),
    _board("H100 NVL", 90, 132, 1.545, 3900, 835.5, 60.0, _H100_DS, 1.776),
    _board("H200", 90, 132, 1.83, 4800, 989.4, 66.9, _H200_DS + " (H200 SXM)", 1.98),
    _board("H200 NVL", 90, 132, 1.545, 4800, 835.5, 60.0, _H200_DS, 1.776),
    # H20: no public datasheet; 148 / 44 TFLOP/s and 4.0 TB/s are NVIDIA's figures as the press
    # reproduced them, 78 SMs what the device reports. Its tensor rate is capped far below 78 SMs'
    # worth of Hopper tensor cores, and its fp32 figure exceeds 78 SMs at any Hopper clock; the clock
    # (GH100's 1.98 GHz boost) is an assumption.
    _board("H20", 90, 78, 1.98, 4000, 148.0, 44.0, "NVIDIA H20 specifications (no public datasheet)"),
    # B200 in HGX B200 (1,000 W): per GPU 4.5 PFLOP/s sparse fp16/bf16, 75 TFLOP/s fp32, 7.7 TB/s
    # (earlier DGX B200 material: 8 TB/s). NVIDIA publishes no clock; 148 SMs is what the device
    # reports. The tensor peak implies 1.856 GHz at 8192 FLOP/clock/SM, the fp32 peak 1.98 GHz.
    _board("B200", 100, 148, 1.856, 7700, 2250.0, 75.0, "NVIDIA HGX B200 specifications (Blackwell datasheet)",
           1.98),
    _board("GeForce RTX 5090", 120, 170, 2.407, 1792, 209.5, 104.8,
           "NVIDIA RTX Blackwell GPU architecture whitepaper, board specifications (RTX 5090)"),
    # RTX PRO 6000: the datasheet quotes 125 TFLOP/s fp32 (188 SMs at 2.6 GHz), 4,000 AI TOPS (FP4,
    # sparse) and 1,792 GB/s, but no fp16/bf16 tensor figure: 500.5 is derived, 188 SMs x 2.6 GHz x
    # 1024 FLOP/clock/SM (the full fp32-accumulate rate of the professional boards). The Server
    # Edition has the same GB202 configuration; its own datasheet was not checked here, and a
    # passively cooled card may hold a lower clock.
    _board("RTX PRO 6000 Blackwell Workstation Edition", 120, 188, 2.6, 1792, 500.5, 125.0, _PRO6000_DS),
    _board("RTX PRO 6000 Blackwell Server Edition", 120, 188, 2.6, 1792, 500.5, 125.0,
           _PRO6000_DS + " (figures of the workstation card)"),
    # GB10 (DGX Spark): 6,144 CUDA cores (48 SMs), 31 TFLOP/s fp32 (2.52 GHz), 1 PFLOP/s FP4 sparse,
    # 273 GB/s. NVIDIA publishes no fp16/bf16 tensor figure: 123.9 is derived at 1024 FLOP/clock/SM
    # (the full fp32-accumulate rate: a half-rate part could not run the FP8 GEMMs with fp32
    # accumulate that were reported on NVIDIA's developer forum at 188 TFLOP/s).
    _board("GB10", 121, 48, 2.52, 273, 123.9, 31.0,
           "NVIDIA DGX Spark specifications and NVIDIA's GB10 talk at Hot Chips 2025"),
)}

# the board whose figures stand for each compute capability
TARGETS: Dict[str, Target] = {BOARDS[b].name: BOARDS[b] for b in (
    "Tesla T4", "A100 SXM4 80GB", "GeForce RTX 3090", "GeForce RTX 4090", "H100 SXM5 80GB", "B200",
    "GeForce RTX 5090", "GB10")}

DEFAULT_TARGETS = tuple(TARGETS)


def _norm(name: str) -> str:
    """A board or device name in the form the table is looked up by: lower case, no vendor or brand
    words, single spaces ("NVIDIA A100-SXM4-80GB" -> "a100 sxm4 80gb"), no MIG profile suffix."""
    s = re.sub(r"[\s_-]+", " ", str(name).lower())
    s = re.sub(r"\b(nvidia|geforce|tesla)\b", " ", s)
    s = re.sub(r"\bmig\b.*$", " ", s)
    return " ".join(s.split())


# other spellings of the boards: device names as CUDA reports them, short forms
_SPELLINGS = {
    "A100 SXM4 40GB": ("A100 40GB", "A100 SXM 40GB"),
    "A100 SXM4 80GB": ("A100", "A100 80GB", "A100 SXM 80GB", "A100 SXM4"),
    "A100 PCIe 80GB": ("A100 80GB PCIe",),
    "RTX A6000": ("A6000",),
    "H100 SXM5 80GB": ("H100", "H100 80GB HBM3", "H100 SXM", "H100 SXM5"),
    "H100 PCIe": ("H100 80GB PCIe",),
    "H200": ("H200 SXM", "H200 SXM 141GB"),
    "RTX PRO 6000 Blackwell Workstation Edition": ("RTX PRO 6000", "RTX PRO 6000 Blackwell"),
    "RTX PRO 6000 Blackwell Server Edition": ("RTX PRO 6000 Server",),
    "GB10": ("DGX Spark",),
}
_BY_NAME: Dict[str, str] = {_norm(b): b for b in BOARDS}
_BY_NAME.update({_norm(s): b for b, spellings in _SPELLINGS.items() for s in spellings})


def board_of(name: str) -> Optional[str]:
    """The BOARDS key a board or device name means ("NVIDIA H100 PCIe" -> "H100 PCIe"), or None."""
    return _BY_NAME.get(_norm(name))


def get_target(name) -> Target:
    """A :class:`Target` from an arch ("sm_89", "89", 89), a board name ("H100 PCIe", "nvidia h100
    pcie", "RTX 4090", "A100 40GB": that board's figures, named by its arch) or a Target itself."""
    if isinstance(name, Target):
        return name
    key = str(name).strip().lower()
    if not key.startswith("sm_"):
        key = "sm_" + key.replace("sm", "").lstrip("_")
    if key in TARGETS:
        return TARGETS[key]
    board = board_of(name)
    if board is None:
        raise ValueError(f"unknown GPU target {name!r}: fastlora knows the archs {', '.join(TARGETS)} "
                         f"and the boards {', '.join(BOARDS)}")
    return BOARDS[board]


def _nearest_entry(cc: int) -> Target:
    """The table entry whose figures stand in for a compute capability the table lacks: the newest
    one not newer than it (sm_87 -> sm_86, sm_103 -> sm_100), or the oldest."""
    known = sorted(TARGETS.values(), key=lambda t: t.cc)
    below = [t for t in known if t.cc <= cc]
    return below[-1] if below else known[0]


def device_target(device) -> Target:
    """The :class:`Target` of a CUDA device: its own compute capability, SM count and opt-in shared
    memory per block; clock, bandwidth and peaks from the board its name matches. A board the table
    lacks (or one whose compute capability is not the device's) takes the figures of the nearest
    older compute capability's board, named in ``figures_from``, with the reason in ``figures_note``.
    Where the device has another SM count than the board (a MIG slice, a cut-down variant) the
    compute peaks are scaled to its SMs; the bandwidth stays the board's."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"device_target needs a CUDA device, got {device}")
    props = torch.cuda.get_device_properties(device)
    cc = props.major * 10 + props.minor
    sms = int(props.multi_processor_count)
    board = board_of(props.name)
    entry = BOARDS[board] if board is not None else None
    borrowed = entry is None or entry.cc != cc
    note = None
    if borrowed:
        why = (f"device name {props.name!r} is not in fastlora's table" if entry is None else
               f"device name {props.name!r} names {entry.gpu} ({entry.name}) but the device is sm_{cc}")
        entry = _nearest_entry(cc)
        note = f"figures of {entry.gpu} ({entry.name}): {why}"
    tensor, fp32 = entry.tensor_tflops_fp16, entry.fp32_tflops
    if sms != entry.sms:
        tensor, fp32 = tensor * sms / entry.sms, fp32 * sms / entry.sms
        note = (note or f"figures of {entry.gpu}") + (
            f"; peaks scaled from its {entry.sms} SMs to the device's {sms}, bandwidth not")
    return replace(
        entry,
        name=f"sm_{cc}",
        gpu=props.name,
        cc=cc,
        sms=sms,
        tensor_tflops_fp16=tensor,
        tensor_tflops_bf16=tensor if cc >= 80 else None,
        fp32_tflops=fp32,
        smem_per_block=int(getattr(props, "shared_memory_per_block_optin", 0) or entry.smem_per_block),
        smem_per_sm=int(getattr(props, "shared_memory_per_multiprocessor", 0) or entry.smem_per_sm),
        figures_from=entry.gpu if borrowed else None,
        figures_note=note,
    )
