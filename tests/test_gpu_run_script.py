"""``benchmarks/gpu_run.sh``, the one script a GPU machine runs, in its dry mode (no GPU needed): every
step runs in its CPU form (pytest collects the GPU tests by node id, ``fastlora check --help``, a
one-case layer-benchmark smoke) and the summary lists each step with its status."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_run.sh"
STEPS = ("layout", "install", "versions", "tests", "check", "tune", "gemv", "breakdown", "host", "bench")


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "GPU_RUN_WHEELS", "GPU_RUN_SITE")}
    env["PYTHON"] = sys.executable
    return env


def test_script_parses_and_lints():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed")
    proc = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_usage_errors():
    ok = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True, env=_env())
    assert ok.returncode == 0 and "--dry" in ok.stdout
    for args in (["--bogus"], ["--budget", "soon"]):
        bad = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=_env())
        assert bad.returncode == 2, (args, bad.stdout, bad.stderr)


def test_dry_run_writes_a_summary_with_every_step(tmp_path):
    out = tmp_path / "run"
    packed = tmp_path / "back" / "gpu-run.tgz"
    proc = subprocess.run(["bash", str(SCRIPT), "--dry", "--out", str(out), "--tar", str(packed)], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    summary = (out / "summary.md").read_text() if (out / "summary.md").exists() else ""
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}\n{summary}"
    rows = {}
    for line in summary.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 4 and cells[0] in STEPS:
            rows[cells[0]] = cells
    assert set(rows) == set(STEPS), summary
    for step, (_, status, seconds, *_rest) in rows.items():
        assert status == "ok" or status.startswith("skipped: no wheels"), (step, status)
        assert seconds.isdigit(), (step, seconds)
    assert "mode: dry" in summary and "- torch:" in summary and "- commit:" in summary
    assert "collect-only:" in rows["tests"][4] and "tests collected" in rows["tests"][4], rows["tests"]
    files = sorted(p.name for p in out.iterdir())
    assert set(files) <= {"summary.md", "setup.log", "tests.log", "tests.xml", "check.log", "check.jsonl",
                          "tune.log", "gemv.log", "breakdown.log", "host_breakdown.jsonl", "host.log", "host.jsonl", "bench.log",
                          "layer.jsonl"}, files
    assert "candidates in all" in (out / "tune.log").read_text()
    # --tar: the folder packed, with summary.md beside it (what a GPU machine's $OUT gets: two files)
    import tarfile
    with tarfile.open(packed) as tf:
        names = {Path(n).name for n in tf.getnames()}
    assert set(files) <= names and (packed.parent / "summary.md").read_text() == summary
    records = [json.loads(line) for line in (out / "layer.jsonl").read_text().splitlines() if line.strip()]
    assert records and all(r["performance_claim"] is False for r in records)


def test_host_breakdown_dry_run_writes_its_records(tmp_path):
    """``python -m benchmarks.host_breakdown --dry``: every measurement of the GPU script runs on the
    CPU (interpreter, tiny shapes) and lands in host_breakdown.jsonl (timings meaningless there)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.host_breakdown", "--dry", "--m", "1", "--out",
                           str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    recs = [json.loads(line) for line in (tmp_path / "host_breakdown.jsonl").read_text().splitlines()]
    assert all(r["bench"] == "host_breakdown" and not r["performance_claim"] for r in recs)
    names = {(r["config"]["group"], r["config"]["name"]) for r in recs}
    for want in [("layer", "fastlora"), ("layer", "peft"), ("layer", "fastlora, launches a no-op"),
                 ("parts", "tuning.pick via ops._resolve (auto)")]:
        assert want in names, sorted(names)
    assert any(g == "launch" for g, _ in names)
    assert all(0 < r["metrics"]["host_us_min"] <= r["metrics"]["host_us_median"] for r in recs)


def test_bench_gemv_dry_run_writes_its_records(tmp_path):
    """``python -m benchmarks.bench_gemv --dry``: every provider of the GPU step runs on the CPU
    (interpreter, a small shape; bitsandbytes' own may not run there), fastlora's outputs agree with
    dequantize + matmul, and each (shape, direction, M) lands in gemv.jsonl."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_gemv", "--dry", "--m", "1,3", "--out",
                           str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    recs = [json.loads(line) for line in (tmp_path / "gemv.jsonl").read_text().splitlines()]
    assert sorted((r["config"]["direction"], r["config"]["M"]) for r in recs) == [("Y", 1), ("Y", 3), ("dX", 1),
                                                                                   ("dX", 3)]
    for r in recs:
        assert r["bench"] == "gemv" and not r["performance_claim"]
        for name in ("gemv", "mma16", "table", "dequant-cublas", "bf16-floor"):
            assert r["metrics"]["us"][name] > 0, (name, r["metrics"])
