"""fastlora: fused Triton kernels for LoRA / QLoRA fine-tuning with PEFT + bitsandbytes."""

import os as _os


def _map_checkout_kernels():
    """Installed, ``fastlora.kernels`` is the top-level ``kernels/`` folder (pyproject's package-dir).
    Run from a checkout with only the repository root on PYTHONPATH, nothing maps it: then look for
    ``fastlora.kernels`` in the repository root too, so ``import fastlora`` works either way."""
    root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    here = _os.path.dirname(_os.path.abspath(__file__))
    if not _os.path.isdir(_os.path.join(here, "kernels")) and _os.path.isfile(
        _os.path.join(root, "kernels", "_interpreter.py")
    ):
        try:
            import importlib.util

            if importlib.util.find_spec(__name__ + ".kernels") is not None:
                return
        except ModuleNotFoundError:
            pass
        __path__.append(_os.path.join(root, "kernels", _os.pardir))


_map_checkout_kernels()

from .format import dequantize
from .ops import choose_strategy, lora_linear
from .patch import patch, unpatch

__version__ = "0.1.0"
__all__ = ["dequantize", "lora_linear", "choose_strategy", "patch", "unpatch"]
