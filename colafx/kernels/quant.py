"""Quantizers: per-token int8 activations, int8 / int4 weights, nearest or stochastic rounding.

Conventions shared by every kernel in :mod:`colafx.kernels`
-------------------------------------------------------------
* **Symmetric absmax scaling.** A row (a token, an output channel, or a group of ``group_size``
  consecutive input columns of an output channel) gets ``scale = max(absmax, 1e-12) / qmax`` in
  fp32 and ``q = clamp(R(x / scale), -qmax, qmax)``. The code ``-qmax - 1`` (-128 / -8) is never
  produced.
* **Rounding** ``R``: ``"nearest"`` is ``floor(v + 0.5)`` (ties round up, the same on every path);
  ``"stochastic"`` is ``floor(v + U)`` with ``U ~ Uniform[0, 1)``, so ``E[q] = v`` (unbiased) as long
  as ``|v| <= qmax``, which absmax scaling guarantees.
* **Random streams are indexed by element and deterministic for (seed, shape).** Triton kernels (CUDA,
  or CPU tensors under ``TRITON_INTERPRET=1``) draw Philox numbers ``tl.rand(seed, i)`` /
  ``tl.randn(seed, i)`` indexed by the flat (row-major) element index ``i``. The CPU fast path
  draws numpy's PCG64DXSM, which jumps to any element (16 raw bits per element ``i``, see
  :func:`cpu_range`);
  kernels work through it :data:`CPU_CHUNK` elements at a time. The two streams differ; each is
  reproducible. :func:`uniform_noise` / :func:`triton_uniform_noise` return them so that the
  pure-PyTorch references can be fed the exact numbers a kernel used.
* **int4 packing.** Values in [-8, 7] are stored as ``q + 8`` nibbles, two per ``uint8``, the low
  nibble holding the even column: ``packed[n, j] = (q[n, 2j] + 8) | (q[n, 2j + 1] + 8) << 4``.
  This is ONNX ``com.microsoft::MatMulNBits``' layout with its default zero point 8. K must be
  even (pad the weight yourself if it is not).
* **Asymmetric int4** (``quantize_weight(..., symmetric=False)``, for inference): a group gets 16
  levels over ``[min(w, 0), max(w, 0)]``: ``scale = (max - min) / 15``, an int8 zero point ``z`` in
  [-8, 7] per group and ``w = (q - z)·scale`` with codes ``q`` in [-8, 7] (onnxruntime's
  ``MatMulNBitsQuantizer`` grid: its uint4 zero point is ``z + 8``).
"""

from __future__ import annotations

import os
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

__all__ = [
    "QuantizedWeight",
    "quantize_act_int8",
    "quantize_weight",
    "dequantize_packed",
    "dequantize_weight",
    "pack_int4",
    "unpack_int4",
    "quantize_ref",
    "quantize_tokens",
    "dequantize_ref",
    "uniform_noise",
    "triton_uniform_noise",
    "cpu_noise",
    "cpu_range",
    "philox_noise",
    "derive_seed",
    "QMAX",
]

QMAX = {8: 127, 4: 7}
"""Largest magnitude a symmetric ``bits``-bit code may take."""

SCALE_FLOOR = 1e-12
"""``absmax`` is clamped to at least this before dividing by ``qmax`` (all-zero rows -> q = 0)."""

CPU_CHUNK = 1 << 20
"""Elements the CPU kernels draw and update at a time (bounds the memory of one draw)."""

ROUNDINGS = ("nearest", "stochastic")

_MAX_SEED = (1 << 63) - 1
_QUANT_BLOCK = 1024
_SMALL = 1 << 16  # elements up to which a temporary |x| is cheaper than two reductions

FORCE_TRITON = False
"""Tests set this to True to run every colafx kernel op's Triton kernels on CPU tensors (under
TRITON_INTERPRET=1); the one switch for lowrank, qmatmul, quant and zo."""


# --------------------------------------------------------------------------------------------
# Small shared helpers (also used by qmatmul.py and zo.py)
# --------------------------------------------------------------------------------------------


def interpreting() -> bool:
    """Return True when Triton runs in interpreter mode (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(t: torch.Tensor, force: bool = False) -> bool:
    """Return True if kernels for tensor ``t`` should launch Triton (CUDA, or forced)."""
    return t.is_cuda or force or FORCE_TRITON


def dot_mode(x: torch.Tensor) -> int:
    """How a kernel's ``tl.dot`` runs for input ``x``: 0 native 16-bit dot; 1 exact fp32 dot
    (the interpreter, or fp32 without TF32); 2 TF32 (fp32 on CUDA when torch allows TF32)."""
    if x.dtype == torch.float32:
        tf32 = x.is_cuda and not interpreting() and torch.backends.cuda.matmul.allow_tf32
        return 2 if tf32 else 1
    return 1 if interpreting() else 0


def check_seed(seed: int, name: str = "seed") -> int:
    """Return ``seed`` as an int; raise TypeError / ValueError unless it is an int in [0, 2**63)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{name} must be an int, got {type(seed).__name__}")
    if not 0 <= seed <= _MAX_SEED:
        raise ValueError(f"{name} must be in [0, 2**63), got {seed}")
    return seed


def derive_seed(seed: int, salt: int) -> int:
    """Return a new seed in [0, 2**31) mixed from ``(seed, salt)`` (SplitMix64 finalizer).

    Used to derive independent random streams (rounding draws, CPU chunks) from one user seed.
    Raises TypeError / ValueError for a bad ``seed``.
    """
    check_seed(seed)
    mask = (1 << 64) - 1
    z = (seed * 0x9E3779B97F4A7C15 + (salt + 1) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return (z ^ (z >> 31)) & 0x7FFFFFFF


def check_rounding(rounding: str) -> str:
    """Return ``rounding``; raise ValueError unless it is "nearest" or "stochastic"."""
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    return rounding


def check_bits(bits: int) -> int:
    """Return ``bits``; raise ValueError unless it is 4 or 8."""
    if bits not in QMAX:
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    return bits


def check_float(t: torch.Tensor, name: str) -> None:
    """Raise TypeError unless ``t`` is a floating-point tensor."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


_NORMAL_TABLE = None  # np.float32 [65536]: the N(0,1) quantiles at (j + 1/2) / 65536


def _normal_table():
    """The 65536 equiprobable quantiles of N(0, 1) (inverse CDF at (j + 1/2) / 2¹⁶), fp32."""
    global _NORMAL_TABLE
    if _NORMAL_TABLE is None:
        levels = (torch.arange(1 << 16, dtype=torch.float64) + 0.5) / (1 << 16)
        _NORMAL_TABLE = torch.special.ndtri(levels).float().numpy()
    return _NORMAL_TABLE


def cpu_range(kind: str, seed: int, lo: int, hi: int) -> torch.Tensor:
    """Elements ``[lo, hi)`` of the CPU random stream for ``seed``, as a 1-D fp32 tensor.

    Element ``i`` comes from the 16 bits ``i`` of numpy's PCG64DXSM stream keyed by ``(seed,
    kind)``, which jumps to any position (``advance``, O(log n)) without generating the numbers
    before it, so any range is regenerated alone. ``kind`` "normal" maps the bits through the table
    of N(0,1)'s 2¹⁶ equiprobable quantiles (|u| <= 4.4, mean 0, variance 1 - 3e-9); "uniform" is
    bits·2⁻¹⁶, on [0, 1) (stochastic rounding with it is unbiased up to 2⁻¹⁷ of a step). Bulk raw
    bits plus one look-up / multiply: ~3x faster than ``torch.randn`` (PCG64DXSM draws its bits
    ~2x faster than Philox4x64). Raises ValueError for a bad ``kind``.
    """
    import numpy as np

    raw = cpu_bits(kind, seed, lo, hi)
    if kind == "normal":
        return torch.from_numpy(np.take(_normal_table(), raw))
    return torch.from_numpy(np.multiply(raw, np.float32(2.0**-16), dtype=np.float32))


def cpu_bits(kind: str, seed: int, lo: int, hi: int):
    """The raw 16-bit numbers ``[lo, hi)`` behind :func:`cpu_range` (numpy uint16, 1-D).
    Raises ValueError for a bad ``kind``."""
    import numpy as np

    if kind not in ("uniform", "normal"):
        raise ValueError(f"kind must be 'uniform' or 'normal', got {kind!r}")
    first = lo // 4  # one 64-bit draw is 4 numbers
    bits = np.random.PCG64DXSM(np.random.SeedSequence((seed, int(kind == "normal"))))
    if first:
        bits.advance(first)
    skip, n = lo - 4 * first, max(0, hi - lo)
    return bits.random_raw(-(-(skip + n) // 4)).view(np.uint16)[skip:skip + n]


def cpu_noise(kind: str, seed: int, numel: int) -> torch.Tensor:
    """Return the whole CPU ``kind`` ("uniform" / "normal") stream for ``seed`` (1-D fp32, ``numel``).

    Raises TypeError / ValueError for a bad seed or kind.
    """
    check_seed(seed)
    return cpu_range(kind, seed, 0, numel)


def uniform_noise(seed: int, numel: int) -> torch.Tensor:
    """Return the CPU fast path's U[0,1) stream for ``seed`` as a 1-D fp32 tensor of ``numel``."""
    return cpu_noise("uniform", seed, numel)


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _round_to_grid(v, offsets, seed, STOCHASTIC: tl.constexpr):
    """floor(v + U) with U = tl.rand(seed, offsets) (stochastic) or floor(v + 0.5) (nearest)."""
    if STOCHASTIC:
        noise = tl.rand(seed, offsets)
    else:
        noise = 0.5
    return tl.floor(v + noise)


@triton.jit
def _quantize_rows_kernel(
    x_ptr, q_ptr, scale_ptr, n_cols, qmax, seed,
    STOCHASTIC: tl.constexpr, BLOCK: tl.constexpr,
):
    """One program per row of a contiguous [rows, n_cols] tensor: absmax scale, then quantize."""
    row = tl.program_id(0).to(tl.int64)
    row_start = row * n_cols
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        v = tl.load(x_ptr + row_start + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(v))
    scale = tl.maximum(tl.max(amax, axis=0), 1e-12) / qmax
    tl.store(scale_ptr + row, scale)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        v = tl.load(x_ptr + row_start + cols, mask=mask, other=0.0).to(tl.float32)
        q = _round_to_grid(tl.math.div_rn(v, scale), row_start + cols, seed, STOCHASTIC)
        q = tl.minimum(tl.maximum(q, -qmax), qmax)
        tl.store(q_ptr + row_start + cols, q.to(tl.int8), mask=mask)


@triton.jit
def _noise_kernel(out_ptr, numel, seed, NORMAL: tl.constexpr, BLOCK: tl.constexpr):
    """out[i] = tl.randn(seed, i) (NORMAL) or tl.rand(seed, i): the streams the Triton kernels draw."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    if NORMAL:
        noise = tl.randn(seed, offsets)
    else:
        noise = tl.rand(seed, offsets)
    tl.store(out_ptr + offsets, noise, mask=offsets < numel)


def philox_noise(kind: str, seed: int, numel: int, device="cpu") -> torch.Tensor:
    """Return the Triton Philox stream ``tl.rand(seed, i)`` ("uniform", U[0,1)) or
    ``tl.randn(seed, i)`` ("normal", N(0,1)) for i < numel, as a 1-D fp32 tensor.

    On a CPU device this needs ``TRITON_INTERPRET=1``. Raises ValueError for a bad ``kind``,
    TypeError / ValueError for a bad seed.
    """
    if kind not in ("uniform", "normal"):
        raise ValueError(f"kind must be 'uniform' or 'normal', got {kind!r}")
    check_seed(seed)
    out = torch.empty(numel, dtype=torch.float32, device=device)
    if numel:
        _noise_kernel[(triton.cdiv(numel, _QUANT_BLOCK),)](
            out, numel, seed, NORMAL=kind == "normal", BLOCK=_QUANT_BLOCK
        )
    return out


def triton_uniform_noise(seed: int, numel: int, device="cpu") -> torch.Tensor:
    """Return the Triton Philox U[0,1) stream ``tl.rand(seed, i)``, i < numel, as fp32 (1-D).

    On a CPU device this needs ``TRITON_INTERPRET=1``. Raises ValueError / TypeError for a bad seed.
    """
    return philox_noise("uniform", seed, numel, device)


def _quantize_rows_triton(x2d: torch.Tensor, qmax: int, stochastic: bool, seed: int):
    """Launch the row quantizer on a contiguous 2-D tensor; return (int8 q, fp32 scale [rows, 1])."""
    rows, n_cols = x2d.shape
    q = torch.empty(x2d.shape, dtype=torch.int8, device=x2d.device)
    scale = torch.empty((rows, 1), dtype=torch.float32, device=x2d.device)
    if rows and n_cols:
        block = min(_QUANT_BLOCK, triton.next_power_of_2(n_cols))
        _quantize_rows_kernel[(rows,)](
            x2d, q, scale, n_cols, float(qmax), seed, STOCHASTIC=stochastic, BLOCK=block
        )
    return q, scale


# --------------------------------------------------------------------------------------------
# Pure-PyTorch references (also the CPU fast path, fed with the CPU noise stream)
# --------------------------------------------------------------------------------------------


def quantize_ref(
    x: torch.Tensor, qmax: int, group_size: Optional[int] = None, noise: Optional[torch.Tensor] = None
):
    """Reference absmax quantizer along the last dim; return ``(q int8, scale fp32)``.

    One scale per row of ``x`` ([..., K] -> scale [..., 1]) or, with ``group_size``, per group of
    columns ([..., K] -> scale [..., K // group_size]). ``noise`` (same numel as ``x``, U[0,1))
    selects stochastic rounding ``floor(v + noise)``; None means nearest ``floor(v + 0.5)``.
    Raises ValueError if ``group_size`` does not divide K or ``noise`` has the wrong size.
    """
    k = x.shape[-1]
    g = k if group_size is None else group_size
    if g <= 0 or k % g:
        raise ValueError(f"group_size {group_size} must divide the last dim {k}")
    if noise is not None and noise.numel() != x.numel():
        raise ValueError(f"noise has {noise.numel()} elements, expected {x.numel()}")
    rows = x.reshape(-1, g).float()
    scale, _ = group_params(rows, qmax)
    v = rows / scale  # one temporary for x / scale, rounded in place
    v.add_(0.5 if noise is None else noise.reshape(rows.shape).float())
    q = v.floor_().clamp_(-qmax, qmax).to(torch.int8)
    return q.reshape(x.shape), scale.reshape(*x.shape[:-1], k // g)


def group_params(rows: torch.Tensor, qmax: int, symmetric: bool = True):
    """The scale (fp32 [R, 1]) and zero point of each row of fp32 ``rows`` [R, g], as every weight
    quantizer sets them: symmetric, ``max(|w|, 1e-12) / qmax`` and no zero point (None); else
    (int4) 16 levels over ``[min(w, 0), max(w, 0)]`` and the code of 0, ``round(-min / scale) - 8``
    in [-8, 7], as fp32 [R, 1]."""
    lo, hi = rows.amin(dim=-1, keepdim=True), rows.amax(dim=-1, keepdim=True)
    if symmetric:  # absmax = max(max, -min): no |x| temporary
        return torch.maximum(hi, lo.neg_()).clamp_min_(SCALE_FLOOR).div_(qmax), None
    lo.clamp_(max=0)
    scale = (hi.clamp_(min=0) - lo).div_(15).clamp_min_(SCALE_FLOOR)
    return scale, (lo / scale).neg_().add_(0.5).floor_().clamp_(0, 15).sub_(8)


def quantize_tokens(x2d: torch.Tensor, qmax: int):
    """Nearest-rounding per-row absmax quantizer with few torch ops (the CPU linears' hot path).

    Bit-identical to ``quantize_ref(x2d, qmax)`` for a 2-D float ``x2d``: no clamp is needed
    because ``|x / scale| <= qmax·(1 + 2⁻²³)`` rounds to at most ``qmax``. Returns ``(q int8,
    scale fp32 [rows, 1])``.
    """
    codes, scale = token_codes(x2d, qmax)
    return codes.to(torch.int8), scale


def token_codes(x2d: torch.Tensor, qmax: int):
    """:func:`quantize_tokens`' codes as fp32 (integers in [-qmax, qmax]) and its scale, for GEMMs
    that take float input and quantize it themselves (FBGEMM: with scale 1 its quantizer keeps them)."""
    x = x2d.float()
    scale = row_absmax(x).clamp_min_(SCALE_FLOOR).div_(qmax)
    return (x / scale).add_(0.5).floor_(), scale


def row_absmax(x2d: torch.Tensor) -> torch.Tensor:
    """``max |x|`` of each row of a 2-D ``x2d`` as [rows, 1] (two reductions and no ``|x|``
    temporary for large inputs, where that is faster)."""
    if x2d.numel() <= _SMALL:
        return x2d.abs().amax(dim=-1, keepdim=True)
    return torch.maximum(x2d.amax(dim=-1, keepdim=True), x2d.amin(dim=-1, keepdim=True).neg_())


def dequantize_ref(q: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Reference dequantization of int codes ``q`` [..., K] with ``scale`` [..., G] and zero points
    ``zero`` (int [..., G], or None for 0): ``(q - zero)·scale`` as fp32 [..., K]."""
    k, groups = q.shape[-1], scale.shape[-1]
    codes = q.reshape(-1, groups, k // groups).float()
    if zero is not None:
        codes = codes - zero.reshape(-1, groups, 1).float()
    return (codes * scale.reshape(-1, groups, 1).float()).reshape(q.shape)


def _quantize_rows(x2d: torch.Tensor, qmax: int, rounding: str, seed: int):
    """Dispatch the row quantizer: Triton on CUDA (or forced), PyTorch with CPU noise otherwise."""
    stochastic = rounding == "stochastic"
    if use_triton(x2d):
        return _quantize_rows_triton(x2d.contiguous(), qmax, stochastic, seed)
    noise = uniform_noise(seed, x2d.numel()) if stochastic else None
    return quantize_ref(x2d, qmax, noise=noise)


# --------------------------------------------------------------------------------------------
# Activation quantizer (custom op)
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("colafx::quantize_act_int8", mutates_args=())
def _quantize_act_int8_op(x: torch.Tensor, rounding: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    k = x.shape[-1]
    q, scale = _quantize_rows(x.reshape(-1, k), QMAX[8], rounding, seed)
    return q.reshape(x.shape), scale.reshape(*x.shape[:-1], 1)


@_quantize_act_int8_op.register_fake
def _(x, rounding, seed):
    return (
        torch.empty(x.shape, dtype=torch.int8, device=x.device),
        torch.empty((*x.shape[:-1], 1), dtype=torch.float32, device=x.device),
    )


def quantize_act_int8(x: torch.Tensor, rounding: str = "nearest", seed: int = 0):
    """Quantize activations per token: ``x`` [..., K] float -> ``(q int8 [..., K], scale fp32 [..., 1])``.

    Dynamic symmetric absmax int8 (qmax 127) along the last dim; ``x ≈ q * scale``. ``rounding`` is
    "nearest" or "stochastic" (seeded by ``seed``, see the module docstring).
    Raises TypeError if ``x`` is not floating point, ValueError for a bad rounding / seed or a 0-d x.
    """
    check_float(x, "x")
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension")
    check_rounding(rounding)
    check_seed(seed)
    return torch.ops.colafx.quantize_act_int8(x, rounding, seed)


# --------------------------------------------------------------------------------------------
# Weight quantizer
# --------------------------------------------------------------------------------------------


class QuantizedWeight(NamedTuple):
    """A quantized [N, K] weight.

    ``qweight``: int8 [N, K] (bits 8) or packed uint8 [N, K // 2] (bits 4, see module docstring).
    ``scale``: fp32 [N, 1] (per output channel) or [N, K // group_size] (per group).
    ``shape``: the original ``torch.Size([N, K])``.
    ``zero``: int8 zero points shaped like ``scale`` (asymmetric int4: ``w = (q - zero)·scale``), or
    None (symmetric).
    """

    qweight: torch.Tensor
    scale: torch.Tensor
    bits: int
    group_size: Optional[int]
    shape: torch.Size
    zero: Optional[torch.Tensor] = None


def _check_qmax(bits: int, qmax: Optional[int]) -> int:
    """Return the qmax to use for ``bits``; raise ValueError if ``qmax`` is out of [1, QMAX[bits]]."""
    if qmax is None:
        return QMAX[bits]
    if isinstance(qmax, bool) or not isinstance(qmax, int) or not 1 <= qmax <= QMAX[bits]:
        raise ValueError(f"qmax must be an int in [1, {QMAX[bits]}] for {bits}-bit, got {qmax!r}")
    return qmax


def check_group_size(k: int, group_size: Optional[int]) -> int:
    """Return the effective group length (K when ``group_size`` is None).

    Raises TypeError if ``group_size`` is not an int, ValueError if it is not positive or does
    not divide ``k``.
    """
    if group_size is None:
        return k
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"group_size must be an int or None, got {type(group_size).__name__}")
    if group_size <= 0 or k % group_size:
        raise ValueError(f"group_size must be a positive divisor of K={k}, got {group_size}")
    return group_size


def quantize_weight(
    w: torch.Tensor,
    bits: int = 8,
    group_size: Optional[int] = None,
    rounding: str = "nearest",
    seed: int = 0,
    qmax: Optional[int] = None,
    symmetric: bool = True,
) -> QuantizedWeight:
    """Quantize a [N, K] float weight to int8 or packed int4; return a :class:`QuantizedWeight`.

    Symmetric absmax per output channel (``group_size=None``) or per group of ``group_size``
    consecutive columns. ``qmax`` (default 127 / 7) lets callers reserve head-room, e.g. the ZO
    kernels need ``qmax = QMAX - HEADROOM`` (see :mod:`colafx.kernels.zo`). ``symmetric=False``
    (int4 only, no ``qmax``): 16 levels over each group's range and an int8 zero point per group
    (module docstring). Stochastic rounding is unbiased, deterministic for (seed, shape, device kind).
    Raises TypeError if ``w`` is not a floating-point tensor; ValueError if it is not 2-D, for bad
    ``bits`` / ``rounding`` / ``seed`` / ``qmax``, if ``group_size`` does not divide K, if K is
    odd for 4 bits, or for ``symmetric=False`` with 8 bits or a ``qmax``.
    """
    check_float(w, "w")
    if w.dim() != 2:
        raise ValueError(f"w must be 2-D [N, K], got shape {tuple(w.shape)}")
    check_bits(bits)
    check_rounding(rounding)
    check_seed(seed)
    qmax = _check_qmax(bits, qmax)
    n, k = w.shape
    g = check_group_size(k, group_size)
    if bits == 4 and k % 2:
        raise ValueError(f"4-bit weights need an even K to pack two per byte, got K={k}")
    if not symmetric:
        if bits != 4 or qmax != QMAX[4]:
            raise ValueError("symmetric=False is for int4 weights with the full code range (no qmax)")
        q, scale, zero = _quantize_asymmetric(w.reshape(-1, g), rounding, seed)
        return QuantizedWeight(pack_int4(q.reshape(n, k)), scale.reshape(n, k // g), bits, group_size,
                               torch.Size((n, k)), zero.reshape(n, k // g))
    q, scale = _quantize_rows(w.reshape(-1, g), qmax, rounding, seed)
    q, scale = q.reshape(n, k), scale.reshape(n, k // g)
    qweight = pack_int4(q) if bits == 4 else q
    return QuantizedWeight(qweight, scale, bits, group_size, torch.Size((n, k)))


def _quantize_asymmetric(rows: torch.Tensor, rounding: str, seed: int):
    """Asymmetric int4 of each row of ``rows`` [R, g]: ``(q int8 [R, g], scale fp32 [R, 1], zero
    int8 [R, 1])`` with ``w ≈ (q - zero)·scale``, q and zero in [-8, 7]."""
    rows = rows.float()
    scale, zero = group_params(rows, QMAX[4], symmetric=False)
    noise = 0.5 if rounding == "nearest" else cpu_noise("uniform", seed, rows.numel()).to(rows.device).reshape(rows.shape)
    q = (rows / scale).add_(noise).floor_().add_(zero).clamp_(-8, 7)
    return q.to(torch.int8), scale, zero.to(torch.int8)


def dequantize_weight(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Return the float [N, K] weight (``dtype``, default fp32) that ``qw`` represents.

    Raises ValueError if ``qw.bits`` is not 4 or 8.
    """
    check_bits(qw.bits)
    return dequantize_packed(qw.qweight, qw.scale, qw.bits, dtype, qw.zero)


def dequantize_packed(qweight: torch.Tensor, scale: torch.Tensor, bits: int, dtype: torch.dtype = torch.float32,
                      zero: torch.Tensor | None = None) -> torch.Tensor:
    """The float [N, K] weight (``dtype``) of stored codes: ``qweight`` int8 [N, K] (``bits`` 8) or
    packed int4 uint8 [N, K / 2] (``bits`` 4), with ``scale`` [N, groups] and int4 ``zero`` points."""
    q = unpack_int4(qweight) if bits == 4 else qweight
    return dequantize_ref(q, scale, zero).to(dtype)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack int4 values ``q`` (int8 [..., K], each in [-8, 7], K even) into uint8 [..., K // 2].

    Low nibble = even column, stored as ``q + 8``. Raises TypeError if ``q`` is not int8, ValueError
    if K is odd. Values outside [-8, 7] are not checked (they would corrupt the neighbour nibble).
    """
    if q.dtype != torch.int8:
        raise TypeError(f"pack_int4 expects int8 values, got {q.dtype}")
    if q.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even last dim, got {q.shape[-1]}")
    biased = (q.to(torch.int16) + 8).to(torch.uint8)
    return biased[..., 0::2] | (biased[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Unpack uint8 [..., K // 2] nibbles into int8 [..., K] values in [-8, 7] (inverse of pack_int4).

    Raises TypeError if ``packed`` is not uint8.
    """
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_int4 expects uint8 packed data, got {packed.dtype}")
    low = (packed & 0xF).to(torch.int8) - 8
    high = (packed >> 4).to(torch.int8) - 8
    return torch.stack((low, high), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
