"""The nibble-table decode of the 4-bit weight (``quant4.decode_nibbles``): the code values read one
per nibble from a table that puts each on its own shared-memory bank (no bank conflicts) instead of
the pair table. It must give the same weights, so every product is bit-identical to the pair
table's; checked on the tensor-core kernel and on the GEMV kernel, both directions, under the
interpreter here and compiled on a GPU."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from helpers import DEVICE, ON_GPU
from test_lora_linear import _case, _quantize

from fastlora.format import from_bnb
from fastlora.kernels import configs, lora_matmul as lm
from fastlora.kernels.configs import TileConfig


@pytest.fixture(autouse=True)
def _fresh_plans():
    lm._PLANS.clear()
    yield
    lm._PLANS.clear()


def _nibble_plans() -> int:
    return sum(1 for p in lm._PLANS.values() if p.consts.get("FAST_4BIT") == 2)


TILES = [TileConfig(16, 32, 64, 4, 1, 1), TileConfig(16, 16, 64, 4, 2, 4), TileConfig(8, 32, 64, 4, 2, 2)]


@pytest.mark.parametrize("tile", TILES, ids=["mma", "mma-split4", "gemv-split2"])
@pytest.mark.parametrize("trans", [False, True], ids=["XWt", "dYW"])
@pytest.mark.parametrize("quant,nested,blocksize", [("nf4", True, 64), ("fp4", False, 32), ("nf4", False, 128)])
def test_nibble_table_products_equal_pair_table_bit_for_bit(tile, trans, quant, nested, blocksize):
    N, K, M = (1024, 2048, 37) if ON_GPU else (80, 256, 5)
    if tile.block_m < configs.MMA_MIN_ROWS:
        M = min(M, tile.block_m)
    packed, qs = _quantize(N, K, torch.bfloat16, quant, nested, blocksize)
    q = from_bnb(packed, qs)
    I, J = (N, K) if trans else (K, N)
    torch.manual_seed(N + M)
    a = torch.randn(M, I, device=DEVICE).to(torch.bfloat16)
    outs = []
    for nibbles in (False, True):
        out = torch.empty(M, J, device=DEVICE, dtype=torch.bfloat16)
        with configs.override("frozen4", replace(tile, nibbles=nibbles)):
            lm.lora_matmul(a, q, out, trans_w=trans, compute_dtype=torch.bfloat16)
        outs.append(out)
    assert _nibble_plans() == 1                      # the second call ran the nibble table
    assert torch.equal(outs[0], outs[1])
    assert outs[0].abs().sum() > 0


@pytest.mark.parametrize("tile", [TILES[0], TILES[2]], ids=["mma", "gemv"])
@pytest.mark.parametrize("xdtype,adtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.float16)],
                         ids=["bf16", "fp16"])
def test_nibble_table_layer_every_gradient(tile, xdtype, adtype):
    """The whole layer on the nibble table (Y and dX, LoRA epilogue, dropout) against the reference,
    every gradient."""
    K, N = (1024, 1536) if ON_GPU else (128, 80)
    M = 1 if tile.block_m < configs.MMA_MIN_ROWS else 19
    t = replace(tile, nibbles=True)
    with configs.override("frozen4", t), configs.override("frozen4_lora32", t):
        _case(M, K, N, 8, xdtype=xdtype, adtype=adtype, p=0.1, strategy="fused")
    assert _nibble_plans() == 2                      # Y and dX


def test_tuner_offers_the_other_table():
    from fastlora import tuning
    from fastlora.kernels.targets import get_target

    cands = tuning.candidates("frozen4", 16, 4096, 4096, get_target("sm_90"), max_alternatives=4)
    tiles = [c.tile for c in cands if c.strategy == "fused"]
    assert any(t.nibbles for t in tiles) and any(not t.nibbles for t in tiles)
    cands = tuning.candidates("dense", 16, 4096, 4096, get_target("sm_90"), max_alternatives=8)
    assert not any(c.tile.nibbles for c in cands if c.strategy == "fused")
    assert tuning.tile_tuple(TileConfig(16, 128, 128, 4, 1, 32, True))[-1] is True
    # a cache entry names the decode; one written before the flag existed (six ints) is the pair table
    e = {"strategy": "fused", "fused_tile": [16, 128, 128, 4, 1, 32]}
    assert tuning._valid_entry(e) and tuning._valid_entry({**e, "fused_tile": e["fused_tile"] + [True]})
    assert not tuning._valid_entry({**e, "fused_tile": e["fused_tile"] + [2]})
    assert not tuning._valid_entry({**e, "fused_tile": [True] + e["fused_tile"][1:]})
    assert TileConfig(*e["fused_tile"]).nibbles is False
