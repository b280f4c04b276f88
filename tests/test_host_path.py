"""The host side of a layer call: how many GPU kernel launches a call makes, that the launch plans
launch what Triton's own path launches, and (on a GPU) that the op is CUDA-graph capturable and its
in-kernel split-K sum deterministic.

Launches are counted as ``python -m benchmarks host`` counts them (its ``LaunchCounter`` rule for ATen
ops, plus every Triton launch), on ``meta`` tensors with the launches recorded for a GPU target, so
the count is a GPU run's, at any M, on a machine without a GPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import fastlora
from fastlora import ops
from fastlora.kernels import _launch
from fastlora.kernels.quant4 import Packed4bit

from helpers import ON_GPU, assert_within_rule

_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from benchmarks.bench_host import LaunchCounter  # noqa: E402


def _meta_packed(N, K, blocksize=64):
    blocks = N * K // blocksize
    m = dict(device="meta")
    return Packed4bit(packed=torch.empty(N * K // 2, 1, dtype=torch.uint8, **m), N=N, K=K, blocksize=blocksize,
                      code=torch.empty(16, **m), absmax=torch.empty(blocks, dtype=torch.uint8, **m),
                      absmax2=torch.empty(-(-blocks // 256), **m), code2=torch.empty(256, **m),
                      offset=torch.empty(1, **m))


def _count(M, strategy, train, target="sm_90", N=4096, K=4096, r=16, p=0.05, dtype=torch.bfloat16):
    """(Triton launches, ATen launches) of one layer call (forward, or forward + backward)."""
    w = _meta_packed(N, K)
    x = torch.empty(M, K, dtype=dtype, device="meta", requires_grad=train)
    A = torch.empty(r, K, device="meta", requires_grad=train)
    B = torch.empty(N, r, device="meta", requires_grad=train)
    # once before counting: the first split-K launch on a device allocates its arrival counters
    # (torch.zeros, once per device and stream)
    with _launch.recording(target):
        y = fastlora.lora_linear(x, w, A, B, 2.0, dropout_p=p if train else 0.0, lora_dtype=dtype,
                                 strategy=strategy)
        if train:
            torch.autograd.grad(y, (x, A, B), torch.empty_like(y))
    counter = LaunchCounter()
    with _launch.recording(target) as launches, counter:
        y = fastlora.lora_linear(x, w, A, B, 2.0, dropout_p=p if train else 0.0, lora_dtype=dtype,
                                 strategy=strategy)
        if train:
            # autograd.grad, not backward(): the recorder holds every launch's arguments, so
            # AccumulateGrad could not take dA and dB as they are and would copy them (a real run
            # keeps no reference, and .grad takes the tensors the kernels wrote)
            torch.autograd.grad(y, (x, A, B), torch.empty_like(y))
    # the last call's, for the allocation tests (less the dY this function makes with empty_like)
    _count.allocations = {k: v for k, v in counter.allocations.items() if k != "aten::empty_like.default"}
    return len(launches), dict(counter.counted)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M", [1, 16, 256, 4096])
def test_launches_per_call_fused(M, dtype):
    """The fused strategy, 4-bit, dropout on: 6 launches per training step (H, Y; G, dB, dX, dA:
    split-K sums in the same launches, dA and dB written in the parameter dtype, the dropout seed
    drawn on the host; in fp16 the two terms' separate rounding is in the epilogue) and 2 per
    forward-only call. The goal is at most 6 and 3."""
    for train, want in ((True, 6), (False, 2)):
        triton_n, aten = _count(M, "fused", train, dtype=dtype)
        total = triton_n + sum(aten.values())
        assert total == want, (f"M={M} {'train step' if train else 'forward'}: {total} launches "
                               f"({triton_n} Triton, ATen {aten}), want {want}")
        # allocations: Y and H forward; G, dB, dA, dX backward. Split-K's partials (the products
        # split at M <= 16 on sm_90) come from the buffer kept between calls
        want_alloc = {"aten::empty.memory_format": 6 if train else 2}
        assert _count.allocations == want_alloc, (M, train, _count.allocations)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M", [1, 16, 256, 4096])
def test_launches_per_call_dequant(M, dtype):
    """The dequantize-then-cuBLAS strategy, 4-bit, dropout on: forward H with W's dequantization in
    one launch, cuBLAS, the LoRA epilogue; backward G, dB and W's dequantization in one launch,
    cuBLAS, dA with dX's epilogue pass. 6 per training step, 3 per forward-only call (the goal's
    bounds), in fp16 too (no PyTorch add_: the epilogue rounds the two terms as PEFT does)."""
    triton_n, aten = _count(M, "dequant", True, dtype=dtype)
    assert triton_n == 4, triton_n
    assert aten == {"aten::mm.default": 2}, aten        # the two cuBLAS products, nothing else
    # H, W dequantized, G, dB, dA, W again for dX (+ the two cuBLAS results)
    assert _count.allocations == {"aten::empty.memory_format": 6, "aten::mm.default": 2}, _count.allocations
    triton_n, aten = _count(M, "dequant", False, dtype=dtype)
    assert (triton_n, aten) == (2, {"aten::mm.default": 1}), (triton_n, aten)
    assert _count.allocations == {"aten::empty.memory_format": 2, "aten::mm.default": 1}, _count.allocations


def test_launch_plans_replay_triton_arguments():
    """A plan launches its compiled kernel directly after the first call: the arguments it passes must
    be the ones Triton's own path passes. Recorded launches go through Triton's path every time; so
    run the same call twice, recording, and compare with the plan's bound tail."""
    w = _meta_packed(256, 512)
    x = torch.empty(16, 512, dtype=torch.bfloat16, device="meta")
    A = torch.empty(8, 512, device="meta")
    B = torch.empty(256, 8, device="meta")
    runs = []
    for _ in range(2):
        with _launch.recording("sm_89") as launches, torch.no_grad():
            fastlora.lora_linear(x, w, A, B, 2.0, lora_dtype=torch.bfloat16, strategy="fused")
        runs.append([(L.name, L.grid, len(L.args), sorted(L.kwargs.items(), key=lambda kv: kv[0]))
                     for L in launches])
    assert runs[0] == runs[1] and len(runs[0]) == 2, runs
    # every parameter after the runtime ones is a constexpr the plan passes in Triton's order
    from fastlora.kernels.lora_matmul import _lora_matmul_kernel

    kernel = getattr(_lora_matmul_kernel, "fn", _lora_matmul_kernel)
    import inspect

    names = list(inspect.signature(kernel).parameters)
    n_runtime = runs[0][0][2]
    consts = {k for k, _ in runs[0][0][3]} - {"num_warps", "num_stages", "enable_fp_fusion"}
    assert set(names[n_runtime:]) == consts, (names[n_runtime:], consts)


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
def test_split_k_in_kernel_sum_is_deterministic_on_gpu():
    """M = 16 splits the reduction; each tile's last program adds the partials in a fixed order: the
    same call gives the same bits every time, and the result is within the rule of the fp64 product."""
    import bitsandbytes.functional as bnbF

    torch.manual_seed(0)
    N, K, M, r = 4096, 4096, 16, 16
    wt = (torch.randn(N, K, device="cuda") * K ** -0.5).to(torch.bfloat16)
    packed, qs = bnbF.quantize_4bit(wt, blocksize=64, compress_statistics=True, quant_type="nf4")
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    A = torch.randn(r, K, device="cuda") * K ** -0.5
    B = torch.randn(N, r, device="cuda") * 0.1
    ys = [fastlora.lora_linear(x, packed, A, B, 2.0, quant_state=qs, strategy="fused") for _ in range(20)]
    assert all(torch.equal(ys[0], y) for y in ys[1:]), "split-K sum differs between identical calls"
    w = bnbF.dequantize_4bit(packed, qs).double()
    exact = x.double() @ w.t() + 2.0 * (x.double() @ A.double().t()) @ B.double().t()
    lowp = (x @ w.to(torch.bfloat16).t()).float() + 2.0 * (x.float() @ A.t()) @ B.t()
    assert_within_rule("Y split-K", ys[0], exact, lowp, atol=1e-2)


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
def test_cuda_graph_capture_replays_like_eager(monkeypatch):
    """The op is capturable (no host sync, no per-call host state, buffers from the caching
    allocator): a captured forward + backward with dropout replays to eager's numbers for the same
    seed, and a captured call without a seed draws a new mask at every replay."""
    from benchmarks.profile_host_gpu import problem

    _, packed, qs, x, A, B, dy = problem(N=1024, K=512, M=16, r=8)

    def step(seed):
        x.grad = A.grad = B.grad = None
        y = fastlora.lora_linear(x, packed, A, B, 2.0, quant_state=qs, dropout_p=0.1, seed=seed,
                                 lora_dtype=torch.bfloat16)
        y.backward(dy)
        return y.detach().clone(), x.grad.clone(), A.grad.clone(), B.grad.clone()

    eager = step(123)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), monkeypatch.context() as m:
        # warm up outside the capture: a captured call takes the registered op, whose seed is a
        # device tensor (another kernel specialization), so compile and plan that one here
        m.setattr(ops, "EAGER_FAST_PATH", False)
        for _ in range(2):
            step(123)
            with torch.no_grad():
                fastlora.lora_linear(x, packed, A, B, 2.0, quant_state=qs, dropout_p=0.5, lora_dtype=torch.bfloat16)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    x.grad = A.grad = B.grad = None
    with torch.cuda.graph(g):
        y = fastlora.lora_linear(x, packed, A, B, 2.0, quant_state=qs, dropout_p=0.1, seed=123,
                                 lora_dtype=torch.bfloat16)
        y.backward(dy)
    g.replay()
    torch.cuda.synchronize()
    for name, a, b in zip(("Y", "dX", "dA", "dB"), (y, x.grad, A.grad, B.grad), eager):
        assert torch.equal(a, b), f"{name}: replay differs from eager by {(a.float() - b.float()).abs().max()}"

    g2 = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(g2):
        y2 = fastlora.lora_linear(x, packed, A, B, 2.0, quant_state=qs, dropout_p=0.5, lora_dtype=torch.bfloat16)
    g2.replay()
    first = y2.clone()
    g2.replay()
    assert not torch.equal(first, y2), "two replays of a captured call drew the same dropout mask"


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
def test_host_seed_reproduced_under_checkpoint_rng_restore():
    """The eager seed comes from the CUDA generator's (seed, offset) on the host: restoring the
    generator state (as activation checkpointing does) draws the same seed again; a fresh draw differs."""
    torch.cuda.manual_seed(5)
    state = torch.cuda.get_rng_state()
    a = ops.draw_seed("cuda")
    b = ops.draw_seed("cuda")
    torch.cuda.set_rng_state(state)
    assert ops.draw_seed("cuda") == a and a != b
