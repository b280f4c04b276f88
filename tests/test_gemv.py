"""The GEMV path of the frozen 4-bit product (``lora_matmul._lora_matmul_gemv_kernel``): a tile of fewer
than 16 rows, the decoded W multiplied on the FMA units. Under the interpreter the table never picks
it (its tiles are 16 rows and up), so each case names a GEMV tile with ``configs.override``; on a GPU
the same cases run compiled, and the table's own pick at M <= 8 is checked too."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import DEVICE, ON_GPU, assert_within_rule
from test_lora_linear import _case, _quantize

from fastlora import reference as ref
from fastlora.format import from_bnb
from fastlora.kernels import configs, lora_matmul as lm
from fastlora.kernels.configs import TileConfig


def _gemv_plans() -> int:
    return sum(1 for p in lm._PLANS.values() if p.gemv)


@pytest.fixture(autouse=True)
def _fresh_plans():
    lm._PLANS.clear()      # each case resolves its own plans, so the count below is this case's
    yield


# (block_m, block_j, block_i, warps, stages, split): one tile per output block, and split-K
GEMV_TILES = [TileConfig(8, 32, 64, 4, 2, 1), TileConfig(8, 16, 64, 4, 3, 4)]


@pytest.mark.parametrize("tile", GEMV_TILES, ids=["nosplit", "split4"])
@pytest.mark.parametrize("trans", [False, True], ids=["XWt", "dYW"])
@pytest.mark.parametrize("M", [1, 3, 8])
@pytest.mark.parametrize("nested", [True, False], ids=["nested", "plain"])
@pytest.mark.parametrize("N,K,blocksize", [(80, 128, 64), (48, 256, 32), (24, 256, 128)])
def test_gemv_frozen_product(N, K, blocksize, nested, M, trans, tile):
    """X·Wᵀ and dY·W alone on the GEMV kernel, against the reference dequant within the rule; the
    plan it ran is a GEMV one."""
    xdtype = torch.bfloat16
    packed, qs = _quantize(N, K, xdtype, "nf4" if nested else "fp4", nested, blocksize)
    q = from_bnb(packed, qs)
    w_lowp = ref.dequantize_4bit(q, xdtype)
    I, J = (N, K) if trans else (K, N)
    torch.manual_seed(M * 7 + N)
    a = torch.randn(M, I, device=DEVICE).to(xdtype)
    out = torch.empty(M, J, device=DEVICE, dtype=xdtype)
    with configs.override("frozen4", tile):
        lm.lora_matmul(a, q, out, trans_w=trans, compute_dtype=xdtype)
    assert _gemv_plans() == 1
    t = w_lowp if trans else w_lowp.t()
    assert_within_rule("GEMV " + ("dY·W" if trans else "X·Wᵀ"), out, a.double() @ t.double(), a @ t)


@pytest.mark.parametrize("tile", GEMV_TILES, ids=["nosplit", "split4"])
@pytest.mark.parametrize("M", [1, 5])
@pytest.mark.parametrize("xdtype,adtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.float16),
                                           (torch.float32, torch.float32)], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_gemv_layer_every_gradient(M, xdtype, adtype, p, tile):
    """The whole layer (forward and backward: Y and dX on the GEMV, with bias, the LoRA epilogue,
    dropout's mask on dX's term, fp16's separate rounding) against the reference, every gradient."""
    K, N = (1024, 1536) if ON_GPU else (128, 80)
    with configs.override("frozen4", tile), configs.override("frozen4_lora32", tile):
        _case(M, K, N, 8, xdtype=xdtype, adtype=adtype, p=p, strategy="fused")
    assert _gemv_plans() == 2                       # Y and dX


@pytest.mark.skipif(not ON_GPU, reason="the tables apply to GPU targets (the interpreter's tiles are 16 rows)")
@pytest.mark.parametrize("M", [1, 2, 9])
def test_gemv_is_the_tables_pick_for_one_token_forward(M, monkeypatch):
    """On a GPU (no measured choices) the family table runs X·Wᵀ at M = 1 on the GEMV, and dY·W and
    every other M on the tensor cores; the layer's output and every gradient are right either way
    (Llama's 4096-wide rows, 1024 outputs)."""
    monkeypatch.setattr(configs, "_TUNED", {})
    _case(M, 4096, 1024, 16, p=0.05, strategy="fused")
    assert _gemv_plans() == (1 if M == 1 else 0)


def test_table_row_gemv_for_forward_only():
    """The GEMV row is X·Wᵀ's at M = 1 in every family but sm_75; dY·W at M = 1 gets the next row."""
    from fastlora.kernels.targets import get_target

    for arch in ("sm_80", "sm_86", "sm_89", "sm_90", "sm_100", "sm_120"):
        t = get_target(arch)
        for kind in configs.GEMV_KINDS:
            fwd = configs.select(kind, 1, 4096, 4096, t, trans_w=False)
            bwd = configs.select(kind, 1, 4096, 4096, t, trans_w=True)
            assert lm.is_gemv(kind, fwd) and not lm.is_gemv(kind, bwd), (arch, kind, fwd, bwd)
            assert not lm.is_gemv(kind, configs.select(kind, 2, 4096, 4096, t, trans_w=False)), (arch, kind)
    t = get_target("sm_75")
    assert not lm.is_gemv("frozen4", configs.select("frozen4", 1, 4096, 4096, t, trans_w=False))


def test_gemv_tile_narrows_to_m():
    """A GEMV row is narrowed to M's power of two (never below 1), a tensor-core row never below 16."""
    with configs.override("frozen4", TileConfig(8, 64, 64, 4, 2, 8)):
        assert configs.select("frozen4", 3, 4096, 4096, None).block_m == 4
        assert configs.select("frozen4", 1, 4096, 4096, None).block_m == 1
    with configs.override("frozen4", TileConfig(16, 64, 64, 4, 2, 8)):
        assert configs.select("frozen4", 3, 4096, 4096, None).block_m == 16
    assert lm.is_gemv("frozen4", TileConfig(4, 64, 64, 4, 2)) and not lm.is_gemv("lora16", TileConfig(4, 64, 64, 4, 2))
