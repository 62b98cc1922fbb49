"""Kernel-test helpers: Triton interpreter switch, tolerances, error metrics."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton's first import (tests/conftest.py too)

import pytest  # noqa: E402
import torch  # noqa: E402

from colafx.kernels import quant  # noqa: E402

# max|actual - expected| / max|expected| allowed per dtype (fp32 math vs. a reference in fp32/fp64)
REL_TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}

needs_triton = pytest.mark.skipif(
    not (quant.interpreting() or torch.cuda.is_available()),
    reason="Triton kernels need TRITON_INTERPRET=1 (set before triton is imported) or a GPU",
)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| in float64."""
    a, e = actual.detach().double(), expected.detach().double()
    return float((a - e).abs().max() / e.abs().max().clamp_min(1e-30))


def sqnr_db(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of ``actual`` against ``expected`` in dB."""
    a, e = actual.detach().double(), expected.detach().double()
    return float(10 * torch.log10(e.pow(2).mean() / (a - e).pow(2).mean()))


@pytest.fixture
def force_triton(monkeypatch):
    """Route every colafx kernel op through its Triton kernels on CPU tensors (interpreter)."""
    if not quant.interpreting():
        pytest.skip("needs TRITON_INTERPRET=1")
    monkeypatch.setattr(quant, "FORCE_TRITON", True)  # the one switch every kernel module reads
