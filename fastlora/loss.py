"""The causal-LM loss without the logits: the lm_head product and the cross-entropy over chunks of
tokens, the gradient for the hidden states computed on the way.

A causal LM's training step holds, at its peak, the [tokens, vocab] logits in the compute dtype, their
fp32 copy (``ForCausalLMLoss`` upcasts) and the fp32 gradient of that copy: for Llama-3's 128,256-entry
vocabulary about 1.5 GB per 1,000 tokens, more than everything else a QLoRA step keeps once gradient
checkpointing is on. :class:`ChunkedLinearCrossEntropy` never builds them. For each chunk of tokens it
computes the chunk's logits as the model's forward would (the same dtype, under autocast the same casts),
their fp32 log-softmax, the loss terms and, when a gradient is wanted, the gradient of the loss for the
chunk's hidden states, which is all backward needs: the chunk's logits are freed before the next.

The numbers are HF's ``ForCausalLMLoss`` (labels shifted by one, ``ignore_index`` -100, the mean over
the counted tokens, or the sum over ``num_items_in_batch``), with the same roundings per token: logits in
the compute dtype, upcast to fp32; their gradient rounded to the compute dtype before the product with
the weight, as autograd does through ``logits.float()``; the hidden states' gradient returned in their
dtype. What differs is the order of the fp32 sums over tokens.

:func:`patch_loss` installs it on a model instance (``fastlora.patch`` calls it): in training mode, a
call with ``labels`` returns the loss and ``logits=None``, as Liger-Kernel's and Unsloth's fused losses
do. Every other call (no labels, eval mode, no grad, ``logits_to_keep``, ``return_dict=False``) runs the
model's own forward unchanged.
"""

from __future__ import annotations

import functools
import inspect
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

# chunk of tokens per step: tokens × vocab × 4 bytes of fp32 logits at most this many bytes
CHUNK_BYTES = 256 << 20
IGNORE_INDEX = -100

# the causal LMs whose forward is exactly backbone -> lm_head -> ForCausalLMLoss (no logit scaling or
# softcapping), which the chunked forward reproduces
SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")

_LOSS_ATTR = "_fastlora_loss"


def chunk_tokens(vocab: int, budget: int = CHUNK_BYTES) -> int:
    """Tokens per chunk: the most whose fp32 logits fit in ``budget`` bytes, at least 1."""
    return max(1, budget // (4 * max(1, vocab)))


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype ``F.linear(hidden, weight)`` computes in where it is called: autocast's where it is on
    for the device, else the operands' (which must then agree, as F.linear requires)."""
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev) and hidden.is_floating_point():
        return torch.get_autocast_dtype(dev)
    if hidden.dtype != weight.dtype:
        raise TypeError(f"lm_head: hidden states are {hidden.dtype} and the weight {weight.dtype}, outside autocast")
    return weight.dtype


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """loss = CE(hidden · weightᵀ + bias, labels), summed over the counted tokens and divided by
    ``divisor`` (a tensor: the count, or ``num_items_in_batch``). ``hidden`` [T, H], ``labels`` [T]
    (already shifted; ``IGNORE_INDEX`` not counted). The weight and bias get no gradient (a frozen
    lm_head): callers check ``requires_grad`` before using this."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, divisor, compute_dtype, chunk):
        want_grad = ctx.needs_input_grad[0]
        T = hidden.shape[0]
        w = weight.to(compute_dtype)
        b = bias.to(compute_dtype) if bias is not None else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if want_grad else None
        inv = (1.0 / divisor.to(torch.float32)) if want_grad else None
        for s in range(0, T, chunk):
            e = min(T, s + chunk)
            lab = labels[s:e]
            logits = F.linear(hidden[s:e].to(compute_dtype), w, b).float()
            valid = lab != IGNORE_INDEX
            safe = torch.where(valid, lab, torch.zeros_like(lab))
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, safe[:, None]).squeeze(1)
            total = total + torch.where(valid, lse - picked, torch.zeros_like(lse)).sum()
            if want_grad:
                # d loss / d logits = (softmax - onehot(label)) / divisor on counted rows, 0 elsewhere,
                # computed in place in the fp32 logits
                probs = logits.sub_(lse[:, None]).exp_()
                probs.scatter_add_(1, safe[:, None], -valid[:, None].to(probs.dtype))
                probs.mul_(torch.where(valid, inv, torch.zeros_like(inv))[:, None])
                g = probs.to(compute_dtype)
                del probs, logits
                grad_hidden[s:e] = (g @ w).to(hidden.dtype)
                del g
            else:
                del logits
        loss = total / divisor.to(torch.float32)
        if want_grad:
            ctx.save_for_backward(grad_hidden)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad_hidden,) = ctx.saved_tensors
        # grad_loss is a 0-dim fp32 tensor: 1.0 for loss.backward(), a loss-scaler's factor otherwise
        return grad_hidden * grad_loss.to(grad_hidden.dtype), None, None, None, None, None, None


def causal_lm_loss(hidden: torch.Tensor, lm_head: nn.Linear, labels: torch.Tensor, *,
                   num_items_in_batch=None, ignore_index: int = IGNORE_INDEX,
                   shift_labels: Optional[torch.Tensor] = None, chunk: Optional[int] = None) -> torch.Tensor:
    """HF's ``ForCausalLMLoss(lm_head(hidden), labels, ...)`` without the logits. ``hidden`` [B, S, H]
    (or any [..., H]), ``labels`` [B, S] (shifted here by one, as HF does, unless ``shift_labels`` is
    given)."""
    if lm_head.weight.requires_grad or (lm_head.bias is not None and lm_head.bias.requires_grad):
        raise ValueError("causal_lm_loss: the lm_head is trainable; its weight gradient is not computed here")
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    hidden = hidden.reshape(-1, hidden.shape[-1])
    shift_labels = shift_labels.reshape(-1).to(hidden.device)
    if shift_labels.shape[0] != hidden.shape[0]:
        raise ValueError(f"causal_lm_loss: {hidden.shape[0]} hidden states but {shift_labels.shape[0]} labels")
    if ignore_index != IGNORE_INDEX:
        shift_labels = torch.where(shift_labels == ignore_index, torch.full_like(shift_labels, IGNORE_INDEX),
                                   shift_labels)
    if num_items_in_batch is None:
        divisor = (shift_labels != IGNORE_INDEX).sum()
    else:
        divisor = torch.as_tensor(num_items_in_batch, device=hidden.device)
    cd = _compute_dtype(hidden, lm_head.weight)
    chunk = chunk or chunk_tokens(lm_head.out_features)
    # autocast off inside: the casts are explicit (the ones autocast would make)
    with torch.autocast(hidden.device.type, enabled=False):
        return ChunkedLinearCrossEntropy.apply(hidden, lm_head.weight, lm_head.bias, shift_labels, divisor, cd, chunk)


# ----------------------------------------------------------------------------------------------
# the model patch
# ----------------------------------------------------------------------------------------------


def support_reason(model: nn.Module) -> Optional[str]:
    """None where :func:`patch_loss` can take over ``model``'s loss, else why not."""
    name = type(model).__name__
    if name not in SUPPORTED:
        return f"architecture: {name} (the chunked loss covers {', '.join(SUPPORTED)})"
    if "forward" in model.__dict__:
        fn = model.__dict__["forward"]
        return f"instance_forward: {getattr(fn, '__qualname__', type(fn).__name__)} already replaces the forward"
    head = getattr(model, "lm_head", None)
    if type(head) is not nn.Linear:
        return f"lm_head: {type(head).__name__}, not a plain nn.Linear (an adapter or quantized head)"
    if head.weight.requires_grad or (head.bias is not None and head.bias.requires_grad):
        return "lm_head: trainable"
    if head._forward_hooks or head._forward_pre_hooks or hasattr(head, "_hf_hook"):
        return "lm_head: has forward hooks"
    if "_loss_function" in model.__dict__ or getattr(model, "loss_type", None) not in (None, "ForCausalLM"):
        return "loss_function: replaced by the caller"
    if getattr(getattr(model, "config", None), "final_logit_softcapping", None):
        return "final_logit_softcapping"
    return None


def _chunked_forward(model, *args, **kwargs):
    cls_forward = type(model).forward
    try:
        bound = inspect.signature(cls_forward).bind(model, *args, **kwargs)
    except TypeError:
        return cls_forward(model, *args, **kwargs)
    a = dict(bound.arguments)
    a.pop("self", None)
    extra = a.pop("kwargs", {}) or {}
    labels = a.get("labels")
    head = model.lm_head
    if (labels is None or not model.training or not torch.is_grad_enabled()
            or a.get("logits_to_keep", 0) not in (0, None) or extra.get("return_dict") is False
            or head.weight.requires_grad):
        return cls_forward(model, *args, **kwargs)
    loss_kw = {k: extra[k] for k in ("num_items_in_batch", "ignore_index", "shift_labels") if k in extra}
    backbone_kw = {k: v for k, v in extra.items() if k not in ("ignore_index", "shift_labels")}
    outputs = model.model(input_ids=a.get("input_ids"), attention_mask=a.get("attention_mask"),
                          position_ids=a.get("position_ids"), past_key_values=a.get("past_key_values"),
                          inputs_embeds=a.get("inputs_embeds"), use_cache=a.get("use_cache"), **backbone_kw)
    hidden = outputs.last_hidden_state
    loss = causal_lm_loss(hidden, head, labels.to(hidden.device), **loss_kw)
    state = model.__dict__.get(_LOSS_ATTR)
    if state is not None and not torch.compiler.is_compiling():     # (a traced count would be a guard)
        state["calls"] += 1
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=outputs.past_key_values,
                                  hidden_states=outputs.hidden_states, attentions=outputs.attentions)


def _causal_lm(model: nn.Module) -> nn.Module:
    """The transformers model under PEFT's wrappers (or the model itself)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def patch_loss(model: nn.Module) -> Tuple[Optional[str], Optional[str]]:
    """Install the chunked loss on ``model``'s causal LM. Returns (the class patched, None) or (None,
    why not)."""
    lm = _causal_lm(model)
    if lm.__dict__.get(_LOSS_ATTR) is not None:
        return type(lm).__name__, None
    reason = support_reason(lm)
    if reason is not None:
        return None, reason
    forward = functools.partial(_chunked_forward, lm)
    functools.update_wrapper(forward, type(lm).forward)     # generate() reads the signature
    lm.__dict__[_LOSS_ATTR] = {"forward": forward, "calls": 0}
    lm.__dict__["forward"] = forward
    return type(lm).__name__, None


def unpatch_loss(model: nn.Module) -> bool:
    """Undo :func:`patch_loss`. True where something was restored."""
    lm = _causal_lm(model)
    state = lm.__dict__.get(_LOSS_ATTR)
    if state is None:
        return False
    if lm.__dict__.get("forward") is state["forward"]:
        del lm.__dict__["forward"]
    del lm.__dict__[_LOSS_ATTR]
    return True


def loss_calls(model: nn.Module) -> int:
    """How many calls the chunked loss answered on ``model`` (0 where it is not installed)."""
    state = _causal_lm(model).__dict__.get(_LOSS_ATTR)
    return 0 if state is None else state["calls"]
