"""LoRA adapters on a frozen (typically quantized) base: ``y = base(x) + (α/r)·B·A·x``.

The released QuZO setup trains LoRA (r 8, α 16) on an 8/4-bit base with forward passes only.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from colafx.transform.io import register_transform
from colafx.transform.quantize import QuantLinear


class LoRALinear(nn.Module):
    """A frozen ``base`` projection plus trainable ``lora_a`` [r, d_in] and ``lora_b`` [d_out, r]
    (``lora_b`` starts at zero, so the wrapped model is unchanged until trained)."""

    def __init__(self, base: nn.Module, rank: int = 8, alpha: float = 16.0):
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        self.base, self.rank, self.alpha = base, rank, alpha
        self.in_features, self.out_features = base.in_features, base.out_features
        ref = base.scale if isinstance(base, QuantLinear) else base.weight
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=ref.device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=ref.device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        for p in base.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = (x.to(self.lora_a.dtype) @ self.lora_a.t()) @ self.lora_b.t()
        return self.base(x) + (self.alpha / self.rank) * delta.to(x.dtype)


def add_lora_(model: nn.Module, rank: int = 8, alpha: float = 16.0, generator_seed: int = 0) -> nn.Module:
    """Wrap every projection (``QuantLinear`` or ``nn.Linear``, not the logits head) in a
    :class:`LoRALinear`, in place; freeze everything but the adapters; return ``model``.

    Raises:
        ValueError: the model already has adapters, or has no projection to adapt.
    """
    from colafx.transform.colaify import _set_submodule

    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("model already has LoRA adapters")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    sites = [(n, m) for n, m in model.named_modules()
             if (isinstance(m, QuantLinear) or type(m) is nn.Linear) and m is not head]
    if not sites:
        raise ValueError("add_lora_: the model has no projection to adapt")
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(generator_seed)
        for name, m in sites:
            _set_submodule(model, name, LoRALinear(m, rank, alpha))
    return model


def _record(model: nn.Module):
    sites = {n: {"rank": m.rank, "alpha": m.alpha} for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    return sites or None


def _rebuild(model: nn.Module, sites: dict) -> None:
    from colafx.transform.colaify import _set_submodule

    for name, s in sites.items():
        old = model.get_submodule(name)
        # The quantization record (replayed first) put the QuantLinear at ``name.base``.
        _set_submodule(model, name, LoRALinear(old._modules.get("base", old), s["rank"], s["alpha"]))


register_transform("lora", _record, _rebuild)
