"""The host-cost benchmark (``python -m benchmarks host``): its launch-counting rule, and a smoke run.

The smoke run compiles fastlora's kernels for sm_89 (Triton's on-disk cache keeps them for the next
run), so it runs in a child process without TRITON_INTERPRET, which conftest sets for this one.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import bench_host, harness

REPO = Path(__file__).resolve().parent.parent


def test_counting_rule_skips_views_and_allocations():
    with bench_host.LaunchCounter() as c:
        a = torch.empty(4, 8, device="meta")
        b = a.t().unsqueeze(0).squeeze(0).view(8, 4).detach()
        d = torch.mm(a, b)                       # a GEMM: one launch
        d.to(torch.bfloat16)                      # a cast: one launch
        d.to(torch.float32)                       # the same dtype: no op at all
        torch.empty_like(d).zero_()               # an allocation (none) and a fill (one)
    assert c.counted == {"aten::mm.default": 1, "aten::_to_copy.default": 1, "aten::zero_.default": 1}, c.counted
    for op in ("aten::t.default", "aten::view.default", "aten::detach.default", "aten::empty.memory_format",
               "aten::empty_like.default"):
        assert c.not_counted[op] >= 1, f"{op} missing from not_counted: {dict(c.not_counted)}"
    # allocations: the two empties, mm's and the cast's results; not the views, not zero_ (in place)
    assert c.allocations == {"aten::empty.memory_format": 1, "aten::empty_like.default": 1, "aten::mm.default": 1,
                             "aten::_to_copy.default": 1}, c.allocations


def test_gemm_4bit_counts_by_bitsandbytes_rule():
    """bitsandbytes' gemm_4bit is its fused kernel (1 launch) at M <= 4 on every GPU and the dequant
    fallback past its largest M; the rule is bitsandbytes' own, read from its source."""
    from fastlora.kernels.targets import get_target

    rule = bench_host._bnb_rule(get_target("sm_89"))
    assert rule is not None, "bitsandbytes' _gemm_4bit_use_custom_cuda not found in its CUDA backend"
    assert rule(torch.bfloat16, 1, 4096, 4096, 64)
    assert not rule(torch.bfloat16, 4096, 4096, 4096, 64)
    assert not rule(torch.bfloat16, 1, 4096, 4000, 64)        # K not a multiple of the blocksize


@pytest.fixture(scope="module")
def host_smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("host")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "host", "--smoke", "--strategy", "auto,dequant",
                           "--out", str(out)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"host benchmark failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return out, proc.stdout


def test_host_smoke_records(host_smoke):
    out, stdout = host_smoke
    records = harness.read_records([out / "host.jsonl"])
    seen = {}
    for r in records:
        missing = [k for k in harness.REQUIRED_FIELDS if k not in r]
        assert not missing, f"record lacks {missing}: {r.get('config')}"
        c, m = r["config"], r["metrics"]
        where = f"{c['provider']} M={c['M']} {c['mode']}"
        assert r["bench"] == "host" and r["smoke"] is True
        assert r["status"] == "ok", f"{where}: {r['status']}: {r.get('error')}"
        if r["device"] != "cuda":
            assert r["performance_claim"] is False, where
        if c["measured_on"] != "meta":
            continue
        seen[(c["provider"], c["M"], c["mode"], c["strategy"])] = m
        assert 0 < m["host_us_min"] <= m["host_us_median"], f"{where}: times {m['host_us_min']}, {m['host_us_median']}"
        assert m["launches"] > 0 and m["launches"] == m["triton_launches"] + m["op_launches"], f"{where}: {m}"
        assert m["op_launches"] == sum(m["counted_ops"].values()), f"{where}: {m['counted_ops']}"
        assert m["triton_launches"] == sum(m["triton_kernels"].values()), f"{where}: {m['triton_kernels']}"
        for op in m["counted_ops"]:
            assert op not in ("aten::view.default", "aten::t.default", "aten::empty.memory_format",
                              "aten::detach.default"), f"{where}: {op} counted as a launch"
        if c["provider"] == "fastlora":
            # the counted call launched what every timed call launched through the stub, and each timed
            # call ran the fused op
            assert m["triton_launches"] > 0, f"{where}: no Triton launch"
            assert m["triton_launches"] == m["stub_launches_per_call"], \
                f"{where}: counted {m['triton_launches']} Triton launches, each timed call made " \
                f"{m['stub_launches_per_call']}"
            assert m["fused_calls_in_loop"] == c["reps"] + c["warmup"] and not m["fallback_calls"], f"{where}: {m}"
            # the goal, with either strategy: at most 6 launches per training step, 3 per forward call
            assert m["launches"] <= (6 if c["mode"] == "train_step" else 3), f"{where} {c['strategy']}: {m}"
        else:
            assert m["triton_launches"] == 0 and not m["layer_patched"], f"{where}: {m}"
            assert any(op.startswith("bitsandbytes::") for op in m["counted_ops"]), f"{where}: {m['counted_ops']}"
    for M in bench_host.DEFAULT_M:
        for mode in bench_host.MODES:
            for provider in bench_host.PROVIDERS:
                for strategy in ("auto", "dequant"):
                    assert (provider, M, mode, strategy) in seen, f"no {provider} record for M={M} {mode} {strategy}"
    # the dequant strategy ran cuBLAS for the frozen product (where auto runs the fused kernel at these M)
    assert seen[("fastlora", 16, "forward", "dequant")]["op_launches"] == 1
    assert seen[("fastlora", 16, "forward", "auto")]["op_launches"] == 0
    assert "| on | adapters | strategy | M | mode |" in stdout and "torch" in stdout, stdout


def test_host_smoke_stack(tmp_path):
    """--stack 3: three layers chained, one backward; every figure per layer. fastlora's launches
    and allocations per layer are a single layer's (6 and 6 per training step: nothing per stack is
    left over), and every layer of the stack ran the fused op in every timed call."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "host", "--smoke", "--stack", "3", "--m", "16",
                           "--out", str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"host benchmark failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    records = [r for r in harness.read_records([tmp_path / "host.jsonl"]) if r["config"]["measured_on"] == "meta"]
    assert len(records) == 4
    for r in records:
        c, m = r["config"], r["metrics"]
        assert r["status"] == "ok" and c["stack"] == 3, (c, r.get("error"))
        want = 6 if c["mode"] == "train_step" else 2
        if c["provider"] == "fastlora":
            assert (m["launches"], m["allocations"]) == (want, want), m
            assert m["fused_calls_in_loop"] == 3 * (c["reps"] + c["warmup"]), m
        else:   # PEFT + bitsandbytes: more of both, per layer
            assert m["launches"] > want and m["allocations"] > want, m
    assert "per layer of 3" in proc.stdout, proc.stdout


def test_host_report(host_smoke, tmp_path):
    from benchmarks import __main__ as cli

    out, _ = host_smoke
    assert cli.main(["report", str(out), "--out", str(tmp_path)]) == 0
    md = (tmp_path / "results.md").read_text()
    assert "Host cost per layer call" in md and "ratio min / median" in md, md
