"""fastlora.sm_model: pipes, shared-memory wavefronts with bank conflicts over real NF4 bytes, the
compiled index layouts, DRAM latency; and that ``fastlora inspect`` charges them."""

import pytest
import torch

from fastlora import inspection, sm_model
from fastlora.kernels.targets import get_target

BLOCKED8 = "#ttg.blocked<{sizePerThread = [8], threadsPerWarp = [32], warpsPerCTA = [4], order = [0]}>"
BLOCKED1 = "#ttg.blocked<{sizePerThread = [1], threadsPerWarp = [32], warpsPerCTA = [4], order = [0]}>"
LINEAR = ("#ttg.linear<{register = [[1], [64]], lane = [[2], [4], [8], [16], [32]], warp = [[128], [256]], "
          "block = []}>")


def test_pipes_of_opcodes():
    assert sm_model.pipe_of("LOP3.LUT") == "alu"
    assert sm_model.pipe_of("PRMT") == "alu"
    assert sm_model.pipe_of("F2FP.BF16.F32.PACK_AB") == "alu"
    assert sm_model.pipe_of("IMAD.MOV.U32") == "fmaheavy"
    assert sm_model.pipe_of("FMUL") == "fp32"
    assert sm_model.pipe_of("F2F.BF16.F32") == "xu"
    assert sm_model.pipe_of("HMMA.16816.F32.BF16") is None
    assert sm_model.pipe_of("BAR.SYNC") is None
    assert sm_model.count_pipes(["LOP3.LUT", "IADD3", "FMUL", "IMAD", "BRA"]) == {
        "alu": 2, "fmaheavy": 1, "fp32": 1, "xu": 0}


def test_loop_cycles_take_the_busiest_pipe():
    h100, a100 = get_target("sm_90"), get_target("sm_80")
    assert sm_model.fp32_lanes(h100) == pytest.approx(32, rel=0.02)
    assert sm_model.fp32_lanes(a100) == pytest.approx(16, rel=0.02)
    # 10 instructions, 8 of them on the half-rate ALU: 16 clocks, the ALU binds
    assert sm_model.loop_cycles(10, {"alu": 8}, h100) == (16.0, "alu")
    # 10 instructions, 2 ALU: the issue binds
    assert sm_model.loop_cycles(10, {"alu": 2}, h100) == (10.0, "issue")
    # fp32 at full rate on sm_90, half rate on sm_80
    assert sm_model.loop_cycles(10, {"fp32": 10}, h100)[0] == pytest.approx(10.0, rel=0.02)
    c, pipe = sm_model.loop_cycles(10, {"fp32": 10}, a100)
    assert pipe == "fp32" and c == pytest.approx(20.0, rel=0.02)


def test_conflict_free_wavefronts_per_instruction():
    w = sm_model.smem_wavefronts
    assert w("LDS") == 1 and w("LDS.U8") == 1 and w("LDS.64") == 2 and w("STS.128") == 4
    assert w("LDSM.16.M88.4") == 4 and w("LDSM.16.MT88.2") == 2
    assert w("LDGSTS.E.BYPASS.128") == 4
    assert w("LDG.E.128") == 0 and w("FMUL") == 0
    # wgmma m64n16k16 bf16, A in registers: B = 16·16·2 B = 4 wavefronts per warpgroup, a quarter per warp
    assert w("HGMMA.64", "x16x16.F32.BF16 R32, R56, gdesc[UR4], R32") == pytest.approx(1.0)
    # A from shared memory too: + 64·16·2 B = 16 wavefronts
    assert w("HGMMA.64", "x16x16.F32.BF16 R32, gdesc[UR4], R32") == pytest.approx(5.0)


def test_lane_offsets_of_the_compiled_layouts():
    off = sm_model.lane_offsets(BLOCKED8, 8192, 4)
    assert len(off) == 64                        # 8192 / 128 threads
    assert off[0][:3] == [0, 8, 16] and off[1][0] == 1 and off[8][0] == 1024
    off = sm_model.lane_offsets(BLOCKED1, 2048, 4)
    assert len(off) == 16 and off[0] == list(range(32)) and off[1][0] == 128
    off = sm_model.lane_offsets(LINEAR, 512, 4)
    assert len(off) == 4
    assert off[0][:3] == [0, 2, 4] and off[1][0] == 1 and off[2][0] == 64 and off[3][1] == 67
    with pytest.raises(ValueError):
        sm_model.lane_offsets("#ttg.blocked<{sizePerThread = [1, 8], threadsPerWarp = [4, 8], "
                              "warpsPerCTA = [4, 1], order = [1, 0]}>", 8192, 4)


def test_find_gather_in_ttgir():
    ttgir = ("#blocked8 = " + BLOCKED8 + "\n"
             "%p = tt.gather %pairs[%idx] {axis = 0 : i32} : (tensor<256xi64, #blocked>, "
             "tensor<8192xi32, #blocked8>) -> tensor<8192xi64, #blocked8> loc(#loc1)\n")
    g = sm_model.find_gather(ttgir)
    assert g == sm_model.Gather(numel=8192, table=256, entry_bytes=8, layout=BLOCKED8)
    assert sm_model.find_gather("no gather here") is None


def _lanes():
    return [list(range(32))]


def test_bank_simulation_by_hand():
    """One register, lane l reads tile byte l: the data decides the conflicts."""
    g = sm_model.gather_wavefronts
    same = torch.zeros(4, 64, dtype=torch.uint8)            # every lane one entry: broadcast
    assert g(_lanes(), 1, 32, data=same, samples=4) == 2.0   # two half-warp phases, one wavefront each
    lo = torch.arange(32, dtype=torch.uint8).repeat(4, 2)    # entries 0..31: 16 bank pairs, no conflict
    assert g(_lanes(), 1, 32, data=lo, samples=4) == 2.0
    hi = (torch.arange(32, dtype=torch.uint8) * 16).repeat(4, 2) # 16 distinct entries, one bank pair
    assert g(_lanes(), 1, 32, data=hi, samples=4) == 32.0
    # the same bytes, each lane on its own copy of the table: conflict-free again
    assert g(_lanes(), 1, 32, data=hi, samples=4, slot=lambda b, lane: b * 16 + lane % 16) == 2.0
    # 4-byte entries: one phase of 32 lanes, 32 bank groups
    assert g(_lanes(), 1, 32, data=lo, samples=4, entry_bytes=4) == 1.0


def test_real_nf4_bytes_conflict():
    """On a Gaussian weight quantized to NF4 by bitsandbytes the pair table's reads conflict (the
    compiled sm_90 layout of the 128 x 128 tile), and a lane-replicated table does not."""
    b = sm_model.nf4_bytes()
    assert b.dtype == torch.uint8 and b.shape == (512, 2048)
    hist = torch.bincount((b >> 4).flatten().long(), minlength=16).float() / b.numel()
    assert hist.min() > 0.01 and hist.max() < 0.12              # every code in use, none dominant
    off = sm_model.lane_offsets(BLOCKED8, 8192, 4)
    w = sm_model.gather_wavefronts(off, 128, 64)
    assert 4.0 < w < 7.0, w                                      # 2 without conflicts
    assert sm_model.gather_wavefronts(off, 128, 64, slot=lambda x, lane: x * 16 + lane % 16) == 2.0
    # the nibble table (quant4.decode_nibbles): nibbles, 4-byte entries, entry 33·c on bank c: one
    # wavefront; the same 16 values 32 entries apart would all sit on bank 0
    off = sm_model.lane_offsets(BLOCKED8, 16384, 4)
    assert sm_model.gather_wavefronts(off, 128, 128, entry_bytes=4, nibbles=True,
                                      slot=lambda c, lane: c * 33) == 1.0
    assert sm_model.gather_wavefronts(off, 128, 128, entry_bytes=4, nibbles=True,
                                      slot=lambda c, lane: c * 32) > 3


def test_latency_bound():
    # 8 trips, one program per SM, no pipelining: 8 latencies
    clk = 1e9
    assert sm_model.latency_bound_s(8, 1, 1, 1, clk) == pytest.approx(8 * sm_model.DRAM_LATENCY_CYCLES / clk)
    # 3 stages: two trips in flight
    assert sm_model.latency_bound_s(8, 1, 1, 3, clk) == pytest.approx(4 * sm_model.DRAM_LATENCY_CYCLES / clk)
    # 4 programs on the busiest SM, 2 resident: 2 rounds
    assert sm_model.latency_bound_s(8, 4, 2, 1, clk) == pytest.approx(16 * sm_model.DRAM_LATENCY_CYCLES / clk)
    assert sm_model.latency_bound_s(0, 4, 2, 1, clk) == 0.0


@pytest.mark.parametrize("M,mode", [(16, "train"), (1, "infer")])
def test_inspect_charges_the_decode_table_reads(M, mode):
    """The compiled 4-bit kernels on sm_90: every table read of the decode is found in the main loop
    (one per packed byte of the tile per thread with the pair table, one per nibble with the nibble
    table), costs its simulated wavefronts (about 6 for the pair table on real NF4 bytes, 1 for the
    nibble table), and the model is at least each of its terms. The tables put the tensor-core tile
    (M = 16) on the nibble table and the GEMV (M = 1, X·Wᵀ) on the pair table."""
    c = inspection.Call(N=4096, K=4096, M=M, mode=mode, strategy="fused")
    r, = inspection.run([c], ["sm_90"])        # compiled in a process of its own under the interpreter
    frozen = [L for L in r.launches if L.label in ("Y", "dX")]
    assert frozen
    for L in frozen:
        f, kw = L.facts, L.config
        nibbles = f.gather_table == 512
        assert nibbles == (M == 16)
        per = 1 if nibbles else 2
        assert f.gather_in_loop and f.gather_lds == kw["BLOCK_J"] * kw["BLOCK_I"] // per // (32 * f.num_warps)
        if nibbles:
            assert L.gather_wavefronts == 1.0 and L.gather_wavefronts_free == 1.0
            assert L.smem_per_weight == pytest.approx(L.smem_per_weight_free)
        else:
            assert 4.0 < L.gather_wavefronts < 7.0 and L.gather_wavefronts_free == 2.0
            assert L.smem_per_weight > L.smem_per_weight_free > 0
        assert sum(f.loop_pipes.values()) <= f.loop_instructions
        for term in (L.issue_us, L.tensor_us, L.smem_us, L.dram_latency_us):
            assert L.model_us >= term + L.latency_us - 1e-6
        assert L.bound in ("issue", "alu", "fmaheavy", "fp32", "xu", "dram", "tensor", "smem", "latency")
