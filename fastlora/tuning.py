"""Measured selection on the user's GPU: the first call of a frozen product at a new shape times the
candidates there and keeps the fastest, in a per-device cache.

What one entry decides, for one (phase, kind of frozen product, N, K, M bucket, the 4-bit weight's
blocksize and double quantization, dtypes, adapter rank, dropout on/off):

    strategy     "dequant" (W dequantized by fastlora's kernel, then cuBLAS: what PEFT + bitsandbytes
                 and Unsloth run) or "fused" (W decoded inside the GEMM)
    fused tile   the launch configuration of the fused frozen product (installed with
                 ``kernels.configs.set_tuned``, so even an explicit strategy="fused" runs the fastest
                 tile measured)

The phase is "forward" (Y = X·Wᵀ, the product's [J, I] = [N, K]) or "backward" (dX = dY·W, [K, N]).
Both strategies compute the same numbers within the project's tolerance rule (``fastlora check``), so
a measurement may pick either. An entry is measured with the call's own dtypes, rank and blocksize;
with dropout on it is timed at p = ``DEFAULT_DROPOUT_P`` (the mask is drawn for every element
whatever p is, so p does not change the work).

Candidates (:func:`candidates`), in this order, which is also the order ties are broken in:

    1. "dequant"
    2. "fused" with the static table's row for M (``kernels.configs.TABLES``: the fallback)
    3. the same family's other rows of that kind, then neighbours of the row: one stage fewer / more,
       no split-K, twice the split limit, the other warp count, half / double BLOCK_J; each narrowed
       to the problem as ``configs.select`` narrows it, duplicates dropped, at most
       ``MAX_ALTERNATIVES``.

How one candidate is timed (:func:`measure`, :func:`cuda_timer`): the whole phase of the op
(``fastlora.lora_linear`` with the strategy forced, the tile through ``configs.override``; backward as
``autograd.grad`` over a retained graph) on random data (never zeros; the layer's own weight when the
op triggered the tuning), its own generator (the user's random streams are not touched), autocast
off, dtypes explicit. One untimed call first: it compiles the tile (Triton keeps the binary on disk,
so that cost is paid once per machine) and is not counted in the entry's budget. Then, on the
weight's device and its current stream, one call sizes the repetitions to the candidate's share of
the budget, and 3 to 50 calls are timed by CUDA events, each after an L2 flush; the median counts.
The pick is the fastest median; equal medians go to the earlier candidate.

Failures: an alternative tile that Triton cannot build or load here (out of shared memory or
registers, a compile error) is skipped. Anything else — a failure of dequant or of the table's tile,
a CUDA error, a bug — ends the tuning of that entry: one warning, the static rule for that shape for
the rest of the process, nothing written to the cache.

Budget: about ``PER_SHAPE_S`` of timed calls per entry (dequant and the table's tile are always
measured, the alternatives while time is left). An entry whose alternatives were cut short is used in
this process but not written to the cache, so the next run measures it in full. ``PER_PROCESS_S`` per
process (one model's shapes, compiles included); once spent, the remaining shapes keep the static rule
for the rest of the process and are not cached, so the next run tunes them. Each entry logs one line
(logger ``fastlora.tuning``, INFO): what was tuned, how long it took, what it picked.

When it runs: on a CUDA device only, at a call that resolves strategy="auto" (the default), and never
under Triton's interpreter, inside a torch.compile trace (``torch.compiler.is_compiling()``: the op is
opaque there anyway; tuning happens at the first eager call) or during CUDA graph capture (it would
synchronize); there an entry already loaded is still used, else the static rule, and the next eager
call tunes. ``FASTLORA_TUNE`` (read once per process): ``0`` static tables only, ``1`` (default) tune
missing entries, ``force`` re-tune every entry once in this process. Once an entry is known, a call at
any M of its bucket costs one dict lookup (:func:`pick`'s memo is keyed by the bucket, not by M).

The cache (:class:`Cache`): one JSON file per device and software under ``$FASTLORA_CACHE_DIR``, else
``$XDG_CACHE_HOME/fastlora``, else ``~/.cache/fastlora``, keyed by device name, compute capability,
SM count, driver, torch, triton and fastlora versions and a hash of the kernel sources (a measured
tile belongs to the code that was measured). The file name carries the device and a short hash of
that key, so two environments on one machine keep a file each. A file with another key or one that
does not parse gives one warning, is ignored and is rewritten at the next write. Writes merge with
what is on disk under an exclusive lock (``fcntl.flock`` on ``<file>.lock``; DDP ranks tune at once)
and a thread lock, then replace the file atomically (a temporary file in the same folder,
``os.replace``). Nothing outside that folder is touched.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import platform
import sys
import tempfile
import threading
import time
import time
import warnings
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .kernels import _interpreter, configs
from .kernels._launch import launch_target
from .kernels.configs import TileConfig
from .kernels.quant4 import Packed4bit, wide_decode_ok

logger = logging.getLogger("fastlora.tuning")

PHASES = ("forward", "backward")
STRATEGIES = ("dequant", "fused")
FORMAT = "fastlora-tuning"
FORMAT_VERSION = 2

PER_SHAPE_S = 1.0          # timed calls per entry; each candidate's first call (its compile) comes on top
PER_PROCESS_S = 60.0       # all entries of one process together, compiles included
MAX_ALTERNATIVES = 4       # fused tiles besides the table's row
MIN_REPS, MAX_REPS = 3, 50
DEFAULT_DROPOUT_P = 0.05   # p of an entry with dropout on (and `fastlora tune`'s default)
BUDGET = "budget"          # the error of a candidate skipped because the entry's budget was spent

# device types tuning may run on (tests add "cpu" to drive the whole path with an injected timer)
_DEVICE_TYPES = ("cuda",)


# ----------------------------------------------------------------------------------------------
# the mode, read once
# ----------------------------------------------------------------------------------------------

_MODE: List[Optional[str]] = [None]
_MODE_WORDS = {"0": "0", "off": "0", "false": "0", "no": "0", "1": "1", "on": "1", "true": "1", "yes": "1",
               "force": "force"}


def mode() -> str:
    """``FASTLORA_TUNE`` as "0", "1" or "force", read from the environment at the first call (a call
    of the op never reads the environment)."""
    m = _MODE[0]
    if m is None:
        raw = os.environ.get("FASTLORA_TUNE", "1").strip().lower()
        m = _MODE_WORDS.get(raw)
        if m is None:
            warnings.warn(f"FASTLORA_TUNE={raw!r} is not one of 0, 1, force: tuning missing entries (1)",
                          RuntimeWarning, stacklevel=2)
            m = "1"
        _MODE[0] = m
    return m


# ----------------------------------------------------------------------------------------------
# keys
# ----------------------------------------------------------------------------------------------


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def product_kind(w, compute_dtype: torch.dtype, lora_dtype: torch.dtype) -> str:
    """The configuration table kind of the fused frozen product over ``w``: the launcher's own
    answer (``lora_matmul._kind``; its epilogue adds the LoRA term in ``lora_dtype``)."""
    from .kernels.lora_matmul import _kind

    is_4bit = isinstance(w, Packed4bit)
    return _kind(is_4bit, False, compute_dtype, is_4bit and wide_decode_ok(w),
                 lora32=lora_dtype == torch.float32)


def product_dims(phase: str, N: int, K: int) -> Tuple[int, int]:
    """(J, I) of the phase's frozen product out[M, J] = a[M, I]·T[I, J]."""
    if phase == "forward":
        return N, K
    if phase == "backward":
        return K, N
    raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")


def weight_layout(w) -> str:
    """What of the weight's format besides N and K changes the work: a 4-bit weight's blocksize and
    whether its absmax is double-quantized (one more decode step); "dense" for a 16-bit weight."""
    if isinstance(w, Packed4bit):
        return f"bs={w.blocksize}{',nested' if w.nested else ''}"
    return "dense"


def entry_key(phase: str, kind: str, N: int, K: int, M: int, layout: str, x_dtype, compute_dtype, lora_dtype,
              rank: int, dropout: bool) -> str:
    """The key of one entry inside a device's file: readable, one string."""
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    dts = "/".join(_dtype_name(d) for d in (x_dtype, compute_dtype, lora_dtype))
    return (f"{phase}|{kind}|N={N}|K={K}|M<={configs.m_bucket(M)}|{layout}|{dts}|r={rank}"
            f"|dropout={'on' if dropout else 'off'}")


def _driver_version() -> Optional[str]:
    get = getattr(torch._C, "_cuda_getDriverVersion", None)   # CUDA builds of torch only
    if get is None:
        return None
    try:
        v = int(get())
    except (RuntimeError, OSError):
        return None
    return f"{v // 1000}.{v % 1000 // 10}"


_KERNELS_SHA: List[Optional[str]] = [None]


def kernels_sha256() -> str:
    """sha256 of the kernel package's sources: a version string does not change when a kernel does."""
    if _KERNELS_SHA[0] is None:
        folder = Path(configs.__file__).resolve().parent
        h = hashlib.sha256()
        for path in sorted(folder.glob("*.py")):
            h.update(path.name.encode())
            h.update(path.read_bytes())
        _KERNELS_SHA[0] = h.hexdigest()
    return _KERNELS_SHA[0]


def versions() -> Dict[str, Optional[str]]:
    import importlib.metadata

    import triton

    from . import __version__

    out = {"torch": torch.__version__, "triton": triton.__version__, "fastlora": __version__,
           "fastlora_kernels_sha256": kernels_sha256()}
    for pkg in ("bitsandbytes", "peft", "transformers"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def device_key(device) -> dict:
    """What a cache file is valid for: the device and the software whose speed was measured."""
    device = torch.device(device)
    v = versions()
    key = {"torch": v["torch"], "triton": v["triton"], "fastlora": v["fastlora"],
           "fastlora_kernels_sha256": v["fastlora_kernels_sha256"]}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        key.update(device=props.name, cc=f"{props.major}.{props.minor}", sms=int(props.multi_processor_count),
                   driver=_driver_version(), cuda=torch.version.cuda)
    else:
        key.update(device=platform.processor() or platform.machine() or device.type, cc=None,
                   sms=os.cpu_count(), driver=None, cuda=None)
    return key


def _slug(text: str) -> str:
    out = "".join(c if c.isalnum() else "-" for c in str(text).lower())
    while "--" in out:
        out = out.replace("--", "-")
    return out.strip("-") or "device"


def cache_dir() -> Path:
    """``$FASTLORA_CACHE_DIR``, else ``$XDG_CACHE_HOME/fastlora``, else ``~/.cache/fastlora``."""
    explicit = os.environ.get("FASTLORA_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "fastlora"


def cache_path(key: dict, folder: Optional[Path] = None) -> Path:
    """One file per device and software: the device's name and compute capability, then the first 12
    hex digits of the key's sha256, so that two environments on one machine (another torch, another
    fastlora) do not overwrite each other's file."""
    cc = key.get("cc")
    name = _slug(key.get("device", "device")) + (f"-sm{str(cc).replace('.', '')}" if cc else "")
    tag = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return Path(folder if folder is not None else cache_dir()) / f"{name}-{tag}.json"


# ----------------------------------------------------------------------------------------------
# the cache file
# ----------------------------------------------------------------------------------------------

try:
    import fcntl
except ImportError:    # not POSIX: threads are still serialized; processes only by os.replace's atomicity
    fcntl = None

_WARNED: set = set()


def _warn_once(path: Path, kind: str, detail: str = "") -> None:
    """One warning per file and kind of problem in a process (a training run reads and writes the
    file many times)."""
    if (str(path), kind) in _WARNED:
        return
    _WARNED.add((str(path), kind))
    what = "cannot be written, the measurements stay in this process" if kind == "unwritable" else \
        "ignored, it will be rewritten"
    warnings.warn(f"fastlora: tuning cache {path}: {kind}{' (' + detail + ')' if detail else ''}; {what}",
                  RuntimeWarning, stacklevel=3)


def _valid_entry(e) -> bool:
    if not isinstance(e, dict) or e.get("strategy") not in STRATEGIES:
        return False
    tile = e.get("fused_tile")
    # six positive ints (block_m, block_j, block_i, warps, stages, split), then the decode table's
    # flag (nibbles; absent in entries written before it existed: the pair table)
    return tile is None or (isinstance(tile, list) and len(tile) in (6, 7)
                            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in tile[:6])
                            and all(isinstance(v, bool) for v in tile[6:]))


class Cache:
    """The entries of one device's file, loaded once; :meth:`put` merges with the file and rewrites it."""

    def __init__(self, path: os.PathLike, key: dict):
        self.path = Path(path)
        self.key = dict(key)
        self.entries: Dict[str, dict] = {}
        self._lock = threading.Lock()
        self.load()

    def _read(self, warn: bool) -> Dict[str, dict]:
        """The file's entries when it is ours (same key); {} when missing, foreign or corrupt."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except OSError as exc:
            if warn:
                _warn_once(self.path, "unreadable", str(exc))
            return {}
        try:
            data = json.loads(text)
            if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("entries"), dict):
                raise ValueError("not a fastlora tuning file")
        except ValueError as exc:
            if warn:
                _warn_once(self.path, "corrupt", str(exc))
            return {}
        if data.get("version") != FORMAT_VERSION or data.get("key") != self.key:
            if warn:
                theirs = data.get("key") if isinstance(data.get("key"), dict) else {}
                diff = sorted(k for k in set(theirs) | set(self.key) if theirs.get(k) != self.key.get(k))
                _warn_once(self.path, "foreign", f"made for another device or versions: {', '.join(diff)} differ")
            return {}
        good = {k: e for k, e in data["entries"].items() if isinstance(k, str) and _valid_entry(e)}
        if len(good) != len(data["entries"]) and warn:
            _warn_once(self.path, "corrupt entries", f"{len(data['entries']) - len(good)} malformed")
        return good

    def load(self) -> None:
        with self._lock:
            self.entries = self._read(warn=True)

    def get(self, ekey: str) -> Optional[dict]:
        return self.entries.get(ekey)

    @contextlib.contextmanager
    def _file_lock(self):
        if fcntl is None:
            yield
            return
        with open(self.path.with_name(self.path.name + ".lock"), "a+") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def put(self, ekey: str, entry: dict) -> bool:
        """Record ``entry`` and write the file: what is on disk now (another process's entries),
        this process's entries, and this one last. False (and one warning) when it cannot be written."""
        with self._lock:
            self.entries[ekey] = entry
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with self._file_lock():
                    # the file is at least as new as this process's copy of it; this entry is newest
                    merged = {**self.entries, **self._read(warn=False), ekey: entry}
                    data = {"format": FORMAT, "version": FORMAT_VERSION, "key": self.key,
                            "entries": dict(sorted(merged.items()))}
                    fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
                    try:
                        with os.fdopen(fd, "w", encoding="utf-8") as f:
                            json.dump(data, f, indent=1)
                            f.flush()
                            os.fsync(f.fileno())
                        os.replace(tmp, self.path)
                    except BaseException:
                        with contextlib.suppress(OSError):
                            os.unlink(tmp)
                        raise
                    self.entries = merged
            except OSError as exc:
                _warn_once(self.path, "unwritable", str(exc))
                return False
        return True


# ----------------------------------------------------------------------------------------------
# candidates
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """One way to run a frozen product: a strategy, and for "fused" the launch configuration."""

    strategy: str
    tile: Optional[TileConfig] = None
    origin: str = ""          # where the tile comes from: "table", "row M<=16", "stages-1", ...

    @property
    def name(self) -> str:
        t = self.tile
        if t is None:
            return self.strategy
        return (f"fused {t.block_m}x{t.block_j}x{t.block_i} w{t.num_warps} s{t.num_stages} k{t.split}"
                + (" nibble" if t.nibbles else ""))


def _narrowed(kind: str, cfg: TileConfig, M: int, J: int, I: int, target) -> TileConfig:
    """``cfg`` as a launch of the problem gets it (``configs.select`` narrows tiles to the problem)."""
    with configs.override(kind, cfg):
        return configs.select(kind, M, J, I, target)


def _table_row(kind: str, M: int, target, trans_w: Optional[bool]) -> TileConfig:
    if target is None:   # the interpreter's tiles (configs.select without a target)
        return configs.INTERPRETER
    return configs.table_row(kind, M, target, trans_w)


def candidates(kind: str, M: int, J: int, I: int, target, max_alternatives: int = MAX_ALTERNATIVES,
               trans_w: Optional[bool] = None) -> List[Candidate]:
    """dequant, the table's fused tile (for the product's direction: ``trans_w`` True is dY·W), then
    up to ``max_alternatives`` other fused tiles (see the module docstring), each as
    ``configs.select`` would narrow it to the problem."""
    row = _table_row(kind, M, target, trans_w)
    out = [Candidate("dequant"), Candidate("fused", _narrowed(kind, row, M, J, I, target), "table")]
    if target is None or max_alternatives <= 0:
        return out
    alts: List[Tuple[str, TileConfig]] = []
    for max_m, cfg in configs.TABLES[configs.family(target)][kind]:
        alts.append((f"row M<={max_m}" if max_m < (1 << 40) else "row M>any", cfg))
    if kind in ("frozen4", "frozen4_lora32"):   # the other decode table (pair table / nibble table)
        alts.append(("nibble table" if not row.nibbles else "pair table", replace(row, nibbles=not row.nibbles)))
    alts += [("stages-1", replace(row, num_stages=max(1, row.num_stages - 1))),
             ("stages+1", replace(row, num_stages=row.num_stages + 1)),
             ("no split", replace(row, split=1)),
             ("split x2", replace(row, split=min(64, max(2, row.split * 2)))),
             ("warps", replace(row, num_warps=4 if row.num_warps == 8 else 8)),
             ("block_j/2", replace(row, block_j=max(16, row.block_j // 2))),
             ("block_j*2", replace(row, block_j=min(256, row.block_j * 2)))]
    seen = {out[1].tile}
    for origin, cfg in alts:
        t = _narrowed(kind, cfg, M, J, I, target)
        if t in seen:
            continue
        seen.add(t)
        out.append(Candidate("fused", t, origin))
        if len(out) - 2 >= max_alternatives:
            break
    return out


def fastest(times: Sequence[Tuple[Candidate, Optional[float]]]) -> Tuple[Candidate, float]:
    """The candidate with the smallest time (ms); equal times go to the earlier one; None (failed)
    never wins. Raises ValueError when none was measured."""
    best = None
    for cand, t in times:
        if t is None or not math.isfinite(t):
            continue
        if best is None or t < best[1]:
            best = (cand, t)
    if best is None:
        raise ValueError("no candidate could be measured")
    return best


# ----------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------

# candidate, a zero-argument callable running it once, seconds it may take -> median milliseconds
Timer = Callable[[Candidate, Callable[[], object], float], float]

_L2: Dict[int, torch.Tensor] = {}


def _flush_l2(device: torch.device) -> None:
    """Overwrite the L2 cache so no call starts with the weight already cached by the previous one
    (in training, other layers run in between)."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    buf = _L2.get(idx)
    if buf is None:
        size = int(getattr(torch.cuda.get_device_properties(idx), "L2_cache_size", 0) or (64 << 20))
        buf = _L2[idx] = torch.empty(2 * size, dtype=torch.int8, device=device)
    buf.zero_()


def release_l2() -> None:
    """Drop the L2-flush buffers (twice the device's L2 each), which training has better use for."""
    _L2.clear()


# GPU clock cycles per millisecond per device index (for torch.cuda._sleep), measured once
_CYCLES_PER_MS: Dict[int, float] = {}
SLEEP_MAX_MS = 50.0


def _cycles_per_ms(device: torch.device, stream) -> float:
    """The cycles ``torch.cuda._sleep`` spins per millisecond on ``device``, timed once by events
    (2e6, a 2 GHz clock, where that timing reads nothing)."""
    idx = device.index if device.index is not None else 0
    c = _CYCLES_PER_MS.get(idx)
    if c is None:
        cycles = 2_000_000
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        torch.cuda._sleep(cycles)
        end.record(stream)
        end.synchronize()
        ms = start.elapsed_time(end)
        c = _CYCLES_PER_MS[idx] = cycles / ms if ms > 0 else 2e6
    return c


def cuda_timer(candidate: Candidate, fn: Callable[[], object], budget_s: float, device=None, *,
               warmup: bool = True, queued: bool = True) -> float:
    """Median milliseconds of ``fn``'s GPU work by CUDA events, on ``device`` and its current stream
    (the device guard puts ``fn``'s launches, the flushes and the events on that one stream): one
    untimed call when ``warmup`` (compiles), one call to size the repetitions to ``budget_s`` and to
    time what ``fn`` costs the host, then MIN_REPS..MAX_REPS calls, each after an L2 flush.

    Each timed call is queued behind a GPU sleep (``torch.cuda._sleep``) twice as long as its host
    time, so the GPU runs its launches back to back: the events time the kernels, not the host's
    pace between them (which is what a host slower than the GPU would otherwise put in, and what
    varies from call to call). A call the GPU reached before it was fully queued doubles the sleep for
    the calls after it. ``queued=False``: no sleep; the events then time the call at the host's pace
    (what an eager call of this one layer takes, host included)."""
    device = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
    with torch.cuda.device(device):
        stream = torch.cuda.current_stream(device)
        if warmup:
            fn()
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        _flush_l2(device)
        start.record(stream)
        t0 = time.perf_counter()
        fn()
        host_ms = (time.perf_counter() - t0) * 1e3
        end.record(stream)
        end.synchronize()
        first_ms = start.elapsed_time(end)
        per_cycle = _cycles_per_ms(device, stream) if queued else 0.0
        sleep_ms = min(SLEEP_MAX_MS, 2.0 * host_ms + 0.02) if queued else 0.0
        reps = int(max(MIN_REPS, min(MAX_REPS, budget_s * 1e3 / max(first_ms + sleep_ms + 0.05, 1e-3))))
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for s, e in events:
            _flush_l2(device)
            if queued:
                torch.cuda._sleep(int(sleep_ms * per_cycle))
            s.record(stream)
            fn()
            e.record(stream)
            if queued and s.query():   # the GPU got there before the call was queued: sleep longer
                sleep_ms = min(SLEEP_MAX_MS, 2.0 * sleep_ms)
        stream.synchronize()
    samples = sorted(s.elapsed_time(e) for s, e in events)
    return samples[len(samples) // 2] if reps % 2 else 0.5 * (samples[reps // 2 - 1] + samples[reps // 2])


_TIMER: List[Optional[Timer]] = [None]


def set_timer(timer: Optional[Timer]) -> None:
    """Replace the timer every tuning uses (None: CUDA events). For tests and for tools that time
    differently; a timer gets (candidate, fn, budget_s) and returns milliseconds."""
    _TIMER[0] = timer


# ----------------------------------------------------------------------------------------------
# one phase of the op, runnable per candidate
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One frozen product as the op runs it: the phase, the weight, the call's sizes and dtypes."""

    phase: str
    w: object                 # Packed4bit or a dense [N, K] tensor (the layer's own, or a random one)
    M: int
    x_dtype: torch.dtype
    compute_dtype: torch.dtype
    lora_dtype: torch.dtype
    dropout_p: float = 0.0
    rank: int = 16
    bias: bool = False

    @property
    def N(self) -> int:
        return self.w.N if isinstance(self.w, Packed4bit) else self.w.shape[0]

    @property
    def K(self) -> int:
        return self.w.K if isinstance(self.w, Packed4bit) else self.w.shape[1]

    @property
    def device(self) -> torch.device:
        return self.w.device

    @property
    def kind(self) -> str:
        return product_kind(self.w, self.compute_dtype, self.lora_dtype)

    @property
    def key(self) -> str:
        return entry_key(self.phase, self.kind, self.N, self.K, self.M, weight_layout(self.w), self.x_dtype,
                         self.compute_dtype, self.lora_dtype, self.rank, self.dropout_p > 0)

    def describe(self) -> str:
        return (f"{self.phase} {self.kind} N={self.N} K={self.K} M={self.M} (bucket {configs.m_bucket(self.M)}) "
                f"{weight_layout(self.w)} "
                f"{_dtype_name(self.x_dtype)}/{_dtype_name(self.compute_dtype)}/{_dtype_name(self.lora_dtype)} "
                f"r={self.rank} dropout {'on' if self.dropout_p > 0 else 'off'}")


class PhaseRunner:
    """Inputs for one :class:`Problem`, built once; :meth:`fn` gives the zero-argument call of a candidate.

    Random normal data scaled as a trained layer's (X ~ 1, W's rows ~ 1/√K, A ~ 1/√K, B ~ 1/√r), from a
    generator of its own."""

    def __init__(self, problem: Problem, seed: int = 0):
        p = self.p = problem
        dev = p.device
        g = torch.Generator(device=dev).manual_seed(seed)

        def randn(*shape, std=1.0, dtype=torch.float32):
            return (torch.randn(*shape, generator=g, device=dev) * std).to(dtype)

        M, N, K, r = p.M, p.N, p.K, p.rank
        self.x = randn(M, K, dtype=p.x_dtype)
        self.dy = randn(M, N, std=0.1, dtype=p.x_dtype)
        # fp32 adapters, as get_peft_model leaves them; the products run in lora_dtype
        self.A = randn(r, K, std=K ** -0.5)
        self.B = randn(N, r, std=r ** -0.5)
        self.bias = randn(N, std=0.1, dtype=p.compute_dtype) if p.bias else None
        self._graphs: Dict[str, tuple] = {}

    def _call(self, strategy: str, x, A, B):
        from .ops import lora_linear

        p = self.p
        return lora_linear(x, p.w, A, B, 2.0, bias=self.bias, dropout_p=p.dropout_p, compute_dtype=p.compute_dtype,
                           lora_dtype=p.lora_dtype, strategy=strategy, seed=1234)

    def fn(self, candidate: Candidate) -> Callable[[], object]:
        if self.p.phase == "forward":
            def forward():
                with torch.no_grad():
                    return self._call(candidate.strategy, self.x, self.A, self.B)
            return forward
        graph = self._graphs.get(candidate.strategy)
        if graph is None:
            self._graphs.clear()      # candidates come grouped by strategy: one retained graph at a time
            x, A, B = (t.detach().requires_grad_() for t in (self.x, self.A, self.B))
            with torch.enable_grad():
                y = self._call(candidate.strategy, x, A, B)
            graph = self._graphs[candidate.strategy] = (y, (x, A, B))
        y, leaves = graph

        def backward():
            return torch.autograd.grad(y, leaves, self.dy, retain_graph=True)
        return backward

    def close(self) -> None:
        self._graphs.clear()


def measure(problem: Problem, cands: Sequence[Candidate], target, *, timer: Optional[Timer] = None,
            budget_s: float = PER_SHAPE_S, make_runner=PhaseRunner) -> List[Tuple[Candidate, Optional[float], str]]:
    """Time each candidate: [(candidate, ms or None, error)]. The first two (dequant, the table's tile)
    always; the rest while the budget lasts (skipped ones: None, ``BUDGET``). Each candidate's first
    call (it compiles) runs before its timer and outside the budget. An alternative Triton cannot
    build or load here is skipped (None, the error); every other exception propagates."""
    timer = timer or _TIMER[0] or (lambda c, f, b: cuda_timer(c, f, b, problem.device, warmup=False))
    share = budget_s / max(1, len(cands))
    runner = make_runner(problem)
    out = []
    spent = 0.0
    try:
        with torch.autocast(problem.device.type, enabled=False):
            for i, cand in enumerate(cands):
                if i >= 2 and spent >= budget_s:
                    out.append((cand, None, BUDGET))
                    continue
                ctx = configs.override(problem.kind, cand.tile) if cand.tile is not None else contextlib.nullcontext()
                try:
                    with ctx:
                        fn = runner.fn(cand)
                        fn()
                        if problem.device.type == "cuda":
                            torch.cuda.synchronize(problem.device)
                        t0 = time.perf_counter()
                        ms = float(timer(cand, fn, share))
                        spent += time.perf_counter() - t0
                    out.append((cand, ms, ""))
                except Exception as exc:
                    if i < 2 or not _unlaunchable(exc):
                        raise
                    out.append((cand, None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"))
    finally:
        runner.close()
        release_l2()
    return out


_TRITON_BUILD_ERRORS: List[Optional[tuple]] = [None]


def _unlaunchable(exc: BaseException) -> bool:
    """Whether Triton could not build or load a tile here: out of shared memory or registers
    (``OutOfResources``), or a compile error (``CompilationError``, ptxas's ``PTXASError``)."""
    if _TRITON_BUILD_ERRORS[0] is None:
        from triton.compiler import errors as compile_errors
        from triton.runtime import errors as runtime_errors

        _TRITON_BUILD_ERRORS[0] = tuple(
            t for t in (getattr(runtime_errors, "OutOfResources", None), getattr(runtime_errors, "PTXASError", None),
                        getattr(compile_errors, "CompilationError", None)) if t is not None)
    return isinstance(exc, _TRITON_BUILD_ERRORS[0])


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, getattr(torch.cuda, "OutOfMemoryError", ())) or "out of memory" in str(exc).lower()


def tile_tuple(t: Optional[TileConfig]) -> Optional[list]:
    return None if t is None else [t.block_m, t.block_j, t.block_i, t.num_warps, t.num_stages, t.split, t.nibbles]


def tune(problem: Problem, target=None, *, timer: Optional[Timer] = None, budget_s: float = PER_SHAPE_S,
         max_alternatives: int = MAX_ALTERNATIVES, make_runner=PhaseRunner) -> dict:
    """Measure the candidates of ``problem`` and return its entry (what the cache stores)."""
    J, I = product_dims(problem.phase, problem.N, problem.K)
    cands = candidates(problem.kind, problem.M, J, I, target, max_alternatives, problem.phase == "backward")
    t0 = time.perf_counter()
    results = measure(problem, cands, target, timer=timer, budget_s=budget_s, make_runner=make_runner)
    seconds = time.perf_counter() - t0
    best, best_ms = fastest([(c, t) for c, t, _ in results])
    fused = [(c, t) for c, t, _ in results if c.strategy == "fused"]
    try:
        best_fused = fastest(fused)[0]
    except ValueError:
        best_fused = None
    entry = {
        "strategy": best.strategy,
        "pick": best.name,
        "fused_tile": tile_tuple(best_fused.tile) if best_fused is not None else None,
        "us": {c.name: (None if t is None else round(t * 1e3, 3)) for c, t, _ in results},
        "origin": {c.name: c.origin for c, _, _ in results if c.origin},
        "errors": {c.name: err for c, _, err in results if err},
        "m": problem.M, "rank": problem.rank, "dropout_p": problem.dropout_p,
        "seconds": round(seconds, 3),
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    skipped = sum(err == BUDGET for _, _, err in results)
    logger.info("fastlora: tuned %s in %.2f s: picked %s, %.1f µs (dequant+cuBLAS %.1f µs, %d candidates%s)",
                problem.describe(), seconds, best.name, best_ms * 1e3, entry["us"]["dequant"], len(cands),
                f", {skipped} left for the next run by the budget" if skipped else "")
    return entry


def complete(entry: dict) -> bool:
    """Whether every candidate of an entry was measured (none skipped for the budget): only such an
    entry is written to the cache."""
    return BUDGET not in entry.get("errors", {}).values()


# ----------------------------------------------------------------------------------------------
# the op's side: which strategy a call runs
# ----------------------------------------------------------------------------------------------

_LOCK = threading.RLock()
# per-call memo of pick(): (device index, m_bucket(M), N, K, blocksize or dtype, nested, phase, compute
# dtype, dropout on, x dtype, lora dtype, rank) -> strategy, or _STATIC (the tables' rule at the call's M)
_PICKS: Dict[tuple, object] = {}
_PICKS_MAX = 4096                       # a model meets a few dozen keys; past this many the memo starts over
_STATIC = object()
_CACHES: Dict[str, Cache] = {}          # file path -> Cache
_UNSAVED: Dict[tuple, dict] = {}        # (file path, entry key) -> an entry cut short by the budget: this process only
_RETUNED: set = set()                   # entries re-tuned under FASTLORA_TUNE=force in this process
_SPENT = [0.0]                          # seconds spent tuning in this process
_BUDGET_LOGGED = [False]
_INSTALLED: Dict[tuple, TileConfig] = {}  # set_tuned's key (target, kind, M, J, I, trans_w) -> the tile in force


def reset() -> None:
    """Forget everything this process learnt (memo, loaded files, mode, budget) and the tiles it
    installed. Tests call it after changing the environment."""
    with _LOCK:
        _PICKS.clear()
        _CACHES.clear()
        _UNSAVED.clear()
        _KEYS.clear()
        _RETUNED.clear()
        _WARNED.clear()
        _SPENT[0] = 0.0
        _BUDGET_LOGGED[0] = False
        _MODE[0] = None
        for (target, kind, M, J, I, trans_w) in _INSTALLED:
            configs.set_tuned(target, kind, M, J, I, None, trans_w=trans_w)
        _INSTALLED.clear()


def _interpreter_active() -> bool:
    return _interpreter.interpreter_active()


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


# why a call cannot tune now, for a while only: the next eager call can
_TRANSIENT = ("inside a torch.compile trace", "during CUDA graph capture")


def static_reason(device) -> Optional[str]:
    """Why a call on ``device`` cannot tune now (None: it can)."""
    device = torch.device(device)
    if mode() == "0":
        return "FASTLORA_TUNE=0"
    if device.type not in _DEVICE_TYPES:
        return "not a CUDA device"
    if _interpreter_active():
        return "Triton's CPU interpreter"
    if torch.compiler.is_compiling():
        return _TRANSIENT[0]
    if _capturing(device):
        return _TRANSIENT[1]
    if _SPENT[0] >= PER_PROCESS_S:
        return "the process's tuning budget is spent"
    return None


_KEYS: Dict[str, dict] = {}


def cache_for(device) -> Cache:
    """The loaded cache of ``device`` (its file read once per process)."""
    key = _KEYS.get(str(device))
    if key is None:
        key = _KEYS[str(device)] = device_key(device)
    path = cache_path(key)
    c = _CACHES.get(str(path))
    if c is None or c.key != key:
        c = _CACHES[str(path)] = Cache(path, key)
    return c


def _install(problem: Problem, entry: dict, target) -> None:
    """Put the entry's fused tile in force for the problem's fused product (``configs.select``)."""
    if target is None or entry.get("fused_tile") is None:
        return
    J, I = product_dims(problem.phase, problem.N, problem.K)
    tile = TileConfig(*entry["fused_tile"])
    key = (target, problem.kind, configs.m_bucket(problem.M), J, I, problem.phase == "backward")
    if _INSTALLED.get(key) != tile:       # set_tuned makes every cached launch plan stale: only on a change
        configs.set_tuned(*key[:5], tile, trans_w=key[5])
        _INSTALLED[key] = tile


def _target(device: torch.device):
    """The GPU target whose tiles are the candidates (None: the interpreter's tiles)."""
    return launch_target(device) if device.type == "cuda" else None


def entry_for(problem: Problem, *, tune_missing: bool, timer: Optional[Timer] = None,
              budget_s: Optional[float] = None) -> Optional[dict]:
    """The problem's entry: from the device's cache file, else measured now (when ``tune_missing``)
    and written there (when :func:`complete`; else kept for this process). Installs its fused tile.
    None when neither."""
    with _LOCK:
        target = _target(problem.device)
        cache = cache_for(problem.device)
        ekey = problem.key
        e = cache.get(ekey) or _UNSAVED.get((str(cache.path), ekey))
        force = mode() == "force" and ekey not in _RETUNED
        if e is not None and not force:
            _install(problem, e, target)
            return e
        if not tune_missing:
            return None
        t0 = time.perf_counter()
        try:
            e = tune(problem, target, timer=timer,
                     budget_s=PER_SHAPE_S if budget_s is None else budget_s)
        finally:
            _SPENT[0] += time.perf_counter() - t0
        _RETUNED.add(ekey)
        if complete(e):
            cache.put(ekey, e)
        else:
            _UNSAVED[(str(cache.path), ekey)] = e
        _install(problem, e, target)
        return e


def pick(M: int, N: int, K: int, w, device, static: Callable[..., str], phase: str, compute_dtype: torch.dtype,
         dropout: bool, x_dtype: torch.dtype, lora_dtype: torch.dtype, rank: int) -> str:
    """The strategy of one call that asked for "auto": the measured pick of its entry (tuned now when
    missing and allowed), else ``static(M, device)``, the tables' rule
    (``ops.choose_strategy``). Every argument is the call's own: the entry is measured with them.
    Known (device, M bucket, weight, phase, dtypes, rank, dropout): one dict lookup."""
    q = isinstance(w, Packed4bit)
    memo = (device.index, configs.m_bucket(M), N, K, w.blocksize if q else w.dtype, q and w.nested, phase,
            compute_dtype, dropout, x_dtype, lora_dtype, rank)
    got = _PICKS.get(memo)
    if got is None:
        got = _pick_slow(memo, M, w, device, phase, compute_dtype, dropout, x_dtype, lora_dtype, rank)
    return static(M, device) if got is _STATIC else got


def _remember(memo: tuple, value):
    if len(_PICKS) >= _PICKS_MAX:
        _PICKS.clear()
    _PICKS[memo] = value
    return value


def _pick_slow(memo, M, w, device, phase, compute_dtype, dropout, x_dtype, lora_dtype, rank):
    """:func:`pick` for a key it has not met: the entry (tuned now when allowed), remembered unless
    the reason not to tune passes (a compile trace, a graph capture)."""
    with _LOCK:
        got = _PICKS.get(memo)
        if got is not None:
            return got
        why = static_reason(device)
        if why == "FASTLORA_TUNE=0" or why == "not a CUDA device":
            return _remember(memo, _STATIC)
        problem = Problem(phase, w, M, x_dtype, compute_dtype, lora_dtype, DEFAULT_DROPOUT_P if dropout else 0.0,
                          rank)
        try:
            e = entry_for(problem, tune_missing=why is None)
        except Exception as exc:  # noqa: BLE001 - tuning must never break a training step
            logger.warning("fastlora: tuning %s failed (%s: %s); the static tables stay in use for it in this process",
                           problem.describe(), type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            if device.type == "cuda" and _is_oom(exc):
                torch.cuda.empty_cache()
            return _remember(memo, _STATIC)
        if e is not None:
            return _remember(memo, e["strategy"])
        if why in _TRANSIENT:
            return _STATIC                   # the next eager call tunes
        if why == "the process's tuning budget is spent" and not _BUDGET_LOGGED[0]:
            _BUDGET_LOGGED[0] = True
            logger.info("fastlora: the tuning budget of %.0f s is spent; shapes not tuned yet keep the static "
                        "tables in this process and are tuned in the next", PER_PROCESS_S)
        return _remember(memo, _STATIC)


# ----------------------------------------------------------------------------------------------
# a model's projection shapes, and `fastlora tune`
# ----------------------------------------------------------------------------------------------

# a few configs by name (no download): the fields of their config.json that decide the projections
MODELS = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8),
    "llama3-70b": dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8),
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32),
    "mistral-7b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8),
    "qwen2-7b": dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4),
}


def _read_config(spec: str) -> dict:
    if spec.lower() in MODELS:
        return dict(MODELS[spec.lower()])
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(f"{spec!r} is neither a built-in config ({', '.join(MODELS)}) nor a local config.json "
                         "(or a folder holding one); fastlora downloads nothing")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValueError(f"{path}: not a JSON config ({exc})") from None
    return cfg.get("text_config", cfg) if isinstance(cfg.get("text_config"), dict) else cfg


def projection_shapes(spec: str) -> List[Tuple[str, int, int]]:
    """[(projection names, N, K)] of a Llama-style decoder (q, k, v, o, gate, up, down; W is [N, K] =
    [out_features, in_features]), identical shapes merged ("k_proj,v_proj")."""
    cfg = _read_config(spec)
    try:
        h, inter = int(cfg["hidden_size"]), int(cfg["intermediate_size"])
        heads = int(cfg["num_attention_heads"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{spec}: the config lacks {exc} (needs hidden_size, intermediate_size, "
                         "num_attention_heads)") from None
    kv = int(cfg.get("num_key_value_heads") or heads)
    hd = int(cfg.get("head_dim") or h // heads)
    shapes: Dict[Tuple[int, int], List[str]] = {}
    for name, N, K in (("q_proj", heads * hd, h), ("k_proj", kv * hd, h), ("v_proj", kv * hd, h),
                       ("o_proj", h, heads * hd), ("gate_proj", inter, h), ("up_proj", inter, h),
                       ("down_proj", h, inter)):
        shapes.setdefault((N, K), []).append(name)
    return [(",".join(names), N, K) for (N, K), names in shapes.items()]


def _parse_shapes(text: str) -> List[Tuple[str, int, int]]:
    out = []
    for item in text.split(","):
        item = item.strip().lower()
        if not item:
            continue
        try:
            n, k = (int(v) for v in item.split("x"))
        except ValueError:
            raise ValueError(f"--shapes takes NxK pairs (out_features x in_features), got {item!r}") from None
        out.append((f"{n}x{k}", n, k))
    return out


def verify(problem: Problem, entry: dict, *, timer: Optional[Timer] = None, budget_s: float = 3.0) -> dict:
    """Measure again, in this run, every candidate of ``entry`` that was measured (``budget_s`` of
    timed calls shared among them): {"us": {name: µs}, "pick_vs_best": the pick's µs over the fastest
    one's} (None where the pick is no longer a candidate). What the tuner's goal is judged by: a pick
    within 5% of the best, measured again."""
    target = _target(problem.device)
    J, I = product_dims(problem.phase, problem.N, problem.K)
    by_name = {c.name: c for c in candidates(problem.kind, problem.M, J, I, target,
                                             trans_w=problem.phase == "backward")}
    names = [n for n, us in entry["us"].items() if us is not None and n in by_name]
    again = {c.name: t for c, t, _ in measure(problem, [by_name[n] for n in names], target, timer=timer,
                                             budget_s=budget_s) if t is not None}
    best = min(again.values()) if again else None
    ratio = round(again[entry["pick"]] / best, 3) if best and entry["pick"] in again else None
    return {"us": {n: round(t * 1e3, 3) for n, t in again.items()}, "pick_vs_best": ratio}


def tune_shapes(shapes, Ms, device, *, r: int = 16, dropout_p: float = DEFAULT_DROPOUT_P, phases=PHASES,
                peft: bool = True, force: bool = False, timer: Optional[Timer] = None,
                budget_s: float = PER_SHAPE_S, verify_s: float = 0.0) -> List[dict]:
    """Tune (or read from the cache) every (shape, M, phase) on ``device``: one row each, with the
    candidates' µs, the pick, and its speedup over dequant+cuBLAS and over PEFT's layer (the same
    phase of PEFT's LoRA Linear4bit over bitsandbytes, adapters in bf16 under autocast). With
    ``verify_s`` > 0, each entry's candidates are then measured again (:func:`verify`, that many
    seconds each) and the row carries ``verify_us`` and ``pick_vs_best``."""
    from .check import Layer

    device = torch.device(device)
    rows = []
    for names, N, K in shapes:
        layer = Layer(N, K, r, quantized=True, device=device, dropout=dropout_p, bias=False, seed=0)
        layer.model.train()
        for M in Ms:
            peft_us = _peft_us(layer, M, dropout_p, budget_s, timer) if peft else {}
            for phase in phases:
                problem = Problem(phase, layer.weight, M, torch.bfloat16, torch.bfloat16, torch.bfloat16,
                                  dropout_p, r)
                if force:
                    cache = cache_for(device)
                    cache.entries.pop(problem.key, None)
                    _UNSAVED.pop((str(cache.path), problem.key), None)
                e = entry_for(problem, tune_missing=True, timer=timer, budget_s=budget_s)
                pick_us = e["us"].get(e["pick"])
                dq = e["us"].get("dequant")
                rows.append({"proj": names, "N": N, "K": K, "phase": phase, "M": M, "m_bucket": configs.m_bucket(M),
                             "us": e["us"], "origin": e.get("origin", {}), "pick": e["pick"],
                             "strategy": e["strategy"], "pick_us": pick_us, "peft_us": peft_us.get(phase),
                             "vs_dequant": round(dq / pick_us, 3) if dq and pick_us else None,
                             "vs_peft": round(peft_us[phase] / pick_us, 3) if peft_us.get(phase) and pick_us else None,
                             "seconds": e.get("seconds")})
                if verify_s > 0:
                    v = verify(problem, e, timer=timer, budget_s=verify_s)
                    rows[-1].update(verify_us=v["us"], pick_vs_best=v["pick_vs_best"])
        del layer
        release_l2()
        torch.cuda.empty_cache()
    return rows


def _peft_us(layer, M: int, p: float, budget_s: float, timer: Optional[Timer]) -> Dict[str, float]:
    """µs of PEFT's layer per phase, timed as the candidates are (forward without a graph, backward as
    autograd.grad over a retained one)."""
    timer = timer or _TIMER[0] or (lambda c, f, b: cuda_timer(c, f, b, layer.device))
    g = torch.Generator(device=layer.device).manual_seed(1)
    x = torch.randn(M, layer.K, generator=g, device=layer.device).to(torch.bfloat16).requires_grad_()
    dy = (torch.randn(M, layer.N, generator=g, device=layer.device) * 0.1).to(torch.bfloat16)
    peft = Candidate("peft")

    def fwd():
        with torch.no_grad(), torch.autocast(layer.device.type, dtype=torch.bfloat16):
            return layer.model(x)

    with torch.autocast(layer.device.type, dtype=torch.bfloat16):
        y = layer.model(x)
    leaves = [x, layer.A, layer.B]
    out = {"forward": timer(peft, fwd, budget_s / 2) * 1e3,
           "backward": timer(peft, lambda: torch.autograd.grad(y, leaves, dy, retain_graph=True), budget_s / 2) * 1e3}
    return out


def format_rows(rows: List[dict]) -> str:
    lines = [f"{'shape':28s} {'phase':8s} {'M<=':>6s} {'PEFT µs':>9s}  candidates (µs)",
             f"{'':28s} {'':8s} {'':>6s} {'':>9s}  -> pick, x dequant+cuBLAS, x PEFT"]
    for r in rows:
        cands = "  ".join(f"{name}{' [' + r['origin'][name] + ']' if name in r['origin'] else ''}="
                          f"{'-' if us is None else f'{us:.1f}'}" for name, us in r["us"].items())
        peft = "-" if r["peft_us"] is None else f"{r['peft_us']:.1f}"
        lines.append(f"{r['proj'] + ' ' + str(r['N']) + 'x' + str(r['K']):28s} {r['phase']:8s} {r['m_bucket']:6d} "
                     f"{peft:>9s}  {cands}")
        xd = "-" if r["vs_dequant"] is None else f"{r['vs_dequant']:.2f}x"
        xp = "-" if r["vs_peft"] is None else f"{r['vs_peft']:.2f}x"
        again = ""
        if "pick_vs_best" in r:
            again = ("; measured again: " + "  ".join(f"{n}={us:.1f}" for n, us in r["verify_us"].items())
                     + ("" if r["pick_vs_best"] is None else f" -> the pick at {r['pick_vs_best']:.2f}x the best"))
        lines.append(f"{'':28s} {'':8s} {'':6s} {'':9s}  -> {r['pick']}, {xd}, {xp}{again}")
    return "\n".join(lines)


def verify_summary(rows: List[dict], tolerance: float = 1.05) -> str:
    """One line: at how many verified entries the pick was within ``tolerance`` of the best measured
    again, and the worst."""
    got = [r for r in rows if r.get("pick_vs_best") is not None]
    if not got:
        return "verify: no entry measured again"
    worst = max(got, key=lambda r: r["pick_vs_best"])
    ok = sum(r["pick_vs_best"] <= tolerance for r in got)
    return (f"verify: the pick within {100 * (tolerance - 1):.0f}% of the best measured again at {ok} of {len(got)} "
            f"entries; worst {worst['pick_vs_best']:.2f}x ({worst['proj']} {worst['N']}x{worst['K']} {worst['phase']} "
            f"M<={worst['m_bucket']}: {worst['pick']})")


def _dry_run(shapes, Ms, arch: str, phases) -> str:
    """The candidates each entry would time on ``arch`` (no GPU needed), and the launches that takes."""
    from .kernels.targets import get_target

    target = get_target(arch)
    lines = [f"{'shape':28s} {'phase':8s} {'M<=':>6s}  candidates on {target.name} ({target.gpu})"]
    total = 0
    for names, N, K in shapes:
        for M in Ms:
            for phase in phases:
                J, I = product_dims(phase, N, K)
                cands = candidates("frozen4", configs.m_bucket(M), J, I, target, trans_w=phase == "backward")
                total += len(cands)
                lines.append(f"{names + ' ' + str(N) + 'x' + str(K):28s} {phase:8s} {configs.m_bucket(M):6d}  "
                             + ", ".join(c.name for c in cands))
    lines.append(f"{total} candidates in all; an entry's about {PER_SHAPE_S:.1f} s of measuring is shared by its "
                 f"candidates ({MIN_REPS}-{MAX_REPS} timed calls each, after a compiling call outside that budget "
                 "and a call that sizes the repetitions)")
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(
        prog="fastlora tune",
        description="Pre-tune fastlora on this GPU: time dequant+cuBLAS and the fused kernel's tiles for every "
                    "projection shape of a model, keep the fastest in the per-device cache "
                    f"({cache_dir()}), print what was measured.")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model", default=None,
                     help=f"a built-in config ({', '.join(MODELS)}; default llama3-8b) or a local config.json / folder")
    src.add_argument("--shapes", default=None, help="NxK pairs (out_features x in_features), e.g. 4096x4096,1024x4096")
    ap.add_argument("--m", default="1,16,512,2048,8192", help="token counts M = batch x sequence; each entry is "
                    "measured at M and serves M's bucket (M rounded up to a power of two)")
    ap.add_argument("--r", type=int, default=16, help="LoRA rank of the timed layer")
    ap.add_argument("--dropout", type=float, default=DEFAULT_DROPOUT_P, help="LoRA dropout (0 tunes the entries "
                    "without dropout)")
    ap.add_argument("--phases", default="forward,backward", help="which products: forward (X·Wᵀ), backward (dY·W)")
    ap.add_argument("--force", action="store_true", help="re-tune entries already in the cache")
    ap.add_argument("--no-peft", action="store_true", help="do not time PEFT's layer")
    ap.add_argument("--budget", type=float, default=PER_SHAPE_S, help="seconds of measuring per entry")
    ap.add_argument("--verify", type=float, default=0.0, metavar="SECONDS",
                    help="then measure every entry's candidates again, SECONDS of timed calls each, and say "
                         "whether the pick is within 5%% of the best (default 0: no)")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    ap.add_argument("--dry-run", action="store_true", help="list the candidates for --arch without a GPU")
    ap.add_argument("--arch", default="sm_90", help="the GPU target of --dry-run")
    args = ap.parse_args(argv)
    try:
        shapes = _parse_shapes(args.shapes) if args.shapes else projection_shapes(args.model or "llama3-8b")
        Ms = [int(v) for v in args.m.split(",") if v.strip()]
        phases = [p.strip() for p in args.phases.split(",") if p.strip()]
        for p in phases:
            product_dims(p, 1, 1)
    except ValueError as exc:
        print(f"fastlora tune: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(_dry_run(shapes, Ms, args.arch, phases))
        return 0
    if not torch.cuda.is_available() or _interpreter_active():
        print("fastlora tune: tuning needs a CUDA GPU (none is available here, or TRITON_INTERPRET=1 is set); "
              "fastlora keeps its static tables. `fastlora tune --dry-run` lists what would be timed.",
              file=sys.stderr)
        return 1
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device("cuda", torch.cuda.current_device())
    t0 = time.perf_counter()
    rows = tune_shapes(shapes, Ms, device, r=args.r, dropout_p=args.dropout, phases=phases, peft=not args.no_peft,
                       force=args.force, budget_s=args.budget, verify_s=args.verify)
    if args.json:
        print(json.dumps(rows))
    else:
        print(format_rows(rows))
        print(f"{len(rows)} entries in {time.perf_counter() - t0:.1f} s; cache {cache_for(device).path}")
        if args.verify > 0:
            print(verify_summary(rows))
    return 0


if __name__ == "__main__":
    # run through the package's module, so that the op and this command share one tuning state
    from fastlora.tuning import main as _main

    sys.exit(_main())
