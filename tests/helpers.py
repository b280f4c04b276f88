"""Shared test utilities: the device, the tolerance rule, small builders.

Tolerance rule (flash-attention's): the kernel's error against an fp32/fp64 reference must be at most
twice the error of plain PyTorch computing the same thing in the same low precision, plus a small
atol. A failure prints where the worst element is and by how much.
"""

from __future__ import annotations

import torch

from fastlora.reference import tolerance_rule

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"


def assert_within_rule(name, out, ref_exact, ref_lowp, atol=1e-5, factor=2.0):
    """|out - exact|_max <= factor * |lowp - exact|_max + atol * max(1, |exact|_max)
    (``fastlora.reference.tolerance_rule``)."""
    out = out.detach().double()
    exact = ref_exact.detach().double()
    lowp = ref_lowp.detach().double()
    assert out.shape == exact.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(exact.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values in the kernel output"
    worst, bound, idx = tolerance_rule(out, exact, lowp, atol=atol, factor=factor)
    if worst > bound:
        err_lowp = (lowp - exact).abs().max().item()
        scale = max(1.0, exact.abs().max().item())
        raise AssertionError(
            f"{name}: max error {worst:.3e} at {idx} (kernel {out[idx].item():.6g}, exact {exact[idx].item():.6g}) "
            f"exceeds {factor}x PyTorch low-precision error {err_lowp:.3e} + atol {atol * scale:.1e}"
        )
    return worst, bound
