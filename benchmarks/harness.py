"""The one timing and record harness behind every fastlora benchmark.

Timing
    GPU: ``triton.testing.do_bench`` (CUDA events, L2 flushed before each repetition, gradients of
    the listed tensors reset to None between repetitions), reporting the median and the 20th / 80th
    percentiles. CPU: a plain ``time.perf_counter`` loop with the same three statistics. CPU numbers
    run Triton kernels in its Python interpreter: they exercise the harness and say nothing about
    speed, so every CPU record carries ``"performance_claim": false``.

Memory
    GPU: ``torch.cuda.reset_peak_memory_stats`` before one call, ``max_memory_allocated`` after it;
    a record keeps the absolute peak and the peak above what was allocated before the call (the
    call's own working memory). CPU: not measured (``None``).

Records
    One JSON object per line (JSONL). Every record carries the device, the library versions, the
    fastlora commit (plus a hash of the sources, which identifies the code where no ``.git`` travels),
    a UTC timestamp, the full configuration, the metrics, and the FLOP / byte formulas the derived
    figures were computed with. See :func:`make_record`.
"""

from __future__ import annotations

import functools
import gc
import importlib.metadata
import json
import os
import platform
import re
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

SCHEMA_VERSION = 1
REPO_ROOT = Path(__file__).resolve().parent.parent
QUANTILES = (0.5, 0.2, 0.8)  # median, p20, p80
_PACKAGES = ("torch", "triton", "bitsandbytes", "peft", "transformers", "accelerate", "fastlora")


# ----------------------------------------------------------------------------------------------
# the environment: device, versions, commit
# ----------------------------------------------------------------------------------------------


def _interpreter_active() -> bool:
    """fastlora's own rule (``fastlora.kernels._interpreter.interpreter_active``), imported when asked
    and not at the top: importing fastlora imports triton, which reads TRITON_INTERPRET when it
    decorates the kernels; ``__main__`` and the tests' conftest set it first, a harness import must not
    race them."""
    from fastlora.kernels._interpreter import interpreter_active

    return interpreter_active()


def default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def slug(text: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3' (the results folder of a device)."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def _version(pkg: str) -> Optional[str]:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        mod = sys.modules.get(pkg)
        return getattr(mod, "__version__", None)


@functools.lru_cache(maxsize=1)
def fastlora_revision() -> dict:
    """{'commit', 'dirty', 'source_sha256'}: ``fastlora.check.revision`` (``FASTLORA_COMMIT`` overrides
    git: the GPU machine gets a copy of the working tree without ``.git``; the source hash is computed
    either way), once per process."""
    from fastlora.check import revision

    return revision()


@functools.lru_cache(maxsize=4)
def _environment(device_str: str) -> dict:
    device = torch.device(device_str)
    env = {
        "device": device.type,
        "device_name": device_name(device),
        "device_slug": slug(device_name(device)),
        "versions": {pkg: _version(pkg) for pkg in _PACKAGES},
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda": torch.version.cuda,
        "triton_interpret": _interpreter_active(),
        "fastlora": fastlora_revision(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["device_memory_bytes"] = int(props.total_memory)
        env["device_capability"] = f"{props.major}.{props.minor}"
    return env


def environment(device: torch.device) -> dict:
    """Device, versions and revision for a record (computed once per device)."""
    return dict(_environment(str(device)))


def performance_claim(device: torch.device, smoke: bool) -> bool:
    """Only a full (non-smoke) run of compiled kernels on a GPU may back a performance statement."""
    return device.type == "cuda" and not smoke and not _interpreter_active()


def dtype_name(dtype) -> Optional[str]:
    """torch.bfloat16 -> 'bfloat16' (None stays None)."""
    return None if dtype is None else str(dtype).replace("torch.", "")


def describe_4bit(layer) -> dict:
    """What a bitsandbytes ``Linear4bit`` really holds, read from its weight and quant_state (a record's
    description of the weight is never written by hand)."""
    weight = layer.weight
    qs = getattr(weight, "quant_state", None) or getattr(layer, "quant_state", None)
    if qs is None:
        raise ValueError(f"{type(layer).__name__} holds no quant_state: its weight is not quantized (yet)")
    nested = bool(getattr(qs, "nested", False))
    return {"class": f"{type(layer).__module__}.{type(layer).__name__}",
            "shape": [int(v) for v in qs.shape],
            "quant_type": qs.quant_type,
            "double_quant": nested,
            "blocksize": int(qs.blocksize),
            "blocksize2": int(qs.state2.blocksize) if nested else None,
            "dtype": dtype_name(getattr(qs, "dtype", None)),      # W's dtype before quantization
            "compute_dtype": dtype_name(getattr(layer, "compute_dtype", None)),
            "quant_storage": dtype_name(weight.dtype),
            "device": str(weight.device)}


# ----------------------------------------------------------------------------------------------
# timing and memory
# ----------------------------------------------------------------------------------------------


def quantiles(samples_ms: Sequence[float]) -> list:
    t = torch.tensor(list(samples_ms), dtype=torch.float64)
    return [float(v) for v in torch.quantile(t, torch.tensor(QUANTILES, dtype=torch.float64))]


def bench(fn: Callable[[], Any], device: torch.device, *, grad_to_none: Optional[Iterable[torch.Tensor]] = None,
          warmup_ms: int = 25, rep_ms: int = 100, cpu_warmup: int = 1, cpu_reps: int = 3) -> dict:
    """Time ``fn``: {'median_ms', 'p20_ms', 'p80_ms', 'method'}."""
    grads = list(grad_to_none or [])
    if device.type == "cuda":
        import triton.testing

        med, p20, p80 = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grads or None,
                                                quantiles=list(QUANTILES))
        method = f"triton.testing.do_bench(warmup={warmup_ms}ms, rep={rep_ms}ms), L2 flushed per rep"
    else:
        for _ in range(cpu_warmup):
            fn()
        samples = []
        for _ in range(cpu_reps):
            for t in grads:
                t.grad = None
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
        med, p20, p80 = quantiles(samples)
        method = f"time.perf_counter loop (warmup={cpu_warmup}, reps={cpu_reps})"
    return {"median_ms": med, "p20_ms": p20, "p80_ms": p80, "method": method}


def peak_memory(fn: Callable[[], Any], device: torch.device) -> dict:
    """Peak device memory of one call of ``fn``: {'peak_bytes', 'peak_extra_bytes'} (None on CPU).
    peak_extra_bytes = peak during the call minus what was allocated just before it. fastlora's split-K
    partials buffer (kept between calls) is freed first, so a call that needs it allocates it inside."""
    if device.type != "cuda":
        return {"peak_bytes": None, "peak_extra_bytes": None}
    from fastlora.kernels.lora_matmul import release_partials

    torch.cuda.synchronize(device)
    release_partials()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del out
    return {"peak_bytes": int(peak), "peak_extra_bytes": int(peak - before)}


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, getattr(torch.cuda, "OutOfMemoryError", ())):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------
# budget
# ----------------------------------------------------------------------------------------------


class Budget:
    """A wall-clock deadline. Benchmarks check it before starting each case and stop cleanly when it
    has passed (cases already started finish). ``seconds=None`` never expires."""

    def __init__(self, seconds: Optional[float]):
        self.start = time.monotonic()
        self.deadline = None if seconds is None else self.start + float(seconds)

    def remaining(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - time.monotonic()

    def expired(self) -> bool:
        return self.remaining() <= 0.0

    def slice(self, fraction: float) -> "Budget":
        """A sub-budget: ``fraction`` of the time left now, never past this budget's deadline."""
        if self.deadline is None:
            return Budget(None)
        return Budget(max(0.0, self.remaining()) * fraction)


# ----------------------------------------------------------------------------------------------
# records
# ----------------------------------------------------------------------------------------------

REQUIRED_FIELDS = ("schema", "bench", "timestamp", "device", "device_name", "versions", "fastlora",
                   "performance_claim", "smoke", "config", "metrics", "formulas", "status")


def make_record(bench_name: str, config: dict, metrics: dict, formulas: dict, *, device: torch.device, smoke: bool,
                status: str = "ok", error: Optional[str] = None) -> dict:
    """One result. ``formulas`` maps each derived metric to the formula it was computed with."""
    rec = {"schema": SCHEMA_VERSION, "bench": bench_name,
           "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    rec.update(environment(device))
    rec.update({
        "performance_claim": performance_claim(device, smoke) and status == "ok",
        "smoke": bool(smoke),
        "config": config,
        "metrics": metrics,
        "formulas": formulas,
        "status": status,
    })
    if error is not None:
        rec["error"] = error
    return rec


class RecordWriter:
    """Appends records to ``<out>/<name>.jsonl``, one flushed line each (a killed run keeps its rows)."""

    def __init__(self, out_dir: os.PathLike, name: str):
        self.path = Path(out_dir) / f"{name}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.count = 0

    def write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=False, default=str) + "\n")
        self.count += 1


def read_records(paths: Iterable[os.PathLike]) -> list:
    """All records of the given JSONL files, or of every ``*.jsonl`` under the given folders."""
    files = []
    for p in map(Path, paths):
        files.extend(sorted(p.rglob("*.jsonl")) if p.is_dir() else [p])
    records = []
    for path in files:
        skipped = 0
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    rec = json.loads(line)
                    if isinstance(rec, dict) and "schema" in rec and "bench" in rec:
                        records.append(rec)
                    else:   # a JSONL file of another kind in the same folder
                        skipped += 1
        if skipped:
            log(f"{path}: {skipped} line(s) that are not benchmark records (no schema / bench) skipped")
    return records


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
