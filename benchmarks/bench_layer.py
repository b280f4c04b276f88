"""Layer benchmark: one LoRA projection over an NF4 double-quant base weight, every provider side by side.

    Y = X·Wᵀ + bias + s·(D(X)·Aᵀ)·Bᵀ      X [M, K] bf16, W [N, K] NF4 (blocksize 64, double quant),
                                          A [r, K], B [N, r] fp32 (as get_peft_model leaves them)

Every case runs with the adapters' products in bf16 under autocast (``--autocast bf16``: the QLoRA
recipe, ``Trainer(bf16=True)``; ``peft`` and ``fastlora-patched`` run inside ``torch.autocast``, the
direct fastlora providers get ``lora_dtype=bfloat16``, as the patcher passes it) and/or without it
(``off``: fp32 adapters computed in fp32, by PEFT and fastlora alike). ``dequant-cublas`` computes its
LoRA terms in bf16 either way.

Providers (all read the same W bytes, A, B, bias, X and dY):
    peft              PEFT's LoRA Linear4bit over a bitsandbytes Linear4bit, as a user's model runs it
    dequant-cublas    bitsandbytes dequantize_4bit -> torch.matmul -> LoRA via addmm_ (adapters cast to
                      bf16), a small autograd Function that dequantizes again in backward: the
                      strategy of the best-known peer (DESIGN §4), written here from that description
    fastlora-fused    fastlora.lora_linear(strategy="fused")   on a Packed4bit built once, outside the
    fastlora-dequant  fastlora.lora_linear(strategy="dequant") timed call (fastlora.format.from_bnb), so
    fastlora-auto     fastlora.lora_linear(strategy="auto")    the op itself is timed
    fastlora-patched  the same PEFT model as ``peft`` after ``fastlora.patch``: what a user runs, including
                      the patcher's per-call decision (reading the module, from_bnb) and its auto pick
    bf16-floor        the bare frozen GEMMs on an already dequantized bf16 W: X·Wᵀ (forward), dY·W
                      (backward); no LoRA, no dequant. What no 4-bit layer can beat at large M.

Which strategy fastlora-auto and fastlora-patched really ran is not taken from the rule: their Y and dX
are compared bit for bit with those of fastlora-fused and fastlora-dequant (dropout off), and the
record says which one they equal (``strategy_observed``), next to the rule's pick (``auto_strategy``).

Modes: forward (building the autograd graph, as in training), backward (over a retained graph),
forward+backward. FLOPs (stated in every record):
    frozen GEMMs   2·M·N·K per product (forward X·Wᵀ, backward dY·W; W is frozen: no dW)
    LoRA forward   2·M·r·(K + N)                    H = D(X)·Aᵀ, H·Bᵀ
    LoRA backward  4·M·r·(K + N)                    G = dY·B, G·A, dA = Gᵀ·D(X), dB = dYᵀ·H
Minimum bytes moved, see ``min_bytes``.
"""

from __future__ import annotations

import argparse
import contextlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import harness

# ----------------------------------------------------------------------------------------------
# shapes: (projection names, in_features K, out_features N, has bias)
# Identical shapes are measured once (k/v, gate/up). Mistral-7B's projections are exactly
# Llama-3-8B's (hidden 4096, 8 KV heads x 128, intermediate 14336), so the second family is Qwen2-7B
# (hidden 3584, 4 KV heads x 128, intermediate 18944, biased q/k/v).
# ----------------------------------------------------------------------------------------------

FAMILIES = {
    "llama3-8b": [
        ("q_proj", 4096, 4096, False),
        ("k_proj,v_proj", 4096, 1024, False),
        ("o_proj", 4096, 4096, False),
        ("gate_proj,up_proj", 4096, 14336, False),
        ("down_proj", 14336, 4096, False),
    ],
    "qwen2-7b": [
        ("q_proj", 3584, 3584, True),
        ("k_proj,v_proj", 3584, 512, True),
        ("o_proj", 3584, 3584, False),
        ("gate_proj,up_proj", 3584, 18944, False),
        ("down_proj", 18944, 3584, False),
    ],
    # smoke: odd, tiny shapes that run in seconds under the Triton interpreter
    "tiny": [
        ("q_proj", 64, 48, True),
        ("down_proj", 80, 40, False),
    ],
}

# the one list of providers and modes (report.py imports them from here)
PROVIDERS = ("peft", "dequant-cublas", "fastlora-fused", "fastlora-dequant", "fastlora-auto", "fastlora-patched",
             "bf16-floor")
MODES = ("forward", "backward", "forward+backward")
# not a measurement: fastlora inspect's static speed-of-light model of the same call, for the GPU the
# run is on (or --model-arch on a CPU), as a column beside the measured providers
MODEL_PROVIDER = "fastlora-model"
LORA_PROVIDERS = tuple(p for p in PROVIDERS if p != "bf16-floor")
STRATEGIES = ("fused", "dequant")                    # what fastlora-auto / -patched can turn out to be
GRADS = ("y", "dx", "da", "db")                      # what is compared with PEFT

FULL_M = (256, 512, 1024, 2048, 4096, 8192, 16384)
AUTOCAST = ("bf16", "off")
SMOKE_M = (16, 37)
LORA_ALPHA_PER_R = 2  # alpha = 2·r (r=16 -> alpha 32, the train benchmark's recipe)

FORMULAS = {
    "flops.forward": "2*M*N*K + 2*M*r*(K+N)  (bf16-floor: 2*M*N*K)",
    "flops.backward": "2*M*N*K + 4*M*r*(K+N)  (bf16-floor: 2*M*N*K)",
    "flops.forward+backward": "4*M*N*K + 6*M*r*(K+N)  (bf16-floor: 4*M*N*K)",
    "bytes.forward": "N*K/2 + N*K/blocksize + 2*M*K + 2*M*N + 4*r*(K+N) + 4*M*r  "
                     "(W 4-bit + uint8 absmax, X, Y, fp32 A and B, fp32 H written for backward; "
                     "bf16-floor: 2*N*K + 2*M*K + 2*M*N)",
    "bytes.backward": "N*K/2 + N*K/blocksize + 2*M*N + 2*M*K + 2*M*K + 4*M*r + 4*r*(K+N) + 4*r*(K+N)  "
                      "(W, dY, dX written, X re-read for dA, H read for dB, A and B read, dA and dB written; "
                      "bf16-floor: 2*N*K + 2*M*N + 2*M*K)",
    "bytes.forward+backward": "sum of the two",
    "tflops": "flops / (median_ms * 1e-3) / 1e12",
    "gbps": "bytes / (median_ms * 1e-3) / 1e9",
    "max_abs_diff_vs_peft": "max |Y - Y_peft|, one forward with dropout off (eval), same inputs",
    "max_abs_diff_vs_peft_dx": "max |dX - dX_peft| of backward(dY) after that forward",
    "max_abs_diff_vs_peft_da": "max |dA - dA_peft| (lora_A.weight.grad)",
    "max_abs_diff_vs_peft_db": "max |dB - dB_peft| (lora_B.weight.grad)",
    "ref_absmax*": "max |.| of PEFT's Y, dX, dA, dB",
    "matches_peft": "every max_abs_diff_vs_peft* <= 2 * eps(bfloat16) * ref_absmax* (one bf16 rounding of the "
                    "largest value: X, W and dY are bf16, and dequant-cublas computes its LoRA terms in bf16)",
    "strategy_observed": "the strategy whose Y and dX (dropout off) equal this provider's bit for bit: "
                         "fused | dequant | indistinguishable (both do) | neither",
}


def flops(mode: str, M: int, N: int, K: int, r: int, lora: bool) -> int:
    frozen = 2 * M * N * K
    fwd = frozen + (2 * M * r * (K + N) if lora else 0)
    bwd = frozen + (4 * M * r * (K + N) if lora else 0)
    return {"forward": fwd, "backward": bwd, "forward+backward": fwd + bwd}[mode]


def min_bytes(mode: str, M: int, N: int, K: int, r: int, lora: bool, blocksize: int = 64) -> int:
    """Bytes a provider must at least move (double-quant absmax: one uint8 per block; the second level,
    N·K/blocksize/256 fp32, is left out):

    forward   W4 + X + Y + A,B + H     = N·K/2 + N·K/blocksize + 2·M·K + 2·M·N + 4·r·(K+N) + 4·M·r
    backward  W4 + dY + dX + X + H + A,B + dA,dB
                                       = N·K/2 + N·K/blocksize + 2·M·N + 2·M·K + 2·M·K + 4·M·r + 8·r·(K+N)
    (X is read again for dA = s·Gᵀ·D(X); H = D(X)·Aᵀ, fp32, is written by the forward and read for
    dB = s·dYᵀ·H.) bf16-floor: forward 2·N·K + 2·M·K + 2·M·N, backward 2·N·K + 2·M·N + 2·M·K.
    """
    if not lora:
        fwd = 2 * N * K + 2 * M * K + 2 * M * N
        bwd = 2 * N * K + 2 * M * N + 2 * M * K
    else:
        w4 = N * K // 2 + N * K // blocksize
        ab = 4 * r * (K + N)
        h = 4 * M * r
        fwd = w4 + 2 * M * K + 2 * M * N + ab + h
        bwd = w4 + 2 * M * N + 2 * M * K + 2 * M * K + h + ab + ab
    return {"forward": fwd, "backward": bwd, "forward+backward": fwd + bwd}[mode]


def tolerance(ref_absmax: float) -> float:
    """The agreement every LoRA provider must reach with PEFT (see FORMULAS['matches_peft'])."""
    return 2 * torch.finfo(torch.bfloat16).eps * ref_absmax


# ----------------------------------------------------------------------------------------------
# one case: shared inputs
# ----------------------------------------------------------------------------------------------


@dataclass
class Case:
    family: str
    proj: str
    K: int
    N: int
    bias: bool
    M: int
    r: int
    dropout: float
    autocast: str = "off"     # "bf16": the providers run the adapters as under torch.autocast(bf16)

    @property
    def alpha(self) -> int:
        return LORA_ALPHA_PER_R * self.r


class _Holder(torch.nn.Module):
    """The smallest model get_peft_model can wrap; flagged 4-bit as transformers flags a model it
    loaded with BitsAndBytesConfig (without the flag PEFT wraps Linear4bit in its generic Linear)."""

    is_loaded_in_4bit = True

    def __init__(self, layer):
        super().__init__()
        self.proj = layer

    def forward(self, x):
        return self.proj(x)


class Inputs:
    """Everything a case's providers share, built once on the device."""

    def __init__(self, case: Case, device: torch.device, seed: int = 0):
        import bitsandbytes as bnb

        self.case, self.device = case, device
        from peft import LoraConfig, get_peft_model

        from fastlora.format import from_bnb

        g = torch.Generator(device=device).manual_seed(seed)

        def randn(*shape, std=1.0):
            return torch.randn(*shape, generator=g, device=device) * std

        K, N, M, r = case.K, case.N, case.M, case.r
        # the base layer, quantized by bitsandbytes on the device (Params4bit -> quantize_4bit) as
        # from_pretrained(quantization_config=...) does
        base = bnb.nn.Linear4bit(K, N, bias=case.bias, compute_dtype=torch.bfloat16, compress_statistics=True,
                                 quant_type="nf4")
        base.weight = bnb.nn.Params4bit(randn(N, K, std=K ** -0.5).to(torch.bfloat16), requires_grad=False,
                                        compress_statistics=True, quant_type="nf4", blocksize=64)
        if case.bias:
            base.bias = torch.nn.Parameter(randn(N, std=0.1).to(torch.bfloat16), requires_grad=False)
        holder = _Holder(base).to(device)
        cfg = LoraConfig(r=r, lora_alpha=case.alpha, lora_dropout=case.dropout, target_modules=["proj"])
        self.peft_model = get_peft_model(holder, cfg)
        self.peft_model.train()
        self.layer = self.peft_model.base_model.model.proj
        self.weight = self.layer.base_layer.weight          # Params4bit [N*K/2, 1] uint8
        self.quant_state = self.weight.quant_state
        self.bias = self.layer.base_layer.bias
        self.A = self.layer.lora_A["default"].weight       # [r, K] fp32, trainable
        self.B = self.layer.lora_B["default"].weight       # [N, r] fp32, trainable (PEFT zero-inits it)
        self.scaling = float(self.layer.scaling["default"])
        with torch.no_grad():
            self.A.copy_(randn(r, K, std=K ** -0.5))
            self.B.copy_(randn(N, r, std=r ** -0.5))
        self.compute_dtype = self.layer.base_layer.compute_dtype
        self.x = randn(M, K).to(self.compute_dtype).requires_grad_(True)
        self.dy = randn(M, N, std=0.1).to(self.compute_dtype)
        # fastlora's view of W, built once here so the fastlora-* providers time the op, not from_bnb's
        # checks (and its read of the double-quant offset) on every call
        self.packed = from_bnb(self.weight, self.quant_state)


# ----------------------------------------------------------------------------------------------
# providers
# ----------------------------------------------------------------------------------------------


class DequantCublasLoRA(torch.autograd.Function):
    """Y = X·Wᵀ (+bias) + s·(Xd·Aᵀ)·Bᵀ with W dequantized by bitsandbytes, the GEMMs on cuBLAS, the
    adapters cast to X's dtype and the LoRA term added by ``addmm_``. W is dequantized again in
    backward. Xd is the dropped-out X computed outside (autograd applies the dropout mask to its
    gradient), or None when p = 0 (then the LoRA input gradient is added into dX by ``addmm_``).
    Saves: X (or Xd), H = Xd·Aᵀ [M, r], the cast A and B."""

    @staticmethod
    def forward(ctx, x2, xd, lora_A, lora_B, weight, quant_state, bias, scaling):
        import bitsandbytes.functional as F

        w = F.dequantize_4bit(weight, quant_state).to(x2.dtype)      # [N, K]
        y = torch.matmul(x2, w.t())
        del w
        if bias is not None:
            y += bias
        a = lora_A.to(x2.dtype)
        b = lora_B.to(x2.dtype)
        lora_in = x2 if xd is None else xd
        h = torch.matmul(lora_in, a.t())                                # [M, r]
        y.addmm_(h, b.t(), alpha=scaling)
        ctx.save_for_backward(lora_in, h, a, b)
        ctx.weight, ctx.quant_state, ctx.scaling = weight, quant_state, scaling
        ctx.dropout = xd is not None
        ctx.adapter_dtypes = (lora_A.dtype, lora_B.dtype)
        return y

    @staticmethod
    def backward(ctx, dy):
        import bitsandbytes.functional as F

        lora_in, h, a, b = ctx.saved_tensors
        s = ctx.scaling
        w = F.dequantize_4bit(ctx.weight, ctx.quant_state).to(dy.dtype)
        dx = torch.matmul(dy, w)                                         # [M, K]
        del w
        g = torch.matmul(dy, b)                                          # G = dY·B  [M, r]
        dxd = None
        if ctx.dropout:
            dxd = torch.matmul(g, a).mul_(s)                             # through the dropout mask
        else:
            dx.addmm_(g, a, alpha=s)
        dA = torch.matmul(g.t(), lora_in).mul_(s).to(ctx.adapter_dtypes[0])
        dB = torch.matmul(dy.t(), h).mul_(s).to(ctx.adapter_dtypes[1])
        return dx, dxd, dA, dB, None, None, None, None


def make_forward(provider: str, inp: Inputs, dropout: float) -> Callable[[], torch.Tensor]:
    """A zero-argument callable computing the provider's Y (with its autograd graph). ``dropout`` is
    the LoRA dropout of the providers that take it as an argument; peft and fastlora-patched follow
    the PEFT module's (train: p, eval: off). fastlora-patched must run inside ``provider_state``."""
    import fastlora

    ac = inp.case.autocast == "bf16"
    if provider in ("peft", "fastlora-patched"):
        if not ac:
            return lambda: inp.peft_model(inp.x)

        def fwd_autocast():
            with torch.autocast(inp.device.type, dtype=torch.bfloat16):
                return inp.peft_model(inp.x)
        return fwd_autocast
    if provider == "dequant-cublas":
        def fwd():
            xd = torch.nn.functional.dropout(inp.x, dropout, training=True) if dropout > 0 else None
            return DequantCublasLoRA.apply(inp.x, xd, inp.A, inp.B, inp.weight, inp.quant_state, inp.bias,
                                           inp.scaling)
        return fwd
    if provider in ("fastlora-fused", "fastlora-dequant", "fastlora-auto"):
        strategy = provider.split("-", 1)[1]
        lora_dtype = torch.bfloat16 if ac else None      # None: the adapters' dtype (fp32)
        return lambda: fastlora.lora_linear(inp.x, inp.packed, inp.A, inp.B, inp.scaling, bias=inp.bias,
                                            dropout_p=dropout, compute_dtype=inp.compute_dtype,
                                            lora_dtype=lora_dtype, strategy=strategy)
    raise ValueError(f"unknown provider {provider!r}; choose from {PROVIDERS}")


@contextlib.contextmanager
def provider_state(provider: str, inp: Inputs):
    """fastlora-patched runs the PEFT model with ``fastlora.patch`` applied (yields its report, whose live
    counters say how many calls ran the fused op); every other provider runs the model as loaded."""
    if provider != "fastlora-patched":
        yield None
        return
    import fastlora

    rep = fastlora.patch(inp.peft_model)
    try:
        yield rep
    finally:
        fastlora.unpatch(inp.peft_model)


def _run_once(fwd: Callable[[], torch.Tensor], inp: Inputs) -> dict:
    """Y, dX, dA, dB of one forward and backward(dY); the leaves' .grad are left cleared."""
    leaves = (inp.x, inp.A, inp.B)
    for t in leaves:
        t.grad = None
    y = fwd()
    y.backward(inp.dy)
    out = {"y": y.detach(), "dx": inp.x.grad, "da": inp.A.grad, "db": inp.B.grad}
    for t in leaves:
        t.grad = None
    return out


def _observed(out: dict, by_strategy: dict) -> str:
    """Which explicit strategy produced exactly these Y and dX (the strategy changes only the frozen
    products, so dA and dB cannot tell)."""
    same = [s for s, o in by_strategy.items() if all(torch.equal(out[k], o[k]) for k in ("y", "dx"))]
    if len(same) == 1:
        return same[0]
    return "indistinguishable" if same else "neither"


def _name(metric: str, grad: str) -> str:
    """'max_abs_diff_vs_peft' for Y, 'max_abs_diff_vs_peft_dx' for dX, ..."""
    return metric if grad == "y" else f"{metric}_{grad}"


def _check_against_peft(inp: Inputs, providers) -> dict:
    """{provider: {'max_abs_diff_vs_peft[_dx|_da|_db]': .., 'matches_peft': .., 'strategy_observed': ..}}
    and '_ref': PEFT's absmax per output. One forward + backward(dY) per provider with dropout off
    (the PEFT module in eval, dropout_p=0), the same X, dY, W, A, B."""
    res = {}
    inp.peft_model.eval()
    try:
        ref = {k: v.float() for k, v in _run_once(make_forward("peft", inp, 0.0), inp).items()}
        res["_ref"] = {_name("ref_absmax", k): float(v.abs().max()) for k, v in ref.items()}
        # the explicit strategies' outputs, kept for telling what auto / patched ran
        by_strategy = {}
        if {"fastlora-auto", "fastlora-patched"} & set(providers):
            for s in STRATEGIES:
                by_strategy[s] = _run_once(make_forward("fastlora-" + s, inp, 0.0), inp)
        for p in providers:
            if p not in LORA_PROVIDERS or p == "peft":
                continue
            strategy = p.split("-", 1)[1]
            if p.startswith("fastlora-") and strategy in by_strategy:
                out = by_strategy[strategy]                     # computed just above
            else:
                with provider_state(p, inp):
                    out = _run_once(make_forward(p, inp, 0.0), inp)
            m = {_name("max_abs_diff_vs_peft", k): float((out[k].float() - ref[k]).abs().max()) for k in GRADS}
            m["matches_peft"] = all(m[_name("max_abs_diff_vs_peft", k)]
                                    <= tolerance(res["_ref"][_name("ref_absmax", k)]) for k in GRADS)
            if p in ("fastlora-auto", "fastlora-patched"):
                m["strategy_observed"] = _observed(out, by_strategy)
            res[p] = m
            del out
    finally:
        inp.peft_model.train()
    return res


def _mode_fns(provider: str, inp: Inputs, case: Case):
    """{mode: (callable, grad_to_none)} for one provider."""
    grads = [inp.x, inp.A, inp.B]
    if provider == "bf16-floor":
        import bitsandbytes.functional as F

        w = F.dequantize_4bit(inp.weight, inp.quant_state).to(inp.compute_dtype)   # [N, K], once
        x = inp.x.detach()

        def both():
            torch.matmul(x, w.t())
            return torch.matmul(inp.dy, w)

        return {"forward": (lambda: torch.matmul(x, w.t()), None),
                "backward": (lambda: torch.matmul(inp.dy, w), None),
                "forward+backward": (both, None)}, [w]
    fwd = make_forward(provider, inp, case.dropout)
    retained = {}

    def backward():
        if "y" not in retained:
            retained["y"] = fwd()
        retained["y"].backward(inp.dy, retain_graph=True)

    def fwd_bwd():
        fwd().backward(inp.dy)

    return {"forward": (fwd, grads), "backward": (backward, grads), "forward+backward": (fwd_bwd, grads)}, [retained]


# ----------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------


def cases(families, Ms, ranks, dropouts, autocasts=("off",)):
    for ac in autocasts:
        for fam in families:
            for proj, K, N, bias in FAMILIES[fam]:
                for r in ranks:
                    for p in dropouts:
                        for M in Ms:
                            yield Case(fam, proj, K, N, bias, M, r, p, ac)


def _patch_counts(rep) -> dict:
    return {"patch_patched_layers": len(rep.patched), "patch_fused_calls": int(rep.fused_calls),
            "patch_fallback_calls": {str(k): int(v) for k, v in rep.fallback_calls.items()}}


def run_case(case: Case, providers, modes, device: torch.device, smoke: bool, writer: harness.RecordWriter,
             timing: dict) -> None:
    import fastlora

    inp = Inputs(case, device)
    try:
        checks = _check_against_peft(inp, providers)
    except Exception as exc:  # a broken provider must not hide the others' numbers
        checks = {"_error": f"{type(exc).__name__}: {exc}"}
    weight = harness.describe_4bit(inp.layer.base_layer)
    weight["quantized_by"] = "bitsandbytes Params4bit on " + device.type
    base_cfg = {"family": case.family, "proj": case.proj, "M": case.M, "N": case.N, "K": case.K, "r": case.r,
                "lora_alpha": case.alpha, "scaling": inp.scaling, "dropout": case.dropout, "bias": case.bias,
                "x_dtype": harness.dtype_name(inp.x.dtype), "adapter_dtype": harness.dtype_name(inp.A.dtype),
                "autocast": case.autocast,
                "lora_compute_dtype": "bfloat16" if case.autocast == "bf16" else harness.dtype_name(inp.A.dtype),
                "weight": weight, "timing": timing,
                # the rule's pick for this call (lora_linear sees M = x's rows, a Packed4bit W)
                "auto_strategy": fastlora.choose_strategy(case.M, device),
                "peft_layer": f"{type(inp.layer).__module__}.{type(inp.layer).__name__}"}
    for provider in providers:
        lora = provider != "bf16-floor"
        check = checks.get(provider, {})
        with contextlib.ExitStack() as stack:
            try:
                rep = stack.enter_context(provider_state(provider, inp))
                fns, keep = _mode_fns(provider, inp, case)
            except Exception as exc:
                for mode in modes:
                    writer.write(harness.make_record(
                        "layer", {**base_cfg, "provider": provider, "mode": mode}, {}, FORMULAS, device=device,
                        smoke=smoke, status="error", error=f"{type(exc).__name__}: {exc}"))
                continue
            for mode in modes:
                fn, grads = fns[mode]
                cfg = {**base_cfg, "provider": provider, "mode": mode}
                if provider == "dequant-cublas":
                    cfg["lora_compute_dtype"] = "bfloat16"    # it casts the adapters to X's dtype itself
                if provider.startswith("fastlora-"):
                    cfg["strategy"] = provider.split("-", 1)[1] if provider != "fastlora-patched" else "auto"
                    if "strategy_observed" in check:
                        cfg["strategy_observed"] = check["strategy_observed"]
                try:
                    t = harness.bench(fn, device, grad_to_none=grads, **timing)
                    mem = harness.peak_memory(fn, device)
                except Exception as exc:
                    status = "oom" if harness.is_oom(exc) else "error"
                    msg = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                    del exc
                    harness.free_memory(device)
                    writer.write(harness.make_record("layer", cfg, {}, FORMULAS, device=device, smoke=smoke,
                                                     status=status, error=msg))
                    harness.log(f"  {provider:17s} {mode:17s} {status}: {msg}")
                    continue
                f = flops(mode, case.M, case.N, case.K, case.r, lora)
                b = min_bytes(mode, case.M, case.N, case.K, case.r, lora, blocksize=weight["blocksize"])
                metrics = {**t, **mem, "flops": f, "bytes": b,
                           "tflops": f / (t["median_ms"] * 1e-3) / 1e12,
                           "gbps": b / (t["median_ms"] * 1e-3) / 1e9}
                if lora and provider != "peft":
                    metrics.update({k: v for k, v in check.items() if k != "strategy_observed"})
                    metrics.update(checks.get("_ref", {}))
                if rep is not None:
                    metrics.update(_patch_counts(rep))   # the calls of this provider so far: warm-up, reps, memory
                if "_error" in checks:
                    metrics["check_error"] = checks["_error"]
                writer.write(harness.make_record("layer", cfg, metrics, FORMULAS, device=device, smoke=smoke))
                harness.log(f"  {provider:17s} {mode:17s} {t['median_ms']:9.3f} ms  [{t['p20_ms']:.3f}, "
                            f"{t['p80_ms']:.3f}]  {metrics['tflops']:.2f} TFLOP/s"
                            + (f"  peak +{mem['peak_extra_bytes'] / 2**20:.0f} MiB" if mem["peak_bytes"] else ""))
                for k in keep:  # drop a graph retained for the backward mode before the next mode
                    if isinstance(k, dict):
                        k.clear()
            del fns, keep
    del inp
    harness.free_memory(device)


def _csv(kind):
    return lambda s: [kind(v) for v in s.split(",") if v.strip()]


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, few reps (CPU + Triton interpreter); "
                    "records carry performance_claim=false")
    ap.add_argument("--out", default=None, help="output folder (default benchmarks/results/<device-slug>)")
    ap.add_argument("--family", type=_csv(str), default=None,
                    help=f"comma list of {sorted(FAMILIES)} (default llama3-8b,qwen2-7b; smoke: tiny)")
    ap.add_argument("--proj", type=_csv(str), default=None, help="comma list of projections, e.g. q_proj,down_proj")
    ap.add_argument("--m", type=_csv(int), default=None, help=f"tokens M (default {','.join(map(str, FULL_M))})")
    ap.add_argument("--r", type=_csv(int), default=None, help="LoRA ranks (default 16,64)")
    ap.add_argument("--dropout", type=_csv(float), default=None, help="LoRA dropout (default 0,0.05)")
    ap.add_argument("--autocast", type=_csv(str), default=None,
                    help="comma list of bf16 (adapters as under torch.autocast(bfloat16): the QLoRA recipe) "
                         "and off (fp32 adapters in fp32); default bf16,off, bf16 cases first")
    ap.add_argument("--providers", type=_csv(str), default=None, help=f"comma list of {PROVIDERS}")
    ap.add_argument("--modes", type=_csv(str), default=None, help=f"comma list of {MODES}")
    ap.add_argument("--warmup-ms", type=int, default=25)
    ap.add_argument("--rep-ms", type=int, default=100)
    ap.add_argument("--model", action=argparse.BooleanOptionalAction, default=True,
                    help=f"add the {MODEL_PROVIDER} column: fastlora inspect's modelled µs (a model, not a measurement)")
    ap.add_argument("--model-arch", default=None,
                    help="GPU target the model is for (default: this GPU's; on a CPU sm_90)")
    ap.add_argument("--budget-seconds", type=float, default=None,
                    help="start no new case after this many seconds (the case in hand finishes)")


def run(args, device: Optional[torch.device] = None, budget: Optional[harness.Budget] = None) -> dict:
    device = device or harness.default_device()
    budget = budget or harness.Budget(args.budget_seconds)
    families = args.family or (["tiny"] if args.smoke else ["llama3-8b", "qwen2-7b"])
    for fam in families:
        if fam not in FAMILIES:
            raise SystemExit(f"unknown family {fam!r}; choose from {sorted(FAMILIES)}")
    Ms = args.m or (list(SMOKE_M) if args.smoke else list(FULL_M))
    ranks = args.r or ([4] if args.smoke and args.family is None else [16, 64])
    dropouts = args.dropout if args.dropout is not None else ([0.05] if args.smoke else [0.0, 0.05])
    autocasts = getattr(args, "autocast", None) or ["bf16", "off"]
    for ac in autocasts:
        if ac not in AUTOCAST:
            raise SystemExit(f"unknown --autocast {ac!r}; choose from {AUTOCAST}")
    providers = args.providers or list(PROVIDERS)
    modes = args.modes or list(MODES)
    for p in providers:
        if p not in PROVIDERS:
            raise SystemExit(f"unknown provider {p!r}; choose from {PROVIDERS}")
    for m in modes:
        if m not in MODES:
            raise SystemExit(f"unknown mode {m!r}; choose from {MODES}")
    if args.smoke:
        timing = {"cpu_warmup": 0, "cpu_reps": 1} if device.type == "cpu" else {"warmup_ms": 5, "rep_ms": 20}
    elif device.type == "cpu":
        timing = {"cpu_warmup": 1, "cpu_reps": 3}
    else:
        timing = {"warmup_ms": args.warmup_ms, "rep_ms": args.rep_ms}
    writer = harness.RecordWriter(args.out, "layer")
    todo = [c for c in cases(families, Ms, ranks, dropouts, autocasts)
            if not args.proj or any(p in c.proj.split(",") for p in args.proj)]
    done = 0
    for i, case in enumerate(todo):
        if budget.expired():
            harness.log(f"layer: budget spent, {len(todo) - i} of {len(todo)} cases not run")
            break
        harness.log(f"[layer {i + 1}/{len(todo)}] {case.family} {case.proj} K={case.K} N={case.N} M={case.M} "
                    f"r={case.r} dropout={case.dropout} autocast={case.autocast}")
        run_case(case, providers, modes, device, args.smoke, writer, timing)
        done += 1
    if getattr(args, "model", False) and done:
        write_model_records(todo[:done], modes, device, args.smoke, writer, getattr(args, "model_arch", None))
    return {"bench": "layer", "cases_planned": len(todo), "cases_run": done, "records": writer.count,
            "path": str(writer.path)}


def write_model_records(todo, modes, device, smoke, writer, arch=None) -> None:
    """One ``fastlora-model`` record per case and mode: the modelled µs of the fused and dequant
    strategies and of the automatic pick, next to the floor, from ``fastlora.inspection`` (compiled for
    the target, never run). ``performance_claim`` is false on these records: they are a model."""
    from fastlora import inspection
    from fastlora.kernels.targets import device_target

    import fastlora

    target = arch or (device_target(device).name if device.type == "cuda" else "sm_90")
    if target not in inspection.TARGETS:  # a GPU the table lacks: its nearest entry's figures
        target = device_target(device).figures_from or "sm_90"
    calls = {}
    for i, case in enumerate(todo):
        for strategy in ("fused", "dequant"):
            # autocast bf16: the adapter products in bf16; off: fp32 adapters in fp32
            calls[(i, strategy)] = inspection.Call(
                case.N, case.K, case.M, case.r, case.dropout, "bf16", "nf4", True, 64, strategy, "train", case.proj,
                adapters="autocast" if case.autocast == "bf16" else "fp32")
    try:
        reports = inspection.run(list(calls.values()), [target])
    except Exception as exc:  # the model is a column; its failure must not lose the measurements
        harness.log(f"  {MODEL_PROVIDER}: not available ({type(exc).__name__}: {exc})")
        return
    by_call = {id_: rep for id_, rep in zip(calls, reports)}
    for i, case in enumerate(todo):
        auto = fastlora.choose_strategy(case.M, device, target=inspection.get_target(target))
        for mode in modes:
            def us(rep):
                return rep.model_us if mode == "forward+backward" else rep.phase_us(mode)
            fused, deq = by_call[(i, "fused")], by_call[(i, "dequant")]
            metrics = {"model_us_fused": us(fused), "model_us_dequant": us(deq),
                       "model_us_auto": us(fused if auto == "fused" else deq),
                       "floor_us_step": fused.floor_us, "fits": fused.ok and deq.ok}
            cfg = {"family": case.family, "proj": case.proj, "M": case.M, "N": case.N, "K": case.K, "r": case.r,
                   "dropout": case.dropout, "autocast": case.autocast, "provider": MODEL_PROVIDER, "mode": mode,
                   "model_target": target,
                   "auto_strategy": auto, "model": "static speed-of-light model (fastlora inspect), not a measurement"}
            rec = harness.make_record("layer", cfg, metrics, {"model_us_*": inspection.__doc__.split("The formulas")[1][:1200]},
                                      device=device, smoke=smoke)
            rec["performance_claim"] = False
            writer.write(rec)
