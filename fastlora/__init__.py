"""fastlora: fused Triton kernels for LoRA / QLoRA fine-tuning with PEFT + bitsandbytes."""

from .format import dequantize
from .ops import choose_strategy, lora_linear

__version__ = "0.1.0"
__all__ = ["dequantize", "lora_linear", "choose_strategy"]
