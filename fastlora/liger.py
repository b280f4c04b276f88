"""Liger-Kernel's RMSNorm, SwiGLU, RoPE and fused linear cross-entropy on one model instance.

``fastlora.patch(model, liger=...)`` calls :func:`apply` after patching the LoRA layers, and
:func:`fastlora.unpatch` calls :func:`remove`. Liger-Kernel is an optional dependency
(``pip install fastlora[liger]``); nothing here imports it until a piece is asked for.

Instance only. Liger's own ``apply_liger_kernel_to_llama(model=...)`` (0.8.5) also rebinds names in
``transformers.models.llama.modeling_llama`` (``apply_rotary_pos_emb``, ``LlamaRMSNorm``,
``LlamaMLP``), which changes every Llama built or run afterwards in the process, and sets attributes
(``offset``, ``casting_mode``, ...) on the norms it patches. fastlora uses Liger's functional ops
(``liger_kernel.transformers.functional``) only, and binds a forward on each module it changes,
the way the patcher binds the LoRA layers' forwards: ``module.__dict__["forward"]`` holds
``functools.partial(<module-level function>, module)`` (it pickles by reference), plus one marker
attribute naming the piece. No module is replaced, no parameter or buffer is touched, and
:func:`remove` deletes the two entries, which leaves the class's forward in effect again.

The pieces, and the module each binds (``P`` is ``Llama``, ``Mistral`` or ``Qwen2``):

- ``rms_norm``: every ``PRMSNorm``: ``liger_rms_norm(x, weight, eps)`` ("llama" casting, not in place).
- ``swiglu``: every ``PMLP`` (``hidden_act`` silu): ``down_proj(liger_swiglu(gate_proj(x), up_proj(x)))``;
  the three projections are still called as modules, so fastlora's LoRA layers run inside.
- ``rope``: every ``PAttention``: the class's own ``forward`` code, run with globals in which
  ``apply_rotary_pos_emb`` is ``liger_rope`` (every other global is read from the modeling module as
  it is at call time). The modeling module itself is not changed.
- ``fused_linear_cross_entropy``: the ``PForCausalLM``: with labels in training mode, the loss comes
  from ``liger_fused_linear_cross_entropy(hidden, lm_head.weight, shifted labels)`` without
  materializing the logits; the output's ``logits`` is then ``None``. Without labels, in eval mode,
  or with ``logits_to_keep``, the class's forward runs.

Every bound forward decides per call, from what the call holds, and runs the module's own forward
where Liger's op would not compute what it computes: tensors on a device the Triton kernels cannot
run on (a CPU without ``TRITON_INTERPRET=1``), dtypes the HF forward would promote (e.g. an fp32 norm
weight after ``prepare_model_for_kbit_training`` with bf16 activations), ``unsqueeze_dim != 1``,
an ``lm_head`` that is not a plain ``nn.Linear`` (a LoRA layer, hooks), a loss other than HF's
causal-LM cross-entropy or another ``ignore_index``.
"""

from __future__ import annotations

import functools
import types
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

from .kernels._interpreter import can_run_on

PIECES: Tuple[str, ...] = ("rms_norm", "swiglu", "rope", "fused_linear_cross_entropy")

#: model_type -> (transformers modeling module, class-name prefix)
ARCHITECTURES: Dict[str, Tuple[str, str]] = {
    "llama": ("transformers.models.llama.modeling_llama", "Llama"),
    "mistral": ("transformers.models.mistral.modeling_mistral", "Mistral"),
    "qwen2": ("transformers.models.qwen2.modeling_qwen2", "Qwen2"),
}

INSTALL_HINT = "pip install fastlora[liger]"
_STATE_ATTR = "_fastlora_liger"
_OWN_LOSS_ATTR = "_fastlora_loss"  # fastlora.loss's marker on a causal LM whose loss it computes


# ------------------------------------------------------------------------------------------------
# the argument
# ------------------------------------------------------------------------------------------------


def resolve(liger) -> Tuple[str, ...]:
    """The pieces ``patch(model, liger=...)`` asks for, validated before anything is changed.

    ``None`` / ``False``: none (Liger is off unless asked for: its fused cross-entropy returns
    ``logits=None`` in training, and its kernels round differently from the HF forwards).
    ``True``: all of :data:`PIECES`. A collection of names: those. Raises ``TypeError`` /
    ``ValueError`` for anything else, ``ImportError`` naming ``pip install fastlora[liger]`` when
    pieces are asked for and Liger-Kernel is not installed.
    """
    if liger is None or liger is False:
        return ()
    if liger is True:
        pieces = PIECES
    elif isinstance(liger, str):
        raise TypeError(f"liger= takes True, False, None or a collection of piece names such as "
                        f"({liger!r},), not the string {liger!r}; valid names: {', '.join(PIECES)}")
    else:
        try:
            pieces = tuple(liger)
        except TypeError:
            raise TypeError(f"liger= takes True, False, None or a collection of piece names, got "
                            f"{type(liger).__name__}; valid names: {', '.join(PIECES)}") from None
        bad = [p for p in pieces if not isinstance(p, str) or p not in PIECES]
        if bad:
            raise ValueError(f"unknown Liger piece(s) {bad}; valid names: {', '.join(PIECES)}")
        pieces = tuple(p for p in PIECES if p in pieces)  # canonical order, no duplicates
    if pieces:
        _functional()
    return pieces


def _functional():
    """``liger_kernel.transformers.functional``, looked up on every call (so a test can count calls)."""
    try:
        import liger_kernel.transformers.functional as lf
    except ImportError as e:
        raise ImportError(f"fastlora.patch(model, liger=...) needs Liger-Kernel: {INSTALL_HINT} "
                          f"(or pip install 'liger-kernel>=0.8,<0.9'); import failed: {e}") from e
    return lf


# ------------------------------------------------------------------------------------------------
# the bound forwards
# ------------------------------------------------------------------------------------------------


def _rms_norm_forward(self, hidden_states):
    w = self.weight
    if not can_run_on(hidden_states.device) or w.dtype != hidden_states.dtype or w.device != hidden_states.device:
        return type(self).forward(self, hidden_states)
    # in_place=False: dX gets its own buffer rather than overwriting dY
    return _functional().liger_rms_norm(hidden_states, w, self.variance_epsilon, 0.0, "llama", False)


def _swiglu_forward(self, x):
    a = self.gate_proj(x)  # the order HF's forward calls them in (dropout RNG, hooks)
    b = self.up_proj(x)
    if can_run_on(a.device) and a.dtype == b.dtype and a.device == b.device and a.shape == b.shape:
        h = _functional().liger_swiglu(a, b)
    else:
        h = self.act_fn(a) * b
    return self.down_proj(h)


def _liger_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1, *, hf_globals):
    """``apply_rotary_pos_emb`` as the attention forwards call it, through ``liger_rope``; other
    layouts and devices go to the modeling module's own function (read from ``hf_globals`` now)."""
    if (unsqueeze_dim == 1 and can_run_on(q.device) and q.dim() == 4 and k.dim() == 4 and cos.dim() == 3
            and q.dtype == k.dtype == cos.dtype == sin.dtype and q.shape[-1] % 2 == 0):
        return _functional().liger_rope(q, k, cos, sin, None, 1)
    return hf_globals["apply_rotary_pos_emb"](q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)


class _Globals(dict):
    """A modeling module's globals with ``apply_rotary_pos_emb`` rebound: every other name is read
    from the module's own namespace at call time, so later changes to it are seen."""

    def __init__(self, module_globals):
        super().__init__(__builtins__=module_globals["__builtins__"],
                         apply_rotary_pos_emb=functools.partial(_liger_rotary_pos_emb, hf_globals=module_globals))
        self.module_globals = module_globals

    def __missing__(self, key):
        return self.module_globals[key]


#: attention class -> its forward's code with _Globals (built once per class, on first use)
_ROPE_FORWARDS: Dict[type, Tuple[types.FunctionType, types.FunctionType]] = {}


def _rope_forward_for(cls) -> types.FunctionType:
    orig = cls.forward
    got = _ROPE_FORWARDS.get(cls)
    if got is None or got[0] is not orig:  # rebuilt if the class's forward was reassigned since
        fn = types.FunctionType(orig.__code__, _Globals(orig.__globals__), orig.__name__, orig.__defaults__,
                                orig.__closure__)
        fn.__kwdefaults__ = orig.__kwdefaults__
        got = _ROPE_FORWARDS[cls] = (orig, fn)
    return got[1]


def _rope_forward(self, *args, **kwargs):
    return _rope_forward_for(type(self))(self, *args, **kwargs)


def _causal_lm_forward(self, *args, **kwargs):
    cls_forward = type(self).forward
    bound = _flce_arguments(self, args, kwargs)
    if bound is None:
        return cls_forward(self, *args, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    labels, rest = bound
    return_dict = self.config.return_dict if hasattr(self, "config") else True
    passed = rest.pop("return_dict", return_dict)
    if passed is not None:
        return_dict = passed
    # what the HF forward does, with the lm_head product and the loss fused
    outputs = self.model(**rest)
    hidden = outputs.last_hidden_state
    num_items = rest.get("num_items_in_batch")
    shift_labels = rest.get("shift_labels")
    if shift_labels is None:
        shift_labels = nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
    shift_labels = shift_labels.reshape(-1).to(hidden.device)
    head = self.lm_head
    loss = _functional().liger_fused_linear_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]), head.weight, shift_labels, head.bias, None, -100,
        reduction="sum" if num_items is not None else "mean")
    if num_items is not None:
        loss = loss / (num_items.to(loss.device) if torch.is_tensor(num_items) else num_items)
    out = CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=outputs.past_key_values,
                                 hidden_states=outputs.hidden_states, attentions=outputs.attentions)
    return out if return_dict else out.to_tuple()


_FLCE_NAMES = ("input_ids", "attention_mask", "position_ids", "past_key_values", "inputs_embeds", "labels",
               "use_cache", "logits_to_keep")


def _flce_arguments(self, args, kwargs):
    """(labels, keyword arguments for ``self.model`` plus the loss's) when the fused loss computes what
    the HF forward would, else None (the class's forward runs)."""
    if not self.training or len(args) > len(_FLCE_NAMES):
        return None
    kw = dict(zip(_FLCE_NAMES, args))
    if set(kw) & set(kwargs):
        return None  # let the HF forward raise its TypeError
    kw.update(kwargs)
    labels = kw.pop("labels", None)
    keep = kw.pop("logits_to_keep", 0)
    if labels is None or not (isinstance(keep, int) and keep == 0):
        return None
    head = self.lm_head
    if not _plain_linear(head) or not can_run_on(head.weight.device):
        return None
    if _loss_is_not_causal_lm(self):
        return None
    if kw.get("ignore_index", -100) != -100:
        return None
    return labels, kw


def _plain_linear(m) -> bool:
    return (type(m) is nn.Linear and not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                                          or m._backward_pre_hooks or "forward" in m.__dict__))


def _loss_is_not_causal_lm(model) -> bool:
    try:
        from transformers.loss.loss_utils import ForCausalLMLoss
    except ImportError:
        return True
    return getattr(model, "loss_function", None) is not ForCausalLMLoss


_FORWARDS = {
    "rms_norm": _rms_norm_forward,
    "swiglu": _swiglu_forward,
    "rope": _rope_forward,
    "fused_linear_cross_entropy": _causal_lm_forward,
}


# ------------------------------------------------------------------------------------------------
# apply / remove
# ------------------------------------------------------------------------------------------------


def _hf_model(model):
    """The transformers model under a PeftModel (``get_base_model()``), or the model itself."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def _targets(piece, cls_of, config) -> Tuple[Optional[type], Optional[str]]:
    """(the class a piece binds, None) or (None, why it does not apply)."""
    prefix_cls = {"rms_norm": "RMSNorm", "swiglu": "MLP", "rope": "Attention",
                  "fused_linear_cross_entropy": "ForCausalLM"}[piece]
    cls = cls_of(prefix_cls)
    if cls is None:
        return None, f"the modeling module has no {prefix_cls} class"
    if piece == "swiglu" and getattr(config, "hidden_act", None) not in ("silu", "swish"):
        return None, f"hidden_act={getattr(config, 'hidden_act', None)!r}, not SiLU-gated"
    if piece == "rope":
        fn = cls.forward
        if hasattr(fn, "__wrapped__") or not isinstance(fn, types.FunctionType):
            return None, f"{cls.__name__}.forward is wrapped; its rotary call cannot be rebound per instance"
        if "apply_rotary_pos_emb" not in fn.__code__.co_names:
            return None, f"{cls.__name__}.forward does not call apply_rotary_pos_emb"
        hf = fn.__globals__.get("apply_rotary_pos_emb")
        if getattr(hf, "__module__", None) != fn.__module__:
            where = f"{getattr(hf, '__module__', '?')}.{getattr(hf, '__qualname__', type(hf).__name__)}"
            return None, (f"{fn.__module__}.apply_rotary_pos_emb was replaced process-wide (now {where}); "
                          "fastlora leaves that replacement alone")
    return cls, None


def apply(model: nn.Module, pieces: Iterable[str], report) -> None:
    """Bind Liger's ops on ``model``'s modules for ``pieces`` (validated by :func:`resolve`); fills
    ``report.liger_applied`` (piece -> module names) and ``report.liger_skipped`` (piece -> why)."""
    pieces = tuple(pieces)
    if not pieces:
        return
    hf = _hf_model(model)
    config = getattr(hf, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        why = (f"architecture {model_type!r} ({type(hf).__name__}) is not one fastlora applies Liger to "
               f"(supported: {', '.join(ARCHITECTURES)}); nothing applied")
        for p in pieces:
            report.liger_skipped[p] = why
        return
    import importlib

    module_name, prefix = ARCHITECTURES[model_type]
    modeling = importlib.import_module(module_name)

    def cls_of(suffix):
        c = getattr(modeling, prefix + suffix, None)
        return c if isinstance(c, type) else None

    targets = {}
    for p in pieces:
        cls, why = _targets(p, cls_of, config)
        if cls is None:
            report.liger_skipped[p] = why
        else:
            targets[p] = cls
    found = {p: [] for p in targets}
    for name, m in model.named_modules():
        for p, cls in targets.items():
            if type(m) is cls:
                found[p].append((name, m))
    for p, mods in found.items():
        applied, already, instance = [], [], []
        for name, m in mods:
            if _STATE_ATTR in m.__dict__:
                already.append(name)
                continue
            if _OWN_LOSS_ATTR in m.__dict__:
                report.liger_skipped[p] = ("fastlora's own chunked cross-entropy (patch(chunked_loss=True)) already "
                                           "computes this model's loss without logits; pass chunked_loss=False "
                                           "to use Liger's instead")
                continue
            if "forward" in m.__dict__:
                instance.append(name)
                continue
            if p == "fused_linear_cross_entropy" and not _plain_linear(getattr(m, "lm_head", None)):
                report.liger_skipped[p] = (f"lm_head is {type(getattr(m, 'lm_head', None)).__name__} or has hooks "
                                           "(a LoRA or modules_to_save lm_head): the fused loss needs a plain weight")
                continue
            m.__dict__[_STATE_ATTR] = p
            m.__dict__["forward"] = functools.partial(_FORWARDS[p], m)
            applied.append(name)
        if applied:
            report.liger_applied[p] = applied
        notes = []
        if not mods:
            notes.append(f"no {targets[p].__name__} module in the model")
        if already:
            notes.append(f"{len(already)} module(s) already bound by an earlier fastlora.patch")
        if instance:
            notes.append(f"{len(instance)} module(s) whose forward was already replaced on the instance "
                         f"(a hook library or another patcher), e.g. {instance[0]}")
        if notes and p not in report.liger_skipped:
            report.liger_skipped[p] = "; ".join(notes)


def _is_ours(fn, module) -> bool:
    return (isinstance(fn, functools.partial) and fn.func in _FORWARDS.values() and len(fn.args) == 1
            and fn.args[0] is module and not fn.keywords)


def remove(model: nn.Module) -> Tuple[List[str], List[str]]:
    """Undo :func:`apply` on every module of ``model``: (restored names, names left bound because
    something wrapped their forward after patching)."""
    restored, wrapped = [], []
    for name, m in model.named_modules():
        if _STATE_ATTR not in m.__dict__:
            continue
        if not _is_ours(m.__dict__.get("forward"), m):
            wrapped.append(name)
            continue
        del m.__dict__["forward"]
        del m.__dict__[_STATE_ATTR]
        restored.append(name)
    return restored, wrapped


def applied_piece(module: nn.Module) -> Optional[str]:
    """The Liger piece bound on ``module``, or None."""
    return module.__dict__.get(_STATE_ATTR)
