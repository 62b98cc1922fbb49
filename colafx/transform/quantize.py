"""``quantize_(model, QuantConfig(...))``: swap dense projections for int8 / int4 quantized modules.

torchao-style: the model is changed in place, ``filter_fn(module, fqn)`` picks the ``nn.Linear``
modules to convert (default: every linear except the logits head; CoLA factors are linears too).
A :class:`QuantLinear` keeps its weight as integer buffers (int8 [N, K] or packed int4 [N, K/2])
plus fp32 scales and runs ``colafx::int8_linear`` / ``colafx::int4_linear``. Models that QuZO will
train are quantized with ``QuantConfig(zo_headroom=True)`` so that the integer perturb / restore
cycle of :mod:`colafx.kernels.zo` is bit-exact.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from colafx.kernels.qmatmul import int4_linear, int8_linear
from colafx.transform.io import register_transform

FilterFn = Callable[[nn.Module, str], bool]


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize projections.

    ``weight_bits`` 8 or 4; ``act_bits`` 8 (per-token int8 activations, integer GEMM) or 16
    (weight-only); ``group_size`` None (one scale per output channel) or a divisor of d_in;
    ``rounding`` "nearest" or "stochastic" (seeded by ``seed``); ``zo_headroom`` keeps weights
    within ±(qmax − H) for QuZO's bit-exact integer perturbation. ``symmetric=False`` (int4 only):
    16 levels over each group's range with an int8 zero point per group, onnxruntime's int4 grid
    (more accurate for inference and export; QuZO cannot perturb such weights). ``algorithm``
    "rtn" rounds each weight to its nearest level; "gptq" (:mod:`colafx.transform.gptq`) picks the
    levels that minimise each linear's output error on calibration token ids passed to
    :func:`quantize_` (same format and kernels, so the same speed).
    """

    weight_bits: int = 8
    act_bits: int = 8
    group_size: Optional[int] = None
    rounding: str = "nearest"
    zo_headroom: bool = False
    seed: int = 0
    symmetric: bool = True
    algorithm: str = "rtn"

    def __post_init__(self):
        if self.weight_bits not in (8, 4):
            raise ValueError(f"weight_bits must be 8 or 4, got {self.weight_bits!r}")
        if self.act_bits not in (8, 16):
            raise ValueError(f"act_bits must be 8 or 16, got {self.act_bits!r}")
        if self.rounding not in ("nearest", "stochastic"):
            raise ValueError(f"rounding must be 'nearest' or 'stochastic', got {self.rounding!r}")
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size <= 0):
            raise ValueError(f"group_size must be a positive int or None, got {self.group_size!r}")
        if self.algorithm not in ("rtn", "gptq"):
            raise ValueError(f"algorithm must be 'rtn' or 'gptq', got {self.algorithm!r}")
        if self.algorithm == "gptq" and self.rounding != "nearest":
            raise ValueError("algorithm='gptq' chooses each level itself; it takes rounding='nearest'")
        if not self.symmetric and (self.weight_bits != 4 or self.zo_headroom):
            raise ValueError("symmetric=False (zero points) is for int4 weights without zo_headroom "
                             f"(got weight_bits={self.weight_bits}, zo_headroom={self.zo_headroom})")

    @property
    def qmax(self) -> int:
        """Largest integer magnitude stored (127 / 7, or 119 / 6 with ZO head-room)."""
        from colafx.kernels.quant import QMAX
        from colafx.kernels.zo import ZO_QMAX

        return (ZO_QMAX if self.zo_headroom else QMAX)[self.weight_bits]


class QuantLinear(nn.Module):
    """A linear layer with an int8 or packed-int4 weight (buffers ``qweight``, ``scale``, ``bias``,
    and ``zero`` for asymmetric int4: int8 zero points shaped like ``scale``).

    ``forward`` runs the quantized matmul op; nothing in it has a gradient (QuZO trains the integer
    weights with forward passes; LoRA adapters can sit on top of it).
    """

    def __init__(self, in_features: int, out_features: int, bits: int = 8, act_bits: int = 8,
                 group_size: Optional[int] = None, bias: bool = False, qmax: Optional[int] = None,
                 device=None, zero_point: bool = False):
        super().__init__()
        if bits == 4 and in_features % 2:
            raise ValueError(f"int4 weights need an even d_in, got {in_features}")
        if zero_point and bits != 4:
            raise ValueError(f"zero points are for int4 weights, got bits={bits}")
        groups = 1 if group_size is None else in_features // group_size
        if group_size is not None and in_features % group_size:
            raise ValueError(f"group_size {group_size} does not divide d_in {in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.act_bits, self.group_size, self.qmax = bits, act_bits, group_size, qmax
        packed = (out_features, in_features // 2) if bits == 4 else (out_features, in_features)
        dtype = torch.uint8 if bits == 4 else torch.int8
        self.register_buffer("qweight", torch.zeros(packed, dtype=dtype, device=device))
        self.register_buffer("scale", torch.ones(out_features, groups, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)
        self.register_buffer("zero", torch.zeros(out_features, groups, dtype=torch.int8, device=device)
                             if zero_point else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: QuantConfig, quantized=None) -> "QuantLinear":
        """Quantize ``linear``'s weight with ``config`` (the bias stays float), or take its
        already quantized form ``quantized`` (a ``QuantizedWeight``, e.g. from GPTQ).

        Raises:
            ValueError: int4 with an odd d_in, or a group size that does not divide d_in.
        """
        from colafx.kernels.quant import quantize_weight

        w = linear.weight.detach()
        module = cls(linear.in_features, linear.out_features, config.weight_bits, config.act_bits,
                     config.group_size, linear.bias is not None, None if not config.symmetric else config.qmax,
                     device=w.device, zero_point=not config.symmetric)
        qw = quantized if quantized is not None else quantize_weight(
            w.float(), config.weight_bits, config.group_size, config.rounding, config.seed, config.qmax,
            symmetric=config.symmetric)
        module.qweight.copy_(qw.qweight)
        module.scale.copy_(qw.scale)
        if qw.zero is not None:
            module.zero.copy_(qw.zero)
        if linear.bias is not None:
            module.bias = linear.bias.detach().float().clone()
        return module

    def _apply(self, fn, recurse=True):
        """``nn.Module._apply`` (what ``.to()``, ``.cuda()``, ``.half()`` run), except that the
        scales stay fp32: the kernels take fp32 scales, and a cast to bf16 / fp16 would round the
        weights the model was quantized to (a bf16 scale is off by up to 0.4%)."""
        scale = self._buffers.get("scale")
        out = super()._apply(fn, recurse)
        moved = self._buffers.get("scale")
        if scale is not None and moved is not None and moved.dtype != scale.dtype and scale.dtype == torch.float32:
            self._buffers["scale"] = scale.to(moved.device)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        buffers = self._buffers  # each buffer attribute is an nn.Module.__getattr__ lookup: decode's hot path
        scale, bias = buffers["scale"], buffers["bias"]
        if scale.dtype != torch.float32:  # a scale assigned in another dtype (casts keep it fp32: _apply)
            scale = scale.float()
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        if self.bits == 8:
            return int8_linear(x, buffers["qweight"], scale, bias, act_bits=self.act_bits)
        return int4_linear(x, buffers["qweight"], scale, bias, group_size=self.group_size, act_bits=self.act_bits,
                           w_zero=buffers["zero"])

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float [d_out, d_in] weight this module represents."""
        from colafx.kernels.quant import QuantizedWeight, dequantize_weight

        qw = QuantizedWeight(self.qweight, self.scale, self.bits, self.group_size,
                             torch.Size((self.out_features, self.in_features)), self.zero)
        return dequantize_weight(qw, dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"act_bits={self.act_bits}, group_size={self.group_size}, qmax={self.qmax}, "
                f"bias={self.bias is not None}" + (", zero_point=True" if self.zero is not None else ""))


def default_filter(model: nn.Module) -> FilterFn:
    """Every ``nn.Linear`` except the model's output embedding (the logits head stays dense)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None

    def keep(module: nn.Module, fqn: str) -> bool:
        return module is not head
    return keep


def quantize_(model: nn.Module, config: QuantConfig | None = None, filter_fn: FilterFn | None = None,
              calibration=None) -> nn.Module:
    """Replace the ``nn.Linear`` modules that ``filter_fn(module, fqn)`` accepts by
    :class:`QuantLinear` in place (default filter: all but the logits head); returns ``model``.
    ``calibration``: token ids for ``QuantConfig(algorithm="gptq")`` — a LongTensor [batch, seq]
    or an iterable of them (a few thousand tokens of text like the model's use).

    Raises:
        ValueError: the model is already quantized, no linear layer matches, a layer cannot be
            quantized with ``config`` (odd d_in for int4, group size not dividing d_in) — checked
            for every layer before anything changes — or GPTQ without calibration tokens (or
            calibration given to round-to-nearest).
    """
    from colafx.transform.colaify import _set_submodule

    config = config or QuantConfig()
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        raise ValueError("model is already quantized (it contains QuantLinear modules)")
    keep = filter_fn or default_filter(model)
    sites = [(fqn, m) for fqn, m in model.named_modules() if type(m) is nn.Linear and keep(m, fqn)]
    if not sites:
        raise ValueError("quantize_: no nn.Linear module matches the filter")
    for fqn, m in sites:
        if config.weight_bits == 4 and m.in_features % 2:
            raise ValueError(f"{fqn}: int4 needs an even d_in, got {m.in_features}")
        if config.group_size is not None and m.in_features % config.group_size:
            raise ValueError(f"{fqn}: group_size {config.group_size} does not divide d_in {m.in_features}")
        if m.weight.device.type == "meta":
            raise ValueError(f"{fqn}: cannot quantize weights on the meta device")
    if config.algorithm == "gptq" and calibration is None:
        raise ValueError("algorithm='gptq' needs calibration token ids: quantize_(model, config, calibration=ids)")
    if config.algorithm != "gptq" and calibration is not None:
        raise ValueError("calibration is only used by QuantConfig(algorithm='gptq')")
    quantized = {}
    if config.algorithm == "gptq":
        from colafx.transform.gptq import collect_hessians, gptq_quantize_weight

        hessians = collect_hessians(model, dict(sites), calibration)
        quantized = {fqn: gptq_quantize_weight(m.weight.float(), hessians[fqn], config.weight_bits, config.group_size,
                                               config.symmetric, config.qmax) for fqn, m in sites}
        del hessians
    for fqn, m in sites:
        _set_submodule(model, fqn, QuantLinear.from_linear(m, config, quantized.get(fqn)))
    return model


def quantized_modules(model: nn.Module) -> dict[str, QuantLinear]:
    """The model's :class:`QuantLinear` modules by name."""
    return {fqn: m for fqn, m in model.named_modules() if isinstance(m, QuantLinear)}


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio 10·log10(‖ref‖² / ‖ref − approx‖²) in dB."""
    ref = reference.detach().double()
    noise = (ref - approx.detach().double()).pow(2).sum().clamp_min(1e-300)
    return float(10 * torch.log10(ref.pow(2).sum() / noise))


def _record(model: nn.Module):
    sites = {fqn: {"in": m.in_features, "out": m.out_features, "bits": m.bits, "act_bits": m.act_bits,
                   "group_size": m.group_size, "bias": m.bias is not None, "qmax": m.qmax,
                   "zero_point": m.zero is not None}
             for fqn, m in quantized_modules(model).items()}
    return sites or None


def _rebuild(model: nn.Module, sites: dict) -> None:
    from colafx.transform.colaify import _set_submodule

    for fqn, s in sites.items():
        _set_submodule(model, fqn, QuantLinear(s["in"], s["out"], s["bits"], s["act_bits"], s["group_size"],
                                               s["bias"], s.get("qmax"), zero_point=s.get("zero_point", False)))


register_transform("quant", _record, _rebuild)

__all__ = ["QuantConfig", "QuantLinear", "quantize_", "quantized_modules", "default_filter", "sqnr_db"]
