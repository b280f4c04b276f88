"""benchmarks.model_check: the static model of each kernel bench_gemv timed on a GPU, beside the
measurement. The summary's arithmetic by hand, and one real run over run 5's H200 records at M = 1
(it compiles for sm_90 in a process without the interpreter)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import model_check

ROOT = Path(__file__).resolve().parents[1]


def _row(shape, M, d, p, measured, model, plain):
    return {"shape": shape, "M": M, "direction": d, "provider": p, "measured_us": measured,
            "model_us": model, "model_plain_us": plain}


def test_summary_by_hand():
    rows = [_row("q", 1, "Y", "gemv", 20.0, 10.0, 10.0), _row("q", 1, "Y", "mma16", 30.0, 12.0, 5.0),
            _row("k", 1, "Y", "gemv", 12.0, 6.0, 6.0), _row("k", 1, "Y", "mma16", 10.0, 5.0, 4.0)]
    s = model_check.summarize(rows)
    assert s["gemv_vs_mma16_cases"] == 2
    # q: gemv measured faster; the model says so (10 < 12), the plain one does not (10 > 5)
    # k: mma16 measured faster; both models say so
    assert s["gemv_vs_mma16_ordered_as_measured"] == {"model_us": 2, "model_plain_us": 1}
    ratios = sorted([2.0, 2.5, 2.0, 2.0])
    assert s["model_us"]["median_measured_over_model"] == ratios[2]
    assert s["model_us"]["min"] == 2.0 and s["model_us"]["max"] == 2.5
    assert s["model_plain_us"]["max"] == 6.0


def test_run5_records_at_one_token(tmp_path):
    out = tmp_path / "check.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run([sys.executable, "-m", "benchmarks.model_check", "--m", "1", "--out", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert p.returncode == 0, p.stderr[-2000:]
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    rows, summary = recs[:-1], recs[-1]["summary"]
    # four projections, two directions, the GEMV and the 16-row tile (run 5 timed it on the pair table)
    assert len(rows) == 16 and {r["provider"] for r in rows} == {"gemv", "mma16"}
    assert all(r["target"] == "sm_90" and r["board"] == "H200" and r["decode"] == "pair" for r in rows)
    assert all(r["measured_us"] > 0 and r["model_us"] > 0 and r["model_plain_us"] > 0 for r in rows)
    assert summary["gemv_vs_mma16_cases"] == 8
    assert "a static model" in p.stdout


def test_refuses_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert model_check.main(["--m", "1"]) == 2
