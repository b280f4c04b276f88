"""``fastlora check``: on this machine, does fastlora compute what PEFT computes, and is it faster?

    fastlora check [--model CONFIG_OR_PATH] [--m 16,2048] [--json] [--out DIR]

(a) Numerics. One PEFT LoRA layer over a bitsandbytes 4-bit (NF4, double quant) and over a dense bf16
    base, bf16 activations, adapters in fp32 and in bf16 (the adapter products in bf16, as under the
    QLoRA recipe's autocast), dropout off and on, each of fastlora's strategies ("fused", "dequant").
    Each product (Y, dX, dA, dB) is compared with an fp64 evaluation of ``fastlora.reference`` on the
    same quantized weight and dropout mask, by the project's tolerance rule
    (``fastlora.reference.tolerance_rule``): fastlora's error at most twice the error of PEFT +
    bitsandbytes themselves (run on the same inputs, with the same mask put in place of PEFT's
    dropout), plus a small atol. On a CPU the kernels run in
    Triton's interpreter at small shapes (``fastlora check`` starts this module in a process with
    ``TRITON_INTERPRET=1`` there).
(b) Speed, on a CUDA GPU only: at the model's projection shapes (``--model``, default llama3-8b; see
    ``fastlora tune``) and token counts ``--m``, forward, backward and forward+backward µs of PEFT's
    layer, fastlora's "dequant" (dequantize, then cuBLAS), "fused", and "auto" (the pick measured by
    ``fastlora.tuning``, tuning first where the cache has no entry; the row names the forward and the
    backward pick, asked with the settings the timed calls ran), the adapter products in bf16 as
    under ``Trainer(bf16=True)``; ratios are PEFT's time over each. CUDA events, L2 flushed before each
    call, median (``tuning.cuda_timer(queued=False)``): each call at the host's pace, so the host's
    cost is in the time, as in an eager step (the tuner times the GPU's work alone). On a CPU it prints "speed: not measured (no GPU)".
(c) One verdict line. Exit status 0 when the numerics pass and, on a GPU, the auto pick is nowhere
    slower than PEFT's layer beyond 5% (forward+backward); 1 otherwise.

``--json`` prints one object: ``device``, ``versions``, ``numerics`` (cases with ``name``, ``passed``,
``max_rel_err``, ...), ``speed`` (rows; [] without a GPU), ``speed_measured``, ``verdict``, ``passed``.
``--out DIR`` writes the same object as one benchmark record (``DIR/check.jsonl``, the fields of
``benchmarks/harness.py``'s records, ``fastlora``'s commit and source hash included: :func:`revision`)
to share; ``python -m benchmarks report DIR`` reads it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import List, Optional

import torch

from . import reference as ref
from . import tuning

SEED = 1234
RANK = 8
NOISE = 1.05          # the auto pick may be this much slower than PEFT's layer before the verdict fails
NOT_MEASURED = "speed: not measured (no GPU)"

# small on a CPU (every program instance runs in Python); K a multiple of the blocksize (the wide
# 4-bit decode, every real projection) and N, M not powers of two
CPU_SHAPE = dict(M=33, K=128, N=96)
GPU_SHAPE = dict(M=257, K=1024, N=768)


# ----------------------------------------------------------------------------------------------
# one PEFT layer, fastlora's view of it
# ----------------------------------------------------------------------------------------------


class _Holder(torch.nn.Module):
    """The smallest model get_peft_model wraps; flagged 4-bit as transformers flags a model it loaded
    with BitsAndBytesConfig (without the flag PEFT wraps a Linear4bit in its generic Linear)."""

    def __init__(self, layer, quantized: bool):
        super().__init__()
        self.proj = layer
        self.is_loaded_in_4bit = quantized

    def forward(self, x):
        return self.proj(x)


class _MaskDropout(torch.nn.Module):
    """PEFT's dropout module replaced by fastlora's mask: PEFT then drops exactly what the kernel drops."""

    def __init__(self, keep: torch.Tensor, p: float):
        super().__init__()
        self.keep, self.p = keep, p

    def forward(self, x):
        return ref.dropout(x, self.keep, self.p)


class Layer:
    """A PEFT LoRA layer over a 4-bit (bitsandbytes NF4, double quant, bf16 compute) or dense bf16 base
    [N, K], adapters (r) in ``adapter_dtype``, B randomized (PEFT zero-inits it), everything seeded."""

    def __init__(self, N: int, K: int, r: int, *, quantized: bool, device, dropout: float = 0.0,
                 adapter_dtype=torch.float32, bias: bool = True, seed: int = 0):
        from peft import LoraConfig, get_peft_model

        from .format import from_bnb

        self.quantized, self.device = quantized, torch.device(device)
        g = torch.Generator().manual_seed(seed)      # drawn on the CPU: the same values on every machine
        dense = torch.nn.Linear(K, N, bias=bias)
        with torch.no_grad():
            dense.weight.copy_(torch.randn(N, K, generator=g) * K ** -0.5)
            if bias:
                dense.bias.copy_(torch.randn(N, generator=g) * 0.1)
        if quantized:
            import bitsandbytes as bnb

            base = bnb.nn.Linear4bit(K, N, bias=bias, compute_dtype=torch.bfloat16, quant_type="nf4",
                                     compress_statistics=True)
            base.load_state_dict(dense.state_dict())
            base = base.to(self.device)               # bitsandbytes quantizes here
            if bias:
                base.bias.data = base.bias.data.to(torch.bfloat16)
        else:
            base = dense.to(device=self.device, dtype=torch.bfloat16).requires_grad_(False)
        cfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=["proj"])
        self.model = get_peft_model(_Holder(base, quantized), cfg)
        self.layer = self.model.base_model.model.proj
        self.A = self.layer.lora_A["default"].weight
        self.B = self.layer.lora_B["default"].weight
        with torch.no_grad():
            self.A.copy_(torch.randn(r, K, generator=g) * K ** -0.5)
            self.B.copy_(torch.randn(N, r, generator=g) * r ** -0.5)
        if adapter_dtype != torch.float32:      # the adapters only: the base keeps its own dtypes
            self.layer.lora_A.to(adapter_dtype)
            self.layer.lora_B.to(adapter_dtype)
            self.A = self.layer.lora_A["default"].weight
            self.B = self.layer.lora_B["default"].weight
        self.scaling = float(self.layer.scaling["default"])
        self.bias = self.layer.base_layer.bias
        w = self.layer.base_layer.weight
        if quantized:
            import bitsandbytes.functional as bnbF

            self.weight = from_bnb(w, w.quant_state)
            self.w_lowp = bnbF.dequantize_4bit(w.data, w.quant_state).to(torch.bfloat16)  # what bitsandbytes multiplies
        else:
            self.weight = w.detach()
            self.w_lowp = self.weight
        self.N, self.K, self.r = N, K, r

    def fastlora(self, x, dy, p: float, strategy: str, lora_dtype=None):
        """(Y, dX, dA, dB) of ``fastlora.lora_linear`` on the layer's own tensors."""
        from .ops import lora_linear

        xg = x.clone().requires_grad_()
        A = self.A.detach().clone().requires_grad_()
        B = self.B.detach().clone().requires_grad_()
        y = lora_linear(xg, self.weight, A, B, self.scaling, bias=self.bias, dropout_p=p, strategy=strategy,
                        seed=SEED, lora_dtype=lora_dtype)
        y.backward(dy)
        return y.detach(), xg.grad, A.grad, B.grad

    def peft(self, x, dy, keep: Optional[torch.Tensor], p: float):
        """(Y, dX, dA, dB) of PEFT's own layer (bitsandbytes' forward for the base), with fastlora's mask."""
        self.A.grad = self.B.grad = None
        saved = self.layer.lora_dropout["default"]
        if p > 0:
            self.layer.lora_dropout["default"] = _MaskDropout(keep, p)
        try:
            xg = x.clone().requires_grad_()
            y = self.model(xg)
            y.backward(dy)
            out = (y.detach(), xg.grad, self.A.grad.clone(), self.B.grad.clone())
        finally:
            self.layer.lora_dropout["default"] = saved
            self.A.grad = self.B.grad = None
        return out

    def exact(self, x, dy, keep: Optional[torch.Tensor], p: float):
        """(Y, dX, dA, dB) in fp64 by ``fastlora.reference`` on the same (quantized) weight and mask."""
        w = self.w_lowp.double()
        A, B = self.A.detach().double(), self.B.detach().double()
        b = None if self.bias is None else self.bias.detach().double()
        y = ref.lora_linear(x.double(), w, A, B, self.scaling, b, keep, p)
        dx, dA, dB = ref.lora_linear_backward(dy.double(), x.double(), w, A, B, self.scaling, keep, p)
        return y, dx, dA, dB


# ----------------------------------------------------------------------------------------------
# (a) numerics
# ----------------------------------------------------------------------------------------------

PRODUCTS = ("Y", "dX", "dA", "dB")


def numerics(device, shape: Optional[dict] = None) -> List[dict]:
    """One case per (base, adapters, dropout, strategy, product)."""
    from .kernels.lora_matmul import dropout_keep_mask

    device = torch.device(device)
    shape = shape or (GPU_SHAPE if device.type == "cuda" else CPU_SHAPE)
    M, K, N = shape["M"], shape["K"], shape["N"]
    cases = []
    for quantized in (True, False):
        for adapter_dtype in (torch.float32, torch.bfloat16):
            layer = Layer(N, K, RANK, quantized=quantized, device=device, adapter_dtype=adapter_dtype, seed=SEED)
            g = torch.Generator().manual_seed(SEED + 1)
            x = torch.randn(M, K, generator=g).to(device=device, dtype=torch.bfloat16)
            dy = torch.randn(M, N, generator=g).to(device=device, dtype=torch.bfloat16)
            for p in (0.0, 0.1):
                keep = dropout_keep_mask(M, K, p, SEED, device) if p > 0 else None
                exact = layer.exact(x, dy, keep, p)
                peft = layer.peft(x, dy, keep, p)
                for strategy in ("fused", "dequant"):
                    ours = layer.fastlora(x, dy, p, strategy)
                    for name, o, e, lp in zip(PRODUCTS, ours, exact, peft):
                        worst, bound, _ = ref.tolerance_rule(o, e, lp)
                        scale = e.detach().double().abs().max().item()
                        err_peft = (lp.detach().double() - e.detach().double()).abs().max().item()
                        cases.append({
                            "name": f"{'4bit' if quantized else 'dense'} {tuning._dtype_name(adapter_dtype)}-adapters "
                                    f"dropout={p:g} {strategy} {name}",
                            "base": "nf4" if quantized else "bfloat16", "adapters": tuning._dtype_name(adapter_dtype),
                            "dropout": p, "strategy": strategy, "product": name,
                            "passed": bool(worst <= bound),
                            "max_rel_err": worst / scale if scale > 0 else worst,
                            "peft_max_rel_err": err_peft / scale if scale > 0 else err_peft,
                            "max_abs_err": worst, "bound": bound,
                        })
    return cases


# ----------------------------------------------------------------------------------------------
# (b) speed
# ----------------------------------------------------------------------------------------------

PROVIDERS = ("peft", "dequant", "fused", "auto")
MODES = ("forward", "backward", "forward+backward")


# what the speed table runs: bf16 activations and bitsandbytes' bf16 compute dtype, the adapter
# products in bf16 (PEFT under autocast; fastlora's lora_dtype, as the patcher passes it)
SPEED_DTYPES = dict(x=torch.bfloat16, compute=torch.bfloat16, lora=torch.bfloat16)


def _provider_fns(layer: Layer, x, dy, provider: str, p: float):
    """{mode: zero-argument callable} for one provider (:data:`SPEED_DTYPES`)."""
    from .ops import lora_linear

    leaves = [x, layer.A, layer.B]
    if provider == "peft":
        def fwd():
            with torch.autocast(x.device.type, dtype=SPEED_DTYPES["lora"]):
                return layer.model(x)
    else:
        def fwd():
            return lora_linear(x, layer.weight, layer.A, layer.B, layer.scaling, bias=layer.bias, dropout_p=p,
                               compute_dtype=SPEED_DTYPES["compute"], lora_dtype=SPEED_DTYPES["lora"],
                               strategy=provider)
    held = {}

    def bwd():
        if "y" not in held:
            held["y"] = fwd()
        return torch.autograd.grad(held["y"], leaves, dy, retain_graph=True)

    def step():
        return torch.autograd.grad(fwd(), leaves, dy)

    return {"forward": fwd, "backward": bwd, "forward+backward": step}, held


def auto_picks(layer: Layer, M: int, p: float) -> dict:
    """{phase: strategy} that "auto" runs for this layer at M: ``tuning.pick`` asked exactly as the op
    asks it for the speed table's calls (their dtypes, rank and dropout)."""
    from .ops import choose_strategy

    return {phase: tuning.pick(M, layer.N, layer.K, layer.weight, layer.device, choose_strategy, phase,
                               SPEED_DTYPES["compute"], p > 0.0, SPEED_DTYPES["x"], SPEED_DTYPES["lora"], layer.r)
            for phase in tuning.PHASES}


def speed(device, shapes, Ms, r: int = 16, p: float = 0.05, budget_s: float = 0.1) -> List[dict]:
    """Rows of µs per (shape, M, provider); ratios are PEFT's time over the provider's."""
    device = torch.device(device)
    rows = []
    for names, N, K in shapes:
        layer = Layer(N, K, r, quantized=True, device=device, dropout=p, bias=False, seed=SEED)
        layer.model.train()
        for M in Ms:
            g = torch.Generator(device=device).manual_seed(SEED)
            x = torch.randn(M, K, generator=g, device=device).to(SPEED_DTYPES["x"]).requires_grad_()
            dy = (torch.randn(M, N, generator=g, device=device) * 0.1).to(SPEED_DTYPES["x"])
            times = {}
            for provider in PROVIDERS:
                fns, held = _provider_fns(layer, x, dy, provider, p)
                times[provider] = {m: tuning.cuda_timer(None, fns[m], budget_s, device, queued=False) * 1e3
                                   for m in MODES}
                held.clear()
            auto = auto_picks(layer, M, p)
            for provider in PROVIDERS:
                t = times[provider]
                rows.append({"proj": names, "N": N, "K": K, "M": M, "m_bucket": tuning.configs.m_bucket(M),
                             "provider": provider, "r": r, "dropout": p,
                             **{f"{m}_us": round(t[m], 2) for m in MODES},
                             **{f"vs_peft_{m}": round(times["peft"][m] / t[m], 3) for m in MODES},
                             **({"auto_strategy": auto} if provider == "auto" else {})})
        del layer
        tuning.release_l2()
        torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------------------------
# the report
# ----------------------------------------------------------------------------------------------


def device_info(device) -> dict:
    device = torch.device(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {"type": "cuda", "name": props.name, "cc": f"{props.major}.{props.minor}",
                "sms": props.multi_processor_count, "memory_bytes": int(props.total_memory),
                "driver": tuning._driver_version(), "cuda": torch.version.cuda}
    return {"type": device.type, "name": platform.processor() or platform.machine() or "cpu",
            "cores": os.cpu_count(), "triton_interpret": tuning._interpreter_active()}


def verdict(cases: List[dict], rows: List[dict], measured: bool) -> tuple:
    """(the verdict line, passed): the numerics all within the rule and, where speed was measured,
    the auto pick nowhere more than NOISE slower than PEFT's layer (forward+backward)."""
    failed = [c for c in cases if not c["passed"]]
    if failed:
        num = (f"numerics FAILED ({len(failed)}/{len(cases)} cases, e.g. {failed[0]['name']}: max_rel_err "
               f"{failed[0]['max_rel_err']:.2e})")
    else:
        num = f"numerics passed ({len(cases)}/{len(cases)} cases)"
    if not measured:
        return f"verdict: {'FAIL' if failed else 'PASS'}: {num}; speed not measured (no GPU)", not failed
    ratios = [(r, r["vs_peft_forward+backward"]) for r in rows if r["provider"] == "auto"]
    slow = [(r, x) for r, x in ratios if x * NOISE < 1.0]
    if not ratios:
        spd = "no speed rows"
    elif slow:
        spd = "auto pick slower than PEFT's layer at " + ", ".join(f"{r['proj']} M={r['M']} ({x:.2f}x)" for r, x in slow)
    else:
        xs = [x for _, x in ratios]
        spd = f"auto pick {min(xs):.2f}-{max(xs):.2f}x PEFT's layer speed (forward+backward) at every shape"
    ok = not failed and not slow and bool(ratios)
    return f"verdict: {'PASS' if ok else 'FAIL'}: {num}; {spd}", ok


def run(model: str = "llama3-8b", Ms=(16, 2048), device=None) -> dict:
    device = torch.device(device) if device is not None else (
        torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu"))
    t0 = time.perf_counter()
    cases = numerics(device)
    measured = device.type == "cuda" and not tuning._interpreter_active()
    rows = speed(device, model_shapes(model), list(Ms)) if measured else []
    line, ok = verdict(cases, rows, measured)
    return {"device": device_info(device), "versions": tuning.versions(), "numerics": cases, "speed": rows,
            "speed_measured": measured, "verdict": line, "passed": ok,
            "config": {"model": model if measured else None, "m": list(Ms) if measured else None,
                       "numerics_shape": GPU_SHAPE if device.type == "cuda" else CPU_SHAPE, "rank": RANK},
            "seconds": round(time.perf_counter() - t0, 2)}


def model_shapes(model: str):
    from .tuning import projection_shapes

    return projection_shapes(model)


def _table(report: dict) -> str:
    lines = []
    cases = report["numerics"]
    d = report["device"]
    lines.append(f"fastlora check on {d['name']} ({d['type']}), torch {report['versions']['torch']}, "
                 f"triton {report['versions']['triton']}, fastlora {report['versions']['fastlora']}")
    lines.append(f"numerics: {sum(c['passed'] for c in cases)}/{len(cases)} cases within the rule (|err| <= 2x "
                 "PEFT+bitsandbytes' error vs fp64 + atol)")
    lines.append(f"  {'case':52s} {'max_rel_err':>11s} {'PEFT':>9s}  ok")
    for c in cases:
        lines.append(f"  {c['name']:52s} {c['max_rel_err']:11.2e} {c['peft_max_rel_err']:9.2e}  "
                     f"{'yes' if c['passed'] else 'NO'}")
    if not report["speed_measured"]:
        lines.append(NOT_MEASURED)
    else:
        lines.append("speed (µs, median; ratio = PEFT's time / this one):")
        lines.append(f"  {'shape':24s} {'M':>6s} {'provider':30s} {'fwd':>9s} {'bwd':>9s} {'fwd+bwd':>9s} "
                     f"{'x fwd':>6s} {'x bwd':>6s} {'x step':>6s}")
        for r in report["speed"]:
            a = r.get("auto_strategy")
            tag = r["provider"] + (f" (fwd {a['forward']}, bwd {a['backward']})" if a else "")
            us = " ".join(f"{r[m + '_us']:9.1f}" for m in MODES)
            ratios = " ".join(f"{r['vs_peft_' + m]:6.2f}" for m in MODES)
            shape = f"{r['proj']} {r['N']}x{r['K']}"
            lines.append(f"  {shape:24s} {r['M']:6d} {tag:30s} {us} {ratios}")
    lines.append(report["verdict"])
    return "\n".join(lines)


def _source_sha256(root: Path) -> str:
    """sha256 over the Python sources, path and bytes, as ``benchmarks/harness.py`` computes it: the
    folders fastlora, kernels and benchmarks in that order, each file's path relative to ``root``
    sorted within its folder. Installed, the kernels folder is wherever ``fastlora.kernels`` lives and
    there is no benchmarks folder."""
    folders = [Path(__file__).resolve().parent, Path(tuning.configs.__file__).resolve().parent, root / "benchmarks"]
    h = hashlib.sha256()
    for name, folder in zip(("fastlora", "kernels", "benchmarks"), folders):
        for path in sorted(folder.rglob("*.py")):
            h.update(f"{name}/{path.relative_to(folder).as_posix()}".encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def revision() -> dict:
    """{'commit', 'dirty', 'source_sha256'}: the ``fastlora`` field of a benchmark record, computed as
    ``benchmarks/harness.py`` computes it (``FASTLORA_COMMIT`` overrides git). git is asked only in a
    checkout (a ``.git`` next to the package): an installed copy has no commit of its own."""
    root = Path(__file__).resolve().parent.parent
    commit, dirty = os.environ.get("FASTLORA_COMMIT") or None, None
    if commit is None and (root / ".git").exists():
        try:
            commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                                    text=True, timeout=10, check=True).stdout.strip() or None
            status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=10, check=True).stdout
            dirty = bool(status.strip())
        except (OSError, subprocess.SubprocessError):
            commit = None
    return {"commit": commit or "unknown", "dirty": dirty, "source_sha256": _source_sha256(root)}


def record(report: dict) -> dict:
    """The report as a benchmark record (the fields of ``benchmarks/harness.py``'s records)."""
    d = report["device"]
    return {"schema": 1, "bench": "check", "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "device": d["type"], "device_name": d["name"], "versions": report["versions"],
            "python": platform.python_version(), "platform": platform.platform(), "cuda": torch.version.cuda,
            "triton_interpret": tuning._interpreter_active(), "fastlora": revision(),
            "performance_claim": bool(report["speed_measured"]), "smoke": False, "config": report["config"],
            "metrics": {k: report[k] for k in ("numerics", "speed", "speed_measured", "verdict", "passed", "seconds")},
            "formulas": {"max_rel_err": "max|out - exact| / max|exact|, exact = fp64 reference on the same W and mask",
                         "passed": "max|out - exact| <= 2 * max|PEFT - exact| + 1e-5 * max(1, max|exact|)",
                         "vs_peft_*": "PEFT layer µs / provider µs (median, CUDA events, L2 flushed)"},
            "status": "ok" if report["passed"] else "failed", "device_info": d}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="fastlora check", description="Numerics against PEFT + bitsandbytes and an "
                                 "fp64 reference; on a GPU, speed against PEFT's layer; one verdict.")
    ap.add_argument("--model", default="llama3-8b",
                    help="the speed table's shapes: a built-in config name or a local config.json (or its folder)")
    ap.add_argument("--m", default="16,2048", help="token counts of the speed table (comma list)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    ap.add_argument("--out", default=None, help="also write the report as a benchmark record to DIR/check.jsonl")
    args = ap.parse_args(argv)
    try:
        Ms = [int(v) for v in args.m.split(",") if v.strip()]
        model_shapes(args.model)
    except ValueError as exc:
        print(f"fastlora check: {exc}", file=sys.stderr)
        return 2
    report = run(args.model, Ms)
    if args.json:
        print(json.dumps(report, default=str))
    else:
        print(_table(report))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "check.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record(report), default=str) + "\n")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    # run through the package's module, so that the op and this command share one tuning state
    from fastlora.check import main as _main

    sys.exit(_main())
