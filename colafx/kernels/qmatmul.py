"""Quantized linear layers with fused dequantization: W8A8, W8A16, W4A8, W4A16 (+ optional bias).

``out[m, n] = sx[m] · Σ_g sw[n, g] · Σ_{k in g} qx[m, k] · qw[n, k] + bias[n]``

* Weights come from :func:`colafx.kernels.quant.quantize_weight`: int8 [N, K] or packed int4
  uint8 [N, K // 2] with an fp32 scale [N, 1] (per channel) or [N, K // group_size] (per group).
* ``act_bits=8``: x is quantized per token (symmetric absmax int8, nearest) inside the op and the
  products accumulate exactly in int32. ``act_bits=16``: x stays float (weight-only quantization),
  the dequantized weight is multiplied in x's dtype with fp32 accumulation.
* Output dtype = x's dtype.

Dispatch
--------
CUDA: Triton kernels (int8 ``tl.dot`` with int32 accumulation, int4 nibbles unpacked in the
kernel, scales / bias in the epilogue; per-group W·A8 flushes the int32 accumulator into fp32 at
each group boundary). Triton needs a K-tile that divides the group for per-group W·A8 (a power of
two ≥ 32 dividing group_size); other group sizes fall back to the PyTorch reference.

CPU (eager calls that need no autograd skip the custom op's dispatch; the ops run the same code):
activations are quantized per token with :func:`colafx.kernels.quant.quantize_tokens` (bit-identical
to the reference, few torch ops) and multiplied by one of five backends (:func:`set_cpu_int8_backend`):

* ``"onednn"`` (exact): oneDNN's ``qlinear_pointwise`` on a prepacked weight with the per-channel
  weight scale fused. On CPUs with VNNI / AMX the int8 codes go in directly (int32 dot products);
  on AVX2 the activation is split as ``q = lo + hi``, ``lo, hi ∈ [-64, 64]``, so that AVX2's 16-bit
  pair sums (``vpmaddubsw``) cannot saturate: one GEMM on the [2M, K] stacked halves.
* ``"int_mm"`` (exact): ``torch._int_mm`` (fast with VNNI / AMX, a slow loop without).
* ``"fbgemm"`` (exact, CPUs with AVX512-VNNI / AMX only): FBGEMM's u8·s8 GEMM (what
  ``quantize_dynamic`` runs) on the 8-bit per-token codes ``u8 = q + 128``; VNNI's dot products
  accumulate in int32, so nothing saturates. Without VNNI FBGEMM's AVX2 kernel would saturate its
  16-bit pair sums, so it is refused there, and where ``FBGEMM_ENABLE_INSTRUCTIONS`` holds FBGEMM
  to AVX2 / AVX512 / AVX512_256 on a VNNI CPU.
* ``"onednn_a7"`` (fast, not exact W8A8): 7-bit activation codes (qmax 63, as FBGEMM's
  ``reduce_range``), ``u8 = q + 64 ≤ 127``: one GEMM, no saturation on AVX2, ~6 dB lower SQNR.
* ``"fbgemm_a7"``: the same 7-bit per-token codes through FBGEMM's u8·s8 GEMM (2-4x faster than
  oneDNN's on AVX2 at 1-16 tokens).
  The FBGEMM backends run the fused C++ op of :mod:`.cpu_ext` (per-token codes, FBGEMM's GEMM on
  them, per-token rescale and bias in one call; compiled on first use) where it is built, else
  hand FBGEMM the codes of ``quantize_tokens`` as floats with scale 1: the same bits either way.
  Where ``torch._int_mm`` runs, the fused op of :mod:`.cpu_ext` runs it with the same bits. Only weights used twice unchanged are FBGEMM-packed (packing costs 35-105 one-token calls); a
  weight on its first use or changed in place runs ``torch._int_mm`` (``"fbgemm"``) or
  ``"onednn_a7"``.

``"auto"`` (default) picks ``"onednn"`` on CPUs with AMX, ``"fbgemm"`` on CPUs with AVX512-VNNI but
no AMX (there oneDNN 3.12 runs the prepacked int8 matmul in its reference kernel: 300 ms where
FBGEMM takes 0.07 ms, measured on an AMD EPYC with AVX512-VNNI) unless FBGEMM is held to an older
ISA, and ``"fbgemm_a7"`` elsewhere
(``"onednn_a7"``, ``"onednn"`` in builds without FBGEMM). The prepacked weight is cached per weight
tensor and its version. With VNNI / AMX a weight is packed
only on its second unchanged use (the first runs ``torch._int_mm``), and a weight changed in place
(QuZO perturbs weights before every forward) is never kept packed: it runs ``torch._int_mm``.
Int4 W·A8 per channel: the unpacked int8 codes go through the same GEMM (cached packed, so a
static weight is not unpacked per call). Per-group W·A8: one fp32 GEMM of the int8 codes with the
dequantized weight (fp32 instead of int32 accumulation; no loop over groups). W4A16 (fp32 / bf16 /
fp16 x, group length a multiple of 32) below 32 tokens: a C++ kernel (:mod:`.cpu_ext`) that reads
the int4 weight once and dequantizes it in registers (bf16 dot products on AVX512-BF16 CPUs;
elsewhere fp32 FMAs; on AVX-512 CPUs without AVX512-BF16, bf16 x beyond 4 tokens goes to ATen's
kernel). From 32 tokens: the weight dequantized in one C++ pass, to bf16 for oneDNN's bf16 GEMM
(bf16 x on CPUs with AVX512-BF16 / AMX), else to fp32 for the fp32 GEMM. ATen's
``_weight_int4pack_mm_for_cpu`` runs what is left of bf16 x (needs N % 16 == 0 and a group length
divisible by 32, 64, 128 or 256; its repacked weight is kept, and repacked per call once the
weight changes in place). bench/cpu_qmatmul.py on a Zen 5: 1.3-3.4x fp32 at 1-16 tokens, 1.8-2.3x
at 128-512. Other W·A16 (and fp16 x from 32 tokens, in fp32: ATen's fp16 int4 path is a slow
reference): dequantize + F.linear.

Autograd: the ops differentiate with respect to ``x`` (straight-through the activation
quantizer: ``grad_x = grad · dequant(W)``) and ``bias``; quantized weights and scales are buffers
and get no gradient.
"""

from __future__ import annotations

import contextlib
import os
import warnings
import weakref
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import cpu_ext
from .quant import (
    QMAX,
    _quantize_rows_triton,
    check_float,
    check_group_size,
    dequantize_packed,
    dot_mode,
    interpreting,
    quantize_act_int8,
    quantize_ref,
    quantize_tokens,
    token_codes,
    unpack_int4,
    use_triton,
)

__all__ = [
    "int8_linear",
    "int4_linear",
    "qlinear_ref",
    "qlinear_triton",
    "set_cpu_int8_backend",
    "use_cpu_int8_backend",
    "exact_cpu_int8_backend",
    "CPU_INT8_BACKENDS",
    "cpu_int8_backend",
    "int8_gemm_cpu",
]


CPU_INT8_BACKENDS = ("auto", "int_mm", "onednn", "fbgemm", "onednn_a7", "fbgemm_a7")
"""Names :func:`set_cpu_int8_backend` takes."""
A7_QMAX = 63
"""Activation qmax of the 7-bit backends (u8 = q + 64 <= 127 cannot saturate AVX2's pair sums)."""
_A7 = ("onednn_a7", "fbgemm_a7")
_FBGEMM_BACKENDS = ("fbgemm", "fbgemm_a7")
_cpu_backend = os.environ.get("COLAFX_CPU_INT8_BACKEND", "auto")
_resolved_backend: Optional[str] = None


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _check_linear_inputs(x, qweight, w_scale, bias, act_bits, bits, w_zero=None):
    """Validate a quantized-linear call; return (K, number of groups). Raises TypeError/ValueError.
    On decode's hot path (a few µs per call matter there): each shape is read once."""
    check_float(x, "x")
    want = torch.int8 if bits == 8 else torch.uint8
    if not isinstance(qweight, torch.Tensor) or qweight.dtype != want:
        got = qweight.dtype if isinstance(qweight, torch.Tensor) else type(qweight).__name__
        raise TypeError(f"{bits}-bit qweight must be a {want} tensor, got {got}")
    x_shape, w_shape = x.shape, qweight.shape
    if len(w_shape) != 2:
        raise ValueError(f"qweight must be 2-D, got shape {tuple(w_shape)}")
    n, k = w_shape
    if bits == 4:
        k *= 2
    if not x_shape or x_shape[-1] != k:
        raise ValueError(f"x [..., K] must have K={k} for qweight {tuple(w_shape)}, got {tuple(x_shape)}")
    if not isinstance(w_scale, torch.Tensor) or w_scale.dtype != torch.float32:
        raise TypeError("w_scale must be a float32 tensor")
    s_shape = w_scale.shape
    if len(s_shape) != 2 or s_shape[0] != n or s_shape[1] == 0 or k % s_shape[1]:
        raise ValueError(f"w_scale must be [N, G] with N={n} and G dividing K={k}, got {tuple(s_shape)}")
    if bias is not None:
        check_float(bias, "bias")
        if tuple(bias.shape) != (n,):
            raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    if act_bits not in (8, 16):
        raise ValueError(f"act_bits must be 8 or 16, got {act_bits!r}")
    if w_zero is not None:
        if not isinstance(w_zero, torch.Tensor) or w_zero.dtype != torch.int8:
            raise TypeError("w_zero must be an int8 tensor (zero points in [-8, 7])")
        if w_zero.shape != s_shape:
            raise ValueError(f"w_zero must have w_scale's shape {tuple(s_shape)}, got {tuple(w_zero.shape)}")
    if not (x.is_cpu and qweight.is_cpu and w_scale.is_cpu and (bias is None or bias.is_cpu)
            and (w_zero is None or w_zero.is_cpu)):  # else: all on the CPU, no device objects to compare
        device = x.device
        for name, t in (("qweight", qweight), ("w_scale", w_scale), ("bias", bias), ("w_zero", w_zero)):
            if t is not None and t.device != device:
                raise ValueError(f"{name} is on {t.device}, x on {device}")
    return k, s_shape[1]


# --------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------


def qlinear_ref(x, qweight, w_scale, bias=None, act_bits=8, bits=8, act_qmax=127, w_zero=None):
    """Pure-PyTorch reference of the quantized linear (fp64 accumulation of the exact products).

    ``qweight`` is int8 [N, K] (bits 8) or packed uint8 [N, K // 2] (bits 4), ``w_zero`` the int4
    weight's zero points (``w = (q - zero)·scale``) or None. Activations are
    quantized per token with :func:`quantize_ref` semantics when ``act_bits=8``, to codes in
    ``[-act_qmax, act_qmax]`` (63: the CPU's 7-bit backends, see :func:`cpu_act_qmax`). Returns
    x's dtype.
    """
    q = unpack_int4(qweight) if bits == 4 else qweight
    k, groups = q.shape[1], w_scale.shape[1]
    x2 = x.reshape(-1, k)
    if act_bits == 8:
        qx, sx = quantize_act_int8(x2.float()) if act_qmax == QMAX[8] else quantize_ref(x2.float(), act_qmax)
        xs = qx.double() * sx.double()
    else:
        xs = x2.double()
    codes = q.double().reshape(q.shape[0], groups, -1)
    if w_zero is not None:
        codes = codes - w_zero.double()[..., None]
    w = (codes * w_scale.double()[..., None]).reshape(q.shape)
    out = xs @ w.t()
    if bias is not None:
        out = out + bias.double()
    return out.to(x.dtype).reshape(*x.shape[:-1], q.shape[0])


# --------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------


@triton.jit
def _weight_tile(w_ptr, offs_n, k0, N, K, stride_wn, W_INT4: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """int8 tile W[offs_n, k0:k0+BLOCK_K] ([BLOCK_N, BLOCK_K]); int4 nibbles unpacked in-register."""
    row = offs_n[:, None].to(tl.int64) * stride_wn
    if W_INT4:
        offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        mask = (offs_n[:, None] < N) & (offs_b[None, :] < K // 2)
        packed = tl.load(w_ptr + row + offs_b[None, :], mask=mask, other=0x88)
        low = (packed & 0xF).to(tl.int8) - 8
        high = (packed >> 4).to(tl.int8) - 8
        tile = tl.reshape(tl.join(low, high), (BLOCK_N, BLOCK_K))
    else:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
        tile = tl.load(w_ptr + row + offs_k[None, :], mask=mask, other=0)
    return tile


@triton.jit
def _qlinear_kernel(
    x_ptr, xs_ptr, w_ptr, ws_ptr, wz_ptr, b_ptr, out_ptr,
    M, N, K, GROUPS, GROUP_LEN, M_BUCKET, stride_xm, stride_wn, stride_om,
    ACT_INT8: tl.constexpr, W_INT4: tl.constexpr, PER_GROUP: tl.constexpr, HAS_ZERO: tl.constexpr,
    HAS_BIAS: tl.constexpr, DOT_MODE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out = dequant(x) · dequant(W)ᵀ (+ bias). DOT_MODE: 0 native float, 1 exact fp32, 2 tf32."""
    pid = tl.program_id(0)
    n_tiles_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = pid // n_tiles_n, pid % n_tiles_n
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = offs_m < M, offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_int = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :],
                    mask=m_ok[:, None] & (offs_k[None, :] < K), other=0)
        w = _weight_tile(w_ptr, offs_n, k0, N, K, stride_wn, W_INT4, BLOCK_N, BLOCK_K)
        if HAS_ZERO:  # codes minus their group's zero point: in [-15, 15], still int8
            w = w - tl.load(wz_ptr + offs_n[:, None] * GROUPS + offs_k[None, :] // GROUP_LEN,
                            mask=n_ok[:, None] & (offs_k[None, :] < K), other=0)
        if ACT_INT8:
            part = tl.dot(x, tl.trans(w), out_dtype=tl.int32)
            if PER_GROUP:  # BLOCK_K divides GROUP_LEN: the whole tile lies in group k0 // GROUP_LEN
                sw = tl.load(ws_ptr + offs_n * GROUPS + k0 // GROUP_LEN, mask=n_ok, other=0.0)
                acc += part.to(tl.float32) * sw[None, :]
            else:
                acc_int += part
        else:
            wf = w.to(tl.float32)
            if PER_GROUP:
                sw = tl.load(ws_ptr + offs_n[:, None] * GROUPS + offs_k[None, :] // GROUP_LEN,
                             mask=n_ok[:, None] & (offs_k[None, :] < K), other=0.0)
                wf = wf * sw
            if DOT_MODE == 0:
                acc += tl.dot(x, tl.trans(wf.to(x.dtype)))
            elif DOT_MODE == 1:
                acc += tl.dot(x.to(tl.float32), tl.trans(wf), input_precision="ieee")
            else:
                acc += tl.dot(x, tl.trans(wf), input_precision="tf32")
    if not PER_GROUP:
        sw = tl.load(ws_ptr + offs_n * GROUPS, mask=n_ok, other=0.0)
        if ACT_INT8:
            acc = acc_int.to(tl.float32) * sw[None, :]
        else:
            acc = acc * sw[None, :]
    if ACT_INT8:
        acc = acc * tl.load(xs_ptr + offs_m, mask=m_ok, other=0.0)[:, None]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _h100_configs():
    """Tiles for H100: int8 mma wants BLOCK_K ≥ 32 (64..256 for throughput), small M for decode."""
    shapes = [  # BLOCK_M, BLOCK_N, BLOCK_K, stages, warps
        (16, 64, 128, 4, 4), (16, 128, 128, 4, 4), (32, 64, 128, 4, 4), (32, 128, 64, 4, 4),
        (64, 64, 128, 4, 4), (64, 128, 128, 4, 4), (128, 128, 64, 4, 8), (128, 128, 128, 3, 8),
        (128, 256, 64, 3, 8), (256, 128, 64, 3, 8), (64, 256, 64, 4, 8), (128, 64, 64, 4, 4),
        (64, 128, 32, 4, 4), (128, 128, 32, 4, 4),
    ]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_stages=s, num_warps=w)
        for bm, bn, bk, s, w in shapes
    ]


def _prune_configs(configs, named_args, **kwargs):
    """Keep only tiles whose BLOCK_K divides the group (per-group W·A8 flushes per tile)."""
    per_group = kwargs.get("PER_GROUP", named_args.get("PER_GROUP"))
    act_int8 = kwargs.get("ACT_INT8", named_args.get("ACT_INT8"))
    if not (per_group and act_int8):
        return configs
    group = named_args["GROUP_LEN"]
    return [c for c in configs if group % c.kwargs["BLOCK_K"] == 0]


_qlinear_autotuned = triton.autotune(
    _h100_configs(),
    key=["M_BUCKET", "N", "K", "GROUP_LEN", "ACT_INT8", "W_INT4", "PER_GROUP", "HAS_ZERO"],
    prune_configs_by={"early_config_prune": _prune_configs},
)(_qlinear_kernel)


def _interpreter_block_k(per_group_a8: bool, group_len: int) -> Optional[int]:
    """K-tile for interpreter runs: 32, or for per-group W·A8 16/32 if it divides the group (else None)."""
    if not per_group_a8:
        return 32
    for block in (32, 16):
        if group_len % block == 0:
            return block
    return None


def _triton_supported(per_group_a8: bool, group_len: int) -> bool:
    """Return False when per-group W·A8 has no K-tile the kernel may use (then the reference runs)."""
    if not per_group_a8:
        return True
    if interpreting():
        return _interpreter_block_k(True, group_len) is not None
    return any(group_len % c.kwargs["BLOCK_K"] == 0 for c in _h100_configs())


def qlinear_triton(x, qweight, w_scale, bias=None, act_bits=8, bits=8, w_zero=None):
    """Launch the Triton quantized-linear kernel; same arguments / result as :func:`qlinear_ref`.

    CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``. Raises ValueError if the group
    length admits no K-tile for per-group W·A8 (see module docstring).
    """
    k, groups = _check_linear_inputs(x, qweight, w_scale, bias, act_bits, bits, w_zero)
    n, group_len = qweight.shape[0], k // groups
    per_group, act_int8 = groups > 1, act_bits == 8
    if not _triton_supported(per_group and act_int8, group_len):
        raise ValueError(f"no Triton K-tile divides group_size {group_len} for per-group W{bits}A8")
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out.reshape(*x.shape[:-1], n)
    if act_int8:
        xq, xs = _quantize_rows_triton(x2, QMAX[8], False, 0)
        xs = xs.reshape(-1)
    else:
        xq, xs = x2, x2  # xs unused
    w, ws = qweight.contiguous(), w_scale.contiguous()
    b = bias.contiguous() if bias is not None else ws
    wz = w_zero.contiguous() if w_zero is not None else ws
    args = (xq, xs, w, ws, wz, b, out, m, n, k, groups, group_len,
            min(triton.next_power_of_2(m), 4096), xq.stride(0), w.stride(0), out.stride(0))
    flags = dict(ACT_INT8=act_int8, W_INT4=bits == 4, PER_GROUP=per_group, HAS_ZERO=w_zero is not None,
                 HAS_BIAS=bias is not None, DOT_MODE=dot_mode(x))
    if interpreting() or not x.is_cuda:
        blocks = {"BLOCK_M": 32, "BLOCK_N": 64,
                  "BLOCK_K": _interpreter_block_k(per_group and act_int8, group_len)}
        grid = (triton.cdiv(m, 32) * triton.cdiv(n, 64),)
        _qlinear_kernel[grid](*args, **flags, **blocks)
    else:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
        _qlinear_autotuned[grid](*args, **flags)
    return out.reshape(*x.shape[:-1], n)




# --------------------------------------------------------------------------------------------
# CPU int8 GEMM backends
# --------------------------------------------------------------------------------------------


def _onednn_available() -> bool:
    """True when this torch build has oneDNN's quantized linear ops (x86 CPU builds do)."""
    try:
        torch.ops.onednn.qlinear_prepack
        torch.ops.onednn.qlinear_pointwise
    except (AttributeError, RuntimeError):
        return False
    return torch.backends.mkldnn.is_available()


def _fbgemm_available() -> bool:
    """True when this torch build has FBGEMM's quantized linear with fp32 output (x86 builds do)."""
    try:
        torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32
    except (AttributeError, RuntimeError):
        return False
    return "fbgemm" in torch.backends.quantized.supported_engines


def set_cpu_int8_backend(name: str) -> None:
    """Choose the CPU int8 GEMM: "auto" (by CPU features, see the module docstring), "int_mm",
    "onednn", "fbgemm" (exact), "onednn_a7" or "fbgemm_a7" (7-bit activations, not exact W8A8).

    Raises ValueError for an unknown name, a oneDNN backend on a build without oneDNN, an FBGEMM
    backend without FBGEMM ("fbgemm_a7" also needs oneDNN for weights changed in place) or
    "fbgemm" where FBGEMM runs no VNNI dot products (a CPU without AVX512-VNNI / AMX, or
    ``FBGEMM_ENABLE_INSTRUCTIONS`` set to AVX2 / AVX512 / AVX512_256: that kernel's int16 pair
    sums saturate on 8-bit codes).
    Also settable with ``COLAFX_CPU_INT8_BACKEND``.
    """
    global _cpu_backend, _resolved_backend
    _check_backend(name, "backend")
    _cpu_backend, _resolved_backend = name, None


def _check_backend(name: str, what: str) -> None:
    """Raise ValueError (naming ``what``) where :func:`set_cpu_int8_backend` says it does."""
    if name not in CPU_INT8_BACKENDS:
        raise ValueError(f"{what} must be one of {CPU_INT8_BACKENDS}, got {name!r}")
    if name in ("onednn", *_A7) and not _onednn_available():
        raise ValueError("this torch build has no oneDNN quantized linear ops")
    if name in _FBGEMM_BACKENDS and not _fbgemm_available():
        raise ValueError("this torch build has no FBGEMM quantized linear ops")
    if name == "fbgemm" and not _fbgemm_has_vnni():
        raise ValueError(f"{what} 'fbgemm' is exact only where FBGEMM runs AVX512-VNNI / AMX dot products "
                         f"(this CPU, FBGEMM_ENABLE_INSTRUCTIONS={os.environ.get(_FBGEMM_ISA_ENV)!r}); "
                         "use 'fbgemm_a7' here")


@contextlib.contextmanager
def use_cpu_int8_backend(name: str):
    """Context manager: run the block with the CPU int8 backend ``name`` (yields it resolved),
    then restore the previous choice. Raises ValueError as :func:`set_cpu_int8_backend`."""
    global _cpu_backend, _resolved_backend
    old = _cpu_backend
    set_cpu_int8_backend(name)
    try:
        yield cpu_int8_backend()
    finally:
        _cpu_backend, _resolved_backend = old, None


def cpu_int8_backend() -> str:
    """Return the CPU int8 GEMM backend in use ("int_mm", "onednn", "fbgemm", "onednn_a7" or
    "fbgemm_a7"), resolving "auto". Raises ValueError for a ``COLAFX_CPU_INT8_BACKEND`` that
    :func:`set_cpu_int8_backend` would refuse."""
    global _resolved_backend
    if _resolved_backend is None:
        if _cpu_backend != "auto":  # set_cpu_int8_backend checked it; COLAFX_CPU_INT8_BACKEND is checked here
            _check_backend(_cpu_backend, "COLAFX_CPU_INT8_BACKEND")
            _resolved_backend = _cpu_backend
        elif not _onednn_available():
            _resolved_backend = "int_mm"
        elif _has_amx():
            _resolved_backend = "onednn"
        elif _has_int8_dot_instructions() and not _fbgemm_available():
            _resolved_backend = "onednn"
        elif _fbgemm_has_vnni():
            _resolved_backend = "fbgemm"
        else:
            _resolved_backend = "fbgemm_a7" if _fbgemm_available() else "onednn_a7"
    return _resolved_backend


def exact_cpu_int8_backend() -> str:
    """The exact (8-bit activation codes) backend that is fast on this CPU: "int_mm" with
    AVX512-VNNI / AMX or without oneDNN, else "onednn" (its AVX2 split GEMM)."""
    return "onednn" if _onednn_available() and not _has_int8_dot_instructions() else "int_mm"


def cpu_act_qmax() -> int:
    """Largest activation code of the CPU W·A8 path: 63 for the 7-bit backends, else 127."""
    return A7_QMAX if cpu_int8_backend() in _A7 else QMAX[8]


def _has_int8_dot_instructions() -> bool:
    """True when the CPU has AVX512-VNNI or AMX (int8 dot products into int32, no 16-bit
    saturation: oneDNN's s8 GEMM, FBGEMM's and torch._int_mm are exact and fast)."""
    return getattr(torch.cpu, "_is_vnni_supported", lambda: False)() or _has_amx()


_FBGEMM_ISA_ENV = "FBGEMM_ENABLE_INSTRUCTIONS"
_FBGEMM_PRE_VNNI_ISAS = ("AVX2", "AVX512", "AVX512_256")  # values of it that turn VNNI off in FBGEMM


def _fbgemm_has_vnni() -> bool:
    """True when FBGEMM's u8·s8 GEMM runs VNNI dot products here: the CPU has them and
    ``FBGEMM_ENABLE_INSTRUCTIONS`` does not hold FBGEMM to an older ISA, whose int16 pair sums
    saturate on 8-bit codes (the 7-bit backends stay exact there)."""
    forced = os.environ.get(_FBGEMM_ISA_ENV, "").strip().upper()
    return forced not in _FBGEMM_PRE_VNNI_ISAS and _has_int8_dot_instructions()


def _has_amx() -> bool:
    """True when the CPU has AMX tiles (oneDNN's prepacked int8 matmul is fast there)."""
    return getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()


_PACKED: dict = {}  # id(weight) -> (weakref to it, stamp, shape, (oneDNN packed weight, zeros) or None, deps)
_FBGEMM: dict = {}  # id(weight) -> (weakref to it, stamp, shape, FBGEMM packed weight or None, deps)


def _stamp(weight: torch.Tensor, deps: tuple) -> Optional[tuple]:
    """What a kept pack of ``weight`` is valid for: its version counter and, for each of ``deps``
    (the scales / zero points baked into the pack, or None), its data pointer and version; None
    where a tensor has no version counter (inference tensors)."""
    version = _tensor_version(weight)
    if version is None:
        return None
    stamp = [version]
    for dep in deps:
        if dep is None:
            stamp.append(None)
            continue
        dep_version = _tensor_version(dep)
        if dep_version is None:
            return None
        stamp += (dep.data_ptr(), dep_version)
    return tuple(stamp)


def _cached_pack(cache: dict, weight: torch.Tensor, shape, pack, lazy: bool, deps: tuple = ()):
    """``pack()``'s result for ``weight`` ([N, K] = ``shape``), kept in ``cache`` per weight tensor
    and its version counter (a dict keyed by id plus a weak reference: ~10x cheaper per call than
    ``WeakTensorKeyDictionary``; the entry goes when the weight is freed) and per the data and
    version of ``deps`` (the scales / zero points the pack bakes in: a pack is not reused after
    they change or are replaced; the entry holds them, so a replaced one's memory is not reused
    while it is compared with), or None where nothing is kept: inference tensors (no version
    counter), a weight found changed in place since it was seen (QuZO perturbs its weights before
    every forward: a kept copy would never be reused and would double the weight's memory, so it
    is never packed again) and, when ``lazy``, a weight's first use (only a weight used twice
    unchanged is packed: packing costs ~10-100 GEMV calls).
    """
    stamp = _stamp(weight, deps)
    if stamp is None:
        return None
    key = id(weight)
    hit = cache.get(key)
    if hit is None or hit[0]() is not weight:
        packed = None if lazy else pack()
        cache[key] = (weakref.ref(weight, lambda _, k=key: cache.pop(k, None)), stamp, shape, packed, deps)
        return packed
    if hit[1] is None or hit[1][0] != stamp[0] or hit[2] != shape:
        # the weight changed in place (or a stale entry of another shape): never kept again
        cache[key] = (hit[0], None, None, None, ())
        return None
    if hit[1] != stamp:  # only its scales / zero points changed or were replaced: as a first use
        packed = None if lazy else pack()
        cache[key] = (hit[0], stamp, shape, packed, deps)
        return packed
    if hit[3] is None:  # second use, unchanged: pack and keep
        cache[key] = hit = (hit[0], stamp, shape, pack(), deps)
    return hit[3]


def _current_pack(cache: dict, weight: torch.Tensor, deps: tuple = ()):
    """The packed form of ``weight`` in ``cache`` if it is current (``deps`` as for
    :func:`_cached_pack`), else None (the hot path: no packing, no bookkeeping)."""
    hit = cache.get(id(weight))
    if hit is None or hit[3] is None or hit[0]() is not weight:
        return None
    return hit[3] if hit[1] == _stamp(weight, deps) else None


def _tensor_version(t: torch.Tensor) -> Optional[int]:
    """The in-place version counter of ``t``, or None for inference tensors (no counter)."""
    try:
        return t._version
    except RuntimeError:
        return None


def _onednn_weight(codes, shape: torch.Size, cache_key: Optional[torch.Tensor], lazy: bool, deps: tuple = ()):
    """``(packed, zeros)``: the oneDNN-prepacked int8 weight ``codes()`` ([N, K] = ``shape``) and its
    zero points, kept per ``cache_key`` by :func:`_cached_pack` (``codes`` is a callable so that a
    cached int4 weight is not unpacked; ``deps``: the zero points ``codes()`` takes off). Where nothing is kept: ``(None, None)`` when ``lazy`` (CPUs
    where ``torch._int_mm`` is fast: the caller runs it), else a weight packed for this call only
    (with its zero points).
    """
    def pack():
        return torch.ops.onednn.qlinear_prepack(codes(), None), torch.zeros(shape[0], dtype=torch.int64)

    kept = None if cache_key is None else _cached_pack(_PACKED, cache_key, shape, pack, lazy, deps)
    if kept is not None:
        return kept
    return (None, None) if lazy else pack()  # packed for this call only


def _onednn_linear(x: torch.Tensor, zero_point: int, packed: torch.Tensor, w_scale: torch.Tensor, zeros=None):
    """oneDNN ``x · Wᵀ · w_scale[n]`` as fp32 (x int8 with zero point 0, or uint8 with ``zero_point``)."""
    if zeros is None:
        zeros = torch.zeros(w_scale.numel(), dtype=torch.int64)
    return torch.ops.onednn.qlinear_pointwise(
        x, 1.0, zero_point, packed, w_scale, zeros, None, 1.0, 0, torch.float32, "none", [], ""
    )


def _fbgemm_weight(codes, shape: torch.Size, w_scale: torch.Tensor, cache_key: Optional[torch.Tensor],
                   deps: tuple):
    """FBGEMM's packed per-channel int8 weight for ``codes()`` ([N, K] = ``shape``) with scales
    ``w_scale`` [N, 1], or None: packed only on the second unchanged use of ``cache_key`` and of
    ``deps`` (what the pack bakes in: ``w_scale`` and the zero points ``codes()`` takes off), never
    for a weight that changed in place (:func:`_cached_pack`)."""
    def pack():
        old_engine = torch.backends.quantized.engine
        try:
            torch.backends.quantized.engine = "fbgemm"
            with warnings.catch_warnings():  # quantized-tensor constructors are deprecated; FBGEMM's op takes one
                warnings.simplefilter("ignore")
                qw = torch._make_per_channel_quantized_tensor(
                    codes(), w_scale.reshape(-1).double(), torch.zeros(shape[0], dtype=torch.int64), 0)
                return torch.ops.quantized.linear_prepack(qw, None)
        finally:
            torch.backends.quantized.engine = old_engine

    return None if cache_key is None else _cached_pack(_FBGEMM, cache_key, shape, pack, True, deps)


def _fbgemm_linear(x2: torch.Tensor, packed, qmax: int, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``(q(x) · Wᵀ) · w_scale · s (+ bias)`` as fp32 [M, N] through FBGEMM, ``q, s =
    quantize_tokens(x, qmax)``, ``bias`` fp32 [N] contiguous or None: the fused C++ op
    (:mod:`.cpu_ext`) where it is built, else ATen calls with the same bits (FBGEMM gets the codes
    as floats with scale 1 and zero point ``qmax + 1``; handing it ``x / s`` to round would flip
    codes near ties, as its quantizer adds the zero point before rounding)."""
    fused = cpu_ext.w8a8_linear(x2.float().contiguous(), packed, qmax, bias)
    if fused is not None:
        return fused
    # the packet's C++ entry: skips the Python check for fake script objects (~10 us; eager only)
    fbgemm = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32._op
    codes, scale = token_codes(x2, qmax)
    acc = fbgemm(codes, 1.0, qmax + 1, packed).mul_(scale)
    return acc if bias is None else acc.add_(bias)


def _gemm_weight(codes, shape: torch.Size, name: str, cache_key: Optional[torch.Tensor], deps: tuple = ()):
    """``(packed, zeros)``: the oneDNN weight :func:`_scaled_gemm` multiplies by for backend
    ``name`` (kept per ``cache_key`` by :func:`_onednn_weight`), or ``(None, None)`` where it runs
    ``torch._int_mm``: "int_mm", "fbgemm" (a weight not (yet) FBGEMM-packed) and, on VNNI / AMX,
    a weight that is not kept packed."""
    if name in ("int_mm", "fbgemm"):
        return None, None
    return _onednn_weight(codes, shape, cache_key, _has_int8_dot_instructions(), deps)


def _scaled_gemm(qx: torch.Tensor, codes, w_scale: torch.Tensor, name: str, packed, zeros) -> torch.Tensor:
    """``(qx · Wᵀ) · w_scale[n]`` as fp32 [M, N]; qx int8 contiguous, ``codes()`` the int8 weight
    W [N, K] (contiguous), w_scale fp32 [N], ``packed, zeros`` from :func:`_gemm_weight`."""
    if packed is None:  # VNNI / AMX: torch._int_mm is exact and fast without packing
        return torch.mul(torch._int_mm(qx, codes().t()), w_scale)
    if name in _A7:  # u8 = q + 64 <= 127: AVX2's int16 pair sums of u8·s8 cannot saturate
        return _onednn_linear(qx.add(64).view(torch.uint8), 64, packed, w_scale, zeros)
    if _has_int8_dot_instructions():  # s8 activations: VNNI / AMX dot products accumulate in int32
        return _onednn_linear(qx, 0, packed, w_scale, zeros)
    m = qx.shape[0]  # AVX2, exact: q = lo + hi with lo, hi in [-64, 64], one GEMM on [2M, K]
    wide = qx.to(torch.int16)
    low = torch.div(wide, 2, rounding_mode="floor")
    halves = torch.cat((low, wide - low)).add_(64).to(torch.uint8)
    both = _onednn_linear(halves, 64, packed, w_scale, zeros)
    return both[:m] + both[m:]


def int8_gemm_cpu(qx: torch.Tensor, qw: torch.Tensor, backend: Optional[str] = None,
                  cache_key: Optional[torch.Tensor] = None, w_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Return ``qx @ qw.T`` (int8 [M, K] × int8 [N, K]) as fp32 [M, N] on the CPU, times
    ``w_scale`` (fp32 [N], per output channel) when given.

    Exact (int32 accumulation) for "int_mm", "onednn" and "fbgemm" (given codes, it runs
    ``torch._int_mm``); the 7-bit backends are exact for qx in [-64, 63] (their activation codes;
    given codes, both run oneDNN's GEMM here). ``backend``
    defaults to :func:`cpu_int8_backend`.
    ``cache_key`` (a persistent weight tensor) enables caching of the oneDNN prepacked weight.
    Raises TypeError for non-int8 inputs and ValueError for mismatched K, an unknown backend or
    codes outside [-64, 63] for a 7-bit backend.
    """
    if qx.dtype != torch.int8 or qw.dtype != torch.int8:
        raise TypeError(f"int8_gemm_cpu needs int8 inputs, got {qx.dtype} and {qw.dtype}")
    if qx.dim() != 2 or qw.dim() != 2 or qx.shape[1] != qw.shape[1]:
        raise ValueError(f"shapes {tuple(qx.shape)} and {tuple(qw.shape)} do not fit [M,K]x[N,K]")
    name = backend or cpu_int8_backend()
    if name not in CPU_INT8_BACKENDS[1:]:
        raise ValueError(f"backend must be one of {CPU_INT8_BACKENDS[1:]}, got {name!r}")
    if name in _A7 and qx.numel() and not -64 <= int(qx.min()) <= int(qx.max()) <= 63:
        raise ValueError(f"backend {name!r} takes activation codes in [-64, 63]")
    n = qw.shape[0]
    scale = torch.ones(n) if w_scale is None else w_scale.reshape(n).float()
    if qx.shape[0] == 0 or n == 0 or qx.shape[1] == 0:
        return torch.zeros(qx.shape[0], n)
    qw = qw.contiguous()
    packed, zeros = _gemm_weight(lambda: qw, qw.shape, name, cache_key)
    return _scaled_gemm(qx.contiguous(), lambda: qw, scale.contiguous(), name, packed, zeros)


# --------------------------------------------------------------------------------------------
# CPU path
# --------------------------------------------------------------------------------------------


_INT4_GROUPS = (256, 128, 64, 32)  # the group lengths ATen's int4 CPU kernel takes
_INT4PACKED: dict = {}  # id(qweight) -> (weakref, stamp, (N, K, dtype), (ATen int4pack, scales and zeros), deps)


def _aten_int4_group(n: int, group_len: int) -> Optional[int]:
    """The group length to run ATen's int4 kernel with (a divisor of ours in 32..256), or None
    when it cannot take this weight (N must be a multiple of 16)."""
    if n % 16:
        return None
    return next((g for g in _INT4_GROUPS if group_len % g == 0), None)


def _aten_int4_linear(x2: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor,
                      w_zero: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """W4A16 for bf16 ``x2`` [M, K] through ``aten._weight_int4pack_mm_for_cpu``; None where it
    does not apply (its fp16 path is a slow reference: 24x fp32 at 64 tokens). The repacked weight
    (same size as ours) is kept per ``qweight`` by :func:`_cached_pack`; a weight changed in place
    is repacked for each call, never kept again."""
    n, k = qweight.shape[0], qweight.shape[1] * 2
    group_len = k // w_scale.shape[1]
    g = _aten_int4_group(n, group_len)
    if g is None or x2.dtype != torch.bfloat16:
        return None

    def pack():
        nibbles = torch.stack(((qweight & 0xF), (qweight >> 4)), dim=-1).reshape(n, k).to(torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(nibbles, 2)
        # ATen's w = (u - 8)·s + zero, ours (u - 8 - z)·s: zero = -z·s
        zeros = torch.zeros_like(w_scale) if w_zero is None else -w_zero.float() * w_scale
        scales, zeros = (t.repeat_interleave(group_len // g, dim=1).t() for t in (w_scale, zeros))  # [K / g, N]
        return packed, torch.stack((scales, zeros), -1).to(x2.dtype).contiguous()

    deps = (w_scale, w_zero)  # baked into the pack
    hit = _current_pack(_INT4PACKED, qweight, deps)  # the cheap check first: the hot path of a kept weight
    if hit is None or hit[1].dtype != x2.dtype:
        # kept from the first use; a weight changed in place (QuZO) or used with another dtype: this call only
        hit = _cached_pack(_INT4PACKED, qweight, (n, k, x2.dtype), pack, False, deps) or pack()
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), hit[0], g, hit[1])


_W4A16_BF16_TOKENS = 32  # below: the C++ few-token kernel; from here: dequantize + GEMM (bench/cpu_qmatmul.py)


def _w4a16_dequant_gemm(x2: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor,
                        w_zero: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """W4A16 as one C++ pass that dequantizes the int4 weight (:func:`.cpu_ext.dequant_int4`, a
    temporary of one layer's weight) and a GEMM: a bf16 weight and oneDNN's bf16 GEMM for bf16 x on
    CPUs with bf16 dot products (AVX512-BF16 / AMX), else an fp32 weight and the fp32 GEMM (x
    widened, the result in x's dtype: the weight bits of ``dequantize_ref``). For bf16 x from 32
    tokens (below, the few-token kernel or ATen's int4 kernel is faster) and fp32 / fp16 x; None
    where it does not apply (other dtypes, a group of odd length, no C++ ops)."""
    if x2.dtype not in _W4A16_DTYPES or (x2.dtype == torch.bfloat16 and x2.shape[0] < _W4A16_BF16_TOKENS):
        return None
    if (qweight.shape[1] * 2 // w_scale.shape[1]) % 2:  # a group of odd length splits a byte
        return None
    bf16 = x2.dtype == torch.bfloat16 and _has_bf16_dot_instructions()
    w = cpu_ext.dequant_int4(qweight, w_scale, torch.bfloat16 if bf16 else torch.float32, w_zero)
    if w is None:
        return None
    return F.linear(x2, w) if bf16 else F.linear(x2.float(), w).to(x2.dtype)


_W4A16_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the few-token kernel takes


def _w4a16_few_tokens(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor,
                      bias: Optional[torch.Tensor], w_zero: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """W4A16 (+ bias) of ``x`` [..., K] with fewer than 32 tokens through
    :func:`.cpu_ext.w4a16_linear` (the int4 weight read once, dequantized in registers); None where
    it does not apply: a group length that is not a multiple of 32, no C++ ops, or bf16 x with more
    than 4 tokens on an AVX-512 CPU without bf16 dot products (ATen's AVX-512 int4 kernel is faster
    there; its AVX2 form is slower than this kernel at 2-31 tokens)."""
    k = x.shape[-1]
    if not k or (k // w_scale.shape[1]) % 32 or x.dtype not in _W4A16_DTYPES:
        return None
    tokens = x.numel() // k
    if tokens >= _W4A16_BF16_TOKENS:
        return None
    bf16_dot = _has_bf16_dot_instructions()
    if tokens > 4 and x.dtype == torch.bfloat16 and not bf16_dot and torch.backends.cpu.get_cpu_capability() == "AVX512":
        return None
    return cpu_ext.w4a16_linear(x, qweight, w_scale, bias, bf16_dot, w_zero)


def _has_bf16_dot_instructions() -> bool:
    """True when the CPU multiplies bf16 natively (AVX512-BF16 or AMX): oneDNN's bf16 GEMM is fast.
    False where ``ATEN_CPU_CAPABILITY`` holds torch below AVX-512: colafx's C++ ops are then built
    for that ISA too, and their kernels keep to it."""
    capability = torch.backends.cpu.get_cpu_capability()
    has = _BF16_DOT.get(capability)
    if has is None:  # asked on every W4A16 call: the CPU's answer is kept per capability
        has = _BF16_DOT[capability] = capability == "AVX512" and bool(
            getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() or _has_amx())
    return has


_BF16_DOT: dict = {}  # ATen CPU capability -> _has_bf16_dot_instructions()


def _qlinear_cpu(x, qweight, w_scale, bias, act_bits, bits, w_zero=None):
    """CPU fast path: int8 GEMM + fp32 epilogue (W·A8); for W4A16 the C++ kernel (few tokens), a
    bf16 or fp32 GEMM on the weight dequantized in C++ (many tokens) or ATen's int4 kernel; else
    dequantize + F.linear (other W·A16)."""
    if act_bits == 16 and bits == 4:  # first: decode's hot path
        out = _w4a16_few_tokens(x, qweight, w_scale, bias, w_zero)
        if out is not None:
            return out
    n = qweight.shape[0]
    k = x.shape[-1]
    groups = w_scale.shape[1]
    x2 = x if x.dim() == 2 else x.reshape(-1, k)
    if act_bits == 16:
        out = None
        if bits == 4:
            out = _w4a16_dequant_gemm(x2, qweight, w_scale, w_zero)
            if out is None:
                out = _aten_int4_linear(x2, qweight, w_scale, w_zero)
        if out is None:  # fp16 in fp32: the CPU's fp16 GEMM is a slow path
            dtype = torch.float32 if x.dtype == torch.float16 else x.dtype
            out = F.linear(x2.to(dtype), dequantize_packed(qweight, w_scale, bits, dtype, w_zero)).to(x.dtype)
        if bias is not None:
            out = out + bias.to(x.dtype)
        return out.reshape(*x.shape[:-1], n)
    name = cpu_int8_backend()

    def codes():  # int8 [N, K]; an int4 weight's zero points (per channel here) taken off: [-15, 15]
        if bits == 8:
            return qweight.contiguous()
        q = unpack_int4(qweight)
        return q if w_zero is None else q.sub_(w_zero)

    shape = torch.Size((n, k))
    qmax = A7_QMAX if name in _A7 else QMAX[8]
    fp32_bias = None if bias is None else bias.float().contiguous()
    if name in _FBGEMM_BACKENDS and groups == 1 and x2.shape[0]:
        deps = (w_scale, w_zero)  # baked into the pack
        packed = _current_pack(_FBGEMM, qweight, deps)  # the cheap check first: the hot path of a packed weight
        if packed is None:  # packed on its second unchanged use
            packed = _fbgemm_weight(codes, shape, w_scale, qweight, deps)
        if packed is not None and k:
            return _epilogue(_fbgemm_linear(x2, packed, qmax, fp32_bias), x, None, n)
    if groups == 1 and x2.shape[0] and k and n:
        cache_key = None if name in _FBGEMM_BACKENDS else qweight  # the FBGEMM backends keep no oneDNN copy
        packed, zeros = _gemm_weight(codes, shape, name, cache_key, (w_zero,))
        if packed is None:  # torch._int_mm: the fused C++ op runs it where it is built
            out = cpu_ext.w8a8_int_mm(x2.float().contiguous(), codes(), w_scale.reshape(n).float().contiguous(),
                                       qmax, fp32_bias)
            if out is not None:
                return _epilogue(out, x, None, n)
        qx, sx = quantize_tokens(x2, qmax)
        acc = _scaled_gemm(qx, codes, w_scale.reshape(n), name, packed, zeros)
        return _epilogue(acc.mul_(sx), x, bias, n)
    qx, sx = quantize_tokens(x2, qmax)
    if groups == 1:
        acc = torch.zeros(qx.shape[0], n)
    else:  # Σ_g sw[n, g]·(qx_g · q_gᵀ) = qx · dequant(W)ᵀ: one fp32 GEMM on the codes, no loop over groups
        acc = F.linear(qx.float(), dequantize_packed(qweight, w_scale, bits, torch.float32, w_zero))
    return _epilogue(acc.mul_(sx), x, bias, n)


def _epilogue(acc: torch.Tensor, x: torch.Tensor, bias: Optional[torch.Tensor], n: int) -> torch.Tensor:
    """fp32 [M, N] ``acc`` (+ bias) in x's dtype and leading shape."""
    if bias is not None:
        acc.add_(bias.float())
    out = acc if x.dtype == torch.float32 else acc.to(x.dtype)
    return out if x.dim() == 2 else out.reshape(*x.shape[:-1], n)


def _eager_cpu(x: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    """True for plain eager CPU calls that need no autograd: the op's dispatch can be skipped."""
    if type(x) is not torch.Tensor or use_triton(x):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return False
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    return torch._C._len_torch_dispatch_stack() == 0  # no FakeTensor / proxy (export) mode active


def _qlinear_impl(x, qweight, w_scale, bias, act_bits, bits, w_zero=None):
    """Shared op body: Triton on CUDA (or forced), CPU fast path otherwise."""
    if use_triton(x):
        groups = w_scale.shape[1]
        group_len = x.shape[-1] // groups
        if _triton_supported(groups > 1 and act_bits == 8, group_len):
            return qlinear_triton(x, qweight, w_scale, bias, act_bits, bits, w_zero)
        return qlinear_ref(x, qweight, w_scale, bias, act_bits, bits, w_zero=w_zero)
    return _qlinear_cpu(x, qweight, w_scale, bias, act_bits, bits, w_zero)


def _fake(x, qweight, w_scale, bias, *rest):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def _make_backward(bits, n_extra):
    """Autograd for the quantized linears: grad wrt x (straight-through) and bias only."""

    def setup_context(ctx, inputs, output):
        x, qweight, w_scale, bias = inputs[:4]
        w_zero = inputs[6] if bits == 4 else None
        ctx.save_for_backward(qweight, w_scale, w_zero)
        ctx.x_dtype = x.dtype

    def backward(ctx, grad):
        qweight, w_scale, w_zero = ctx.saved_tensors
        grad_x = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ dequantize_packed(qweight, w_scale, bits, grad.dtype, w_zero)
        if ctx.needs_input_grad[3]:
            grad_b = grad.reshape(-1, grad.shape[-1]).sum(0)
        return (grad_x, None, None, grad_b) + (None,) * n_extra

    return backward, setup_context


# --------------------------------------------------------------------------------------------
# Custom ops and public functions
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("colafx::int8_linear", mutates_args=())
def _int8_linear_op(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor,
                    bias: Optional[torch.Tensor], act_bits: int) -> torch.Tensor:
    return _qlinear_impl(x, qweight, w_scale, bias, act_bits, 8)


@torch.library.custom_op("colafx::int4_linear", mutates_args=())
def _int4_linear_op(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor,
                    bias: Optional[torch.Tensor], group_size: Optional[int], act_bits: int,
                    w_zero: Optional[torch.Tensor] = None) -> torch.Tensor:
    return _qlinear_impl(x, qweight, w_scale, bias, act_bits, 4, w_zero)


_int8_linear_op.register_fake(_fake)
_int4_linear_op.register_fake(_fake)
_bw8, _ctx8 = _make_backward(8, 1)
_bw4, _ctx4 = _make_backward(4, 3)
_int8_linear_op.register_autograd(_bw8, setup_context=_ctx8)
_int4_linear_op.register_autograd(_bw4, setup_context=_ctx4)


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor,
                bias: Optional[torch.Tensor] = None, act_bits: int = 8) -> torch.Tensor:
    """W8A8 (``act_bits=8``) or W8A16 (``act_bits=16``) linear: ``x`` [..., K] -> [..., N].

    ``qweight`` int8 [N, K], ``w_scale`` fp32 [N, 1] or [N, K // group_size], ``bias`` [N] or None.
    W8A8 quantizes x per token to int8 inside the op and accumulates exactly in int32. Output in
    x's dtype. Differentiable wrt x (straight-through) and bias. Custom op ``colafx::int8_linear``.
    Raises TypeError for wrong dtypes, ValueError for shape mismatches or act_bits not in {8, 16}.
    """
    _check_linear_inputs(x, qweight, w_scale, bias, act_bits, 8)
    if _eager_cpu(x, bias):
        return _qlinear_cpu(x, qweight, w_scale, bias, act_bits, 8)
    return torch.ops.colafx.int8_linear(x, qweight, w_scale, bias, act_bits)


def int4_linear(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor,
                bias: Optional[torch.Tensor] = None, group_size: Optional[int] = None,
                act_bits: int = 8, w_zero: Optional[torch.Tensor] = None) -> torch.Tensor:
    """W4A8 (``act_bits=8``) or W4A16 (``act_bits=16``) linear: ``x`` [..., K] -> [..., N].

    ``qweight`` packed uint8 [N, K // 2] (see :func:`colafx.kernels.quant.pack_int4`),
    ``w_scale`` fp32 [N, 1] (``group_size=None``) or [N, K // group_size], ``w_zero`` None
    (symmetric) or int8 zero points shaped like ``w_scale`` (``w = (q - zero)·scale``, see
    ``quantize_weight(symmetric=False)``). Output in x's dtype. Differentiable wrt x
    (straight-through) and bias. Custom op ``colafx::int4_linear``.
    Raises TypeError for wrong dtypes, ValueError for shape mismatches, a ``group_size`` that
    disagrees with ``w_scale``, or act_bits not in {8, 16}.
    """
    k, groups = _check_linear_inputs(x, qweight, w_scale, bias, act_bits, 4, w_zero)
    if k // check_group_size(k, group_size) != groups:
        raise ValueError(f"group_size={group_size} does not match w_scale {tuple(w_scale.shape)} for K={k}")
    if _eager_cpu(x, bias):
        return _qlinear_cpu(x, qweight, w_scale, bias, act_bits, 4, w_zero)
    if w_zero is None:  # the 6-input form: graphs exported before zero points keep their op
        return torch.ops.colafx.int4_linear(x, qweight, w_scale, bias, group_size, act_bits)
    return torch.ops.colafx.int4_linear(x, qweight, w_scale, bias, group_size, act_bits, w_zero)
