"""GPTQ (Frantar et al., 2022): int8 / int4 weights that minimise each linear's output error on
calibration inputs, in colafx's weight format (the same codes, scales and zero points the kernels
and the ONNX export read, so speed is that of round-to-nearest weights).

For a linear with inputs X, GPTQ quantizes W one input column at a time and spreads each column's
rounding error over the columns not yet quantized, weighted by the inverse of H = XᵀX: the
result minimises ‖X(W − Q)ᵀ‖² far better than rounding each weight to its nearest level. A
group's scale (and zero point) is set from the group's weights as they stand when GPTQ reaches its
first column. ``quantize_(model, QuantConfig(algorithm="gptq"), calibration=ids)`` runs it.

All Hessians come from one pass of the float model over the calibration batches (inputs of later
layers are the float model's, not the quantized model's: one pass instead of one per layer); linears
that read the same tensor (q/k/v, gate/up) share one Hessian.
"""
from __future__ import annotations

from typing import Iterable, Optional, Union

import torch
from torch import nn

from colafx.kernels.quant import QMAX, QuantizedWeight, check_group_size, group_params, pack_int4

__all__ = ["gptq_quantize_weight", "collect_hessians"]

DAMP = 0.01  # H += DAMP · mean(diag H) · I: the usual dampening (keeps H invertible)
BLOCK = 128  # columns per lazy-update block


def _group_params(w: torch.Tensor, qmax: int, symmetric: bool):
    """Scale [N, 1] and zero point [N, 1] (0 when symmetric) of the columns ``w`` [N, g], by the
    rules and in the fp32 arithmetic of :func:`colafx.kernels.quant.quantize_weight`; as fp64."""
    scale, zero = group_params(w.float(), qmax, symmetric)
    return scale.double(), torch.zeros_like(scale, dtype=torch.float64) if zero is None else zero.double()


def gptq_quantize_weight(w: torch.Tensor, hessian: torch.Tensor, bits: int = 4, group_size: Optional[int] = None,
                         symmetric: bool = True, qmax: Optional[int] = None) -> QuantizedWeight:
    """GPTQ-quantize a [N, K] float weight given the Hessian ``hessian`` = XᵀX / n ([K, K]) of its
    inputs; return a :class:`~colafx.kernels.quant.QuantizedWeight` in the format of
    :func:`~colafx.kernels.quant.quantize_weight` with the same arguments. With an identity Hessian
    the result is round-to-nearest's.

    Raises:
        ValueError: shapes that do not match, bad ``bits`` / ``group_size`` / ``qmax``, or
            ``symmetric=False`` with 8 bits or a ``qmax`` (as ``quantize_weight``).
    """
    if w.dim() != 2 or hessian.shape != (w.shape[1], w.shape[1]):
        raise ValueError(f"GPTQ needs a [N, K] weight and a [K, K] Hessian, got {tuple(w.shape)} and "
                         f"{tuple(hessian.shape)}")
    if bits not in QMAX:
        raise ValueError(f"bits must be 8 or 4, got {bits!r}")
    if qmax is not None and not 1 <= qmax <= QMAX[bits]:
        raise ValueError(f"qmax must be in [1, {QMAX[bits]}] for {bits}-bit, got {qmax!r}")
    if not symmetric and (bits != 4 or qmax not in (None, QMAX[4])):
        raise ValueError("symmetric=False is for int4 weights with the full code range (no qmax)")
    n, k = w.shape
    if bits == 4 and k % 2:
        raise ValueError(f"4-bit weights need an even K to pack two per byte, got K={k}")
    g = check_group_size(k, group_size)
    qmax = QMAX[bits] if qmax is None else qmax
    lo_code = -8 if not symmetric else -qmax
    hi_code = 7 if not symmetric else qmax
    W = w.detach().double().clone()
    H = hessian.detach().double().clone()
    dead = torch.diag(H) == 0  # inputs that were always 0: their weights do not matter
    H[dead, dead] = 1
    W[:, dead] = 0
    H.diagonal().add_(DAMP * torch.diag(H).mean())
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)  # chol of H⁻¹
    codes = torch.empty(n, k, dtype=torch.int8, device=W.device)
    scales = torch.empty(n, k // g, dtype=torch.float64, device=W.device)
    zeros = torch.empty(n, k // g, dtype=torch.float64, device=W.device)
    for b0 in range(0, k, BLOCK):
        b1 = min(k, b0 + BLOCK)
        block, errors = W[:, b0:b1].clone(), torch.empty(n, b1 - b0, dtype=torch.float64, device=W.device)
        for i in range(b1 - b0):
            col = b0 + i
            if col % g == 0:  # this group's parameters, from its weights as updated so far
                span = torch.cat((block[:, i:], W[:, b1:]), dim=1)[:, :g]
                scale, zero = _group_params(span, qmax, symmetric)
                scales[:, col // g], zeros[:, col // g] = scale[:, 0], zero[:, 0]
            q = (block[:, i:i + 1] / scale + 0.5).floor().add_(zero).clamp_(lo_code, hi_code)
            codes[:, col] = q[:, 0].to(torch.int8)
            err = (block[:, i:i + 1] - (q - zero) * scale) / u[col, col]
            block[:, i:] -= err @ u[col:col + 1, col:b1]
            errors[:, i] = err[:, 0]
        W[:, b1:] -= errors @ u[b0:b1, b1:]
    qweight = pack_int4(codes) if bits == 4 else codes
    return QuantizedWeight(qweight, scales.float(), bits, group_size, torch.Size((n, k)),
                           None if symmetric else zeros.to(torch.int8))


Calibration = Union[torch.Tensor, Iterable[torch.Tensor]]


def collect_hessians(model: nn.Module, modules: dict[str, nn.Linear], calibration: Calibration,
                     batch_size: int = 4) -> dict[str, torch.Tensor]:
    """H = XᵀX / n (fp32 [K, K]) of the inputs of each of ``modules`` (name → linear) while ``model``
    runs the calibration token ids: a LongTensor [B, T] (split into batches of ``batch_size``) or an
    iterable of such batches. Linears that read the same tensor share one Hessian object.

    Raises:
        ValueError: the calibration data holds no tokens, or a module never ran.
    """
    batches = calibration.split(batch_size) if isinstance(calibration, torch.Tensor) else calibration
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    alias: dict[str, str] = {}
    last: list = [None, None]  # the input tensor the previous linear read (kept alive) and that linear

    def hook(name):
        def record(module, inputs, output):
            if inputs[0] is last[0]:  # the same tensor as the linear before (q/k/v, gate/up)
                alias[name] = last[1]
                return
            last[0], last[1] = inputs[0], name
            x = inputs[0].detach()
            x = x.reshape(-1, x.shape[-1]).float()
            if name not in sums:
                sums[name] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
                counts[name] = 0
            sums[name].addmm_(x.t(), x)
            counts[name] += x.shape[0]
        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in modules.items()]
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for batch in batches:
                if batch.numel():
                    model(batch.to(device))
                last[0] = last[1] = None
    finally:
        for h in handles:
            h.remove()
    if not sums:
        raise ValueError("GPTQ calibration ran no tokens through the model: pass token ids [batch, seq]")
    missing = [name for name in modules if name not in sums and name not in alias]
    if missing:
        raise ValueError(f"GPTQ calibration never reached {missing[0]} (and {len(missing) - 1} more linears)")
    hessians = {name: h.div_(counts[name]) for name, h in sums.items()}
    return {name: hessians[alias.get(name, name)] for name in modules}
