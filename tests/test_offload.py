"""Gradient checkpoints offloaded to host memory (``fastlora.patch(model, offload_checkpoints=True)``).

The model is what a QLoRA user trains: a tiny 4-bit Llama (tests/models.py), prepare_model_for_kbit_
training with gradient checkpointing (fp32 residual stream), PEFT LoRA with dropout 0.05, fastlora's
fused op, bf16 autocast on ``DEVICE``. The reference is the same model with HF's own checkpointing
(torch.utils.checkpoint, non-reentrant and reentrant): the loss and every LoRA gradient must be
bit-identical (the same kernels run on the same inputs with the same dropout masks), which a
recompute with other masks fails (checked: ``preserve_rng_state=False`` makes them differ).

Memory: with the host copies sent to the ``meta`` device, the device-resident storages after the
forward are fewer by exactly the decoder layers' inputs than with HF's checkpointing. On a GPU: the
copies are pinned and the step's ``torch.cuda.max_memory_allocated`` drops.
"""

from __future__ import annotations

import functools
import weakref

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.checkpoint import checkpoint

import fastlora
from fastlora import offload

from helpers import DEVICE, ON_GPU
from models import cached_checkpoint, load_llama_4bit, lora_config, random_token_dataset, randomize_lora_B

N_LAYERS = 2


def build(checkpointing=True, dropout=0.05, use_reentrant=False, attn=None, **config):
    from peft import get_peft_model, prepare_model_for_kbit_training

    model = load_llama_4bit(cached_checkpoint(**config), device=DEVICE, attn_implementation=attn)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing,
                                            gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    model.config.use_cache = False
    torch.manual_seed(0)  # LoRA A
    model = get_peft_model(model, lora_config(lora_dropout=dropout))
    randomize_lora_B(model)
    model.train()
    return model


def layers(model):
    return list(model.get_base_model().model.layers)


def step(model, batch=2, seq=16):
    """One forward (bf16 autocast) + backward from a fixed RNG state: (loss, {name: grad})."""
    ids = torch.randint(3, 128, (batch, seq), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    torch.manual_seed(123)  # the dropout seeds
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def assert_identical(name, got, ref, n_layers=N_LAYERS):
    loss, grads = got
    ref_loss, ref_grads = ref
    assert torch.equal(loss, ref_loss), f"{name}: loss {loss.item()!r} vs HF checkpointing {ref_loss.item()!r}"
    assert grads.keys() == ref_grads.keys() and len(grads) == 2 * 7 * n_layers
    for k in grads:
        d = (grads[k] - ref_grads[k]).abs().max().item()
        assert torch.equal(grads[k], ref_grads[k]), f"{name}: {k} differs from HF checkpointing by up to {d:.3e}"


@pytest.fixture(scope="module")
def hf_reference():
    """fastlora-patched, HF's checkpointing: the step per use_reentrant."""
    out = {}
    for reentrant in (False, True):
        model = build(use_reentrant=reentrant)
        fastlora.patch(model)
        out[reentrant] = step(model)
    return out


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_bit_identical_to_hf_checkpointing_with_dropout(hf_reference, use_reentrant):
    model = build(use_reentrant=use_reentrant)
    report = fastlora.patch(model, offload_checkpoints=True)
    assert report.offload.startswith(f"{N_LAYERS} of {N_LAYERS} decoder layers now"), report.summary()
    assert "checkpoints offloaded to host memory" in report.summary()
    for layer in layers(model):
        fn = layer._gradient_checkpointing_func
        assert isinstance(fn, offload.OffloadedCheckpointFunction)
        assert fn.previous.func is checkpoint and fn.previous.keywords["use_reentrant"] is use_reentrant
    got = step(model)
    assert offload.stats(model)["calls"] == N_LAYERS and not offload.stats(model)["fallback"]
    assert len(report.patched) == 14 and not report.fallback_calls, report.summary()
    assert_identical(f"use_reentrant={use_reentrant}", got, hf_reference[use_reentrant])


def test_recompute_with_other_dropout_masks_differs(hf_reference):
    """The control for the test above: the offloaded checkpoint honours preserve_rng_state=False of
    the function it replaces (as HF's would), and then the recompute draws other masks."""
    model = build()
    fastlora.patch(model, offload_checkpoints=True)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False,
                                                                       "preserve_rng_state": False})
    loss, grads = step(model)
    ref_loss, ref_grads = hf_reference[False]
    assert offload.stats(model)["calls"] == N_LAYERS
    assert torch.equal(loss, ref_loss)           # the forward is the same
    assert any(not torch.equal(grads[k], ref_grads[k]) for k in grads), "other masks gave the same gradients"


# ------------------------------------------------------------------------------------------------
# it stays installed
# ------------------------------------------------------------------------------------------------


def test_survives_later_gradient_checkpointing_enable():
    model = build()
    fastlora.patch(model, offload_checkpoints=True)
    # through the PeftModel (attribute lookups reach the transformers model), both entry points
    entry_points = [(model.gradient_checkpointing_enable, {"gradient_checkpointing_kwargs": {"use_reentrant": True}})]
    if hasattr(model.get_base_model(), "activation_checkpointing_enable"):     # transformers >= 5.18 or so
        entry_points.append((model.activation_checkpointing_enable, {}))
    for enable, kwargs in entry_points:
        enable(**kwargs)
        for layer in layers(model):
            fn = layer._gradient_checkpointing_func
            assert isinstance(fn, offload.OffloadedCheckpointFunction), enable
            assert not isinstance(fn.previous, offload.OffloadedCheckpointFunction)   # not stacked
            assert fn.previous.keywords["use_reentrant"] is bool(kwargs), fn.previous.keywords
            assert layer.gradient_checkpointing
    step(model)
    assert offload.stats(model)["calls"] == N_LAYERS
    model.gradient_checkpointing_disable()
    assert not any(layer.gradient_checkpointing for layer in layers(model))
    step(model)
    assert offload.stats(model)["calls"] == N_LAYERS   # checkpointing off: nothing to offload


def _train(model, out_dir, steps=2):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(out_dir), max_steps=steps, per_device_train_batch_size=4, learning_rate=5e-3,
        lr_scheduler_type="constant", optim="adamw_torch", gradient_checkpointing=True, bf16=True,
        use_cpu=not ON_GPU, logging_steps=1, save_strategy="no", report_to=[], seed=0, data_seed=0,
        dataloader_num_workers=0, disable_tqdm=True, remove_unused_columns=False)
    data = random_token_dataset(n=8, seq_len=16, vocab_size=19, seed=0)
    collate = lambda rows: {k: torch.stack([r[k] for r in rows]) for k in rows[0]}  # noqa: E731
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collate)
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_trainer_enables_checkpointing_after_patch(tmp_path):
    """Patched while checkpointing is off; Trainer(gradient_checkpointing=True) enables it at train
    start, and the layers run the offloaded checkpoint: the same losses as HF's checkpointing."""
    losses = {}
    for offloaded in (False, True):
        model = build(checkpointing=False)
        report = fastlora.patch(model, offload_checkpoints=offloaded)
        if offloaded:
            assert report.offload.startswith(f"0 of {N_LAYERS} decoder layers now (checkpointing is off)")
            assert not any("_gradient_checkpointing_func" in layer.__dict__ for layer in layers(model))
        losses[offloaded] = _train(model, tmp_path / str(offloaded))
        assert len(losses[offloaded]) == 2
    assert offload.stats(model) == {"calls": 2 * N_LAYERS, "fallback": {}}, offload.stats(model)
    assert losses[True] == losses[False], losses


# ------------------------------------------------------------------------------------------------
# memory
# ------------------------------------------------------------------------------------------------


class DeviceBytes(TorchDispatchMode):
    """Live bytes of the storages ops return under it, on devices other than ``meta``."""

    def __init__(self):
        super().__init__()
        self.live = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                st = t.untyped_storage()
                if id(st) not in self.live:
                    ref = weakref.ref(st, lambda _r, k=id(st), live=self.live: live.pop(k, None))
                    self.live[id(st)] = (ref, st.nbytes())
        return out

    @property
    def total(self):
        return sum(n for r, n in self.live.values() if r() is not None)


def _bytes_after_forward(model, batch, seq):
    ids = torch.randint(3, 128, (batch, seq), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    with DeviceBytes() as tracker, torch.autocast(DEVICE, dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    return tracker.total, loss


def test_layer_inputs_leave_the_device(monkeypatch):
    batch, seq, hidden, n_layers = 2, 48, 64, 3
    model = build(num_hidden_layers=n_layers)
    fastlora.patch(model)
    hf_bytes, hf_loss = _bytes_after_forward(model, batch, seq)
    fastlora.unpatch(model)

    fastlora.patch(model, offload_checkpoints=True)
    monkeypatch.setattr(offload, "host_device", lambda: torch.device("meta"))
    off_bytes, off_loss = _bytes_after_forward(model, batch, seq)
    assert offload.stats(model)["calls"] == n_layers
    # what waits for backward in the graph: each layer's input, on meta
    nodes, seen, todo = [], set(), [off_loss.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == "OffloadedCheckpointBackward":
            nodes.append(node)
        todo += [n for n, _ in node.next_functions]
    assert len(nodes) == n_layers
    kept = [node.stash[0][0] for node in nodes]
    assert sum(h.device.type == "meta" for h in kept) == n_layers - 1, [h.device for h in kept]
    for (host, event, device, requires_grad), in (node.stash for node in nodes):
        assert host.shape == (batch, seq, hidden) and host.dtype == torch.float32
        assert device.type == DEVICE and requires_grad
        assert host.device.type == "meta" or (host.is_leaf and host.device.type == DEVICE)
    # the residual stream is fp32 after prepare_model_for_kbit_training: B × S × H × 4 bytes a layer.
    # The first layer's input is the embedding output, a leaf (enable_input_require_grads) that
    # autograd keeps for its gradient either way: the other layers' inputs leave the device
    inputs = (n_layers - 1) * batch * seq * hidden * 4
    assert hf_bytes - off_bytes == inputs, (
        f"device bytes after forward: HF checkpointing {hf_bytes}, offloaded {off_bytes}: saved "
        f"{hf_bytes - off_bytes}, expected {n_layers - 1} layer inputs = {inputs}")


# ------------------------------------------------------------------------------------------------
# unpatch, arguments, fallbacks
# ------------------------------------------------------------------------------------------------


def _snapshot(model):
    lm = model.get_base_model()
    return ({name: set(m.__dict__) for name, m in lm.named_modules()},
            {name: m.__dict__.get("_gradient_checkpointing_func") for name, m in lm.named_modules()},
            {k: v.clone() for k, v in model.state_dict().items()})


def test_unpatch_restores_everything():
    model = build()
    keys, funcs, state = _snapshot(model)
    report = fastlora.patch(model, offload_checkpoints=True)
    assert report.offload and "_set_gradient_checkpointing" in model.get_base_model().__dict__
    step(model)
    fastlora.unpatch(model)
    keys2, funcs2, state2 = _snapshot(model)
    assert keys2 == keys
    assert all(funcs2[n] is funcs[n] for n in funcs), [n for n in funcs if funcs2[n] is not funcs[n]]
    assert state2.keys() == state.keys() and all(torch.equal(state2[k], state[k]) for k in state)
    # a later enable no longer installs it; the layers run HF's checkpoint
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert not any(isinstance(l._gradient_checkpointing_func, offload.OffloadedCheckpointFunction)
                   for l in layers(model))
    assert offload.stats(model)["calls"] == 0

    # enabled again between patch and unpatch: unpatch leaves the newest HF function
    fastlora.patch(model, offload_checkpoints=True)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    newest = [l._gradient_checkpointing_func.previous for l in layers(model)]
    fastlora.unpatch(model)
    assert [l._gradient_checkpointing_func for l in layers(model)] == newest
    assert set(model.get_base_model().__dict__) == keys[""]


def test_bad_arguments_and_unsupported_models():
    model = build(checkpointing=False)
    for bad in ("yes", 1, None):
        with pytest.raises(TypeError, match="offload_checkpoints must be True or False"):
            fastlora.patch(model, offload_checkpoints=bad)
    assert not any(fastlora.patcher.is_patched(m) for m in model.modules())   # nothing changed
    assert "_fastlora_offload" not in model.get_base_model().__dict__

    from peft import LoraConfig, get_peft_model

    toy = get_peft_model(nn.Sequential(nn.Linear(8, 8)), LoraConfig(target_modules=["0"], r=2))
    report = fastlora.patch(toy.to(DEVICE), offload_checkpoints=True)
    assert report.offload is None and "not a transformers PreTrainedModel" in report.offload_skipped
    assert "checkpoints not offloaded" in report.summary()


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.drop = nn.Dropout(0.5)
        self.b = nn.Linear(16, 8)

    def forward(self, x, scale=None):
        y = self.b(self.drop(torch.relu(self.a(x))))
        if scale is not None:
            y = y * scale
        return y, None, "tag", y.sum()


def _grads(block, x, scale, fn):
    for p in block.parameters():
        p.grad = None
    x = x.detach().clone().requires_grad_(x.requires_grad)
    torch.manual_seed(7)
    y, none, tag, total = fn(functools.partial(block.forward, scale=scale), x)
    assert none is None and tag == "tag"
    (y.square().sum() + total).backward()
    leaf = scale if scale is not None and scale.is_leaf else None
    return [x.grad] + [p.grad for p in block.parameters()] + [getattr(leaf, "grad", None)]


@pytest.mark.parametrize("case", ["offloaded", "captured_grad", "no_grad_input"])
def test_function_level_tuple_outputs_and_fallbacks(case):
    """Tuple outputs with non-tensor entries; a captured tensor that requires grad or no input that
    requires grad run the replaced checkpoint (counted), with the same gradients as it gives."""
    torch.manual_seed(0)
    block = _Block().to(DEVICE).train()
    x = torch.randn(4, 8, device=DEVICE, requires_grad=case != "no_grad_input")
    scale = None
    if case == "captured_grad":
        scale = torch.full((8,), 1.5, device=DEVICE, requires_grad=True)
    counts = {"calls": 0, "fallback": __import__("collections").Counter()}
    previous = functools.partial(checkpoint, use_reentrant=False)
    ours = offload.OffloadedCheckpointFunction(previous, counts)
    got = _grads(block, x, scale, ours)
    ref = _grads(block, x, scale, previous)
    for i, (g, r) in enumerate(zip(got, ref)):
        assert (g is None) == (r is None) and (g is None or torch.equal(g, r)), f"{case}: gradient {i} differs"
    if case == "offloaded":
        assert counts == {"calls": 1, "fallback": {}}
    else:
        assert counts["calls"] == 0 and counts["fallback"] == {case: 1}


# ------------------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not ON_GPU, reason="pinned host copies and max_memory_allocated need CUDA")
def test_gpu_pinned_copies_and_lower_peak():
    n_layers = 12
    config = dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=n_layers, num_attention_heads=8,
                  num_key_value_heads=4, max_position_embeddings=4096)
    batch, seq = 1, 2048
    results = {}
    # eager attention where the results are compared bit for bit (at 2048 tokens SDPA's fused attention
    # backward may accumulate dQ over key blocks with atomics, an order that changes from run to run;
    # at the other tests' 16 tokens there is one block); SDPA where the peak is compared: eager's
    # [heads, 2048, 2048] score and probability tensors in each layer's backward outweigh the layer
    # inputs the offload moves (on the H200 the peak then fell by 7 MB of the 44 MB moved)
    for attn, offloaded in (("eager", False), ("eager", True), ("sdpa", False), ("sdpa", True)):
        model = build(attn=attn, **config)
        fastlora.patch(model, offload_checkpoints=offloaded)
        for i in range(2):            # the second step is measured (caches warm)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            results[attn, offloaded] = step(model, batch=batch, seq=seq)
            torch.cuda.synchronize()
        results[attn, offloaded] += (torch.cuda.max_memory_allocated(),)
        if offloaded and attn == "eager":
            assert offload.stats(model)["calls"] == 2 * n_layers
            ids = torch.randint(3, 128, (batch, seq), device="cuda")
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            node = loss.grad_fn
            # a node reached along two paths is one node; the visited nodes stay referenced, so no id
            # is reused by another node's Python object while the walk runs
            stack, found, seen = [node], [], {}
            while stack:
                n = stack.pop()
                if n is None or id(n) in seen:
                    continue
                seen[id(n)] = n
                if type(n).__name__ == "OffloadedCheckpointBackward":
                    found.append(n)
                stack += [m for m, _ in n.next_functions]
            kept = [n.stash[0][0] for n in found]
            assert len(kept) == n_layers
            # every layer's input but the first (the embedding output, a leaf autograd keeps) is pinned
            assert sum(h.device.type == "cpu" and h.is_pinned() for h in kept) == n_layers - 1, kept
            del loss, found, node, stack
        del model
        torch.cuda.empty_cache()
    one = batch * seq * config["hidden_size"] * 4
    assert_identical("gpu", results["eager", True][:2], results["eager", False][:2], n_layers)
    drop = results["sdpa", False][2] - results["sdpa", True][2]
    # the n - 1 inputs leave the device; the recompute holds its output and incoming gradient at once,
    # as on fake tensors (test_bench_memory: exactly n - 4 inputs lower at n = 6)
    assert drop >= (n_layers - 5) * one, (
        f"peak {results['sdpa', False][2]} -> {results['sdpa', True][2]}: dropped {drop}, one layer input {one}")
