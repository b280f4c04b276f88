"""Train benchmark: QLoRA fine-tuning steps of a Llama-shaped model, unpatched vs ``fastlora.patch``.

The model is what a user trains: a Llama checkpoint (random weights from a ``LlamaConfig``, saved
once to a local folder) loaded with ``BitsAndBytesConfig(load_in_4bit, nf4, double quant, bf16
compute)``, gradient checkpointing on (non-reentrant), PEFT LoRA r=16, alpha=32, dropout=0.05 on the
seven projections (q, k, v, o, gate, up, down), fp32 adapters as get_peft_model leaves them, AdamW,
the forward under ``torch.autocast(bfloat16)`` as ``Trainer(bf16=True)`` runs it (``--no-autocast``:
without; PEFT then runs the adapters in fp32).

Per model, at one batch x sequence:
    tokens/s   = batch · seq · steps / wall time of ``steps`` optimizer steps (after ``warmup`` steps)
    peak VRAM  = max_memory_allocated over the measured steps
    each variant, unpatched and patched (``fastlora.patch``), on a model loaded afresh from the same
    checkpoint with the same seed (same quantized weights, same initial adapters: their sha256 is in
    the record), a new AdamW and the same batch; the variants run in a random order, recorded
    (``order``, ``position``, ``order_seed``), or in the one ``--order`` names.
Longest trainable sequence at batch 1 under 16 GB and 24 GB: the allocator is capped with
``torch.cuda.set_per_process_memory_fraction(budget / total)`` (model weights, adapters and AdamW
state count; the CUDA context does not), then doubling from ``--seq-start`` until a step runs out
of memory, then bisection down to ``--seq-granularity`` tokens. A probe is one full optimizer step.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import time
from pathlib import Path
from typing import Optional

import torch

from . import harness

# Llama shapes. llama-1b is Llama-3.2-1B's, llama3-8b is Llama-3-8B's; tiny is for smoke runs.
PRESETS = {
    "tiny": dict(hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, max_position_embeddings=512, tie_word_embeddings=False),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
                     rope_theta=500000.0, tie_word_embeddings=True),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
                      rope_theta=500000.0, tie_word_embeddings=False),
}
# per model: (batch, seq) of the throughput measurement
THROUGHPUT_SHAPE = {"tiny": (1, 16), "llama-1b": (4, 1024), "llama3-8b": (2, 1024)}
VARIANTS = ("unpatched", "patched")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.05)
MEMORY_BUDGETS_GB = (16, 24)

FORMULAS = {
    "tokens_per_s": "batch * seq * steps / (wall seconds of the measured steps, device synchronized)",
    "step_ms": "median / p20 / p80 of per-step wall times (forward + backward + AdamW step)",
    "peak_bytes": "torch.cuda.max_memory_allocated over the measured steps (reset before them)",
    "max_seq": "largest seq (multiple of seq_granularity) whose batch-1 step ran under "
               "set_per_process_memory_fraction(budget_gb * 2**30 / total_memory)",
}


# ----------------------------------------------------------------------------------------------
# the model, as a user loads it
# ----------------------------------------------------------------------------------------------


def llama_config(preset: str):
    from transformers import LlamaConfig

    return LlamaConfig(**PRESETS[preset])


def save_random_model(preset: str, folder: Path, device: torch.device) -> Path:
    """A random-weight bf16 checkpoint of ``preset`` in ``folder`` (reused when already there)."""
    from transformers import AutoModelForCausalLM

    marker = folder / "config.json"
    if marker.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    # initialised in bf16 on the GPU when there is one: an 8B model initialised on the CPU takes minutes
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(llama_config(preset), dtype=torch.bfloat16)
    model.save_pretrained(folder)
    del model
    harness.free_memory(device)
    return folder


def _test_models():
    """tests/models.py, the one place that says how a user loads a Llama in 4-bit and configures LoRA
    (loaded by path: ``tests`` is not a package)."""
    import importlib.util

    path = harness.REPO_ROOT / "tests" / "models.py"
    spec = importlib.util.spec_from_file_location("fastlora_tests_models", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load_qlora_model(folder: Path, device: torch.device, gradient_checkpointing: bool = True):
    """from_pretrained 4-bit + gradient checkpointing (non-reentrant) + PEFT LoRA on the seven projections."""
    from peft import get_peft_model

    models = _test_models()
    model = models.load_llama_4bit(str(folder), device=str(device))
    if gradient_checkpointing:
        # transformers >= 5.2x renamed it; the GPU image's 5.17 has only the old name
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model = get_peft_model(model, models.lora_config(target_modules=TARGETS, **LORA))
    model.train()
    return model


# ----------------------------------------------------------------------------------------------
# steps
# ----------------------------------------------------------------------------------------------


class Trainer:
    def __init__(self, model, device: torch.device, vocab: int, seed: int = 0, autocast: bool = True):
        self.model, self.device, self.vocab, self.autocast = model, device, vocab, autocast
        params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=1e-4)
        self.gen = torch.Generator(device="cpu").manual_seed(seed)

    def batch(self, b: int, s: int) -> torch.Tensor:
        return torch.randint(0, self.vocab, (b, s), generator=self.gen).to(self.device)

    def step(self, ids: torch.Tensor) -> float:
        # the forward under bf16 autocast, the backward outside it (what Trainer(bf16=True) does)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            loss = self.model(input_ids=ids, labels=ids).loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    def throughput(self, b: int, s: int, warmup: int, steps: int) -> dict:
        ids = self.batch(b, s)
        losses = [self.step(ids) for _ in range(warmup)]
        harness.sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        times = []
        t_all = time.perf_counter()
        for _ in range(steps):
            t0 = time.perf_counter()
            losses.append(self.step(ids))  # float(loss) synchronizes
            harness.sync(self.device)
            times.append((time.perf_counter() - t0) * 1e3)
        wall = time.perf_counter() - t_all
        med, p20, p80 = harness.quantiles(times)
        peak = int(torch.cuda.max_memory_allocated(self.device)) if self.device.type == "cuda" else None
        return {"tokens_per_s": b * s * steps / wall, "wall_s": wall, "step_ms_median": med, "step_ms_p20": p20,
                "step_ms_p80": p80, "peak_bytes": peak, "losses": losses}

    def fits(self, s: int) -> bool:
        """One batch-1 optimizer step at seq ``s``: True if it ran, False on out-of-memory."""
        try:
            self.step(self.batch(1, s))
            harness.sync(self.device)
            return True
        except Exception as exc:
            if not harness.is_oom(exc):
                raise
            del exc
            self.opt.zero_grad(set_to_none=True)
            return False
        finally:
            harness.free_memory(self.device)

    def max_seq(self, budget_gb: float, start: int, cap: int, granularity: int, budget: harness.Budget) -> dict:
        total = torch.cuda.get_device_properties(self.device).total_memory
        harness.free_memory(self.device)   # cached blocks would count against the cap
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget_gb * 2**30 / total), self.device)
        probes, lo, hi, truncated = [], 0, None, False
        try:
            s = start
            while s <= cap:                        # doubling: lo fits, hi does not
                if budget.expired():
                    truncated = True
                    break
                ok = self.fits(s)
                probes.append((s, ok))
                if not ok:
                    hi = s
                    break
                lo, s = s, s * 2
            while hi is not None and hi - lo > granularity and not truncated:   # bisection
                if budget.expired():
                    truncated = True
                    break
                mid = (lo + hi) // 2 // granularity * granularity
                if mid <= lo:
                    break
                ok = self.fits(mid)
                probes.append((mid, ok))
                lo, hi = (mid, hi) if ok else (lo, mid)
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0, self.device)
            harness.free_memory(self.device)
        return {"max_seq": lo, "first_oom_seq": hi, "reached_cap": hi is None and not truncated,
                "truncated": truncated, "probes": probes}


# ----------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------


def _patch_report(rep) -> dict:
    """fastlora.patch's report as JSON: read after the measured steps, so its live call counters say
    how many layer calls ran the fused op and how many fell back to PEFT's forward (and why)."""
    out = {"summary": rep.summary() if callable(getattr(rep, "summary", None)) else str(rep)}
    for name in ("patched", "skipped", "already_patched", "fused_calls", "fallback_calls"):
        v = getattr(rep, name, None)
        if isinstance(v, list):
            out[name + "_count"] = len(v)
        elif isinstance(v, dict):
            out[name] = {str(k): v[k] for k in v}
        elif v is not None:
            out[name] = v
    return out


def _resolved(cfg: dict) -> dict:
    return {k: (v() if callable(v) else v) for k, v in cfg.items()}


def _measure_variant(preset, trainer, cfg, args, device, writer, budget) -> None:
    """Throughput at cfg's batch x seq, then (GPU) the max-seq search per memory budget."""
    b, s, warmup, steps, variant = cfg["batch"], cfg["seq"], cfg["warmup_steps"], cfg["steps"], cfg["variant"]
    try:
        m = trainer.throughput(b, s, warmup, steps)
        status, err = "ok", None
    except Exception as exc:
        if not harness.is_oom(exc):
            raise
        m, status, err = {}, "oom", f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
        del exc
        trainer.opt.zero_grad(set_to_none=True)
        harness.free_memory(device)
    writer.write(harness.make_record("train.throughput", _resolved(cfg), m, FORMULAS, device=device,
                                     smoke=args.smoke, status=status, error=err))
    harness.log(f"  {preset} {variant:9s} b={b} s={s}: "
                + (f"{m['tokens_per_s']:.0f} tokens/s, step {m['step_ms_median']:.1f} ms"
                   + (f", peak {m['peak_bytes'] / 2**30:.2f} GiB" if m.get("peak_bytes") else "")
                   if status == "ok" else status))
    if device.type != "cuda" or args.no_max_seq:
        return
    total_gb = torch.cuda.get_device_properties(device).total_memory / 2**30
    for gb in args.memory_budgets:
        if gb > total_gb or budget.expired():
            return
        res = trainer.max_seq(gb, args.seq_start, args.seq_cap, args.seq_granularity, budget)
        mcfg = {**{k: v for k, v in _resolved(cfg).items() if k not in ("batch", "seq", "warmup_steps", "steps")},
                "batch": 1, "memory_budget_gb": gb, "seq_start": args.seq_start, "seq_cap": args.seq_cap,
                "seq_granularity": args.seq_granularity}
        writer.write(harness.make_record("train.max_seq", mcfg, res, FORMULAS, device=device, smoke=args.smoke,
                                         status="truncated" if res["truncated"] else "ok"))
        harness.log(f"  {preset} {variant:9s} {gb} GB: max seq {res['max_seq']} (first OOM {res['first_oom_seq']})")


def _adapter_sha256(model) -> str:
    """sha256 over the trainable parameters (name, dtype, bytes): equal for two variants exactly when
    they start from the same adapters."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        if p.requires_grad:
            h.update(name.encode())
            h.update(str(p.dtype).encode())
            h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def _model_description(model) -> dict:
    """The quantization and adapter dtype as loaded, read from the model's first 4-bit layer."""
    import bitsandbytes as bnb

    base = next(m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    adapter = next(p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n)
    w = harness.describe_4bit(base)
    w.pop("shape"), w.pop("device")
    return {"weight": w, "adapter_dtype": harness.dtype_name(adapter.dtype)}


def variant_order(how: str, rng_seed: Optional[int]) -> tuple:
    """The order the variants run in (each from a freshly loaded model, so the order only matters through
    what the device carries over: clocks, allocator, caches); 'random' draws it from ``rng_seed``."""
    if how == "random":
        import random

        return tuple(random.Random(rng_seed).sample(VARIANTS, len(VARIANTS)))
    order = tuple(how.split(","))
    if sorted(order) != sorted(VARIANTS):
        raise SystemExit(f"--order must be 'random' or a permutation of {','.join(VARIANTS)}, got {how!r}")
    return order


def run_model(preset: str, args, device: torch.device, writer: harness.RecordWriter, budget: harness.Budget) -> None:
    """Each variant trains a model loaded afresh from the same checkpoint with the same seed: the same
    quantized weights, the same initial adapters (their sha256 is recorded), a new AdamW, the same batch."""
    import fastlora

    cache = Path(args.model_cache) / preset
    save_random_model(preset, cache, device)
    b, s = (args.batch, args.seq) if args.batch and args.seq else THROUGHPUT_SHAPE[preset]
    if args.smoke:
        b, s = THROUGHPUT_SHAPE["tiny"] if preset == "tiny" else (1, 64)
    warmup, steps = (1, 1) if args.smoke else (args.warmup, args.steps)
    order_seed = args.order_seed if args.order_seed is not None else int.from_bytes(os.urandom(4), "little")
    order = variant_order(args.order, order_seed)
    for position, variant in enumerate(order):
        if budget.expired():
            harness.log(f"train: budget spent before {preset} {variant}")
            break
        torch.manual_seed(args.seed)            # PEFT draws lora_A's init from the default generator
        t0 = time.perf_counter()
        model = load_qlora_model(cache, device)
        load_s = time.perf_counter() - t0
        cfg_model = {"preset": preset, **PRESETS[preset], "load_in_4bit": True, **_model_description(model),
                     "gradient_checkpointing": "non-reentrant",
                     "lora": {**LORA, "target_modules": TARGETS},
                     "optimizer": "torch.optim.AdamW(lr=1e-4)", "load_seconds": load_s,
                     "autocast": "bfloat16" if not args.no_autocast else None}
        cfg = {"model": cfg_model, "variant": variant, "batch": b, "seq": s, "warmup_steps": warmup,
               "steps": steps, "seed": args.seed, "order": list(order), "position": position,
               "order_rule": args.order, "order_seed": order_seed if args.order == "random" else None,
               "initial_adapters_sha256": _adapter_sha256(model)}
        trainer = Trainer(model, device, PRESETS[preset]["vocab_size"], seed=args.seed, autocast=not args.no_autocast)
        if variant == "patched":
            rep = fastlora.patch(model)
            cfg["patch_report"] = lambda rep=rep: _patch_report(rep)   # read when each record is written
        _measure_variant(preset, trainer, cfg, args, device, writer, budget)
        del trainer, model      # the next variant starts from the checkpoint again
        harness.free_memory(device)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--smoke", action="store_true", help="tiny model, few steps (CPU + Triton interpreter)")
    ap.add_argument("--out", default=None, help="output folder (default benchmarks/results/<device-slug>)")
    ap.add_argument("--model", type=lambda s: s.split(","), default=None,
                    help=f"comma list of {sorted(PRESETS)} (default llama-1b,llama3-8b; smoke: tiny)")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps first")
    ap.add_argument("--steps", type=int, default=5, help="timed optimizer steps")
    ap.add_argument("--memory-budgets", type=lambda s: [float(v) for v in s.split(",")],
                    default=list(MEMORY_BUDGETS_GB), help="GB budgets of the max-seq search (default 16,24)")
    ap.add_argument("--no-max-seq", action="store_true", help="skip the max-sequence search")
    ap.add_argument("--no-autocast", action="store_true",
                    help="run the forward without torch.autocast(bfloat16) (default: with it, as Trainer(bf16=True))")
    ap.add_argument("--seq-start", type=int, default=1024)
    ap.add_argument("--seq-cap", type=int, default=65536)
    ap.add_argument("--seq-granularity", type=int, default=512)
    ap.add_argument("--model-cache", default=os.environ.get("FASTLORA_BENCH_MODELS",
                                                            str(Path(os.environ.get("TMPDIR", "/tmp"))
                                                                / "fastlora-bench-models")),
                    help="where the random checkpoints are saved and reused")
    ap.add_argument("--seed", type=int, default=0, help="seed of the adapters' init and of the batch (every variant)")
    ap.add_argument("--order", default="random",
                    help="variant order: 'random' (drawn from --order-seed, recorded) or e.g. 'patched,unpatched'")
    ap.add_argument("--order-seed", type=int, default=None, help="seed of a random order (default: drawn, recorded)")
    ap.add_argument("--budget-seconds", type=float, default=None)


def run(args, device: Optional[torch.device] = None, budget: Optional[harness.Budget] = None) -> dict:
    device = device or harness.default_device()
    budget = budget or harness.Budget(args.budget_seconds)
    models = args.model or (["tiny"] if args.smoke else ["llama-1b", "llama3-8b"])
    for m in models:
        if m not in PRESETS:
            raise SystemExit(f"unknown model {m!r}; choose from {sorted(PRESETS)}")
    writer = harness.RecordWriter(args.out, "train")
    run_models = []
    for preset in models:
        if budget.expired():
            harness.log(f"train: budget spent, {preset} not run")
            break
        harness.log(f"[train] {preset}")
        run_model(preset, args, device, writer, budget)
        run_models.append(preset)
    return {"bench": "train", "models_planned": models, "models_run": run_models, "records": writer.count,
            "path": str(writer.path)}
