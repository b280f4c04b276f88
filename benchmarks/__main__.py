"""Command line: ``python -m benchmarks {layer,train,host,report,all} [options]`` (from the repo root).

    python -m benchmarks all --out benchmarks/results/<device-slug> --budget-seconds 450
    python -m benchmarks layer --family llama3-8b --m 512,2048,8192 --r 16 --dropout 0.05
    python -m benchmarks train --model llama-1b
    python -m benchmarks host --m 1,16 --target sm_89
    python -m benchmarks layer --smoke --out /tmp/b && python -m benchmarks report /tmp/b

Without a GPU the Triton kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1 is set here,
before triton is imported); such runs are marked ``performance_claim: false``. ``host`` is the
exception: it launches nothing and needs the kernels compiled for a GPU target, so it never sets the
variable, and where it finds it set (a process that imported this module for another command, the
test suite) it runs itself in a child process without it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

HOST = "host"

if not torch.cuda.is_available() and sys.argv[1:2] != [HOST]:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from . import harness  # noqa: E402

# `all` splits its budget: the layer sweep gets this share of it, training the rest
LAYER_SHARE = 0.45


def _default_out(args, device) -> Path:
    if getattr(args, "out", None):
        return Path(args.out)
    if args.smoke or device.type != "cuda":
        return Path(os.environ.get("TMPDIR", "/tmp")) / "fastlora-bench-smoke"
    return harness.REPO_ROOT / "benchmarks" / "results" / harness.slug(harness.device_name(device))


def build_parser() -> argparse.ArgumentParser:
    from . import bench_host, bench_layer, bench_memory, bench_train, report

    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    bench_layer.add_arguments(sub.add_parser("layer", help="one LoRA projection, every provider"))
    bench_train.add_arguments(sub.add_parser("train", help="QLoRA training steps, patched vs unpatched"))
    bench_host.add_arguments(sub.add_parser(HOST, help="host µs and GPU kernel launches per layer call, "
                                                        "fastlora vs PEFT (kernels not run)"))
    bench_memory.add_arguments(sub.add_parser("memory", help="peak memory of a QLoRA step on fake tensors (no GPU)"))
    report.add_arguments(sub.add_parser("report", help="results.md and PNG plots from JSONL records"))
    a = sub.add_parser("all", help="layer (default GPU subset) + train + report into one folder")
    a.add_argument("--smoke", action="store_true")
    a.add_argument("--out", default=None)
    a.add_argument("--budget-seconds", type=float, default=450.0,
                   help="wall-clock budget for the measurements (report excluded); default 450")
    a.add_argument("--train-model", default="llama-1b",
                   help="models of the train part (default llama-1b; llama3-8b needs its own call: saving and "
                        "loading a 16 GB checkpoint takes minutes)")
    return ap


def _all(args, device) -> int:
    from . import bench_layer, bench_train, report

    out = _default_out(args, device)
    budget = harness.Budget(args.budget_seconds)
    ap = build_parser()
    # the default GPU subset: both families, three M spanning the strategy switch, r=16, dropout 0.05
    layer_argv = ["layer", "--out", str(out)] + (["--smoke"] if args.smoke else
                                                   ["--m", "512,2048,8192", "--r", "16", "--dropout", "0.05"])
    train_argv = ["train", "--out", str(out)] + (["--smoke"] if args.smoke else ["--model", args.train_model])
    summary = [bench_layer.run(ap.parse_args(layer_argv), device, budget.slice(LAYER_SHARE))]
    summary.append(bench_train.run(ap.parse_args(train_argv), device, budget))
    summary.append(report.run(ap.parse_args(["report", str(out)])))
    for s in summary:
        print(s)
    return 0


def _host_in_child(argv) -> int:
    """``python -m benchmarks host ...`` in a child process without TRITON_INTERPRET (this process's
    kernels were decorated for the interpreter)."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "benchmarks", *argv], cwd=harness.REPO_ROOT, env=env).returncode


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    # fastlora.kernels._interpreter.interpreter_active's rule, read without importing triton
    if args.cmd == HOST and os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on"):
        return _host_in_child(argv)
    if args.cmd == "report":
        from . import report

        print(report.run(args))
        return 0
    device = harness.default_device()
    t0 = time.monotonic()
    if args.cmd == "all":
        rc = _all(args, device)
    else:
        from . import bench_host, bench_layer, bench_memory, bench_train

        if args.cmd != "memory":
            args.out = str(_default_out(args, device))
            harness.log(f"records -> {args.out}")
        mod = {"layer": bench_layer, "train": bench_train, HOST: bench_host, "memory": bench_memory}[args.cmd]
        print(mod.run(args, device))
        rc = 0
    harness.log(f"done in {time.monotonic() - t0:.1f} s")
    return rc


if __name__ == "__main__":
    sys.exit(main())
