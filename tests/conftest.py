"""Test harness: on a machine without a GPU the real Triton kernels run in Triton's CPU interpreter.

TRITON_INTERPRET must be set before triton decorates any kernel, hence here, before fastlora is
imported. fastlora.kernels._interpreter corrects the interpreter's bf16 numerics (bf16 tl.dot,
truncating fp32->bf16 casts), so CPU runs give the GPU's numbers.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

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
