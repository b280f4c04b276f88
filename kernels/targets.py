"""The GPUs fastlora's kernels are built for: one table of per-target figures, and the target of a device.

Everything that reasons about a GPU without running on it (the launch-configuration tables in
``configs.py``, the compile checks and the speed-of-light model of ``fastlora inspect``) reads its
figures from :data:`TARGETS`, and nowhere else. A real launch asks :func:`device_target`, which takes
the compute capability, the SM count and the opt-in shared memory per block from the device itself
and the remaining per-chip figures (clock, bandwidth, peaks) from the table entry of the same
compute capability.

Sources of the figures (boost clocks, SM counts and peaks are NVIDIA's datasheet / whitepaper values
for the named board; "measured" ones were measured on that board on the GPU machine this project
uses):

    sm_75  Tesla T4             Turing whitepaper, T4 datasheet (65 TFLOP/s fp16 tensor, 320 GB/s)
    sm_80  A100 SXM4 80GB       A100 whitepaper (312 TFLOP/s bf16 dense, 2,039 GB/s)
    sm_86  GeForce RTX 3090     GA102 whitepaper (71 TFLOP/s fp16/bf16 with fp32 accumulate, 936 GB/s)
    sm_89  GeForce RTX 4090     Ada whitepaper (165 TFLOP/s fp16/bf16 with fp32 accumulate, 1,008 GB/s)
    sm_90  H100 SXM5 80GB       798 TFLOP/s bf16 dense and 3.0 TB/s, measured (datasheet 989 / 3.35)

Shared memory per block is the opt-in maximum (cudaDevAttrMaxSharedMemoryPerBlockOptin), per SM the
whole carve-out; registers per SM are 64 K 32-bit everywhere; warps / blocks per SM are the CUDA
occupancy limits of each compute capability (CUDA C Programming Guide, "Compute Capabilities").
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, Optional

import torch


@dataclass(frozen=True)
class Target:
    """One GPU as the models see it. Rates are per second, at the boost clock."""

    name: str                 # "sm_89"
    gpu: str                  # the board the figures are for
    cc: int                   # compute capability as an int: 89
    sms: int
    clock_ghz: float
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
    figures_from: Optional[str] = None  # set when a device borrows another entry's per-chip figures

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


TARGETS: Dict[str, Target] = {
    t.name: t
    for t in (
        Target("sm_75", "Tesla T4", 75, 40, 1.59, 320.0, 65.0, None, 8.1, 65536, 65536, 32, 16),
        Target("sm_80", "A100 SXM4 80GB", 80, 108, 1.41, 2039.0, 312.0, 312.0, 19.5, 166912, 167936, 64, 32),
        Target("sm_86", "GeForce RTX 3090", 86, 82, 1.70, 936.0, 71.0, 71.0, 35.6, 101376, 102400, 48, 16),
        Target("sm_89", "GeForce RTX 4090", 89, 128, 2.52, 1008.0, 165.0, 165.0, 82.6, 101376, 102400, 48, 24),
        Target("sm_90", "H100 SXM5 80GB", 90, 132, 1.98, 3000.0, 798.0, 798.0, 66.9, 232448, 233472, 64, 32),
        Target("sm_100", "B200", 100, 148, 1.965, 8000.0, 2250.0, 2250.0, 80.0, 232448, 233472, 64, 32),
        Target("sm_120", "GeForce RTX 5090", 120, 170, 2.407, 1792.0, 209.5, 209.5, 104.8, 101376, 102400, 48, 32),
        Target("sm_121", "GB10", 121, 48, 2.5, 273.0, 62.5, 62.5, 31.0, 101376, 102400, 48, 32),
    )
}

DEFAULT_TARGETS = tuple(TARGETS)


def get_target(name) -> Target:
    """A :class:`Target` from its name ("sm_89", "89", 89) or a Target itself."""
    if isinstance(name, Target):
        return name
    key = str(name).strip().lower()
    if not key.startswith("sm_"):
        key = "sm_" + key.replace("sm", "").lstrip("_")
    if key not in TARGETS:
        raise ValueError(f"unknown GPU target {name!r}: fastlora knows {', '.join(TARGETS)}")
    return TARGETS[key]


def _nearest_entry(cc: int) -> Target:
    """The table entry whose figures stand in for a compute capability the table lacks: the newest
    one not newer than it (sm_87 -> sm_86, sm_100 -> sm_90), or the oldest."""
    known = sorted(TARGETS.values(), key=lambda t: t.cc)
    below = [t for t in known if t.cc <= cc]
    return below[-1] if below else known[0]


def device_target(device) -> Target:
    """The :class:`Target` of a CUDA device: its own compute capability, SM count and opt-in shared
    memory per block; clock, bandwidth and peaks from the table entry of the same (or the nearest
    older) compute capability, named in ``figures_from`` when it is not the device's own."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"device_target needs a CUDA device, got {device}")
    props = torch.cuda.get_device_properties(device)
    cc = props.major * 10 + props.minor
    entry = _nearest_entry(cc)
    smem = int(getattr(props, "shared_memory_per_block_optin", 0) or entry.smem_per_block)
    smem_sm = int(getattr(props, "shared_memory_per_multiprocessor", 0) or entry.smem_per_sm)
    return replace(
        entry,
        name=f"sm_{cc}",
        gpu=props.name,
        cc=cc,
        sms=props.multi_processor_count,
        smem_per_block=smem,
        smem_per_sm=smem_sm,
        tensor_tflops_bf16=entry.tensor_tflops_bf16 if cc >= 80 else None,
        figures_from=None if entry.cc == cc else entry.name,
    )
