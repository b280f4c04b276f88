"""One rank of the distributed tests (launched by tests/test_distributed.py under torchrun, gloo, CPU
or one GPU per rank). Not a test module itself.

    python -m torch.distributed.run --nproc_per_node=2 tests/distributed_worker.py MODE CHECKPOINT OUT_DIR

MODE "ddp": a patched 4-bit tiny Llama (fp32 compute, so only summation order separates the runs)
computes the LoRA gradients of the full batch on every rank without DDP, then through
DistributedDataParallel on its half of the batch; both are written to OUT_DIR/rank{r}.pt with the
report's counts.
MODE "fsdp2": the FSDP-QLoRA layout (4-bit storage in the compute dtype) under FSDP2 ``fully_shard``:
the LoRA leaves of decoder layer 0 are units of their own (their weights are still shards when the
LoRA layer's forward runs: fastlora must fall back), every decoder layer and the root are units
(inside a unit's forward its weights are whole: fastlora runs fused). The full-batch gradients
without FSDP, then FSDP's (averaged over the ranks' halves, gathered with ``full_tensor``) are written.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fastlora  # noqa: E402
from models import DEVICE, bnb_4bit_config, lora_config, randomize_lora_B  # noqa: E402

BATCH, SEQ = 8, 12


def load(path, device, quant_storage=torch.uint8):
    from peft import get_peft_model
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(
        path, quantization_config=bnb_4bit_config(compute_dtype=torch.float32, quant_storage=quant_storage),
        dtype=torch.float32,
        device_map={"": device})
    model.config.use_cache = False
    torch.manual_seed(0)
    pm = get_peft_model(model, lora_config())
    randomize_lora_B(pm, seed=1)
    return pm.train()


def lora_grads(pm):
    grads = {}
    for n, p in pm.named_parameters():
        if p.requires_grad and p.grad is not None:
            g = p.grad.detach()
            grads[n.replace("_fsdp_wrapped_module.", "")] = (g.full_tensor() if hasattr(g, "full_tensor") else g).clone()
    return grads


def main():
    mode, path, out_dir = sys.argv[1:4]
    dist.init_process_group("nccl" if DEVICE == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = f"cuda:{rank}" if DEVICE == "cuda" else "cpu"
    if DEVICE == "cuda":
        torch.cuda.set_device(rank)
    pm = load(path, device, quant_storage=torch.float32 if mode == "fsdp2" else torch.uint8)
    report = fastlora.patch(pm)
    ids = torch.randint(3, 128, (BATCH, SEQ), generator=torch.Generator().manual_seed(2)).to(device)
    half = ids.chunk(world)[rank]
    result = {"patched": len(report.patched)}
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        pm(input_ids=ids, labels=ids).loss.backward()   # the full batch on one process
        result["full"] = lora_grads(pm)
        pm.zero_grad(set_to_none=True)
        calls = report.fused_calls
        ddp = DDP(pm)
        ddp(input_ids=half, labels=half).loss.backward()  # DDP averages the halves' gradients
        result["ddp"] = lora_grads(pm)
        result["ddp_fused_calls"] = report.fused_calls - calls
    elif mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        pm(input_ids=ids, labels=ids).loss.backward()   # the full batch on one process, no FSDP
        result["full"] = lora_grads(pm)
        pm.zero_grad(set_to_none=True)
        calls = report.fused_calls
        layers = pm.base_model.model.model.layers
        for name, module in layers[0].named_modules():
            if name.endswith(("lora_A.default", "lora_B.default")):
                fully_shard(module)
        for layer in layers:
            fully_shard(layer)
        fully_shard(pm)
        pm(input_ids=half, labels=half).loss.backward()
        result["fsdp"] = lora_grads(pm)
        result["fsdp_fused_calls"] = report.fused_calls - calls
    else:
        raise ValueError(f"unknown mode {mode!r}")
    result["fused_calls"] = report.fused_calls
    result["fallback_calls"] = dict(report.fallback_calls)
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
