"""Split-K's partial sums: one buffer per device and stream, reused by every launch.

A split product's programs write their fp32 partials and each tile's last program adds them, all
within one launch; launches on a stream run one after another, so they can all use one buffer, and
a call then allocates nothing for its partials. Two products merged into one launch take disjoint
regions. CUDA-graph capture and tensor subclasses (fake tensors) allocate per call. (That a call
allocates only its own tensors is counted in ``tests/test_host_path.py``.)

On the CPU the interpreter runs every split here: a tile given to ``configs.override`` keeps its
split count without a GPU target.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from helpers import DEVICE, ON_GPU
from test_lora_linear import _case

from fastlora.kernels import configs, lora_matmul as lm
from fastlora.kernels.configs import TileConfig

# every product split 4 ways (one 32-wide step per split at K = 128)
SPLIT = TileConfig(16, 16, 32, 4, 1, 4)
SPLIT_KINDS = ("frozen4", "frozen4_lora32", "lora", "lora16", "dense")


@contextlib.contextmanager
def _all_split():
    with contextlib.ExitStack() as st:
        for kind in SPLIT_KINDS:
            st.enter_context(configs.override(kind, SPLIT))
        yield


@pytest.fixture(autouse=True)
def _fresh():
    lm._PLANS.clear()
    lm.release_partials()
    yield
    lm.release_partials()


@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("strategy", ["fused", "dequant"])
def test_layer_with_every_product_split(strategy, p):
    """The whole layer, every product split (the dequant strategy merges G and dB, both split, into
    one launch with W's dequantization): output and every gradient within the rule, and every
    split ran from the one buffer of this device and stream."""
    together = []
    orig = lm._partials_together

    def spy(first, second):
        together.append(first.plan.part_shape is not None and second is not None
                        and second.plan.part_shape is not None)
        return orig(first, second)

    lm._partials_together = spy
    try:
        with _all_split():
            _case(70, 128, 80, 8, p=p, strategy=strategy)   # M = 70: dA and dB (over M) split too
    finally:
        lm._partials_together = orig
    split = [pl for pl in lm._PLANS.values() if pl.splits > 1]
    # fused: H, Y, G, dB, dX, dA; dequant: H, G, dB, dA (Y and dX: cuBLAS, then an epilogue pass)
    assert len(split) == (6 if strategy == "fused" else 4), [(pl.cfg, pl.splits) for pl in lm._PLANS.values()]
    assert len(lm._PARTIALS) == 1, list(lm._PARTIALS)
    if strategy == "dequant":
        assert any(together), "no launch merged two split products"


def test_merged_regions_are_disjoint_and_aligned():
    """Two split products in one launch: the second's region starts past the first's whole
    partials (splits · M · J, rounded up to 256 B), inside one buffer large enough for both."""
    torch.manual_seed(1)
    a = torch.randn(5, 128, device=DEVICE)
    w1, w2 = torch.randn(40, 128, device=DEVICE), torch.randn(24, 128, device=DEVICE)
    o1, o2 = torch.empty(5, 40, device=DEVICE), torch.empty(5, 24, device=DEVICE)
    p1 = lm.lora_matmul(a, w1, o1, trans_w=False, compute_dtype=torch.float32, config=SPLIT, defer=True)
    p2 = lm.lora_matmul(a, w2, o2, trans_w=False, compute_dtype=torch.float32, config=SPLIT, defer=True)
    assert p1.plan.splits == p2.plan.splits == 4
    a0, a1 = lm._partials_together(p1, p2)
    part0, part1 = a0[lm._COUNT_ARG - 1], a1[lm._COUNT_ARG - 1]
    (buf,) = lm._PARTIALS.values()
    n0 = 4 * 5 * 40
    start0 = (part0.data_ptr() - buf.data_ptr()) // 4
    start1 = (part1.data_ptr() - buf.data_ptr()) // 4
    assert start0 == 0 and start1 >= n0 and start1 % lm.PARTIALS_ALIGN == 0, (start0, start1)
    assert buf.numel() >= start1 + 4 * 5 * 24
    # launched together, both products are right
    lm.launch_together(p1, p2)
    torch.testing.assert_close(o1, a @ w1.t(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(o2, a @ w2.t(), rtol=1e-4, atol=1e-4)


def test_buffer_grows_and_is_released():
    """A larger split product replaces the buffer with a larger one; release_partials frees it and
    says how many bytes it held."""
    a = torch.randn(5, 128, device=DEVICE)
    for J in (16, 64):
        w = torch.randn(J, 128, device=DEVICE)
        out = torch.empty(5, J, device=DEVICE)
        lm.lora_matmul(a, w, out, trans_w=False, compute_dtype=torch.float32, config=SPLIT)
        (buf,) = lm._PARTIALS.values()
        assert buf.numel() >= 4 * 5 * J
        torch.testing.assert_close(out, a @ w.t(), rtol=1e-4, atol=1e-4)
    assert lm.release_partials() == buf.numel() * 4
    assert not lm._PARTIALS and lm.release_partials() == 0


def test_unpatch_releases_the_buffer():
    """fastlora.unpatch gives the buffer back: an unpatched model leaves nothing of fastlora's on the
    device."""
    import torch.nn as nn
    from peft import LoraConfig, get_peft_model

    import fastlora

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(128, 64, bias=False)

        def forward(self, x):
            return self.proj(x)

    torch.manual_seed(3)
    model = get_peft_model(Net().to(DEVICE), LoraConfig(r=8, lora_alpha=16, target_modules=["proj"]))
    fastlora.patch(model)
    with configs.override("dense", SPLIT), configs.override("lora", SPLIT):
        model(torch.randn(5, 128, device=DEVICE)).sum().backward()
    assert lm._PARTIALS, "no split product ran"
    fastlora.unpatch(model)
    assert not lm._PARTIALS


def test_fake_tensors_get_their_own_buffer():
    """A tensor subclass (a FakeTensor under torch.compile or the memory benchmark) never becomes
    the shared buffer: each call gets a buffer of its own, and the shared one is untouched."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        like = torch.empty(4, 4, device="meta")
        buf = lm._partials_buffer(like, 256)
    assert type(buf) is not torch.Tensor and buf.numel() == 256
    assert not lm._PARTIALS


@pytest.mark.skipif(not ON_GPU, reason="CUDA-graph capture and concurrent programs need a GPU")
def test_gpu_capture_allocates_its_own_and_merged_equals_alone():
    """During capture the partials come from the graph's own allocation (the shared buffer is left
    as it was), the replay equals eager; and two split products merged into one launch give what
    each gives alone, bit for bit (overlapping regions would mix their partials)."""
    torch.manual_seed(2)
    a = torch.randn(16, 4096, device="cuda", dtype=torch.bfloat16)
    w1 = torch.randn(1024, 4096, device="cuda", dtype=torch.bfloat16)
    w2 = torch.randn(512, 4096, device="cuda", dtype=torch.bfloat16)
    cfg = TileConfig(16, 64, 64, 4, 2, 16)
    alone = []
    for w in (w1, w2):
        o = torch.empty(16, w.shape[0], device="cuda", dtype=torch.bfloat16)
        lm.lora_matmul(a, w, o, trans_w=False, compute_dtype=torch.bfloat16, config=cfg)
        alone.append(o)
    o1, o2 = torch.empty_like(alone[0]), torch.empty_like(alone[1])
    p1 = lm.lora_matmul(a, w1, o1, trans_w=False, compute_dtype=torch.bfloat16, config=cfg, defer=True)
    p2 = lm.lora_matmul(a, w2, o2, trans_w=False, compute_dtype=torch.bfloat16, config=cfg, defer=True)
    assert p1.plan.splits > 1 and p2.plan.splits > 1
    lm.launch_together(p1, p2)
    torch.cuda.synchronize()
    assert torch.equal(o1, alone[0]) and torch.equal(o2, alone[1])

    before = {k: v.data_ptr() for k, v in lm._PARTIALS.items()}
    g = torch.cuda.CUDAGraph()
    oc = torch.empty_like(alone[0])
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        lm.lora_matmul(a, w1, oc, trans_w=False, compute_dtype=torch.bfloat16, config=cfg)   # warm on s
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        lm.lora_matmul(a, w1, oc, trans_w=False, compute_dtype=torch.bfloat16, config=cfg)
    oc.zero_()
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(oc, alone[0])
    for k, ptr in before.items():
        assert lm._PARTIALS[k].data_ptr() == ptr
