"""The benchmark harness end to end: ``layer --smoke`` and ``train --smoke`` write well-formed records,
``report`` turns them into results.md and PNGs. On a CPU the kernels run in Triton's interpreter
(conftest sets TRITON_INTERPRET=1) and every record must refuse to back a performance claim.

The dequant-kernel microbenchmark at the end runs only with ``--benchmark-enable``.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

# `benchmarks` is a folder of the checkout, not an installed package: make it importable under plain
# `pytest` as well as `python -m pytest`
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from benchmarks import __main__ as cli  # noqa: E402
from benchmarks import bench_layer, bench_train, harness  # noqa: E402

ON_GPU = torch.cuda.is_available()
EXPECTED_VERSIONS = ("torch", "triton", "bitsandbytes", "peft", "transformers")


@pytest.fixture(scope="module")
def smoke_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert cli.main(["layer", "--smoke", "--out", str(out)]) == 0
    assert cli.main(["train", "--smoke", "--out", str(out), "--model-cache", str(out / "models")]) == 0
    return out


def _records(path):
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    assert lines, f"{path} holds no records"
    return [json.loads(ln) for ln in lines]


def _check_common(rec, where):
    missing = [f for f in harness.REQUIRED_FIELDS if f not in rec]
    assert not missing, f"{where}: record lacks {missing}"
    assert rec["device"] == ("cuda" if ON_GPU else "cpu"), f"{where}: device {rec['device']!r}"
    assert rec["device_name"], f"{where}: empty device name"
    for pkg in EXPECTED_VERSIONS:
        assert rec["versions"].get(pkg), f"{where}: no {pkg} version in {rec['versions']}"
    assert re.fullmatch(r"[0-9a-f]{40}|unknown", rec["fastlora"]["commit"]), f"{where}: commit {rec['fastlora']}"
    assert re.fullmatch(r"[0-9a-f]{64}", rec["fastlora"]["source_sha256"]), f"{where}: source hash"
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", rec["timestamp"]), f"{where}: timestamp {rec['timestamp']!r}"
    assert rec["smoke"] is True
    assert rec["performance_claim"] is False, f"{where}: a smoke/CPU record claims performance"
    assert rec["formulas"], f"{where}: no formulas"
    assert rec["status"] == "ok", f"{where}: status {rec['status']}: {rec.get('error')}"


# One concrete case written out by hand: the smoke run's tiny q_proj, K=64 -> N=48, at M=16, r=4.
#   frozen GEMM     2·M·N·K      = 2·16·48·64      = 98,304 per product (forward X·Wᵀ, backward dY·W; no dW)
#   LoRA forward    2·M·r·(K+N)  = 2·16·4·112      = 14,336
#   LoRA backward   4·M·r·(K+N)  = 4·16·4·112      = 28,672
# bytes, N·K = 3072:
#   W 4-bit + uint8 absmax  3072/2 + 3072/64 = 1,584;  X = dX = 2·16·64 = 2,048;  Y = dY = 2·16·48 = 1,536
#   A, B (and dA, dB) fp32  4·4·112 = 1,792;  H fp32  4·16·4 = 256
#   forward   1,584 + 2,048 (X) + 1,536 (Y) + 1,792 (A, B) + 256 (H written)                      = 7,216
#   backward  1,584 + 1,536 (dY) + 2,048 (dX) + 2,048 (X again, dA) + 256 (H) + 1,792 + 1,792 (dA, dB) = 11,056
#   bf16-floor: W bf16 2·3072 = 6,144; forward 6,144 + 2,048 + 1,536 = 9,728; backward the same
HAND_CASE = dict(proj="q_proj", K=64, N=48, M=16, r=4)
HAND_FLOPS = {  # (has LoRA, mode) -> FLOPs
    (True, "forward"): 98_304 + 14_336, (True, "backward"): 98_304 + 28_672,
    (True, "forward+backward"): 2 * 98_304 + 14_336 + 28_672,
    (False, "forward"): 98_304, (False, "backward"): 98_304, (False, "forward+backward"): 2 * 98_304,
}
HAND_BYTES = {
    (True, "forward"): 7_216, (True, "backward"): 11_056, (True, "forward+backward"): 7_216 + 11_056,
    (False, "forward"): 9_728, (False, "backward"): 9_728, (False, "forward+backward"): 2 * 9_728,
}
GRAD_KEYS = ("", "_dx", "_da", "_db")   # Y, dX, dA, dB


def test_layer_records(smoke_dir):
    recs = _records(smoke_dir / "layer.jsonl")
    seen, hand_checked = set(), set()
    eps16, eps32 = torch.finfo(torch.bfloat16).eps, torch.finfo(torch.float32).eps
    models = [r for r in recs if r["config"].get("provider") == bench_layer.MODEL_PROVIDER]
    recs = [r for r in recs if r["config"].get("provider") != bench_layer.MODEL_PROVIDER]
    # the model column: fastlora inspect's figures for sm_90 (a CPU run), never a performance claim
    def case_of(r):
        return tuple(r["config"][k] for k in ("M", "proj", "mode", "autocast"))

    assert {case_of(r) for r in models} == {case_of(r) for r in recs}
    # both adapter settings measured: under bf16 autocast (the QLoRA recipe) and fp32 without
    assert {r["config"]["autocast"] for r in recs} == {"bf16", "off"}
    for rec in models:
        c, m = rec["config"], rec["metrics"]
        assert rec["performance_claim"] is False and "not a measurement" in c["model"]
        assert c["model_target"] == ("sm_90" if not ON_GPU else c["model_target"])
        assert m["fits"] is True
        assert 0 < m["model_us_fused"] and 0 < m["model_us_dequant"] and m["floor_us_step"] > 0
        assert m["model_us_auto"] == m[f"model_us_{c['auto_strategy']}"]
        if c["mode"] == "forward+backward":
            fwd = next(r for r in models if case_of(r) == (c["M"], c["proj"], "forward", c["autocast"]))["metrics"]
            bwd = next(r for r in models if case_of(r) == (c["M"], c["proj"], "backward", c["autocast"]))["metrics"]
            assert m["model_us_fused"] == pytest.approx(fwd["model_us_fused"] + bwd["model_us_fused"])
    for rec in recs:
        c, m = rec["config"], rec["metrics"]
        where = f"layer {c.get('proj')} M={c.get('M')} {c.get('provider')} {c.get('mode')} autocast={c.get('autocast')}"
        _check_common(rec, where)
        assert rec["bench"] == "layer"
        for key in ("family", "proj", "M", "N", "K", "r", "lora_alpha", "scaling", "dropout", "bias", "weight",
                    "provider", "mode", "auto_strategy", "timing", "x_dtype"):
            assert key in c, f"{where}: config lacks {key}"
        # read from the quantized layer: what bench_layer.Inputs asked bitsandbytes for
        w = c["weight"]
        assert (w["quant_type"], w["double_quant"], w["blocksize"], w["compute_dtype"], w["shape"]) == \
            ("nf4", True, 64, "bfloat16", [c["N"], c["K"]]), f"{where}: weight {w}"
        assert c["x_dtype"] == "bfloat16" and c["adapter_dtype"] == "float32", where
        assert c["lora_compute_dtype"] == ("bfloat16" if c["autocast"] == "bf16" or c["provider"] == "dequant-cublas"
                                           else "float32"), where
        assert 0 < m["p20_ms"] <= m["median_ms"] <= m["p80_ms"], f"{where}: timings {m}"
        assert m["tflops"] == pytest.approx(m["flops"] / (m["median_ms"] * 1e-3) / 1e12)
        lora = c["provider"] != "bf16-floor"
        if all(c[k] == v for k, v in HAND_CASE.items()):
            assert m["flops"] == HAND_FLOPS[(lora, c["mode"])], f"{where}: flops {m['flops']}"
            assert m["bytes"] == HAND_BYTES[(lora, c["mode"])], f"{where}: bytes {m['bytes']}"
            hand_checked.add((c["provider"], c["mode"]))
        if ON_GPU:
            assert m["peak_bytes"] > 0
        if c["provider"] in ("fastlora-auto", "fastlora-patched"):
            # what ran, told by its outputs (bitwise equal to one explicit strategy's), not by the rule.
            # Both strategies round the frozen product to bf16 before the LoRA term, as PEFT does, so
            # at small shapes their Y and dX can agree bit for bit ("indistinguishable"): consistent
            # with either; "neither", or the other strategy alone, is a failure
            observed = c["strategy_observed"]
            assert observed in ("fused", "dequant", "indistinguishable"), f"{where}: {observed}"
            if observed != "indistinguishable":
                assert observed == c["auto_strategy"], f"{where}: ran {observed}, choose_strategy says {c['auto_strategy']}"
        if c["provider"] == "fastlora-patched":
            assert m["patch_patched_layers"] == 1 and m["patch_fused_calls"] > 0, f"{where}: {m}"
            assert not m["patch_fallback_calls"], f"{where}: patched layer fell back: {m['patch_fallback_calls']}"
        if lora and c["provider"] != "peft":
            # Y and dX, dA, dB: every provider computes the same layer, one bf16 rounding of the largest
            # value apart at most (X, W, dY are bf16)
            for g in GRAD_KEYS:
                diff, ref = m["max_abs_diff_vs_peft" + g], m["ref_absmax" + g]
                assert ref > 0, f"{where}: PEFT's {g or 'Y'} is all zero: the check compares nothing"
                assert diff <= 2 * eps16 * ref, f"{where}: max |{g or 'Y'} - PEFT's| = {diff} > {2 * eps16 * ref}"
            assert m["matches_peft"] is True, where
            if c["provider"].startswith("fastlora-") and c["autocast"] == "off":
                # fastlora's LoRA gradients are fp32 like PEFT's: fp32 summation-order differences only
                for g in ("_da", "_db"):
                    diff, tol = m["max_abs_diff_vs_peft" + g], 4 * eps32 * c["M"] ** 0.5 * m["ref_absmax" + g]
                    assert diff <= tol, f"{where}: max |{g[1:]} - PEFT's| = {diff} > {tol} (fp32)"
        seen.add((c["provider"], c["mode"]))
    everything = {(p, mode) for p in bench_layer.PROVIDERS for mode in bench_layer.MODES}
    assert seen == everything, f"missing provider/mode: {everything - seen}"
    assert hand_checked == everything, f"hand-computed case not measured for {everything - hand_checked}"


def test_flops_and_bytes_by_hand():
    """The formulas themselves, at the hand-computed case (the records above repeat them)."""
    M, N, K, r = (HAND_CASE[k] for k in ("M", "N", "K", "r"))
    for (lora, mode), f in HAND_FLOPS.items():
        assert bench_layer.flops(mode, M, N, K, r, lora) == f, (lora, mode)
        assert bench_layer.min_bytes(mode, M, N, K, r, lora) == HAND_BYTES[(lora, mode)], (lora, mode)


def test_peft_provider_is_peft_linear4bit(smoke_dir):
    """Without transformers' is_loaded_in_4bit flag PEFT wraps Linear4bit in its generic Linear: the
    peft baseline must be the class a user's QLoRA model runs."""
    recs = [r for r in _records(smoke_dir / "layer.jsonl") if r["config"]["provider"] != bench_layer.MODEL_PROVIDER]
    assert recs and {r["config"]["peft_layer"] for r in recs} == {"peft.tuners.lora.bnb.Linear4bit"}


def test_train_records(smoke_dir):
    recs = _records(smoke_dir / "train.jsonl")
    variants = {}
    for rec in recs:
        c, m = rec["config"], rec["metrics"]
        where = f"train {c['model']['preset']} {c['variant']}"
        _check_common(rec, where)
        assert rec["bench"] == "train.throughput"
        assert c["model"]["load_in_4bit"] and c["model"]["lora"]["r"] == 16 and c["model"]["lora"]["lora_alpha"] == 32
        w = c["model"]["weight"]
        assert (w["quant_type"], w["double_quant"], w["compute_dtype"]) == ("nf4", True, "bfloat16"), f"{where}: {w}"
        assert c["model"]["adapter_dtype"] == "float32", where
        assert c["model"]["autocast"] == "bfloat16", where       # as Trainer(bf16=True) runs the forward
        assert m["tokens_per_s"] > 0 and m["step_ms_median"] > 0
        assert all(torch.isfinite(torch.tensor(m["losses"])))
        variants[c["variant"]] = rec
    assert set(variants) == {"unpatched", "patched"}
    u, p = variants["unpatched"]["config"], variants["patched"]["config"]
    # both variants from one starting point: same adapters, same order record, each at its own position
    assert u["initial_adapters_sha256"] == p["initial_adapters_sha256"], "the variants started from different adapters"
    assert u["order"] == p["order"] and sorted(u["order"]) == ["patched", "unpatched"]
    assert [u["order"][u["position"]], p["order"][p["position"]]] == ["unpatched", "patched"]
    # B = 0 at the start (PEFT's init): the first loss is the base model's, whatever the dropout masks
    lu, lp = variants["unpatched"]["metrics"]["losses"][0], variants["patched"]["metrics"]["losses"][0]
    assert lp == pytest.approx(lu, rel=1e-2), f"first loss unpatched {lu} vs patched {lp}: not the same start"
    rep = p["patch_report"]
    assert rep["patched_count"] == 2 * 7, f"patch report: {rep}"        # tiny: 2 layers x 7 projections
    assert rep["fused_calls"] > 0 and not rep["fallback_calls"], f"patched layers did not run fused: {rep}"


def test_variant_order():
    orders = {bench_train.variant_order("random", seed) for seed in range(16)}
    assert orders == {("unpatched", "patched"), ("patched", "unpatched")}, orders   # both occur
    assert bench_train.variant_order("random", 3) == bench_train.variant_order("random", 3)
    assert bench_train.variant_order("patched,unpatched", None) == ("patched", "unpatched")
    with pytest.raises(SystemExit):
        bench_train.variant_order("patched,patched", None)


def test_report(smoke_dir, tmp_path):
    out = tmp_path / "report"
    assert cli.main(["report", str(smoke_dir), "--out", str(out)]) == 0
    md = (out / "results.md").read_text()
    assert "No performance claim" in md
    for provider in bench_layer.PROVIDERS:
        assert provider in md
    assert "× vs peft" in md and "× vs dequant-cublas" in md and "÷ floor" in md and "patched × vs peft" in md
    assert "Training throughput" in md and "1 of 2" in md and "2 of 2" in md
    pngs = sorted(out.glob("*.png"))
    names = {p.name.split("_")[0] for p in pngs}
    assert {"speedup", "memory", "train"} <= names, f"plots written: {[p.name for p in pngs]}"
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{p.name} is not a PNG"
        assert p.name in md, f"{p.name} not linked from results.md"


def test_budget_stops_layer_sweep(tmp_path):
    """--budget-seconds 0: no case starts, nothing is written, the run still ends cleanly."""
    assert cli.main(["layer", "--smoke", "--out", str(tmp_path), "--budget-seconds", "0"]) == 0
    assert not (tmp_path / "layer.jsonl").exists()


# ----------------------------------------------------------------------------------------------
# microbenchmark (pytest-benchmark): only with --benchmark-enable
# ----------------------------------------------------------------------------------------------


def test_dequant_kernel_microbench(request, benchmark):
    if not request.config.getoption("benchmark_enable", default=False):
        pytest.skip("microbenchmark: run with --benchmark-enable")
    import bitsandbytes.functional as F

    import fastlora

    N, K = (14336, 4096) if ON_GPU else (64, 128)
    device = "cuda" if ON_GPU else "cpu"
    w = torch.randn(N, K, dtype=torch.bfloat16, device=device) * 0.02
    packed, qs = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")

    def run():
        out = fastlora.dequantize(packed, qs, torch.bfloat16)
        harness.sync(torch.device(device))
        return out

    out = benchmark(run)
    torch.testing.assert_close(out, F.dequantize_4bit(packed, qs).to(torch.bfloat16), rtol=0, atol=0)
    benchmark.extra_info.update({"N": N, "K": K, "bytes_read": N * K // 2 + N * K // 64, "bytes_written": 2 * N * K,
                                 "device": harness.device_name(torch.device(device)),
                                 "performance_claim": harness.performance_claim(torch.device(device), False)})


def test_report_keeps_the_newest_record_of_a_case():
    """Two runs of one layer case whose configs differ in a setting the table does not show (a
    budget, say): the table's cell is the newer run's, whatever order the files were read in."""
    from benchmarks import report

    def rec(ts, ms, budget):
        return {"device_name": "GPU", "bench": "layer", "timestamp": ts,
                "config": {"family": "f", "proj": "q", "K": 8, "N": 8, "r": 4, "dropout": 0.0, "mode": "forward",
                           "M": 16, "provider": "peft", "budget": budget}, "metrics": {"median_ms": ms}}

    new, old = rec("2026-12-04T15:00:00+00:00", 1.0, 10), rec("2026-12-04T12:00:00+00:00", 2.0, 20)
    for order in ([new, old], [old, new]):
        groups = report._layer_groups(report._latest(order))
        (cells,) = groups.values()
        assert cells[16]["peft"] is new
