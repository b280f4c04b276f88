"""Memory benchmark without a GPU: the peak of live tensor bytes over one whole QLoRA training step.

    python -m benchmarks memory                                   # llama3-8b, batch 1, seq 512..8192
    python -m benchmarks memory --model qwen2.5-7b,mistral-7b --seq 512,1024 --batch 1,2 --ckpt on
    python -m benchmarks memory --fit 16,24,80                    # + longest seq within those budgets
    python -m benchmarks memory --gpu-compare                     # on a GPU: fake figure vs the allocator's

The step: forward with labels (HF's causal-LM loss), backward, AdamW on the LoRA parameters, as
``Trainer(bf16=True)`` runs it after ``prepare_model_for_kbit_training`` + ``get_peft_model`` (r = 16,
alpha 32, dropout 0.05, the seven projections; NF4 double-quant base weights, bf16 compute; the other
parameters cast to fp32 by ``prepare_model_for_kbit_training``), under bf16 autocast. Configurations:
``peft`` (PEFT + bitsandbytes as they are), ``fastlora`` (the same model after ``fastlora.patch``) and
``fastlora+offload`` (after ``fastlora.patch(model, offload_checkpoints=True)``: with ``--ckpt on`` the
decoder layers' checkpointed inputs go to host memory, here the ``meta`` device, see below).

How it runs with no weight materialised. The model is built from its config inside
``torch._subclasses.fake_tensor.FakeTensorMode``: every tensor is a FakeTensor (shape, dtype, device;
no data). The projections are bitsandbytes ``Linear4bit`` layers whose ``Params4bit`` holds fake
tensors laid out as bitsandbytes stores an NF4 double-quant weight (packed uint8 [N*K/2, 1], uint8
absmax per 64 values, fp32 offset, fp32 second-level absmax per 256 blocks and its 256-entry code);
:func:`quant_layout` gives those shapes and the tests check them against ``bitsandbytes.functional.
quantize_4bit`` on a real weight. bitsandbytes' ops (``torch.ops.bitsandbytes.*``) and fastlora's op
(``torch.ops.fastlora.lora_linear`` and its backward) run their registered fake implementations.

The device is a fake *CPU* device, not a fake CUDA one: FakeTensorMode makes tensors with device
"cuda" on a CPU-only build and runs ops on them, but autograd cannot record a node on them (the engine
asks the CUDA device-guard implementation for the current stream, which a CPU-only build does not
link: the process aborts), so no backward runs there. On the fake CPU device:

- autocast is CPU autocast in bf16 (the linears, matmuls and lm_head run in bf16 as under CUDA
  autocast; HF's RMSNorm, rotary embedding and loss do their own fp32 casts either way);
- attention is HF's sdpa path with ``scaled_dot_product_attention`` routed to the op it runs on a
  GPU, ``aten._scaled_dot_product_flash_attention`` (FlashAttention-2, GQA native: it saves the output
  and an fp32 logsumexp [B, H, S], never an [S, S] matrix), through its meta implementation; CPU
  dispatch would pick another kernel;
- gradient checkpointing runs with ``preserve_rng_state=False`` (saving a fake generator state is
  not possible); memory is the same, dropout masks are not reproduced (nothing is computed anyway).

Accounting (:class:`LiveBytes`, a TorchDispatchMode under the fake mode): every tensor an op
returns is charged to its storage (one charge per storage, views are free), rounded up to 512 bytes as
the CUDA caching allocator rounds a block, and released by a weakref callback when the storage dies;
the peak is the largest sum seen, with the per-category split at that moment. Storages on the ``meta``
device are host memory (``fastlora+offload``'s host copies, made there through
``fastlora.offload.host_device``): counted apart, as ``host_peak_bytes``, never in the device peak. Ops that allocate
inside their kernels are charged their internal temporary at the moment they run:
``bitsandbytes::gemm_4bit`` (the [N, K] compute-dtype weight its CUDA path dequantizes before
``F.linear``; counted for M > 1536 tokens, where it always does so: below that a per-architecture
rule may pick its custom kernel instead, so PEFT's figure is a lower bound there) and fastlora's
forward and backward (always the [N, K] weight of its "dequant" strategy, plus G [M, r] in backward:
an upper bound, its "fused" strategy, chosen below ``DEQUANT_MIN_TOKENS``, e.g. 512 tokens on sm_90 and 32768 on sm_8x,
has no such temporary). Not counted: the CUDA
context, cuBLAS / FlashAttention workspaces, allocator fragmentation and cache (what
``max_memory_reserved`` adds to ``max_memory_allocated``), FA2's expanded dK/dV for GQA in backward.

The measured step is a steady-state step: the AdamW state already exists (created beforehand by one
optimizer step on zero gradients), the gradients are None at its start (``zero_grad()``).

Categories: ``weights`` (the frozen model: 4-bit weights and quant state, fp32 norms, embedding and
lm_head), ``adapters`` (LoRA A and B), ``optimizer_state`` (AdamW's exp_avg, exp_avg_sq, step),
``gradients`` (LoRA parameter gradients), ``activations`` (what forward allocates),
``logits_loss`` (any tensor with the vocabulary as last dimension, and the loss), ``weight_copies``
(dequantized or autocast-cast weights, the ops' internal weight temporaries), ``backward_temps``
(everything else backward allocates: activation gradients and, with gradient checkpointing, the
recomputed activations of the layer being differentiated), ``optimizer_temps``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import time
import weakref
from pathlib import Path
from typing import Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from . import harness

GB = 1e9
BLOCK = 512          # the CUDA caching allocator's smallest block (bytes)
CATEGORIES = ("weights", "adapters", "optimizer_state", "gradients", "activations", "logits_loss",
              "weight_copies", "backward_temps", "optimizer_temps")
CONFIGS = ("peft", "fastlora", "fastlora+offload", "liger", "fastlora+liger")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

MODELS = {
    "llama3-8b": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                rope_theta=500000.0, max_position_embeddings=131072)),
    "qwen2.5-7b": ("qwen2", dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                 num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                                 rope_theta=1000000.0, max_position_embeddings=131072)),
    "mistral-7b": ("mistral", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=8, vocab_size=32768,
                                   rope_theta=1000000.0, max_position_embeddings=131072, sliding_window=None)),
    # for tests and smoke runs
    "tiny": ("llama", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=128, max_position_embeddings=4096)),
}


def model_config(name: str, **overrides):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    family, kw = MODELS[name]
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[family]
    kw = dict(kw, tie_word_embeddings=False, rms_norm_eps=1e-5, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    kw.update(overrides)
    return cls(**kw)


# ----------------------------------------------------------------------------------------------
# the tracker
# ----------------------------------------------------------------------------------------------


def _rounded(nbytes: int) -> int:
    return BLOCK * math.ceil(nbytes / BLOCK) if nbytes else 0


class LiveBytes(TorchDispatchMode):
    """Live bytes of tensor storages created by ops run under it (or registered with :meth:`add`),
    with their peak and the per-category split at the peak. ``classify(func, tensor)`` names the
    category of a new storage (default: ``self.default``)."""

    def __init__(self, classify=None, internal=None):
        super().__init__()
        self.classify = classify
        self.internal = internal       # func, args -> (bytes, category) allocated and freed inside the op
        self.default = "activations"
        self._live = {}                # id(storage) -> [weakref, bytes, category]
        self.by_cat = dict.fromkeys(CATEGORIES, 0)
        self.total = 0
        self.peak = 0
        self.peak_by_cat = dict(self.by_cat)
        self.peak_at = None
        self.host_total = 0            # storages on the meta device: host memory, not in total / peak
        self.host_peak = 0

    # -- bookkeeping ------------------------------------------------------------------------------
    def _charge(self, nbytes: int, cat: str, where) -> None:
        self.by_cat[cat] = self.by_cat.get(cat, 0) + nbytes
        self.total += nbytes
        if self.total > self.peak:
            self.peak = self.total
            self.peak_by_cat = dict(self.by_cat)
            self.peak_at = where

    def _release(self, key) -> None:
        entry = self._live.pop(key, None)
        if entry is not None and entry[2] == "host":
            self.host_total -= entry[1]
        elif entry is not None:
            self.by_cat[entry[2]] -= entry[1]
            self.total -= entry[1]

    def add(self, t: torch.Tensor, cat: str, where=None) -> bool:
        """Charge ``t``'s storage to ``cat`` unless it is charged already. True when charged now."""
        st = t.untyped_storage()
        key = id(st)
        entry = self._live.get(key)
        if entry is not None and entry[0]() is st:
            return False
        nbytes = _rounded(st.nbytes())
        ref = weakref.ref(st, lambda _r, k=key, live=self._live: self._release(k) if live.get(k, [None])[0] is _r else None)
        if t.device.type == "meta":
            self._live[key] = [ref, nbytes, "host"]
            self.host_total += nbytes
            self.host_peak = max(self.host_peak, self.host_total)
            return True
        self._live[key] = [ref, nbytes, cat]
        self._charge(nbytes, cat, where)
        return True

    def retag(self, t: torch.Tensor, cat: str) -> None:
        """Move ``t``'s storage (charged already) to ``cat``."""
        entry = self._live.get(id(t.untyped_storage()))
        if entry is not None and entry[2] not in (cat, "host"):
            self.by_cat[entry[2]] -= entry[1]
            self.by_cat[cat] = self.by_cat.get(cat, 0) + entry[1]
            entry[2] = cat

    def transient(self, nbytes: int, cat: str, where=None) -> None:
        """Bytes allocated and freed within one op (counted towards the peak, then released)."""
        if nbytes:
            nbytes = _rounded(nbytes)
            self._charge(nbytes, cat, where)
            self.by_cat[cat] -= nbytes
            self.total -= nbytes

    def reset_peak(self) -> None:
        self.peak = self.total
        self.peak_by_cat = dict(self.by_cat)
        self.peak_at = None

    # -- dispatch -----------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.internal is not None:
            extra = self.internal(func, args, kwargs)
            if extra:
                # the op's outputs are live while its temporary is: charge them first
                self._register(func, out)
                self.transient(extra[0], extra[1], str(func))
                return out
        self._register(func, out)
        return out

    def _register(self, func, out) -> None:
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                cat = self.classify(func, t) if self.classify is not None else self.default
                self.add(t, cat, str(func))


# ----------------------------------------------------------------------------------------------
# the model, built on fake tensors
# ----------------------------------------------------------------------------------------------


def quant_layout(N: int, K: int, blocksize: int = 64, blocksize2: int = 256) -> dict:
    """Shapes and dtypes of what bitsandbytes stores for an NF4 double-quant [N, K] weight."""
    n = N * K
    blocks = -(-n // blocksize)
    return {"packed": ((-(-n // 2), 1), torch.uint8), "absmax": ((blocks,), torch.uint8),
            "offset": ((), torch.float32), "absmax2": ((-(-blocks // blocksize2),), torch.float32),
            "code2": ((256,), torch.float32), "code": ((16,), torch.float32)}


def _fake_weight_4bit(N: int, K: int, device):
    """The packed weight, a parameter holding a fake tensor, with its bitsandbytes QuantState attached as
    ``Params4bit`` attaches it. (``Params4bit`` itself cannot wrap a FakeTensor: ``_make_subclass``
    refuses a tensor that already has a Python object; bitsandbytes' forward, PEFT and fastlora find
    the quant_state on the weight either way, as they do when FSDP strips the subclass.)"""
    from bitsandbytes.functional import QuantState

    lay = {k: torch.empty(s, dtype=d, device=device) for k, (s, d) in quant_layout(N, K).items()}
    state2 = QuantState(absmax=lay["absmax2"], code=lay["code2"], blocksize=256, dtype=torch.float32)
    qs = QuantState(absmax=lay["absmax"], shape=torch.Size([N, K]), code=lay["code"], blocksize=64,
                    quant_type="nf4", dtype=torch.bfloat16, offset=lay["offset"], state2=state2)
    w = torch.nn.Parameter(lay["packed"], requires_grad=False)
    w.quant_state = qs
    w.blocksize, w.quant_type, w.compress_statistics, w.bnb_quantized = 64, "nf4", True, True
    w.quant_storage = torch.uint8
    return w


def _quantize_projections(model, device) -> int:
    """Replace each projection nn.Linear with a bitsandbytes NF4 Linear4bit (fake storage)."""
    import bitsandbytes as bnb
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    n = 0
    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            if child_name in PROJECTIONS and isinstance(child, torch.nn.Linear):
                with unset_fake_temporarily():   # the module itself, on meta (its Params4bit is replaced)
                    new = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                            compute_dtype=torch.bfloat16, compress_statistics=True,
                                            quant_type="nf4", device="meta")
                new.weight = _fake_weight_4bit(child.out_features, child.in_features, device)
                if child.bias is not None:
                    new.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
                new.compute_type_is_set = True
                setattr(mod, child_name, new)
                n += 1
    model.is_loaded_in_4bit = True
    model.quantization_method = "bitsandbytes"
    return n


def _flash_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """``F.scaled_dot_product_attention`` as a GPU runs it for bf16 training without a mask: the
    FlashAttention-2 op (GQA handled by the kernel)."""
    if attn_mask is not None:
        raise ValueError("bench_memory: an attention mask reached sdpa (inputs are unpadded)")
    return torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal, False,
                                                              scale=scale)[0]


@contextlib.contextmanager
def _gpu_attention():
    import torch.nn.functional as F

    import transformers.integrations.sdpa_attention as sd
    import transformers.masking_utils as mu

    saved = (sd.torch.nn.functional.scaled_dot_product_attention, getattr(sd, "use_gqa_in_sdpa", None))
    F.scaled_dot_product_attention = _flash_sdpa
    # HF builds no mask (sdpa's is_causal) for unpadded inputs, except while tracing, which it takes a
    # FakeTensor for; no attention_mask is passed here, so nothing of the mask's values is read
    # (and the position ids are 0..S-1: no packed sequences to find, which would read them)
    tracing, packed = mu.is_tracing, mu.find_packed_sequence_indices
    mu.is_tracing = lambda *a, **k: False
    mu.find_packed_sequence_indices = lambda *a, **k: None
    if saved[1] is not None:
        sd.use_gqa_in_sdpa = lambda *a, **k: True   # FlashAttention-2 takes the kv heads as they are
    try:
        yield
    finally:
        F.scaled_dot_product_attention = saved[0]
        mu.is_tracing, mu.find_packed_sequence_indices = tracing, packed
        if saved[1] is not None:
            sd.use_gqa_in_sdpa = saved[1]


@contextlib.contextmanager
def _set_data_moves():
    """``Module.to`` by ``param.data = param.data.to(...)``, as ``Module._apply`` converts parameters
    unless it swaps them. On a FakeTensor parameter ``_apply`` always swaps, and a FakeTensor cannot be
    swapped (the fake mode holds weak references to it); PEFT moves and casts each new adapter to its
    base layer's device and compute dtype this way."""
    orig = torch.nn.Module.to

    def to(self, *args, **kwargs):
        device, dtype, non_blocking, memory_format = torch._C._nn._parse_to(*args, **kwargs)
        if memory_format is not None:
            return orig(self, *args, **kwargs)
        for m in self.modules():
            for store in (m._parameters, m._buffers):
                for k, t in store.items():
                    if t is None:
                        continue
                    dt = dtype if dtype is not None and (t.is_floating_point() or t.is_complex()) else t.dtype
                    if (device is not None and t.device != device) or dt != t.dtype:
                        with torch.no_grad():
                            t.data = t.data.to(device=device if device is not None else t.device, dtype=dt)
        return self

    torch.nn.Module.to = to
    try:
        yield
    finally:
        torch.nn.Module.to = orig


def build(model_name: str, config_name: str, *, ckpt: bool, r: int = 16, alpha: int = 32, dropout: float = 0.05,
          device="cpu", **overrides):
    """(peft model, fastlora report or None): the QLoRA model on fake tensors. Call inside the fake mode."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    cfg = model_config(model_name, **overrides)
    cfg._attn_implementation = "sdpa"
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    finally:
        torch.set_default_dtype(prev)
    _quantize_projections(model, device)
    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=ckpt,
        gradient_checkpointing_kwargs={"use_reentrant": False, "preserve_rng_state": False})
    if not ckpt:
        model.config.use_cache = False
    with _set_data_moves():
        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                                                 target_modules=list(PROJECTIONS), task_type="CAUSAL_LM"))
    report = None
    report = apply_config(model, config_name)
    model.train()
    return model, report


def apply_config(model, config_name: str):
    """Apply configuration ``config_name`` to a PEFT model; fastlora's report, or None for ``peft``.
    ``liger``: Liger-Kernel's four pieces (RMSNorm, SwiGLU, RoPE, fused linear cross-entropy) bound
    by ``fastlora.liger`` on the PEFT model, no fastlora LoRA kernels; ``fastlora+liger``:
    ``fastlora.patch(model, liger=True)`` (fastlora's chunked loss holds the loss there, so Liger's
    fused cross-entropy is not applied: the report says so)."""
    if config_name not in CONFIGS:
        raise ValueError(f"unknown configuration {config_name!r}; one of {CONFIGS}")
    if config_name == "peft":
        return None
    import fastlora

    if config_name == "liger":
        from fastlora import liger
        from fastlora.patcher import PatchReport

        report = PatchReport()
        liger.apply(model, liger.resolve(True), report)
        return report
    return fastlora.patch(model, offload_checkpoints=config_name == "fastlora+offload",
                          liger=True if config_name == "fastlora+liger" else None)


# ----------------------------------------------------------------------------------------------
# one step
# ----------------------------------------------------------------------------------------------


def _internal(func, args, kwargs):
    """The bytes an opaque op allocates and frees inside (see the module docstring)."""
    name = getattr(func, "_schema", None)
    name = name.name if name is not None else str(func)
    if name == "bitsandbytes::gemm_4bit":
        A, shape = args[0], args[2]
        if A.numel() // A.shape[-1] > 1536:
            return int(shape[0]) * int(shape[1]) * A.element_size(), "weight_copies"
        return None
    if name == "fastlora::lora_linear":
        N, K, compute = args[9], args[10], args[17]
        return N * K * compute.itemsize, "weight_copies"
    if name == "fastlora::lora_linear_backward":
        dy, lora_A, N, K, compute, lora_dtype = args[0], args[3], args[11], args[12], args[18], args[19]
        g = dy.shape[0] * lora_A.shape[0] * lora_dtype.itemsize
        return N * K * compute.itemsize + g, "weight_copies"
    return None


@contextlib.contextmanager
def _host_on_meta(config_name: str):
    """``fastlora+offload``: its host copies go to the meta device, which the tracker keeps apart."""
    if config_name != "fastlora+offload":
        yield
        return
    from fastlora import offload

    saved = offload.host_device
    offload.host_device = lambda: torch.device("meta")
    try:
        yield
    finally:
        offload.host_device = saved


@contextlib.contextmanager
def _liger_on_fake(config_name: str):
    """Liger's ops on fake tensors: they are autograd Functions whose Python allocates their outputs,
    gradients and chunk buffers with torch (what is measured) and then launches Triton kernels, which
    cannot run on tensors without data. Inside, a Triton launch does nothing (compiled or interpreted),
    and the two data-dependent host reads in Liger's fused cross-entropy answer fixed values:
    ``.item()`` of a fake tensor 1 (the count of counted tokens: a divisor, not a size) and
    ``torch.equal`` with a fake tensor True (its backward then skips a scaling kernel that allocates
    nothing). Liger's kernels are told they can run (``fastlora.liger``'s device check)."""
    if "liger" not in config_name:
        yield
        return
    from torch._subclasses.fake_tensor import FakeTensor
    from triton.runtime import interpreter, jit

    from fastlora import liger

    saved = (jit.JITFunction.run, interpreter.InterpretedFunction.run, torch.Tensor.item, torch.equal,
             liger.can_run_on)
    real_item, real_equal = torch.Tensor.item, torch.equal

    def item(t):
        if isinstance(t, FakeTensor):
            return 1.0 if t.is_floating_point() else 1
        return real_item(t)

    def equal(a, b):
        if isinstance(a, FakeTensor) or isinstance(b, FakeTensor):
            return True
        return real_equal(a, b)

    jit.JITFunction.run = lambda self, *a, **k: None
    interpreter.InterpretedFunction.run = lambda self, *a, **k: None
    torch.Tensor.item, torch.equal = item, equal
    liger.can_run_on = lambda device: True
    try:
        yield
    finally:
        (jit.JITFunction.run, interpreter.InterpretedFunction.run, torch.Tensor.item, torch.equal,
         liger.can_run_on) = saved


def run_step(model_name: str, config_name: str, seq: int, batch: int, ckpt: bool, **overrides) -> dict:
    """One steady-state QLoRA training step on fake tensors; the tracker's peak and split."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    gc.collect()
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    t0 = time.perf_counter()
    with fake, _gpu_attention(), _host_on_meta(config_name), _liger_on_fake(config_name):
        model, report = build(model_name, config_name, ckpt=ckpt, **overrides)
        vocab = model.config.vocab_size
        params = {id(p): p for p in model.parameters()}
        lora = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(lora, lr=1e-4, weight_decay=0.0, foreach=False)
        for p in lora:     # steady state: AdamW's state exists before the measured step
            p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)
        phase = {"now": "forward"}

        def classify(func, t):
            if t.dim() >= 1 and t.shape[-1] == vocab and t.dim() >= 2:
                return "logits_loss"
            if func in (torch.ops.aten._to_copy.default,) and phase["src_is_param"]:
                return "weight_copies"
            name = getattr(getattr(func, "_schema", None), "name", "")
            if name.startswith("bitsandbytes::dequantize"):
                return "weight_copies"
            if phase["now"] == "forward":
                return "activations"
            return "backward_temps" if phase["now"] == "backward" else "optimizer_temps"

        tracker = LiveBytes(classify=classify, internal=_internal)
        # what exists before the step: model, adapters, optimizer state
        for p in model.parameters():
            tracker.add(p, "adapters" if p.requires_grad else "weights")
        for b in model.buffers():
            tracker.add(b, "weights")
        for m in model.modules():
            w = getattr(m, "weight", None)
            qs = getattr(w, "quant_state", None)
            if qs is not None:
                for t in (qs.absmax, qs.code, qs.offset, qs.state2.absmax, qs.state2.code):
                    tracker.add(t, "weights")
        for st in opt.state.values():
            for v in st.values():
                if isinstance(v, torch.Tensor):
                    tracker.add(v, "optimizer_state")
        base = dict(tracker.by_cat)
        hooks = [p.register_post_accumulate_grad_hook(lambda p: tracker.retag(p.grad, "gradients")) for p in lora]
        phase["src_is_param"] = False

        class _SrcParam(TorchDispatchMode):   # marks casts whose source is a parameter (autocast's weight casts)
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                phase["src_is_param"] = (func is torch.ops.aten._to_copy.default and id(args[0]) in params)
                return func(*args, **(kwargs or {}))

        ids = torch.randint(3, vocab, (batch, seq))
        try:
            with tracker, _SrcParam():
                tracker.reset_peak()
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    out = model(input_ids=ids, labels=ids)
                loss = out.loss
                peak_fwd = tracker.peak
                del out
                phase["now"] = "backward"
                loss.backward()
                del loss
                gc.collect()
                peak_bwd = tracker.peak
                phase["now"] = "optimizer"
                opt.step()
                opt.zero_grad(set_to_none=True)
                gc.collect()
        finally:
            for h in hooks:
                h.remove()
        applied = None
        if report is not None:
            applied = {"patched": len(report.patched), "fused_calls": report.fused_calls,
                       "fallback_calls": dict(report.fallback_calls), "skipped": dict(report.skipped)}
            if report.liger_applied or report.liger_skipped:
                applied["liger"] = {p: len(n) for p, n in report.liger_applied.items()}
                applied["liger_skipped"] = dict(report.liger_skipped)
            applied["loss"] = report.loss
            if report.offload or report.offload_skipped:
                from fastlora import offload

                stats = offload.stats(model)
                applied["offload"] = {"calls": stats["calls"], "fallback": dict(stats["fallback"])}
    result = {
        "peak_bytes": tracker.peak,
        "peak_breakdown_bytes": {k: v for k, v in tracker.peak_by_cat.items() if v},
        "peak_phase": "forward" if tracker.peak == peak_fwd else ("backward" if tracker.peak == peak_bwd else "optimizer"),
        "peak_at_op": tracker.peak_at,
        "peak_forward_bytes": peak_fwd,
        "resident_bytes": sum(base.values()),
        "resident_breakdown_bytes": {k: v for k, v in base.items() if v},
        "end_bytes": tracker.total,
        "host_peak_bytes": tracker.host_peak,
        "fastlora": applied,
        "wall_s": round(time.perf_counter() - t0, 2),
    }
    del model, opt
    gc.collect()
    return result


# ----------------------------------------------------------------------------------------------
# records, search, report
# ----------------------------------------------------------------------------------------------


def _record(model_name, cfg_name, seq, batch, ckpt, res, args, device):
    config = {"model": model_name, "config": cfg_name, "seq": seq, "batch": batch, "ckpt": ckpt, "r": args.r,
              "lora_alpha": 2 * args.r, "dropout": args.dropout, "quant": "nf4+double_quant", "compute_dtype": "bfloat16",
              "autocast": "bfloat16", "optimizer": "AdamW (fp32 state, LoRA params)", "attention": "flash (GQA native)",
              "method": "FakeTensorMode (fake cpu device), live storage bytes rounded to 512"}
    metrics = dict(res)
    metrics["peak_gb"] = round(res["peak_bytes"] / GB, 3)
    rec = harness.make_record("memory", config, metrics, {
        "peak_gb": "peak_bytes / 1e9 (live tensor storage bytes, each rounded up to 512 B)"},
        device=device, smoke=False)
    rec["performance_claim"] = False
    return rec


def _measure(cache, writer, model_name, cfg_name, seq, batch, ckpt, args, device):
    key = (model_name, cfg_name, seq, batch, ckpt)
    if key not in cache:
        res = run_step(model_name, cfg_name, seq, batch, ckpt, r=args.r, dropout=args.dropout)
        rec = _record(model_name, cfg_name, seq, batch, ckpt, res, args, device)
        writer.write(rec)
        cache[key] = rec
        harness.log(f"memory {model_name} {cfg_name:8s} ckpt={'on' if ckpt else 'off':3s} b={batch} seq={seq:6d}: "
                    f"peak {res['peak_bytes'] / GB:7.2f} GB ({res['peak_phase']}, {res['wall_s']} s)")
    return cache[key]


def longest_fit(measure, budget_bytes: int, seqs) -> dict:
    """The largest seq in ``seqs`` (ascending) whose measured peak fits ``budget_bytes``, by bisection
    over real runs (peak grows with seq). ``{"seq": s or None, "bound": "exact" | ">=" | "none"}``."""
    lo, hi = 0, len(seqs) - 1
    if measure(seqs[hi]) <= budget_bytes:
        return {"seq": seqs[hi], "bound": ">="}
    if measure(seqs[0]) > budget_bytes:
        return {"seq": None, "bound": "none"}
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if measure(seqs[mid]) <= budget_bytes:
            lo = mid
        else:
            hi = mid
    return {"seq": seqs[lo], "bound": "exact"}


def markdown(records, fits=None, breakdown_seq: int = 8192) -> str:
    recs = [r for r in records if r.get("bench") == "memory" and r.get("status") == "ok"]
    lines = ["Peak live tensor memory of one QLoRA training step (GB = 1e9 B), measured on fake tensors "
             "(`python -m benchmarks memory`); see `benchmarks/bench_memory.py` for what is counted.", ""]
    groups = {}
    for r in recs:
        c = r["config"]
        groups.setdefault((c["model"], c["batch"], c["ckpt"]), {}).setdefault(c["seq"], {})[c["config"]] = r
    for (model, batch, ckpt), by_seq in sorted(groups.items()):
        cfgs = [c for c in CONFIGS if any(c in v for v in by_seq.values())]
        lines += [f"### {model}, batch {batch}, gradient checkpointing {'on' if ckpt else 'off'}", "",
                  "| seq | " + " | ".join(f"{c} peak GB" for c in cfgs) + " | fastlora − peft GB |",
                  "|---:|" + "---:|" * len(cfgs) + "---:|"]
        for seq in sorted(by_seq):
            row = by_seq[seq]
            vals = [row[c]["metrics"]["peak_bytes"] / GB if c in row else None for c in cfgs]
            diff = (vals[cfgs.index("fastlora")] - vals[cfgs.index("peft")]
                    if "fastlora" in cfgs and "peft" in cfgs and None not in vals else None)
            lines.append(f"| {seq} | " + " | ".join("—" if v is None else f"{v:.2f}" for v in vals)
                         + f" | {'—' if diff is None else f'{diff:+.2f}'} |")
        lines.append("")
        big = breakdown_seq if breakdown_seq in by_seq else max(by_seq)
        lines += [f"Breakdown at the peak, seq {big} (GB):", "",
                  "| category | " + " | ".join(cfgs) + " |", "|---|" + "---:|" * len(cfgs)]
        for cat in CATEGORIES:
            vals = [by_seq[big].get(c, {}).get("metrics", {}).get("peak_breakdown_bytes", {}).get(cat, 0) for c in cfgs]
            if any(vals):
                lines.append(f"| {cat} | " + " | ".join(f"{v / GB:.2f}" for v in vals) + " |")
        phases = [by_seq[big][c]["metrics"]["peak_phase"] for c in cfgs if c in by_seq[big]]
        lines += ["| (peak reached in) | " + " | ".join(phases) + " |"]
        host = [by_seq[big].get(c, {}).get("metrics", {}).get("host_peak_bytes", 0) for c in cfgs]
        if any(host):
            lines.append("| (host memory peak, not in the device peak) | "
                         + " | ".join(f"{v / GB:.2f}" for v in host) + " |")
        lines.append("")
    if fits:
        lines += ["### Longest sequence that fits (real runs, bisection over powers of two)", "",
                  "| model | config | batch | ckpt | " + " | ".join(f"{g} GB" for g in fits["budgets_gb"]) + " |",
                  "|---|---|---:|---|" + "---:|" * len(fits["budgets_gb"])]
        for row in fits["rows"]:
            cells = []
            for f in row["fits"]:
                cells.append("none" if f["seq"] is None else (f"≥ {f['seq']}" if f["bound"] == ">=" else str(f["seq"])))
            lines.append(f"| {row['model']} | {row['config']} | {row['batch']} | {'on' if row['ckpt'] else 'off'} | "
                         + " | ".join(cells) + " |")
        lines += ["", "“≥ N”: N was the largest sequence measured and it fits.", ""]
    return "\n".join(lines)


def plot(records, out: Path) -> Optional[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    recs = [r for r in records if r.get("bench") == "memory" and r.get("status") == "ok"]
    if not recs:
        return None
    series = {}
    for r in recs:
        c = r["config"]
        series.setdefault(c["model"], {}).setdefault((c["config"], c["batch"], c["ckpt"]), []).append(
            (c["seq"], r["metrics"]["peak_bytes"] / GB))
    models = sorted(series)
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        for (cfg, batch, ckpt), pts in sorted(series[model].items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                    linestyle={"fastlora": "-", "fastlora+offload": "-."}.get(cfg, "--"),
                    label=f"{cfg} b{batch} ckpt {'on' if ckpt else 'off'}")
        for g in (16, 24, 80):
            ax.axhline(g, color="grey", linewidth=0.6, linestyle=":")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel("peak live tensor memory (GB)")
        ax.set_title(f"{model}: QLoRA step peak (fake tensors)", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "memory_peak_vs_seq.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def gpu_compare(args, device) -> dict:
    """On a GPU: the real ``max_memory_allocated`` of the same step on CUDA tensors (a small model,
    random weights quantized by bitsandbytes) next to the fake-mode figure of the same config."""
    if not torch.cuda.is_available():
        raise RuntimeError("--gpu-compare needs a CUDA device")
    import fastlora
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    out = {}
    for cfg_name in CONFIGS:
        fake_res = run_step(args.compare_model, cfg_name, args.compare_seq, 1, False, r=args.r, dropout=args.dropout)
        import tempfile

        path = tempfile.mkdtemp(prefix="fastlora-mem-")
        cfg = model_config(args.compare_model)
        AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(path)
        bnb_cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                     bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb_cfg, dtype=torch.bfloat16,
                                                     device_map={"": torch.cuda.current_device()},
                                                     attn_implementation="sdpa")
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        model = get_peft_model(model, LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=args.dropout,
                                                 target_modules=list(PROJECTIONS), task_type="CAUSAL_LM"))
        apply_config(model, cfg_name)
        model.train()
        lora = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(lora, lr=1e-4, weight_decay=0.0, foreach=False)
        ids = torch.randint(3, cfg.vocab_size, (1, args.compare_seq), device="cuda")
        for step in range(2):
            if step == 1:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            del loss
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        out[cfg_name] = {"fake_peak_bytes": fake_res["peak_bytes"],
                         "cuda_max_memory_allocated": torch.cuda.max_memory_allocated()}
        del model, opt
        torch.cuda.empty_cache()
    return out


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default="llama3-8b", help=f"comma-separated, of {sorted(MODELS)}")
    ap.add_argument("--config", default="peft,fastlora", help="comma-separated, of " + ",".join(CONFIGS))
    ap.add_argument("--seq", default="512,1024,2048,4096,8192", help="comma-separated sequence lengths")
    ap.add_argument("--batch", default="1", help="comma-separated batch sizes")
    ap.add_argument("--ckpt", default="off,on", help="gradient checkpointing: off, on or off,on")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--fit", default="", help="GB budgets (e.g. 16,24,80): longest seq that fits, by real runs "
                                              "bisecting over the powers of two from the smallest --seq to --fit-max")
    ap.add_argument("--fit-max", type=int, default=32768)
    ap.add_argument("--gpu-compare", action="store_true", help="on a GPU: also the real max_memory_allocated")
    ap.add_argument("--compare-model", default="tiny")
    ap.add_argument("--compare-seq", type=int, default=1024)
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny model, seq 64,128")


def run(args, device: Optional[torch.device] = None) -> dict:
    device = device or torch.device("cpu")
    out = Path(args.out or (harness.REPO_ROOT / "benchmarks" / "results" / "memory-fake"))
    models = ["tiny"] if args.smoke else [m.strip() for m in args.model.split(",") if m.strip()]
    seqs = [64, 128] if args.smoke else [int(s) for s in args.seq.split(",")]
    batches = [int(b) for b in args.batch.split(",")]
    ckpts = [c.strip() == "on" for c in args.ckpt.split(",")]
    cfgs = [c.strip() for c in args.config.split(",")]
    writer = harness.RecordWriter(out, "memory")
    cache = {}
    for model_name in models:
        for batch in batches:
            for ckpt in ckpts:
                for seq in seqs:
                    for cfg_name in cfgs:
                        _measure(cache, writer, model_name, cfg_name, seq, batch, ckpt, args, device)
    fits_path = out / "fits.json"
    fits = json.loads(fits_path.read_text(encoding="utf-8")) if fits_path.exists() else None
    if args.fit:
        budgets = [float(g) for g in args.fit.split(",")]
        grid = [s for s in (2 ** k for k in range(0, 21)) if min(seqs) <= s <= args.fit_max]
        if fits is None or fits.get("budgets_gb") != budgets:
            fits = {"budgets_gb": budgets, "rows": []}
        for model_name in models:
            for batch in batches:
                for ckpt in ckpts:
                    for cfg_name in cfgs:
                        def measure(s, m=model_name, c=cfg_name, b=batch, k=ckpt):
                            return _measure(cache, writer, m, c, s, b, k, args, device)["metrics"]["peak_bytes"]
                        row = {"model": model_name, "config": cfg_name, "batch": batch, "ckpt": ckpt,
                               "fits": [dict(longest_fit(measure, int(g * GB), grid), budget_gb=g) for g in budgets]}
                        key = (model_name, cfg_name, batch, ckpt)
                        fits["rows"] = [r for r in fits["rows"]
                                        if (r["model"], r["config"], r["batch"], r["ckpt"]) != key] + [row]
        with open(fits_path, "w", encoding="utf-8") as f:
            json.dump(fits, f, indent=1)
    if getattr(args, "gpu_compare", False):
        cmp = gpu_compare(args, device)
        with open(out / "gpu_compare.json", "w", encoding="utf-8") as f:
            json.dump(cmp, f, indent=1)
    records = harness.read_records([writer.path])
    md = markdown(records, fits)
    (out / "results.md").write_text(md, encoding="utf-8")
    png = plot(records, out)
    return {"bench": "memory", "out": str(out), "records": writer.count, "plot": str(png) if png else None}
