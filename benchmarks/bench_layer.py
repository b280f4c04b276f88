"""Layer benchmark: one LoRA projection over an NF4 double-quant base weight, every provider side by side.

    Y = X·Wᵀ + bias + s·(D(X)·Aᵀ)·Bᵀ      X [M, K] bf16, W [N, K] NF4 (blocksize 64, double quant),
                                          A [r, K], B [N, r] fp32 (as get_peft_model leaves them)

Providers (all read the same W bytes, A, B, bias, X and dY):
    peft              PEFT's LoRA Linear4bit over a bitsandbytes Linear4bit, as a user's model runs it
    dequant-cublas    bitsandbytes dequantize_4bit -> torch.matmul -> LoRA via addmm_ (adapters cast to
                      bf16), a small autograd Function that dequantizes again in backward: the
                      strategy of the best-known peer (DESIGN §4), written here from that description
    fastlora-fused    fastlora.lora_linear(strategy="fused")
    fastlora-dequant  fastlora.lora_linear(strategy="dequant")
    fastlora-auto     fastlora.lora_linear(strategy="auto"); the pick of fastlora.choose_strategy is recorded
    bf16-floor        the bare frozen GEMMs on an already dequantized bf16 W: X·Wᵀ (forward), dY·W
                      (backward); no LoRA, no dequant. What no 4-bit layer can beat at large M.

Modes: forward (building the autograd graph, as in training), backward (over a retained graph),
forward+backward. FLOPs (stated in every record):
    frozen GEMMs   2·M·N·K per product (forward X·Wᵀ, backward dY·W; W is frozen: no dW)
    LoRA forward   2·M·r·(K + N)                    H = D(X)·Aᵀ, H·Bᵀ
    LoRA backward  4·M·r·(K + N)                    G = dY·B, G·A, dA = Gᵀ·D(X), dB = dYᵀ·H
Minimum bytes moved (forward): N·K/2 (4-bit W) + N·K/64 (uint8 absmax) + 2·M·K (X) + 2·M·N (Y)
+ 4·r·(K + N) (fp32 A, B); backward adds 2·M·N (dY) and replaces Y by dX (2·M·K).
"""

from __future__ import annotations

import argparse
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

PROVIDERS = ("peft", "dequant-cublas", "fastlora-fused", "fastlora-dequant", "fastlora-auto", "bf16-floor")
MODES = ("forward", "backward", "forward+backward")
LORA_PROVIDERS = PROVIDERS[:-1]

FULL_M = (256, 512, 1024, 2048, 4096, 8192, 16384)
SMOKE_M = (16, 37)
LORA_ALPHA_PER_R = 2  # alpha = 2·r (r=16 -> alpha 32, the train benchmark's recipe)

FORMULAS = {
    "flops.forward": "2*M*N*K + 2*M*r*(K+N)  (bf16-floor: 2*M*N*K)",
    "flops.backward": "2*M*N*K + 4*M*r*(K+N)  (bf16-floor: 2*M*N*K)",
    "flops.forward+backward": "4*M*N*K + 6*M*r*(K+N)  (bf16-floor: 4*M*N*K)",
    "bytes.forward": "N*K/2 + N*K/64 + 2*M*K + 2*M*N + 4*r*(K+N)  (bf16-floor: 2*N*K + 2*M*K + 2*M*N)",
    "bytes.backward": "N*K/2 + N*K/64 + 2*M*N + 2*M*K + 4*r*(K+N)  (bf16-floor: 2*N*K + 2*M*N + 2*M*K)",
    "bytes.forward+backward": "sum of the two",
    "tflops": "flops / (median_ms * 1e-3) / 1e12",
    "gbps": "bytes / (median_ms * 1e-3) / 1e9",
    "max_abs_diff_vs_peft": "max |Y - Y_peft| of one forward with dropout off (eval), same inputs",
}


def flops(mode: str, M: int, N: int, K: int, r: int, lora: bool) -> int:
    frozen = 2 * M * N * K
    fwd = frozen + (2 * M * r * (K + N) if lora else 0)
    bwd = frozen + (4 * M * r * (K + N) if lora else 0)
    return {"forward": fwd, "backward": bwd, "forward+backward": fwd + bwd}[mode]


def min_bytes(mode: str, M: int, N: int, K: int, r: int, lora: bool) -> int:
    w = (N * K // 2 + N * K // 64 + 4 * r * (K + N)) if lora else 2 * N * K
    fwd = w + 2 * M * K + 2 * M * N
    bwd = w + 2 * M * N + 2 * M * K
    return {"forward": fwd, "backward": bwd, "forward+backward": fwd + bwd}[mode]


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
        from peft import LoraConfig, get_peft_model

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
        self.x = randn(M, K).to(torch.bfloat16).requires_grad_(True)
        self.dy = randn(M, N, std=0.1).to(torch.bfloat16)


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


def make_forward(provider: str, inp: Inputs, case: Case, device: torch.device) -> Callable[[], torch.Tensor]:
    """A zero-argument callable computing the provider's Y (with its autograd graph)."""
    import fastlora

    if provider == "peft":
        return lambda: inp.peft_model(inp.x)
    if provider == "dequant-cublas":
        def fwd():
            xd = torch.nn.functional.dropout(inp.x, case.dropout, training=True) if case.dropout > 0 else None
            return DequantCublasLoRA.apply(inp.x, xd, inp.A, inp.B, inp.weight, inp.quant_state, inp.bias,
                                           inp.scaling)
        return fwd
    if provider.startswith("fastlora-"):
        strategy = provider.split("-", 1)[1]
        return lambda: fastlora.lora_linear(inp.x, inp.weight, inp.A, inp.B, inp.scaling, bias=inp.bias,
                                            quant_state=inp.quant_state, dropout_p=case.dropout,
                                            compute_dtype=torch.bfloat16, strategy=strategy)
    raise ValueError(f"unknown provider {provider!r}; choose from {PROVIDERS}")


def _check_against_peft(inp: Inputs, case: Case, device: torch.device, providers) -> dict:
    """max |Y - Y_peft| of each LoRA provider, one forward with dropout off (module in eval)."""
    diffs = {}
    saved = case.dropout
    inp.peft_model.eval()
    case.dropout = 0.0
    try:
        with torch.no_grad():
            ref = inp.peft_model(inp.x).float()
            for p in providers:
                if p in LORA_PROVIDERS and p != "peft":
                    y = make_forward(p, inp, case, device)().float()
                    diffs[p] = float((y - ref).abs().max())
            diffs["peft"] = 0.0
            diffs["_ref_absmax"] = float(ref.abs().max())
    finally:
        case.dropout = saved
        inp.peft_model.train()
    return diffs


def _mode_fns(provider: str, inp: Inputs, case: Case, device: torch.device):
    """{mode: (callable, grad_to_none)} for one provider."""
    grads = [inp.x, inp.A, inp.B]
    if provider == "bf16-floor":
        import bitsandbytes.functional as F

        w = F.dequantize_4bit(inp.weight, inp.quant_state).to(torch.bfloat16)   # [N, K], once
        x = inp.x.detach()

        def both():
            torch.matmul(x, w.t())
            return torch.matmul(inp.dy, w)

        return {"forward": (lambda: torch.matmul(x, w.t()), None),
                "backward": (lambda: torch.matmul(inp.dy, w), None),
                "forward+backward": (both, None)}, [w]
    fwd = make_forward(provider, inp, case, device)
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


def cases(families, Ms, ranks, dropouts):
    for fam in families:
        for proj, K, N, bias in FAMILIES[fam]:
            for r in ranks:
                for p in dropouts:
                    for M in Ms:
                        yield Case(fam, proj, K, N, bias, M, r, p)


def run_case(case: Case, providers, modes, device: torch.device, smoke: bool, writer: harness.RecordWriter,
             timing: dict) -> None:
    import fastlora

    inp = Inputs(case, device)
    auto_pick = fastlora.choose_strategy(case.M, case.N, case.K, True, device)
    try:
        diffs = _check_against_peft(inp, case, device, providers)
    except Exception as exc:  # a broken provider must not hide the others' numbers
        diffs = {"_error": f"{type(exc).__name__}: {exc}"}
    base_cfg = {"family": case.family, "proj": case.proj, "M": case.M, "N": case.N, "K": case.K, "r": case.r,
                "lora_alpha": case.alpha, "scaling": inp.scaling, "dropout": case.dropout, "bias": case.bias,
                "x_dtype": "bfloat16", "adapter_dtype": str(inp.A.dtype).replace("torch.", ""),
                "weight": {"quant_type": "nf4", "double_quant": True, "blocksize": 64,
                           "compute_dtype": "bfloat16", "quantized_by": "bitsandbytes Params4bit on " + device.type},
                "timing": timing, "auto_strategy": auto_pick,
                "peft_layer": f"{type(inp.layer).__module__}.{type(inp.layer).__name__}"}
    for provider in providers:
        lora = provider != "bf16-floor"
        try:
            fns, keep = _mode_fns(provider, inp, case, device)
        except Exception as exc:
            for mode in modes:
                writer.write(harness.make_record(
                    "layer", {**base_cfg, "provider": provider, "mode": mode}, {}, FORMULAS, device=device,
                    smoke=smoke, status="error", error=f"{type(exc).__name__}: {exc}"))
            continue
        for mode in modes:
            fn, grads = fns[mode]
            cfg = {**base_cfg, "provider": provider, "mode": mode}
            if provider == "fastlora-auto":
                cfg["strategy"] = auto_pick
            elif provider.startswith("fastlora-"):
                cfg["strategy"] = provider.split("-", 1)[1]
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
            b = min_bytes(mode, case.M, case.N, case.K, case.r, lora)
            metrics = {**t, **mem, "flops": f, "bytes": b,
                       "tflops": f / (t["median_ms"] * 1e-3) / 1e12,
                       "gbps": b / (t["median_ms"] * 1e-3) / 1e9,
                       "max_abs_diff_vs_peft": diffs.get(provider) if lora else None,
                       "ref_absmax": diffs.get("_ref_absmax")}
            if "_error" in diffs:
                metrics["check_error"] = diffs["_error"]
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
    ap.add_argument("--providers", type=_csv(str), default=None, help=f"comma list of {PROVIDERS}")
    ap.add_argument("--modes", type=_csv(str), default=None, help=f"comma list of {MODES}")
    ap.add_argument("--warmup-ms", type=int, default=25)
    ap.add_argument("--rep-ms", type=int, default=100)
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
    todo = [c for c in cases(families, Ms, ranks, dropouts)
            if not args.proj or any(p in c.proj.split(",") for p in args.proj)]
    done = 0
    for i, case in enumerate(todo):
        if budget.expired():
            harness.log(f"layer: budget spent, {len(todo) - i} of {len(todo)} cases not run")
            break
        harness.log(f"[layer {i + 1}/{len(todo)}] {case.family} {case.proj} K={case.K} N={case.N} M={case.M} "
                    f"r={case.r} dropout={case.dropout}")
        run_case(case, providers, modes, device, args.smoke, writer, timing)
        done += 1
    return {"bench": "layer", "cases_planned": len(todo), "cases_run": done, "records": writer.count,
            "path": str(writer.path)}
