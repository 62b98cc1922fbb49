"""Fused per-token W8A8 linear on the CPU: a C++ op over FBGEMM's packed int8 weight.

``w8a8_linear(x2, packed, qmax, bias)`` computes, in one call, what :func:`colafx.kernels.quant.
quantize_tokens` + FBGEMM's GEMM + the per-token rescale compute in five-plus ATen calls, with the
same bits: one pass over ``x`` for the per-token absmax and u8 codes (AVX-512 / AVX2), FBGEMM's
u8·s8 GEMM on them (``fbgemmPacked`` with ``ReQuantizeForFloat``, no second quantization of
``x``) and one pass for the per-token scale and bias (source: ``csrc/w8a8_fbgemm.cpp``).

The op is compiled on first use with ``torch.utils.cpp_extension.load`` (about 25 s on 2 cores,
then cached in ``~/.cache/torch_extensions`` under a name that encodes the source, torch's version
and the CPU capability it was compiled for). It needs a C++ compiler and ninja (a dependency).
``COLAFX_CPU_EXT=0`` turns it off. If the build fails, :func:`extension` warns once, naming the
reason, and returns None: the callers run the ATen path, which gives the same numbers, slower.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import warnings
from pathlib import Path
from typing import Optional

import torch

from .quant import SCALE_FLOOR

_SOURCE = Path(__file__).with_name("csrc") / "w8a8_fbgemm.cpp"
_ASMJIT_TYPES = Path(__file__).with_name("csrc") / "asmjit_types"
_ISA_FLAGS = {  # what torch's own CPU kernels were dispatched to on this CPU -> compiler flags
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma"],
    "AVX2": ["-mavx2", "-mfma"],
}
_EXT = None  # the loaded module, False after a failed or disabled build


def enabled() -> bool:
    """False when ``COLAFX_CPU_EXT`` is "0" (the fused op is never built or used)."""
    return os.environ.get("COLAFX_CPU_EXT", "1") != "0"


def _build_name(capability: str) -> str:
    digest = hashlib.sha1(_SOURCE.read_bytes() + f"{torch.__version__}|{capability}".encode()).hexdigest()[:12]
    return f"colafx_w8a8_{capability.lower()}_{digest}"


def extension():
    """The compiled fused op's module, or None (disabled, or the build failed: warned once)."""
    global _EXT
    if _EXT is None:
        _EXT = _load() if enabled() else False
    return _EXT or None


def _load():
    from torch.utils import cpp_extension

    capability = torch.backends.cpu.get_cpu_capability()
    path = os.environ.get("PATH", "")
    try:
        if shutil.which("ninja") is None:  # the pip package's binary, when the venv is not activated
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + path
        return cpp_extension.load(
            _build_name(capability), [str(_SOURCE)], extra_include_paths=[str(_ASMJIT_TYPES)],
            extra_cflags=["-O3", "-ffp-contract=off", "-fopenmp-simd", *_ISA_FLAGS.get(capability, [])],
            verbose=False)
    except Exception as exc:  # no compiler / ninja, or headers this torch lacks: keep the ATen path
        reason = str(exc).strip().splitlines()
        warnings.warn(f"colafx: the fused CPU W8A8 op could not be built ({type(exc).__name__}: "
                      f"{reason[0] if reason else ''}); W8A8 on FBGEMM runs its ATen path "
                      "(same results, slower). Set COLAFX_CPU_EXT=0 to skip the build.", stacklevel=3)
        return False
    finally:
        os.environ["PATH"] = path


def w8a8_linear(x2: torch.Tensor, packed, qmax: int, bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``(q(x) · Wᵀ) · w_scale · s (+ bias)`` as fp32 [M, N] for fp32 contiguous ``x2`` [M, K]
    and an FBGEMM-packed per-channel weight, ``q, s = quantize_tokens(x2, qmax)``; None when the op
    is unavailable or does not apply (inf / NaN in ``x2``): the caller runs the ATen path."""
    ext = extension()
    if ext is None:
        return None
    return ext.w8a8_linear(x2, packed, qmax, SCALE_FLOOR, bias)
