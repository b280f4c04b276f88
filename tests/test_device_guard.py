"""Every launch runs on its tensors' device, whatever CUDA device is current.

Triton launches on the *current* device. With ``device_map="auto"`` over two GPUs, a layer on cuda:1
is often called while cuda:0 is current; without a guard its kernels would run on cuda:0 and read
cuda:1's memory. These tests mock the current device (no GPU needed) and check which device each
launch path sees at the moment it launches; ``tests/test_gpu.py`` checks the same on two real GPUs.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from fastlora.kernels import _launch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class _FakeCuda:
    """A current-device register standing in for the CUDA runtime's: ``torch.cuda.current_device``,
    ``torch.cuda.device(i)`` and Triton's driver read and set it."""

    def __init__(self, current=0):
        self.current = current
        self.switches = []

    def current_device(self):
        return self.current

    @contextlib.contextmanager
    def device(self, index):
        prev, self.current = self.current, int(index)
        self.switches.append(int(index))
        try:
            yield
        finally:
            self.current = prev

    # Triton's driver interface, as Prepared uses it
    def get_current_device(self):
        return self.current

    def get_current_stream(self, device=None):
        return 0


@pytest.fixture
def cuda(monkeypatch):
    fake = _FakeCuda(current=0)
    monkeypatch.setattr(torch.cuda, "current_device", fake.current_device)
    monkeypatch.setattr(torch.cuda, "device", fake.device)
    monkeypatch.setattr(_launch._interpreter, "interpreter_active", lambda: False)
    monkeypatch.setattr(type(_launch._driver), "active", property(lambda self: fake), raising=False)
    return fake


class _FakeKernel:
    """``kernel[grid](*args, **kwargs)`` records the device current when it is launched and returns a
    compiled-kernel stand-in whose direct launches (``run``) record it too."""

    params = ()

    def __init__(self, cuda):
        self.cuda = cuda
        self.seen = []
        outer = self

        class _Compiled:
            function = packed_metadata = None

            def run(self, *a, **k):
                outer.seen.append(("run", outer.cuda.current))

            def launch_metadata(self, *a, **k):
                return None

        self.compiled = _Compiled()

    def __getitem__(self, grid):
        def go(*args, **kwargs):
            self.seen.append(("jit", self.cuda.current))
            return self.compiled
        return go


def test_launch_runs_on_the_named_device(cuda):
    k = _FakeKernel(cuda)
    _launch.launch(k, (1,), device=torch.device("cuda", 1))
    assert k.seen == [("jit", 1)]
    assert cuda.current == 0, "the guard must restore the current device"
    # on the current device already: no switch
    _launch.launch(k, (1,), device=torch.device("cuda", 0))
    assert k.seen[-1] == ("jit", 0) and cuda.switches == [1]


def test_prepared_launch_runs_on_its_device_first_and_later_calls(cuda, monkeypatch):
    k = _FakeKernel(cuda)
    p = _launch.Prepared(k, (4, 2), {}, device_index=1)
    monkeypatch.setattr(_launch, "launch", _launch.launch)  # the module's own launch, guarded
    p()                      # first call: through Triton's JIT
    p()                      # later calls: the compiled kernel directly
    p()
    assert k.seen == [("jit", 1), ("run", 1), ("run", 1)]
    assert cuda.current == 0
    # a layer on the current device takes no guard
    q = _launch.Prepared(k, (4, 2), {}, device_index=0)
    n = len(cuda.switches)
    q()
    q()
    assert k.seen[-2:] == [("jit", 0), ("run", 0)] and len(cuda.switches) == n


def test_launchers_name_their_tensors_device(monkeypatch):
    """The launchers pass the device of the tensors they launch on: the dequantization kernel and the
    dropout-mask kernel through ``launch(..., device=)``, the fused product through ``Prepared``."""
    import bitsandbytes.functional as bnbF

    import fastlora
    from fastlora.kernels import lora_matmul

    seen = []
    real_launch = _launch.launch

    def spy(kernel, grid, *args, device=None, **kwargs):
        seen.append((kernel.fn.__name__ if hasattr(kernel, "fn") else str(kernel), device))
        return real_launch(kernel, grid, *args, device=device, **kwargs)

    monkeypatch.setattr(_launch, "launch", spy)
    torch.manual_seed(0)
    dev = torch.empty(0, device=DEVICE).device          # cuda:<current> on a GPU, else cpu
    packed, qs = bnbF.quantize_4bit(torch.randn(32, 64, device=dev), blocksize=64, quant_type="nf4")
    fastlora.dequantize(packed, qs, dtype=torch.float32)
    lora_matmul.dropout_keep_mask(4, 64, 0.1, 123, dev)
    assert [d for _, d in seen] == [dev] * 2, seen

    prepared = []
    real_prepared = _launch.Prepared

    def spy_prepared(kernel, grid, kwargs, device_index=None):
        prepared.append(device_index)
        return real_prepared(kernel, grid, kwargs, device_index)

    monkeypatch.setattr(_launch, "Prepared", spy_prepared)
    lora_matmul._PLANS.clear()
    x = torch.randn(3, 64, device=dev)
    lora_matmul.lora_matmul(x, torch.randn(16, 64, device=dev), torch.empty(3, 16, device=dev), trans_w=False,
                            compute_dtype=torch.float32)
    assert prepared == [dev.index]      # CPU tensors: no CUDA index; CUDA tensors: theirs
