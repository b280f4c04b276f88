"""The frozen 4-bit product alone at a few tokens: GPU time of each way to compute it, side by side.

    python -m benchmarks.bench_gemv [--m 1,4,8,16] [--out DIR] [--dry]

For each Llama-3-8B projection (NF4, double quant, blocksize 64, a Gaussian weight quantized by
bitsandbytes), each M and each direction (forward Y = X·Wᵀ, backward dX = dY·W), bf16:

- ``gemv``: fastlora's GEMV kernel (the tile of the table's GEMV row, ``configs.GEMV_ROW``, with up to
  8 rows a program);
- ``mma16``: fastlora's tensor-core kernel with the family's M <= 16 row (its decode: the nibble
  table, ``quant4.decode_nibbles``); ``mma16 pair``: the same tile with the pair table;
- ``table``: what ``lora_matmul`` runs for this M with no override (the family table's pick);
- ``dequant-cublas``: fastlora's dequant kernel into a bf16 W, then ``torch.mm``;
- ``bnb``: bitsandbytes' own: ``bnb.matmul_4bit`` forward (its ``gemv_4bit`` kernel at M = 1 in
  inference), and for dX what its backward does (``dequantize_4bit``, then ``torch.mm``);
- ``bf16-floor``: ``torch.mm`` on the bf16 weight (cuBLAS, no decode: what a 16-bit model pays).

Each is the median of CUDA events around one call queued behind a GPU sleep, the L2 flushed before
each (``fastlora.tuning.cuda_timer``): GPU time, not host time. ``floor_4bit_us``: the weight's packed
bytes and absmax at the device's DRAM bandwidth as the targets table states it (a model figure, the
only one in a record). Every fastlora output is checked against ``dequant-cublas``'s within the
tolerance a bf16 product allows. Needs CUDA (``--dry``: the CPU under the interpreter on a small
shape, to check the script). Writes ``gemv.jsonl`` to --out when given.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace

import torch

SHAPES = {"q_proj,o_proj": (4096, 4096), "k_proj,v_proj": (1024, 4096), "gate_proj,up_proj": (14336, 4096),
          "down_proj": (4096, 14336)}
DRY_SHAPES = {"dry": (96, 128)}
# other GEMV tiles, timed at these M only (not in the printed table; in the records), to see what the
# row's choices cost: the W tile's shape, warps, pipeline depth, split count
VARIANT_M = (1, 8)
GEMV_VARIANTS: list = []     # filled in main (configs imports triton)


def _providers(q, packed, qs, wd, trans: bool, M: int, target):
    """name -> fn(a) returning the product [M, J] in bf16."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbF

    from fastlora.kernels import configs, lora_matmul as lm
    from fastlora.kernels.quant4 import dequantize_4bit

    J = q.K if trans else q.N
    dev = wd.device

    def fused(cfg):
        def run(a):
            out = torch.empty((a.shape[0], J), dtype=torch.bfloat16, device=dev)
            if cfg is None:
                lm.lora_matmul(a, q, out, trans_w=trans, compute_dtype=torch.bfloat16)
            else:
                with configs.override("frozen4", cfg):
                    lm.lora_matmul(a, q, out, trans_w=trans, compute_dtype=torch.bfloat16)
            return out
        return run

    def no_budget(fn):
        # the GEMV without its stated register budget (lm.GEMV_MAXNREG), plans resolved afresh
        def run(a):
            prev, lm.GEMV_MAXNREG = lm.GEMV_MAXNREG, None
            lm._PLANS.clear()
            try:
                return fn(a)
            finally:
                lm.GEMV_MAXNREG = prev
                lm._PLANS.clear()
        return run

    scratch = torch.empty_like(wd)

    def dequant_cublas(a):
        dequantize_4bit(q, torch.bfloat16, out=scratch)
        return a @ (scratch if trans else scratch.t())

    def bnb_own(a):
        if not trans:
            return bnb.matmul_4bit(a, packed.t(), quant_state=qs)
        return a @ bnbF.dequantize_4bit(packed, qs).to(torch.bfloat16)

    def floor(a):
        return a @ (wd if trans else wd.t())

    provs = {}
    if target is not None:
        fam = configs.family(target)
        # the GEMV row's tile, up to 8 rows a program (the row itself is for M = 1)
        provs["gemv"] = fused(replace(configs.GEMV_ROW[1], block_m=8))
        mma16 = next(c for m, c in configs.TABLES[fam]["frozen4"] if c.block_m >= configs.MMA_MIN_ROWS)
        provs["mma16"] = fused(mma16)
        # the same tile with the other decode table (the row's own: the nibble table)
        provs["mma16 pair" if mma16.nibbles else "mma16 nibble"] = fused(replace(mma16, nibbles=not mma16.nibbles))
    else:   # the interpreter: a small GEMV tile and the interpreter's own
        provs["gemv"] = fused(configs.TileConfig(8, 32, 64, 4, 2, 4))
        provs["mma16"] = fused(configs.TileConfig(16, 32, 64, 4, 1, 4, nibbles=True))
        provs["mma16 pair"] = fused(configs.TileConfig(16, 32, 64, 4, 1, 4))
    if target is not None and M in VARIANT_M:
        for cfg in GEMV_VARIANTS:
            provs[f"gemv {cfg.block_j}x{cfg.block_i} w{cfg.num_warps} s{cfg.num_stages} k{cfg.split}"] = fused(cfg)
        provs["gemv no-maxnreg"] = no_budget(fused(replace(configs.GEMV_ROW[1], block_m=8)))
    provs["table"] = fused(None)
    provs["dequant-cublas"] = dequant_cublas
    provs["bnb"] = bnb_own
    provs["bf16-floor"] = floor
    return provs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_gemv", description=__doc__.split("\n\n")[0])
    ap.add_argument("--m", default="1,4,8,16")
    ap.add_argument("--budget", type=float, default=0.15, help="seconds of timed calls per provider")
    ap.add_argument("--out", default=None)
    ap.add_argument("--dry", action="store_true", help="CPU, interpreter, one small shape: checks the script")
    args = ap.parse_args(argv)
    if args.dry:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif not torch.cuda.is_available():
        print("bench_gemv needs CUDA (--dry checks the script on the CPU)", file=sys.stderr)
        return 2

    import bitsandbytes.functional as bnbF

    from benchmarks import harness
    from fastlora import tuning
    from fastlora.format import from_bnb
    from fastlora.kernels._launch import launch_target
    from fastlora.kernels.quant4 import dequantize_4bit

    from fastlora.kernels.configs import TileConfig

    GEMV_VARIANTS[:] = [TileConfig(8, 32, 128, 4, 3, 32), TileConfig(8, 128, 64, 8, 3, 32),
                        TileConfig(8, 64, 64, 4, 1, 32), TileConfig(8, 64, 128, 4, 2, 32),
                        TileConfig(8, 64, 64, 4, 3, 8), TileConfig(8, 16, 256, 4, 3, 32)]
    dev = torch.device("cpu") if args.dry else torch.device("cuda")
    target = None if args.dry else launch_target(dev)
    shapes = DRY_SHAPES if args.dry else SHAPES
    Ms = [int(m) for m in args.m.split(",") if m]
    writer = harness.RecordWriter(args.out, "gemv") if args.out else None
    if args.dry:
        import time

        def timer(fn):
            fn()
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
    else:
        cand = tuning.Candidate("bench")

        def timer(fn):
            return tuning.cuda_timer(cand, fn, args.budget, dev)

    names = ["gemv", "mma16", "table", "dequant-cublas", "bnb", "bf16-floor"]
    print(f"{'shape':<20} {'dir':<5} {'M':>3} " + " ".join(f"{n:>14}" for n in names) + "  floor4  gemv/best-other")
    for label, (N, K) in shapes.items():
        torch.manual_seed(0)
        w = torch.randn(N, K, device=dev) / K ** 0.5
        packed, qs = bnbF.quantize_4bit(w.to(torch.bfloat16), blocksize=64, quant_type="nf4", compress_statistics=True)
        q = from_bnb(packed, qs)
        wd = dequantize_4bit(q, torch.bfloat16)
        del w
        nbytes = q.packed.numel() + q.absmax.numel() * q.absmax.element_size()
        floor4_us = nbytes / (target.dram_gbs * 1e9) * 1e6 if target is not None else None
        for trans in (False, True):
            for M in Ms:
                I = N if trans else K
                a = (torch.randn(M, I, device=dev)).to(torch.bfloat16)
                provs = _providers(q, packed, qs, wd, trans, M, target)
                ref = provs["dequant-cublas"](a).float()
                times, errors = {}, {}
                for name, fn in provs.items():
                    try:
                        out = fn(a)
                        err = (out.float() - ref).abs().max().item()
                        scale = ref.abs().max().item()
                        errors[name] = err
                        # the sums differ only in order: a few bf16 roundings of the largest value
                        if name not in ("dequant-cublas", "bnb", "bf16-floor") and err > 4 * 2 ** -8 * max(scale, 1e-6):
                            raise AssertionError(f"{name}: max |diff| {err:.3g} vs dequant-cublas (max {scale:.3g})")
                        times[name] = timer(lambda: fn(a)) * 1e3
                    except AssertionError:
                        raise
                    except Exception as exc:  # a provider that cannot run here (bitsandbytes on the CPU)
                        times[name] = None
                        errors[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
                others = [t for n, t in times.items() if n in ("mma16", "dequant-cublas", "bnb") and t]
                ratio = times["gemv"] / min(others) if times.get("gemv") and others else None
                print(f"{label:<20} {'dX' if trans else 'Y':<5} {M:>3} "
                      + " ".join(f"{times[n]:>14.2f}" if times.get(n) else f"{'-':>14}" for n in names)
                      + (f"  {floor4_us:6.2f}" if floor4_us else "       -")
                      + (f"  {ratio:.2f}" if ratio else ""), flush=True)
                extra = [n for n in times if n not in names]
                if extra:
                    print("    " + ", ".join(f"{n}: {times[n]:.2f}" if times[n] else f"{n}: -" for n in extra),
                          flush=True)
                if writer is not None:
                    writer.write(harness.make_record(
                        "gemv", {"shape": label, "N": N, "K": K, "M": M, "direction": "dX" if trans else "Y",
                                 "dtype": "bf16", "quant": "nf4", "double_quant": True, "blocksize": 64},
                        {"us": times, "max_abs_diff_vs_dequant_cublas": errors, "floor_4bit_us": floor4_us,
                         "gemv_over_best_other": ratio},
                        {"us": "median of CUDA events around one call queued behind a GPU sleep, L2 flushed "
                               "(fastlora.tuning.cuda_timer)",
                         "floor_4bit_us": "(packed bytes + absmax bytes) / targets.TARGETS DRAM GB/s (a model)",
                         "gemv_over_best_other": "gemv us / min(mma16, dequant-cublas, bnb) us"},
                        device=dev, smoke=args.dry))
    return 0


if __name__ == "__main__":
    sys.exit(main())
