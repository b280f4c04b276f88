"""Make Triton's CPU interpreter give the GPU's bf16 numerics.

Under ``TRITON_INTERPRET=1`` Triton runs kernels as numpy, and it stores bf16 as raw ``uint16``.
Three things then differ from a GPU (checked with triton 3.9):

1. ``tl.dot`` on bf16 tiles multiplies the raw ``uint16`` bit patterns: the result is garbage
   (relative error ~1e10). A GPU multiplies the bf16 values exactly and accumulates in fp32.
2. fp32 -> bf16 casts truncate (``cast_impl`` passes no rounding mode), and the interpreter's own
   "rtne" path rounds half up without handling the carry into the exponent. A GPU, PyTorch and
   bitsandbytes round to nearest, ties to even.
3. bf16 -> fp32 casts get subnormal bf16 values wrong (0x0001 -> 0.0, 0x007F -> 1.1571e-38 instead
   of 1.1663e-38), and a bf16 -> fp64 / integer cast converts the raw ``uint16`` bit pattern. On a GPU
   widening bf16 is exact: the 16 bits become the top half of an fp32.

This module is the one place that corrects all three, by replacing the interpreter builder's
``create_dot``, ``cast_impl`` and ``create_fp_to_fp``. The kernels themselves stay written for the
GPU. :func:`ensure` is idempotent, called by every launcher, and does nothing unless the
interpreter is on, so compiled runs never touch Triton's internals.
"""

from __future__ import annotations

import os

import numpy as np

_PATCHED = False
_LAUNCH: list = []   # the _launch module (which imports this one), once a meta device is asked about


def interpreter_active() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def can_run_on(device) -> bool:
    """Whether fastlora's Triton kernels can run on tensors of ``device``: a CUDA GPU, or the CPU
    under the interpreter."""
    kind = device.type if hasattr(device, "type") else str(device).split(":")[0]
    if kind == "meta":   # meta tensors run only with launches recorded or stubbed (no data)
        if not _LAUNCH:  # imported at the first meta call (an import statement costs µs per call)
            from . import _launch
            _LAUNCH.append(_launch)
        return _LAUNCH[0].stub_active() or _LAUNCH[0].recording_active()
    return kind == "cuda" or (kind == "cpu" and interpreter_active())


def require_runnable(device, what: str) -> None:
    """Raise a RuntimeError naming ``what`` when the kernels cannot run on ``device``."""
    if not can_run_on(device):
        raise RuntimeError(
            f"fastlora's Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 to run on the CPU; "
            f"{what} is on {device}"
        )


def _f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """fp32 array -> bf16 bit patterns (uint16), round to nearest, ties to even; NaN stays NaN."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    lsb = (u >> np.uint32(16)) & np.uint32(1)
    rounded = ((u + np.uint32(0x7FFF) + lsb) >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(x)
    if np.any(nan):
        # keep sign, force a quiet-NaN mantissa (the add above could have carried into the sign)
        rounded = np.where(nan, ((u >> np.uint32(16)) | np.uint32(0x0040)).astype(np.uint16), rounded)
    return rounded.reshape(np.shape(x))


def _bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """bf16 bit patterns (uint16) -> fp32 values, exact."""
    return (np.ascontiguousarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def ensure() -> None:
    """Install the corrections into Triton's interpreter if it is active. Idempotent."""
    global _PATCHED
    if _PATCHED or not interpreter_active():
        return
    import triton.language as tl
    from triton.runtime import interpreter as interp

    builder = getattr(interp, "InterpreterBuilder", None)
    handle = getattr(interp, "TensorHandle", None)
    missing = [name for name in ("create_dot", "cast_impl", "create_fp_to_fp") if not hasattr(builder, name)]
    if builder is None or handle is None or missing:
        import triton

        raise RuntimeError(
            f"fastlora cannot correct the bf16 numerics of Triton {triton.__version__}'s interpreter: "
            f"InterpreterBuilder lacks {missing or 'itself'}. Run the tests with a supported triton "
            "(>=3.6,<3.10) or on a GPU."
        )

    orig_dot = builder.create_dot
    orig_cast = builder.cast_impl
    orig_fp_to_fp = builder.create_fp_to_fp

    def _as_f32(h):
        if h.dtype.scalar == tl.bfloat16:
            return handle(_bf16_bits_to_f32(h.data), tl.float32)
        return h

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        # bf16 x bf16 -> fp32: the products of bf16 values are exact in fp32, as on the tensor cores.
        if a.dtype.scalar == tl.bfloat16 or b.dtype.scalar == tl.bfloat16:
            a, b = _as_f32(a), _as_f32(b)
            if d.dtype.scalar == tl.bfloat16:
                d = _as_f32(d)
        return orig_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    def _to_bf16(self, src):
        # any non-bf16 source (float or integer) -> fp32 by the interpreter, then one RTNE rounding.
        # fp64 sources are rounded twice (to fp32, then to bf16); no fastlora kernel casts fp64.
        f32 = src.data if src.dtype.scalar == tl.float32 else orig_cast(self, src, tl.float32).data
        return handle(_f32_to_bf16_bits(f32), tl.bfloat16)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.bfloat16 and dst_type.scalar != tl.bfloat16:
            f32 = _as_f32(src)                                  # exact widening, subnormals kept
            return f32 if dst_type.scalar == tl.float32 else orig_cast(self, f32, dst_type)
        if dst_type.scalar == tl.bfloat16 and src.dtype.scalar != tl.bfloat16:
            return _to_bf16(self, src)
        return orig_cast(self, src, dst_type)

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        if src.dtype.scalar == tl.bfloat16 and dst_type.scalar != tl.bfloat16:
            f32 = _as_f32(src)
            return f32 if dst_type.scalar == tl.float32 else orig_fp_to_fp(self, f32, dst_type, rounding_mode)
        if dst_type.scalar == tl.bfloat16 and src.dtype.scalar != tl.bfloat16:
            return _to_bf16(self, src)
        return orig_fp_to_fp(self, src, dst_type, rounding_mode)

    builder.create_dot = create_dot
    builder.cast_impl = cast_impl
    builder.create_fp_to_fp = create_fp_to_fp

    # 4. (not a bf16 matter) a loop bound computed in the kernel (split-K's range per program) is a
    # one-element array there; Triton 3.6's interpreter converts it with int(array), which NumPy 2
    # refuses for arrays of one dimension (3.9 squeezes first). Every kernel call re-patches the
    # tensor class, so the squeezing conversion is set after Triton's own.
    patch_tensor = getattr(interp, "_patch_lang_tensor", None)
    if patch_tensor is not None and not getattr(patch_tensor, "_fastlora", False):
        def _patch_lang_tensor(tensor, scope):
            patch_tensor(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

        _patch_lang_tensor._fastlora = True
        interp._patch_lang_tensor = _patch_lang_tensor
    # the lambdas that alias cast_impl (create_fp_trunc, create_fp_ext, ...) look it up on self,
    # so they pick up the corrected version too.
    _PATCHED = True
