"""Where every fastlora kernel launch goes through, so a machine without a GPU can see what a GPU runs.

Launchers call :func:`launch` instead of ``kernel[grid](...)``, and :func:`launch_target` to learn
which GPU's launch configuration applies. Normally that is the device's own (``targets.device_target``),
or, under Triton's CPU interpreter, none (the interpreter's tiles) unless a test names one with
:func:`tiles_for`. Inside :func:`recording` a launch is not run but recorded, with its kernel, grid
and the exact arguments and keywords the launcher passed, and ``launch_target`` answers with the
recorded target: ``fastlora inspect`` runs the real op on ``meta`` tensors (shapes and dtypes, no
data) under ``recording`` and so sees precisely the launches, configurations and arguments of a GPU
run. :func:`compile_launch` then compiles one recorded launch for its target through Triton's own
JIT entry point (``JITFunction.warmup``), which applies Triton's argument specialization (16-byte
divisibility of pointers and integers, integers equal to 1, constexprs, options) exactly as a real
launch does; only the driver is stood in for, by one that reports the target and launches nothing.

Meta tensors report ``data_ptr() == 0``; PyTorch's CUDA allocator returns 512-byte aligned blocks,
so the fresh tensors of a real layer call are 16-byte aligned too. A user's view at an odd offset
would compile a less-aligned variant: ``inspect`` shows the aligned one, the common case.
"""

from __future__ import annotations

import contextlib
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, List, Optional

import torch
from triton import knobs as _knobs
try:
    from triton.knobs import HookChain as _HookChain
except ImportError:   # a Triton whose hooks are plain callables or None
    class _HookChain:   # noqa: D401 - nothing is ever of this type
        calls = ()
from triton.runtime.driver import driver as _driver

from . import _interpreter
from .targets import Target, device_target, get_target


@dataclass
class Launch:
    """One kernel launch as a launcher made it."""

    kernel: Any               # the @triton.jit function
    grid: tuple
    args: tuple
    kwargs: dict
    label: Optional[str] = None   # what the launch computes ("Y", "dX", ...), set by fastlora inspect
    phase: Optional[str] = None   # "forward" / "backward", where the recording caller says
    # a merged launch (several products of a call in one): each segment as the launch of its own
    # it would otherwise be, for the model (``lora_matmul.launch_together``)
    parts: List["Launch"] = field(default_factory=list)

    @property
    def name(self) -> str:
        fn = getattr(self.kernel, "fn", self.kernel)
        return getattr(fn, "__name__", str(fn))

    @property
    def programs(self) -> int:
        n = 1
        for g in self.grid:
            n *= int(g)
        return n


@dataclass
class _Recorder:
    target: Target
    launches: List[Launch] = field(default_factory=list)


_state = threading.local()
# how many threads are recording now: while none is, a launch needs no thread-local lookup (about
# 0.3 µs each, several per call)
_RECORDING = [0]
_RECORDING_LOCK = threading.Lock()


def _recorder() -> Optional[_Recorder]:
    return getattr(_state, "recorder", None) if _RECORDING[0] else None


def recording_active() -> bool:
    return _recorder() is not None


def last_recorded() -> Launch:
    """The launch recorded last (inside :func:`recording`)."""
    return _recorder().launches[-1]


@contextlib.contextmanager
def recording(target):
    """Record (not run) every launch made inside, as launched on ``target`` (a name or Target)."""
    if _recorder() is not None:
        raise RuntimeError("fastlora: kernel launches are already being recorded")
    rec = _Recorder(get_target(target))
    _state.recorder = rec
    with _RECORDING_LOCK:
        _RECORDING[0] += 1
    try:
        yield rec.launches
    finally:
        _state.recorder = None
        with _RECORDING_LOCK:
            _RECORDING[0] -= 1


# a target whose tiles the interpreter runs (tests): None -> the interpreter's own small tiles
_NAMED_TARGET: Optional[Target] = None


@contextlib.contextmanager
def tiles_for(target):
    """Launch as on ``target``: its tiles, strategy rule and refusals (bf16 below sm_80, ...). Under
    the interpreter CPU tests so run the masks and loop trips of the tiles that GPU runs; on a GPU the
    same tests see what a device of that target would get (the kernels still compile for the device
    at hand). A test hook: nothing in the package calls it."""
    global _NAMED_TARGET
    prev = _NAMED_TARGET
    _NAMED_TARGET = get_target(target) if target is not None else None
    try:
        yield
    finally:
        _NAMED_TARGET = prev


def launch_target(device) -> Optional[Target]:
    """The target whose launch configuration applies on ``device``: the recorded target inside
    :func:`recording` or :func:`stubbed`; the device's own on CUDA; under the interpreter None (its
    own tiles) unless :func:`tiles_for` named one.

    A CUDA device's answer is kept per device (as given: ``cuda`` and ``cuda:0`` are two keys) once
    the interpreter was found off for it: a layer call asks several times, and reading the
    environment costs about a µs each time. The interpreter cannot be switched on for kernels that
    were compiled at import, so the kept answer stays right."""
    if _STUB is None and _NAMED_TARGET is None:
        t = _CUDA_TARGETS.get(device)
        if t is not None and _recorder() is None:
            return t
    rec = _recorder()
    if rec is not None:
        return rec.target
    if _STUB is not None:
        return _STUB.target
    if _NAMED_TARGET is not None or _interpreter.interpreter_active():
        return _NAMED_TARGET
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is not None:
        t = _CUDA_TARGETS[device] = _device_target_cached(dev.index)
        return t
    if dev.type == "cuda":   # the current device: asked each time (it may change)
        return _device_target_cached(torch.cuda.current_device())
    return None


_CUDA_TARGETS: dict = {}   # torch.device (with an index) or its index -> its Target


_DEVICE_TARGETS: dict = {}


def _device_target_cached(index: int) -> Target:
    t = _DEVICE_TARGETS.get(index)
    if t is None:
        t = _DEVICE_TARGETS[index] = device_target(torch.device("cuda", index))
    return t


def require_runnable(device, what: str) -> None:
    """As ``_interpreter.require_runnable``, except while recording or stubbed (meta tensors are the
    point)."""
    if _recorder() is None and _STUB is None:
        _interpreter.require_runnable(device, what)


def on_device(index: Optional[int]):
    """A guard that makes CUDA device ``index`` the current one for a launch, where it is not already
    (Triton launches on the current device, whatever device the tensors are on: a layer on cuda:1
    called while cuda:0 is current would read cuda:1's memory from cuda:0). None, or the current
    device already: no guard."""
    if index is None or torch.cuda.current_device() == index:
        return contextlib.nullcontext()
    return torch.cuda.device(index)


def launch(kernel, grid, *args, device=None, **kwargs):
    """``kernel[grid](*args, **kwargs)`` on ``device`` (the tensors' device, or its CUDA index; None:
    the current one), or a recorded :class:`Launch` inside :func:`recording`."""
    rec = _recorder()
    if rec is not None:
        rec.launches.append(Launch(kernel, tuple(grid), args, dict(kwargs)))
        return None
    if _STUB is not None:
        from triton.backends.compiler import GPUTarget

        with _target_caches(kernel, GPUTarget("cuda", _STUB.target.cc, 32)):
            return kernel[grid](*args, **kwargs)
    index = _cuda_index(device)
    if index is not None and not _interpreter.interpreter_active():
        with on_device(index):
            return kernel[grid](*args, **kwargs)
    return kernel[grid](*args, **kwargs)


def _cuda_index(device) -> Optional[int]:
    if device is None or isinstance(device, int):
        return device
    device = torch.device(device)
    return device.index if device.type == "cuda" else None


class Prepared:
    """One launch resolved once: the kernel, its grid, its constexprs and options. Called with the
    launch's runtime arguments (the kernel's non-constexpr parameters, in order).

    The first call goes through Triton's JIT (argument specialization, compile or cache lookup) and
    keeps the compiled kernel it returns; every later call launches that compiled kernel directly,
    with no binder, no specialization and no cache key. That is correct only for arguments that
    Triton would specialize the same way, so a launcher keeps one Prepared per specialization class:
    the same dtypes, shapes and strides (integers equal to 1 or divisible by 16), and the same 16-byte
    alignment of every pointer. Under the CPU interpreter, and while launches are recorded, every call
    goes through :func:`launch`. The launch runs on ``device_index``'s GPU whatever device is current
    (a device guard, only where they differ)."""

    __slots__ = ("kernel", "grid", "kwargs", "device_index", "compiled", "tail")

    def __init__(self, kernel, grid, kwargs, device_index=None):
        self.kernel = kernel
        self.grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
        self.kwargs = kwargs
        self.device_index = device_index
        self.compiled = None
        self.tail = None

    def __call__(self, *args):
        ck = self.compiled
        if ck is None or _recorder() is not None:
            return self._through_jit(args)
        d = _driver.active
        device = d.get_current_device()
        if self.device_index is not None and device != self.device_index:
            with on_device(self.device_index):
                return self(*args)
        stream = d.get_current_stream(device)
        params = args + self.tail
        runtime = _knobs.runtime
        enter, leave = _hook(runtime.launch_enter_hook), _hook(runtime.launch_exit_hook)
        meta = ck.launch_metadata(self.grid, stream, *params) if enter is not None or leave is not None else None
        ck.run(self.grid[0], self.grid[1], self.grid[2], stream, ck.function, ck.packed_metadata, meta,
               enter, leave, *params)
        return ck

    def _through_jit(self, args):
        ck = launch(self.kernel, self.grid, *args, device=self.device_index, **self.kwargs)
        if ck is not None and hasattr(ck, "packed_metadata") and _recorder() is None:
            names = [p.name for p in self.kernel.params]
            self.tail = tuple(self.kwargs[n] for n in names[len(args):])
            self.compiled = ck
        return ck


def _hook(h):
    """A launch hook as Triton's launcher takes it, None where there is nothing to call: Triton keeps
    its launch hooks as chains (``knobs.HookChain``), never None, and a launch given a chain builds
    the launch's metadata and calls the chain before and after, empty or not (a few µs per launch);
    a profiler that adds a hook (Proton) still gets every launch."""
    if h is None or (type(h) is _HookChain and not h.calls):
        return None
    return h


@contextlib.contextmanager
def _target_caches(kernel, gpu):
    """The JIT keeps its binder (and with it the target) per device index: give ``kernel`` a set of
    caches of ``gpu``'s own while inside, and put the device's back after, so a real GPU in the same
    process never launches what was compiled for another target."""
    own = kernel.device_caches
    per_target = kernel.__dict__.setdefault("_fastlora_target_caches", {})
    kernel.device_caches = per_target.setdefault(gpu.arch, defaultdict(kernel.create_binder))
    try:
        yield
    finally:
        kernel.device_caches = own


# ----------------------------------------------------------------------------------------------
# compiling a recorded launch for its target, without a GPU
# ----------------------------------------------------------------------------------------------


class _TargetDriver:
    """Stands in for Triton's CUDA driver: reports ``target``; never launches (warmup only)."""

    def __init__(self, target):
        self._target = target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self._target

    def is_active(self):
        return True


def compile_launch(launch_: Launch, target):
    """Compile ``launch_`` for ``target`` through Triton's JIT (the specialization of a real launch).

    Returns Triton's CompiledKernel (``.asm['cubin']``, ``.asm['ptx']``, ``.metadata``). Needs the
    kernels imported as compiled functions: raises if they are the interpreter's (TRITON_INTERPRET=1
    was set when they were decorated); ``fastlora inspect`` runs in a process of its own for that.
    """
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    target = get_target(target)
    kernel = launch_.kernel
    if not isinstance(kernel, JITFunction):
        raise RuntimeError(
            f"{launch_.name} was decorated for Triton's CPU interpreter (TRITON_INTERPRET=1 at import): "
            "compiling for a GPU target needs a process where it is unset (fastlora inspect starts one)"
        )
    gpu = GPUTarget("cuda", target.cc, 32)
    prev = driver._active
    driver.set_active(_TargetDriver(gpu))
    try:
        with _target_caches(kernel, gpu):
            return kernel.warmup(*launch_.args, grid=launch_.grid, **launch_.kwargs)
    finally:
        driver._active = prev


_TWINS: dict = {}


def _jit_twin(kernel):
    fn = getattr(kernel, "fn", None)
    if fn is None:
        raise RuntimeError(f"{kernel!r} is not a Triton kernel")
    if fn not in _TWINS:
        from triton.runtime.jit import JITFunction

        _TWINS[fn] = JITFunction(fn)
    return _TWINS[fn]


def specialization(launch_: Launch, target) -> dict:
    """The argument specialization Triton's JIT computes for ``launch_`` on ``target``: per argument
    its type ("*bf16", "i32", "constexpr", ...) and attribute (e.g. "D" = divisible by 16)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    kernel = launch_.kernel
    if not isinstance(kernel, JITFunction):
        # the interpreter's wrapper of the same Python function: its JIT twin specializes the same way
        kernel = _jit_twin(kernel)
    params = kernel.params
    backend = make_backend(GPUTarget("cuda", get_target(target).cc, 32))
    binder = create_function_from_signature(kernel.signature, params, backend)
    _, spec, _ = binder(*launch_.args, **launch_.kwargs)
    names = [p.name for p in params]
    return {n: tuple(s) if isinstance(s, (tuple, list)) else s for n, s in zip(names, spec)}


# ----------------------------------------------------------------------------------------------
# Triton's real launch path, with a driver that launches nothing (host-cost measurements)
# ----------------------------------------------------------------------------------------------


class _StubUtils:
    """The driver utilities Triton's launch path calls: a binary 'loads' to nothing; the device
    properties are the target's."""

    def __init__(self, target: Target):
        self._target = target

    def load_binary(self, name, kernel, shared, device):
        return (0, 0, 0, 0, 1024)   # module, function, registers, spills, max threads per block

    def unload_module(self, module):
        pass

    def get_device_properties(self, device):
        t = self._target
        return {"max_shared_mem": t.smem_per_block, "multiprocessor_count": t.sms, "max_num_regs": 65536,
                "warpSize": 32, "sm_clock_rate": int(t.clock_ghz * 1e6), "mem_clock_rate": 0, "mem_bus_width": 0}


class _StubDriver(_TargetDriver):
    """Triton's driver for :func:`stubbed`: reports the target, loads no binary, and launches by
    appending ``(compiled kernel name, grid, args)`` to the stub's list instead of the GPU."""

    def __init__(self, target: Target, gpu):
        super().__init__(gpu)
        self.utils = _StubUtils(target)

    def launcher_cls(self, src, metadata):
        name = metadata.name

        def run(gridX, gridY, gridZ, stream, function, packed_metadata, launch_metadata, enter_hook, exit_hook,
                *args):
            # the stub in force now (a compiled kernel keeps its launcher across stubbed() blocks)
            if _STUB is not None:
                _STUB.launches.append((name, (gridX, gridY, gridZ), args if _STUB.keep_args else None))

        return run


@dataclass
class _Stub:
    target: Target
    launches: List[tuple] = field(default_factory=list)   # (kernel name, grid, args) per launch
    keep_args: bool = False


_STUB: Optional[_Stub] = None


@contextlib.contextmanager
def stubbed(target, keep_args: bool = False):
    """Run every launch made inside through Triton's real launch path (argument binding and
    specialization, the compile cache, fastlora's own launch plans) as on ``target``, with a driver
    that loads no binary and launches nothing. Yields the list of launches made, as
    ``(kernel name, grid, args)`` (args only when ``keep_args``; else None).

    For measuring the host side of a layer call on a machine without a GPU: the op runs on ``meta``
    tensors (shapes, no data), kernels are compiled for ``target`` on their first launch (seconds;
    warm up before timing), and what a call costs the host up to the driver is then what a GPU run
    costs it, less the driver's own launch (argument packing in C and ``cuLaunchKernel``, a few µs
    per launch on a GPU). Needs the kernels decorated as compiled functions (no TRITON_INTERPRET)."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    global _STUB
    if _STUB is not None or _recorder() is not None:
        raise RuntimeError("fastlora: launches are already being stubbed or recorded")
    if _interpreter.interpreter_active():
        raise RuntimeError("fastlora: stubbed launches need compiled kernels; TRITON_INTERPRET=1 is set")
    t = get_target(target)
    stub = _Stub(t, keep_args=keep_args)
    prev = driver._active
    driver.set_active(_StubDriver(t, GPUTarget("cuda", t.cc, 32)))
    _STUB = stub
    try:
        yield stub.launches
    finally:
        _STUB = None
        driver._active = prev


def stub_active() -> bool:
    return _STUB is not None
