"""``fastlora.lora_linear``: one PEFT LoRA layer as one autograd op over fused Triton kernels.

    Y = X·Wᵀ + bias + s·(D(X)·Aᵀ)·Bᵀ        W frozen: bitsandbytes 4-bit, or a dense fp16/bf16/fp32 tensor

Two strategies compute the frozen product (``choose_strategy`` picks one per call):

- ``"fused"``: W's 4-bit tiles are decoded inside the GEMM's main loop, forward (X·Wᵀ) and backward
  (dY·W); no [N, K] floating copy of W ever exists. The LoRA term, the bias and (backward) the
  dropout mask are applied in the same kernel's epilogue.
- ``"dequant"``: W is dequantized by fastlora's kernel into a temporary, multiplied with
  cuBLAS (with the bias, as bitsandbytes' own path does), and the temporary is freed at once;
  backward dequantizes again. The LoRA term and the mask are still added by the kernel's epilogue,
  in place on the cuBLAS output.

Launches per call (4-bit, dropout on): products that do not depend on each other share a launch
(``kernels.lora_matmul.launch_together``). Fused: forward H, Y; backward G, dB, dX, dA: 2 + 4.
Dequant: forward H with W's dequantization, cuBLAS, the epilogue; backward G with dB and W's
dequantization, cuBLAS, dA with dX's epilogue: 3 + 3.

The LoRA products (H = D(X)·Aᵀ, G = dY·B, dA, dB) run through the same kernel in ``lora_dtype``, the
dtype PEFT runs its adapters in: under autocast the autocast dtype (bf16/fp16, on the tensor cores,
H and G kept in it as PEFT keeps them), otherwise the adapters' own dtype: fp32 adapters in fp32 with
IEEE precision, as PyTorch's default (no TF32) matmul computes them. dA and dB are accumulated in
fp32 and returned in the adapters' dtype.
"""

from __future__ import annotations

import contextlib
import numbers
from typing import Any, Optional, Tuple

import torch

from .format import from_bnb
from .kernels.lora_matmul import (DROP_AOP, DROP_EPILOGUE, DROP_NONE, DROP_W, SEED_RANGE, launch_together, lora_matmul,
                                  seed_tensor)
from .kernels import configs
from .kernels._launch import launch_target, stub_active
from .kernels.quant4 import Packed4bit

STRATEGIES = ("fused", "dequant")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# The M (tokens) at and above which "dequant" is chosen where no GPU target applies (Triton's CPU
# interpreter); on a GPU the per-family thresholds of ``kernels.configs.DEQUANT_MIN_TOKENS`` apply.
INTERPRETER_DEQUANT_MIN_TOKENS = 1024


def choose_strategy(M: int, device: Optional[torch.device], target=None) -> str:
    """The static rule that picks a strategy for a layer call: "dequant" from the GPU family's token
    count in ``kernels.configs.DEQUANT_MIN_TOKENS`` (set from ``fastlora inspect``'s model; always on
    sm_75, where Triton lowers ``tl.dot`` to FMA instructions), else "fused";
    INTERPRETER_DEQUANT_MIN_TOKENS where no GPU target applies (the interpreter). For a dense base,
    "dequant" means cuBLAS on the weight as it is. ``target`` (a ``kernels.targets.Target``) defaults to the device's.

    On a CUDA device a call with strategy="auto" asks :mod:`fastlora.tuning` first, which measures
    the strategies on the device (``FASTLORA_TUNE``); this rule is its fallback."""
    if target is None and device is not None:
        target = launch_target(device)
    threshold = (INTERPRETER_DEQUANT_MIN_TOKENS if target is None
                 else configs.DEQUANT_MIN_TOKENS[configs.family(target)])
    return "fused" if M < threshold else "dequant"


def _check_target_dtype(device, *dtypes) -> None:
    """bf16 needs compute capability 8.0 (no bf16 tensor cores before Ampere; torch reports
    ``is_bf16_supported() == False`` there and bitsandbytes' bf16 compute is not supported either)."""
    target = launch_target(device)
    if target is not None and not target.has_bf16 and torch.bfloat16 in dtypes:
        raise TypeError(f"bfloat16 is not supported on {target.name} ({target.gpu}): compute capability 8.0 or "
                        "newer is needed for bf16 activations, compute dtype or adapter products (lora_dtype); use float16 "
                        "(fp16=True in the Trainer, bnb_4bit_compute_dtype=float16, fp16 or fp32 adapters)")


#: Triton versions from which ``tl.dot(fp32, fp32, input_precision="ieee")`` stays IEEE fp32 (FMA) on
#: datacenter Blackwell (sm_100). Triton 3.6 and 3.7 compile it there to ``tcgen05.mma ... kind::tf32``:
#: TF32 operands, a 10-bit mantissa, where PEFT's fp32 adapters multiply in fp32. Found by compiling
#: the adapter products for sm_100 under each Triton (tests/test_gpu_targets.py checks it per toolchain).
FP32_DOT_EXACT_FROM = (3, 8)


def _triton_version() -> Tuple[int, int]:
    import triton

    return tuple(int(p) for p in triton.__version__.split(".")[:2])


def fp32_products_exact(target, version: Optional[Tuple[int, int]] = None) -> bool:
    """Whether fp32 adapter products (fp32 adapters without autocast) compute in IEEE fp32 on
    ``target`` with the Triton of ``version`` (default: the installed one). None (the interpreter): yes."""
    if target is None or configs.family(target) != "sm_100":
        return True
    return (version or _triton_version()) >= FP32_DOT_EXACT_FROM


def _check_fp32_products(device, lora_dtype) -> None:
    target = launch_target(device)
    if lora_dtype == torch.float32 and not fp32_products_exact(target):
        import triton

        raise NotImplementedError(
            f"fp32 adapter products on {target.name} ({target.gpu}) with Triton {triton.__version__}: this Triton "
            f"compiles fp32 tl.dot there to TF32 tensor-core instructions, not IEEE fp32. Use Triton >= "
            f"{'.'.join(map(str, FP32_DOT_EXACT_FROM))}, autocast (bf16/fp16 adapter products, as PEFT under autocast), "
            f"or PEFT's own forward (fastlora.patch falls back there by itself, reason 'fp32_products')")


def _round_base(compute_dtype: torch.dtype) -> bool:
    """Whether the frozen product (+ bias) is rounded to ``compute_dtype`` before the LoRA term is
    added. PEFT adds its LoRA term to the base layer's result, and that result is rounded wherever it
    is computed in a 16-bit dtype: bitsandbytes returns X·Wᵀ + bias in its compute dtype, ``nn.Linear``
    in the weight's dtype (an fp16 overflow there is ``inf`` before the LoRA term is added). Only an
    fp32 frozen product reaches PEFT unrounded, and there the fused op keeps it unrounded too."""
    return compute_dtype != torch.float32


def _frozen_product(a, w, out_dtype, *, trans_w, compute_dtype, strategy, bias=None, term_first=False, before=(),
                    beside=None, **epilogue):
    """out = a · (Wᵀ or W) + bias + epilogue (the LoRA term), by the chosen strategy; returns out, a
    new [M, J] tensor in ``out_dtype`` (the dequant strategy's is the one cuBLAS returns).

    The frozen product (+ bias) is rounded to ``compute_dtype`` (see :func:`_round_base`) before the
    LoRA term is added, so both strategies round where PEFT does.

    ``term_first``: PEFT's 4-bit layer casts its LoRA term to the result dtype before adding it, and
    autograd sums the two branches' dX in x's dtype: each term is rounded on its own, then the sum. In
    fp16 that decides where ``inf`` appears (a term alone may overflow while the fp32 sum would not).
    The kernel's epilogue then rounds both to out's dtype before it adds them (``round_term``).

    Launches: ``before`` (at most two products resolved with ``defer=True``, independent of this one)
    go out first, as one launch; the dequant strategy dequantizes W in that same launch. ``beside``
    (a deferred product independent of this one's epilogue) is launched with the dequant strategy's
    epilogue pass, or alone after the fused product.
    """
    round_base = _round_base(compute_dtype)
    first, second = (tuple(before) + (None, None))[:2]
    if strategy == "fused":
        M = a.shape[0]
        J = (w.K if isinstance(w, Packed4bit) else w.shape[1]) if trans_w else \
            (w.N if isinstance(w, Packed4bit) else w.shape[0])
        out = torch.empty((M, J), dtype=out_dtype, device=a.device)
        # each on its own: merged, they would add a compiled kernel per combination for one launch
        # less where the fused strategy is within its launch budget already
        launch_together(first)
        launch_together(second)
        lora_matmul(a, w, out, trans_w=trans_w, compute_dtype=compute_dtype, bias=bias,
                    round_base=round_base, round_term=term_first, **epilogue)
        launch_together(beside)
        return out
    # autocast would re-cast the cuBLAS product; the dtypes here are explicit ("meta": fastlora
    # inspect records the launches of a call on shape-only tensors, which autocast does not know).
    # Switched off only where it is on: the context costs the host a few µs
    dev_type = a.device.type
    no_autocast = (torch.autocast(device_type=dev_type, enabled=False)
                   if dev_type != "meta" and torch.is_autocast_enabled(dev_type) else contextlib.nullcontext())
    with no_autocast:
        if isinstance(w, Packed4bit):
            wd = torch.empty((w.N, w.K), dtype=compute_dtype, device=a.device)
            launch_together(first, second, (w, wd))   # the products before, and W dequantized, in one launch
        else:
            launch_together(first, second)
            wd = w.to(compute_dtype)
        a_c = a.to(compute_dtype)
        wt = wd if trans_w else wd.t()
        # cuBLAS's own output is out (in another dtype: cast, as PEFT's base layer returns it)
        out = torch.addmm(bias.to(compute_dtype), a_c, wt) if bias is not None else torch.mm(a_c, wt)
        if out.dtype != out_dtype:
            out = out.to(out_dtype)
        del wd, wt, a_c  # the [N, K] temporary lives only for this one product
    # the epilogue pass: + the LoRA term on the product cuBLAS left in out, with ``beside``
    epi = lora_matmul(a, w, out, trans_w=trans_w, compute_dtype=compute_dtype, accumulate=True, skip_main=True,
                      round_term=term_first, defer=True, **epilogue)
    if beside is not None:
        # the epilogue pass first: its warps and stages (8 warps, 1 stage) are the launch's; with
        # dA's (4 warps, 3 stages) ptxas kept 8 B on the stack on sm_100
        launch_together(epi, beside)
    else:
        launch_together(epi)
    return out


# ------------------------------------------------------------------------------------------------
# the op, registered with torch.library
#
# torch.compile sees ``fastlora::lora_linear`` (and its backward) as one opaque node with a fake
# (shape-only) implementation; Dynamo never traces into the Triton launches. The schema takes
# tensors, ints, floats, a dtype and a string only, so the 4-bit weight travels as its pieces
# (packed bytes, code, absmax, second-level absmax, its code, offset, N, K, blocksizes) and is put
# back together as a Packed4bit inside. ``code`` is None for a dense weight.
# ------------------------------------------------------------------------------------------------


def weight_args(w) -> tuple:
    """The frozen weight as the op's schema takes it (see :func:`_weight` for the way back)."""
    if isinstance(w, Packed4bit):
        return (w.packed, w.code, w.absmax, w.absmax2, w.code2, w.offset, w.N, w.K, w.blocksize, w.blocksize2)
    return (w, None, None, None, None, None, w.shape[0], w.shape[1], 0, 0)


def _weight(weight, code, absmax, absmax2, code2, offset, N, K, blocksize, blocksize2):
    if code is None:
        return weight
    return Packed4bit(packed=weight, N=N, K=K, blocksize=blocksize, code=code, absmax=absmax,
                      absmax2=absmax2, code2=code2, blocksize2=blocksize2, offset=offset)


# the strategy "auto" calls run inside ``using_strategy`` (None: each call's own choice)
_FORCED_STRATEGY: Optional[str] = None


@contextlib.contextmanager
def using_strategy(strategy: str):
    """Inside, every call whose strategy is "auto" (a patched layer's) runs ``strategy`` ("fused" or
    "dequant"): for benchmarks and debugging (``python -m benchmarks host --strategy``). Both give
    the same results within the project's tolerance; only their speed differs."""
    global _FORCED_STRATEGY
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    prev, _FORCED_STRATEGY = _FORCED_STRATEGY, strategy
    try:
        yield
    finally:
        _FORCED_STRATEGY = prev


def _resolve(strategy, M, N, K, w, device, phase, compute_dtype, dropout, x_dtype, lora_dtype, rank):
    """The strategy a call runs. "auto" on a CUDA device: the pick measured on it (``tuning.pick``:
    one dict lookup once its entry is known; the phase ("forward" / "backward"), the dtypes, the rank
    and whether dropout is on are the call's own, and the entry is measured with them); elsewhere the
    static rule; inside :func:`using_strategy`, the strategy it names."""
    if strategy != "auto":
        return strategy
    if _FORCED_STRATEGY is not None:
        return _FORCED_STRATEGY
    if device.type != "cuda":
        return choose_strategy(M, device)
    global _tuning_pick
    try:
        pick = _tuning_pick
    except NameError:   # bound at the first CUDA call: an import statement here costs ~1 µs per call
        from .tuning import pick
        _tuning_pick = pick
    return pick(M, N, K, w, device, choose_strategy, phase, compute_dtype, dropout, x_dtype, lora_dtype, rank)


def _forward_impl(
    x2: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, weight: torch.Tensor,
    code: Optional[torch.Tensor], absmax: Optional[torch.Tensor], absmax2: Optional[torch.Tensor],
    code2: Optional[torch.Tensor], offset: Optional[torch.Tensor],
    N: int, K: int, blocksize: int, blocksize2: int,
    bias: Optional[torch.Tensor], scaling: float, dropout_p: float, seed: Optional[torch.Tensor],
    compute_dtype: torch.dtype, lora_dtype: torch.dtype, strategy: str,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Forward: returns Y [M, N] in x's dtype and H = D(X)·Aᵀ [M, r] in lora_dtype (kept for backward)."""
    return _forward(x2, lora_A, lora_B, _weight(weight, code, absmax, absmax2, code2, offset, N, K, blocksize,
                                                blocksize2), bias, scaling, dropout_p, seed, compute_dtype,
                    lora_dtype, strategy)


def _forward(x2, lora_A, lora_B, w, bias, scaling, dropout_p, seed, compute_dtype, lora_dtype, strategy):
    """:func:`_forward_impl` with the frozen weight as one object (a Packed4bit or a dense tensor)."""
    M = x2.shape[0]
    N = w.N if isinstance(w, Packed4bit) else w.shape[0]
    K = x2.shape[1]
    r = lora_A.shape[0]
    strategy = _resolve(strategy, M, N, K, w, x2.device, "forward", compute_dtype, dropout_p > 0.0, x2.dtype,
                        lora_dtype, r)
    drop = dropout_p > 0.0
    h = torch.empty((M, r), dtype=lora_dtype, device=x2.device)
    h_p = lora_matmul(x2, lora_A, h, trans_w=False, compute_dtype=lora_dtype, adapter=True,
                      dropout=DROP_AOP if drop else DROP_NONE, dropout_p=dropout_p, seed=seed, defer=True)
    y = _frozen_product(x2, w, x2.dtype, trans_w=False, compute_dtype=compute_dtype, strategy=strategy,
                        term_first=isinstance(w, Packed4bit) and x2.dtype == torch.float16, before=(h_p,),
                        lora_l=h, lora_r=lora_B.t(), lora_scale=scaling, bias=bias)
    return y, h


# the op's real implementation is the plain function above (``fastlora inspect`` calls it directly,
# on meta tensors, to record the launches a call makes)
_lora_linear_op = torch.library.custom_op("fastlora::lora_linear", mutates_args=())(_forward_impl)


@_lora_linear_op.register_fake
def _(x2, lora_A, lora_B, weight, code, absmax, absmax2, code2, offset, N, K, blocksize, blocksize2,
      bias, scaling, dropout_p, seed, compute_dtype, lora_dtype, strategy):
    if stub_active():   # meta tensors under _launch.stubbed: the real implementation, launches stubbed
        return _forward_impl(x2, lora_A, lora_B, weight, code, absmax, absmax2, code2, offset, N, K, blocksize,
                             blocksize2, bias, scaling, dropout_p, seed, compute_dtype, lora_dtype, strategy)
    M = x2.shape[0]
    return x2.new_empty((M, N)), x2.new_empty((M, lora_A.shape[0]), dtype=lora_dtype)


def _backward_impl(
    dy: torch.Tensor, x2: torch.Tensor, h: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
    weight: torch.Tensor, code: Optional[torch.Tensor], absmax: Optional[torch.Tensor],
    absmax2: Optional[torch.Tensor], code2: Optional[torch.Tensor], offset: Optional[torch.Tensor],
    N: int, K: int, blocksize: int, blocksize2: int,
    scaling: float, dropout_p: float, seed: Optional[torch.Tensor], compute_dtype: torch.dtype,
    lora_dtype: torch.dtype, strategy: str, need_x: bool, need_a: bool, need_b: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward: (dX [M, K] in x's dtype, dA [r, K] in A's dtype, dB [N, r] in B's dtype); a gradient
    not asked for is an empty tensor (the op's schema returns tensors)."""
    dx, dA, dB = _backward(dy, x2, h, lora_A, lora_B,
                           _weight(weight, code, absmax, absmax2, code2, offset, N, K, blocksize, blocksize2),
                           scaling, dropout_p, seed, compute_dtype, lora_dtype, strategy, need_x, need_a, need_b)
    return (x2.new_empty((0,)) if dx is None else dx, lora_A.new_empty((0,)) if dA is None else dA,
            lora_B.new_empty((0,)) if dB is None else dB)


def _backward(dy, x2, h, lora_A, lora_B, w, scaling, dropout_p, seed, compute_dtype, lora_dtype, strategy,
              need_x, need_a, need_b):
    """:func:`_backward_impl` with the frozen weight as one object (a Packed4bit or a dense tensor); a
    gradient not asked for is None."""
    N = w.N if isinstance(w, Packed4bit) else w.shape[0]
    K = x2.shape[1]
    M = x2.shape[0]
    r = lora_A.shape[0]
    strategy = _resolve(strategy, M, N, K, w, dy.device, "backward", compute_dtype, dropout_p > 0.0, x2.dtype,
                        lora_dtype, r)
    drop = dropout_p > 0.0
    dx = dA = dB = g = g_p = dA_p = dB_p = None   # a gradient not asked for
    if need_x or need_a:
        # G = s·dY·B: PEFT's dH, the gradient of the adapter path's input to lora_B, which it holds in
        # the adapters' (or autocast) dtype with s applied first, so a 16-bit G overflows where PEFT's does
        g = torch.empty((M, r), dtype=lora_dtype, device=dy.device)
        g_p = lora_matmul(dy, lora_B, g, trans_w=True, compute_dtype=lora_dtype, out_scale=scaling, scale_a=True,
                          adapter=True, defer=True)
    # dA and dB are accumulated in fp32 and stored in the parameter's dtype by the kernel; in 16-bit
    # adapter products they are rounded to lora_dtype first (PEFT computes them there: inf where it
    # overflows), which round_base does when there is no LoRA term
    round_grad = lora_dtype != torch.float32
    if need_b:
        dB = torch.empty((N, r), dtype=lora_B.dtype, device=dy.device)   # (s·dY)ᵀ·H: needs only dY and H
        dB_p = lora_matmul(dy.t(), h, dB, trans_w=True, compute_dtype=lora_dtype, out_scale=scaling, scale_a=True,
                           adapter=True, round_base=round_grad, defer=True)
    if need_a:
        dA = torch.empty((r, K), dtype=lora_A.dtype, device=dy.device)   # Gᵀ·D(X), s in G already
        dA_p = lora_matmul(g.t(), x2, dA, trans_w=True, compute_dtype=lora_dtype, adapter=True,
                           round_base=round_grad, dropout=DROP_W if drop else DROP_NONE, dropout_p=dropout_p,
                           seed=seed, defer=True)
    # launches (dequant strategy): G and dB with W's dequantization, cuBLAS's dX, then dA (which needs
    # G) with dX's epilogue pass; fused: G, dB, dX, dA
    if need_x:
        dx = _frozen_product(dy, w, x2.dtype, trans_w=True, compute_dtype=compute_dtype, strategy=strategy,
                             term_first=x2.dtype == torch.float16, before=(g_p, dB_p), beside=dA_p,
                             lora_l=g, lora_r=lora_A, lora_scale=1.0,
                             dropout=DROP_EPILOGUE if drop else DROP_NONE, dropout_p=dropout_p, seed=seed)
    else:
        launch_together(g_p, dB_p)
        launch_together(dA_p)
    return dx, dA, dB


_lora_linear_backward_op = torch.library.custom_op("fastlora::lora_linear_backward",
                                                   mutates_args=())(_backward_impl)


@_lora_linear_backward_op.register_fake
def _(dy, x2, h, lora_A, lora_B, weight, code, absmax, absmax2, code2, offset, N, K, blocksize, blocksize2,
      scaling, dropout_p, seed, compute_dtype, lora_dtype, strategy, need_x, need_a, need_b):
    if stub_active():
        return _backward_impl(dy, x2, h, lora_A, lora_B, weight, code, absmax, absmax2, code2, offset, N, K,
                              blocksize, blocksize2, scaling, dropout_p, seed, compute_dtype, lora_dtype, strategy,
                              need_x, need_a, need_b)
    M = x2.shape[0]
    r = lora_A.shape[0]
    return (x2.new_empty((M, K) if need_x else (0,)), lora_A.new_empty((r, K) if need_a else (0,)),
            lora_B.new_empty((N, r) if need_b else (0,)))


_N_INPUTS = 20  # the forward op's arguments


def _setup_context(ctx, inputs, output):
    """Saves for backward: X (as given, no copy), H = D(X)·Aᵀ [M, r] (lora_dtype), the dropout seed
    (an int drawn on the host, or an int64 [1] device tensor), A, B and the frozen weight's own
    tensors (the module's storage; never a dequantized W)."""
    (x2, lora_A, lora_B, weight, code, absmax, absmax2, code2, offset, N, K, blocksize, blocksize2,
     bias, scaling, dropout_p, seed, compute_dtype, lora_dtype, strategy) = inputs
    seed_t = seed if isinstance(seed, torch.Tensor) else None
    ctx.save_for_backward(x2, output[1], lora_A, lora_B, seed_t, weight, code, absmax, absmax2, code2, offset)
    ctx.cfg = (N, K, blocksize, blocksize2, scaling, dropout_p, None if seed_t is not None else seed,
               compute_dtype, lora_dtype, strategy)


def _grads(ctx, dx, dA, dB, n_inputs):
    need_x, need_a, need_b = ctx.needs_input_grad[:3]
    return (dx if need_x else None, dA if need_a else None, dB if need_b else None) + (None,) * (n_inputs - 3)


def _op_backward(ctx, dy, dh):
    x2, h, lora_A, lora_B, seed, weight, code, absmax, absmax2, code2, offset = ctx.saved_tensors
    N, K, blocksize, blocksize2, scaling, dropout_p, seed_int, compute_dtype, lora_dtype, strategy = ctx.cfg
    need_x, need_a, need_b = ctx.needs_input_grad[:3]
    grads = _lora_linear_backward_op(
        dy, x2, h, lora_A, lora_B, weight, code, absmax, absmax2, code2, offset, N, K, blocksize, blocksize2,
        scaling, dropout_p, seed if seed_int is None else seed_int, compute_dtype, lora_dtype, strategy,
        need_x, need_a, need_b)
    return _grads(ctx, *grads, _N_INPUTS)


_lora_linear_op.register_autograd(_op_backward, setup_context=_setup_context)


class LoraLinearFunction(torch.autograd.Function):
    """The same op for eager calls, without ``torch.library``'s per-call Python (its argument
    normalisation and autograd wrapper cost more host time than all of a call's launches), and
    with the frozen weight as one object (no Packed4bit rebuilt per call): the implementations are
    the registered op's own, and it saves what the op saves. Used only where nothing traces the call
    (see :func:`_eager_call`); torch.compile, fake tensors and CUDA-graph capture go through the
    registered op.

    forward(x2, lora_A, lora_B, cfg) with cfg = (w, bias, scaling, dropout_p, seed, compute_dtype,
    lora_dtype, strategy): ``w`` a Packed4bit or a dense [N, K] tensor, ``seed`` an int (or None). The
    settings travel as one tuple: ``Function.apply`` inspects each argument it is given (about 0.3 µs
    each), and only x, A and B take gradients."""

    @staticmethod
    def forward(ctx, x2, lora_A, lora_B, cfg):
        # forward(ctx, ...) rather than a separate setup_context: Function.apply then binds no
        # signature per call
        w, bias, scaling, dropout_p, seed, compute_dtype, lora_dtype, strategy = cfg
        y, h = _forward(x2, lora_A, lora_B, w, bias, scaling, dropout_p, seed, compute_dtype, lora_dtype, strategy)
        ctx.save_for_backward(x2, h, lora_A, lora_B, w.packed if isinstance(w, Packed4bit) else w)
        ctx.w = w   # the module's own tensors, viewed; never a dequantized W
        ctx.cfg = (scaling, dropout_p, seed, compute_dtype, lora_dtype, strategy)
        ctx.mark_non_differentiable(h)
        ctx.set_materialize_grads(False)   # no zeros launched for H's (unused) gradient
        return y, h

    @staticmethod
    def backward(ctx, dy, dh):
        x2, h, lora_A, lora_B, _ = ctx.saved_tensors
        need_x, need_a, need_b = ctx.needs_input_grad[:3]
        grads = _backward(dy, x2, h, lora_A, lora_B, ctx.w, *ctx.cfg, need_x, need_a, need_b)
        return _grads(ctx, *grads, 4)


_FAKE = torch._C._TorchDispatchModeKey.FAKE
_FUNCTIONAL = torch._C._TorchDispatchModeKey.FUNCTIONAL


# False: every call goes through the registered op (debugging; tests warm up its kernels this way)
EAGER_FAST_PATH = True


def _eager_call(x: torch.Tensor) -> bool:
    """Whether a call may skip the registered op: nothing traces it (no torch.compile, no fake or
    functional mode, a plain tensor) and no CUDA graph is being captured (there the dropout seed
    must come from the device's generator inside the graph, so each replay draws a new one)."""
    if not EAGER_FAST_PATH or type(x) is not torch.Tensor or torch.compiler.is_compiling():
        return False
    if torch._C._get_dispatch_mode(_FAKE) is not None or torch._C._get_dispatch_mode(_FUNCTIONAL) is not None:
        return False
    return not (x.is_cuda and torch.cuda.is_current_stream_capturing())


def draw_seed(device) -> int:
    """A dropout seed in [0, 2**62), drawn on the host from ``device``'s generator without a kernel
    launch: on a GPU from its Philox generator's (seed, offset), which it advances by one draw, so
    ``torch.manual_seed`` reproduces it and activation checkpointing (which saves and restores that
    generator's state) recomputes the same mask; elsewhere from the CPU generator."""
    dev = torch.device(device)
    if dev.type == "cuda":
        gen = torch.cuda.default_generators[dev.index if dev.index is not None else torch.cuda.current_device()]
        offset = gen.get_offset()
        gen.set_offset(offset + 4)      # Philox offsets advance in multiples of 4
        return _mix64(gen.initial_seed() ^ (offset * 0x9E3779B97F4A7C15)) % SEED_RANGE
    if dev.type == "meta":   # shape-only runs (host-cost measurements): as cheap as the GPU's draw
        _META_DRAWS[0] += 1
        return _mix64(_META_DRAWS[0]) % SEED_RANGE
    return int(torch.randint(0, SEED_RANGE, (), dtype=torch.int64))


_META_DRAWS = [0]


def _mix64(z: int) -> int:
    """splitmix64's finalizer: neighbouring (seed, offset) pairs give unrelated seeds."""
    z &= 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return z ^ (z >> 31)


def _number(value, name: str) -> float:
    """A Python float from a number (or a one-element tensor that needs no gradient)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or not (value.is_floating_point() or value.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{name} must be a number, got a {value.dtype} tensor of shape {tuple(value.shape)}")
        if value.requires_grad:
            raise ValueError(
                f"{name} is a tensor that requires grad, but fastlora's op gives no gradient to {name} "
                f"(PEFT keeps it a constant float): pass a float, or {name}.detach()"
            )
        return float(value)  # reads the value (a host sync on a GPU): pass a float on hot paths
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    return float(value)


def _check(x, w, N, K, lora_A, lora_B, bias, compute_dtype, lora_dtype, dropout_p, strategy):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"x must be [..., {K}] (in_features of the weight), got {tuple(x.shape)}")
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{name} must be a 2-D tensor")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
    r = lora_A.shape[0]
    if tuple(lora_A.shape) != (r, K) or tuple(lora_B.shape) != (N, r):
        raise ValueError(
            f"LoRA shapes do not fit the base weight [{N}, {K}]: lora_A {tuple(lora_A.shape)} must be [r, {K}], "
            f"lora_B {tuple(lora_B.shape)} must be [{N}, r]"
        )
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"bias must be [{N}], got {tuple(bias.shape)}")
    if compute_dtype not in FLOAT_DTYPES:
        raise TypeError(f"compute_dtype must be float16, bfloat16 or float32, got {compute_dtype}")
    if lora_dtype not in FLOAT_DTYPES:
        raise TypeError(f"lora_dtype must be float16, bfloat16 or float32, got {lora_dtype}")
    if not (0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if strategy not in STRATEGIES + ("auto",):
        raise ValueError(f"strategy must be one of {STRATEGIES + ('auto',)}, got {strategy!r}")
    dev = x.device
    for name, t in (("weight", w.packed if isinstance(w, Packed4bit) else w), ("lora_A", lora_A),
                    ("lora_B", lora_B), ("bias", bias)):
        if t is not None and t.device != dev:
            raise ValueError(f"x is on {dev} but {name} is on {t.device}: move them to one device")
    for name, t in (("weight", w if isinstance(w, torch.Tensor) else None), ("bias", bias)):
        if t is not None and t.requires_grad:
            raise ValueError(f"the base {name} requires grad, but fastlora treats the base layer as frozen "
                             "(as PEFT's LoRA does); set requires_grad=False or use PEFT's own forward")


def _user_seed(seed) -> int:
    """A caller's seed as the kernels take it: an int64 folded into [0, 2**62)."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__} {seed!r}")
    if not -(2**63) <= seed < 2**63:
        raise ValueError(f"seed must fit in int64, i.e. lie in [-2**63, 2**63), got {seed}")
    return int(seed) % SEED_RANGE


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    *,
    bias: Optional[torch.Tensor] = None,
    quant_state: Any = None,
    dropout_p: float = 0.0,
    compute_dtype: Optional[torch.dtype] = None,
    lora_dtype: Optional[torch.dtype] = None,
    strategy: str = "auto",
    seed: Optional[int] = None,
) -> torch.Tensor:
    """What a PEFT LoRA layer computes, as one fused autograd op (``torch.ops.fastlora.lora_linear``,
    opaque to ``torch.compile``).

    x:           [..., K], float16 / bfloat16 / float32 (any strides; K may be 0)
    weight:      the frozen base weight: a bitsandbytes 4-bit packed weight (``Params4bit``, with
                 ``quant_state`` given or attached), a :class:`~fastlora.kernels.quant4.Packed4bit`,
                 or a dense [N, K] tensor
    lora_A:      [r, K]; lora_B: [N, r] (fp32 or x's dtype; they get gradients)
    scaling:     PEFT's ``layer.scaling[adapter]`` (alpha/r, or alpha/sqrt(r) with rsLoRA): a real
                 number, or a one-element tensor that does not require grad (no gradient flows to it)
    bias:        [N] base bias or None (frozen)
    dropout_p:   LoRA dropout probability (0 in eval), a real number; kept values scaled by 1/(1-p)
    compute_dtype: dtype of the frozen product: bitsandbytes' compute_dtype for a 4-bit weight
                 (default x's dtype), the weight's dtype for a dense weight (default the weight's
                 dtype, as ``nn.Linear`` computes)
    lora_dtype:  dtype of the adapter products H = D(X)·Aᵀ, H·Bᵀ, G = dY·B, dA, dB (fp32 accumulation
                 always): PEFT's is the autocast dtype under autocast (pass it: this op does not
                 read autocast, ``fastlora.patch`` does), else the adapters' dtype, the default
                 (A's and B's promoted together). bf16/fp16 run on the tensor cores and keep H and G
                 in that dtype, as PEFT does; fp32 runs with IEEE precision
    strategy:    "fused", "dequant" or "auto" (see :func:`choose_strategy`)
    seed:        dropout seed, an int in [-2**63, 2**63) (the kernels take an int64; anything else is
                 a ValueError); when None it is drawn on x's device from that device's generator
                 (no host sync; ``torch.manual_seed`` and activation checkpointing, which restores
                 that generator, reproduce the mask; the CPU random stream is left alone on a GPU)
    Returns [..., N] in x's dtype. No gradient flows to weight, bias or scaling.

    Rounding follows PEFT: the frozen product (+ bias) is rounded to the compute dtype before the
    LoRA term is added whenever that dtype is 16-bit, so an fp16 overflow there gives ``inf`` as in
    PEFT; with a 4-bit weight and fp16 activations the LoRA term is also rounded to fp16 on its own
    before the sum, as PEFT's 4-bit layer does (and in backward, dX's two terms, as autograd sums them).
    """
    if isinstance(weight, Packed4bit):
        w = weight
    elif quant_state is not None or getattr(weight, "quant_state", None) is not None:
        w = from_bnb(weight, quant_state if quant_state is not None else weight.quant_state)
    else:
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.dtype not in FLOAT_DTYPES:
            raise TypeError(
                "weight must be a bitsandbytes 4-bit weight (with its quant_state) or a dense 2-D float tensor, got "
                f"{type(weight).__name__} {getattr(weight, 'dtype', '')} {tuple(getattr(weight, 'shape', ()))}"
            )
        w = weight
    N, K = (w.N, w.K) if isinstance(w, Packed4bit) else tuple(w.shape)
    if compute_dtype is None:
        compute_dtype = x.dtype if isinstance(w, Packed4bit) else w.dtype
    scaling = _number(scaling, "scaling")
    dropout_p = _number(dropout_p, "dropout_p")
    if lora_dtype is None and isinstance(lora_A, torch.Tensor) and isinstance(lora_B, torch.Tensor):
        lora_dtype = torch.promote_types(lora_A.dtype, lora_B.dtype)
    _check(x, w, N, K, lora_A, lora_B, bias, compute_dtype, lora_dtype, dropout_p, strategy)
    _check_target_dtype(x.device, compute_dtype, x.dtype, lora_dtype)
    _check_fp32_products(x.device, lora_dtype)
    return _run(x, w, lora_A, lora_B, scaling, bias, dropout_p, compute_dtype, lora_dtype, strategy,
                None if dropout_p == 0.0 or seed is None else _user_seed(seed))


def _run(x, w, lora_A, lora_B, scaling, bias, dropout_p, compute_dtype, lora_dtype, strategy, seed_v=None):
    """:func:`lora_linear` after its checks (``fastlora.patch`` makes its own, from the layer): the
    weight a Packed4bit or a dense tensor, every number a float, ``seed_v`` None or in [0, 2**62)."""
    N, K = (w.N, w.K) if isinstance(w, Packed4bit) else tuple(w.shape)
    lead = x.shape[:-1]
    M = 1
    for d in lead:
        M *= d
    x2 = x.reshape(M, K)  # a view whenever x's strides allow it; M given: reshape(-1, 0) is ambiguous
    if _eager_call(x):
        if dropout_p != 0.0 and seed_v is None:
            seed_v = draw_seed(x.device)
        if not (torch.is_grad_enabled() and (x.requires_grad or lora_A.requires_grad or lora_B.requires_grad)):
            # nothing to differentiate (generation, evaluation): no autograd node at all
            y, _ = _forward(x2, lora_A, lora_B, w, bias, scaling, dropout_p, seed_v, compute_dtype, lora_dtype,
                            strategy)
            return y.reshape(*lead, N)
        y, _ = LoraLinearFunction.apply(x2, lora_A, lora_B, (w, bias, scaling, dropout_p, seed_v, compute_dtype,
                                                              lora_dtype, strategy))
    else:
        # traced or captured: the seed is a device tensor, drawn by a kernel inside the graph
        if seed_v is not None:
            seed_t = seed_tensor(seed_v, x.device)
        elif dropout_p != 0.0:
            seed_t = torch.randint(0, SEED_RANGE, (1,), dtype=torch.int64, device=x.device)
        else:
            seed_t = None
        y, _ = _lora_linear_op(x2, lora_A, lora_B, *weight_args(w), bias, scaling, dropout_p, seed_t, compute_dtype,
                               lora_dtype, strategy)
    return y.reshape(*lead, N)
