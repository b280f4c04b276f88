"""Split-K's fp32 partials are indexed in 64 bits: slice s of a product with M·J outputs starts at
s·M·J, past 2³¹ once M·J ≥ 2³¹ / splits (Llama's down_proj backward at 16k tokens with 32 splits).

The test runs the real kernel in the interpreter at M·J = 2²⁶ with 33 splits, so the last slice
starts at 32·2²⁶ = 2³¹ elements. Only the first output tile is computed (the grid is cut to it: the
offsets of every slice are exercised all the same), and the partials buffer (8.25 GiB) is allocated
but only that tile's rows of each slice are touched. It runs in a child process: a 32-bit offset there
wraps to 8 GiB before the buffer, an address that may not be mapped at all.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

M, J, SPLITS, BLOCK = 4096, 16384, 33, 16
I = SPLITS * BLOCK            # one BLOCK_I step per split

CHILD = textwrap.dedent(f"""
    import torch
    from fastlora.kernels import _launch, configs, lora_matmul

    M, J, I, SPLITS, BLOCK = {M}, {J}, {I}, {SPLITS}, {BLOCK}
    assert (SPLITS - 1) * M * J >= 2**31          # the last slice starts past int32

    class FirstTile(_launch.Prepared):            # the grid cut to the first output tile
        def __init__(self, kernel, grid, kwargs, device_index=None):
            assert grid[1] == SPLITS, grid
            super().__init__(kernel, (1, grid[1]), kwargs, device_index)

    _launch.Prepared = FirstTile
    configs.splits = lambda cfg, *a, **k: cfg.split   # force the split count
    torch.manual_seed(0)
    a = torch.randn(M, I)
    w = torch.randn(J, I)
    out = torch.empty(M, J)
    out[:BLOCK, :BLOCK] = float("nan")
    cfg = configs.TileConfig(BLOCK, BLOCK, BLOCK, 4, 1, SPLITS)
    lora_matmul.lora_matmul(a, w, out, trans_w=False, compute_dtype=torch.float32, config=cfg)
    got = out[:BLOCK, :BLOCK]
    ref = (a[:BLOCK].double() @ w[:BLOCK].double().T).float()
    err = (got - ref).abs().max().item()
    print("max abs error", err)
    assert torch.isfinite(got).all() and err < 1e-3 * ref.abs().max().item(), err
    print("OK")
""")


@pytest.mark.skipif(sys.platform != "linux", reason="relies on Linux's lazy allocation of untouched pages")
def test_splitk_partials_past_int32():
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "OK" in proc.stdout, (
        f"exit {proc.returncode}\nstdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-4000:]}")
