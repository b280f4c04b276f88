"""The per-board GPU figures (kernels/targets.py): sources, consistency, names, and a device's target."""

from __future__ import annotations

import pytest
import torch

from fastlora.kernels import targets as T
from fastlora.kernels.targets import BOARDS, DEFAULT_TARGETS, TARGETS, Target, device_target, get_target

# dense fp16/bf16 tensor FLOPs per clock per SM with fp32 accumulate, by architecture; GeForce boards
# of sm_86/89/120 run fp32 accumulate at half the rate of the data-center and professional ones
TENSOR_PER_SM = {75: 1024, 80: 2048, 86: 1024, 89: 1024, 90: 4096, 100: 8192, 120: 1024, 121: 1024}
FP32_PER_SM = {75: 128, 80: 128, 86: 256, 89: 256, 90: 256, 100: 256, 120: 256, 121: 256}
# boards whose tensor peak is not SMs x clock x rate: the H20's is capped by the product, and its
# published fp32 peak does not fit its 78 SMs either (see the comment on its row)
OFF_RULE = {"H20"}


def _rate(board: str, cc: int) -> int:
    return TENSOR_PER_SM[cc] // (2 if "GeForce" in board else 1)


@pytest.mark.parametrize("board", list(BOARDS))
def test_every_board_has_a_source_and_its_capabilitys_limits(board):
    t = BOARDS[board]
    assert t.gpu == board and len(t.source) > 10
    assert t.name == f"sm_{t.cc}"
    assert (t.smem_per_block, t.smem_per_sm, t.max_warps_per_sm, t.max_blocks_per_sm) == T._LIMITS[t.cc]
    assert (t.tensor_tflops_bf16 is None) == (t.cc < 80)
    assert t.tensor_tflops_fp16 > t.fp32_tflops > 0 and t.dram_gbs > 0
    assert t.figures_from is None and t.figures_note is None


@pytest.mark.parametrize("board", sorted(set(BOARDS) - OFF_RULE))
def test_peaks_are_sms_times_clock_times_the_per_sm_rate(board):
    """The tensor peak at clock_ghz, the fp32 peak at fp32_clock_ghz (or clock_ghz), within 2 % (the
    L40S datasheet's bf16 figure is 1.2 % under its own clock)."""
    t = BOARDS[board]
    tensor = t.sms * t.clock_ghz * _rate(board, t.cc) / 1e3
    fp32 = t.sms * (t.fp32_clock_ghz or t.clock_ghz) * FP32_PER_SM[t.cc] / 1e3
    assert t.tensor_tflops_fp16 == pytest.approx(tensor, rel=0.02)
    assert t.fp32_tflops == pytest.approx(fp32, rel=0.02)


def test_the_off_rule_boards_are_off_it():
    """If the H20's figures ever fit the rule, it belongs in the test above."""
    t = BOARDS["H20"]
    assert t.tensor_tflops_fp16 < 0.5 * t.sms * t.clock_ghz * TENSOR_PER_SM[90] / 1e3


# (board, SMs, GB/s, tensor TFLOP/s dense fp16/bf16 with fp32 accumulate, fp32 TFLOP/s), from the
# datasheets and whitepapers named in the table
PINNED = [
    ("Tesla T4", 40, 320, 65.0, 8.1),
    ("A100 SXM4 40GB", 108, 1555, 312.0, 19.5),
    ("A100 SXM4 80GB", 108, 2039, 312.0, 19.5),
    ("A100 PCIe 80GB", 108, 1935, 312.0, 19.5),
    ("A10", 72, 600, 125.0, 31.2),
    ("A40", 84, 696, 149.7, 37.4),
    ("RTX A6000", 84, 768, 154.8, 38.7),
    ("GeForce RTX 3090", 82, 936, 71.0, 35.6),
    ("L4", 58, 300, 121.0, 30.3),
    ("L40S", 142, 864, 362.0, 91.6),
    ("GeForce RTX 4090", 128, 1008, 165.2, 82.6),
    ("H100 SXM5 80GB", 132, 3350, 989.4, 66.9),
    ("H100 PCIe", 114, 2000, 756.5, 51.2),
    ("H100 NVL", 132, 3900, 835.5, 60.0),
    ("H200", 132, 4800, 989.4, 66.9),
    ("H20", 78, 4000, 148.0, 44.0),
    ("B200", 148, 7700, 2250.0, 75.0),
    ("GeForce RTX 5090", 170, 1792, 209.5, 104.8),
    ("RTX PRO 6000 Blackwell Workstation Edition", 188, 1792, 500.5, 125.0),
    ("GB10", 48, 273, 123.9, 31.0),
]


@pytest.mark.parametrize("board,sms,gbs,tensor,fp32", PINNED)
def test_pinned_datasheet_figures(board, sms, gbs, tensor, fp32):
    t = BOARDS[board]
    assert (t.sms, t.dram_gbs, t.tensor_tflops_fp16, t.fp32_tflops) == (sms, gbs, tensor, fp32)


def test_professional_boards_run_fp32_accumulate_at_twice_the_geforce_rate():
    per_sm_clock = {b: t.tensor_tflops_fp16 / (t.sms * t.clock_ghz) for b, t in BOARDS.items()}
    assert per_sm_clock["RTX A6000"] == pytest.approx(2 * per_sm_clock["GeForce RTX 3090"], rel=0.01)
    assert per_sm_clock["A10"] == pytest.approx(2 * per_sm_clock["GeForce RTX 3090"], rel=0.01)
    assert per_sm_clock["L4"] == pytest.approx(2 * per_sm_clock["GeForce RTX 4090"], rel=0.01)
    assert per_sm_clock["RTX PRO 6000 Blackwell Workstation Edition"] == pytest.approx(
        2 * per_sm_clock["GeForce RTX 5090"], rel=0.01)


def test_targets_are_one_board_per_arch():
    assert DEFAULT_TARGETS == ("sm_75", "sm_80", "sm_86", "sm_89", "sm_90", "sm_100", "sm_120", "sm_121")
    assert {a: t.gpu for a, t in TARGETS.items()} == {
        "sm_75": "Tesla T4", "sm_80": "A100 SXM4 80GB", "sm_86": "GeForce RTX 3090",
        "sm_89": "GeForce RTX 4090", "sm_90": "H100 SXM5 80GB", "sm_100": "B200",
        "sm_120": "GeForce RTX 5090", "sm_121": "GB10"}
    for arch, t in TARGETS.items():
        assert t is BOARDS[t.gpu] and t.name == arch and t.cc == int(arch[3:])
    assert TARGETS["sm_100"].smem_per_block == 232448
    assert TARGETS["sm_120"].smem_per_block == TARGETS["sm_121"].smem_per_block == 101376
    assert not TARGETS["sm_75"].has_bf16 and TARGETS["sm_80"].has_bf16


def test_h100_uses_the_datasheet_peaks_at_a_consistent_clock():
    t = TARGETS["sm_90"]
    assert (t.tensor_tflops_bf16, t.dram_gbs, t.clock_ghz, t.fp32_clock_ghz) == (989.4, 3350, 1.83, 1.98)
    assert t.warp_issue_rate() == pytest.approx(132 * 4 * 1.83e9)
    assert t.tensor_tflops(torch.bfloat16) == 989.4 and t.tensor_tflops(torch.float32) is None
    d = t.as_dict()
    assert d["name"] == "sm_90" and d["source"] == t.source and "figures_note" in d


def test_normalised_names_are_unique():
    assert len({T._norm(b) for b in BOARDS}) == len(BOARDS)


@pytest.mark.parametrize("name,arch", [("sm_89", "sm_89"), ("89", "sm_89"), (89, "sm_89"), ("SM_90", "sm_90"),
                                       ("sm90", "sm_90"), (100, "sm_100"), ("121", "sm_121")])
def test_get_target_by_arch(name, arch):
    assert get_target(name) is TARGETS[arch]


@pytest.mark.parametrize("name,board", [
    ("H100 PCIe", "H100 PCIe"), ("nvidia h100 pcie", "H100 PCIe"), ("NVIDIA  H100-PCIe", "H100 PCIe"),
    ("RTX 4090", "GeForce RTX 4090"), ("geforce rtx 4090", "GeForce RTX 4090"), ("A100 40GB", "A100 SXM4 40GB"),
    ("A100", "A100 SXM4 80GB"), ("H100", "H100 SXM5 80GB"), ("h200 nvl", "H200 NVL"), ("H20", "H20"),
    ("a10", "A10"), ("L40S", "L40S"), ("T4", "Tesla T4"), ("DGX Spark", "GB10"),
    ("RTX PRO 6000", "RTX PRO 6000 Blackwell Workstation Edition"),
])
def test_get_target_by_board(name, board):
    t = get_target(name)
    assert t is BOARDS[board] and t.name == f"sm_{t.cc}"


def test_get_target_passes_a_target_and_rejects_unknown_names():
    t = BOARDS["A40"]
    assert get_target(t) is t
    for bad in ("sm_87", "RTX 4080", "A100 20GB", ""):
        with pytest.raises(ValueError, match="unknown GPU target.*sm_75.*H100 PCIe"):
            get_target(bad)


class _Props:
    def __init__(self, name, major, minor, sms, smem=None):
        self.name, self.major, self.minor, self.multi_processor_count = name, major, minor, sms
        self.shared_memory_per_block_optin = smem if smem is not None else T._LIMITS[major * 10 + minor][0]
        self.shared_memory_per_multiprocessor = self.shared_memory_per_block_optin + 1024


def _device(monkeypatch, *props) -> Target:
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: _Props(*props))
    return device_target("cuda:0")


# torch.cuda.get_device_properties(d).name of each board, its capability and SM count
DEVICES = [
    ("NVIDIA H100 80GB HBM3", 9, 0, 132, "H100 SXM5 80GB"),
    ("NVIDIA H100 PCIe", 9, 0, 114, "H100 PCIe"),
    ("NVIDIA H100 NVL", 9, 0, 132, "H100 NVL"),
    ("NVIDIA H200", 9, 0, 132, "H200"),
    ("NVIDIA H200 NVL", 9, 0, 132, "H200 NVL"),
    ("NVIDIA H20", 9, 0, 78, "H20"),
    ("NVIDIA A100-SXM4-80GB", 8, 0, 108, "A100 SXM4 80GB"),
    ("NVIDIA A100-SXM4-40GB", 8, 0, 108, "A100 SXM4 40GB"),
    ("NVIDIA A100-PCIE-40GB", 8, 0, 108, "A100 PCIe 40GB"),
    ("NVIDIA A100 80GB PCIe", 8, 0, 108, "A100 PCIe 80GB"),
    ("NVIDIA A10", 8, 6, 72, "A10"),
    ("NVIDIA A40", 8, 6, 84, "A40"),
    ("NVIDIA RTX A6000", 8, 6, 84, "RTX A6000"),
    ("NVIDIA L4", 8, 9, 58, "L4"),
    ("NVIDIA L40S", 8, 9, 142, "L40S"),
    ("NVIDIA GeForce RTX 3090", 8, 6, 82, "GeForce RTX 3090"),
    ("NVIDIA GeForce RTX 4090", 8, 9, 128, "GeForce RTX 4090"),
    ("NVIDIA GeForce RTX 5090", 12, 0, 170, "GeForce RTX 5090"),
    ("NVIDIA RTX PRO 6000 Blackwell Workstation Edition", 12, 0, 188, "RTX PRO 6000 Blackwell Workstation Edition"),
    ("NVIDIA RTX PRO 6000 Blackwell Server Edition", 12, 0, 188, "RTX PRO 6000 Blackwell Server Edition"),
    ("NVIDIA B200", 10, 0, 148, "B200"),
    ("NVIDIA GB10", 12, 1, 48, "GB10"),
    ("Tesla T4", 7, 5, 40, "Tesla T4"),
]


@pytest.mark.parametrize("name,major,minor,sms,board", DEVICES)
def test_device_name_selects_its_board(monkeypatch, name, major, minor, sms, board):
    t = _device(monkeypatch, name, major, minor, sms)
    b = BOARDS[board]
    assert (t.name, t.cc, t.gpu, t.sms) == (b.name, b.cc, name, sms)
    assert (t.clock_ghz, t.dram_gbs, t.tensor_tflops_fp16, t.tensor_tflops_bf16, t.fp32_tflops) == (
        b.clock_ghz, b.dram_gbs, b.tensor_tflops_fp16, b.tensor_tflops_bf16, b.fp32_tflops)
    assert t.source == b.source
    assert t.figures_from is None and t.figures_note is None


def test_boards_sharing_an_arch_get_their_own_figures(monkeypatch):
    """The boards that used to borrow their arch representative's figures."""
    assert _device(monkeypatch, "NVIDIA H100 PCIe", 9, 0, 114).dram_gbs == 2000
    assert _device(monkeypatch, "NVIDIA H200", 9, 0, 132).dram_gbs == 4800
    assert _device(monkeypatch, "NVIDIA A40", 8, 6, 84).tensor_tflops(torch.bfloat16) == 149.7
    assert _device(monkeypatch, "NVIDIA L40S", 8, 9, 142).tensor_tflops(torch.float16) == 362.0


def test_device_keeps_its_own_capability_sms_and_shared_memory(monkeypatch):
    t = _device(monkeypatch, "NVIDIA GeForce RTX 4090", 8, 9, 128, 99000)
    assert (t.smem_per_block, t.smem_per_sm) == (99000, 100024)


def test_unknown_board_falls_back_by_capability_and_says_so(monkeypatch):
    t = _device(monkeypatch, "NVIDIA GeForce RTX 4080", 8, 9, 76)
    assert (t.name, t.sms, t.gpu, t.figures_from) == ("sm_89", 76, "NVIDIA GeForce RTX 4080", "GeForce RTX 4090")
    assert "figures of GeForce RTX 4090 (sm_89)" in t.figures_note
    assert "'NVIDIA GeForce RTX 4080' is not in fastlora's table" in t.figures_note
    assert "scaled from its 128 SMs to the device's 76" in t.figures_note
    # compute peaks follow the device's SMs, the bandwidth is the borrowed board's
    assert t.tensor_tflops_bf16 == pytest.approx(165.2 * 76 / 128) and t.dram_gbs == 1008
    # a capability the table lacks: the nearest one not newer
    t = _device(monkeypatch, "Orin", 8, 7, 16, 166912)
    assert (t.name, t.cc, t.figures_from, t.smem_per_block) == ("sm_87", 87, "GeForce RTX 3090", 166912)
    t = _device(monkeypatch, "NVIDIA B300 SXM6 AC", 10, 3, 148, 232448)
    assert (t.name, t.figures_from) == ("sm_103", "B200") and "not in fastlora's table" in t.figures_note
    # older than every entry: the oldest, without bf16
    t = _device(monkeypatch, "Tesla V100-SXM2-16GB", 7, 0, 80, 98304)
    assert (t.name, t.figures_from, t.has_bf16) == ("sm_70", "Tesla T4", False)


def test_name_matching_a_board_of_another_capability_does_not_take_its_figures(monkeypatch):
    t = _device(monkeypatch, "NVIDIA RTX A6000", 8, 9, 84)
    assert t.figures_from == "GeForce RTX 4090"
    assert "names RTX A6000 (sm_86) but the device is sm_89" in t.figures_note
    assert t.dram_gbs == 1008


def test_mig_slice_keeps_its_board_with_peaks_for_its_sms(monkeypatch):
    t = _device(monkeypatch, "NVIDIA A100-SXM4-40GB MIG 1g.5gb", 8, 0, 14)
    assert t.figures_from is None and t.dram_gbs == 1555
    assert t.tensor_tflops_fp16 == pytest.approx(312 * 14 / 108)
    assert t.figures_note.startswith("figures of A100 SXM4 40GB; peaks scaled from its 108 SMs")


def test_device_target_needs_cuda():
    with pytest.raises(ValueError, match="needs a CUDA device"):
        device_target("cpu")
