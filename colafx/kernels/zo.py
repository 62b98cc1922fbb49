"""Zeroth-order (MeZO / QuZO) perturbation and update, in place, with ``u`` never stored.

Float weights (MeZO)
--------------------
``zo_perturb_(w, seed, scale)``: ``w += scale · u``, ``u ~ N(0, 1)`` regenerated from
``(seed, element index)``. +ε, −2ε, +ε restores an fp32 weight up to rounding (a few ulp).
``zo_update_(w, seed, lr, g, wd)``: ``w ← w − lr · (g · u + wd · w)`` with the same ``u``.

Integer weights (QuZO on the integer grid)
------------------------------------------
Weights are int8 [N, K] or packed int4 uint8 [N, K // 2] (layout of
:mod:`colafx.kernels.quant`) with fp32 scales [N, G] (per channel: G = 1; per group:
group length K / G). For element ``i`` with scale ``s``:

* perturbation ``d = clamp(floor(ε·u/s + U₁), −H, H)`` where ``U₁ ~ U[0, 1)`` comes from the
  rounding stream ``rounding_seed`` (default ``derive_seed(seed, 1)``), independent of the u
  stream ``seed``. ``d`` depends only on (seed, rounding_seed, ε, s, i), so every call with the
  same arguments produces the same ``d``; ``zo_perturb_int_`` adds ``sign · d``.
* update ``Δ = floor(lr·(g·u/s + wd·q) + U₂)``, ``q ← clamp(q − Δ, −(qmax − H), qmax − H)``.
  ``U₂`` is a second rounding stream (``derive_seed(rounding_seed, 2)``): u₂ is an independent
  stochastic rounding of the same Gaussian u, as in the QuZO paper. ``same_rounding=True`` uses
  ``U₁`` instead (the authors' released code re-uses the perturbation's rounding draw).

**Head-room invariant (guarantees a bit-exact +1, −2, +1 restore).** Integer weights are kept
in ``±(qmax − H)`` with ``H = HEADROOM[bits]`` (8 for int8, 1 for int4): quantize them with
``quantize_weight(w, bits, qmax=ZO_QMAX[bits])`` (119 / 6), and the update clamps to that range.
Since ``|d| ≤ H``, ``q + d``, ``q − d`` stay inside the storage range (int8 [-128, 127], int4
[-8, 7]), so no step saturates and ``q + d − 2d + d = q`` exactly. ``check=True`` validates the
invariant first (ValueError if a weight lies outside ``±(qmax − H)``); without it a violating
weight saturates at the storage limit instead of wrapping around, and may not restore exactly.
Clamping ``d`` to ±H biases the perturbation only where ``|ε·u/s| > H`` (rare for ε ~ 1e-3).

Random streams: Triton kernels use Philox ``tl.randn(seed, i)`` / ``tl.rand(seed', i)``; the CPU
path uses :func:`colafx.kernels.quant.cpu_range` (numpy PCG64DXSM, which jumps to any element; u on N(0,1)'s 2¹⁶ quantiles).
They differ, each is deterministic.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import triton
import triton.language as tl

from . import cpu_ext
from .quant import (
    CPU_CHUNK,
    QMAX,
    _normal_table,
    check_bits,
    check_float,
    check_seed,
    cpu_bits,
    cpu_noise,
    cpu_range,
    derive_seed,
    pack_int4,
    philox_noise,
    unpack_int4,
    use_triton,
)

__all__ = [
    "zo_perturb_",
    "zo_perturb_int_",
    "zo_update_",
    "zo_perturb_ref",
    "zo_perturb_int_ref",
    "zo_update_ref",
    "zo_update_int_ref",
    "normal_noise",
    "triton_normal_noise",
    "HEADROOM",
    "ZO_QMAX",
]

HEADROOM = {8: 8, 4: 1}
"""Largest |perturbation| in integer steps; int weights must stay within ±(QMAX - HEADROOM)."""

ZO_QMAX = {bits: QMAX[bits] - HEADROOM[bits] for bits in QMAX}
"""qmax to quantize ZO-trained weights with: 119 (int8), 6 (int4)."""


_BLOCK = 1024
_SIGNS = (-2, -1, 1, 2)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _check_float_weight(weight: torch.Tensor) -> None:
    """Raise TypeError unless float, ValueError unless contiguous (in-place on the flat view)."""
    check_float(weight, "weight")
    if not weight.is_contiguous():
        raise ValueError("weight must be contiguous")


def _check_int_weight(qweight, w_scale, bits) -> int:
    """Validate an integer weight and its scale; return K. Raises TypeError / ValueError."""
    check_bits(bits)
    want = torch.int8 if bits == 8 else torch.uint8
    if not isinstance(qweight, torch.Tensor) or qweight.dtype != want:
        got = qweight.dtype if isinstance(qweight, torch.Tensor) else type(qweight).__name__
        raise TypeError(f"{bits}-bit qweight must be {want}, got {got}")
    if qweight.dim() != 2 or not qweight.is_contiguous():
        raise ValueError(f"qweight must be a contiguous 2-D tensor, got shape {tuple(qweight.shape)}")
    k = qweight.shape[1] * (2 if bits == 4 else 1)
    if not isinstance(w_scale, torch.Tensor) or w_scale.dtype != torch.float32:
        raise TypeError("w_scale must be a float32 tensor")
    n = qweight.shape[0]
    if w_scale.dim() != 2 or w_scale.shape[0] != n or w_scale.shape[1] == 0 or k % w_scale.shape[1]:
        raise ValueError(f"w_scale must be [N, G] with N={n} and G dividing K={k}, got {tuple(w_scale.shape)}")
    if w_scale.device != qweight.device:
        raise ValueError("w_scale and qweight are on different devices")
    return k


def _check_number(value, name: str) -> float:
    """Return ``value`` as float; raise TypeError unless it is a real number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    return float(value)


def _int_values(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """The integer values of ``qweight`` as int8 [N, K] (int4 unpacked)."""
    return unpack_int4(qweight) if bits == 4 else qweight


def _check_headroom(qweight: torch.Tensor, bits: int) -> None:
    """Raise ValueError if some weight lies outside ±(qmax − H) (restore would not be exact)."""
    limit = ZO_QMAX[bits]
    worst = int(_int_values(qweight, bits).abs().max()) if qweight.numel() else 0
    if worst > limit:
        raise ValueError(
            f"{bits}-bit weight magnitude {worst} exceeds qmax - headroom = {limit}; quantize with "
            f"qmax=ZO_QMAX[{bits}] so that perturb/restore is bit-exact"
        )


# --------------------------------------------------------------------------------------------
# Random streams
# --------------------------------------------------------------------------------------------


def normal_noise(seed: int, numel: int) -> torch.Tensor:
    """Return the CPU path's N(0,1) stream for ``seed`` (1-D fp32, ``numel`` elements).

    Raises TypeError / ValueError for a bad seed.
    """
    return cpu_noise("normal", seed, numel)


def triton_normal_noise(seed: int, numel: int, device="cpu") -> torch.Tensor:
    """Return the Triton Philox N(0,1) stream ``tl.randn(seed, i)``, i < numel (1-D fp32): the u of
    the Triton ZO kernels. On a CPU device this needs ``TRITON_INTERPRET=1``.

    Raises TypeError / ValueError for a bad seed.
    """
    return philox_noise("normal", seed, numel, device)


# --------------------------------------------------------------------------------------------
# References (explicit noise in, result out; no in-place)
# --------------------------------------------------------------------------------------------


def _element_scales(w_scale: torch.Tensor, k: int) -> torch.Tensor:
    """Expand scales [N, G] to one scale per element, [N, K] fp32."""
    return w_scale.repeat_interleave(k // w_scale.shape[1], dim=1)


def zo_perturb_ref(weight: torch.Tensor, u: torch.Tensor, scale: float) -> torch.Tensor:
    """Reference float perturbation: ``(weight.float() + scale · u).to(weight.dtype)``."""
    return (weight.float() + scale * u.reshape(weight.shape).float()).to(weight.dtype)


def zo_update_ref(weight, u, lr, grad_scalar, weight_decay=0.0):
    """Reference float update: ``w − lr · (g · u + wd · w)`` computed in fp32, in weight's dtype."""
    w = weight.float()
    step = grad_scalar * u.reshape(weight.shape).float() + weight_decay * w
    return (w - lr * step).to(weight.dtype)


def _perturbation_steps(u, noise, w_scale, eps, bits, shape):
    """d = clamp(floor(ε·u/s + U), −H, H) as int32 [N, K]."""
    s = _element_scales(w_scale.float(), shape[1])
    v = eps * u.reshape(shape).float() / s
    head = HEADROOM[bits]
    return torch.floor(v + noise.reshape(shape).float()).clamp_(-head, head).to(torch.int32)


def _store_int(values: torch.Tensor, bits: int, low: int, high: int) -> torch.Tensor:
    """Clamp int32 values to [low, high] and store as int8 or packed int4."""
    q = values.clamp(low, high).to(torch.int8)
    if bits == 8:
        return q
    biased = (q.to(torch.int16) + 8).to(torch.uint8)
    return biased[:, 0::2] | (biased[:, 1::2] << 4)


def zo_perturb_int_ref(qweight, w_scale, u, noise, eps, sign, bits):
    """Reference integer perturbation: return ``q + sign · d`` (int8 or packed int4).

    ``u`` and ``noise`` (U[0,1)) hold one value per element, row-major over [N, K].
    Saturates at the storage range (never reached when the head-room invariant holds).
    """
    q = _int_values(qweight, bits).to(torch.int32)
    d = _perturbation_steps(u, noise, w_scale, eps, bits, q.shape)
    return _store_int(q + sign * d, bits, -QMAX[bits] - 1, QMAX[bits])


def zo_update_int_ref(qweight, w_scale, u, noise, lr, grad_scalar, weight_decay, bits):
    """Reference integer update: ``clamp(q − floor(lr·(g·u/s + wd·q) + U), ±(qmax − H))``."""
    q = _int_values(qweight, bits).to(torch.int32)
    s = _element_scales(w_scale.float(), q.shape[1])
    step = lr * (grad_scalar * u.reshape(q.shape).float() / s + weight_decay * q.float())
    delta = torch.floor(step + noise.reshape(q.shape).float()).to(torch.int32)
    return _store_int(q - delta, bits, -ZO_QMAX[bits], ZO_QMAX[bits])


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _zo_float_kernel(w_ptr, numel, seed, scale, decay, BLOCK: tl.constexpr):
    """w ← w · (1 − decay) + scale · randn(seed, i), fp32 math, stored in w's dtype."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    w = tl.load(w_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    u = tl.randn(seed, offsets)
    tl.store(w_ptr + offsets, (w - decay * w + scale * u).to(w_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _element_scale(s_ptr, e, K, GROUPS, GROUP_LEN, mask):
    """Scale of flat element e of an [N, K] weight with scales [N, GROUPS]."""
    return tl.load(s_ptr + (e // K) * GROUPS + (e % K) // GROUP_LEN, mask=mask, other=1.0)


@triton.jit
def _int_step(q, e, mask, s_ptr, K, GROUPS, GROUP_LEN, seed, rseed, a, b, sign, low, high,
              UPDATE: tl.constexpr, HEAD: tl.constexpr):
    """New integer value of element e (int32 in, int32 out).

    perturb: q + sign · clamp(floor(a·u/s + U), −HEAD, HEAD)       (a = ε)
    update:  clamp(q − floor(a·u/s + b·q + U), low, high)          (a = lr·g, b = lr·wd)
    """
    u = tl.randn(seed, e)
    s = _element_scale(s_ptr, e, K, GROUPS, GROUP_LEN, mask)
    r = tl.rand(rseed, e)
    if UPDATE:
        delta = tl.floor(a * u / s + b * q.to(tl.float32) + r).to(tl.int32)
        out = q - delta
    else:
        d = tl.floor(a * u / s + r)
        d = tl.minimum(tl.maximum(d, -HEAD), HEAD).to(tl.int32)
        out = q + sign * d
    return tl.minimum(tl.maximum(out, low), high)


@triton.jit
def _zo_int8_kernel(q_ptr, s_ptr, numel, K, GROUPS, GROUP_LEN, seed, rseed, a, b, sign, low, high,
                    UPDATE: tl.constexpr, HEAD: tl.constexpr, BLOCK: tl.constexpr):
    """In-place perturb / update of an int8 [N, K] weight."""
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = e < numel
    q = tl.load(q_ptr + e, mask=mask, other=0).to(tl.int32)
    q = _int_step(q, e, mask, s_ptr, K, GROUPS, GROUP_LEN, seed, rseed, a, b, sign, low, high,
                  UPDATE, HEAD)
    tl.store(q_ptr + e, q.to(tl.int8), mask=mask)


@triton.jit
def _zo_int4_kernel(p_ptr, s_ptr, n_bytes, K, GROUPS, GROUP_LEN, seed, rseed, a, b, sign, low, high,
                    UPDATE: tl.constexpr, HEAD: tl.constexpr, BLOCK: tl.constexpr):
    """In-place perturb / update of a packed int4 weight: byte j holds elements 2j (low), 2j+1."""
    j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = j < n_bytes
    packed = tl.load(p_ptr + j, mask=mask, other=0x88).to(tl.int32)
    low_q = _int_step((packed & 0xF) - 8, 2 * j, mask, s_ptr, K, GROUPS, GROUP_LEN, seed, rseed,
                      a, b, sign, low, high, UPDATE, HEAD)
    high_q = _int_step((packed >> 4) - 8, 2 * j + 1, mask, s_ptr, K, GROUPS, GROUP_LEN, seed, rseed,
                       a, b, sign, low, high, UPDATE, HEAD)
    tl.store(p_ptr + j, ((low_q + 8) | ((high_q + 8) << 4)).to(tl.uint8), mask=mask)


def _launch_float(weight, seed, scale, decay):
    numel = weight.numel()
    if numel:
        _zo_float_kernel[(triton.cdiv(numel, _BLOCK),)](weight, numel, seed, scale, decay, BLOCK=_BLOCK)


def _launch_int(qweight, w_scale, bits, seed, rseed, a, b, sign, low, high, update):
    numel = qweight.numel()
    if not numel:
        return
    k = qweight.shape[1] * (2 if bits == 4 else 1)
    groups = w_scale.shape[1]
    kernel = _zo_int4_kernel if bits == 4 else _zo_int8_kernel
    kernel[(triton.cdiv(numel, _BLOCK),)](
        qweight, w_scale.contiguous(), numel, k, groups, k // groups, seed, rseed, float(a), float(b),
        sign, low, high, UPDATE=update, HEAD=HEADROOM[bits], BLOCK=_BLOCK,
    )


# --------------------------------------------------------------------------------------------
# CPU path (chunked: the noise is generated CPU_CHUNK elements at a time)
# --------------------------------------------------------------------------------------------


def _cpu_float(weight, seed, scale, decay):
    """w ← w − decay·w + scale·u on the CPU, chunk by chunk, in place (fp32 math, bit-identical to
    :func:`zo_perturb_ref` / :func:`zo_update_ref`: the same IEEE operations in the same order)."""
    flat = weight.view(-1)
    for start in range(0, flat.numel(), CPU_CHUNK):
        part = flat[start:start + CPU_CHUNK]
        u = cpu_range("normal", seed, start, start + part.numel())
        w = part if part.dtype == torch.float32 else part.float()
        if decay:
            w.sub_(w * decay)
        w.add_(u.mul_(scale))
        if w is not part:
            part.copy_(w)


def _perturb_rows(block, scales, u, noise, eps, sign, bits):
    """Rows of ``zo_perturb_int_ref`` with in-place fp32 temporaries (bit-identical to it)."""
    q = _int_values(block, bits)
    r, k = q.shape
    g = scales.shape[1]
    v = u.view(r, g, k // g).mul_(eps).div_(scales.view(r, g, 1))
    d = v.add_(noise.view(r, g, k // g)).floor_().clamp_(-HEADROOM[bits], HEADROOM[bits]).view(r, k)
    if sign != 1:
        d.mul_(sign)
    return _store_rows(d.add_(q), bits, -QMAX[bits] - 1, QMAX[bits])


def _update_rows(block, scales, u, noise, lr, grad_scalar, weight_decay, bits):
    """Rows of ``zo_update_int_ref`` with in-place fp32 temporaries (bit-identical to it)."""
    q = _int_values(block, bits)
    r, k = q.shape
    g = scales.shape[1]
    v = u.view(r, g, k // g).mul_(grad_scalar).div_(scales.view(r, g, 1)).view(r, k)
    if weight_decay:
        v.add_(q.float().mul_(weight_decay))
    delta = v.mul_(lr).add_(noise.view(r, k)).floor_()
    return _store_rows(delta.neg_().add_(q), bits, -ZO_QMAX[bits], ZO_QMAX[bits])


def _store_rows(values: torch.Tensor, bits: int, low: int, high: int) -> torch.Tensor:
    """Clamp float integer values [r, K] to [low, high] (in place) and store as int8 or packed int4."""
    q = values.clamp_(low, high).to(torch.int8)
    return q if bits == 8 else pack_int4(q)


def _cpu_int(qweight, w_scale, bits, seed, rseed, fn, fused: dict):
    """Apply ``fn(q_rows int8 [r, K], scale_rows, u, noise) -> stored rows`` on row chunks in place,
    or the same step in one C++ pass per chunk (:func:`colafx.kernels.cpu_ext.zo_int_rows` with the
    arguments ``fused``) where it is built and the weight is contiguous."""
    n = qweight.shape[0]
    k = qweight.shape[1] * (2 if bits == 4 else 1)
    if n == 0 or k == 0:
        return
    rows = max(1, CPU_CHUNK // k)
    scales = w_scale.float().contiguous()
    table = torch.from_numpy(_normal_table())
    use_ext = qweight.is_contiguous()
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        lo, hi = r0 * k, r1 * k
        block = qweight[r0:r1]
        if use_ext:
            normal = torch.from_numpy(cpu_bits("normal", seed, lo, hi).view(np.int16))
            uniform = torch.from_numpy(cpu_bits("uniform", rseed, lo, hi).view(np.int16))
            if cpu_ext.zo_int_rows(block, scales[r0:r1], normal, uniform, table, bits, **fused):
                continue
            use_ext = False
        block.copy_(fn(block, w_scale[r0:r1], cpu_range("normal", seed, lo, hi), cpu_range("uniform", rseed, lo, hi)))


# --------------------------------------------------------------------------------------------
# Custom ops
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("colafx::zo_perturb_", mutates_args=("weight",))
def _zo_perturb_op(weight: torch.Tensor, seed: int, scale: float) -> None:
    if use_triton(weight):
        _launch_float(weight, seed, scale, 0.0)
    else:
        _cpu_float(weight, seed, scale, 0.0)


@torch.library.custom_op("colafx::zo_update_", mutates_args=("weight",))
def _zo_update_op(weight: torch.Tensor, seed: int, lr: float, grad_scalar: float,
                  weight_decay: float) -> None:
    if use_triton(weight):
        _launch_float(weight, seed, -lr * grad_scalar, lr * weight_decay)
    else:
        _cpu_float(weight, seed, -lr * grad_scalar, lr * weight_decay)


@torch.library.custom_op("colafx::zo_perturb_int_", mutates_args=("qweight",))
def _zo_perturb_int_op(qweight: torch.Tensor, w_scale: torch.Tensor, seed: int, eps: float,
                       sign: int, bits: int, rounding_seed: int) -> None:
    low, high = -QMAX[bits] - 1, QMAX[bits]
    if use_triton(qweight):
        _launch_int(qweight, w_scale, bits, seed, rounding_seed, eps, 0.0, sign, low, high, False)
        return

    def step(block, scales, u, noise):
        return _perturb_rows(block, scales, u, noise, eps, sign, bits)

    fused = dict(update=False, a=eps, lr=0.0, weight_decay=0.0, sign=sign, head=HEADROOM[bits], low=low, high=high)
    _cpu_int(qweight, w_scale, bits, seed, rounding_seed, step, fused)


@torch.library.custom_op("colafx::zo_update_int_", mutates_args=("qweight",))
def _zo_update_int_op(qweight: torch.Tensor, w_scale: torch.Tensor, seed: int, lr: float,
                      grad_scalar: float, weight_decay: float, bits: int, rounding_seed: int) -> None:
    limit = ZO_QMAX[bits]
    if use_triton(qweight):
        _launch_int(qweight, w_scale, bits, seed, rounding_seed, lr * grad_scalar, lr * weight_decay,
                    0, -limit, limit, True)
        return

    def step(block, scales, u, noise):
        return _update_rows(block, scales, u, noise, lr, grad_scalar, weight_decay, bits)

    fused = dict(update=True, a=grad_scalar, lr=lr, weight_decay=weight_decay, sign=0, head=0, low=-limit, high=limit)
    _cpu_int(qweight, w_scale, bits, seed, rounding_seed, step, fused)


for _op in (_zo_perturb_op, _zo_update_op, _zo_perturb_int_op, _zo_update_int_op):
    _op.register_fake(lambda *args, **kwargs: None)


# --------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------


def _rounding_seed(seed: int, rounding_seed: Optional[int]) -> int:
    """The perturbation's rounding stream: ``rounding_seed`` or ``derive_seed(seed, 1)``."""
    return derive_seed(seed, 1) if rounding_seed is None else check_seed(rounding_seed, "rounding_seed")


def zo_perturb_(weight: torch.Tensor, seed: int, scale: float) -> None:
    """In place: ``weight += scale · u``, u ~ N(0,1) regenerated from (seed, element index).

    Same seed → same u on every call (per device kind). fp32 math, stored in weight's dtype
    (bf16 / fp16 weights do not restore exactly). Custom op ``colafx::zo_perturb_``.
    Raises TypeError for a non-float weight or non-numeric scale, ValueError for a
    non-contiguous weight or a bad seed.
    """
    _check_float_weight(weight)
    torch.ops.colafx.zo_perturb_(weight, check_seed(seed), _check_number(scale, "scale"))


def zo_perturb_int_(qweight: torch.Tensor, w_scale: torch.Tensor, seed: int, eps: float, sign: int,
                    bits: int, rounding_seed: Optional[int] = None, *, check: bool = False) -> None:
    """In place on the integer grid: ``q += sign · d``, ``d = clamp(SR(eps·u/scale), ±H)``.

    ``qweight`` int8 [N, K] (bits 8) or packed uint8 [N, K // 2] (bits 4), ``w_scale`` fp32
    [N, G]. ``sign`` ∈ {+1, −1, +2, −2}; +1, −2, +1 restores bit-exactly under the head-room
    invariant (module docstring). ``rounding_seed`` selects the rounding stream (default derived
    from ``seed``). ``check=True`` raises ValueError if a weight breaks the invariant.
    Custom op ``colafx::zo_perturb_int_``. Raises TypeError for wrong dtypes, ValueError for bad
    shapes, bits, sign, seeds.
    """
    _check_int_weight(qweight, w_scale, bits)
    if isinstance(sign, bool) or sign not in _SIGNS:
        raise ValueError(f"sign must be one of {_SIGNS}, got {sign!r}")
    if check:
        _check_headroom(qweight, bits)
    torch.ops.colafx.zo_perturb_int_(qweight, w_scale, check_seed(seed), _check_number(eps, "eps"),
                                     int(sign), bits, _rounding_seed(seed, rounding_seed))


def zo_update_(weight: torch.Tensor, seed: int, lr: float, grad_scalar: float,
               weight_decay: float = 0.0, *, w_scale: Optional[torch.Tensor] = None,
               bits: Optional[int] = None, rounding_seed: Optional[int] = None,
               same_rounding: bool = False) -> None:
    """In place ZO step ``θ ← θ − lr·(g·u + wd·θ)`` with u regenerated from ``seed``.

    Float ``weight``: exact formula in fp32 math. Integer ``weight`` (int8 / packed int4, needs
    ``w_scale`` and ``bits``): the step is stochastically rounded on the integer grid,
    ``q ← clamp(q − SR(lr·(g·u/s + wd·q)), ±(qmax − H))``, with its own rounding stream derived
    from ``rounding_seed`` (default derived from ``seed``), or the perturbation's stream when
    ``same_rounding=True``. Custom ops ``colafx::zo_update_`` / ``colafx::zo_update_int_``.
    Raises TypeError for wrong dtypes or missing ``w_scale``/``bits`` on an integer weight,
    ValueError for bad shapes, bits or seeds.
    """
    check_seed(seed)
    lr = _check_number(lr, "lr")
    grad_scalar = _check_number(grad_scalar, "grad_scalar")
    weight_decay = _check_number(weight_decay, "weight_decay")
    if isinstance(weight, torch.Tensor) and weight.is_floating_point():
        _check_float_weight(weight)
        torch.ops.colafx.zo_update_(weight, seed, lr, grad_scalar, weight_decay)
        return
    if w_scale is None or bits is None:
        raise TypeError("an integer weight needs w_scale and bits")
    _check_int_weight(weight, w_scale, bits)
    perturb_stream = _rounding_seed(seed, rounding_seed)
    stream = perturb_stream if same_rounding else derive_seed(perturb_stream, 2)
    torch.ops.colafx.zo_update_int_(weight, w_scale, seed, lr, grad_scalar, weight_decay, bits, stream)
