"""Tiny models built the way a user builds a real one, for tests and benchmarks.

Nothing is downloaded: a Llama is made from a ``LlamaConfig`` with random weights, saved with
``save_pretrained`` and loaded back through ``from_pretrained`` — in 4-bit via ``BitsAndBytesConfig``
(NF4, double quant, bf16 compute: the QLoRA recipe) or dense. Benchmarks pass real shapes
(``hidden_size=4096, ...``) through the same builders.

    tiny_llama_config(**overrides)      the config (hidden 64, 2 layers, vocab 128 by default)
    save_llama(path, config, seed)      random-weight checkpoint on disk
    load_llama_4bit(path, ...)          what a QLoRA user loads
    load_llama_dense(path, dtype)       what a LoRA user loads
    lora_config(**overrides)            r=16, alpha=32, the seven Llama projections
    random_token_dataset(...)           a list of {"input_ids", "attention_mask", "labels"} dicts

Models are loaded onto ``DEVICE`` by default: the GPU when there is one (bitsandbytes quantizes on
the GPU, the kernels run compiled), else the CPU (the kernels run in Triton's interpreter). Random
values (checkpoint weights, LoRA B, tokens) are always drawn on the CPU, so a seed gives the same
model and data on either machine.
"""

from __future__ import annotations

import os
import tempfile
from typing import Optional

import torch

# the same rule as helpers.DEVICE; not imported from there because benchmarks/bench_train.py loads
# this file by path, without tests/ on sys.path
ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    cfg = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    cfg.update(overrides)
    return LlamaConfig(**cfg)


def save_llama(path: Optional[str] = None, config=None, seed: int = 0, dtype=torch.bfloat16) -> str:
    """Save a random-weight Llama (seeded) as a checkpoint directory; returns its path."""
    from transformers import LlamaForCausalLM

    if path is None:
        path = tempfile.mkdtemp(prefix="fastlora_llama_")
    config = config or tiny_llama_config()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(path)
    return path


def bnb_4bit_config(quant_type: str = "nf4", double_quant: bool = True, compute_dtype=torch.bfloat16,
                    quant_storage=torch.uint8):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=quant_storage,  # FSDP-QLoRA stores the 4-bit bytes in the compute dtype
    )


def _device_map_target(device: str):
    """What goes into ``device_map={"": ...}``: a bare "cuda" becomes the current GPU's index, the form
    transformers and accelerate document for a 4-bit model (accelerate's Trainer check compares the
    model's device with the training device by index)."""
    if str(device) == "cuda":
        return torch.cuda.current_device()
    return str(device)


def load_llama_4bit(path: str, device: Optional[str] = None, attn_implementation: Optional[str] = None,
                    **bnb_kwargs):
    """Load a checkpoint the way a QLoRA user does (NF4 + double quant + bf16 compute by default),
    onto ``device`` (default ``DEVICE``); bitsandbytes quantizes the weights there while loading.
    ``attn_implementation``: transformers' choice where None (SDPA)."""
    from transformers import LlamaForCausalLM

    device = DEVICE if device is None else device
    extra = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    return LlamaForCausalLM.from_pretrained(
        path, quantization_config=bnb_4bit_config(**bnb_kwargs), device_map={"": _device_map_target(device)},
        dtype=torch.bfloat16, **extra,
    )


def load_llama_dense(path: str, dtype=torch.bfloat16, device: Optional[str] = None):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path, dtype=dtype).to(DEVICE if device is None else device)


def lora_config(**overrides):
    from peft import LoraConfig

    cfg = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=list(PROJECTIONS), task_type="CAUSAL_LM")
    cfg.update(overrides)
    return LoraConfig(**cfg)


def randomize_lora_B(model, seed: int = 0, std: float = 0.02):
    """PEFT initializes B = 0, which makes the LoRA term vanish; give it values so tests see it.
    The values are drawn on the CPU (the same on every machine) and copied to B's device."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_((torch.randn(p.shape, generator=g) * std).to(device=p.device, dtype=p.dtype))
    return model


def random_token_dataset(n: int = 32, seq_len: int = 16, vocab_size: int = 128, seed: int = 0):
    """n sequences of random tokens (ids 3.. vocab-1, so no pad/bos/eos), labels = inputs."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (n, seq_len), generator=g)
    return [
        {"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row.clone()} for row in ids
    ]


def cached_checkpoint(name: str = "tiny", seed: int = 0, **config_overrides) -> str:
    """A checkpoint directory reused across one process (saving is cheap, but not free)."""
    key = (name, seed, tuple(sorted(config_overrides.items())))
    path = _CACHE.get(key)
    if path is None or not os.path.isdir(path):
        path = save_llama(config=tiny_llama_config(**config_overrides), seed=seed)
        _CACHE[key] = path
    return path


_CACHE: dict = {}
