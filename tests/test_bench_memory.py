"""benchmarks/bench_memory.py: the live-bytes tracker, the fake 4-bit layout, a tiny model's step on
fake tensors for PEFT and fastlora, the records and the fit search."""

import argparse
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import bench_memory as bm  # noqa: E402


def test_tracker_peak_matches_hand_computed_sequence():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(), bm.LiveBytes() as t:
        a = torch.empty(1000, dtype=torch.uint8)       # 1000 B -> one 1024 B block
        b = torch.empty(256, dtype=torch.float32)      # 1024 B
        assert t.total == 2048
        del a
        assert t.total == 1024
        c = torch.empty(4096, dtype=torch.uint8)       # 4096 B: live 1024 + 4096
        v = c.view(64, 64)                             # a view: no new storage
        assert t.total == 5120
        t.transient(100, "weight_copies")              # 512 B, only at this moment: peak 5632
        assert t.total == 5120
        del b
        d = torch.empty(10, dtype=torch.float32)       # 40 B -> 512
        assert t.total == 4096 + 512
        del c, v, d
        assert t.total == 0
    assert t.peak == 5632
    assert t.peak_by_cat["activations"] == 5120 and t.peak_by_cat["weight_copies"] == 512


def test_quant_layout_matches_bitsandbytes():
    import bitsandbytes.functional as F

    N, K = 96, 320
    w = torch.randn(N, K, dtype=torch.bfloat16)
    packed, qs = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    lay = bm.quant_layout(N, K)
    real = {"packed": packed, "absmax": qs.absmax, "offset": qs.offset, "absmax2": qs.state2.absmax,
            "code2": qs.state2.code, "code": qs.code}
    for k, t in real.items():
        assert (tuple(t.shape), t.dtype) == (tuple(lay[k][0]), lay[k][1]), k


@pytest.fixture(scope="module")
def tiny_steps():
    # dropout 0.05 as the benchmark's default; no checkpointing: every layer's saved tensors are live
    return {cfg: bm.run_step("tiny", cfg, 256, 2, False) for cfg in bm.CONFIGS}


def test_tiny_step_runs_for_both_configs(tiny_steps):
    peft, fl = tiny_steps["peft"], tiny_steps["fastlora"]
    assert peft["fastlora"] is None
    # all 14 projections patched, every call fused (forward; 2 layers x 7)
    assert fl["fastlora"]["patched"] == 14 and fl["fastlora"]["fused_calls"] == 14
    assert fl["fastlora"]["fallback_calls"] == {}
    for r in (peft, fl):
        assert r["peak_bytes"] > r["resident_bytes"] > 0
        assert sum(r["peak_breakdown_bytes"].values()) == r["peak_bytes"]
        # the step leaves what it found: model, adapters, optimizer state (gradients set to None)
        assert r["end_bytes"] == r["resident_bytes"]
    assert peft["resident_breakdown_bytes"] == fl["resident_breakdown_bytes"]
    # without checkpointing there is nothing to offload: the same step as fastlora's
    off = tiny_steps["fastlora+offload"]
    assert off["fastlora"]["offload"] == {"calls": 0, "fallback": {}} and off["host_peak_bytes"] == 0
    assert off["peak_bytes"] == fl["peak_bytes"]


def test_offloaded_checkpoints_are_host_bytes():
    """With checkpointing on, fastlora+offload's layer inputs are host (meta) storages: the host figure is
    exactly the inputs of every layer but the first (the embedding output, a leaf autograd keeps), and the
    device peak drops by them less what the recompute holds at once (its output and incoming gradient)."""
    layers, batch, seq, hidden = 6, 2, 512, bm.MODELS["tiny"][1]["hidden_size"]
    fl, off = (bm.run_step("tiny", c, seq, batch, True, num_hidden_layers=layers)
               for c in ("fastlora", "fastlora+offload"))
    one = batch * seq * hidden * 4           # an fp32 residual-stream tensor (a multiple of the 512 B block)
    assert off["fastlora"]["offload"] == {"calls": layers, "fallback": {}}
    assert off["host_peak_bytes"] == (layers - 1) * one and fl["host_peak_bytes"] == 0
    assert fl["peak_bytes"] - off["peak_bytes"] >= (layers - 4) * one, (fl["peak_bytes"], off["peak_bytes"], one)


def test_liger_configurations_run_liger_and_drop_the_logits():
    """``liger`` binds Liger's four pieces (its Triton launches do nothing on fake tensors; its torch
    allocations are measured): its fused cross-entropy keeps no [tokens, vocab] logits, so with a
    vocabulary much wider than the hidden size the logits category is a fraction of PEFT's.
    ``fastlora+liger`` keeps fastlora's own loss and takes Liger's other three pieces."""
    pytest.importorskip("liger_kernel")
    over = dict(vocab_size=8192)
    peft, lig, both = (bm.run_step("tiny", c, 256, 2, True, **over) for c in ("peft", "liger", "fastlora+liger"))
    assert lig["fastlora"]["liger"] == {"rms_norm": 5, "swiglu": 2, "rope": 2, "fused_linear_cross_entropy": 1}
    assert both["fastlora"]["liger"] == {"rms_norm": 5, "swiglu": 2, "rope": 2}
    assert both["fastlora"]["loss"] == "LlamaForCausalLM" and both["fastlora"]["fused_calls"] == 28
    full_logits = 2 * 256 * 8192 * 4          # fp32 [batch, seq, vocab]
    assert peft["peak_breakdown_bytes"].get("logits_loss", 0) >= full_logits
    for r in (lig, both):
        assert r["peak_bytes"] < peft["peak_bytes"] - full_logits // 2, (r["peak_bytes"], peft["peak_bytes"])


def test_fastlora_keeps_fewer_activations_with_dropout(tiny_steps):
    # PEFT keeps dropout(X) (and its mask) for each adapter; fastlora's op saves X and H = D(X)·Aᵀ only
    peft, fl = tiny_steps["peft"], tiny_steps["fastlora"]
    assert fl["peak_forward_bytes"] < peft["peak_forward_bytes"]
    assert fl["peak_bytes"] < peft["peak_bytes"]


def test_longest_fit_uses_measured_points_only():
    seen = []

    def measure(s):
        seen.append(s)
        return 10 * s

    seqs = [512, 1024, 2048, 4096, 8192]
    assert bm.longest_fit(measure, 30000, seqs) == {"seq": 2048, "bound": "exact"}
    assert set(seen) <= set(seqs)
    assert bm.longest_fit(measure, 10 ** 9, seqs) == {"seq": 8192, "bound": ">="}
    assert bm.longest_fit(measure, 100, seqs) == {"seq": None, "bound": "none"}


def test_records_report_and_fits(tmp_path):
    ap = argparse.ArgumentParser()
    bm.add_arguments(ap)
    args = ap.parse_args(["--model", "tiny", "--seq", "64", "--ckpt", "on", "--fit", "0.001",
                          "--config", "peft,fastlora,fastlora+offload",
                          "--fit-max", "128", "--out", str(tmp_path)])
    summary = bm.run(args, torch.device("cpu"))
    recs = [json.loads(line) for line in open(tmp_path / "memory.jsonl", encoding="utf-8")]
    assert summary["records"] == len(recs) and len(recs) >= 2
    for r in recs:
        assert r["bench"] == "memory" and r["status"] == "ok" and r["performance_claim"] is False
        assert {"model", "config", "seq", "batch", "ckpt", "r", "dropout"} <= set(r["config"])
        assert {"peak_bytes", "peak_gb", "peak_breakdown_bytes", "peak_phase", "resident_bytes"} <= set(r["metrics"])
        assert r["versions"]["torch"] and r["versions"]["bitsandbytes"] and r["versions"]["peft"]
        assert r["fastlora"]["commit"] and r["fastlora"]["source_sha256"]
    fits = json.loads((tmp_path / "fits.json").read_text())
    measured = {(r["config"]["config"], r["config"]["seq"]): r["metrics"]["peak_bytes"] for r in recs}
    for row in fits["rows"]:
        f = row["fits"][0]
        if f["seq"] is not None:   # the reported seq was measured and fits
            assert measured[(row["config"], f["seq"])] <= 0.001 * 1e9
    md = (tmp_path / "results.md").read_text()
    assert "| 64 |" in md and "Longest sequence" in md
    assert "fastlora+offload peak GB" in md and "host memory peak" in md


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compares with torch.cuda.max_memory_allocated")
def test_gpu_compare(tmp_path):
    ap = argparse.ArgumentParser()
    bm.add_arguments(ap)
    args = ap.parse_args(["--compare-seq", "256"])
    out = bm.gpu_compare(args, torch.device("cuda"))
    for cfg in bm.CONFIGS:
        fake, real = out[cfg]["fake_peak_bytes"], out[cfg]["cuda_max_memory_allocated"]
        assert real > 0 and fake > 0
        assert abs(fake - real) / real < 0.5, out
