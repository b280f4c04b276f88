"""``fastlora.patch(model)``: run PEFT's LoRA Linear layers through :func:`fastlora.lora_linear`.

One generic patcher keyed on PEFT layer types, no per-model code. For every
``peft.tuners.lora.bnb.Linear4bit`` (over a bitsandbytes ``Linear4bit``) and every
``peft.tuners.lora.layer.Linear`` (over a plain ``nn.Linear``) the *instance's* ``forward`` is
rebound to :func:`_patched_forward` (a ``functools.partial`` of that module-level function and the
layer, stored in the instance's ``__dict__``, so a patched model pickles, deep-copies and loads back
patched); PEFT's own forward is kept and :func:`unpatch` restores it. PEFT's source is never rewritten.

``torch.compile``: the fused op is the custom op ``torch.ops.fastlora.lora_linear``, which Dynamo
keeps as one node; the per-call decision below reads module attributes only (no ``data_ptr()``), so
Dynamo traces it into guards and the compiled graph does not break at patched layers.

The choice between the fused op and PEFT's forward is made on **every call**, from what the layer
holds at that moment (adapters, scaling, dropout module and its training flag, merged/disabled
state, weight, quant_state, dtypes, autocast). The fused op runs only when it computes what PEFT
would; otherwise PEFT's forward runs and the reason is counted on the report
(``report.fallback_calls``) and logged once per layer and reason at DEBUG. Nothing is cached at
patch time.

What "what PEFT would" means, dtype by dtype (peft 0.21 ``lora/bnb.py``, ``lora/layer.py``;
bitsandbytes 0.50 ``Linear4bit.forward``):

- 4-bit: bitsandbytes casts x to the layer's ``compute_dtype`` (set from the first input by
  ``set_compute_type`` when not set: done here the same way), computes X·Wᵀ + bias there and casts
  back to x's dtype. Under autocast on x's device its inner ``F.linear`` runs in the autocast dtype
  instead (bias included). PEFT adds the LoRA term cast to that result dtype. The fused op gives x's
  dtype, the frozen product in the same compute dtype and rounded there, as bitsandbytes rounds it,
  the LoRA term in PEFT's adapter dtype (``lora_dtype``: the autocast dtype under autocast on x's
  device, on the tensor cores; else the adapters' dtype, fp32 with IEEE precision for fp32
  adapters), rounded to fp16 on its own before the sum when x is fp16, as PEFT rounds it (so fp16
  overflows give inf where PEFT's do; see ``fastlora.ops._frozen_product``).
- dense: ``nn.Linear`` needs x in the weight's dtype (PEFT's forward raises otherwise: it is left to
  raise); under autocast everything runs in the autocast dtype and that is the result dtype.
- several active adapters: PEFT sums their terms. The fused op runs them as one adapter of rank
  Σr (A's stacked, B's side by side with each scaling folded in), which is the same sum, as long as
  no dropout is active (independent masks per adapter cannot be one mask).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from torch import nn
from torch.nn.modules import module as _module_globals

from .format import from_bnb, get_quant_state
from .kernels._interpreter import can_run_on
from .kernels._launch import launch_target
from .ops import FLOAT_DTYPES, _run, fp32_products_exact

logger = logging.getLogger("fastlora")

_STATE_ATTR = "_fastlora_patch"

#: The largest |layer.scaling| the fused op takes (alpha/r is 0.1..100 in practice); beyond it PEFT's
#: forward runs (reason ``scaling``)
MAX_FUSED_SCALING = 2.0 ** 20

#: Reasons a LoRA layer is not patched at all (``report.skipped[name]`` starts with one of these keys).
SKIP_REASONS: Dict[str, str] = {
    "unsupported_layer_type": "a PEFT LoRA layer type fastlora has no kernel for (Embedding, Conv, 8-bit, ...)",
    "unsupported_base_layer": "the base layer is not a plain nn.Linear / bitsandbytes Linear4bit",
    "fan_in_fan_out": "fan_in_fan_out=True (a transposed Conv1D-style base weight)",
    "no_plain_adapter": "every adapter of the layer is a LoRA variant (DoRA, ...) or has lora_bias",
    "instance_forward": "the layer's forward was already replaced on the instance (a hook library or "
                        "another patcher): the fused op would bypass that wrapper",
}

#: Reasons one call of a patched layer runs PEFT's own forward (keys of ``report.fallback_calls``).
FALLBACK_REASONS: Dict[str, str] = {
    "adapters_disabled": "adapters are disabled (disable_adapter() context or disable_adapters=True)",
    "merged": "adapters are merged into the base weight",
    "adapter_names": "mixed-adapter batch (adapter_names= keyword)",
    "extra_arguments": "extra positional or keyword arguments to forward",
    "no_active_adapter": "no active adapter lives on this layer",
    "lora_variant": "an active adapter is a LoRA variant (DoRA, ...)",
    "lora_bias": "an active adapter has lora_bias=True",
    "adapter_module": "lora_A/lora_B are not plain bias-free nn.Linear modules",
    "dropout_module": "the LoRA dropout is neither nn.Identity nor nn.Dropout with p < 1",
    "multiple_adapters_dropout": "several active adapters with dropout active (masks must be independent)",
    "device": "the tensors are on a device the kernels cannot run on (CPU needs TRITON_INTERPRET=1)",
    "device_mismatch": "the input, weights and adapters are not all on one device",
    "base_requires_grad": "the base weight or bias requires grad (the op treats the base as frozen)",
    "quant_state": "no usable bitsandbytes 4-bit quant_state (missing, unknown quant type or layout)",
    "packed_for_cpu": "bitsandbytes repacked the weight for its CPU inference kernel",
    "dtype": "dtypes PEFT would reject or promote differently (x vs weight, A vs B, autocast result)",
    "fp32_products": "fp32 adapters without autocast on datacenter Blackwell (sm_100) with Triton < 3.8, "
                     "which compiles fp32 tl.dot there to TF32 tensor-core instructions (not IEEE fp32)",
    "device_dtype": "bfloat16 on a GPU below compute capability 8.0 (T4 and older): fastlora's kernels need "
                    "bf16 tensor cores there; PEFT's forward runs as it would without fastlora",
    "module_hooks": "the base layer, lora_A/lora_B or the dropout has forward/backward hooks or its own "
                    "forward, or global module hooks are registered (accelerate offload, user hooks): "
                    "PEFT's forward runs them, the fused op would not",
    "sharded": "the weight, bias or an adapter is a sharded DTensor (FSDP2 outside its unshard): the fused op "
               "reads whole tensors only",
    "scaling": "layer.scaling beyond ±MAX_FUSED_SCALING (where fp32 sums overflow, which ones depends on the "
               "summation order), or not finite with several active adapters",
    "autocast_compute_dtype": "autocast is on with a dtype other than bitsandbytes' compute_dtype: "
                              "bitsandbytes then picks the dtype by batch size (its small-batch kernel "
                              "ignores autocast), which the fused op does not reproduce",
}


@dataclass
class PatchReport:
    """What :func:`patch` did, and (live) what the patched layers have done since.

    patched:         names of the layers patched by this call
    skipped:         name -> reason (a ``SKIP_REASONS`` key, ": ", details)
    already_patched: names patched by an earlier call (left as they are)
    fused_calls:     eager calls of this report's layers that ran the fused op
    fallback_calls:  reason (``FALLBACK_REASONS`` key) -> eager calls that ran PEFT's forward

    Calls from a ``torch.compile`` graph are not counted: the decision is traced into the graph's
    guards, and a count Dynamo traced would be a guarded constant, recompiling the graph on every call.
    """

    patched: List[str] = field(default_factory=list)
    skipped: Dict[str, str] = field(default_factory=dict)
    already_patched: List[str] = field(default_factory=list)
    fused_calls: int = 0
    fallback_calls: collections.Counter = field(default_factory=collections.Counter)
    kinds: Dict[str, str] = field(default_factory=dict)  # name -> "4bit" | "dense"
    restored: List[str] = field(default_factory=list)  # patched layers re-created by pickle / deepcopy
    loss: Optional[str] = None          # the causal LM class whose loss runs chunked (fastlora.loss)
    loss_skipped: Optional[str] = None  # why the loss was left as it is (None: applied, or not asked)
    liger_applied: Dict[str, List[str]] = field(default_factory=dict)  # Liger piece -> module names
    liger_skipped: Dict[str, str] = field(default_factory=dict)  # Liger piece -> why (not) everywhere
    offload: Optional[str] = None          # where checkpoints go to host memory (fastlora.offload)
    offload_skipped: Optional[str] = None  # why they do not (None: installed, or not asked)
    _logged: set = field(default_factory=set, repr=False)

    def summary(self) -> str:
        n4 = sum(1 for n in self.patched if self.kinds.get(n) == "4bit")
        projections = collections.Counter(n.rsplit(".", 1)[-1] for n in self.patched)
        proj = ", ".join(f"{k}×{v}" for k, v in sorted(projections.items())) or "none"
        total = len(self.patched) + len(self.skipped) + len(self.already_patched)
        line = (
            f"patched {len(self.patched)} of {total} LoRA layers "
            f"({n4} 4-bit, {len(self.patched) - n4} dense) [{proj}]; "
            f"{len(self.skipped)} fell back to PEFT"
        )
        if self.already_patched:
            line += f"; {len(self.already_patched)} already patched"
        if self.loss:
            line += f"; loss: chunked cross-entropy on {self.loss} (no logits in training)"
        elif self.loss_skipped:
            line += f"; loss left as it is ({self.loss_skipped})"
        if self.liger_applied or self.liger_skipped:
            done = ", ".join(f"{p}×{len(n)}" for p, n in self.liger_applied.items()) or "nothing"
            line += f"; Liger: {done}"
            if self.liger_skipped:
                line += " (skipped: " + "; ".join(f"{p}: {r}" for p, r in self.liger_skipped.items()) + ")"
        if self.offload:
            line += f"; checkpoints offloaded to host memory: {self.offload}"
        elif self.offload_skipped:
            line += f"; checkpoints not offloaded ({self.offload_skipped})"
        return line

    def _fallback(self, name: str, reason: str) -> None:
        # eager calls only (see _patched_forward); a logging call would break a torch.compile graph too
        if torch.compiler.is_compiling():
            return
        self.fallback_calls[reason] += 1
        if (name, reason) not in self._logged:
            self._logged.add((name, reason))
            logger.debug("%s runs PEFT's forward: %s (%s)", name, reason, FALLBACK_REASONS[reason])


class _LayerPatch:
    """Per-layer record kept on the module instance: the report, the name, the kind, and the last
    Packed4bit view of the layer's weight (see :meth:`packed_for`).

    Pickles with the layer (``torch.save(model)``, ``copy.deepcopy``): the report and the name travel,
    the Packed4bit view does not (it is rebuilt from the loaded tensors on the first call), and the
    layer's name is added to ``report.restored``."""

    __slots__ = ("report", "name", "kind", "packed_key", "packed_objs", "packed")

    def __getstate__(self):
        return {"report": self.report, "name": self.name, "kind": self.kind}

    def __setstate__(self, state):
        self.report = state["report"]
        self.name = state["name"]
        self.kind = state["kind"]
        self.packed_key = self.packed_objs = self.packed = None
        if self.name not in self.report.restored:
            self.report.restored.append(self.name)

    def __init__(self, report, name, kind):
        self.report = report
        self.name = name
        self.kind = kind
        self.packed_key = None  # identity of (weight storage, quant_state, its tensors) behind .packed
        self.packed_objs = None  # those objects, kept alive while their ids are in packed_key
        self.packed = None

    def packed_for(self, weight, qs):
        """The Packed4bit for (weight, quant_state) as they are now. Rebuilt whenever the weight's
        storage, the quant_state or any of its tensors is another object than last call: reading at
        call time without re-validating the same objects on every call.

        Under torch.compile the view is built afresh while tracing (no cache, no ``data_ptr()``):
        it is a few views and attribute reads, which Dynamo turns into guards on the same objects."""
        if torch.compiler.is_compiling():
            return from_bnb(weight, qs)
        state2 = getattr(qs, "state2", None)
        absmax = qs.absmax
        objs = (weight, qs, absmax, getattr(qs, "code", None), getattr(qs, "offset", None), state2,
                getattr(state2, "absmax", None))
        # the objects by id (one tuple compare in C; a tensor's == would compare elements): ids are
        # unique while the objects live, and packed_objs keeps the last call's alive
        key = (tuple(map(id, objs)), weight.data_ptr(), absmax.data_ptr(), qs.quant_type, qs.blocksize,
               tuple(qs.shape))
        if key != self.packed_key:
            self.packed = from_bnb(weight, qs)
            self.packed_key, self.packed_objs = key, objs
        return self.packed


# ------------------------------------------------------------------------------------------------
# layer types
# ------------------------------------------------------------------------------------------------


def _lora_types():
    from peft.tuners.lora.layer import Linear as LoraLinear
    from peft.tuners.lora.layer import LoraLayer

    try:
        from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit
    except ImportError:  # bitsandbytes missing: PEFT does not define the class
        LoraLinear4bit = None
    return LoraLayer, LoraLinear, LoraLinear4bit


def _is_bnb_linear4bit(module) -> bool:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return False
    # LinearNF4 / LinearFP4 subclass Linear4bit without changing its forward
    return type(module) in (bnb.nn.Linear4bit, bnb.nn.LinearNF4, bnb.nn.LinearFP4)


def _plain_adapter(layer, adapter) -> bool:
    return adapter not in getattr(layer, "lora_variant", {}) and not getattr(layer, "use_dora", {}).get(adapter) \
        and not getattr(layer, "lora_bias", {}).get(adapter, False)


def _classify(layer, types):
    """('4bit' | 'dense', None) when the layer can be patched, else (None, skip reason)."""
    _, LoraLinear, LoraLinear4bit = types
    base = getattr(layer, "base_layer", None)
    if LoraLinear4bit is not None and type(layer) is LoraLinear4bit:
        if not _is_bnb_linear4bit(base):
            return None, f"unsupported_base_layer: {type(base).__name__}"
        kind = "4bit"
    elif type(layer) is LoraLinear:
        if type(base) is not nn.Linear:
            return None, f"unsupported_base_layer: {type(base).__name__}"
        if getattr(layer, "fan_in_fan_out", False):
            return None, "fan_in_fan_out: the base weight is stored transposed"
        kind = "dense"
    else:
        return None, f"unsupported_layer_type: {type(layer).__module__}.{type(layer).__name__}"
    adapters = list(layer.lora_A.keys())
    if adapters and not any(_plain_adapter(layer, a) for a in adapters):
        what = sorted({type(layer.lora_variant[a]).__name__ if a in getattr(layer, "lora_variant", {})
                       else "lora_bias" for a in adapters})
        return None, f"no_plain_adapter: {', '.join(what)} on {', '.join(adapters)}"
    return kind, None


# ------------------------------------------------------------------------------------------------
# the per-call decision
# ------------------------------------------------------------------------------------------------




_NO_AUTOCAST = {"meta"}   # device types autocast does not know (asking raises: tens of µs per call)


def _autocast_dtype(device_type: str):
    """The autocast dtype in effect for ``device_type``, or None."""
    if device_type in _NO_AUTOCAST:
        return None
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except (TypeError, RuntimeError):
        _NO_AUTOCAST.add(device_type)
    return None


def _has_hooks(module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or "forward" in module.__dict__)


def _global_hooks() -> bool:
    m = _module_globals
    return bool(m._global_forward_hooks or m._global_forward_pre_hooks or m._global_backward_hooks
                or m._global_backward_pre_hooks)


def _dtensor_class():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed
        return ()
    return DTensor


_DTENSOR = []   # DTensor's class, resolved at the first call (an import statement per call costs µs)


def _is_sharded(*tensors) -> bool:
    """True when any tensor is a DTensor (FSDP2's sharded parameters outside its unshard window)."""
    if not _DTENSOR:
        _DTENSOR.append(_dtensor_class())
    cls = _DTENSOR[0]
    return any(isinstance(t, cls) for t in tensors if t is not None)


def _call_reason(layer, x, args, kwargs):
    """A fallback reason that the call itself or the layer's merged/disabled state gives, or None."""
    if kwargs:
        if kwargs.get("adapter_names") is not None:
            return "adapter_names"
        # PEFT pops adapter_names and passes every other keyword on to the base layer, even one set
        # to None (nn.Linear and bitsandbytes' Linear4bit then raise a TypeError): PEFT's forward decides
        if len(kwargs) > 1 or "adapter_names" not in kwargs:
            return "extra_arguments"
    if args or not isinstance(x, torch.Tensor):
        return "extra_arguments"
    if layer.disable_adapters:
        return "adapters_disabled"
    if layer.merged:
        return "merged"
    return None


def _sub(module, name):
    """``module.<name>``, a submodule, read from ``_modules`` where it is registered there (every read
    through ``nn.Module.__getattr__`` costs about a µs, and a call makes a few dozen)."""
    m = module._modules.get(name)
    return m if m is not None else getattr(module, name)


def _param(module, name):
    """``getattr(module, name, None)`` for a parameter, read from ``_parameters`` where it is
    registered there (a registered None included)."""
    d = module._parameters
    return d[name] if name in d else getattr(module, name, None)


def _adapters(layer):
    """(names, As, Bs, scalings, dropout ps, [(lora_A, lora_B, dropout) modules]) of the active
    adapters as the fused op takes them, or a fallback reason."""
    lora_A, lora_B, lora_dropout = _sub(layer, "lora_A"), _sub(layer, "lora_B"), _sub(layer, "lora_dropout")
    adapters = [a for a in layer.active_adapters if a in lora_A]
    if not adapters:
        return "no_active_adapter"
    variants, dora, lora_bias = (getattr(layer, "lora_variant", {}), getattr(layer, "use_dora", {}),
                                 getattr(layer, "lora_bias", {}))
    As, Bs, scalings, ps, modules = [], [], [], [], []
    for a in adapters:
        if a in variants or dora.get(a):
            return "lora_variant"
        lA, lB = lora_A[a], lora_B[a]
        wA, wB = _param(lA, "weight"), _param(lB, "weight")
        if _is_sharded(wA, wB):
            return "sharded"  # an FSDP2 unit of its own: whole only inside its own forward
        if lora_bias.get(a, False) or _param(lB, "bias") is not None:
            return "lora_bias"
        if type(lA) is not nn.Linear or type(lB) is not nn.Linear or _param(lA, "bias") is not None:
            return "adapter_module"
        drop = lora_dropout[a]
        if type(drop) is nn.Identity:
            p = 0.0
        elif type(drop) is nn.Dropout and 0.0 <= drop.p < 1.0:
            p = float(drop.p) if drop.training else 0.0
        else:
            return "dropout_module"
        As.append(wA)
        Bs.append(wB)
        scalings.append(float(layer.scaling[a]))
        ps.append(p)
        modules.append((lA, lB, drop))
    if len(adapters) > 1 and any(p > 0.0 for p in ps):
        return "multiple_adapters_dropout"
    for sc in scalings:
        # inf/NaN: the fused op gives PEFT's inf/NaN pattern (inf·0 = NaN, and a sum holding an inf
        # is inf or NaN whatever its order); a huge finite scale overflows partial sums, and which
        # ones depends on the summation order, which only PEFT's own path reproduces
        if (math.isfinite(sc) and abs(sc) > MAX_FUSED_SCALING) or (len(adapters) > 1 and not math.isfinite(sc)):
            return "scaling"
    return adapters, As, Bs, scalings, ps, modules


def _tensors_reason(base, modules, x, weight, bias, As, Bs):
    """A fallback reason from hooks, shards, devices, requires_grad or dtypes, or None."""
    # plain loops: a generator expression per check costs more than the checks (called every call)
    if _global_hooks() or _has_hooks(base):
        return "module_hooks"
    for ms in modules:
        for m in ms:
            if _has_hooks(m):
                return "module_hooks"
    if _is_sharded(weight, bias):   # the adapters' weights: checked by _adapters
        return "sharded"
    dev = x.device
    if not can_run_on(dev):
        return "device"
    if weight.device != dev or (bias is not None and bias.device != dev):
        return "device_mismatch"
    lora_dtype = As[0].dtype
    dtype_ok = x.dtype in FLOAT_DTYPES and lora_dtype in FLOAT_DTYPES
    for t in As + Bs:
        if t.device != dev:
            return "device_mismatch"
        if t.dtype != lora_dtype:
            dtype_ok = False
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        return "base_requires_grad"
    if not dtype_ok:
        return "dtype"
    return None


def _base_4bit(layer, st, x, weight, bias, ac, lora_dtype):
    """(weight as Packed4bit, bias, compute dtype, x as the op takes it) for a bitsandbytes 4-bit base
    layer, as bitsandbytes' forward would compute it, or a fallback reason."""
    base = _sub(layer, "base_layer")
    qs = get_quant_state(base)
    if qs is None:
        return "quant_state"
    if getattr(qs, "packing_format_for_cpu", False):
        return "packed_for_cpu"
    try:
        w = st.packed_for(weight, qs)
    except (TypeError, ValueError):
        return "quant_state"
    # PEFT adds the LoRA term to bitsandbytes' result (x's dtype). Only with CUDA autocast
    # (the no-argument torch.is_autocast_enabled() PEFT asks) does it skip the cast back, so
    # the sum may promote; the fused op returns x's dtype, so it runs only where that is the dtype.
    if torch.is_autocast_enabled():
        term_dtype = ac if ac is not None else lora_dtype
        if ac is None and x.dtype != lora_dtype:
            return "dtype"
        if torch.promote_types(x.dtype, term_dtype) != x.dtype:
            return "dtype"
    if not getattr(base, "compute_type_is_set", True):
        # what bitsandbytes' forward does on its first call: may switch compute_dtype to x's dtype
        base.set_compute_type(x)
        base.compute_type_is_set = True
    bnb_dtype = base.compute_dtype if base.compute_dtype is not None else x.dtype
    if bnb_dtype not in FLOAT_DTYPES:
        return "dtype"
    if ac is not None and ac != bnb_dtype:
        return "autocast_compute_dtype"
    # bitsandbytes' forward also converts base.bias.data to its compute dtype in place; the
    # values it then adds are the same as the cast below, so the module is left untouched
    # (patched or not, a state_dict stays what the user loaded).
    if bias is not None and bias.dtype != bnb_dtype:
        bias = bias.to(bnb_dtype)
    return w, bias, (ac if ac is not None else bnb_dtype), x


def _base_dense(weight, bias, x, ac):
    """(weight, bias, compute dtype, x as the op takes it) for an nn.Linear base, or a fallback reason."""
    if weight.dtype not in FLOAT_DTYPES:
        return "dtype"
    if ac is None:
        if x.dtype != weight.dtype:
            return "dtype"  # nn.Linear raises on it; let PEFT's forward raise the same error
        return weight, bias, weight.dtype, x
    return weight, bias, ac, x.to(ac)  # autocast runs both the base and the LoRA linears on x in this dtype


_PLAIN_READS = torch._C.DisableTorchFunctionSubclass


def _plan(layer, st, x, args, kwargs):
    """A fallback reason (str), or the fused call's arguments (dict). Reads everything now."""
    reason = _call_reason(layer, x, args, kwargs)
    if reason is not None:
        return reason
    got = _adapters(layer)
    if isinstance(got, str):
        return got
    adapters, As, Bs, scalings, ps, modules = got
    base = _sub(layer, "base_layer")
    weight, bias = _param(base, "weight"), _param(base, "bias")
    # bitsandbytes' Params4bit overrides __torch_function__, so each attribute read of the 4-bit
    # weight (device, requires_grad, data_ptr) runs its handler: ~2.5 µs a read. The checks that
    # read it run with subclass handlers off (the same values, ~0.15 µs a read); traced, as written
    plain = _PLAIN_READS() if not torch.compiler.is_compiling() else contextlib.nullcontext()
    with plain:
        reason = _tensors_reason(base, modules, x, weight, bias, As, Bs)
    if reason is not None:
        return reason
    lora_dtype = As[0].dtype
    ac = _autocast_dtype(x.device.type)
    if not getattr(layer, "cast_input_dtype_enabled", True) and ac is None and x.dtype != lora_dtype:
        return "dtype"  # PEFT would feed x uncast to lora_A and F.linear would raise
    if st.kind == "4bit":
        with plain:
            got = _base_4bit(layer, st, x, weight, bias, ac, lora_dtype)
    else:
        got = _base_dense(weight, bias, x, ac)
    if isinstance(got, str):
        return got
    w, bias, compute, x_in = got
    if bias is not None and bias.dtype != compute:
        bias = bias.to(compute)
    # PEFT's adapters run in the autocast dtype under autocast, else in their own dtype
    lora_dt = ac if ac is not None else lora_dtype
    target = launch_target(x.device)
    if target is not None and not target.has_bf16 and torch.bfloat16 in (compute, x_in.dtype, lora_dt):
        return "device_dtype"
    if lora_dt == torch.float32 and not fp32_products_exact(target):
        return "fp32_products"

    if len(adapters) == 1:
        lora_A, lora_B, scaling = As[0], Bs[0], scalings[0]
    else:
        # Σ s_i·B_i·A_i·x as one rank-Σr adapter; autograd routes the gradients back to each A_i, B_i
        lora_A = torch.cat(As, dim=0)
        lora_B = torch.cat([b * s for b, s in zip(Bs, scalings)], dim=1)
        scaling = 1.0
    return dict(x=x_in, w=w, lora_A=lora_A, lora_B=lora_B, scaling=scaling, bias=bias, strategy="auto",
                dropout_p=ps[0], compute_dtype=compute, lora_dtype=lora_dt)


def _call_prev(layer, st, x, args, kwargs):
    return type(layer).forward(layer, x, *args, **kwargs)


def _patched_forward(self, x, *args, **kwargs):
    """The forward a patched layer runs: the fused op when it gives PEFT's result, else PEFT's.
    Stored on the layer as ``functools.partial(_patched_forward, layer)``: it pickles by reference to
    this module-level function."""
    st = self.__dict__[_STATE_ATTR]
    plan = _plan(self, st, x, args, kwargs)
    if isinstance(plan, str):
        st.report._fallback(st.name, plan)
        return _call_prev(self, st, x, args, kwargs)
    if not torch.compiler.is_compiling():
        st.report.fused_calls += 1
    # under autocast too: the op's dtypes are explicit, and the one ATen product it runs (cuBLAS's,
    # in the dequant strategy) switches autocast off around itself
    return _run(**plan)  # lora_linear past its argument checks: _plan made them, from the layer


# ------------------------------------------------------------------------------------------------
# patch / unpatch
# ------------------------------------------------------------------------------------------------


def _peft_method(layer) -> str:
    """'IA3 (peft.tuners.ia3.layer.Linear)': the PEFT method of a tuner layer, from the tuner package
    its class lives in (peft.tuners.<method>.*), spelled as PEFT's PeftType spells it."""
    cls = f"{type(layer).__module__}.{type(layer).__qualname__}"
    parts = type(layer).__module__.split(".")
    method = parts[2] if len(parts) > 2 and parts[:2] == ["peft", "tuners"] else None
    if method is None:
        return cls
    try:
        from peft.utils import PeftType

        names = {t.value.lower(): t.value for t in PeftType}
    except ImportError:
        names = {}
    return f"{names.get(method, method.upper())} ({cls})"


def _lora_layers(model, what: str):
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"fastlora.{what} takes a PEFT LoRA model (a PeftModel or an nn.Module with PEFT LoRA layers "
            f"injected), got {type(model).__module__}.{type(model).__name__}"
        )
    types = _lora_types()
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, types[0])]
    if not layers:
        try:
            from peft.tuners.tuners_utils import BaseTunerLayer

            other = sorted({_peft_method(m) for m in model.modules() if isinstance(m, BaseTunerLayer)})
        except ImportError:
            other = []
        n_linear = sum(1 for m in model.modules() if isinstance(m, nn.Linear))
        found = (f"PEFT layers of other methods ({', '.join(other)})" if other
                 else f"no PEFT layer at all ({n_linear} nn.Linear modules)")
        raise ValueError(
            f"fastlora patches PEFT LoRA models, but {type(model).__name__} has no PEFT LoRA layer: found {found}. "
            "Wrap the model with peft.get_peft_model(model, LoraConfig(...)) first."
        )
    return layers, types


def patch(model: nn.Module, *, chunked_loss: bool = True, liger=None,
          offload_checkpoints: bool = False) -> PatchReport:
    """Make every eligible PEFT LoRA Linear layer of ``model`` run fastlora's fused op.

    ``chunked_loss`` (default on): a Llama / Mistral / Qwen2 / Qwen3 causal LM computes its training
    loss without the [tokens, vocab] logits (:mod:`fastlora.loss`): the same loss and gradients, and
    ``outputs.logits`` is None for calls in training mode with ``labels`` (every other call returns
    the logits as before). On by default because the logits are a QLoRA step's largest memory; pass
    False where a training loop reads the logits of a call that also passes labels.

    ``liger`` (default None, which means off): Liger-Kernel's RMSNorm, SwiGLU, RoPE and fused linear
    cross-entropy bound on this model's modules only (:mod:`fastlora.liger`; Llama, Mistral, Qwen2;
    ``pip install fastlora[liger]``). ``True`` applies every piece, a collection of names
    (``("rope", "fused_linear_cross_entropy")``) those. Off unless asked for, even when Liger is
    installed: its fused cross-entropy returns ``logits=None`` in training (as ``chunked_loss`` does,
    which then already holds the loss and keeps Liger's from applying), and its kernels round
    differently from the HF forwards. ``report.liger_applied`` / ``report.liger_skipped`` say what
    was done; :func:`unpatch` undoes it.

    ``offload_checkpoints`` (default off): with gradient checkpointing on, each decoder layer's input
    (the fp32 residual stream, layers × tokens × hidden × 4 bytes: 4.3 GB for Llama-3-8B at 8192
    tokens) waits for backward in pinned host memory instead of on the GPU, and is copied back for
    its layer's recompute (:mod:`fastlora.offload`; same loss and gradients, dropout masks included).
    It costs that much host RAM and a PCIe copy each way per layer and step, hence opt-in. Installed
    on the layers where checkpointing is on and again by every later ``gradient_checkpointing_enable``
    (``Trainer(gradient_checkpointing=True)`` calls it at train start); ``report.offload`` says where.

    Returns a :class:`PatchReport`; logs a summary line (logger ``"fastlora"``) and one line per
    distinct reason a layer was skipped. Patching an already patched model patches nothing new.
    """
    if not isinstance(chunked_loss, bool):
        raise TypeError(f"fastlora.patch: chunked_loss must be True or False, got {chunked_loss!r}")
    if not isinstance(offload_checkpoints, bool):
        raise TypeError(f"fastlora.patch: offload_checkpoints must be True or False, got {offload_checkpoints!r}")
    layers, types = _lora_layers(model, "patch")
    from .liger import resolve as _liger_pieces

    liger_pieces = _liger_pieces(liger)  # bad arguments / Liger missing raise before anything changes
    report = PatchReport()
    if chunked_loss:
        from .loss import patch_loss

        report.loss, report.loss_skipped = patch_loss(model)
    if offload_checkpoints:
        from .offload import install as _install_offload

        report.offload, report.offload_skipped = _install_offload(model)
    for name, layer in layers:
        if _STATE_ATTR in layer.__dict__:
            report.already_patched.append(name)
            continue
        kind, reason = _classify(layer, types)
        if kind is None:
            report.skipped[name] = reason
            continue
        prev = layer.__dict__.get("forward")
        if prev is not None:
            what = getattr(prev, "__qualname__", type(prev).__name__)
            report.skipped[name] = f"instance_forward: {what}"
            continue
        layer.__dict__[_STATE_ATTR] = _LayerPatch(report, name, kind)
        # an instance attribute shadows the class's forward for this module only
        layer.__dict__["forward"] = functools.partial(_patched_forward, layer)
        report.patched.append(name)
        report.kinds[name] = kind
    if liger_pieces:
        from .liger import apply as _apply_liger

        _apply_liger(model, liger_pieces, report)

    if not report.patched and report.already_patched:
        logger.info("nothing new to patch: %d LoRA layers already patched, %d left on PEFT's forward",
                    len(report.already_patched), len(report.skipped))
        return report
    logger.info(report.summary())
    by_reason = collections.defaultdict(list)
    for name, reason in report.skipped.items():
        by_reason[reason.split(":", 1)[0]].append(name)
    for key, names in by_reason.items():
        logger.info("%d layer(s) keep PEFT's forward: %s [%s], e.g. %s",
                    len(names), report.skipped[names[0]], SKIP_REASONS[key], names[0])
    if not report.patched and not report.already_patched:
        msg = (f"patched none of the {len(report.skipped)} LoRA layers; they keep PEFT's forward. "
               f"Reasons: {sorted(by_reason)}")
        logger.warning(msg)
        warnings.warn("fastlora " + msg, UserWarning, stacklevel=2)
    return report


def _is_our_forward(fn, layer) -> bool:
    return (isinstance(fn, functools.partial) and fn.func is _patched_forward and len(fn.args) == 1
            and fn.args[0] is layer and not fn.keywords)


def unpatch(model: nn.Module) -> List[str]:
    """Restore PEFT's forward on every layer :func:`patch` changed. Returns the restored names."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastlora.unpatch takes an nn.Module, got {type(model).__module__}.{type(model).__name__}")
    restored, wrapped = [], []
    for name, layer in model.named_modules():
        if _STATE_ATTR not in layer.__dict__:
            continue
        if not _is_our_forward(layer.__dict__.get("forward"), layer):
            # something wrapped the patched forward after patch(): removing it would drop that
            # wrapper too, so the layer stays patched (and keeps working)
            wrapped.append(name)
            continue
        del layer.__dict__["forward"]
        del layer.__dict__[_STATE_ATTR]
        restored.append(name)
    from .loss import unpatch_loss

    if unpatch_loss(model):
        logger.info("restored the model's own loss")
    from .offload import remove as _remove_offload

    if _remove_offload(model):
        logger.info("restored the decoder layers' own gradient checkpointing")
    from .liger import remove as _remove_liger

    liger_restored, liger_wrapped = _remove_liger(model)
    if liger_restored:
        logger.info("removed Liger's ops from %d modules", len(liger_restored))
    restored += liger_restored
    wrapped += liger_wrapped
    logger.info("unpatched %d LoRA layers", len(restored))
    if restored:
        # split-K's partials buffer, kept between calls: a later call of a patched layer allocates
        # it again
        from .kernels.lora_matmul import release_partials

        release_partials()
    if wrapped:
        msg = (f"left {len(wrapped)} layer(s) patched because their forward was wrapped after "
               f"fastlora.patch (e.g. {wrapped[0]}); remove that wrapper first")
        logger.warning(msg)
        warnings.warn("fastlora " + msg, UserWarning, stacklevel=2)
    return restored


def is_patched(module: nn.Module) -> bool:
    """True when ``module`` is a LoRA layer whose forward fastlora patched."""
    return _STATE_ATTR in module.__dict__
