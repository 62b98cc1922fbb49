"""The ``torch.compile`` backend "colafx": colafx graph passes, then Inductor.

``torch.compile(model, backend="colafx", options={...})`` runs :mod:`colafx.passes.manager` over each
Dynamo graph — CoLA bottleneck lowering, quantized-linear lowering, recompute tagging (CoLA-M) — and
hands the result to Inductor's ``compile_fx``, whose min-cut partitioner honours the recompute tags
(Dynamo node metadata, including ``recompute``, is copied onto the joint graph's ATen nodes).

The backend is found by name through the ``torch_dynamo_backends`` entry point of the installed
package; :func:`register` also registers it explicitly (idempotent).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx

from colafx.passes.lowering import LowerBottlenecks, LowerQuantizedLinears
from colafx.passes.manager import PassManager, PassRecord, TagRecompute

BACKEND_NAME = "colafx"
COMPILERS = ("inductor", "aot_eager")


@dataclass(frozen=True)
class BackendOptions:
    """What ``options={...}`` of ``torch.compile(..., backend="colafx")`` may set.

    ``fuse_lowrank``: lower CoLA bottlenecks to ``colafx::lowrank_act`` — True, False, or "auto"
        (default: only when the graph runs on CUDA, where the op is the fused Triton kernel; on the
        CPU the op is the same two ATen calls plus a recomputed pre-activation in backward).
    ``quantized``: lower int8 dequantize+linear patterns to ``colafx::int8_linear``.
    ``act_bits``: activation bits for those lowered linears (16 keeps numerics, 8 = W8A8).
    ``recompute``: tag CoLA-M recompute boundaries: every op of a decoder block is recomputed in
        backward except the bottleneck pre-activations ``A·x`` (bottlenecks are then lowered to
        ``colafx::lowrank_in`` + SiLU on every device, so A never runs twice).
    ``dump``: folder for before/after graph dumps and summaries (default: ``COLAFX_DEBUG``).
    ``verbose``: print pass summaries (default: when dumping).
    ``compiler``: "inductor" (default) or "aot_eager" (AOT autograd with the min-cut partitioner
        but no code generation: fast, for debugging and tests).
    """

    fuse_lowrank: bool | str = "auto"
    quantized: bool = True
    act_bits: int = 16
    recompute: bool = False
    dump: str | os.PathLike | None = None
    verbose: bool | None = None
    compiler: str = "inductor"

    def __post_init__(self):
        if self.fuse_lowrank not in (True, False, "auto"):
            raise ValueError(f"fuse_lowrank must be True, False or 'auto', got {self.fuse_lowrank!r}")
        if self.act_bits not in (8, 16):
            raise ValueError(f"act_bits must be 8 or 16, got {self.act_bits!r}")
        if self.compiler not in COMPILERS:
            raise ValueError(f"compiler must be one of {COMPILERS}, got {self.compiler!r}")
        for name in ("quantized", "recompute"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.recompute and self.fuse_lowrank is False:
            raise ValueError("recompute=True needs fuse_lowrank (True or 'auto'): CoLA-M keeps the outputs "
                             "of the colafx::lowrank_in ops that fuse_lowrank inserts")

    @classmethod
    def from_dict(cls, options: dict[str, Any] | None) -> "BackendOptions":
        """Build options from a dict, rejecting unknown keys.

        Raises:
            ValueError: for an unknown key (the message lists the valid ones) or a bad value.
        """
        options = dict(options or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown colafx backend options {unknown}; valid options are {sorted(known)}")
        return cls(**options)


def build_pipeline(options: BackendOptions, on_cuda: bool = False) -> PassManager:
    """The pass pipeline that ``options`` select, in order: bottlenecks, quantized linears, recompute.

    A model with nothing to lower still gets a pipeline (its passes report that they found nothing).
    """
    passes = []
    if options.fuse_lowrank is True or (options.fuse_lowrank == "auto" and (on_cuda or options.recompute)):
        passes.append(LowerBottlenecks(keep_pre_activation=options.recompute))
    if options.quantized:
        passes.append(LowerQuantizedLinears(options.act_bits))
    if options.recompute:
        passes.append(TagRecompute())
    return PassManager(passes, dump=options.dump, verbose=options.verbose)


def colafx_backend(gm: fx.GraphModule, example_inputs: list, options: dict[str, Any] | None = None,
                   mode: str | None = None, **kwargs) -> Callable:
    """Dynamo backend: run the colafx passes on ``gm`` in place, then compile it.

    ``options`` (from ``torch.compile(..., options=...)``) and keyword arguments (e.g. through
    ``functools.partial``) are merged into :class:`BackendOptions`. ``mode`` is passed to Inductor.

    Raises:
        ValueError: for unknown or bad options.
        ImportError: ``recompute=True`` without :mod:`colafx.passes.recompute`.
    """
    opts = BackendOptions.from_dict({**(options or {}), **kwargs})
    if opts.recompute and not torch.is_grad_enabled():
        # An inference graph (Dynamo guards on grad mode) has no backward, so nothing to recompute;
        # AOT autograd also refuses recompute tags around RNG ops in such graphs.
        opts = dataclasses.replace(opts, recompute=False)
    on_cuda = any(isinstance(t, torch.Tensor) and t.is_cuda for t in example_inputs)
    records = build_pipeline(opts, on_cuda).run(gm)
    gm.meta["colafx_passes"] = records
    if opts.compiler == "aot_eager":
        return _aot_eager(gm, example_inputs)
    from torch._inductor.compile_fx import compile_fx

    patches = {} if mode in (None, "default") else _inductor_mode_patches(mode)
    return compile_fx(gm, example_inputs, config_patches=patches)


def pass_records(gm: fx.GraphModule) -> list[PassRecord]:
    """What the colafx passes did to a graph the backend compiled (empty if none ran)."""
    return list(gm.meta.get("colafx_passes", []))


def _aot_eager(gm: fx.GraphModule, example_inputs: list) -> Callable:
    from functorch.compile import min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func

    def nop(graph, _inputs):
        return make_boxed_func(graph.forward)

    def forward(graph, inputs):  # keep the partitioned forward: its extra outputs are what backward saves
        gm.meta["colafx_forward"] = graph
        return nop(graph, inputs)

    return aot_autograd(fw_compiler=forward, bw_compiler=nop,
                        partition_fn=min_cut_rematerialization_partition)(gm, example_inputs)


def _inductor_mode_patches(mode: str) -> dict[str, Any]:
    from torch._inductor import list_mode_options

    return list_mode_options(mode)


def register() -> None:
    """Register the backend under the name "colafx" unless it is already known.

    Safe to call any number of times. When the installed package's ``torch_dynamo_backends``
    entry point has already been discovered, Dynamo registers the backend itself on first use.
    """
    from torch._dynamo.backends import registry

    if BACKEND_NAME in registry._COMPILER_FNS or registry._BACKENDS.get(BACKEND_NAME) is not None:
        return
    registry.register_backend(colafx_backend, name=BACKEND_NAME)


register()
