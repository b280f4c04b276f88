"""fastlora.format: bad 4-bit inputs are refused with an error that names the problem and the values.

Each case starts from a valid bitsandbytes weight + QuantState (checked to be accepted first, so a
refusal is caused by the one thing the case breaks) and changes exactly one thing on a copy.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from helpers import DEVICE

bnb = pytest.importorskip("bitsandbytes")
bnbF = bnb.functional

import fastlora  # noqa: E402
from fastlora.format import from_bnb, from_module  # noqa: E402

N, K = 37, 96            # 3552 elements, 1776 bytes, 56 blocks of 64, 1 second-level block


@pytest.fixture
def quantized():
    w = torch.randn(N, K, device=DEVICE)
    packed, qs = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    from_bnb(packed, qs)  # the unmodified pair is valid
    return packed, qs


def _replace(qs, **changes):
    qs = copy.copy(qs)
    for name, value in changes.items():
        setattr(qs, name, value)
    return qs


def _raises(exc, *fragments):
    """pytest.raises that also requires every fragment (plain text) in the message."""
    return pytest.raises(exc, match="(?s)" + "".join(f"(?=.*{re.escape(f)})" for f in fragments))


def test_plain_float_weight_without_quant_state():
    w = torch.randn(N, K, device=DEVICE)
    with _raises(ValueError, "no quant_state", "float32", f"({N}, {K})"):
        fastlora.dequantize(w)


def test_plain_float_weight_with_a_quant_state(quantized):
    _, qs = quantized
    w = torch.randn(N, K, device=DEVICE)
    with _raises(ValueError, "not 4-bit packed", f"({N}, {K})", "float32"):
        fastlora.dequantize(w, qs)


def test_float_column_of_the_wrong_size(quantized):
    _, qs = quantized
    w = torch.randn(N * K // 2, 1, device=DEVICE)   # the right element count, but 4 bytes each
    with _raises(ValueError, f"{N * K // 2 * 4} bytes", f"{N * K // 2}", f"[{N}, {K}]"):
        fastlora.dequantize(w, qs)


def test_quant_state_none(quantized):
    packed, _ = quantized
    with _raises(ValueError, "no quant_state", "uint8", f"({N * K // 2}, 1)"):
        from_bnb(packed, None)
    with _raises(ValueError, "no quant_state"):
        fastlora.dequantize(packed)          # a plain uint8 tensor carries no quant_state


def test_not_a_quant_state(quantized):
    packed, _ = quantized
    with _raises(TypeError, "dict", "absmax"):
        from_bnb(packed, {"shape": (N, K)})
    with _raises(TypeError, "list"):
        fastlora.dequantize([1, 2, 3], quantized[1])


@pytest.mark.parametrize("shape", [(N + 1, K), (N, K - 2), (K, N + 1)])
def test_shape_does_not_match_byte_count(quantized, shape):
    packed, qs = quantized
    needs = (shape[0] * shape[1] + 1) // 2
    with _raises(ValueError, f"{N * K // 2} bytes", f"[{shape[0]}, {shape[1]}]", f"needs {needs}"):
        fastlora.dequantize(packed, _replace(qs, shape=torch.Size(shape)))


@pytest.mark.parametrize("delta", [-1, +1])
def test_absmax_wrong_length(quantized, delta):
    packed, qs = quantized
    bad = torch.zeros(56 + delta, dtype=torch.uint8, device=DEVICE)
    with _raises(ValueError, "absmax", f"{56 + delta} entries", "56 blocks", "blocksize 64"):
        fastlora.dequantize(packed, _replace(qs, absmax=bad))


def test_plain_absmax_wrong_length_and_dtype():
    packed, qs = bnbF.quantize_4bit(torch.randn(N, K, device=DEVICE), blocksize=64, compress_statistics=False)
    with _raises(ValueError, "absmax", "55 entries", "56 blocks"):
        fastlora.dequantize(packed, _replace(qs, absmax=qs.absmax[:-1]))
    with _raises(TypeError, "absmax", "float32", "float16"):
        fastlora.dequantize(packed, _replace(qs, absmax=qs.absmax.half()))


def test_second_level_absmax_wrong_length(quantized):
    packed, qs = quantized
    state2 = _replace(qs.state2, absmax=torch.ones(2, device=DEVICE))
    with _raises(ValueError, "state2.absmax", "2 entries", "ceil(56/256)"):
        fastlora.dequantize(packed, _replace(qs, state2=state2))


def test_weight_and_quant_state_on_different_devices(quantized):
    packed, qs = quantized
    with _raises(ValueError, "weight is on meta", f"on {packed.device}"):
        fastlora.dequantize(packed.to("meta"), qs)
    with _raises(ValueError, "absmax", "on meta", f"weight is on {packed.device}"):
        fastlora.dequantize(packed, _replace(qs, absmax=qs.absmax.to("meta")))
    state2 = _replace(qs.state2, absmax=qs.state2.absmax.to("meta"))
    with _raises(ValueError, "state2.absmax", "on meta"):
        fastlora.dequantize(packed, _replace(qs, state2=state2))


def test_everything_on_meta(quantized):
    packed, qs = quantized
    meta = lambda t: t.to("meta")  # noqa: E731
    state2 = _replace(qs.state2, absmax=meta(qs.state2.absmax), code=meta(qs.state2.code))
    qs_meta = _replace(qs, absmax=meta(qs.absmax), code=meta(qs.code), offset=meta(qs.offset), state2=state2)
    with _raises(ValueError, "meta device"):
        fastlora.dequantize(meta(packed), qs_meta)


def test_offset_on_another_device(quantized):
    packed, qs = quantized
    with _raises(ValueError, "quant_state.offset", "meta"):
        fastlora.dequantize(packed, _replace(qs, offset=qs.offset.to("meta")))


@pytest.mark.parametrize("quant_type", ["int4", "NF4", None])
def test_unknown_quant_type(quantized, quant_type):
    packed, qs = quantized
    with _raises(ValueError, "quant_type", repr(quant_type), "nf4", "fp4"):
        fastlora.dequantize(packed, _replace(qs, quant_type=quant_type))


@pytest.mark.parametrize("blocksize", [16, 48, 8192])
def test_unsupported_blocksize(quantized, blocksize):
    packed, qs = quantized
    with _raises(ValueError, f"blocksize {blocksize}", "32", "4096"):
        fastlora.dequantize(packed, _replace(qs, blocksize=blocksize))


def test_blocksize_that_does_not_match_absmax(quantized):
    packed, qs = quantized
    with _raises(ValueError, "56 entries", "blocksize 128", "28 blocks"):
        fastlora.dequantize(packed, _replace(qs, blocksize=128))


@pytest.mark.parametrize("dtype", [torch.int8, torch.float64])
def test_unsupported_out_dtype(quantized, dtype):
    packed, qs = quantized
    with _raises(TypeError, "dtype", str(dtype)):
        fastlora.dequantize(packed, qs, dtype=dtype)


def test_non_contiguous_weight(quantized):
    packed, qs = quantized
    strided = torch.empty(packed.shape[0], 2, dtype=torch.uint8, device=DEVICE)[:, :1]
    strided.copy_(packed)
    with _raises(ValueError, "contiguous"):
        fastlora.dequantize(strided, qs)


def test_from_module_reads_the_layer_and_changes_nothing():
    layer = bnb.nn.Linear4bit(K, N, bias=False, quant_type="fp4", compress_statistics=False).to(DEVICE)
    before = layer.weight.detach().clone()
    q = from_module(layer)
    assert (q.N, q.K, q.blocksize, q.quant_type, q.nested) == (N, K, 64, "fp4", False)
    assert q.packed.data_ptr() == layer.weight.data_ptr(), "from_module must view the weight, not copy it"
    assert torch.equal(layer.weight, before)
    unquantized = bnb.nn.Linear4bit(K, N, bias=False, device="meta")
    with _raises(ValueError, "no quant_state", f"({N}, {K})"):
        from_module(unquantized)
