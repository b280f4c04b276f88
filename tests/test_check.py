"""`fastlora check`: the command end to end on this machine, its tolerance rule, its record (which
the benchmark report reads), and that it fails when the numbers are wrong."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import DEVICE, ON_GPU, assert_within_rule

from fastlora import check, reference
from fastlora.kernels.lora_matmul import dropout_keep_mask

# `benchmarks` is a folder of the checkout, not an installed package (as tests/test_benchmarks.py)
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from benchmarks import harness  # noqa: E402
from benchmarks import report as bench_report  # noqa: E402


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """`fastlora check --json --out DIR`, as a user runs it (its own process; on a CPU the command
    sets TRITON_INTERPRET=1 itself)."""
    out = tmp_path_factory.mktemp("check")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["FASTLORA_CACHE_DIR"] = str(out / "cache")
    r = subprocess.run([sys.executable, "-m", "fastlora", "check", "--json", "--out", str(out), "--m", "16"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stdout[-2000:]
    return json.loads(lines[0]), out


def test_check_json(report):
    rep, _ = report
    assert {"device", "versions", "numerics", "speed", "verdict"} <= set(rep)
    assert rep["versions"]["torch"] == torch.__version__
    cases = rep["numerics"]
    # 4-bit and dense, fp32 and bf16 adapters, dropout off and on, two strategies, four products
    assert len(cases) == 2 * 2 * 2 * 2 * 4
    assert len({c["name"] for c in cases}) == len(cases)
    for c in cases:
        assert c["passed"] is True, c
        assert 0.0 <= c["max_rel_err"] < 0.05, c
    assert {c["strategy"] for c in cases} == {"fused", "dequant"}
    assert {c["product"] for c in cases} == {"Y", "dX", "dA", "dB"}
    assert {c["dropout"] > 0 for c in cases} == {False, True} and {c["base"] for c in cases} == {"nf4", "bfloat16"}
    assert rep["passed"] is True and rep["verdict"].startswith("verdict: PASS")
    if ON_GPU:
        assert rep["speed_measured"] and rep["speed"]
        assert {r["provider"] for r in rep["speed"]} == set(check.PROVIDERS)
    else:
        assert rep["speed"] == [] and rep["speed_measured"] is False
        assert rep["device"]["type"] == "cpu" and rep["device"]["triton_interpret"] is True
        assert "speed not measured (no GPU)" in rep["verdict"]
        assert check.NOT_MEASURED in check._table(rep).splitlines()
        assert "speed: not measured (no GPU)" == check.NOT_MEASURED


def test_check_out_is_a_benchmark_record(report):
    rep, out = report
    lines = (out / "check.jsonl").read_text().splitlines()
    assert len(lines) == 1
    rec = json.loads(lines[0])
    for field in ("schema", "bench", "timestamp", "device", "device_name", "versions", "fastlora",
                  "performance_claim", "smoke", "config", "metrics", "formulas", "status"):
        assert field in rec, field
    assert rec["bench"] == "check" and rec["status"] == "ok"
    assert rec["performance_claim"] is ON_GPU
    assert rec["metrics"]["numerics"] == rep["numerics"] and rec["metrics"]["verdict"] == rep["verdict"]


def test_the_record_carries_harness_fastlora_fields(report):
    """The same ``fastlora`` fields as benchmarks/harness.py's records, computed the same way."""
    rep, out = report
    rec = json.loads((out / "check.jsonl").read_text().splitlines()[0])
    assert set(rec["fastlora"]) == set(harness.fastlora_revision()) == {"commit", "dirty", "source_sha256"}
    assert check.revision()["source_sha256"] == harness.fastlora_revision()["source_sha256"]
    for field in harness.REQUIRED_FIELDS:
        assert field in rec, field


def test_the_benchmark_report_reads_a_check_record(report, tmp_path):
    rep, out = report
    rec = json.loads((out / "check.jsonl").read_text().splitlines()[0])
    res = bench_report.run(argparse.Namespace(paths=[str(out)], out=str(tmp_path), plot_modes=["forward+backward"]))
    assert res["records"] == 1
    md = (tmp_path / "results.md").read_text()
    assert rec["fastlora"]["source_sha256"][:12] in md and rec["fastlora"]["commit"][:12] in md
    assert rec["device_name"] in md


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_tolerance_rule(seed):
    """reference.tolerance_rule on both sides of its bound, where the worst element is, non-finite
    output; and assert_within_rule, which the tests use, decides as it does and names the element."""
    g = torch.Generator().manual_seed(seed)
    exact = torch.randn(40, 30, generator=g, dtype=torch.float64) * 3
    lowp = exact.to(torch.bfloat16)
    err_lowp = (lowp.double() - exact).abs().max().item()
    for k in (0.5, 1.9, 2.1, 4.0):
        out = exact + k * (lowp.double() - exact)
        worst, bound, idx = reference.tolerance_rule(out, exact, lowp)
        assert bound == pytest.approx(2 * err_lowp + 1e-5 * max(1.0, exact.abs().max().item()))
        assert worst == pytest.approx(k * err_lowp) and (worst <= bound) == (k <= 2.0), (k, worst, bound)
        assert (out - exact).abs()[idx].item() == worst
        if k <= 2.0:
            assert assert_within_rule("x", out, exact, lowp) == (worst, bound)
        else:
            with pytest.raises(AssertionError, match=rf"x: max error .* at \({idx[0]}, {idx[1]}\)"):
                assert_within_rule("x", out, exact, lowp)
    bad = exact.clone()
    bad[3, 4] = float("nan")
    assert reference.tolerance_rule(bad, exact, lowp)[::2] == (float("inf"), (3, 4))
    with pytest.raises(AssertionError, match="non-finite"):
        assert_within_rule("x", bad, exact, lowp)
    with pytest.raises(ValueError, match="shape"):
        reference.tolerance_rule(exact[:3], exact, lowp)


def test_wrong_numbers_fail_the_check(monkeypatch):
    """A fastlora whose Y is 2% off: every Y case fails, the other products pass, the verdict fails."""
    if ON_GPU:
        pytest.skip("the CPU run checks the failure path")

    def off_by_2_percent(self, x, dy, p, strategy, lora_dtype=None):
        keep = dropout_keep_mask(x.shape[0], x.shape[1], p, check.SEED, x.device) if p > 0 else None
        y, dx, dA, dB = self.peft(x, dy, keep, p)
        return y * 1.02, dx, dA, dB

    monkeypatch.setattr(check.Layer, "fastlora", off_by_2_percent)
    cases = check.numerics("cpu")
    assert {c["product"] for c in cases if not c["passed"]} == {"Y"}
    assert all(not c["passed"] for c in cases if c["product"] == "Y")
    line, ok = check.verdict(cases, [], measured=False)
    assert not ok and line.startswith("verdict: FAIL") and "numerics FAILED (16/64" in line


def test_speed_verdict():
    cases = [{"name": "c", "passed": True, "max_rel_err": 1e-3}]
    rows = [{"provider": "auto", "proj": "q_proj", "M": 16, "vs_peft_forward+backward": 1.8},
            {"provider": "auto", "proj": "down_proj", "M": 2048, "vs_peft_forward+backward": 1.02}]
    line, ok = check.verdict(cases, rows, measured=True)
    assert ok and "1.02-1.80x" in line
    rows[1]["vs_peft_forward+backward"] = 0.9          # 10% slower than PEFT: beyond the 5% of noise
    line, ok = check.verdict(cases, rows, measured=True)
    assert not ok and "down_proj M=2048 (0.90x)" in line
    line, ok = check.verdict(cases, [], measured=True)
    assert not ok


def test_speed_rows_and_table(monkeypatch):
    """The GPU's speed table, driven on this machine with a timer that runs each call once and gives
    each a time of its own: every provider and mode is called, the rows carry each one's time and its
    ratio to PEFT's, the auto row names what "auto" runs in each phase, asked as the op asks, and the
    table prints them."""
    calls = []

    def timer(cand, fn, budget_s, device=None, queued=True):
        assert not queued                          # check times each call at the host's pace
        out = fn()
        assert out is not None
        calls.append(fn)
        return 1e-3 * len(calls)                   # µs 1, 2, 3, ... in call order

    asked = []
    real_pick = check.tuning.pick

    def pick(M, N, K, w, device, static, *call):
        asked.append(call)
        return real_pick(M, N, K, w, device, static, *call)

    monkeypatch.setattr(check.tuning, "cuda_timer", timer)
    monkeypatch.setattr(check.tuning, "pick", pick)
    rows = check.speed(DEVICE, [("q_proj", 48, 64)], [5], r=4, p=0.1)
    assert [r["provider"] for r in rows] == list(check.PROVIDERS) and len(calls) == 4 * 3
    us = iter(range(1, 13))
    expected = {p: {m: float(next(us)) for m in check.MODES} for p in check.PROVIDERS}
    for r in rows:
        assert r["M"] == 5 and r["m_bucket"] == 8
        for m in check.MODES:
            assert r[f"{m}_us"] == expected[r["provider"]][m]
            assert r[f"vs_peft_{m}"] == round(expected["peft"][m] / expected[r["provider"]][m], 3)
    assert rows[0]["vs_peft_forward"] == 1.0 and rows[-1]["vs_peft_forward"] == round(1 / 10, 3)
    bf16 = torch.bfloat16
    want = [(phase, bf16, True, bf16, bf16, 4) for phase in ("forward", "backward")]
    # the auto row asks last; on a GPU the op's own "auto" calls ask before it, and the same way
    assert asked[-2:] == want and set(asked) == set(want), asked
    assert set(rows[-1]["auto_strategy"]) == {"forward", "backward"}
    assert set(rows[-1]["auto_strategy"].values()) <= {"fused", "dequant"}
    rep = {"device": {"name": "gpu", "type": "cuda"}, "versions": {"torch": "t", "triton": "t", "fastlora": "f"},
           "numerics": [], "speed": rows, "speed_measured": True, "verdict": "verdict: PASS"}
    text = check._table(rep)
    a = rows[-1]["auto_strategy"]
    assert "q_proj 48x64" in text and f"auto (fwd {a['forward']}, bwd {a['backward']})" in text
    assert check.NOT_MEASURED not in text
