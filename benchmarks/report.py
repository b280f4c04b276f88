"""``results.md`` and PNG plots from benchmark JSONL records (matplotlib, Agg backend).

    python -m benchmarks report benchmarks/results/<device-slug> [--out DIR]

Layer tables: one row per projection shape x r x dropout x M (a family measured with the adapters
under bf16 autocast is labelled ``<family>+autocast``), each provider's median ms, then
fastlora-auto's speed-up over ``peft`` and over ``dequant-cublas`` (t_baseline / t_fastlora), its
ratio to ``bf16-floor`` (t_fastlora / t_floor, 1.0 = as fast as the bare bf16 GEMMs), and the
speed-up of ``fastlora-patched`` (the PEFT layer after ``fastlora.patch``) over ``peft``. When a
configuration was measured more than once the latest record wins. Records from runs that may not
back a performance statement (CPU, Triton interpreter, smoke) are reported under a warning.

Host tables (``python -m benchmarks host``): per layer shape, target and adapters, one row per M and
mode with fastlora's and PEFT's host µs per call (min / median), the ratio fastlora / PEFT of each,
and the GPU kernel launches and allocations per call of both (per layer, for a stack of chained
layers: ``--stack``); on a GPU a second table adds the real eager step and the GPU's own time.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

from . import harness
from .bench_layer import MODEL_PROVIDER, MODES, PROVIDERS

FASTLORA = "fastlora-auto"
PATCHED = "fastlora-patched"
_MODE_ORDER = ("forward+backward",) + tuple(m for m in MODES if m != "forward+backward")   # tables' order


def _fmt(v, spec=".3f"):
    return "–" if v is None else format(v, spec)


def _ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


# config entries that describe how a run went, not what was measured: records differing only in them
# measure the same thing
_RUN_KEYS = ("timing", "order", "position", "order_seed", "initial_adapters_sha256", "patch_report", "reps", "warmup")


def _latest(records):
    """The newest record per identical (device, bench, config)."""
    best = {}
    for r in records:
        cfg = {k: v for k, v in r.get("config", {}).items() if k not in _RUN_KEYS}
        if isinstance(cfg.get("model"), dict):
            cfg["model"] = {k: v for k, v in cfg["model"].items() if k != "load_seconds"}
        key = (r.get("device_name"), r.get("bench"), repr(sorted((k, repr(v)) for k, v in cfg.items())))
        if key not in best or r.get("timestamp", "") >= best[key].get("timestamp", ""):
            best[key] = r
    return list(best.values())


def _layer_groups(records):
    """{(device, family, proj, K, N, r, dropout, mode): {M: {provider: record}}}"""
    groups = defaultdict(lambda: defaultdict(dict))
    for r in records:
        if r.get("bench") != "layer":
            continue
        c = r["config"]
        # the adapters' setting is part of the family's label: its own tables and plots
        fam = c["family"] + ("+autocast" if c.get("autocast") == "bf16" else "")
        key = (r["device_name"], fam, c["proj"], c["K"], c["N"], c["r"], c["dropout"], c["mode"])
        slot = groups[key][c["M"]]
        old = slot.get(c["provider"])
        # two runs of one case whose configs differ in a setting the table does not show: the newer
        if old is None or r.get("timestamp", "") >= old.get("timestamp", ""):
            slot[c["provider"]] = r
    return groups


def _median(rec):
    if rec is None or rec.get("status") != "ok":
        return None
    return rec["metrics"].get("median_ms")


def _speedups(by_provider):
    t = {p: _median(by_provider.get(p)) for p in PROVIDERS}
    fl = t[FASTLORA]
    return t, {"vs_peft": _ratio(t["peft"], fl), "vs_dequant_cublas": _ratio(t["dequant-cublas"], fl),
               "to_floor": _ratio(fl, t["bf16-floor"]), "patched_vs_peft": _ratio(t["peft"], t[PATCHED]),
               "best_vs_peft": _ratio(t["peft"], min((v for v in (t["fastlora-fused"], t["fastlora-dequant"])
                                                     if v is not None), default=None))}


def _pick(by_provider):
    """What fastlora-auto ran, as observed (its outputs equal those of one explicit strategy), with the
    rule's pick when the two disagree."""
    recs = [r for r in by_provider.values() if r]
    rule = next((r["config"].get("auto_strategy") for r in recs), None)
    auto = by_provider.get(FASTLORA)
    seen = auto["config"].get("strategy_observed") if auto else None
    if seen is None:
        return f"{rule} (rule)" if rule else None
    return seen if seen == rule else f"{seen} (rule: {rule})"


def _ran(cfg):
    """'1 of 2': where this variant ran in its run's order (each starts from a freshly loaded model)."""
    if cfg.get("position") is None or not cfg.get("order"):
        return "–"
    return f"{cfg['position'] + 1} of {len(cfg['order'])}"


def _model_cell(rec):
    """fastlora inspect's modelled µs for the automatic pick, shown in ms like the measured columns."""
    if rec is None or rec.get("status") != "ok":
        return "–"
    return f"{rec['metrics']['model_us_auto'] / 1000:.3f}"


def _cell(rec):
    """median ms [p20–p80], or the failure status."""
    if rec is None:
        return "–"
    if rec.get("status") != "ok":
        return rec.get("status", "?")
    m = rec["metrics"]
    return f"{m['median_ms']:.3f}"


def _layer_markdown(groups):
    lines = []
    by_mode = defaultdict(list)
    for key in sorted(groups, key=lambda k: (k[0], _MODE_ORDER.index(k[7]) if k[7] in _MODE_ORDER else 9, k[1:7])):
        by_mode[(key[0], key[7])].append(key)
    for (dev, mode), keys in by_mode.items():
        lines += [f"### Layer, {mode} — {dev}", "",
                  "Median ms per provider (p20/p80 in the JSONL). Speed-ups are t_baseline / t_fastlora-auto; "
                  "'÷ floor' is t_fastlora-auto / t_bf16-floor. 'model' is fastlora inspect's static "
                  "speed-of-light model of fastlora-auto's pick for the same call (a model, not a measurement).", "",
                  "| family | proj | K→N | r | p | M | " + " | ".join(PROVIDERS)
                  + " | model (ms) | auto pick | × vs peft | × vs dequant-cublas | ÷ floor | best fused/dequant × vs peft "
                  "| patched × vs peft |",
                  "|" + "---|" * (6 + len(PROVIDERS) + 7)]
        for key in keys:
            _, fam, proj, K, N, r, p, _ = key
            for M in sorted(groups[key]):
                byp = groups[key][M]
                _, s = _speedups(byp)
                pick = _pick(byp)
                lines.append(f"| {fam} | {proj} | {K}→{N} | {r} | {p:g} | {M} | "
                             + " | ".join(_cell(byp.get(pr)) for pr in PROVIDERS)
                             + f" | {_model_cell(byp.get(MODEL_PROVIDER))} | {pick or '–'} | {_fmt(s['vs_peft'], '.2f')} | {_fmt(s['vs_dequant_cublas'], '.2f')}"
                             f" | {_fmt(s['to_floor'], '.2f')} | {_fmt(s['best_vs_peft'], '.2f')}"
                             f" | {_fmt(s['patched_vs_peft'], '.2f')} |")
        lines.append("")
    return lines


def _memory_markdown(groups):
    lines = []
    keys = [k for k in groups if k[7] == "forward+backward"]
    if not keys:
        return lines
    lines += ["### Layer peak memory, forward+backward (MiB above the inputs and weights)", "",
              "| device | family | proj | K→N | r | p | M | " + " | ".join(PROVIDERS) + " |",
              "|" + "---|" * (7 + len(PROVIDERS))]
    for key in sorted(keys):
        dev, fam, proj, K, N, r, p, _ = key
        for M in sorted(groups[key]):
            cells = []
            for pr in PROVIDERS:
                rec = groups[key][M].get(pr)
                b = rec["metrics"].get("peak_extra_bytes") if rec and rec.get("status") == "ok" else None
                cells.append(_fmt(None if b is None else b / 2**20, ".0f"))
            lines.append(f"| {dev} | {fam} | {proj} | {K}→{N} | {r} | {p:g} | {M} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def _host_markdown(records):
    """fastlora vs PEFT per (M, mode): host µs per call, their ratio, launches (GPU: eager step, GPU µs)."""
    groups = defaultdict(lambda: defaultdict(dict))
    for r in records:
        if r.get("bench") != "host" or r.get("status") != "ok":
            continue
        c = r["config"]
        key = (r["device_name"], c["measured_on"], c["target"], c["N"], c["K"], c["r"], c["dropout"], c["adapters"],
               c.get("strategy", "auto"), c.get("stack", 1))
        groups[key][(c["M"], c["mode"])][c["provider"]] = r["metrics"]
    lines = []
    modes = ("train_step", "forward")
    for key in sorted(groups):
        dev, on, target, N, K, r, p, ad, strategy, depth = key
        cuda = on == "cuda"
        what = ("real CUDA tensors, kernels run" if cuda else
                f"meta tensors; fastlora's Triton launches compiled for {target}, the driver's launch stubbed")
        pinned = "" if strategy == "auto" else f", fastlora's {strategy} strategy"
        if depth > 1:
            pinned += f"; per layer of {depth} chained (one backward for all)"
        lines += [f"### Host cost per layer call, {N}×{K} NF4 (double quant), r = {r}, dropout {p:g}, adapters {ad}"
                  f"{pinned} — {dev}", "", f"{what}. µs per call, min / median; ratio = fastlora / PEFT (below 1: fastlora "
                  "costs the host less).", ""]
        head = "| M | mode | fastlora host µs | PEFT host µs | ratio min / median | "
        head += ("fastlora eager step µs | PEFT eager step µs | fastlora GPU µs | PEFT GPU µs |" if cuda else
                 "launches fastlora (Triton + ops) | launches PEFT | allocations fastlora | allocations PEFT |")
        lines += [head, "|" + "---|" * 9]
        for (M, mode) in sorted(groups[key], key=lambda k: (k[0], modes.index(k[1]) if k[1] in modes else 9)):
            f, b = groups[key][(M, mode)].get("fastlora"), groups[key][(M, mode)].get("peft")

            def mm(m, what="host_us"):
                return "–" if m is None else f"{m[what + '_min']:,.0f} / {m[what + '_median']:,.0f}"
            ratio = "–"
            if f and b:
                ratio = (f"{_fmt(_ratio(f['host_us_min'], b['host_us_min']), '.2f')} / "
                         f"{_fmt(_ratio(f['host_us_median'], b['host_us_median']), '.2f')}")
            row = f"| {M} | {mode} | {mm(f)} | {mm(b)} | {ratio} | "
            if cuda:
                row += f"{mm(f, 'eager_us')} | {mm(b, 'eager_us')} | {mm(f, 'gpu_us')} | {mm(b, 'gpu_us')} |"
            else:
                fl = "–" if f is None else f"{f['launches']:g} ({f['triton_launches']:g} + {f['op_launches']:g})"

                def n(m, k):
                    return "–" if m is None or m.get(k) is None else f"{m[k]:g}"
                row += f"{fl} | {n(b, 'launches')} | {n(f, 'allocations')} | {n(b, 'allocations')} |"
            lines.append(row)
        lines.append("")
    return lines


def _train_markdown(records):
    thr = [r for r in records if r.get("bench") == "train.throughput"]
    mseq = [r for r in records if r.get("bench") == "train.max_seq"]
    lines = []
    if thr:
        lines += ["### Training throughput (QLoRA, r=16, alpha=32, dropout 0.05, 7 projections, grad. checkpointing)",
                  "", "| device | model | variant | ran | batch×seq | tokens/s | step ms (median) | peak GiB | "
                  "× vs unpatched |", "|---|---|---|---|---|---|---|---|---|"]
        base = {}
        for r in thr:
            if r["config"]["variant"] == "unpatched" and r.get("status") == "ok":
                base[(r["device_name"], r["config"]["model"]["preset"], r["config"]["batch"], r["config"]["seq"])] = \
                    r["metrics"]["tokens_per_s"]
        for r in sorted(thr, key=lambda r: (r["device_name"], r["config"]["model"]["preset"], r["config"]["variant"] != "unpatched")):
            c, m = r["config"], r.get("metrics", {})
            ok = r.get("status") == "ok"
            tps = m.get("tokens_per_s") if ok else None
            ref = base.get((r["device_name"], c["model"]["preset"], c["batch"], c["seq"]))
            peak = m.get("peak_bytes") if ok else None
            lines.append(f"| {r['device_name']} | {c['model']['preset']} | {c['variant']}"
                         f"{'' if ok else ' (' + r.get('status', '?') + ')'} | {_ran(c)} | {c['batch']}×{c['seq']} | "
                         f"{_fmt(tps, '.0f')} | {_fmt(m.get('step_ms_median') if ok else None, '.1f')} | "
                         f"{_fmt(None if peak is None else peak / 2**30, '.2f')} | "
                         f"{_fmt(_ratio(tps, ref) if c['variant'] != 'unpatched' else None, '.2f')} |")
        lines.append("")
    if mseq:
        lines += ["### Longest sequence at batch 1 inside a memory budget", "",
                  "| device | model | variant | budget GB | max seq | first OOM seq | status |", "|---|---|---|---|---|---|---|"]
        for r in sorted(mseq, key=lambda r: (r["device_name"], r["config"]["model"]["preset"],
                                             r["config"]["memory_budget_gb"], r["config"]["variant"])):
            c, m = r["config"], r["metrics"]
            hi = m.get("first_oom_seq")
            lines.append(f"| {r['device_name']} | {c['model']['preset']} | {c['variant']} | {c['memory_budget_gb']:g} | "
                         f"{m.get('max_seq')}{'+' if m.get('reached_cap') else ''} | {hi if hi is not None else '–'} | "
                         f"{r.get('status')} |")
        lines.append("")
    return lines


# ----------------------------------------------------------------------------------------------
# plots
# ----------------------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_speedups(groups, out: Path, claim: bool, modes):
    """One PNG per (device, family, r, dropout, mode): speed-up vs M, one panel per projection."""
    plt = _plt()
    panels = defaultdict(list)
    for key in groups:
        dev, fam, proj, K, N, r, p, mode = key
        if mode in modes:
            panels[(dev, fam, r, p, mode)].append(key)
    written = []
    for (dev, fam, r, p, mode), keys in sorted(panels.items()):
        keys.sort(key=lambda k: (k[2]))
        fig, axes = plt.subplots(1, len(keys), figsize=(max(6.0, 4.2 * len(keys)), 4.2), squeeze=False)
        for ax, key in zip(axes[0], keys):
            Ms = sorted(groups[key])
            series = {
                "fastlora-auto vs peft": ("peft", FASTLORA, "-", "o"),
                "fastlora-auto vs dequant-cublas": ("dequant-cublas", FASTLORA, "-", "s"),
                "fused vs peft": ("peft", "fastlora-fused", ":", "^"),
                "dequant vs peft": ("peft", "fastlora-dequant", ":", "v"),
                "fastlora-patched vs peft": ("peft", PATCHED, "-", "D"),
                "bf16-floor vs peft": ("peft", "bf16-floor", "--", None),
            }
            for label, (base, prov, ls, mk) in series.items():
                ys = [_ratio(_median(groups[key][M].get(base)), _median(groups[key][M].get(prov))) for M in Ms]
                pts = [(M, y) for M, y in zip(Ms, ys) if y is not None]
                if pts:
                    ax.plot([a for a, _ in pts], [b for _, b in pts], ls, marker=mk, label=label)
            ax.axhline(1.0, color="gray", lw=0.8)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log", base=2)
            ax.set_title(f"{key[2]}  {key[3]}→{key[4]}", fontsize=9)
            ax.set_xlabel("M (tokens)")
            ax.set_ylabel("speed-up (t_base / t)")
            ax.grid(alpha=0.3)
        # one legend under the panels, where it hides no curve
        handles = {lab: h for ax in axes[0] for h, lab in zip(*ax.get_legend_handles_labels())}
        fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=3, fontsize=7, frameon=False)
        warn = "" if claim else "  [NO PERFORMANCE CLAIM: CPU/interpreter/smoke]"
        fig.suptitle(f"{fam} r={r} dropout={p:g} {mode} — {dev}{warn}", fontsize=10)
        fig.tight_layout(rect=(0, 0.12, 1, 1))
        path = out / f"speedup_{harness.slug(dev)}_{fam}_r{r}_p{p:g}_{harness.slug(mode)}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _plot_memory(groups, out: Path, claim: bool):
    """One PNG per (device, family): forward+backward peak extra memory per provider, at the largest M."""
    plt = _plt()
    fams = defaultdict(list)
    for key in groups:
        if key[7] == "forward+backward":
            fams[(key[0], key[1])].append(key)
    written = []
    for (dev, fam), keys in sorted(fams.items()):
        keys.sort(key=lambda k: (k[2], k[5], k[6]))
        fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(keys)), 3.8))
        width = 0.8 / len(PROVIDERS)
        any_data = False
        for i, prov in enumerate(PROVIDERS):
            ys = []
            for key in keys:
                rec = groups[key][max(groups[key])].get(prov)
                b = rec["metrics"].get("peak_extra_bytes") if rec and rec.get("status") == "ok" else None
                ys.append(0.0 if b is None else b / 2**20)
                any_data |= b is not None
            ax.bar([j + i * width for j in range(len(keys))], ys, width, label=prov)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))])
        ax.set_xticklabels([f"{k[2]}\nr={k[5]} p={k[6]:g}\nM={max(groups[k])}" for k in keys], fontsize=7)
        ax.set_ylabel("peak MiB above inputs")
        if not any_data:
            ax.text(0.5, 0.5, f"peak memory is not measured on {dev}", transform=ax.transAxes, ha="center")
        ax.legend(fontsize=7)
        warn = "" if claim else "  [NO PERFORMANCE CLAIM]"
        ax.set_title(f"{fam} forward+backward peak memory — {dev}{warn}", fontsize=10)
        fig.tight_layout()
        path = out / f"memory_{harness.slug(dev)}_{fam}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _plot_train(records, out: Path, claim: bool):
    thr = [r for r in records if r.get("bench") == "train.throughput" and r.get("status") == "ok"]
    if not thr:
        return []
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    labels = sorted({(r["device_name"], r["config"]["model"]["preset"]) for r in thr})
    for i, variant in enumerate(("unpatched", "patched")):
        ys = [next((r["metrics"]["tokens_per_s"] for r in thr if (r["device_name"], r["config"]["model"]["preset"])
                    == lab and r["config"]["variant"] == variant), 0.0) for lab in labels]
        ax.bar([j + i * 0.4 for j in range(len(labels))], ys, 0.4, label=variant)
    ax.set_xticks([j + 0.2 for j in range(len(labels))])
    ax.set_xticklabels([f"{m}\n{d}" for d, m in labels], fontsize=7)
    ax.set_ylabel("tokens/s")
    ax.legend()
    ax.set_title("QLoRA training throughput" + ("" if claim else "  [NO PERFORMANCE CLAIM]"), fontsize=10)
    fig.tight_layout()
    path = out / "train_tokens_per_s.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


# ----------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------


def _header(records):
    envs = {}
    for r in records:
        envs.setdefault(r["device_name"], r)
    # the static model's records (provider fastlora-model) are never measurements and never claims:
    # they sit beside a GPU run's records without making its measurements a harness check
    measured = [r for r in records if (r.get("config") or {}).get("provider") != "fastlora-model"]
    claim = bool(measured) and all(r.get("performance_claim") for r in measured)
    lines = ["# fastlora benchmark results", ""]
    if not claim:
        lines += ["> **No performance claim.** Some or all of these records come from a CPU / Triton-interpreter "
                  "or smoke run (`performance_claim: false`); their timings only show that the harness works.", ""]
    lines += ["| device | torch | triton | bitsandbytes | peft | transformers | fastlora commit | source sha256 | "
              "records | first | last |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for dev, r in envs.items():
        mine = [x for x in records if x["device_name"] == dev]
        v, fl = r["versions"], r["fastlora"]
        commit = fl["commit"][:12] + (" (dirty)" if fl.get("dirty") else "")
        lines.append(f"| {dev} | {v.get('torch')} | {v.get('triton')} | {v.get('bitsandbytes')} | {v.get('peft')} | "
                     f"{v.get('transformers')} | {commit} | {fl['source_sha256'][:12]} | {len(mine)} | "
                     f"{min(x['timestamp'] for x in mine)} | {max(x['timestamp'] for x in mine)} |")
    lines.append("")
    formulas = {}
    for r in records:
        for k, f in r.get("formulas", {}).items():
            formulas.setdefault(f"{r['bench'].split('.')[0]}: {k}", f)
    if formulas:
        lines += ["Formulas used by the derived figures:", ""]
        lines += [f"- `{k}` = {f}" for k, f in sorted(formulas.items())]
        lines.append("")
    return lines, claim


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("paths", nargs="+", help="JSONL files or folders holding them (searched recursively)")
    ap.add_argument("--out", default=None, help="where results.md and the PNGs go (default: the first folder)")
    ap.add_argument("--plot-modes", type=lambda s: s.split(","), default=["forward+backward"],
                    help=f"layer modes that get speed-up plots, comma list of {MODES} (default forward+backward)")


def run(args) -> dict:
    paths = [Path(p) for p in args.paths]
    out = Path(args.out) if args.out else (paths[0] if paths[0].is_dir() else paths[0].parent)
    out.mkdir(parents=True, exist_ok=True)
    records = _latest(harness.read_records(paths))
    if not records:
        raise SystemExit(f"no records found under {', '.join(map(str, paths))}")
    lines, claim = _header(records)
    groups = _layer_groups(records)
    lines += _layer_markdown(groups) + _memory_markdown(groups) + _host_markdown(records) + _train_markdown(records)
    errors = [r for r in records if r.get("status") not in ("ok", None)]
    if errors:
        lines += ["### Records that did not complete", "", "| bench | config | status | error |", "|---|---|---|---|"]
        for r in errors:
            c = r["config"]
            what = ", ".join(f"{k}={c[k]}" for k in ("family", "proj", "M", "r", "dropout", "provider", "mode",
                                                     "variant", "memory_budget_gb") if k in c)
            lines.append(f"| {r['bench']} | {what} | {r['status']} | {str(r.get('error', ''))[:160]} |")
        lines.append("")
    pngs = _plot_speedups(groups, out, claim, args.plot_modes) + _plot_memory(groups, out, claim) + _plot_train(records, out, claim)
    if pngs:
        lines += ["### Plots", ""] + [f"![{p.stem}]({p.name})" for p in pngs] + [""]
    md = out / "results.md"
    md.write_text("\n".join(lines), encoding="utf-8")
    return {"bench": "report", "records": len(records), "markdown": str(md), "pngs": [str(p) for p in pngs]}
