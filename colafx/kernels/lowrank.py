"""Fused low-rank projection + activation, ``σ(x @ Wᵀ)``: CoLA's bottleneck ``σ(A·x)``.

The op ``colafx::lowrank_act`` keeps only its inputs ``(x, weight)`` for backward; the backward
recomputes ``z = x·Wᵀ`` fused with the SiLU-gradient epilogue (op ``colafx::lowrank_act_dz``,
giving ``dz = g · silu'(z)``), then ``grad_x = dz·W`` and ``grad_W = dzᵀ·x`` as plain matmuls.
CoLA-M's selective checkpointing marks this op's output MUST_SAVE and recomputes everything else,
so the pre-activation ``z`` is never stored.

Dispatch: CUDA tensors launch the Triton kernels (autotuned tiled matmul with the activation /
activation-gradient epilogue, fp32 accumulation); CPU tensors use ``F.silu(F.linear(x, w))`` and
its recomputed gradient in PyTorch. :func:`lowrank_act_triton` / :func:`lowrank_act_dz_triton` /
:func:`lowrank_act_backward_triton` launch the Triton kernels on any device (CPU needs
``TRITON_INTERPRET=1``); :func:`lowrank_act_ref` is the pure-PyTorch reference (fp32 math).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .quant import dot_mode, interpreting, use_triton

__all__ = [
    "lowrank_act",
    "lowrank_in",
    "lowrank_act_ref",
    "lowrank_act_triton",
    "lowrank_act_dz_triton",
    "lowrank_act_backward_triton",
    "ACTIVATIONS",
]

ACTIVATIONS = ("silu", "identity")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)



# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _check_inputs(x: torch.Tensor, weight: torch.Tensor, act: str) -> None:
    """Raise TypeError / ValueError unless x [..., d_in] and weight [r, d_in] fit together."""
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    if x.dtype != weight.dtype:
        raise TypeError(f"x and weight must share a dtype, got {x.dtype} and {weight.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [r, d_in], got shape {tuple(weight.shape)}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x [..., d_in] does not match weight {tuple(weight.shape)}: x is {tuple(x.shape)}")
    if x.device != weight.device:
        raise ValueError(f"x and weight are on different devices: {x.device} vs {weight.device}")
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _xwt_tile(x_ptr, w_ptr, M, N, K, stride_xm, stride_wn, pid_m, pid_n,
              DOT_MODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr):
    """fp32 tile z[BLOCK_M, BLOCK_N] of x·Wᵀ for contiguous-last-dim x [M, K], W [N, K]."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k[None, :] < K
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :],
                    mask=(offs_m[:, None] < M) & k_ok, other=0.0)
        w = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :],
                    mask=(offs_n[:, None] < N) & k_ok, other=0.0)
        if DOT_MODE == 0:  # native 16-bit mma, fp32 accumulation
            acc += tl.dot(x, tl.trans(w))
        elif DOT_MODE == 1:  # exact fp32 (also the interpreter's bf16 path: its bf16 dot is wrong)
            acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
        else:  # fp32 inputs, TF32 tensor cores (torch.backends.cuda.matmul.allow_tf32)
            acc += tl.dot(x, tl.trans(w), input_precision="tf32")
    return acc


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped (L2-friendly) program ordering: return (pid_m, pid_n) of this program."""
    pid = tl.program_id(0)
    n_m = tl.cdiv(M, BLOCK_M)
    n_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * n_n
    first_m = (pid // per_group) * GROUP_M
    rows = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows
    pid_n = (pid % per_group) // rows
    return pid_m, pid_n


@triton.jit
def _lowrank_act_fwd_kernel(x_ptr, w_ptr, y_ptr, M, N, K, M_BUCKET, stride_xm, stride_wn, stride_ym,
                            SILU: tl.constexpr, DOT_MODE: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """y = act(x·Wᵀ), act = SiLU or identity, fp32 accumulation, stored in y's dtype."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    z = _xwt_tile(x_ptr, w_ptr, M, N, K, stride_xm, stride_wn, pid_m, pid_n,
                  DOT_MODE, BLOCK_M, BLOCK_N, BLOCK_K)
    if SILU:
        z = z * tl.sigmoid(z)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :],
             z.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lowrank_act_dz_kernel(g_ptr, x_ptr, w_ptr, dz_ptr, M, N, K, M_BUCKET, stride_gm, stride_xm,
                           stride_wn, stride_dm, DOT_MODE: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """dz = g · silu'(x·Wᵀ) with silu'(z) = s·(1 + z·(1 − s)), s = sigmoid(z); z recomputed."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    z = _xwt_tile(x_ptr, w_ptr, M, N, K, stride_xm, stride_wn, pid_m, pid_n,
                  DOT_MODE, BLOCK_M, BLOCK_N, BLOCK_K)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    g = tl.load(g_ptr + offs_m[:, None].to(tl.int64) * stride_gm + offs_n[None, :], mask=mask,
                other=0.0).to(tl.float32)
    s = tl.sigmoid(z)
    dz = g * s * (1.0 + z * (1.0 - s))
    tl.store(dz_ptr + offs_m[:, None].to(tl.int64) * stride_dm + offs_n[None, :],
             dz.to(dz_ptr.dtype.element_ty), mask=mask)


def _h100_configs():
    """Matmul tile configs that suit H100 (bf16/fp16 mma, 128..256-wide tiles, 3-5 stages)."""
    shapes = [  # BLOCK_M, BLOCK_N, BLOCK_K, stages, warps
        (128, 256, 64, 3, 8), (256, 128, 64, 3, 8), (128, 128, 64, 4, 4), (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4), (64, 64, 64, 5, 4), (128, 128, 32, 4, 4), (64, 256, 32, 4, 4),
        (32, 64, 64, 5, 2), (16, 64, 128, 4, 4), (16, 128, 64, 4, 4),
    ]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                      num_stages=s, num_warps=w)
        for bm, bn, bk, s, w in shapes
    ]


_fwd_autotuned = triton.autotune(_h100_configs(), key=["M_BUCKET", "N", "K", "SILU"])(_lowrank_act_fwd_kernel)
_dz_autotuned = triton.autotune(_h100_configs(), key=["M_BUCKET", "N", "K"])(_lowrank_act_dz_kernel)
_INTERPRETER_BLOCKS = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """View ``t`` [..., C] as a 2-D [rows, C] tensor whose last dim is contiguous."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 or t2.numel() == 0 else t2.contiguous()




def _launch(kernel, tuned, tensors, strides, m, n, k, like, **flags):
    """Launch ``kernel`` (interpreter: fixed small tiles) or its autotuned twin on a 1-D grid."""
    bucket = min(triton.next_power_of_2(max(m, 1)), 4096)
    mode = dot_mode(like)
    if interpreting() or not like.is_cuda:
        blocks = _INTERPRETER_BLOCKS
        grid = (triton.cdiv(m, blocks["BLOCK_M"]) * triton.cdiv(n, blocks["BLOCK_N"]),)
        kernel[grid](*tensors, m, n, k, bucket, *strides, DOT_MODE=mode, **flags, **blocks)
    else:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
        tuned[grid](*tensors, m, n, k, bucket, *strides, DOT_MODE=mode, **flags)


def lowrank_act_triton(x: torch.Tensor, weight: torch.Tensor, act: str = "silu") -> torch.Tensor:
    """Launch the Triton forward kernel: return ``act(x @ weight.T)`` ([..., r], x's dtype).

    Works on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1``. No autograd.
    Raises TypeError / ValueError like :func:`lowrank_act`.
    """
    _check_inputs(x, weight, act)
    x2, w = _as_rows(x), weight.contiguous()
    m, k = x2.shape
    n = w.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m and n:
        if k == 0:
            y.zero_()
        else:
            _launch(_lowrank_act_fwd_kernel, _fwd_autotuned, (x2, w, y),
                    (x2.stride(0), w.stride(0), y.stride(0)), m, n, k, x2, SILU=act == "silu")
    return y.reshape(*x.shape[:-1], n)


def lowrank_act_dz_triton(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                          act: str = "silu") -> torch.Tensor:
    """Launch the Triton backward epilogue kernel: return ``dz = grad · act'(x @ weight.T)``.

    ``grad`` has the output's shape [..., r]; dz is returned in ``grad``'s shape and x's dtype.
    For ``act="identity"`` dz is ``grad`` itself (no kernel). Raises TypeError / ValueError for
    mismatched inputs.
    """
    _check_inputs(x, weight, act)
    out_shape = (*x.shape[:-1], weight.shape[0])
    if tuple(grad.shape) != out_shape:
        raise ValueError(f"grad must have shape {out_shape}, got {tuple(grad.shape)}")
    if act == "identity":
        return grad.to(x.dtype)
    g2, x2, w = _as_rows(grad), _as_rows(x), weight.contiguous()
    m, k = x2.shape
    n = w.shape[0]
    dz = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m and n:
        if k == 0:
            dz.copy_(g2 * 0.5)  # z = 0 -> silu'(0) = 1/2
        else:
            _launch(_lowrank_act_dz_kernel, _dz_autotuned, (g2, x2, w, dz),
                    (g2.stride(0), x2.stride(0), w.stride(0), dz.stride(0)), m, n, k, x2)
    return dz.reshape(out_shape)


def _grads_from_dz(dz: torch.Tensor, x: torch.Tensor, weight: torch.Tensor):
    """Return ``(grad_x, grad_W) = (dz·W, dzᵀ·x)`` with torch matmuls, in x's dtype."""
    dz2, x2 = dz.reshape(-1, dz.shape[-1]), x.reshape(-1, x.shape[-1])
    grad_x = (dz2 @ weight).reshape(x.shape)
    grad_w = dz2.t() @ x2
    return grad_x, grad_w


def lowrank_act_backward_triton(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                                act: str = "silu"):
    """Backward of :func:`lowrank_act` on the Triton path: return ``(grad_x, grad_weight)``.

    dz comes from :func:`lowrank_act_dz_triton` (z recomputed, never saved); the two products use
    torch matmuls. Raises TypeError / ValueError for mismatched inputs.
    """
    dz = lowrank_act_dz_triton(grad, x, weight, act)
    return _grads_from_dz(dz, x, weight)


# --------------------------------------------------------------------------------------------
# Reference and CPU fast path
# --------------------------------------------------------------------------------------------


def lowrank_act_ref(x: torch.Tensor, weight: torch.Tensor, act: str = "silu") -> torch.Tensor:
    """Pure-PyTorch reference: ``act(x.float() @ weight.float().T)`` cast back to x's dtype.

    Differentiable through autograd. Raises ValueError for an unknown ``act``.
    """
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
    z = F.linear(x.float(), weight.float())
    return (F.silu(z) if act == "silu" else z).to(x.dtype)


def _dz_torch(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """CPU path for dz = grad · silu'(x·Wᵀ), recomputing z with F.linear (fp32 epilogue)."""
    z = F.linear(x, weight).float()
    s = torch.sigmoid(z)
    return (grad.float() * s * (1.0 + z * (1.0 - s))).to(x.dtype)


def _triton_enabled(t: torch.Tensor) -> bool:
    return use_triton(t)


# --------------------------------------------------------------------------------------------
# Custom ops
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("colafx::lowrank_act", mutates_args=())
def _lowrank_act_op(x: torch.Tensor, weight: torch.Tensor, act: str) -> torch.Tensor:
    if _triton_enabled(x):
        return lowrank_act_triton(x, weight, act)
    z = F.linear(x, weight)
    return F.silu(z) if act == "silu" else z


@_lowrank_act_op.register_fake
def _(x, weight, act):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("colafx::lowrank_act_dz", mutates_args=())
def _lowrank_act_dz_op(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, act: str) -> torch.Tensor:
    if act == "identity":
        return grad.to(x.dtype).clone()
    if _triton_enabled(x):
        return lowrank_act_dz_triton(grad, x, weight, act)
    return _dz_torch(grad, x, weight)


@_lowrank_act_dz_op.register_fake
def _(grad, x, weight, act):
    return grad.new_empty(grad.shape, dtype=x.dtype)


def _setup_context(ctx, inputs, output):
    x, weight, act = inputs
    ctx.save_for_backward(x, weight)  # inputs only: z is recomputed in backward
    ctx.act = act


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    if ctx.act == "identity":
        dz = grad.to(x.dtype)
    else:
        dz = torch.ops.colafx.lowrank_act_dz(grad.contiguous(), x, weight, ctx.act)
    grad_x, grad_w = _grads_from_dz(dz, x, weight)
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    return (grad_x if need_x else None), (grad_w if need_w else None), None


_lowrank_act_op.register_autograd(_backward, setup_context=_setup_context)


def lowrank_act(x: torch.Tensor, weight: torch.Tensor, act: str = "silu") -> torch.Tensor:
    """Return ``act(x @ weight.T)`` for x [..., d_in], weight [r, d_in]; act is "silu" or "identity".

    Custom op ``colafx::lowrank_act`` (fake impl + autograd; works with torch.compile,
    torch.export and selective checkpointing). Backward saves only (x, weight) and recomputes
    the pre-activation. fp32 / bf16 / fp16 inputs, fp32 accumulation; output in x's dtype.
    Raises TypeError for non-float or mismatched dtypes, ValueError for shape mismatch, different
    devices or an unknown ``act``.
    """
    _check_inputs(x, weight, act)
    return torch.ops.colafx.lowrank_act(x, weight, act)


# --------------------------------------------------------------------------------------------
# colafx::lowrank_in: the pre-activation A·x that CoLA-M keeps
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("colafx::lowrank_in", mutates_args=())
def _lowrank_in_op(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.linear(x, weight)


@_lowrank_in_op.register_fake
def _(x, weight):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _lowrank_in_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _lowrank_in_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    grad_x = grad.matmul(weight) if ctx.needs_input_grad[0] else None
    grad_w = grad.reshape(-1, grad.shape[-1]).t().mm(x.reshape(-1, x.shape[-1])) if ctx.needs_input_grad[1] else None
    return grad_x, grad_w


_lowrank_in_op.register_autograd(_lowrank_in_backward, setup_context=_lowrank_in_setup)


def lowrank_in(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The pre-activation ``z = x @ weight.T`` of a CoLA bottleneck as the custom op
    ``colafx::lowrank_in`` (same numerics as ``F.linear``), so that CoLA-M's policy can keep it.

    Under autocast the inputs are cast to the autocast dtype first, as autocast does for a linear.

    Raises:
        ValueError: if ``weight`` is not 2-D or its columns differ from the last dim of ``x``.
    """
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"lowrank_in: x [..., {x.shape[-1]}] does not fit weight {tuple(weight.shape)}")
    device = x.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        x, weight = x.to(dtype), weight.to(dtype)
    return torch.ops.colafx.lowrank_in(x, weight)
