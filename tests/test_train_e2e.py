"""End to end: a tiny Llama trained with HF Trainer + PEFT LoRA, patched by fastlora vs not.

The QLoRA recipe as a user runs it: save a random-weight Llama, load it 4-bit (NF4, double quant,
bf16 compute) onto ``DEVICE``, prepare_model_for_kbit_training, get_peft_model (r=16, alpha=32, the
seven projections), Trainer with bf16 mixed precision, 10 steps on random tokens. The same for a
dense bf16 model. On a GPU machine the model lives on the GPU (bitsandbytes quantizes there), the
Trainer trains there (TrainingArguments(bf16=True, use_cpu=False): CUDA autocast) and the kernels
run compiled; without a GPU everything is on the CPU (bf16=True, use_cpu=True: CPU autocast) and the
kernels run under TRITON_INTERPRET=1. Every patched run asserts that all 14 LoRA layers ran the
fused op, on either machine.

Data: random tokens drawn from 16 of the 128 ids, so there is something to learn quickly (the loss
falls from ~ln 128 toward ln 16) and "both learn" is a real check.

Tolerance, per-step training loss with dropout 0: LOSS_ATOL = 2e-3. The patched and the unpatched
model compute the same math and differ only in rounding: the fused op rounds each layer's Y once,
PEFT rounds the bf16 base product and then the sum; the LoRA terms are fp32 in both. Such
differences move the loss by a fraction of one bf16 ulp of the loss (the loss is ~4.6, whose bf16
ulp is 2⁻⁵ = 0.031): 2e-3 is 1/16 of that ulp. Measured on this model (CPU, interpreter): largest
gap 3e-4 (4-bit) and 7e-4 (dense) over the 10 steps, while the loss moves by ~0.07 per step, so a
lost gradient, a missing adapter term or dropout applied in the wrong mode, which bend the
trajectory by whole steps, cannot pass. On a GPU the same math runs in the same dtypes (bf16
products with fp32 accumulation in cuBLAS / bitsandbytes' CUDA dequantize + F.linear, fp32 LoRA
terms in the fused op), so the gaps are of the same size and the same bounds apply.

Runs are cached per (kind, dropout, patched) within the module: the checkpointing and generate
tests reuse the 10-step runs (constant learning rate: the first steps of a 10-step run are a
shorter run's steps), which keeps the file near 3 minutes on a 2-core CPU.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import fastlora
from fastlora.patcher import is_patched

from helpers import DEVICE, ON_GPU
from models import PROJECTIONS, cached_checkpoint, load_llama_4bit, load_llama_dense, lora_config, random_token_dataset

STEPS = 10
LR = 5e-3
N_LORA_LAYERS = 2 * len(PROJECTIONS)
# per-step |loss_patched - loss_peft| with dropout 0 (see the module docstring)
LOSS_ATOL = 2e-3
# with dropout 0.05 the masks differ (fastlora's counter RNG vs torch's); the runs are two samples of
# the same noisy process: the final losses must agree within this fraction of the total decrease.
# Measured: final gap 0.003 (4-bit) and 0.003 (dense) for a decrease of 0.37. The mask semantics
# themselves (keep-prob, 1/(1-p), training mode only) are checked exactly in test_patch.py.
DROPOUT_FINAL_RTOL = 0.25


def _trainer_args(out_dir, steps):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(out_dir), max_steps=steps, per_device_train_batch_size=4, learning_rate=LR,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, optim="adamw_torch",
        # bf16 mixed precision on the device the model is on: CUDA autocast on a GPU, CPU autocast without
        bf16=True, use_cpu=not ON_GPU, logging_steps=1, save_strategy="no", report_to=[], seed=0,
        data_seed=0, dataloader_num_workers=0, disable_tqdm=True, remove_unused_columns=False,
    )


def _collate(rows):
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def build(kind, dropout=0.0, gradient_checkpointing=None):
    """A PEFT LoRA model ready for the Trainer. gradient_checkpointing: None, "reentrant", "non_reentrant"."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    path = cached_checkpoint()
    torch.manual_seed(0)
    gc_kwargs = {"use_reentrant": gradient_checkpointing == "reentrant"}
    if kind == "4bit":
        model = load_llama_4bit(path, device=DEVICE)  # bitsandbytes quantizes on DEVICE
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing is not None,
            gradient_checkpointing_kwargs=gc_kwargs)
    else:
        model = load_llama_dense(path, dtype=torch.bfloat16, device=DEVICE)
        if gradient_checkpointing is not None:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
            model.enable_input_require_grads()
    model.config.use_cache = False
    torch.manual_seed(0)  # the LoRA A init
    model = get_peft_model(model, lora_config(lora_dropout=dropout))
    # everything on DEVICE: on a GPU machine a CPU tensor would send the patched layers to PEFT's forward
    devices = {p.device.type for p in model.parameters()}
    assert devices == {DEVICE}, f"{kind} model parameters on {devices}, expected {DEVICE}"
    return model


def train(model, out_dir, steps=STEPS):
    from transformers import Trainer

    data = random_token_dataset(n=16, seq_len=16, vocab_size=19, seed=0)  # ids 3..18
    trainer = Trainer(model=model, args=_trainer_args(out_dir, steps), train_dataset=data, data_collator=_collate)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == steps, trainer.state.log_history
    return losses


def assert_all_fused(report, steps, per_step_calls=1):
    assert len(report.patched) == N_LORA_LAYERS and not report.skipped, report.summary()
    assert sorted({n.rsplit(".", 1)[-1] for n in report.patched}) == sorted(PROJECTIONS)
    assert not report.fallback_calls, dict(report.fallback_calls)
    assert report.fused_calls == N_LORA_LAYERS * steps * per_step_calls, (report.fused_calls, steps)


_RUNS: dict = {}


def run(kind, dropout, patched, tmp_root):
    """10 Trainer steps; cached per (kind, dropout, patched). Returns (losses, report, model)."""
    key = (kind, dropout, patched)
    if key not in _RUNS:
        model = build(kind, dropout=dropout)
        report = fastlora.patch(model) if patched else None
        losses = train(model, tmp_root / f"{kind}-{dropout}-{patched}")
        if patched:
            assert_all_fused(report, STEPS)
        _RUNS[key] = (losses, report, model)
    return _RUNS[key]


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory):
    return tmp_path_factory.mktemp("e2e")


def _gaps(a, b):
    return [abs(x - y) for x, y in zip(a, b)]


@pytest.mark.parametrize("kind", ["4bit", "dense"])
def test_losses_track_peft_dropout0(kind, tmp_root):
    ref_losses, _, _ = run(kind, 0.0, False, tmp_root)
    losses, report, _ = run(kind, 0.0, True, tmp_root)
    gaps = _gaps(losses, ref_losses)
    worst = max(range(STEPS), key=lambda i: gaps[i])
    assert gaps[worst] <= LOSS_ATOL, (
        f"{kind}: step {worst} loss {losses[worst]:.5f} vs PEFT {ref_losses[worst]:.5f} "
        f"(gap {gaps[worst]:.2e} > {LOSS_ATOL}); all gaps {[f'{g:.1e}' for g in gaps]}")
    assert ref_losses[-1] < ref_losses[0] - 0.2, f"the reference did not learn: {ref_losses}"


@pytest.mark.parametrize("kind", ["4bit", "dense"])
def test_both_learn_with_dropout(kind, tmp_root):
    ref_losses, _, _ = run(kind, 0.05, False, tmp_root)
    losses, report, _ = run(kind, 0.05, True, tmp_root)
    for name, ls in (("PEFT", ref_losses), ("fastlora", losses)):
        assert ls[-1] < ls[0] - 0.2, f"{kind} {name} did not learn with dropout 0.05: {ls}"
    drop = ref_losses[0] - ref_losses[-1]
    assert abs(losses[-1] - ref_losses[-1]) <= DROPOUT_FINAL_RTOL * drop, (
        f"{kind}: final loss {losses[-1]:.4f} vs PEFT {ref_losses[-1]:.4f}, more than "
        f"{DROPOUT_FINAL_RTOL} of PEFT's decrease {drop:.4f}")
    # the masks were applied: the dropout run is not the dropout-0 run
    no_drop = run(kind, 0.0, True, tmp_root)[0]
    assert losses != no_drop, "dropout 0.05 gave exactly the dropout-0 trajectory"


@pytest.mark.parametrize("mode", ["reentrant", "non_reentrant"])
def test_gradient_checkpointing_reproduces_dropout_mask(mode, tmp_root):
    """With activation checkpointing the recomputed forward must draw the same dropout mask: the
    patched run with checkpointing gives the same losses as the patched run without (4-bit, p=0.05)."""
    steps = 3
    plain_losses = run("4bit", 0.05, True, tmp_root)[0][:steps]
    model = build("4bit", dropout=0.05, gradient_checkpointing=mode)
    assert model.base_model.model.is_gradient_checkpointing
    report = fastlora.patch(model)
    losses = train(model, tmp_root / f"ckpt-{mode}", steps)
    # each layer runs twice per step: the forward, and the recomputation inside backward
    assert_all_fused(report, steps, per_step_calls=2)
    gaps = _gaps(losses, plain_losses)
    # the same kernels on the same inputs, so the same losses on the CPU and on a GPU alike (the fused
    # op, cuBLAS and the attention backward at 16 tokens have no run-to-run nondeterminism). A wrong
    # recomputed mask (measured on the CPU with preserve_rng_state=False) moves the losses of steps 1
    # and 2 by 7e-3 and 1e-2
    assert max(gaps) <= 1e-6, f"{mode}: checkpointed losses {losses} vs without checkpointing {plain_losses}"


def test_eval_generate_merge_and_unload(tmp_root):
    _, report, model = run("4bit", 0.0, True, tmp_root)  # trained 10 steps, patched
    model.eval()
    prompt = torch.randint(3, 19, (2, 5), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    with torch.no_grad():
        before = report.fused_calls
        seq = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4,
                             do_sample=False, use_cache=True, pad_token_id=0)
        assert seq.shape == (2, 9)
        assert report.fused_calls - before == N_LORA_LAYERS * 4, "generate() did not run the fused op"
        fused_logits = model(input_ids=seq).logits.float()
        with model.disable_adapter():
            base_logits = model(input_ids=seq).logits.float()
        assert report.fallback_calls["adapters_disabled"] == N_LORA_LAYERS
        # PEFT's own forward on the same trained model: the reference
        twin = copy.deepcopy(model)
        fastlora.unpatch(twin)
        peft_logits = twin(input_ids=seq).logits.float()
    gap = (fused_logits - peft_logits).abs().max().item()
    effect = (peft_logits - base_logits).abs().max().item()
    assert effect > 0.05, f"the trained adapter barely changes the logits ({effect}); the check below is empty"
    assert gap <= 0.05 * effect, f"eval logits differ from PEFT's by {gap:.3e} (adapter effect {effect:.3e})"
    # merge_and_unload on the patched model = PEFT's merge (it reads the parameters, not the forward)
    merged = model.merge_and_unload()
    merged_ref = twin.merge_and_unload()
    assert not any(is_patched(m) for m in merged.modules())
    with torch.no_grad():
        a = merged(input_ids=seq).logits
        b = merged_ref(input_ids=seq).logits
    assert torch.equal(a, b), f"merged models differ by {(a - b).abs().max()}"
    assert math.isfinite(a.float().abs().max().item())
    _RUNS.pop(("4bit", 0.0, True))  # merged: no longer the trained PEFT model
