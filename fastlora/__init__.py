"""fastlora: fused Triton kernels for LoRA / QLoRA fine-tuning with PEFT + bitsandbytes."""

import os as _os
import sys as _sys


def _map_checkout_kernels():
    """Installed, ``fastlora.kernels`` is the top-level ``kernels/`` folder (pyproject's package-dir).
    Run from a checkout with only the repository root on PYTHONPATH, nothing maps it: then register
    that folder as ``fastlora.kernels`` (and nothing else), so ``import fastlora`` works either way."""
    import importlib.util

    name = __name__ + ".kernels"
    folder = _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))), "kernels")
    if name in _sys.modules or not _os.path.isfile(_os.path.join(folder, "_interpreter.py")):
        return
    if importlib.util.find_spec(name) is not None:  # the installed mapping
        return
    spec = importlib.util.spec_from_file_location(name, _os.path.join(folder, "__init__.py"),
                                                  submodule_search_locations=[folder])
    module = importlib.util.module_from_spec(spec)
    _sys.modules[name] = module
    spec.loader.exec_module(module)


_map_checkout_kernels()

from .format import dequantize
from .ops import choose_strategy, lora_linear
from .patcher import FALLBACK_REASONS, SKIP_REASONS, PatchReport, patch, unpatch

__version__ = "0.1.0"
__all__ = ["dequantize", "lora_linear", "choose_strategy", "patch", "unpatch", "PatchReport",
           "SKIP_REASONS", "FALLBACK_REASONS"]
