"""How well ``fastlora inspect``'s static model predicts measured GPU times: the model of each
frozen 4-bit product that ``benchmarks.bench_gemv`` timed on a GPU, per shape, M, direction and
kernel tile, side by side with the measurement, with and without the SM-level terms (pipes, shared
memory with the decode's bank conflicts, DRAM latency: ``fastlora.sm_model``).

    python -m benchmarks.model_check                       # run 5's H200 measurements
    python -m benchmarks.model_check --results PATH.jsonl --out model_check.jsonl

Runs on a machine without a GPU: it compiles the kernels for the measured device's target, as
``fastlora inspect`` does (not under ``TRITON_INTERPRET``). The model figures are a model; the
measured figures are the benchmark's own (CUDA events, median, L2 flushed), read from its JSONL.
Per kernel, the model of exactly the launches ``lora_matmul`` makes for the measured call (the
frozen product alone, no LoRA term, as ``bench_gemv`` calls it), under the same tile override.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import replace
from pathlib import Path

RUN5 = Path(__file__).resolve().parent / "results" / "nvidia-h200" / "run5" / "gemv.jsonl"
# fixed tiles (the table's pick may have changed since the run): the GEMV, the 16-row tensor-core
# tile with the nibble table and with the pair table; a run from before the nibble table (no
# "mma16 pair" in its records) timed "mma16" on the pair table
PROVIDERS = ("gemv", "mma16", "mma16 pair")


def _tile(name: str, target, pair_era: bool = False):
    from fastlora.kernels import configs

    if name == "gemv":
        return replace(configs.GEMV_ROW[1], block_m=8)
    if name.startswith("mma16"):
        fam = configs.family(target)
        row = next(c for m, c in configs.TABLES[fam]["frozen4"] if c.block_m >= configs.MMA_MIN_ROWS)
        return replace(row, nibbles=name == "mma16" and not pair_era)
    return None


def model_us(N: int, K: int, M: int, trans: bool, tile, target) -> dict:
    """{"sm": µs with the SM-level terms, "plain": µs without, "bound": the binding term per launch,
    "kernels": names} for one frozen product ``lora_matmul`` call on ``target``."""
    import torch

    from fastlora import inspection as I
    from fastlora.kernels import _launch, configs, lora_matmul as lm

    c = I.Call(N=N, K=K, M=M, dropout=0.0, mode="infer", strategy="fused")
    q = I._meta_packed(c)
    a = torch.empty(M, N if trans else K, dtype=torch.bfloat16, device="meta")
    out = torch.empty(M, K if trans else N, dtype=torch.bfloat16, device="meta")
    with _launch.recording(target) as launches:
        if tile is None:
            lm.lora_matmul(a, q, out, trans_w=trans, compute_dtype=torch.bfloat16)
        else:
            with configs.override("frozen4", tile):
                lm.lora_matmul(a, q, out, trans_w=trans, compute_dtype=torch.bfloat16)
    res = {"sm": 0.0, "plain": 0.0, "bound": [], "kernels": []}
    for L in launches:
        f = I.kernel_facts(L, target)
        if not f.compiled:
            raise RuntimeError(f"{L.name} does not compile for {target.name}: {f.error}")
        new = I.model_launch(L, c, target, f)
        old = I.model_launch(L, c, target, f, sm_terms=False)
        res["sm"] += new.model_us
        res["plain"] += old.model_us
        res["bound"].append(new.bound)
        res["kernels"].append(L.name.replace("_lora_matmul_", "").replace("_kernel", "") or L.name)
    return res


def check(records, limit_m=None):
    from fastlora.kernels.targets import get_target

    rows = []
    for rec in records:
        cfg = rec.get("config", {})
        us = rec.get("metrics", {}).get("us", {})
        if rec.get("status") != "ok" or not us:
            continue
        if limit_m and cfg["M"] not in limit_m:
            continue
        target = get_target(rec["device_name"])
        trans = cfg["direction"] != "Y"
        pair_era = "mma16 pair" not in us
        for p in PROVIDERS:
            if p not in us:
                continue
            m = model_us(cfg["N"], cfg["K"], cfg["M"], trans, _tile(p, target, pair_era), target)
            rows.append({"shape": cfg["shape"], "N": cfg["N"], "K": cfg["K"], "M": cfg["M"],
                         "direction": cfg["direction"], "provider": p, "target": target.name,
                         "board": target.gpu, "decode": "pair" if pair_era or p != "mma16" else "nibble",
                         "measured_us": us[p], "model_us": m["sm"],
                         "model_plain_us": m["plain"], "bound": m["bound"], "kernels": m["kernels"],
                         "measured_commit": rec.get("fastlora", {}).get("commit"),
                         "measured_device": rec.get("device_name")})
    return rows


def summarize(rows) -> dict:
    """Per model: the median and worst of measured / model, and in how many (shape, M, direction)
    cases the model orders the GEMV and the 16-row tensor-core tile as the measurement does."""
    out = {}
    for key in ("model_us", "model_plain_us"):
        r = sorted(x["measured_us"] / x[key] for x in rows)
        out[key] = {"median_measured_over_model": r[len(r) // 2] if r else None,
                    "min": r[0] if r else None, "max": r[-1] if r else None}
    agree = {"model_us": 0, "model_plain_us": 0}
    cases = 0
    by = {}
    for x in rows:
        by.setdefault((x["shape"], x["M"], x["direction"]), {})[x["provider"]] = x
    for ps in by.values():
        if "gemv" in ps and "mma16" in ps and ps["gemv"]["measured_us"] != ps["mma16"]["measured_us"]:
            cases += 1
            faster = ps["gemv"]["measured_us"] < ps["mma16"]["measured_us"]
            for key in agree:
                agree[key] += (ps["gemv"][key] < ps["mma16"][key]) == faster
    out["gemv_vs_mma16_cases"] = cases
    out["gemv_vs_mma16_ordered_as_measured"] = agree
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.model_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default=str(RUN5), help="a bench_gemv JSONL measured on a GPU")
    ap.add_argument("--m", default=None, help="only these M, comma separated")
    ap.add_argument("--out", default=None, help="write one JSONL record per row, then the summary")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("model_check compiles for GPU targets: run it without TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    path = Path(args.results)
    if not path.exists():
        print(f"no such results file: {path}", file=sys.stderr)
        return 2
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    limit = {int(m) for m in args.m.split(",")} if args.m else None
    rows = check(records, limit)
    if not rows:
        print(f"no bench_gemv measurements in {path}", file=sys.stderr)
        return 2
    print(f"measured: {path} ({rows[0]['measured_device']}, commit {rows[0]['measured_commit']}); "
          f"model: {rows[0]['target']} as {rows[0]['board']} (a static model, not a measurement)")
    print(f"{'shape':18} {'M':>2} {'dir':3} {'kernel':6} {'measured µs':>11} {'model µs':>9} "
          f"{'meas/model':>10} {'model w/o SM terms':>18} {'meas/model':>10}  bound")
    for x in rows:
        print(f"{x['shape']:18} {x['M']:>2} {x['direction']:3} {x['provider']:6} {x['measured_us']:>11.1f} "
              f"{x['model_us']:>9.1f} {x['measured_us'] / x['model_us']:>10.2f} {x['model_plain_us']:>18.1f} "
              f"{x['measured_us'] / x['model_plain_us']:>10.2f}  {'+'.join(x['bound'])}")
    s = summarize(rows)
    for key, name in (("model_us", "with the SM terms"), ("model_plain_us", "without them")):
        v = s[key]
        print(f"{name}: measured / model median {v['median_measured_over_model']:.2f}, range "
              f"{v['min']:.2f}-{v['max']:.2f}; GEMV vs 16-row tile ordered as measured in "
              f"{s['gemv_vs_mma16_ordered_as_measured'][key]} of {s['gemv_vs_mma16_cases']} cases")
    if args.out:
        with open(args.out, "w") as f:
            for x in rows:
                f.write(json.dumps({"bench": "model_check", **x}) + "\n")
            f.write(json.dumps({"bench": "model_check", "summary": s, "note": "model_us and model_plain_us "
                                "are a static model; measured_us comes from the results file"}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
