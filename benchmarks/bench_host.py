"""Host-cost benchmark: what one LoRA layer call costs the CPU, and how many GPU kernels it launches.

    python -m benchmarks host                        # 4096x4096 NF4, M = 1,16, sm_89, 300 reps
    python -m benchmarks host --shape 14336,4096 --m 1,16,256 --target sm_90
    python -m benchmarks host --smoke --out /tmp/h

In eager mode the GPU waits for the Python that launches its kernels, so a layer call costs at least
its host time. This measures that host time with nothing computed:

- the layer: PEFT's LoRA ``Linear4bit`` over a bitsandbytes ``Linear4bit`` (NF4, double quant,
  blocksize 64, bf16 compute), r = 16, lora_alpha = 32, dropout 0.05, as ``get_peft_model`` builds it,
  with every tensor on the ``meta`` device (shapes and dtypes, no data). The packed weight and every
  quant_state tensor have the shapes and dtypes bitsandbytes gives a real weight of that shape,
  quantized once on the CPU (on the GPU when there is one).
- ``peft``: that layer as it is. PEFT and bitsandbytes dispatch every op as on a GPU; the ops run
  their meta (fake) implementations, which allocate nothing and compute nothing.
- ``fastlora``: a second copy of the layer after ``fastlora.patch``, called inside
  ``fastlora.kernels._launch.stubbed(target)``: the patcher's per-call decision, the custom op,
  autograd and each Triton launch up to the driver (binder, specialization, compile cache, launch
  plan), compiled for ``target`` on the first call; only the driver's launch is a no-op.

Modes: ``train_step`` = ``y = layer(x); y.backward(dy)`` in train mode (dropout on), x [1, M, K] a
leaf that needs its gradient (a layer inside a model passes dX on), gradients reset to None between
steps as ``optimizer.zero_grad()`` leaves them; ``forward`` = ``layer(x)`` in eval mode under
``torch.no_grad()`` (generation). The two providers alternate within each repetition (which goes
first alternates too), after a warm-up, with the garbage collector off while timing; min and median
of ``time.perf_counter_ns`` per call.

What the host time leaves out, on both sides alike: the driver's own launch (argument packing and
``cuLaunchKernel`` for a Triton kernel, ``cudaLaunchKernel`` inside an ATen or bitsandbytes op; a few
µs each on a GPU, so a provider with more launches is understated by more). On meta an ATen op runs
its meta kernel (shape and dtype computation) where a GPU run would run its CUDA host code, and a
bitsandbytes op its Python fake implementation where a GPU run calls its Python CUDA wrapper. The
GPU part below measures the real thing.

Adapters. The QLoRA recipe runs fp32 adapters under bf16 autocast, but autocast has no meta device
(``torch.autocast("meta")`` raises; CUDA autocast on a CPU-only build disables itself), so on meta the
adapters are bf16 tensors (``--adapters bf16``, the default): the adapter products run in bf16 as under
the recipe, without autocast's casts (PEFT's fp32->bf16 weight casts, fastlora's dA/dB cast to fp32).
``--adapters fp32``: fp32 adapters computed in fp32. ``autocast`` (the recipe itself) runs only on
CUDA tensors, in the GPU part below.

Launch counting (one extra, untimed step per provider, mode and M, under a TorchDispatchMode; the
rule is :data:`COUNT_RULE`, and every record lists what it counted and what it did not):
Triton launches (the stub's list) + ATen ops that launch a kernel + bitsandbytes' ops at the launches
their CUDA implementation makes.

On a GPU (``torch.cuda.is_available()``) the same command also times the real eager step on CUDA
tensors, both providers interleaved: host µs to enqueue the call, the eager step's wall time
(call + synchronize) and the GPU's own time for the call (CUDA events around the call queued behind
a ``torch.cuda._sleep``, so the GPU runs the launches back to back rather than at the host's pace).
"""

from __future__ import annotations

import argparse
import ast
import collections
import contextlib
import gc
import inspect
import statistics
import time
from typing import Optional

import torch

from . import harness
from .bench_layer import _Holder

PROVIDERS = ("fastlora", "peft")
MODES = ("train_step", "forward")
ADAPTERS = ("bf16", "fp32", "autocast")     # autocast: CUDA only
DEFAULT_M = (1, 16)
DEFAULT_SHAPE = (4096, 4096)                 # N (out_features), K (in_features)
SMOKE_REPS, SMOKE_WARMUP = 10, 2

# ATen ops that never launch a kernel besides the views (``func.is_view``): allocations and
# metadata. ``_unsafe_view`` and ``_reshape_alias`` alias their input without saying so in their schema.
NO_KERNEL_OPS = frozenset({
    "empty.memory_format", "empty_strided.default", "empty_like.default", "new_empty.default",
    "new_empty_strided.default", "_unsafe_view.default", "_reshape_alias.default", "lift_fresh.default",
    "resize_.default", "set_.source_Storage_storage_offset", "set_.source_Tensor", "_local_scalar_dense.default",
})
# bitsandbytes' 4-bit ops: launches of their CUDA implementation (bitsandbytes/backends/cuda/ops.py,
# 0.50.2). gemm_4bit is its own fused kernel, or, where its per-GPU rule says dequant+linear wins,
# dequantize_blockwise of the nested absmax + its offset add + dequantize_4bit + F.linear (plain absmax:
# the last two); see LaunchCounter._bnb and _bnb_rule.
BNB_ONE_LAUNCH = frozenset({"dequantize_4bit", "dequantize_blockwise", "gemv_4bit", "quantize_4bit",
                            "quantize_blockwise"})

COUNT_RULE = (
    "launches = Triton launches (the stub driver's list) + one per ATen op dispatched below autograd, "
    "except views (func.is_view: view, t, transpose, permute, expand, as_strided, detach, alias, slice, "
    "select, unsqueeze, squeeze, ...) and no-kernel ops (" + ", ".join(sorted(NO_KERNEL_OPS)) + ") "
    "+ bitsandbytes ops at the launches of their CUDA implementation (dequantize_4bit, dequantize_blockwise, "
    "gemv_4bit: 1 each; gemm_4bit: 1 where bitsandbytes' own per-GPU rule, evaluated for the target, picks "
    "its fused kernel, else 4 with double quant (dequantize_blockwise, offset add, dequantize_4bit, F.linear) "
    "or 2 without). A custom op of another library (fastlora::*) is not counted itself: its implementation "
    "runs under the same mode, so its ATen ops count by the same rule and its Triton launches are in the "
    "stub's list. Gradient accumulation into .grad (AccumulateGrad, .grad None before the step) runs for "
    "both providers alike and counts by the same rule."
)

# ops whose schema declares no alias but whose result aliases their input
ALIASING_OPS = frozenset({"_unsafe_view.default", "_reshape_alias.default", "lift_fresh.default"})
ALLOC_RULE = (
    "allocations = per op dispatched below autograd (ATen, bitsandbytes; a fastlora::* op by the ATen ops "
    "inside it), the tensors it returns whose schema entry has no alias (a new tensor from the caching "
    "allocator: torch.empty, an op's result; not a view, not an in-place or out= result, not "
    + ", ".join(sorted(ALIASING_OPS)) + "); a zero-element tensor counts too (the allocator is still "
    "called); temporaries inside an op's own implementation are not seen"
)

FORMULAS = {
    "host_us_min": "min over reps of time.perf_counter_ns() around one call (µs); with config.stack > 1, "
                   "around one call of the stack, divided by the stack's depth (per layer; so are launches "
                   "and allocations, and gpu_us and eager_us on a GPU)",
    "host_us_median": "median over reps of the same",
    "launches": COUNT_RULE,
    "allocations": ALLOC_RULE,
    "ratio": "fastlora host µs / peft host µs, per (M, mode), min and median each (report)",
    "gpu_us_*": "CUDA events around one call queued behind torch.cuda._sleep (the GPU's own time)",
    "eager_us_*": "perf_counter_ns from the call to torch.cuda.synchronize() after it (one eager step)",
}


# ----------------------------------------------------------------------------------------------
# the layer: PEFT LoRA over a bitsandbytes NF4 Linear4bit, on meta or on CUDA
# ----------------------------------------------------------------------------------------------


def quantize(N: int, K: int, device: torch.device):
    """(packed [N*K/2, 1] uint8, quant_state): an NF4 double-quant weight as bitsandbytes builds it."""
    import bitsandbytes.functional as F

    g = torch.Generator(device=device).manual_seed(0)
    w = (torch.randn(N, K, generator=g, device=device) * K ** -0.5).to(torch.bfloat16)
    return F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")


def _on(t: Optional[torch.Tensor], device: torch.device):
    """``t`` on ``device``; on meta a tensor of the same shape, strides and dtype (no data)."""
    if t is None:
        return None
    if device.type == "meta":
        return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
    return t.to(device)


def _quant_state_on(qs, device: torch.device):
    from bitsandbytes.functional import QuantState

    state2 = None
    if qs.nested:
        s2 = qs.state2
        state2 = QuantState(absmax=_on(s2.absmax, device), code=_on(s2.code, device), blocksize=s2.blocksize,
                            dtype=s2.dtype)
    return QuantState(absmax=_on(qs.absmax, device), shape=qs.shape, code=_on(qs.code, device),
                      blocksize=qs.blocksize, quant_type=qs.quant_type, dtype=qs.dtype,
                      offset=_on(qs.offset, device), state2=state2)


def build_layer(packed, qs, device: torch.device, r: int, alpha: int, dropout: float, adapters: str):
    """A PEFT LoRA Linear4bit over a bitsandbytes Linear4bit holding (packed, qs) on ``device``."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    N, K = (int(v) for v in qs.shape)
    base = bnb.nn.Linear4bit(K, N, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True,
                             quant_type="nf4", device="meta")
    base.weight = bnb.nn.Params4bit(_on(packed, device), requires_grad=False, quant_state=_quant_state_on(qs, device),
                                    blocksize=qs.blocksize, compress_statistics=qs.nested, quant_type=qs.quant_type,
                                    quant_storage=packed.dtype, module=base, bnb_quantized=True)
    model = get_peft_model(_Holder(base), LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                                                      target_modules=["proj"]))
    layer = model.base_model.model.proj
    if device.type != "meta":
        layer.to(device)   # the adapters, created on the CPU where the base layer's device is meta
    if adapters == "bf16":
        layer.lora_A.to(torch.bfloat16)
        layer.lora_B.to(torch.bfloat16)
    return model, layer


def _params(layer):
    if isinstance(layer, Stack):
        return [p for one in layer.layers for p in _params(one)]
    return [layer.lora_A["default"].weight, layer.lora_B["default"].weight]


class Stack:
    """``depth`` layers called one after another, each one's output the next one's input, as the
    layers of a model run: one ``backward()`` runs all their backward passes, so what a backward call
    costs once (the autograd engine's start, on a GPU its hand-off to the device's thread) is shared
    among them, as in a model. Needs N == K."""

    def __init__(self, models, layers):
        self.models, self.layers = list(models), list(layers)

    def train(self, mode: bool = True):
        for m in self.models:
            m.train(mode)
        return self

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def _patched(layer) -> bool:
    """Whether ``layer`` (or a layer of the stack) has a patched forward."""
    return any("forward" in vars(one) for one in (layer.layers if isinstance(layer, Stack) else [layer]))


def build_layers(packed, qs, device: torch.device, r: int, alpha: int, dropout: float, adapters: str, depth: int):
    """(model, layer) of :func:`build_layer`, or for ``depth`` > 1 a :class:`Stack` of that many (as
    both: it calls and switches train/eval mode for all of them)."""
    if depth == 1:
        return build_layer(packed, qs, device, r, alpha, dropout, adapters)
    built = [build_layer(packed, qs, device, r, alpha, dropout, adapters) for _ in range(depth)]
    stack = Stack([m for m, _ in built], [layer for _, layer in built])
    return stack, stack


class _Reports:
    """The patch reports of a stack's models as one (fused and fallback calls summed)."""

    def __init__(self, reports):
        self.reports = reports

    @property
    def fused_calls(self) -> int:
        return sum(r.fused_calls for r in self.reports)

    @property
    def fallback_calls(self) -> collections.Counter:
        return sum((collections.Counter(r.fallback_calls) for r in self.reports), collections.Counter())


def patch_all(model):
    import fastlora

    if isinstance(model, Stack):
        return _Reports([fastlora.patch(m) for m in model.models])
    return fastlora.patch(model)


def unpatch_all(model):
    import fastlora

    for m in (model.models if isinstance(model, Stack) else [model]):
        fastlora.unpatch(m)


# ----------------------------------------------------------------------------------------------
# counting launches
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _no_gc():
    gc.collect()
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _bnb_rule(target):
    """bitsandbytes' own CUDA rule ``_gemm_4bit_use_custom_cuda(device, dtype, M, N, K)`` evaluated for
    ``target`` (its SM count and compute capability) without a GPU: its source is read from the
    installed bitsandbytes and compiled here, since the module it lives in needs CUDA to import. None
    when the source is not found (the caller then says so in the record)."""
    try:
        import bitsandbytes.backends as backends

        path = inspect.getfile(backends).replace("__init__.py", "cuda/ops.py")
        tree = ast.parse(open(path, encoding="utf-8").read())
        fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "_gemm_4bit_use_custom_cuda")
        floor = next(n for n in tree.body if isinstance(n, ast.Assign)
                     and any(getattr(t, "id", None) == "_GEMM_4BIT_CUSTOM_FLOOR_M" for t in n.targets))
        max_m = next(n for n in ast.walk(tree) if isinstance(n, ast.Assign)
                     and any(getattr(t, "id", None) == "_gemm_4bit_custom_max_m" for t in n.targets))
    except (OSError, StopIteration, SyntaxError, ImportError):
        return None
    fn.decorator_list = []
    ns = {"torch": torch, "_gpu_dispatch_props": lambda index: (target.sms, target.cc // 10, target.cc % 10)}
    exec(compile(ast.Module(body=[floor, max_m, fn], type_ignores=[]), path, "exec"), ns)
    use_custom, custom_max_m = ns["_gemm_4bit_use_custom_cuda"], ns["_gemm_4bit_custom_max_m"]

    def rule(dtype, M, N, K, blocksize):
        # the dispatch of bitsandbytes::gemm_4bit's CUDA kernel: past max M or a K not a multiple of
        # the blocksize it takes the fallback before asking the rule
        return M <= custom_max_m and K % blocksize == 0 and use_custom(0, dtype, M, N, K)

    return rule


class LaunchCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the GPU kernel launches of the ops dispatched inside (see :data:`COUNT_RULE`)."""

    def __init__(self, gemm_rule=None):
        super().__init__()
        self.counted = collections.Counter()      # op -> launches
        self.not_counted = collections.Counter()  # op -> calls
        self.gemm_rule = gemm_rule
        self.gemm_rule_missing = False
        self.allocations = collections.Counter()   # op -> tensors allocated (see ALLOC_RULE)

    def _allocated(self, func, name: str) -> None:
        if func.__name__ in ALIASING_OPS:
            return
        n = sum(1 for r in func._schema.returns if r.alias_info is None
                and (r.type.kind() == "TensorType" or "Tensor" in str(r.type)))
        if n:
            self.allocations[name] += n

    def _bnb(self, func, args, kwargs) -> int:
        name = func._schema.name.split("::", 1)[1]
        if name in BNB_ONE_LAUNCH:
            return 1
        if name == "gemm_4bit":
            a = {arg.name: v for arg, v in zip(func._schema.arguments, args)}
            a.update(kwargs)
            A, shapeB, blocksize = a["A"], a["shapeB"], a["blocksize"]
            K = A.shape[-1]
            nested = a.get("absmax_8bit") is not None
            if self.gemm_rule is None:
                self.gemm_rule_missing = True
                return 1
            return 1 if self.gemm_rule(A.dtype, A.numel() // K, int(shapeB[0]), K, blocksize) else (4 if nested else 2)
        return 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        ns = func.namespace
        name = f"{ns}::{func.__name__}"
        if ns == "bitsandbytes":
            self.counted[name] += self._bnb(func, args, kwargs)
            self._allocated(func, name)
            return func(*args, **kwargs)
        if ns not in ("aten", "prims"):
            # another library's custom op (fastlora's): run its meta implementation with this mode on,
            # so the ATen ops inside it are seen (its Triton launches are in the stub's list)
            devices = {a.device.type for a in args if isinstance(a, torch.Tensor)}
            if devices == {"meta"}:
                self.not_counted[name + " (its ops counted)"] += 1
                with self:
                    return func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.Meta), *args, **kwargs)
            self.counted[name] += 1
            self._allocated(func, name)
            return func(*args, **kwargs)
        if not func.is_view:
            self._allocated(func, name)
        if func.is_view or func.__name__ in NO_KERNEL_OPS:
            self.not_counted[name] += 1
        else:
            self.counted[name] += 1
        return func(*args, **kwargs)


# ----------------------------------------------------------------------------------------------
# one provider's calls
# ----------------------------------------------------------------------------------------------


class Provider:
    """One layer and how to call it in each mode (``call[mode]()`` is what is timed, ``reset()`` what
    runs between calls)."""

    def __init__(self, name, model, layer, x, x_nograd, dy, autocast: bool, report=None):
        self.name, self.model, self.layer, self.report = name, model, layer, report
        self.x, self.x_nograd, self.dy = x, x_nograd, dy
        self.params = _params(layer)
        ac = torch.autocast(x.device.type, dtype=torch.bfloat16) if autocast else None

        def train_step():
            if ac is None:
                y = layer(x)
            else:
                with ac:
                    y = layer(x)
            y.backward(dy)

        def forward():
            if ac is None:
                return layer(x_nograd)
            with ac:
                return layer(x_nograd)

        self.call = {"train_step": train_step, "forward": forward}

    def reset(self):
        for p in self.params:
            p.grad = None
        self.x.grad = None

    def enter(self, mode):
        """The module state of ``mode``: train (dropout on) or eval (dropout off)."""
        self.model.train(mode == "train_step")


def _inputs(M: int, K: int, N: int, device: torch.device):
    x = torch.randn(1, M, K, dtype=torch.bfloat16, device=device) if device.type != "meta" else \
        torch.empty(1, M, K, dtype=torch.bfloat16, device=device)
    dy = torch.randn(1, M, N, dtype=torch.bfloat16, device=device) if device.type != "meta" else \
        torch.empty(1, M, N, dtype=torch.bfloat16, device=device)
    return x.requires_grad_(True), x.detach().clone(), dy


def _stats(samples_ns) -> dict:
    us = [s / 1e3 for s in samples_ns]
    q = harness.quantiles(us)
    return {"min": min(us), "median": statistics.median(us), "p20": q[1], "p80": q[2]}


def _interleaved(providers, mode, reps, warmup, timer):
    """``timer(provider)`` -> one sample, for each provider in turn, ``reps`` times (which provider
    goes first alternates), after ``warmup`` unrecorded rounds. {provider name: [samples]}."""
    samples = {p.name: [] for p in providers}
    for p in providers:
        p.enter(mode)
    grad = torch.enable_grad() if mode == "train_step" else torch.no_grad()
    with grad, _no_gc():
        for i in range(warmup + reps):
            order = providers if i % 2 == 0 else providers[::-1]
            for p in order:
                s = timer(p)
                if i >= warmup:
                    samples[p.name].append(s)
    return samples


# ----------------------------------------------------------------------------------------------
# the measurement on meta, launches stubbed
# ----------------------------------------------------------------------------------------------


def _host_timer(mode):
    def t(p):
        p.reset()
        fn = p.call[mode]
        t0 = time.perf_counter_ns()
        fn()
        return time.perf_counter_ns() - t0
    return t


def _count(p: Provider, mode: str, launches: list, gemm_rule) -> dict:
    """One untimed call under the LaunchCounter: the launches and what was (not) counted."""
    p.enter(mode)
    p.reset()
    before = len(launches)
    grad = torch.enable_grad() if mode == "train_step" else torch.no_grad()
    with grad, LaunchCounter(gemm_rule) as c:
        p.call[mode]()
    triton = collections.Counter(name for name, _, _ in launches[before:])
    aten = sum(c.counted.values())
    out = {"launches": aten + sum(triton.values()), "triton_launches": sum(triton.values()),
           "op_launches": aten, "counted_ops": dict(sorted(c.counted.items())),
           "triton_kernels": dict(sorted(triton.items())), "not_counted_ops": dict(sorted(c.not_counted.items())),
           "allocations": sum(c.allocations.values()), "allocating_ops": dict(sorted(c.allocations.items()))}
    if c.gemm_rule_missing:
        out["gemm_4bit_rule"] = "bitsandbytes' CUDA rule not found: gemm_4bit counted as 1"
    return out


PER_LAYER_COUNTS = ("launches", "triton_launches", "op_launches", "allocations")


def _per_layer(counts: dict, depth: int) -> dict:
    """The counts of one call of a stack of ``depth`` layers, per layer (the op tables stay the
    whole stack's)."""
    if depth == 1:
        return counts
    out = dict(counts)
    for k in PER_LAYER_COUNTS:
        out[k] = counts[k] / depth
    return out


def _stack_note(depth: int) -> str:
    return f"per layer of {depth}: " if depth > 1 else ""


def _layer_type(layer) -> str:
    one = layer.layers[0] if isinstance(layer, Stack) else layer
    return f"{type(one).__module__}.{type(one).__name__}"


def _report_counts(rep) -> dict:
    return {"fused_calls": int(rep.fused_calls),
            "fallback_calls": {str(k): int(v) for k, v in rep.fallback_calls.items()}}


def run_meta(args, device, writer, summary) -> None:
    """Both providers on meta tensors, fastlora's launches stubbed for ``args.target``."""
    import fastlora
    from fastlora.kernels import _launch
    from fastlora.kernels.targets import get_target

    N, K = args.shape
    meta = torch.device("meta")
    packed, qs = quantize(N, K, torch.device("cpu"))
    adapters = [a for a in args.adapters if a != "autocast"]
    if len(adapters) < len(args.adapters):
        harness.log("host: --adapters autocast needs CUDA tensors (autocast has no meta device); "
                    "measured in the GPU part only")
    target = get_target(args.target)
    gemm_rule = _bnb_rule(target)
    depth = args.stack
    for ad, strategy in ((a, s) for a in adapters for s in args.strategy):
        peft_model, peft_layer = build_layers(packed, qs, meta, args.r, args.alpha, args.dropout, ad, depth)
        fl_model, fl_layer = build_layers(packed, qs, meta, args.r, args.alpha, args.dropout, ad, depth)
        report = patch_all(fl_model)
        weight = harness.describe_4bit((fl_layer.layers[0] if depth > 1 else fl_layer).base_layer)
        pin = contextlib.nullcontext() if strategy == "auto" else fastlora.ops.using_strategy(strategy)
        with _launch.stubbed(target.name) as launches, pin:
            for M in args.m:
                x, x_ng, dy = _inputs(M, K, N, meta)
                provs = [Provider("fastlora", fl_model, fl_layer, x, x_ng, dy, False, report),
                         Provider("peft", peft_model, peft_layer, x, x_ng, dy, False)]
                for mode in args.modes:
                    base_cfg = {"M": M, "N": N, "K": K, "r": args.r, "lora_alpha": args.alpha, "dropout": args.dropout,
                                "mode": mode, "adapters": ad, "strategy": strategy, "target": target.name,
                                "measured_on": "meta", "stack": depth,
                                "x_shape": list(x.shape), "reps": args.reps, "warmup": args.warmup, "weight": weight,
                                "peft_layer": _layer_type(peft_layer)}
                    t0 = time.monotonic()
                    # warm-up outside the timed loop first: the first fastlora call compiles its kernels
                    for p in provs:
                        p.enter(mode)
                        with (torch.enable_grad() if mode == "train_step" else torch.no_grad()):
                            p.reset()
                            p.call[mode]()
                    fused0, n0 = report.fused_calls, len(launches)
                    samples = _interleaved(provs, mode, args.reps, args.warmup, _host_timer(mode))
                    calls = args.reps + args.warmup
                    stub_per_call = (len(launches) - n0) / calls
                    checks = {"fastlora": {**_report_counts(report),
                                           "fused_calls_in_loop": report.fused_calls - fused0,
                                           "stub_launches_per_call": stub_per_call / depth},
                              "peft": {"layer_patched": _patched(peft_layer)}}
                    for p in provs:
                        m = {f"host_us_{k}": v / depth for k, v in _stats(samples[p.name]).items()}
                        m.update(_per_layer(_count(p, mode, launches, gemm_rule), depth))
                        m.update(checks[p.name])
                        status, error = "ok", None
                        if p.name == "fastlora" and (m["fused_calls_in_loop"] != calls * depth
                                                     or report.fallback_calls):
                            status = "fallback"
                            error = f"the patched layer ran PEFT's forward: {_report_counts(report)}"
                        if p.name == "peft" and (m["layer_patched"] or not any(
                                k.startswith("bitsandbytes::") for k in m["counted_ops"])):
                            status, error = "error", "the PEFT layer did not run bitsandbytes' 4-bit path"
                        rec = harness.make_record("host", {**base_cfg, "provider": p.name}, m, FORMULAS,
                                                  device=device, smoke=args.smoke, status=status, error=error)
                        writer.write(rec)
                        summary.append(rec)
                    f, b = summary[-2]["metrics"], summary[-1]["metrics"]
                    harness.log(f"  M={M:<5d} {mode:10s} {ad:5s} {strategy:7s} {_stack_note(depth)}fastlora {f['host_us_min']:8.1f} µs "
                                f"peft {b['host_us_min']:8.1f} µs (min)  launches {f['launches']} vs {b['launches']}, allocations {f['allocations']} vs {b['allocations']}  "
                                f"[{time.monotonic() - t0:.1f} s]")
        unpatch_all(fl_model)


# ----------------------------------------------------------------------------------------------
# on a GPU: the real eager step
# ----------------------------------------------------------------------------------------------

# cycles the GPU sleeps before a timed call, so the host has queued the whole call before the GPU
# starts it: 2e7 cycles are 10 ms at 2 GHz, several times a layer call's host time
SLEEP_CYCLES = 20_000_000


def _cuda_timer(mode, device):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def t(p):
        fn = p.call[mode]
        p.reset()
        torch.cuda.synchronize(device)
        t0 = time.perf_counter_ns()
        fn()
        t1 = time.perf_counter_ns()
        torch.cuda.synchronize(device)
        t2 = time.perf_counter_ns()
        # the same call again, queued behind a sleep: the events time the GPU alone
        p.reset()
        torch.cuda._sleep(SLEEP_CYCLES)
        start.record()
        fn()
        end.record()
        queued = not start.query()       # False: the sleep ended before the call was queued
        torch.cuda.synchronize(device)
        return (t1 - t0, t2 - t0, start.elapsed_time(end) * 1e6, queued)
    return t


def run_cuda(args, device, writer, summary) -> None:
    """Both providers on real CUDA tensors, kernels run: host, eager step and GPU time per call."""
    import fastlora
    from fastlora.kernels.targets import device_target

    N, K = args.shape
    packed, qs = quantize(N, K, device)
    depth = args.stack
    for ad, strategy in ((a, s) for a in args.adapters for s in args.strategy):
        peft_model, peft_layer = build_layers(packed, qs, device, args.r, args.alpha, args.dropout, ad, depth)
        fl_model, fl_layer = build_layers(packed, qs, device, args.r, args.alpha, args.dropout, ad, depth)
        report = patch_all(fl_model)
        pin = contextlib.nullcontext() if strategy == "auto" else fastlora.ops.using_strategy(strategy)
        with pin:
            for M in args.m:
                x, x_ng, dy = _inputs(M, K, N, device)
                ac = ad == "autocast"
                provs = [Provider("fastlora", fl_model, fl_layer, x, x_ng, dy, ac, report),
                         Provider("peft", peft_model, peft_layer, x, x_ng, dy, ac)]
                for mode in args.modes:
                    cfg = {"M": M, "N": N, "K": K, "r": args.r, "lora_alpha": args.alpha, "dropout": args.dropout,
                           "mode": mode, "adapters": ad, "strategy": strategy, "target": device_target(device).name,
                           "measured_on": "cuda", "stack": depth,
                           "x_shape": list(x.shape), "reps": args.reps, "warmup": args.warmup}
                    try:
                        fused0 = report.fused_calls
                        samples = _interleaved(provs, mode, args.reps, args.warmup, _cuda_timer(mode, device))
                    except Exception as exc:  # the meta records stand without this part
                        for p in provs:
                            writer.write(harness.make_record("host", {**cfg, "provider": p.name}, {}, FORMULAS,
                                                             device=device, smoke=args.smoke, status="error",
                                                             error=f"{type(exc).__name__}: {exc}"))
                        harness.log(f"  cuda M={M} {mode}: {type(exc).__name__}: {exc}")
                        continue
                    for p in provs:
                        s = samples[p.name]
                        m = {}
                        for i, what in enumerate(("host_us", "eager_us", "gpu_us")):
                            m.update({f"{what}_{k}": v / depth for k, v in _stats([v[i] for v in s]).items()})
                        # False: some call was not wholly queued before the GPU reached it (its GPU time
                        # includes waiting for the host)
                        m["gpu_time_queued"] = all(v[3] for v in s)
                        status, error = "ok", None
                        if p.name == "fastlora":
                            m.update(_report_counts(report))
                            m["fused_calls_in_loop"] = report.fused_calls - fused0
                            if m["fused_calls_in_loop"] != 2 * (args.reps + args.warmup) * depth or report.fallback_calls:
                                status = "fallback"
                                error = f"the patched layer ran PEFT's forward: {_report_counts(report)}"
                        rec = harness.make_record("host", {**cfg, "provider": p.name}, m, FORMULAS, device=device,
                                                  smoke=args.smoke, status=status, error=error)
                        writer.write(rec)
                        summary.append(rec)
                    harness.log(f"  cuda M={M:<5d} {mode:10s} {ad:8s} " + "  ".join(
                        f"{r['config']['provider']} host {r['metrics']['host_us_min']:.1f} "
                        f"eager {r['metrics']['eager_us_min']:.1f} gpu {r['metrics']['gpu_us_min']:.1f} µs"
                        for r in summary[-2:]))
        unpatch_all(fl_model)
        del peft_model, fl_model
        harness.free_memory(device)


# ----------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------


def table(records) -> str:
    """The stdout table: per (adapters, M, mode) fastlora vs PEFT."""
    by = collections.defaultdict(dict)
    for r in records:
        c = r["config"]
        if r.get("status") == "ok":
            where = c["measured_on"] + (f", per layer of {c['stack']}" if c.get("stack", 1) > 1 else "")
            by[(where, c["adapters"], c.get("strategy", "auto"), c["M"], c["mode"])][c["provider"]] = r["metrics"]
    lines = []
    for (where, ad, st, M, mode), p in sorted(by.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2], kv[0][3],
                                                                          MODES.index(kv[0][4]))):
        f, b = p.get("fastlora"), p.get("peft")
        if not (f and b):
            continue
        row = (f"| {where} | {ad} | {st} | {M} | {mode} | {f['host_us_min']:,.0f} / {f['host_us_median']:,.0f} | "
               f"{b['host_us_min']:,.0f} / {b['host_us_median']:,.0f} | "
               f"{f['host_us_min'] / b['host_us_min']:.2f} / {f['host_us_median'] / b['host_us_median']:.2f} | ")
        if "launches" in f:
            row += f"{f['launches']:g} ({f['triton_launches']:g} Triton) vs {b['launches']:g} | " \
                   f"{_num(f.get('allocations'))} vs {_num(b.get('allocations'))} |"
        else:
            row += f"gpu {f['gpu_us_min']:,.0f} vs {b['gpu_us_min']:,.0f} µs; eager {f['eager_us_min']:,.0f} vs " \
                   f"{b['eager_us_min']:,.0f} µs | |"
        lines.append(row)
    head = ["| on | adapters | strategy | M | mode | fastlora µs min / median | PEFT µs min / median "
            "| ratio min / median | launches fastlora vs PEFT | allocations fastlora vs PEFT |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    return "\n".join(head + lines)


def _num(v) -> str:
    return "-" if v is None else f"{v:g}"


def _csv(kind):
    return lambda s: [kind(v) for v in s.split(",") if v.strip()]


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--smoke", action="store_true", help=f"{SMOKE_REPS} reps, {SMOKE_WARMUP} warm-up rounds")
    ap.add_argument("--out", default=None, help="output folder (default benchmarks/results/<device-slug>)")
    ap.add_argument("--shape", type=_csv(int), default=list(DEFAULT_SHAPE), help="N,K (default 4096,4096)")
    ap.add_argument("--m", type=_csv(int), default=list(DEFAULT_M), help="tokens M (default 1,16)")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=int, default=32)
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--modes", type=_csv(str), default=list(MODES), help=f"comma list of {MODES}")
    ap.add_argument("--strategy", type=_csv(str), default=["auto"],
                    help="comma list of auto (what a patched layer picks), fused, dequant (fastlora's "
                         "strategy pinned with fastlora.ops.using_strategy); default auto")
    ap.add_argument("--adapters", type=_csv(str), default=None,
                    help="comma list of bf16 (bf16 adapters), fp32 (fp32 adapters in fp32), autocast (fp32 under "
                         "bf16 autocast: CUDA only); default bf16 (and autocast on a GPU)")
    ap.add_argument("--target", default=None,
                    help="GPU target fastlora's stubbed launches compile for (default: this GPU's, else sm_89)")
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=20, help="unrecorded interleaved rounds before timing")
    ap.add_argument("--stack", type=int, default=1,
                    help="layers called in a chain per call (one backward for all, as in a model); every "
                         "figure is then per layer (N must equal K). Default 1: one layer alone")
    ap.add_argument("--cuda", action=argparse.BooleanOptionalAction, default=True,
                    help="on a GPU, also time the real eager step (default on)")


def run(args, device: Optional[torch.device] = None) -> dict:
    from fastlora.kernels._interpreter import interpreter_active

    if interpreter_active():
        raise SystemExit("host: needs compiled kernels; run it in a process without TRITON_INTERPRET")
    device = device or harness.default_device()
    if len(args.shape) != 2:
        raise SystemExit(f"--shape takes N,K, got {args.shape}")
    for m in args.modes:
        if m not in MODES:
            raise SystemExit(f"unknown mode {m!r}; choose from {MODES}")
    for st in args.strategy:
        if st not in ("auto", "fused", "dequant"):
            raise SystemExit(f"unknown --strategy {st!r}; choose from auto, fused, dequant")
    if args.adapters is None:
        args.adapters = ["bf16", "autocast"] if device.type == "cuda" else ["bf16"]
    for a in args.adapters:
        if a not in ADAPTERS:
            raise SystemExit(f"unknown --adapters {a!r}; choose from {ADAPTERS}")
    if args.target is None:
        from fastlora.kernels.targets import device_target

        args.target = device_target(device).name if device.type == "cuda" else "sm_89"
    if args.stack < 1 or (args.stack > 1 and args.shape[0] != args.shape[1]):
        raise SystemExit(f"--stack {args.stack}: needs a count >= 1, and N == K to chain layers (got N,K = "
                         f"{args.shape[0]},{args.shape[1]})")
    if args.smoke:
        args.reps, args.warmup = min(args.reps, SMOKE_REPS), min(args.warmup, SMOKE_WARMUP)
    writer = harness.RecordWriter(args.out, "host")
    summary: list = []
    run_meta(args, device, writer, summary)
    if device.type == "cuda" and args.cuda:
        run_cuda(args, device, writer, summary)
    env = harness.environment(device)
    v = env["versions"]
    print(f"host cost per layer call, N,K = {args.shape[0]},{args.shape[1]} NF4 double quant, r = {args.r}, "
          f"dropout {args.dropout}; fastlora compiled for {args.target}, launches stubbed; {args.reps} reps"
          + (f"; {args.stack} layers chained per call, figures per layer" if args.stack > 1 else ""))
    print(f"{env['device_name']}, {env['platform']}, Python {env['python']}, torch {v['torch']}, triton {v['triton']}, "
          f"bitsandbytes {v['bitsandbytes']}, peft {v['peft']}")
    print(table(summary))
    return {"bench": "host", "records": writer.count, "path": str(writer.path)}
