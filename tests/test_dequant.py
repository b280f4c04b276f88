"""fastlora.dequantize (the Triton dequant kernel) and the reference dequant against bitsandbytes.

Every comparison is bit-exact (``torch.equal``): both sides compute code[nibble] * absmax in fp32
and round once to the output dtype, so there is no rounding freedom to tolerate. The cross product
is split so that it stays fast under the CPU interpreter:

- quant_type x nested x every blocksize x out dtype at one odd shape (45 x 130: K is not a multiple
  of any blocksize, so blocks straddle rows for all of them);
- shapes (incl. N*K odd) x quant_storage x quant_type at blocksize 64, nested;
- the transposed (1, N*K/2) view, a bnb.nn.Linear4bit module, the default dtype.

Sensitivity: flipping one nibble / one absmax entry must change exactly the expected elements, which
shows the exactness check can fail and that the kernel reads the byte layout as bitsandbytes does.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import DEVICE, ON_GPU

bnb = pytest.importorskip("bitsandbytes")
bnbF = bnb.functional

import fastlora  # noqa: E402
from fastlora import reference as ref  # noqa: E402
from fastlora.format import from_bnb  # noqa: E402

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
STORAGES = (torch.uint8, torch.bfloat16, torch.float16, torch.float32)
# (1, 64): one row, one block; (37, 96): blocks straddle rows; (45, 130): K not a multiple of 64 and
# the last block is partial; (3, 5) and (7, 9): N*K odd (the last byte holds one element).
SHAPES = [(1, 64), (37, 96), (45, 130), (3, 5), (7, 9)]
if ON_GPU:
    SHAPES += [(1000, 4097), (4096, 4096 + 64)]
CROSS_SHAPE = (45, 130) if not ON_GPU else (515, 4100)


def _quantize(N, K, *, quant_type="nf4", nested=True, blocksize=64, dtype=torch.float32,
              storage=torch.uint8):
    w = torch.randn(N, K, device=DEVICE, dtype=torch.float32).to(dtype)
    return bnbF.quantize_4bit(w, blocksize=blocksize, compress_statistics=nested, quant_type=quant_type,
                              quant_storage=storage)


def _with_dtype(qs, dtype):
    """A shallow copy of a QuantState that asks bitsandbytes for another output dtype."""
    qs = copy.copy(qs)
    qs.dtype = dtype
    return qs


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor, so that comparisons are bitwise (NaN-, -0.0-safe)."""
    return t.detach().reshape(-1).contiguous().view(torch.uint8).clone()


def _snapshot(weight, qs):
    ts = [weight, qs.absmax, qs.code]
    if qs.nested:
        ts += [qs.state2.absmax, qs.state2.code, torch.as_tensor(qs.offset)]
    return [_bits(t) for t in ts]


def assert_bit_equal(name, out, expected):
    assert out.dtype == expected.dtype, f"{name}: dtype {out.dtype} != bitsandbytes {expected.dtype}"
    assert out.shape == expected.shape, f"{name}: shape {tuple(out.shape)} != bitsandbytes {tuple(expected.shape)}"
    if torch.equal(out, expected):
        return
    diff = (out != expected).nonzero()
    first = tuple(diff[0].tolist())
    raise AssertionError(
        f"{name}: {diff.shape[0]} of {out.numel()} elements differ from bitsandbytes; first at {first}: "
        f"fastlora {out[first].item()!r} vs bitsandbytes {expected[first].item()!r} "
        f"(|diff| max {(out.double() - expected.double()).abs().max().item():.3e})"
    )


# --------------------------------------------------------------------------------------------------
# bit-exactness
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_dequantize_matches_bnb(quant_type, nested, blocksize, out_dtype):
    N, K = CROSS_SHAPE
    packed, qs = _quantize(N, K, quant_type=quant_type, nested=nested, blocksize=blocksize)
    before = _snapshot(packed, qs)
    expected = bnbF.dequantize_4bit(packed, _with_dtype(qs, out_dtype))

    out = fastlora.dequantize(packed, qs, dtype=out_dtype)

    assert_bit_equal(f"{quant_type} nested={nested} blocksize={blocksize} -> {out_dtype}", out, expected)
    assert all(torch.equal(a, b) for a, b in zip(before, _snapshot(packed, qs))), "inputs were modified"


def _storable(shape, storage):
    """bitsandbytes refuses a quant_storage whose element size does not divide the byte count."""
    return ((shape[0] * shape[1] + 1) // 2) % torch.empty((), dtype=storage).element_size() == 0


@pytest.mark.parametrize(
    "shape,storage",
    [(s, st) for s in SHAPES for st in STORAGES if _storable(s, st)],
    ids=lambda v: f"{v[0]}x{v[1]}" if isinstance(v, tuple) else str(v).split(".")[-1],
)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_shapes_and_quant_storage(quant_type, shape, storage):
    N, K = shape
    packed, qs = _quantize(N, K, quant_type=quant_type, nested=True, blocksize=64,
                           dtype=torch.bfloat16, storage=storage)
    assert packed.dtype == storage
    before = _snapshot(packed, qs)
    expected = bnbF.dequantize_4bit(packed, qs)            # bf16: the quant_state's dtype

    out = fastlora.dequantize(packed, qs)                  # default dtype = quant_state's dtype

    assert_bit_equal(f"{quant_type} {N}x{K} storage={storage}", out, expected)
    assert all(torch.equal(a, b) for a, b in zip(before, _snapshot(packed, qs))), "inputs were modified"


@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16], ids=["uint8", "bfloat16"])
@pytest.mark.parametrize("shape", [(37, 96), (7, 9)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_transposed_view(shape, storage):
    """bitsandbytes <= 0.49 handed matmul_4bit ``weight.t()``, a (1, N*K/2) view of the same bytes."""
    N, K = shape
    packed, qs = _quantize(N, K, storage=storage, dtype=torch.bfloat16)
    packed_t = packed.t()
    assert packed_t.shape[0] == 1
    expected = bnbF.dequantize_4bit(packed, qs)
    # bitsandbytes hands the [K, N] transpose back for a (1, n) input; fastlora always returns W [N, K]
    assert_bit_equal("bnb's own transposed path", bnbF.dequantize_4bit(packed_t, qs).t(), expected)

    out = fastlora.dequantize(packed_t, qs)

    assert_bit_equal(f"transposed view {N}x{K} storage={storage}", out, expected)


@pytest.mark.parametrize("quant_type,nested", [("nf4", True), ("fp4", False)])
def test_linear4bit_module(quant_type, nested):
    K, N = (96, 37) if not ON_GPU else (4096, 1000)
    layer = bnb.nn.Linear4bit(K, N, bias=True, compute_dtype=torch.bfloat16, quant_type=quant_type,
                              compress_statistics=nested).to(DEVICE)   # .to() quantizes
    qs = layer.weight.quant_state
    assert qs is not None and layer.weight.dtype == torch.uint8
    before = _snapshot(layer.weight, qs)
    expected = bnbF.dequantize_4bit(layer.weight, qs)

    out = fastlora.dequantize(layer)

    assert_bit_equal(f"Linear4bit {quant_type}", out, expected)
    assert_bit_equal(f"Linear4bit {quant_type} -> bf16", fastlora.dequantize(layer, dtype=torch.bfloat16),
                     bnbF.dequantize_4bit(layer.weight, _with_dtype(qs, torch.bfloat16)))
    assert all(torch.equal(a, b) for a, b in zip(before, _snapshot(layer.weight, qs))), "module was modified"


def test_module_without_params4bit():
    """FSDP strips the Params4bit subclass; the quant_state then lives on the module."""
    layer = bnb.nn.Linear4bit(64, 9, bias=False, quant_type="nf4").to(DEVICE)
    qs = layer.weight.quant_state
    expected = bnbF.dequantize_4bit(layer.weight, qs)
    layer.quant_state = qs
    layer.weight = torch.nn.Parameter(layer.weight.data.view(torch.uint8), requires_grad=False)
    assert getattr(layer.weight, "quant_state", None) is None
    assert_bit_equal("stripped Params4bit", fastlora.dequantize(layer), expected)


@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("blocksize", [32, 64, 4096])
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_reference_matches_bnb(quant_type, nested, blocksize, out_dtype):
    N, K = CROSS_SHAPE
    packed, qs = _quantize(N, K, quant_type=quant_type, nested=nested, blocksize=blocksize)
    expected = bnbF.dequantize_4bit(packed, _with_dtype(qs, out_dtype))
    out = ref.dequantize_4bit(from_bnb(packed, qs), out_dtype)
    assert_bit_equal(f"reference {quant_type} nested={nested} blocksize={blocksize}", out, expected)


def test_reference_odd_numel_and_storage():
    for (N, K), storage in [((7, 9), torch.float32), ((3, 5), torch.uint8), ((37, 96), torch.float16)]:
        packed, qs = _quantize(N, K, storage=storage, dtype=torch.bfloat16, quant_type="fp4")
        assert_bit_equal(f"reference {N}x{K} {storage}", ref.dequantize_4bit(from_bnb(packed, qs), torch.bfloat16),
                         bnbF.dequantize_4bit(packed, qs))


# --------------------------------------------------------------------------------------------------
# sensitivity: the exactness checks above can fail
# --------------------------------------------------------------------------------------------------


def _nibbles(packed_u8: torch.Tensor, numel: int) -> torch.Tensor:
    p = packed_u8.reshape(-1).to(torch.int64)
    return torch.stack([p >> 4, p & 0xF], dim=1).reshape(-1)[:numel]


@pytest.mark.parametrize("storage", [torch.uint8, torch.float32], ids=["uint8", "float32"])
@pytest.mark.parametrize("which", ["high", "low"])
def test_one_flipped_nibble_changes_exactly_one_element(which, storage):
    N, K = 37, 96
    packed, qs = _quantize(N, K, nested=True, blocksize=64, storage=storage)
    before = _bits(packed)
    original = bnbF.dequantize_4bit(packed, qs)
    assert_bit_equal("unmodified", fastlora.dequantize(packed, qs), original)

    j = 1001                                   # byte 1001 holds flat elements 2002 (high) and 2003 (low)
    flat = 2 * j + (0 if which == "high" else 1)
    mask = 0xF0 if which == "high" else 0x0F
    flipped = packed.clone()
    flipped_u8 = flipped.view(torch.uint8).reshape(-1)
    old_nibble = _nibbles(packed.view(torch.uint8), N * K)[flat].item()
    flipped_u8[j] ^= mask                      # nibble i -> 15 - i: another NF4 code, never equal
    assert _nibbles(flipped.view(torch.uint8), N * K)[flat].item() == 15 - old_nibble

    out = fastlora.dequantize(flipped, qs)

    changed = (out != original).nonzero().tolist()
    assert changed == [[flat // K, flat % K]], (
        f"flipping the {which} nibble of byte {j} should change only W[{flat // K}, {flat % K}], "
        f"changed {changed[:8]}{'...' if len(changed) > 8 else ''}")
    # and the new value is the one bitsandbytes decodes from the modified bytes
    assert_bit_equal("after the flip", out, bnbF.dequantize_4bit(flipped, qs))
    assert torch.equal(_bits(packed), before), "the flip was made on a clone; the original must be intact"


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
def test_one_changed_absmax_changes_exactly_its_block(nested):
    N, K, blocksize = 45, 130, 64
    packed, qs = _quantize(N, K, nested=nested, blocksize=blocksize)
    original = bnbF.dequantize_4bit(packed, qs)
    b = 38                                     # block 38: flat [2432, 2496), straddles rows 18 and 19
    qs2 = copy.copy(qs)
    absmax = qs.absmax.clone()
    if nested:
        codes = qs.state2.code
        old = int(absmax[b])
        new = old ^ 0x10
        assert codes[new] != codes[old]
        absmax[b] = new
    else:
        absmax[b] = absmax[b] * 2
    qs2.absmax = absmax

    out = fastlora.dequantize(packed, qs2)

    # every element of block b changes, except those whose code is exactly 0 (0 * any absmax = 0)
    code = qs.code
    nib = _nibbles(packed, N * K)
    flat = torch.arange(N * K, device=packed.device)
    expect = ((flat // blocksize) == b) & (code[nib] != 0)
    got = (out != original).reshape(-1)
    assert expect.sum() > 32
    assert torch.equal(got, expect), (
        f"changing absmax[{b}] should change flat elements {expect.nonzero().reshape(-1)[[0, -1]].tolist()} "
        f"(code != 0 only); changed {got.sum().item()} elements, first mismatch at flat "
        f"{(got != expect).nonzero().reshape(-1)[:4].tolist()}")
    assert_bit_equal("after the absmax change", out, bnbF.dequantize_4bit(packed, qs2))
    assert not torch.equal(qs.absmax, qs2.absmax)      # the original state is untouched


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
def test_dequantize_matches_reference_model(nested, blocksize):
    """The dequant kernel against fastlora's PyTorch model of the layout, bit for bit, on shapes whose
    blocks straddle rows and whose element count is odd (a program's last byte holds one element).
    Independent of bitsandbytes' own dequant implementation on this device."""
    for N, K in [(37, 96), (7, 9), (45, 130), (3, 4099)]:
        packed, qs = _quantize(N, K, quant_type="fp4" if nested else "nf4", nested=nested, blocksize=blocksize)
        q = from_bnb(packed, qs)
        for dtype in (torch.bfloat16, torch.float32):
            assert_bit_equal(f"{N}x{K} blocksize={blocksize} -> {dtype}", fastlora.dequantize(packed, qs, dtype=dtype),
                             ref.dequantize_4bit(q, dtype))
