"""Test harness: on a machine without a GPU the real Triton kernels run in Triton's CPU interpreter.

TRITON_INTERPRET must be set before triton decorates any kernel, hence here, before fastlora is
imported. fastlora.kernels._interpreter corrects the interpreter's bf16 numerics (bf16 tl.dot,
truncating fp32->bf16 casts), so CPU runs give the GPU's numbers. On-device tuning is off for the
suite (FASTLORA_TUNE=0) and its cache goes to a temporary folder.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# On a GPU, "auto" would time candidates and pick per device: the suite checks the static tables'
# choices (tests/test_tuning.py turns tuning on for itself), and never writes to the user's cache
os.environ.setdefault("FASTLORA_TUNE", "0")
if "FASTLORA_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["FASTLORA_CACHE_DIR"] = tempfile.mkdtemp(prefix="fastlora-test-cache-")

import pytest  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    if ON_GPU:
        torch.cuda.manual_seed_all(0)
    yield


@pytest.fixture
def device():
    return DEVICE


def _bnb_cpu_dequant_is_flat() -> bool:
    """bitsandbytes' 4-bit blocks run over the row-major flat weight, straddling rows when K is not a
    multiple of the blocksize (its CUDA kernel, its generic PyTorch code). Its native CPU kernel in
    AVX-512 builds (0.50.2) indexes such blocks otherwise: rows after the first decode with the wrong
    absmax. True where the CPU kernel agrees with the flat layout on a straddling shape."""
    import bitsandbytes.functional as F

    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 96, generator=g)
    packed, qs = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    b = packed.view(torch.uint8).reshape(-1).to(torch.int32)
    nib = torch.stack([b >> 4, b & 15], dim=1).reshape(-1)[: w.numel()]
    flat = (qs.code[nib] * qs.absmax[torch.arange(w.numel()) // 64]).reshape(w.shape)
    return torch.equal(F.dequantize_4bit(packed, qs), flat)


def _use_flat_bnb_cpu_dequant() -> None:
    """Where bitsandbytes' native CPU dequant disagrees with its own flat layout, tests (and PEFT's
    Linear4bit forward inside them) use the flat computation bitsandbytes' CUDA kernel and generic
    code perform: code[nibble] · absmax[flat // blocksize] in fp32, one rounding to the dtype."""
    import bitsandbytes.functional as F

    def dequant_flat(A, absmax, blocksize, quant_type, shape, dtype):
        n = 1
        for s in shape:
            n *= s
        b = A.view(torch.uint8).reshape(-1).to(torch.int32)
        nib = torch.stack([b >> 4, b & 15], dim=1).reshape(-1)[:n]
        code = F.get_4bit_type(quant_type, device=A.device)
        return (code[nib] * absmax.float()[torch.arange(n, device=A.device) // blocksize]).reshape(shape).to(dtype)

    torch.library.register_kernel("bitsandbytes::dequantize_4bit", "cpu", dequant_flat)


def _no_bnb_cpu_repack() -> None:
    """On CPUs with AVX512-BF16, bitsandbytes' Linear4bit repacks its weight for a CPU inference
    kernel at the first eval-mode, no-grad forward (and asserts out_features % 32 == 0 while doing it).
    That is a CPU-only inference format, not the layout bitsandbytes' GPU path (the one fastlora
    serves) uses; fastlora's patcher leaves such layers on PEFT's forward ("packed_for_cpu"). The
    tests compare against the GPU semantics on every CPU, so the repack is turned off here, as it is
    on CPUs without AVX512-BF16."""
    import bitsandbytes.nn.modules as modules

    modules.has_avx512bf16 = lambda: False


if not ON_GPU:
    _no_bnb_cpu_repack()

if not ON_GPU and not _bnb_cpu_dequant_is_flat():
    import warnings as _warnings

    with _warnings.catch_warnings():
        _warnings.simplefilter("ignore")  # torch notes that the CPU kernel is replaced
        _use_flat_bnb_cpu_dequant()
    assert _bnb_cpu_dequant_is_flat()
