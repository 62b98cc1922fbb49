"""QuZO / MeZO: zeroth-order optimizers that train with forward passes only.

One query: draw a seed, perturb every trainable tensor by +ε·u in place, loss L₊; by −2ε·u, L₋;
+ε·u restores it (bit-exactly on integer weights). g = (L₊ − L₋) / 2ε. The update regenerates u
from the seed: θ ← θ − η·(g·u + wd·θ), stochastically rounded onto the integer grid for quantized
weights (QuZO: an independent rounding u₂ of the same Gaussian, or the perturbation's own rounding
with ``same_rounding=True`` as the authors' released code does). u is never stored.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from torch import nn

from colafx.transform.quantize import QuantLinear

METHODS = ("quzo", "mezo")
SCHEDULES = ("constant", "linear", "cosine")


def lr_factor(schedule: str, step: int, total_steps: int, warmup: int = 0) -> float:
    """Multiplier of the base LR at ``step``: linear warmup, then constant / linear / cosine decay to 0.

    Raises:
        ValueError: unknown schedule.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown LR schedule {schedule!r}; choose one of {SCHEDULES}")
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total_steps <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / (total_steps - warmup))
    return 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))


class QuZO:
    """Zeroth-order optimizer over float tensors and :class:`QuantLinear` integer weights.

    ``params``: float tensors (perturbed as MeZO does) and/or ``QuantLinear`` modules (``quzo`` only:
    perturbed and updated on their integer grid; they must be quantized with ZO head-room).
    ``n_queries`` seeds per step, their estimates averaged. ``step(closure)`` calls ``closure()``
    (no grad, returns the loss) 2·n times and returns the mean loss.

    Raises (constructor):
        ValueError: unknown method or schedule, lr/eps not positive, n_queries < 1, nothing to train,
            integer weights with ``method="mezo"`` or without head-room.
    """

    def __init__(self, params: Iterable, lr: float = 1e-6, eps: float = 1e-3, weight_decay: float = 0.0,
                 method: str = "quzo", n_queries: int = 1, same_rounding: bool = False, seed: int = 0,
                 schedule: str = "constant", total_steps: int = 0, warmup: int = 0):
        if method not in METHODS:
            raise ValueError(f"unknown zeroth-order method {method!r}; choose one of {METHODS}")
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown LR schedule {schedule!r}; choose one of {SCHEDULES}")
        if not lr > 0 or not eps > 0:
            raise ValueError(f"lr and eps must be positive, got lr={lr}, eps={eps}")
        if n_queries < 1:
            raise ValueError(f"n_queries must be >= 1, got {n_queries}")
        self.targets = list(params)
        if not self.targets:
            raise ValueError("QuZO got no tensors to train")
        for t in self.targets:
            if isinstance(t, QuantLinear):
                if method == "mezo":
                    raise ValueError("method='mezo' trains float weights; integer weights need method='quzo'")
                from colafx.kernels.zo import ZO_QMAX

                if t.zero is not None:
                    raise ValueError("QuZO cannot train asymmetric int4 weights (zero points): quantize with "
                                     "QuantConfig(symmetric=True, zo_headroom=True)")
                if t.qmax is None or t.qmax > ZO_QMAX[t.bits]:
                    raise ValueError(f"QuantLinear with qmax={t.qmax} has no ZO head-room: quantize with "
                                     "QuantConfig(zo_headroom=True)")
            elif not (isinstance(t, torch.Tensor) and t.is_floating_point()):
                raise ValueError(f"QuZO trains float tensors or QuantLinear modules, got {type(t).__name__}")
        self.lr, self.eps, self.weight_decay = lr, eps, weight_decay
        self.method, self.n_queries, self.same_rounding = method, n_queries, same_rounding
        self.seed, self.schedule, self.total_steps, self.warmup = seed, schedule, total_steps, warmup
        self.step_count = 0

    def current_lr(self) -> float:
        """The LR the next step uses (base LR times the schedule's factor)."""
        return self.lr * lr_factor(self.schedule, self.step_count, self.total_steps, self.warmup)

    def _seed(self, query: int, index: int) -> int:
        from colafx.kernels.quant import derive_seed

        return derive_seed(derive_seed(self.seed, self.step_count * self.n_queries + query), index)

    def _perturb(self, query: int, sign: int) -> None:
        from colafx.kernels.zo import zo_perturb_, zo_perturb_int_

        for i, t in enumerate(self.targets):
            if isinstance(t, QuantLinear):
                zo_perturb_int_(t.qweight, t.scale, self._seed(query, i), self.eps, sign, t.bits)
            else:
                zo_perturb_(t.data, self._seed(query, i), sign * self.eps)

    def _update(self, query: int, grad: float, lr: float) -> None:
        from colafx.kernels.zo import zo_update_

        for i, t in enumerate(self.targets):
            if isinstance(t, QuantLinear):
                zo_update_(t.qweight, self._seed(query, i), lr, grad, self.weight_decay, w_scale=t.scale,
                           bits=t.bits, same_rounding=self.same_rounding)
            else:
                zo_update_(t.data, self._seed(query, i), lr, grad, self.weight_decay)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor]) -> float:
        """One ZO step (n_queries two-point estimates); returns the mean of the losses seen.

        Raises:
            FloatingPointError: a loss is NaN or infinite (weights are restored, no update made).
        """
        grads, losses = [], []
        for q in range(self.n_queries):
            self._perturb(q, +1)
            loss_plus = float(closure())
            self._perturb(q, -2)
            loss_minus = float(closure())
            self._perturb(q, +1)
            if not (math.isfinite(loss_plus) and math.isfinite(loss_minus)):
                raise FloatingPointError(f"step {self.step_count}: loss is not finite "
                                         f"(L+={loss_plus}, L-={loss_minus}); lower the LR or eps")
            grads.append((loss_plus - loss_minus) / (2 * self.eps))
            losses += [loss_plus, loss_minus]
        lr = self.current_lr() / self.n_queries
        for q, g in enumerate(grads):
            self._update(q, g, lr)
        self.step_count += 1
        self.last_grads = grads
        return sum(losses) / len(losses)

    def state_dict(self) -> dict:
        """JSON-able state (the seeds are derived from ``seed`` and the step count)."""
        return {"step_count": self.step_count, "seed": self.seed, "lr": self.lr, "eps": self.eps,
                "method": self.method}

    def load_state_dict(self, state: dict) -> None:
        """Restore the step count (and seed) saved by :meth:`state_dict`."""
        self.step_count, self.seed = int(state["step_count"]), int(state["seed"])


def zo_targets(model: nn.Module, trainable: str = "all") -> list:
    """The tensors / integer modules to train: ``"all"`` projections (QuantLinear modules, or the
    float weights of ``nn.Linear`` projections except the logits head), ``"cola"`` (only the CoLA
    factors) or ``"lora"`` (only the LoRA adapters).

    Raises:
        ValueError: unknown set, or the model has none of it.
    """
    from colafx.transform.modules import CoLALinear

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if trainable == "lora":
        out = [p for n, p in model.named_parameters() if "lora_" in n]
    elif trainable in ("all", "cola"):
        if trainable == "cola":
            scopes = [m for m in model.modules() if isinstance(m, CoLALinear)]
            modules = [m for s in scopes for m in s.modules()]
        else:
            modules = list(model.modules())
        out = [m if isinstance(m, QuantLinear) else m.weight for m in modules
               if (isinstance(m, QuantLinear) or type(m) is nn.Linear) and m is not head]
    else:
        raise ValueError(f"unknown trainable set {trainable!r}; choose 'all', 'cola' or 'lora'")
    if not out:
        raise ValueError(f"the model has nothing to train for trainable={trainable!r}")
    return out
