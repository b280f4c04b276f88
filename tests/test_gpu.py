"""What only a GPU can show: tests that run the compiled kernels on CUDA, and skip everywhere else.

Each test builds real bitsandbytes 4-bit layers (``bnb.nn.Linear4bit``, quantized by bitsandbytes on
the GPU, wrapped in PEFT's LoRA ``Linear4bit``) and goes through fastlora's public path
(``fastlora.patch``, ``fastlora.lora_linear``) wherever it can:

- ``test_patched_layer_is_bitwise_deterministic``: a patched layer's forward + backward with dropout,
  run twice from the same RNG state, gives the same bits in Y, dX, dA and dB, at an M whose frozen
  products split K and at one whose products do not (extends
  ``test_host_path.py::test_split_k_in_kernel_sum_is_deterministic_on_gpu``, which repeats a bare
  forward without dropout);
- ``test_dropout_mask_on_gpu_equals_the_interpreters``: the keep-mask drawn on the GPU equals, bit
  for bit, the one Triton's CPU interpreter draws for the same seed (a CPU run of the suite checks
  the kernels against masks the interpreter draws);
- ``test_one_hot_rows_give_bitsandbytes_weights_bit_for_bit``: one-hot rows of X and dY pick columns
  and rows of W out of Y = X·Wᵀ and dX = dY·W; they must equal bitsandbytes' own
  ``dequantize_4bit`` bit for bit, through every row of both tile shapes of the frozen product and
  every absmax block (an FMA contracted into the double-quant decode changes the last bit of an
  absmax: the fp32 cases see every element it touches);
- ``test_down_proj_at_16k_tokens``: Llama-3-8B's down_proj at 16,384 tokens, forward + backward of
  a patched layer, within the tolerance rule of dequantize-then-matmul and inside a stated memory budget;
- ``test_misaligned_packed_views_give_the_aligned_results``: the 4-bit tensors (and X) as views 2 or
  4 bytes past a 16-byte boundary compile another specialization and must give the aligned bits;
- ``test_layer_on_the_second_gpu``, ``test_dequant_and_mask_on_the_second_gpu``: a layer (and the
  dequant and mask kernels) on cuda:1 called while cuda:0 is current runs there and gives cuda:0's
  bits (two GPUs only; ``test_device_guard.py`` checks the guards against a mocked current device).

CUDA-graph capture and replay with dropout, and the host-drawn seed under an RNG restore, are
``test_host_path.py``'s GPU tests; they are not repeated here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastlora
from fastlora import ops
from fastlora import reference as ref
from fastlora.format import from_bnb
from fastlora.kernels import _launch, configs
from fastlora.kernels import lora_matmul as lm
from fastlora.kernels.lora_matmul import dropout_keep_mask, seed_tensor
from fastlora.kernels.quant4 import dequantize_4bit, kernel_args

from helpers import assert_within_rule

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ROOT = Path(__file__).resolve().parent.parent
DEVICE = "cuda"
BF16, FP16 = torch.bfloat16, torch.float16


# ------------------------------------------------------------------------------------------------
# builders
# ------------------------------------------------------------------------------------------------


def _lora_layer(N, K, *, r=16, dropout=0.0, quant_type="nf4", nested=True, dtype=BF16, device=None, seed=0):
    """PEFT's LoRA ``Linear4bit`` over a bitsandbytes ``Linear4bit`` [N, K] (blocksize 64), quantized by
    bitsandbytes on ``device`` from a ``dtype`` weight; A and B drawn non-zero. Every value is drawn on
    the CPU from ``seed``, so two devices get the same layer."""
    import bitsandbytes as bnb
    from peft import LoraConfig
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    device = DEVICE if device is None else device
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(N, K, generator=g) * K ** -0.5).to(dtype)
    base = bnb.nn.Linear4bit(K, N, bias=False, compute_dtype=dtype, quant_type=quant_type,
                             compress_statistics=nested)
    base.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type=quant_type, compress_statistics=nested)
    on_gpu = torch.device(device).type == "cuda"
    with torch.cuda.device(device) if on_gpu else contextlib.nullcontext():
        base = base.to(device)                     # bitsandbytes quantizes here, on that GPU
    cfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout)
    layer = LoraLinear4bit(base, "default", config=cfg, r=r, lora_alpha=2 * r, lora_dropout=dropout)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(torch.randn(r, K, generator=g) * K ** -0.5)
        layer.lora_B["default"].weight.copy_(torch.randn(N, r, generator=g) * r ** -0.5)
    return layer.to(device)


def _adapters(layer):
    return layer.lora_A["default"].weight, layer.lora_B["default"].weight


def _step(layer, x, dy, autocast=True):
    """(Y, dX, dA, dB) of one forward + backward of ``layer`` (under bf16 autocast: the QLoRA recipe)."""
    A, B = _adapters(layer)
    A.grad = B.grad = None
    xg = x.detach().clone().requires_grad_()
    with torch.autocast(xg.device.type, dtype=BF16, enabled=autocast):
        y = layer(xg)
    y.backward(dy)
    return y.detach(), xg.grad, A.grad.clone(), B.grad.clone()


def _frozen_plans():
    """(trans_w, splits) of every 4-bit frozen-product launch plan made since ``lm._PLANS`` was cleared."""
    return sorted((p.consts["TRANS_W"], p.splits) for p in lm._PLANS.values()
                  if p.consts["IS_4BIT"] and p.consts["MAIN"])


def _at(t, offset_bytes):
    """A copy of ``t`` whose data starts ``offset_bytes`` past a 16-byte aligned address (a fresh
    allocation from the caching allocator is 512-byte aligned)."""
    nbytes = t.numel() * t.element_size()
    raw = torch.empty(nbytes + 64, dtype=torch.uint8, device=t.device)
    view = raw[offset_bytes:offset_bytes + nbytes].view(t.dtype).view(t.shape)
    view.copy_(t)
    assert raw.data_ptr() % 16 == 0 and view.data_ptr() % 16 == offset_bytes
    return view


def _assert_same_bits(name, got, want):
    """``got`` and ``want`` equal element for element (IEEE equality: +0 == -0; NaN where both are NaN)."""
    got, want = got.detach(), want.detach()
    assert got.shape == want.shape and got.dtype == want.dtype, (name, got.shape, got.dtype, want.shape, want.dtype)
    if torch.equal(got, want):
        return
    bad = got != want
    if got.is_floating_point():
        bad &= ~(torch.isnan(got) & torch.isnan(want))
    idx = tuple(int(i) for i in bad.nonzero()[0])
    bits = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}.get(got.dtype)
    detail = ""
    if bits is not None:
        mask = (1 << 8 * got.element_size()) - 1
        detail = f" (bits {int(got.view(bits)[idx]) & mask:#x} vs {int(want.view(bits)[idx]) & mask:#x})"
    raise AssertionError(f"{name}: {int(bad.sum())} of {got.numel()} elements differ; first at {idx}: "
                         f"{got[idx].item()!r} vs {want[idx].item()!r}{detail}")


def _gpu_with_bf16():
    if not torch.cuda.is_bf16_supported():
        pytest.skip("bf16 needs compute capability 8.0 (fastlora keeps PEFT's forward there)")


# ------------------------------------------------------------------------------------------------
# determinism of a patched layer, with dropout, split-K and not
# ------------------------------------------------------------------------------------------------

DET_N = DET_K = 4096


@pytest.mark.parametrize("M,split", [(16, True), (4096, False)], ids=["M16-split-k", "M4096-no-split"])
def test_patched_layer_is_bitwise_deterministic(M, split):
    """Forward + backward of a patched PEFT layer (NF4 double quant, r = 16, dropout 0.1, bf16 autocast)
    twice from the same RNG state: the same bits in Y, dX, dA, dB. Another RNG state draws another mask.
    Split-K sums partial products in the tile's last program, in a fixed order: an order that followed
    the programs' arrival would change the last bits from run to run."""
    _gpu_with_bf16()
    layer = _lora_layer(DET_N, DET_K, dropout=0.1)
    report = fastlora.patch(layer)
    assert report.patched, report.summary()
    x = torch.randn(M, DET_K, device=DEVICE, dtype=BF16)
    dy = torch.randn(M, DET_N, device=DEVICE, dtype=BF16)
    lm._PLANS.clear()                    # the launch plans below are this layer's
    runs = []
    # the fused strategy pinned: the device's measured rule may send M = 4096 to dequantize + cuBLAS,
    # whose frozen product has no split-K plan to check
    with fastlora.ops.using_strategy("fused"):
        for _ in range(2):
            torch.manual_seed(123)
            runs.append(_step(layer, x, dy))
        torch.manual_seed(124)
        other = _step(layer, x, dy)
    assert report.fused_calls == 3 and not report.fallback_calls, (report.fused_calls, report.fallback_calls)
    plans = _frozen_plans()
    assert {t for t, _ in plans} == {False, True}, f"expected X·Wᵀ and dY·W plans, got {plans}"
    if split:
        assert all(s > 1 for _, s in plans), f"M = {M} no longer splits K in the frozen products: {plans}"
    else:
        assert all(s == 1 for _, s in plans), f"M = {M} splits K in a frozen product: {plans}"
    for name, a, b in zip(("Y", "dX", "dA", "dB"), *runs):
        assert torch.isfinite(a).all(), name
        _assert_same_bits(f"{name} (M={M}, second run)", b, a)
    assert not torch.equal(runs[0][0], other[0]), "another RNG state drew the same dropout mask"


# ------------------------------------------------------------------------------------------------
# the dropout mask: GPU == Triton's CPU interpreter
# ------------------------------------------------------------------------------------------------

MASK_SHAPES = [(64, 320, 0.05), (33, 131, 0.5), (100, 262, 0.1)]   # K % 4 != 0 and partial tiles too

_MASK_CHILD = """
import json, sys
import torch
from fastlora.kernels import _interpreter
from fastlora.kernels.lora_matmul import dropout_keep_mask
assert _interpreter.interpreter_active() and not torch.cuda.is_available()
cases = json.load(open(sys.argv[1]))
torch.save({c["key"]: dropout_keep_mask(c["M"], c["K"], c["p"], c["seed"], "cpu") for c in cases}, sys.argv[2])
"""


def test_dropout_mask_on_gpu_equals_the_interpreters(tmp_path):
    """The keep-mask of fastlora's dropout (one Philox call per four elements, kept iff uniform >= p)
    drawn on the GPU, from a host seed and from a device seed tensor (the traced / captured path),
    equals the mask Triton's CPU interpreter draws for the same seed, bit for bit. Seeds: small, the
    largest one (both 31-bit halves of the kernel's seed set), and one drawn as the op draws it."""
    torch.manual_seed(2024)
    seeds = [7, (1 << 62) - 1, ops.draw_seed(DEVICE)]
    cases, gpu = [], {}
    for M, K, p in MASK_SHAPES:
        for s in seeds:
            key = f"{M}x{K} p={p} seed={s}"
            host = dropout_keep_mask(M, K, p, s, DEVICE)
            device_seed = dropout_keep_mask(M, K, p, seed_tensor(s, DEVICE), DEVICE)
            _assert_same_bits(f"mask {key}: device seed vs host seed", device_seed, host)
            kept = host.float().mean().item()
            assert abs(kept - (1 - p)) < 0.1, f"mask {key}: keeps {kept:.3f}, expected about {1 - p}"
            gpu[key] = host.cpu()
            cases.append(dict(key=key, M=M, K=K, p=p, seed=s))
    assert len({tuple(gpu[c["key"]].flatten().tolist()) for c in cases[:len(seeds)]}) == len(seeds)
    spec, out = tmp_path / "cases.json", tmp_path / "cpu_masks.pt"
    spec.write_text(json.dumps(cases))
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join([str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH")
                                                         else [])))
    proc = subprocess.run([sys.executable, "-c", _MASK_CHILD, str(spec), str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"the interpreter's masks failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    cpu = torch.load(out)
    for c in cases:
        _assert_same_bits(f"mask {c['key']}: GPU vs interpreter", gpu[c["key"]], cpu[c["key"]])


# ------------------------------------------------------------------------------------------------
# one-hot rows: Y and dX are W's own columns and rows, bit for bit with bitsandbytes
# ------------------------------------------------------------------------------------------------

ONE_HOT_N, ONE_HOT_K = 768, 1024


def _one_hot(rows, cols, width, dtype, device):
    out = torch.zeros(len(rows), width, dtype=dtype, device=device)
    out[torch.arange(len(rows), device=device), cols] = 1
    return out


ONE_HOT_CASES = [(q, nested, dt) for q in ("nf4", "fp4") for nested in (True, False) for dt in (BF16, FP16)]
ONE_HOT_CASES += [(q, True, torch.float32) for q in ("nf4", "fp4")]


@pytest.mark.parametrize("quant_type,nested,dtype", ONE_HOT_CASES,
                         ids=[f"{q}-{'nested' if n else 'plain'}-{str(d)[6:]}" for q, n, d in ONE_HOT_CASES])
def test_one_hot_rows_give_bitsandbytes_weights_bit_for_bit(quant_type, nested, dtype):
    """Row m of X one-hot at column k_m: Y[m] = X[m]·Wᵀ = W[:, k_m] exactly (one product by 1, the rest
    by 0, fp32 accumulation, one rounding to the compute dtype as bitsandbytes rounds its dequant).
    Row m of dY one-hot at n_m: dX[m] = W[n_m, :]. B = 0 makes the LoRA term exactly 0 (fp32 adapters,
    their products in the activation dtype, as under autocast).

    Both tile rows of the fused 4-bit product's table run: M = BLOCK_M of the M <= 16 row (split-K, W
    first in the MMA), called once per 16 columns, and one call of the large-M row with M a few
    rows past a whole number of tiles (a partial last tile). Each covers every row position of its
    tile and, by cycling k_m and n_m through a permutation of all of K and N, every element of W and so
    every absmax block. The result must equal ``bnb.functional.dequantize_4bit`` bit for bit.

    A last-bit change of a double-quant absmax (an FMA contracted into its decode) survives the final
    rounding to bf16 in few elements of this W or none, to fp16 in some dozens: the fp32 cases (a
    weight quantized from fp32, fp32 activations, the product in fp32 with IEEE precision) see every
    element it changes."""
    if dtype == BF16:
        _gpu_with_bf16()
    import bitsandbytes.functional as bnbF

    kind = "frozen4_lora32" if dtype == torch.float32 else "frozen4"    # the adapter products in fp32 too

    N, K, r = ONE_HOT_N, ONE_HOT_K, 16
    base = _lora_layer(N, K, r=r, quant_type=quant_type, nested=nested, dtype=dtype).base_layer
    packed, qs = base.weight.data, base.weight.quant_state
    assert bool(qs.nested) == nested and qs.quant_type == quant_type
    W = bnbF.dequantize_4bit(packed, qs)                           # bitsandbytes' own [N, K]
    assert W.dtype == dtype and W.shape == (N, K)
    g = torch.Generator().manual_seed(1)
    perm_k = torch.randperm(K, generator=g).to(DEVICE)
    perm_n = torch.randperm(N, generator=g).to(DEVICE)
    # fp32 adapters, products in the activation dtype: the QLoRA recipe (autocast) and its tiles
    A = (torch.randn(r, K, generator=g) * 0.1).to(DEVICE)
    B = torch.zeros(N, r, device=DEVICE)

    target = _launch.launch_target(torch.device(DEVICE))
    small = configs.select(kind, 16, N, K, target).block_m
    big_bm = configs.select(kind, 4 * max(N, K), N, K, target).block_m
    big = -(-max(N, K) // big_bm) * big_bm + big_bm // 3 + 1    # every row once, and a partial last tile
    calls = [torch.arange(c, c + small, device=DEVICE) for c in range(0, max(N, K), small)]
    calls.append(torch.arange(big, device=DEVICE))
    for rows in calls:
        ks, ns = perm_k[rows % K], perm_n[rows % N]
        x = _one_hot(rows, ks, K, dtype, DEVICE).requires_grad_()
        dy = _one_hot(rows, ns, N, dtype, DEVICE)
        y = fastlora.lora_linear(x, packed, A, B, 2.0, quant_state=qs, lora_dtype=dtype, strategy="fused")
        y.backward(dy)
        what = f"{quant_type} {'nested' if nested else 'plain'} {dtype} M={len(rows)} rows {int(rows[0])}.."
        _assert_same_bits(f"Y = onehot·Wᵀ, {what}", y, W[:, ks].t())
        _assert_same_bits(f"dX = onehot·W, {what}", x.grad, W[ns])


# ------------------------------------------------------------------------------------------------
# Llama-3-8B's down_proj at 16k tokens: numerics and peak memory
# ------------------------------------------------------------------------------------------------

LARGE = dict(M=16384, K=14336, N=4096, r=16, p=0.05)
# What a training step of the fused op may allocate besides Y and dX, both M-sized outputs the caller
# keeps: H and G ([M, r] bf16, 0.5 MiB each at M = 16384), dA and dB (fp32, 0.9 and 0.25 MiB), split-K's
# fp32 partials (at most 32 splits of the largest adapter product, [r, K]: 28 MiB) and its counters
# (16 KiB): about 31 MiB at most. 64 MiB holds them with room to spare and is less than a bf16 copy
# of this W (112 MiB), the dropout mask as bytes (224 MiB) or an fp32 copy of X (896 MiB): a call that
# materialized any of them would fail the test.
LARGE_OVERHEAD = 64 << 20


class _Mask(torch.nn.Module):
    """Stands in for PEFT's dropout module: drops what fastlora's kernels drop (for the same seed)."""

    def __init__(self, keep, p):
        super().__init__()
        self.keep, self.p = keep, p

    def forward(self, x):
        return ref.dropout(x, self.keep, self.p)


def test_down_proj_at_16k_tokens():
    """One patched down_proj (K = 14336, N = 4096, NF4 double quant, r = 16, dropout 0.05, bf16 autocast)
    at M = 16,384 tokens, forward + backward:

    - peak memory (``max_memory_allocated`` after ``reset_peak_memory_stats``, above what was allocated
      before the call) at most Y + dX + ``LARGE_OVERHEAD``, plus one bf16 copy of W where the static
      rule picks the dequantize-then-cuBLAS strategy at this M;
    - Y, dX, dA, dB within the tolerance rule (2x the error of PEFT's own layer, i.e. bitsandbytes'
      dequantize-then-matmul, against fp64 on the same weight and mask, + 1e-3·max|exact|)."""
    _gpu_with_bf16()
    import bitsandbytes.functional as bnbF

    M, K, N, r, p = (LARGE[k] for k in ("M", "K", "N", "r", "p"))
    layer = _lora_layer(N, K, r=r, dropout=p)
    report = fastlora.patch(layer)
    dev = layer.base_layer.weight.device
    x = torch.randn(4, M // 4, K, device=dev, dtype=BF16)
    dy = torch.randn(4, M // 4, N, device=dev, dtype=BF16) * 0.1
    A, B = _adapters(layer)
    _step(layer, x, dy)                    # compiles, plans, split-K counters: before the measured call
    strategy = fastlora.choose_strategy(M, dev)   # what "auto" runs (the suite: FASTLORA_TUNE=0)
    budget = (M * N + M * K) * 2 + LARGE_OVERHEAD + (N * K * 2 if strategy == "dequant" else 0)

    torch.manual_seed(11)
    seed = ops.draw_seed(dev)              # the seed the layer's call draws next from this RNG state
    xg = x.detach().clone().requires_grad_()
    A.grad = B.grad = None
    torch.manual_seed(11)
    torch.cuda.synchronize()
    lm.release_partials()                  # the split-K partials buffer counts in the measured call
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    with torch.autocast("cuda", dtype=BF16):
        y = layer(xg)
    y.backward(dy)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    assert report.fused_calls == 2 and not report.fallback_calls, (report.fused_calls, report.fallback_calls)
    assert peak <= budget, (f"peak {peak / 2**20:.1f} MiB above the inputs, budget {budget / 2**20:.1f} MiB "
                            f"(Y + dX + {LARGE_OVERHEAD >> 20} MiB, strategy {strategy})")
    got = (y.detach(), xg.grad, A.grad.clone(), B.grad.clone())
    del y, xg

    keep = dropout_keep_mask(M, K, p, seed, dev).reshape(x.shape)
    fastlora.unpatch(layer)
    saved = layer.lora_dropout["default"]
    layer.lora_dropout["default"] = _Mask(keep, p)
    try:
        peft = _step(layer, x, dy)           # bitsandbytes dequantizes W, then torch.matmul; PEFT's adapters
    finally:
        layer.lora_dropout["default"] = saved
    w = bnbF.dequantize_4bit(layer.base_layer.weight.data, layer.base_layer.weight.quant_state).double()
    s = float(layer.scaling["default"])
    A64, B64 = A.detach().double(), B.detach().double()
    exact = (ref.lora_linear(x.double(), w, A64, B64, s, None, keep, p),
             *ref.lora_linear_backward(dy.double(), x.double(), w, A64, B64, s, keep, p))
    for name, mine, theirs, ex in zip(("Y", "dX", "dA", "dB"), got, peft, exact):
        assert mine.dtype == theirs.dtype, (name, mine.dtype, theirs.dtype)
        assert_within_rule(f"{name} at M={M}", mine, ex, theirs, atol=1e-3)
    del got, peft, exact, keep, w
    torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------
# 4-bit tensors (and X) not 16-byte aligned
# ------------------------------------------------------------------------------------------------


MISALIGNED_N, MISALIGNED_K = 1024, 2048


@pytest.mark.parametrize("strategy,nested,M,x_too", [
    ("fused", True, 16, False), ("fused", False, 16, False), ("fused", False, 300, False),
    ("fused", True, 300, True), ("dequant", True, 300, False)])
def test_misaligned_packed_views_give_the_aligned_results(strategy, nested, M, x_too):
    """Triton specializes a launch on the 16-byte alignment of every pointer (and vectorizes the loads
    of an aligned one). The 4-bit weight's tensors as views 2 bytes (the packed bytes, uint8 absmax
    codes) or 4 bytes (fp32 tables and absmax) past a 16-byte boundary, and (x_too) X 2 bytes past
    one, compile the unaligned kernels: forward + backward with dropout must give the bits of the
    same weight copied to aligned memory, and the dequant kernel bitsandbytes' own bits."""
    _gpu_with_bf16()
    import bitsandbytes.functional as bnbF

    N, K, r = MISALIGNED_N, MISALIGNED_K, 16
    base = _lora_layer(N, K, r=r, nested=nested).base_layer
    q = from_bnb(base.weight, base.weight.quant_state)
    moved = {"packed": 2, "code": 4, "absmax": 2 if nested else 4}
    if nested:
        moved.update(absmax2=4, code2=4, offset=4)
    aligned = dataclasses.replace(q, **{k: _at(getattr(q, k), 0) for k in moved})
    odd = dataclasses.replace(q, **{k: _at(getattr(q, k), off) for k, off in moved.items()})
    assert all(t.data_ptr() % 16 for t in kernel_args(odd))
    assert not any(t.data_ptr() % 16 for t in kernel_args(aligned))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(M, K, generator=g).to(device=DEVICE, dtype=BF16)
    dy = torch.randn(M, N, generator=g).to(device=DEVICE, dtype=BF16)
    A0 = (torch.randn(r, K, generator=g) * K ** -0.5).to(DEVICE)
    B0 = (torch.randn(N, r, generator=g) * 0.1).to(DEVICE)

    def run(w, xin):
        xg = xin.detach().requires_grad_() if xin.data_ptr() % 16 else xin.detach().clone().requires_grad_()
        A, B = A0.clone().requires_grad_(), B0.clone().requires_grad_()
        y = fastlora.lora_linear(xg, w, A, B, 2.0, dropout_p=0.1, seed=99, lora_dtype=BF16, strategy=strategy)
        y.backward(dy)
        assert (xg.data_ptr() % 16 == 2) == (xin is not x)
        return y.detach(), xg.grad, A.grad, B.grad

    want = run(aligned, x)
    got = run(odd, _at(x, 2) if x_too else x)
    for name, a, b in zip(("Y", "dX", "dA", "dB"), got, want):
        _assert_same_bits(f"{name}, misaligned vs aligned ({strategy}, M={M})", a, b)
    if strategy == "dequant":
        _assert_same_bits("dequant of the misaligned weight vs bitsandbytes",
                          dequantize_4bit(odd, BF16), bnbF.dequantize_4bit(base.weight.data, base.weight.quant_state))


# ------------------------------------------------------------------------------------------------
# two GPUs: the launch follows the tensors, not the current device
# ------------------------------------------------------------------------------------------------


TWO_GPU_N, TWO_GPU_K = 2048, 4096
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")


def _direct_step(layer, x, dy, strategy):
    """(Y, dX, dA, dB) of ``fastlora.lora_linear`` on the layer's own tensors with ``strategy``; the
    dropout seed drawn from x's device's generator, as the patched layer draws it."""
    A, B = _adapters(layer)
    A.grad = B.grad = None
    w = layer.base_layer.weight
    xg = x.detach().clone().requires_grad_()
    y = fastlora.lora_linear(xg, w, A, B, float(layer.scaling["default"]), quant_state=w.quant_state,
                             dropout_p=layer.lora_dropout["default"].p, lora_dtype=BF16, strategy=strategy)
    y.backward(dy)
    return y.detach(), xg.grad, A.grad.clone(), B.grad.clone()


@two_gpus
@pytest.mark.parametrize("M,strategy", [(16, "patched"), (1024, "patched"), (1024, "dequant")])
def test_layer_on_the_second_gpu(M, strategy):
    """A layer on cuda:1, called (twice: the first call compiles and plans through Triton's JIT, the
    second launches the kept kernels) while cuda:0 is the current device: no error, the outputs and
    gradients live on cuda:1, cuda:0 stays current, and the bits are those of the same layer on cuda:0
    (dropout on: each device's generator seeded alike draws the same mask). "patched": the patched
    PEFT layer (the fused strategy at these M); "dequant": ``lora_linear(strategy="dequant")`` on the
    layer's tensors (fastlora's dequant kernel, cuBLAS, the LoRA epilogue)."""
    _gpu_with_bf16()
    N, K = TWO_GPU_N, TWO_GPU_K
    on0 = _lora_layer(N, K, dropout=0.1, device="cuda:0")
    on1 = _lora_layer(N, K, dropout=0.1, device="cuda:1")
    rep0, rep1 = fastlora.patch(on0), fastlora.patch(on1)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(M, K, generator=g).to(BF16)
    dy = torch.randn(M, N, generator=g).to(BF16)

    def call(layer, dev):
        if strategy == "patched":
            return _step(layer, x.to(dev), dy.to(dev))
        return _direct_step(layer, x.to(dev), dy.to(dev), strategy)

    with torch.cuda.device(0):
        torch.manual_seed(5)
        want = call(on0, "cuda:0")
        for n in range(2):
            torch.manual_seed(5)
            got = call(on1, "cuda:1")
            assert torch.cuda.current_device() == 0
            torch.cuda.synchronize(1)
            for name, a, b in zip(("Y", "dX", "dA", "dB"), got, want):
                assert a.device == torch.device("cuda", 1), (name, a.device)
                _assert_same_bits(f"{name} on cuda:1 (call {n + 1}) vs cuda:0", a.cpu(), b.cpu())
    if strategy == "patched":
        assert rep0.fused_calls == 1 and rep1.fused_calls == 2, (rep0.fused_calls, rep1.fused_calls)
        assert not rep1.fallback_calls, rep1.fallback_calls


@two_gpus
def test_dequant_and_mask_on_the_second_gpu():
    """The two kernels launched outside a layer call, on cuda:1 while cuda:0 is current: the dequant of a
    weight on cuda:1 equals bitsandbytes' own there; the keep-mask drawn on cuda:1 equals cuda:0's."""
    import bitsandbytes.functional as bnbF

    base = _lora_layer(TWO_GPU_N, TWO_GPU_K, device="cuda:1").base_layer
    with torch.cuda.device(0):
        for _ in range(2):
            w = fastlora.dequantize(base)
            assert w.device == torch.device("cuda", 1) and torch.cuda.current_device() == 0
            with torch.cuda.device(1):
                want = bnbF.dequantize_4bit(base.weight.data, base.weight.quant_state)
            _assert_same_bits("dequant on cuda:1 vs bitsandbytes", w, want)
            for M, K, p in MASK_SHAPES:
                _assert_same_bits(f"mask {M}x{K} on cuda:1 vs cuda:0", dropout_keep_mask(M, K, p, 7, "cuda:1").cpu(),
                                  dropout_keep_mask(M, K, p, 7, "cuda:0").cpu())
