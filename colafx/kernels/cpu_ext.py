"""colafx's C++ CPU ops, compiled on first use: fused per-token W8A8 linears and QuZO's integer
perturbation / update.

* ``w8a8_linear(x2, packed, qmax, bias)`` (FBGEMM-packed weight) and ``w8a8_int_mm(x2, weight,
  w_scale, qmax, bias)`` (plain int8 weight: first use, or changed in place as QuZO's) compute, in
  one call each, what :func:`colafx.kernels.quant.quantize_tokens` + the GEMM + the rescale compute
  in five-plus ATen calls, with the same bits: one pass over ``x`` for the per-token absmax and
  codes (AVX-512 / AVX2), the GEMM (FBGEMM's ``fbgemmPacked`` on u8 codes, no second quantization
  of ``x``; or ``torch._int_mm``), and one pass for the scales and bias (in place over
  ``_int_mm``'s int32 result: no fp32 temporary). Source: ``csrc/w8a8.cpp``.
* ``zo_int_rows(...)``: :mod:`.zo`'s integer perturbation / update of a block of weight rows in
  one pass from the raw 16-bit noise, bit-identical to its ATen path. Source: ``csrc/zo.cpp``.
* ``dequant_int4(qweight, w_scale, dtype, w_zero)``: a packed int4 weight (zero points optional) as bf16 or fp32 in one pass, for
  W4A16 with many tokens (a bf16 or fp32 GEMM on it beats ATen's int4 kernel there). Source:
  ``csrc/dequant.cpp``.
* ``w4a16_linear(x, qweight, w_scale, bias, bf16_dot, w_zero)``: W4A16 for few tokens (decode), the int4 weight
  read once and dequantized in registers: bf16 dot products (``vdpbf16ps``) on AVX512-BF16 CPUs,
  fp32 FMAs otherwise. Source: ``csrc/w4a16.cpp``.

The ops are compiled on first use with ``torch.utils.cpp_extension.load`` (about 30 s on 2 cores,
then cached in ``~/.cache/torch_extensions`` under a name that encodes the sources, torch's version
and the CPU capability they were compiled for). That needs a C++ compiler and ninja (a dependency).
``COLAFX_CPU_EXT=0`` turns them off. If the build fails, :func:`extension` warns once, naming the
reason, and returns None: the callers run their ATen paths, which give the same numbers, slower.
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

_CSRC = Path(__file__).with_name("csrc")
_SOURCES = (_CSRC / "w8a8.cpp", _CSRC / "zo.cpp", _CSRC / "dequant.cpp", _CSRC / "w4a16.cpp")  # w8a8.cpp holds the bindings
_ASMJIT_TYPES = _CSRC / "asmjit_types"
_ISA_FLAGS = {  # what torch's own CPU kernels were dispatched to on this CPU -> compiler flags
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma"],
    "AVX2": ["-mavx2", "-mfma"],
}
_EXT = None  # the loaded module, False after a failed or disabled build


def enabled() -> bool:
    """False when ``COLAFX_CPU_EXT`` is "0" (the C++ ops are never built or used)."""
    return os.environ.get("COLAFX_CPU_EXT", "1") != "0"


def _build_name(capability: str) -> str:
    digest = hashlib.sha1(f"{torch.__version__}|{capability}".encode())
    for path in sorted(_CSRC.rglob("*.[ch]*")):
        digest.update(path.read_bytes())
    return f"colafx_cpu_{capability.lower()}_{digest.hexdigest()[:12]}"


def extension():
    """The compiled ops' module, or None (disabled, or the build failed: warned once)."""
    global _EXT
    if _EXT is None:
        _EXT = _load() if enabled() else False
    return _EXT or None


def _has_fbgemm() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines


def _load():
    from torch.utils import cpp_extension

    capability = torch.backends.cpu.get_cpu_capability()
    flags = ["-O3", "-ffp-contract=off", "-fopenmp-simd", *_ISA_FLAGS.get(capability, [])]
    if not _has_fbgemm():  # no FBGEMM headers / symbols to build against
        capability, flags = capability + "_nofbgemm", flags + ["-DCOLAFX_NO_FBGEMM"]
    path = os.environ.get("PATH", "")
    try:
        if shutil.which("ninja") is None:  # the pip package's binary, when the venv is not activated
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + path
        return cpp_extension.load(
            _build_name(capability), [str(src) for src in _SOURCES], extra_include_paths=[str(_ASMJIT_TYPES)],
            extra_cflags=flags, verbose=False)
    except Exception as exc:  # no compiler / ninja, or headers this torch lacks: keep the ATen path
        reason = str(exc).strip().splitlines()
        warnings.warn(f"colafx: the C++ CPU ops could not be built ({type(exc).__name__}: "
                      f"{reason[0] if reason else ''}); W8A8 linears and QuZO's integer steps run their ATen "
                      "paths (same results, slower). Set COLAFX_CPU_EXT=0 to skip the build.", stacklevel=3)
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


def w8a8_int_mm(x2: torch.Tensor, weight: torch.Tensor, w_scale: torch.Tensor, qmax: int,
                bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The same product for a plain int8 ``weight`` [N, K] (contiguous) with fp32 ``w_scale`` [N],
    through ``torch._int_mm``; None when the op is unavailable or ``x2`` holds inf / NaN."""
    ext = extension()
    if ext is None:
        return None
    return ext.w8a8_int_mm(x2, weight, w_scale, qmax, SCALE_FLOOR, bias)


def zo_int_rows(block: torch.Tensor, scales: torch.Tensor, normal_bits: torch.Tensor, uniform_bits: torch.Tensor,
                table: torch.Tensor, bits: int, update: bool, a: float, lr: float, weight_decay: float, sign: int,
                head: int, low: int, high: int) -> bool:
    """QuZO's integer perturbation (``update`` False: ``a`` = eps) or update (``a`` = the projected
    gradient) of ``block`` (int8 [r, K] or packed uint8 [r, K / 2], contiguous) in place, from the
    raw 16-bit noise (int16 [r·K] each) and the normal ``table``; False when the op is unavailable."""
    ext = extension()
    if ext is None:
        return False
    ext.zo_int_rows(block, scales, normal_bits, uniform_bits, table, bits, update, a, lr, weight_decay, sign,
                    head, low, high)
    return True


def dequant_int4(qweight: torch.Tensor, w_scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16,
                 w_zero: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """The [N, K] weight of a packed int4 ``qweight`` (uint8 [N, K / 2]) with fp32 scales [N, G]
    and int8 zero points [N, G] (or None), in ``dtype`` bf16 or fp32 (``dequantize_ref(q, s,
    zero).to(dtype)``, bit for bit); None when unavailable. Raises ValueError for another dtype."""
    if dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"dequant_int4 makes bf16 or fp32 weights, not {dtype}")
    ext = extension()
    return None if ext is None else ext.dequant_int4(qweight.contiguous(), w_scale.float().contiguous(),
                                                     _zeros(w_zero), dtype == torch.bfloat16)


def _zeros(w_zero: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if w_zero is None else w_zero.contiguous()


def w4a16_linear(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor],
                 bf16_dot: bool = True, w_zero: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """W4A16 ``x · dequant(qweight)ᵀ (+ bias)`` in x's dtype (fp32 / bf16 / fp16, [..., K]) for few
    tokens: the int4 weight read once and dequantized in registers, the products summed in fp32.
    bf16 x with ``bf16_dot`` on an AVX512-BF16 CPU: bf16 dot products of x with the weight rounded
    to bf16; otherwise fp32 FMAs. ``w_zero``: int8 zero points [N, G] (``w = (q - zero)·s``) or None.
    The group length must be a multiple of 32. None when the ops are unavailable."""
    ext = extension()
    if ext is None:
        return None
    return ext.w4a16_linear(x.contiguous(), qweight.contiguous(), w_scale.contiguous(), _zeros(w_zero),
                            None if bias is None else bias.float().contiguous(), bf16_dot)
