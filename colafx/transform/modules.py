"""The CoLA auto-encoder module that replaces a dense projection: ``y = B · σ(A · x) (+ bias)``."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = ("silu", "identity")
INITS = ("cola", "svd")


def apply_act(h: torch.Tensor, act: str) -> torch.Tensor:
    """Apply the bottleneck activation ``act`` ("silu" or "identity")."""
    return F.silu(h) if act == "silu" else h


class CoLALinear(nn.Module):
    """Low-rank auto-encoder ``B·σ(A·x)`` standing in for an ``nn.Linear(d_in, d_out)``.

    ``cola_a`` (d_in→rank, no bias) and ``cola_b`` (rank→d_out, bias if the original had one) are
    ordinary ``nn.Linear`` modules, so quantizers, LoRA and optimizers see familiar parameters.
    When ``fused`` is true (default: on CUDA) the bottleneck runs as the custom op
    ``colafx::lowrank_act`` (the fused Triton kernel on CUDA). Under CoLA-M the A projection runs as
    ``colafx::lowrank_in`` instead, on every device, and its output ``A·x`` is what is kept.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False,
                 act: str = "silu", role: str = "", device=None, dtype=None):
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"unknown CoLA activation {act!r}; choose one of {ACTIVATIONS}")
        if not 0 < rank <= min(in_features, out_features):
            raise ValueError(f"rank {rank} must be in [1, min(d_in, d_out) = {min(in_features, out_features)}]")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.act, self.role = act, role
        self.fused: bool | None = None  # None: use the fused op on CUDA only
        self.cola_a = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.cola_b = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    def bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        """The rank-r activation ``σ(A·x)``."""
        a = self.cola_a
        use_op = self.fused if self.fused is not None else x.is_cuda
        # Under CoLA-M the A projection runs as colafx::lowrank_in (an instance forward): its output
        # A·x is what is kept, so the SiLU must not be fused into the GEMM there.
        if use_op and isinstance(a, nn.Linear) and "forward" not in vars(a):
            from colafx.kernels.lowrank import lowrank_act

            return lowrank_act(x, a.weight, self.act)
        return apply_act(a(x), self.act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cola_b(self.bottleneck(x))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"act={self.act}, bias={self.cola_b.bias is not None}, role={self.role!r}")

    @torch.no_grad()
    def reset_cola_(self, generator: torch.Generator | None = None) -> None:
        """The paper's init: A and B each ~ N(0, 1) / (r^¼ · (d_in + d_out)^¼); bias zero."""
        std = 1.0 / (self.rank ** 0.25 * (self.in_features + self.out_features) ** 0.25)
        for lin in (self.cola_a, self.cola_b):
            lin.weight.normal_(0.0, std, generator=generator)
        if self.cola_b.bias is not None:
            self.cola_b.bias.zero_()

    @torch.no_grad()
    def init_svd_(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Truncated SVD of ``weight`` [d_out, d_in]: A = √Σ·Vᵀ, B = U·√Σ (exact at full rank with
        ``act="identity"``); the bias is copied."""
        u, s, vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
        root = s[: self.rank].sqrt()
        self.cola_a.weight.copy_(root[:, None] * vh[: self.rank])
        self.cola_b.weight.copy_(u[:, : self.rank] * root[None, :])
        if bias is not None and self.cola_b.bias is not None:
            self.cola_b.bias.copy_(bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, act: str = "silu", init: str = "cola",
                    role: str = "", generator: torch.Generator | None = None) -> "CoLALinear":
        """Build a CoLA module shaped like ``linear`` (same device and dtype).

        Raises:
            ValueError: for an unknown ``init`` or ``act``, or a rank outside [1, min(d_in, d_out)].
        """
        if init not in INITS:
            raise ValueError(f"unknown CoLA init {init!r}; choose one of {INITS}")
        w = linear.weight
        module = cls(linear.in_features, linear.out_features, rank, bias=linear.bias is not None,
                     act=act, role=role, device=w.device, dtype=w.dtype)
        if w.device.type != "meta":
            if init == "svd":
                module.init_svd_(w, linear.bias)
            else:
                module.reset_cola_(generator)
        return module


def cola_param_count(d_in: int, d_out: int, rank: int, bias: bool) -> int:
    """Parameters of a CoLA module: r·(d_in + d_out) (+ d_out for the bias)."""
    return rank * (d_in + d_out) + (d_out if bias else 0)


def dense_param_count(d_in: int, d_out: int, bias: bool) -> int:
    """Parameters of a dense ``nn.Linear``."""
    return d_in * d_out + (d_out if bias else 0)


def resolve_rank(rank: int | float, d_model: int) -> int:
    """An int rank is used as is; a float in (0, 1] is a fraction of ``d_model``.

    Raises:
        ValueError: for a non-positive rank, a float above 1, or a non-number.
    """
    if isinstance(rank, bool) or not isinstance(rank, (int, float)):
        raise ValueError(f"rank must be an int or a float fraction of d_model, got {rank!r}")
    if isinstance(rank, float):
        if not 0.0 < rank <= 1.0 or math.isnan(rank):
            raise ValueError(f"fractional rank must be in (0, 1], got {rank}")
        return max(1, round(rank * d_model))
    if rank <= 0:
        raise ValueError(f"rank must be positive, got {rank}")
    return rank
