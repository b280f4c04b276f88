"""Where a fastlora layer call's host time goes on a real GPU: host µs to enqueue and wall µs per call
(4096x4096 NF4, M = 16, r = 16) for the fused and dequant forward, a fused training step under bf16
autocast and a plain ``torch.mm``, then a cProfile (by own time) of the fused forward and step, 400
calls each. Needs CUDA; run from the repository root: ``python3 benchmarks/profile_host_gpu.py``.
benchmarks/results/nvidia-h200/run2/profile.log is its output on an H200 (run there under the name
gpu_extra_profile.py)."""
import cProfile
import io
import pstats
import time

import bitsandbytes.functional as bnbF
import torch

import fastlora

torch.manual_seed(0)
N = K = 4096; M = 16; r = 16
wt = (torch.randn(N, K, device="cuda") * K ** -0.5).to(torch.bfloat16)
packed, qs = bnbF.quantize_4bit(wt, blocksize=64, compress_statistics=True, quant_type="nf4")
x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
A = (torch.randn(r, K, device="cuda") * K ** -0.5).requires_grad_()
B = (torch.randn(N, r, device="cuda") * 0.1).requires_grad_()
dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)

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
    n = 400
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    print(f"{name}: host enqueue {1e6 * (t1 - t0) / n:.1f} us/call, wall {1e6 * (t2 - t0) / n:.1f} us/call")
    if name in ("fused fwd", "fused step"):
        pr = cProfile.Profile(); pr.enable()
        for _ in range(n):
            fn()
        pr.disable(); torch.cuda.synchronize()
        s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(22); print(s.getvalue()[:6000])
