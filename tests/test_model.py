"""The static GPU-time model of ``fastlora inspect`` (``fastlora.inspection``): whole waves, the
split-K sum pass, the kernels PyTorch launches inside a call, the per-launch latency and the
per-projection output. Most checks run the model on recorded launches with hand-made compile facts
(recording needs no compiler); one compiles a split-K launch for sm_90 to hold the sum pass's
instruction count against the SASS."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest

from fastlora import inspection as ins
from fastlora.kernels import configs
from fastlora.kernels.targets import TARGETS

QO = (4096, 4096)


def _facts(**kw) -> ins.KernelFacts:
    base = dict(compiled=True, shared=16384, registers=64, num_warps=4, num_stages=3, sass_instructions=1000,
                mma=8, loop_instructions=200)
    base.update(kw)
    return ins.KernelFacts(**base)


def _launch(c: ins.Call, target: str, label: str):
    return next(L for L in ins.record_call(c, target) if L.label == label)


def _tile_work(L, trips):
    a = ins._launch_args(L)
    main = 2 * a["BLOCK_M"] * a["BLOCK_J"] * a["BLOCK_I"] * trips
    br = a["BLOCK_R"]
    lora = 2 * a["BLOCK_M"] * a["BLOCK_J"] * -(-a["rank"] // br) * br if a["HAS_LORA"] else 0
    return main + lora


# ----------------------------------------------------------------------------------------------
# whole waves
# ----------------------------------------------------------------------------------------------


def test_128_programs_on_82_sms_take_two_waves():
    """sm_86 (82 SMs), one resident program per SM: 128 programs are two waves, each one program's
    tensor time; the old perfect spread (128/82 = 1.56 programs per SM) is 22% short."""
    t = TARGETS["sm_86"]
    c = ins.Call(*QO, 512, strategy="fused", mode="train")
    L = _launch(c, "sm_86", "Y")
    L = replace(L, grid=(128, 1, 1), kwargs=dict(L.kwargs, SPLIT=False))
    f = _facts(shared=60000, registers=232, num_warps=8)    # 1 per SM by registers and by shared memory
    assert ins._occupancy(f, t) == 1
    rep = ins.model_launch(L, c, t, f)
    assert (rep.programs, rep.waves, rep.per_sm) == (128, 2, 2)
    trips = -(-4096 // L.kwargs["BLOCK_I"])
    assert rep.tensor_us == pytest.approx(2 * _tile_work(L, trips) / (t.tensor_tflops_bf16 * 1e12 / t.sms) * 1e6)
    spread = rep.flops / (t.tensor_tflops_bf16 * 1e12) * 1e6
    assert rep.tensor_us > 1.25 * spread
    assert rep.model_us == pytest.approx(max(rep.issue_us, rep.dram_us, rep.tensor_us) + ins.KERNEL_LATENCY_US)


def test_partial_last_wave_with_two_resident_programs():
    """Two resident programs per SM: 200 programs on 82 SMs are ceil(200/164) = 2 waves; the busiest
    SM runs ceil(200/82) = 3 programs, and its tensor cores do 3 programs' work."""
    t = TARGETS["sm_86"]
    c = ins.Call(*QO, 512, strategy="fused", mode="train")
    L = _launch(c, "sm_86", "Y")
    L = replace(L, grid=(200, 1, 1), kwargs=dict(L.kwargs, SPLIT=False))
    f = _facts(shared=40000, registers=128, num_warps=4)
    assert ins._occupancy(f, t) == 2
    rep = ins.model_launch(L, c, t, f)
    assert (rep.waves, rep.per_sm) == (2, 3)
    trips = -(-4096 // L.kwargs["BLOCK_I"])
    assert rep.tensor_us == pytest.approx(3 * _tile_work(L, trips) / (t.tensor_tflops_bf16 * 1e12 / t.sms) * 1e6)
    # the issue time counts the same whole programs on the busiest SM
    instr = f.sass_instructions - f.loop_instructions + f.loop_instructions * trips
    assert rep.issue_us == pytest.approx(3 * 4 * instr / (4 * t.clock_ghz * 1e9) * 1e6)


def test_reserved_shared_memory_per_block():
    """From sm_80 on the runtime keeps 1 KiB of shared memory per block: two blocks of half an SM's
    shared memory do not fit together."""
    t = TARGETS["sm_90"]
    half = t.smem_per_sm // 2
    assert ins._occupancy(_facts(shared=half, registers=32), t) == 1
    assert ins._occupancy(_facts(shared=half - ins.SMEM_RESERVED_PER_BLOCK, registers=32), t) == 2


# ----------------------------------------------------------------------------------------------
# the split-K sum pass
# ----------------------------------------------------------------------------------------------


def _h_launch(split: int, target="sm_90"):
    """H = D(X)·Aᵀ of a q/o training call at M = 16 with 16x16x64 tiles, at most ``split`` splits."""
    c = ins.Call(*QO, 16, strategy="fused", mode="train")
    with configs.override("lora16", configs.TileConfig(16, 16, 64, 4, 3, split=split)):
        return c, _launch(c, target, "H")


def test_sum_pass_scales_with_splits():
    t = TARGETS["sm_90"]
    c, one = _h_launch(1)
    _, many = _h_launch(32)
    assert one.grid[1] == 1 and many.grid[1] > 1
    f = _facts()
    r1, rn = ins.model_launch(one, c, t, f), ins.model_launch(many, c, t, f)
    assert ins._sum_pass(one, 4) is None and r1.sum_us == 0.0 and r1.sum_instructions == 0.0
    sp = ins._sum_pass(many, 4)
    splits = many.grid[1]
    assert sp.splits == splits and sp.tiles == many.grid[0]
    # per thread: 16·16 / 128 = 2 fp32 elements per slice, one 8-byte load
    assert sp.elements == 2 and sp.instr_per_trip == 2 + 1 + 2 + 2
    assert rn.sum_instructions == pytest.approx(splits * sp.instr_per_trip)
    # the partials read back: splits · M · J · 4 bytes, part of the launch's bytes
    assert sp.read_bytes == splits * 16 * 16 * 4
    assert rn.bytes - r1.bytes == configs.partial_bytes(16, 16, splits)
    # the tail: the fence, the arrival atomic and ceil(splits / 4) dependent L2 round trips, + its issue
    clock = t.clock_ghz * 1e9
    chain = (2 + -(-splits // ins.SUM_UNROLL)) * ins.L2_ROUND_TRIP_CYCLES / clock
    issue = 4 * splits * sp.instr_per_trip / (4 * clock)
    assert rn.sum_us == pytest.approx((chain + issue) * 1e6)
    assert rn.sum_us > 1.0          # the reviewer's H at M = 16 on sm_90: ~1.4 µs, not ~0.2
    # doubling the splits lengthens the tail
    _, more = _h_launch(64)
    if more.grid[1] > splits:
        assert ins.model_launch(more, c, t, f).sum_us > rn.sum_us
    # the sum loop's code leaves the instructions every program runs
    assert rn.issue_us < ins.model_launch(replace(many, kwargs=dict(many.kwargs, SPLIT=False)), c, t, f).issue_us


def test_only_the_last_waves_sums_are_a_tail():
    """128 tiles x 3 splits at one program per SM on sm_86 (82 SMs): 5 waves, the last holding
    384 - 4·82 = 56 programs; the 56 tiles finishing there sum after the main pass, the other 72
    tiles' sums overlap it (their partials in the DRAM time, their adds in the issue time)."""
    t = TARGETS["sm_86"]
    c, L = _h_launch(32, "sm_86")
    L = replace(L, grid=(128, 3, 1))
    f = _facts(shared=60000, registers=232, num_warps=4)
    assert ins._occupancy(f, t) == 1
    rep = ins.model_launch(L, c, t, f)
    sp = ins._sum_pass(L, 4)
    assert (rep.waves, sp.tiles, sp.splits) == (5, 128, 3)
    assert rep.sum_tail_bytes == sp.read_bytes * 56 // 128
    one_wave = ins.model_launch(replace(L, grid=(16, 3, 1)), c, t, f)
    assert one_wave.waves == 1 and one_wave.sum_tail_bytes == ins._sum_pass(replace(L, grid=(16, 3, 1)), 4).read_bytes


_SASS_SCRIPT = r"""
import json, os, subprocess, sys, tempfile
from fastlora import inspection as ins
from fastlora.kernels import _launch, configs
c = ins.Call(4096, 4096, 16, strategy="fused", mode="train")
with configs.override("lora16", configs.TileConfig(16, 16, 64, 4, 3, split=32)):
    L = next(L for L in ins.record_call(c, "sm_90") if L.label == "H")
ck = _launch.compile_launch(L, ins.get_target("sm_90"))
with tempfile.TemporaryDirectory() as d:
    p = os.path.join(d, "k.cubin")
    open(p, "wb").write(ck.asm["cubin"])
    text = subprocess.run([ins._nvidia_tool("cuobjdump"), "-sass", p], capture_output=True, text=True,
                          check=True).stdout
s = ins.Sass.parse(text)
loops = []
for lo, hi in s.loops():
    body = [(op, rest) for a, op, rest in s.instructions if lo <= a <= hi]
    loads = sum(1 for op, _ in body if op.startswith("LDG") and ".STRONG.GPU" in op)
    if loads:
        loops.append({"n": len(body), "loads": loads, "mma": sum(1 for op, _ in body if ins.is_mma(op))})
print(json.dumps({"grid": list(L.grid), "warps": L.kwargs["num_warps"], "loops": loops,
                  "model": ins._sum_pass(L, L.kwargs["num_warps"]).instr_per_trip}))
"""


def test_sum_pass_instructions_match_the_sass():
    """Compiled for sm_90 (no GPU needed): the sum loop (the loops whose loads bypass L1, as its
    ``.cg`` loads compile) is unrolled SUM_UNROLL times with a one-trip remainder loop, and the
    model's instructions per trip are within a third of the unrolled body's per trip."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _SASS_SCRIPT], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["grid"][1] > 1
    loops = got["loops"]
    assert loops and all(lp["mma"] == 0 for lp in loops), loops
    unrolled = max(loops, key=lambda lp: lp["loads"])
    single = min(loops, key=lambda lp: lp["loads"])
    assert unrolled["loads"] == ins.SUM_UNROLL * single["loads"], loops
    per_trip = unrolled["n"] / ins.SUM_UNROLL
    assert abs(got["model"] - per_trip) <= per_trip / 3, (got["model"], per_trip, loops)


# ----------------------------------------------------------------------------------------------
# PyTorch's kernels in a call; casts
# ----------------------------------------------------------------------------------------------


def _report(c: ins.Call, target="sm_90") -> ins.CallReport:
    launches = ins.record_call(c, target)
    return ins._call_report(c, TARGETS[target], launches, [_facts() for _ in launches])


@pytest.mark.parametrize("adapters", ["autocast", "fp32"])
def test_fused_training_call_launches_no_pytorch_kernel(adapters):
    """dA and dB are stored by the kernel in the parameters' dtype (fp32 here): no cast kernel, and
    no other PyTorch kernel, in a fused training call."""
    c = ins.Call(1024, 512, 16, strategy="fused", mode="train", adapters=adapters)
    r = _report(c)
    assert r.torch_launches == []
    for label in ("dA", "dB"):
        # (dB is a segment of the launch that computes G)
        L = next(U for L in ins.record_call(c, "sm_90") for U in L.parts or [L] if U.label == label)
        out = ins._launch_args(L)["out_ptr"]
        assert str(out.dtype) == "torch.float32"
    dA = next(L for L in r.launches if L.label == "dA")
    # dA [r, K] written once in fp32 (its bytes hold the write at 4 bytes an element)
    assert dA.bytes >= 16 * 512 * 4


def test_a_cast_in_a_call_is_counted(monkeypatch):
    """Were the op to cast dA [r, K] from fp32 to bf16 with PyTorch, the model would count the
    kernel: read 4 bytes, write 2 per element; views and allocations launch nothing."""
    import torch

    from fastlora.kernels import _launch

    def fake_record(c, target):
        with _launch.recording(target):
            g = torch.empty(16, 512, device="meta")
            g.t().reshape(512, 16).to(torch.float32)      # views, and a cast to its own dtype: nothing
            g.to(torch.bfloat16)
        return []

    monkeypatch.setattr(ins, "record_call", fake_record)
    (T,) = ins._torch_kernels(ins.Call(1024, 512, 16), TARGETS["sm_90"])
    assert T.label == "torch _to_copy" and T.bytes == 16 * 512 * (4 + 2) and T.flops == 0
    assert T.model_us == pytest.approx(T.bytes / (TARGETS["sm_90"].dram_gbs * 1e9) * 1e6 + ins.KERNEL_LATENCY_US)


def test_dequant_training_call_counts_cublas():
    c = ins.Call(1024, 512, 16, strategy="dequant", mode="train")
    r = _report(c)
    assert [(T.label, T.phase) for T in r.torch_launches] == [("cuBLAS mm", "forward"), ("cuBLAS mm", "backward")]
    t = TARGETS["sm_90"]
    for T in r.torch_launches:
        assert T.flops == 2 * 16 * 1024 * 512
        assert T.bytes == (16 * 512 + 1024 * 512 + 16 * 1024) * 2
        assert T.model_us == pytest.approx(ins._gemm_floor(16, 1024, 512, ins._DTYPES["bf16"], t) * 1e6
                                           + ins.KERNEL_LATENCY_US)
    assert r.cublas_us == pytest.approx(sum(T.model_us for T in r.torch_launches))
    assert r.model_us == pytest.approx(sum(L.model_us for L in r.launches) + r.cublas_us)
    assert r.n_launches == len(r.launches) + 2
    assert r.launch_us == pytest.approx(r.n_launches * ins.LAUNCH_US)
    assert r.phase_us("forward") + r.phase_us("backward") == pytest.approx(r.model_us)


def test_fp16_dequant_call_rounds_the_terms_in_the_epilogue():
    """fp16 4-bit "dequant": PEFT rounds the frozen product and the LoRA term to fp16 each, then adds
    them. The epilogue pass does that (ROUND_TERM) on the product cuBLAS left in the output, so the
    call launches no PyTorch kernel besides the two cuBLAS products; bf16 does not round twice."""
    M, N, K = 16, 1024, 512
    for dtype, want in (("fp16", True), ("bf16", False)):
        c = ins.Call(N, K, M, dtype=dtype, strategy="dequant", mode="train")
        r = _report(c)
        assert [T.label for T in r.torch_launches] == ["cuBLAS mm", "cuBLAS mm"], r.torch_launches
        epilogues = [U for L in ins.record_call(c, "sm_90") for U in L.parts or [L] if U.label.endswith("epilogue")]
        assert [U.label for U in epilogues] == ["Y epilogue", "dX epilogue"]
        assert all(U.kwargs["ROUND_TERM"] is want and U.kwargs["ACC_OUT"] for U in epilogues), dtype
        assert r.model_us == pytest.approx(sum(L.model_us for L in r.launches) + r.cublas_us)


# ----------------------------------------------------------------------------------------------
# per-launch latency, model against floor
# ----------------------------------------------------------------------------------------------


def test_every_launch_carries_the_kernel_latency():
    c = ins.Call(1024, 512, 16, strategy="dequant", mode="train")
    t = TARGETS["sm_90"]
    launches = ins.record_call(c, "sm_90")
    r = ins._call_report(c, t, launches, [_facts() for _ in launches])
    assert any(L.sum_us for L in r.launches)      # split-K launches are among them
    for launch, L in zip(launches, r.launches):
        assert L.latency_us == ins.KERNEL_LATENCY_US
        assert L.model_us >= L.floor_us + ins.KERNEL_LATENCY_US - 1e-9
        main_dram = L.dram_us - L.sum_tail_bytes / (t.dram_gbs * 1e9) * 1e6
        assert L.model_us == pytest.approx(max(L.issue_us, main_dram, L.tensor_us) + L.sum_us
                                           + ins.KERNEL_LATENCY_US)
    for T in r.torch_launches:
        assert T.model_us == pytest.approx(T.floor_us + ins.KERNEL_LATENCY_US)
    assert r.model_us >= r.n_launches * ins.KERNEL_LATENCY_US


# ----------------------------------------------------------------------------------------------
# output: per projection
# ----------------------------------------------------------------------------------------------


def _reports():
    shapes = {"q_proj/o_proj": (1024, 512), "down_proj": (512, 1536)}
    calls = ins.calls_for(shapes, (16,), modes=("train",))
    return [_report(c) for c in calls]


def test_text_output_has_a_ratio_per_projection():
    reps = _reports()
    text = ins.format_reports(reps, detail=True)
    for shape in ("q_proj/o_proj", "down_proj"):
        rows = [ln for ln in text.splitlines() if ln.strip().startswith(shape) and "M=16" in ln and "fused" in ln
                and "dequant " in ln and "×" in ln]
        assert len(rows) == 1, text
        r = next(r for r in reps if r.call.shape_name == shape and r.call.strategy == "fused")
        assert f"fused* model {ins._fmt_us(r.model_us)} µs / floor {ins._fmt_us(r.floor_us)} µs = " \
               f"{r.model_us / r.floor_us:.2f}×" in rows[0]
    assert any(ln.strip().startswith("Σ shapes") for ln in text.splitlines())
    # the PyTorch kernels appear in the call's rows, and every µs figure is labelled a model
    assert "cuBLAS mm" in text
    for line in text.splitlines():
        if "µs" in line:
            assert "model" in line or "floor µs" in line, line


def test_markdown_output_has_a_ratio_per_projection():
    reps = _reports()
    md = ins.format_markdown(reps)
    rows = [ln for ln in md.splitlines() if ln.startswith("| sm_90 | ") and "proj" in ln]
    assert [ln.split(" | ")[1] for ln in rows] == ["q_proj/o_proj", "down_proj"], md
    for ln, shape in zip(rows, ("q_proj/o_proj", "down_proj")):
        r = next(r for r in reps if r.call.shape_name == shape and r.call.strategy == "fused")
        assert f"fused: {ins._fmt_us(r.model_us)} / {ins._fmt_us(r.floor_us)} ({r.model_us / r.floor_us:.2f}×)" in ln
    assert "model / floor (µs)" in md


def test_report_round_trips_through_json():
    r = _report(ins.Call(1024, 512, 16, dtype="fp16", strategy="dequant", mode="train"))
    back = ins._report_from_dict(json.loads(json.dumps(ins.report_to_dict(r))))
    assert back.torch_launches == r.torch_launches
    assert back.model_us == r.model_us and [L.waves for L in back.launches] == [L.waves for L in r.launches]
