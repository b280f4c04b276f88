"""Multi-process training of a patched model: 2 processes under torchrun (gloo on the CPU, NCCL on a
machine with 2 GPUs), the worker in tests/distributed_worker.py.

DDP: the LoRA gradients of 2 processes on half a batch each, averaged by DistributedDataParallel,
equal the gradients of one process on the whole batch. The model computes in fp32 (4-bit weights,
fp32 compute dtype, fp32 activations), so the two differ only by summation order: bound
GRAD_RTOL = 1e-4 of the largest gradient. A lost half or a sum instead of a mean is a 50% or 100% error.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

from models import PROJECTIONS, cached_checkpoint

HERE = os.path.dirname(os.path.abspath(__file__))
WORLD = 2
N_LORA_LAYERS = 2 * len(PROJECTIONS)
GRAD_RTOL = 1e-4

if torch.cuda.is_available() and torch.cuda.device_count() < WORLD:
    pytest.skip(f"needs {WORLD} GPUs on a GPU machine", allow_module_level=True)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(mode, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD}", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
           os.path.join(HERE, "distributed_worker.py"), mode, cached_checkpoint(), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"torchrun {mode} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return [torch.load(os.path.join(tmp_path, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]


def test_ddp_two_halves_equal_one_full_batch(tmp_path):
    results = _torchrun("ddp", tmp_path)
    for rank, res in enumerate(results):
        assert res["patched"] == N_LORA_LAYERS
        assert res["ddp_fused_calls"] == N_LORA_LAYERS and not res["fallback_calls"], (
            rank, res["ddp_fused_calls"], res["fallback_calls"])
        full, ddp = res["full"], res["ddp"]
        assert sorted(full) == sorted(ddp) and len(full) == 2 * N_LORA_LAYERS
        scale = max(g.abs().max().item() for g in full.values())
        for name in sorted(full):
            gap = (ddp[name] - full[name]).abs().max().item()
            assert gap <= GRAD_RTOL * scale, (
                f"rank {rank} {name}: DDP gradient differs from the full-batch one by {gap:.3e} "
                f"(largest gradient {scale:.3e})")
    # both ranks hold the same averaged gradients
    for name in results[0]["ddp"]:
        assert torch.equal(results[0]["ddp"][name], results[1]["ddp"][name]), name


def test_fsdp2_fused_where_whole_fallback_where_sharded(tmp_path):
    """FSDP2 ``fully_shard`` (gloo on the CPU works with torch 2.13), FSDP-QLoRA layout: 4-bit bytes
    stored as fp32. Decoder layer 0's LoRA leaves are units of their own, so when its LoRA layers run,
    A and B are still shards: those 7 calls fall back ("sharded"); decoder layer 1's weights are whole
    inside its unit's forward: those 7 calls run fused. FSDP's gradients (the mean over the ranks'
    halves) equal the full-batch gradients without FSDP."""
    results = _torchrun("fsdp2", tmp_path)
    per_layer = len(PROJECTIONS)
    for rank, res in enumerate(results):
        assert res["patched"] == N_LORA_LAYERS
        assert res["fsdp_fused_calls"] == per_layer, (rank, res["fsdp_fused_calls"])
        assert res["fallback_calls"] == {"sharded": per_layer}, (rank, res["fallback_calls"])
        full, fsdp = res["full"], res["fsdp"]
        assert sorted(full) == sorted(fsdp) and len(full) == 2 * N_LORA_LAYERS
        scale = max(g.abs().max().item() for g in full.values())
        for name in sorted(full):
            gap = (fsdp[name] - full[name]).abs().max().item()
            assert gap <= GRAD_RTOL * scale, (
                f"rank {rank} {name}: FSDP2 gradient differs from the full-batch one by {gap:.3e} "
                f"(largest gradient {scale:.3e})")
