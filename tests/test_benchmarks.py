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
from benchmarks import bench_layer, harness  # noqa: E402

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


def test_layer_records(smoke_dir):
    recs = _records(smoke_dir / "layer.jsonl")
    seen = set()
    for rec in recs:
        c, m = rec["config"], rec["metrics"]
        where = f"layer {c.get('proj')} M={c.get('M')} {c.get('provider')} {c.get('mode')}"
        _check_common(rec, where)
        assert rec["bench"] == "layer"
        for key in ("family", "proj", "M", "N", "K", "r", "lora_alpha", "scaling", "dropout", "bias", "weight",
                    "provider", "mode", "auto_strategy", "timing"):
            assert key in c, f"{where}: config lacks {key}"
        assert c["weight"]["quant_type"] == "nf4" and c["weight"]["double_quant"] is True
        assert 0 < m["p20_ms"] <= m["median_ms"] <= m["p80_ms"], f"{where}: timings {m}"
        assert m["flops"] == bench_layer.flops(c["mode"], c["M"], c["N"], c["K"], c["r"], c["provider"] != "bf16-floor")
        assert m["tflops"] == pytest.approx(m["flops"] / (m["median_ms"] * 1e-3) / 1e12)
        if ON_GPU:
            assert m["peak_bytes"] > 0
        if c["provider"] == "fastlora-auto":
            assert c["strategy"] in ("fused", "dequant") and c["strategy"] == c["auto_strategy"]
        if c["provider"] not in ("peft", "bf16-floor"):
            # every provider computes the same layer: one bf16 rounding apart at most
            tol = 2 * torch.finfo(torch.bfloat16).eps * max(1.0, m["ref_absmax"])
            assert m["max_abs_diff_vs_peft"] <= tol, f"{where}: |Y - Y_peft| = {m['max_abs_diff_vs_peft']} > {tol}"
        seen.add((c["provider"], c["mode"]))
    assert seen == {(p, mode) for p in bench_layer.PROVIDERS for mode in bench_layer.MODES}, "a provider/mode is missing"


def test_peft_provider_is_peft_linear4bit(smoke_dir):
    """Without transformers' is_loaded_in_4bit flag PEFT wraps Linear4bit in its generic Linear: the
    peft baseline must be the class a user's QLoRA model runs."""
    recs = _records(smoke_dir / "layer.jsonl")
    assert {r["config"]["peft_layer"] for r in recs} == {"peft.tuners.lora.bnb.Linear4bit"}


def test_train_records(smoke_dir):
    recs = _records(smoke_dir / "train.jsonl")
    variants = {}
    for rec in recs:
        c, m = rec["config"], rec["metrics"]
        where = f"train {c['model']['preset']} {c['variant']}"
        _check_common(rec, where)
        assert rec["bench"] == "train.throughput"
        assert c["model"]["load_in_4bit"] and c["model"]["lora"]["r"] == 16 and c["model"]["lora"]["lora_alpha"] == 32
        assert m["tokens_per_s"] > 0 and m["step_ms_median"] > 0
        assert all(torch.isfinite(torch.tensor(m["losses"])))
        variants[c["variant"]] = rec
    assert set(variants) == {"unpatched", "patched"}
    rep = variants["patched"]["config"]["patch_report"]
    assert rep["patched_count"] == 2 * 7, f"patch report: {rep}"        # tiny: 2 layers x 7 projections
    assert rep["fused_calls"] > 0 and not rep["fallback_calls"], f"patched layers did not run fused: {rep}"


def test_report(smoke_dir, tmp_path):
    out = tmp_path / "report"
    assert cli.main(["report", str(smoke_dir), "--out", str(out)]) == 0
    md = (out / "results.md").read_text()
    assert "No performance claim" in md
    for provider in bench_layer.PROVIDERS:
        assert provider in md
    assert "× vs peft" in md and "× vs dequant-cublas" in md and "÷ floor" in md
    assert "Training throughput" in md
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
