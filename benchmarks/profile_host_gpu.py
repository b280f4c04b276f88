"""Where a fastlora layer call's host time goes on a real GPU: host µs to enqueue and wall µs per call
(4096x4096 NF4, M = 16, r = 16) for the fused and dequant forward, a fused training step under bf16
autocast and a plain ``torch.mm``, then a cProfile (by own time) of the fused forward and step, 400
calls each. Needs CUDA; run from the repository root: ``python3 benchmarks/profile_host_gpu.py``.
benchmarks/results/nvidia-h200/run2/profile.log is its output on an H200 (run there as a script of
the same body under another name)."""

from __future__ import annotations

import cProfile
import io
import pstats
import time

import torch

import fastlora


def problem(N: int, K: int, M: int, r: int, device="cuda", seed: int = 0):
    """One 4-bit layer call's inputs on ``device``, drawn from ``seed``: (bf16 weight W [N, K], its NF4
    double-quant bytes and quant_state as bitsandbytes packs them, x [M, K] bf16 needing grad, A [r, K]
    and B [N, r] fp32 needing grad, dY [M, N] bf16)."""
    import bitsandbytes.functional as bnbF

    torch.manual_seed(seed)
    wt = (torch.randn(N, K, device=device) * K ** -0.5).to(torch.bfloat16)
    packed, qs = bnbF.quantize_4bit(wt, blocksize=64, compress_statistics=True, quant_type="nf4")
    x = torch.randn(M, K, device=device, dtype=torch.bfloat16, requires_grad=True)
    A = (torch.randn(r, K, device=device) * K ** -0.5).requires_grad_()
    B = (torch.randn(N, r, device=device) * 0.1).requires_grad_()
    dy = torch.randn(M, N, device=device, dtype=torch.bfloat16)
    return wt, packed, qs, x, A, B, dy


def main(n: int = 400) -> None:
    wt, packed, qs, x, A, B, dy = problem(4096, 4096, 16, 16)

    def fwd(strategy):
        with torch.no_grad():
            return fastlora.lora_linear(x, packed, A, B, 2.0, quant_state=qs, dropout_p=0.0, strategy=strategy)

    def step(strategy):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = fastlora.lora_linear(x, packed, A, B, 2.0, quant_state=qs, dropout_p=0.05, strategy=strategy)
        y.backward(dy)
        x.grad = A.grad = B.grad = None

    def mm():
        with torch.no_grad():
            return x @ wt.t()

    for name, fn in [("fused fwd", lambda: fwd("fused")), ("dequant fwd", lambda: fwd("dequant")),
                     ("fused step", lambda: step("fused")), ("torch mm", mm)]:
        for _ in range(30):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        print(f"{name}: host enqueue {1e6 * (t1 - t0) / n:.1f} us/call, wall {1e6 * (t2 - t0) / n:.1f} us/call")
        if name in ("fused fwd", "fused step"):
            pr = cProfile.Profile()
            pr.enable()
            for _ in range(n):
                fn()
            pr.disable()
            torch.cuda.synchronize()
            s = io.StringIO()
            pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(22)
            print(s.getvalue()[:6000])


if __name__ == "__main__":
    main()
