"""Gradient checkpoints kept in host memory: ``fastlora.patch(model, offload_checkpoints=True)``.

With gradient checkpointing on, a training step keeps one tensor per decoder layer on the device
between forward and backward: the layer's input, the residual stream [B, S, H], fp32 after
``prepare_model_for_kbit_training``. For Llama-3-8B (32 layers, H 4096) that is 32 · S · 4096 · 4
bytes: 4.3 GB at S = 8192, 17 GB at S = 32768, the largest share of a QLoRA step's peak at long
sequences once the logits are gone (``fastlora.loss``). :class:`OffloadedCheckpoint` keeps those
inputs in host memory instead and brings each back for its layer's recompute:

    forward   run the layer under no_grad; copy its tensor inputs to host memory (on CUDA: a pinned
              buffer, filled by a copy on a side stream, so the compute stream goes on); keep the RNG
              state (CPU and the inputs' CUDA devices) and the autocast state
    backward  copy the inputs back to the device; recompute the layer under enable_grad with that RNG
              and autocast state (the same LoRA dropout masks: fastlora draws its dropout seeds from
              torch's generators); backpropagate the incoming gradients through the recomputed
              outputs; return the inputs' gradients

The parameters' gradients are accumulated by that inner backward, as PyTorch's reentrant
checkpointing accumulates them: ``loss.backward()`` works, ``torch.autograd.grad(loss, params)`` and
``backward(inputs=...)`` do not (they raise, as reentrant checkpointing does).

The first layer's input stays: it is the embedding output, a leaf made to require grad
(``enable_input_require_grads``), which autograd keeps for its gradient either way; the other layers'
inputs leave the device.

While one layer is recomputed and differentiated, its recomputed output and the incoming gradient
are held together (as in PyTorch's reentrant checkpointing): two [B, S, H] tensors more than HF's
non-reentrant checkpointing holds at that moment. Measured on fake tensors (``python -m benchmarks
memory``), Llama-3-8B at 8192 tokens with checkpointing: peak 16.31 GB -> 12.57 GB, 4.16 GB on the host.

Costs: host RAM (pinned) of layers × input bytes, a device-to-host copy per layer in forward (on its
own stream) and a host-to-device copy per layer in backward (on the compute stream, which waits for
it). Hence off by default. On the CPU the "copy" is the tensor itself (nothing to gain, nothing
copied). :func:`host_device` names where the copies go; the memory benchmark makes it ``meta``.

How it is installed: transformers' decoder layers (``GradientCheckpointingLayer``) call
``self._gradient_checkpointing_func(partial(forward, self, **kwargs), *args)`` when checkpointing is
on, and ``PreTrainedModel._set_gradient_checkpointing`` sets that attribute on every layer: it is
what ``gradient_checkpointing_enable``, ``activation_checkpointing_enable``,
``prepare_model_for_kbit_training`` and ``Trainer(gradient_checkpointing=True)`` all call. The model
instance gets a wrapper of that method which re-installs the offloaded function after it runs, and
every layer where checkpointing is already on gets it at once. Each layer's function keeps the one it
replaced and calls it for any call it cannot reproduce exactly (keyword arguments, a captured tensor
that requires grad, no input that requires grad, checkpoint options such as ``context_fn``, grad
disabled, torch.compile tracing), so a gradient is never wrong, at worst not offloaded.
:func:`remove` restores both. transformers' own ``activation_checkpointing_enable(offload=True)``
(every tensor the checkpoint saves goes through ``save_on_cpu``, copied on the compute stream) is
replaced on those layers by this one, which does the same for the layer inputs off the compute stream.
"""

from __future__ import annotations

import collections
import contextlib
import functools
from typing import Optional, Tuple

import torch
from torch import nn

_STATE_ATTR = "_fastlora_offload"
_SET_GC = "_set_gradient_checkpointing"

#: ``torch.utils.checkpoint.checkpoint`` keywords whose effect the offloaded checkpoint reproduces
#: (``preserve_rng_state`` is honoured; the others only tune the non-reentrant implementation)
KNOWN_CHECKPOINT_KWARGS = ("use_reentrant", "preserve_rng_state", "determinism_check", "debug", "early_stop")

#: Why one call ran the replaced checkpoint function (keys of ``stats(model)["fallback"]``).
FALLBACK_REASONS = {
    "keyword_arguments": "the checkpoint function was called with keyword arguments",
    "not_partial": "the checkpointed function is not a functools.partial (what it captures is unknown)",
    "captured_grad": "a tensor captured in the checkpointed function's arguments requires grad",
    "no_grad_input": "no tensor argument requires grad (the parameters' gradients would be lost)",
    "grad_disabled": "grad mode is off (nothing to recompute)",
    "checkpoint_options": "the replaced function has checkpoint options not reproduced here (context_fn, ...)",
    "compiling": "under torch.compile tracing",
}


def host_device() -> torch.device:
    """Where the checkpointed inputs are kept between forward and backward. A module-level function
    so the memory benchmark can make it ``meta`` (fake host memory, not charged to the device)."""
    return torch.device("cpu")


# ------------------------------------------------------------------------------------------------
# the autograd Function
# ------------------------------------------------------------------------------------------------

_SIDE_STREAMS: dict = {}


def _side_stream(device: torch.device):
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = _SIDE_STREAMS.get(index)
    if stream is None:
        stream = _SIDE_STREAMS[index] = torch.cuda.Stream(device=index)
    return stream


def _stash(x: torch.Tensor):
    """(host tensor, CUDA event or None) holding ``x``'s values until backward."""
    host = host_device()
    if x.device == host:
        return x, None                      # already there: keep the reference
    if x.is_leaf and x.requires_grad:
        # autograd keeps a leaf for its gradient while the graph lives (the first layer's input, the
        # embedding output made to require grad by enable_input_require_grads): a copy would be a
        # second one, on the device again in backward
        return x, None
    if x.device.type == "cuda" and host.type == "cpu":
        buf = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        compute = torch.cuda.current_stream(x.device)
        side = _side_stream(x.device)
        side.wait_stream(compute)           # x is written on the compute stream
        with torch.cuda.stream(side):
            buf.copy_(x, non_blocking=True)
            event = torch.cuda.Event()
            event.record(side)
        x.record_stream(side)               # the allocator keeps x's block until the copy is done
        return buf, event
    return x.to(host), None                 # another host (meta in the memory benchmark)


def _unstash(host: torch.Tensor, event, device: torch.device) -> torch.Tensor:
    if host.device == device:
        return host
    if host.device.type == "meta":          # the memory benchmark: only the allocation is real
        return torch.empty(host.shape, dtype=host.dtype, device=device)
    if event is not None:
        torch.cuda.current_stream(device).wait_event(event)
    return host.to(device, non_blocking=host.is_pinned())


def _autocast_state(device_type: str) -> dict:
    state = {"cpu": (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))}
    if device_type != "cpu" and torch.amp.is_autocast_available(device_type):
        state[device_type] = (torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
    return {"devices": state, "cache": torch.is_autocast_cache_enabled()}


@contextlib.contextmanager
def _autocast(state: dict):
    with contextlib.ExitStack() as stack:
        for device_type, (enabled, dtype) in state["devices"].items():
            stack.enter_context(torch.autocast(device_type, dtype=dtype, enabled=enabled,
                                               cache_enabled=state["cache"]))
        yield


class OffloadedCheckpoint(torch.autograd.Function):
    """outputs = function(*args), recomputed in backward from host copies of the tensor ``args``.

    Keeps (on ``ctx``, not ``save_for_backward``: they are copies, not the inputs): per tensor
    argument its host copy (pinned [same shape], or the tensor itself where it already lives on the
    host device or is a leaf that requires grad, which autograd keeps anyway), the CUDA event of its
    copy, its device and requires_grad; the non-tensor arguments;
    ``function`` (a partial holding the layer and its keyword tensors, which the caller holds too);
    the CPU RNG state and the inputs' CUDA devices' RNG states when ``preserve_rng``; the autocast
    state. Nothing of the layer's intermediate activations."""

    @staticmethod
    def forward(ctx, function, preserve_rng, *args):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        device_type = tensors[0].device.type
        ctx.function = function
        ctx.preserve_rng = preserve_rng
        ctx.device_type = device_type
        ctx.autocast = _autocast_state(device_type)
        if preserve_rng:
            ctx.cpu_rng = torch.get_rng_state()
            ctx.rng_devices, ctx.rng_states = ([], []) if device_type == "cpu" else \
                torch.utils.checkpoint.get_device_states(*args)
        # the copies first: on CUDA they run on the side stream while the layer computes
        ctx.stash = [(*_stash(a), a.device, a.requires_grad) if isinstance(a, torch.Tensor) else a
                     for a in args]
        ctx.is_tensor = [isinstance(a, torch.Tensor) for a in args]
        return function(*args)              # Function.forward runs under no_grad

    @staticmethod
    def backward(ctx, *grads):
        if not torch.autograd._is_checkpoint_valid():
            raise RuntimeError("fastlora's offloaded checkpoint works with loss.backward() only, not with "
                               "torch.autograd.grad() or backward(inputs=...): the parameters' gradients are "
                               "accumulated inside the recompute")
        inputs = []
        for is_tensor, item in zip(ctx.is_tensor, ctx.stash):
            if is_tensor:
                host, event, device, requires_grad = item
                item = _unstash(host, event, device).detach().requires_grad_(requires_grad)
            inputs.append(item)
        devices = ctx.rng_devices if ctx.preserve_rng else []
        with torch.random.fork_rng(devices=devices, enabled=ctx.preserve_rng,
                                   device_type=ctx.device_type if ctx.device_type != "cpu" else "cuda"):
            if ctx.preserve_rng:
                torch.set_rng_state(ctx.cpu_rng)
                if devices:
                    torch.utils.checkpoint.set_device_states(devices, ctx.rng_states, device_type=ctx.device_type)
            with torch.enable_grad(), _autocast(ctx.autocast):
                outputs = ctx.function(*inputs)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        pairs = [(o, g) for o, g in zip(outputs, grads)
                 if isinstance(o, torch.Tensor) and o.requires_grad and g is not None]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return (None, None) + tuple(x.grad if isinstance(x, torch.Tensor) else None for x in inputs)


# ------------------------------------------------------------------------------------------------
# the per-layer checkpoint function
# ------------------------------------------------------------------------------------------------


def _captures_grad(obj, depth: int = 0) -> bool:
    """A tensor that requires grad among ``obj``'s tensors (through tuples, lists and dicts)."""
    if isinstance(obj, torch.Tensor):
        return obj.requires_grad
    if depth > 4:
        return False
    if isinstance(obj, (tuple, list)):
        return any(_captures_grad(o, depth + 1) for o in obj)
    if isinstance(obj, dict):
        return any(_captures_grad(o, depth + 1) for o in obj.values())
    return False


class OffloadedCheckpointFunction:
    """A decoder layer's ``_gradient_checkpointing_func`` while offload is on: runs
    :class:`OffloadedCheckpoint`, or ``previous`` (the function it replaced) for a call it cannot
    reproduce. Module-level and plain, so a patched model pickles and deep-copies."""

    def __init__(self, previous, counts):
        self.previous = previous
        self.counts = counts                # shared per model: {"calls": n, "fallback": Counter}

    def _reason(self, function, args, kwargs) -> Optional[str]:
        if torch.compiler.is_compiling():
            return "compiling"
        if kwargs:
            return "keyword_arguments"
        if not torch.is_grad_enabled():
            return "grad_disabled"
        options = getattr(self.previous, "keywords", None) or {}
        if any(k not in KNOWN_CHECKPOINT_KWARGS for k in options):
            return "checkpoint_options"
        if not isinstance(function, functools.partial):
            return "not_partial"
        # the layer's own parameters (behind the partial's module) are leaves of the recompute; a
        # captured tensor that requires grad may have a graph behind it the recompute would cut
        if _captures_grad(function.args) or _captures_grad(function.keywords):
            return "captured_grad"
        if not any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            return "no_grad_input"
        return None

    def __call__(self, function, *args, **kwargs):
        reason = self._reason(function, args, kwargs)
        if reason is not None:
            if not torch.compiler.is_compiling():
                self.counts["fallback"][reason] += 1
            return self.previous(function, *args, **kwargs)
        self.counts["calls"] += 1
        options = getattr(self.previous, "keywords", None) or {}
        return OffloadedCheckpoint.apply(function, bool(options.get("preserve_rng_state", True)), *args)


# ------------------------------------------------------------------------------------------------
# installing it on a model
# ------------------------------------------------------------------------------------------------


def _causal_lm(model: nn.Module) -> nn.Module:
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def _layer_type():
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:
        return None
    return GradientCheckpointingLayer


def support_reason(lm: nn.Module) -> Optional[str]:
    """None where offload can be installed on the transformers model ``lm``, else why not."""
    layer_type = _layer_type()
    if layer_type is None:
        return "transformers has no GradientCheckpointingLayer (transformers < 4.52)"
    if not callable(getattr(lm, _SET_GC, None)):
        return f"{type(lm).__name__} is not a transformers PreTrainedModel (no {_SET_GC})"
    import inspect

    if "value" in inspect.signature(getattr(lm, _SET_GC)).parameters:
        return f"{type(lm).__name__} uses the pre-4.35 gradient checkpointing format"
    if not any(isinstance(m, layer_type) for m in lm.modules()):
        return f"{type(lm).__name__} has no GradientCheckpointingLayer (decoder layer) to offload"
    return None


def _install_on_layers(lm: nn.Module, counts) -> int:
    """Wrap the checkpoint function of every decoder layer that has one; returns how many layers
    hold the offloaded function now."""
    layer_type = _layer_type()
    n = 0
    for m in lm.modules():
        if not isinstance(m, layer_type) or "_gradient_checkpointing_func" not in m.__dict__:
            continue
        fn = m.__dict__["_gradient_checkpointing_func"]
        if not isinstance(fn, OffloadedCheckpointFunction):
            m.__dict__["_gradient_checkpointing_func"] = OffloadedCheckpointFunction(fn, counts)
        n += 1
    return n


def _set_gradient_checkpointing_offloaded(lm, *args, **kwargs):
    """The model's ``_set_gradient_checkpointing``, then the offloaded function on its layers again."""
    state = lm.__dict__[_STATE_ATTR]
    previous = state["previous_set"]
    out = previous(*args, **kwargs) if previous is not None else getattr(type(lm), _SET_GC)(lm, *args, **kwargs)
    _install_on_layers(lm, state["counts"])
    return out


def install(model: nn.Module) -> Tuple[Optional[str], Optional[str]]:
    """Offload the checkpoints of ``model``'s decoder layers (a PeftModel or a transformers model).
    Returns (what was installed, None) or (None, why not)."""
    lm = _causal_lm(model)
    state = lm.__dict__.get(_STATE_ATTR)
    if state is None:
        reason = support_reason(lm)
        if reason is not None:
            return None, reason
        state = {"counts": {"calls": 0, "fallback": collections.Counter()},
                 "previous_set": lm.__dict__.get(_SET_GC)}
        wrapper = functools.partial(_set_gradient_checkpointing_offloaded, lm)
        state["wrapper"] = wrapper
        lm.__dict__[_STATE_ATTR] = state
        lm.__dict__[_SET_GC] = wrapper
    n = _install_on_layers(lm, state["counts"])
    total = sum(1 for m in lm.modules() if isinstance(m, _layer_type()))
    when = "now" if n else "now (checkpointing is off)"
    return (f"{n} of {total} decoder layers {when}, and on every later gradient checkpointing enable"), None


def remove(model: nn.Module) -> bool:
    """Undo :func:`install`: every layer gets back the function its offloaded one replaced, the model
    its own ``_set_gradient_checkpointing``. True where something was restored."""
    lm = _causal_lm(model)
    state = lm.__dict__.get(_STATE_ATTR)
    if state is None:
        return False
    for m in lm.modules():
        fn = m.__dict__.get("_gradient_checkpointing_func")
        if isinstance(fn, OffloadedCheckpointFunction):
            while isinstance(fn, OffloadedCheckpointFunction):
                fn = fn.previous
            m.__dict__["_gradient_checkpointing_func"] = fn
    if lm.__dict__.get(_SET_GC) is state["wrapper"]:
        if state["previous_set"] is None:
            del lm.__dict__[_SET_GC]
        else:
            lm.__dict__[_SET_GC] = state["previous_set"]
    del lm.__dict__[_STATE_ATTR]
    return True


def stats(model: nn.Module) -> dict:
    """``{"calls": offloaded checkpoint calls, "fallback": Counter(reason -> calls)}`` on ``model``
    (zeros where offload is not installed)."""
    state = _causal_lm(model).__dict__.get(_STATE_ATTR)
    if state is None:
        return {"calls": 0, "fallback": collections.Counter()}
    return state["counts"]
