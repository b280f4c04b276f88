"""TRL's SFTTrainer on a patched QLoRA model: the loop many PEFT users run.

The tiny 4-bit Llama of test_train_e2e.py (NF4, double quant, bf16 compute, r = 16, alpha = 32, the
seven projections), with gradient checkpointing (non-reentrant, as TRL enables it), bf16 mixed
precision, 10 SFT steps on a pre-tokenized in-memory dataset (``datasets.Dataset.from_dict``) and a
word-level tokenizer built in memory: nothing is downloaded. Per-step losses of the patched and the
unpatched run must agree within test_train_e2e's LOSS_ATOL (its docstring gives the reasoning and
the measured gaps); every LoRA layer call must have run the fused op (twice per step: the forward and
the checkpointed recomputation).
"""

from __future__ import annotations

import pytest
import torch

import fastlora

from test_train_e2e import LOSS_ATOL, LR, STEPS, assert_all_fused, build

from helpers import ON_GPU

trl = pytest.importorskip("trl")  # part of the test extra; skipped only outside it


def _tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, 128)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="<pad>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def _dataset():
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 19, (16, 16), generator=g)  # 16 of the 128 ids: something to learn quickly
    return Dataset.from_dict({"input_ids": ids.tolist()})


def _sft(model, out_dir):
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(
        output_dir=str(out_dir), max_steps=STEPS, per_device_train_batch_size=4, learning_rate=LR,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, optim="adamw_torch",
        bf16=True, use_cpu=not ON_GPU, logging_steps=1, save_strategy="no", report_to=[], seed=0,
        data_seed=0, dataloader_num_workers=0, disable_tqdm=True,
        gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
        max_length=32, packing=False, dataset_num_proc=None,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=_dataset(), processing_class=_tokenizer())
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == STEPS, trainer.state.log_history
    return losses


def test_sft_trainer_losses_track_peft(tmp_path):
    ref = _sft(build("4bit", gradient_checkpointing="non_reentrant"), tmp_path / "peft")
    model = build("4bit", gradient_checkpointing="non_reentrant")
    report = fastlora.patch(model)
    losses = _sft(model, tmp_path / "fastlora")
    assert_all_fused(report, STEPS, per_step_calls=2)
    gaps = [abs(a - b) for a, b in zip(losses, ref)]
    worst = max(range(STEPS), key=lambda i: gaps[i])
    assert gaps[worst] <= LOSS_ATOL, (
        f"step {worst}: loss {losses[worst]:.5f} vs PEFT {ref[worst]:.5f} (gap {gaps[worst]:.2e} > {LOSS_ATOL}); "
        f"all gaps {[f'{g:.1e}' for g in gaps]}")
    assert ref[-1] < ref[0] - 0.2, f"the reference did not learn: {ref}"
