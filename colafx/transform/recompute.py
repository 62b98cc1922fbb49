"""CoLA-M: per-block activation checkpointing that keeps only the rank-r bottleneck outputs.

``enable_recompute(model)`` wraps the forward of every decoder block that holds CoLA modules in
``torch.utils.checkpoint`` (non-reentrant, so keyword arguments such as Hugging Face's
``position_embeddings``/``attention_mask`` pass through and the RNG state of dropout is replayed).
With ``policy="cola-m"`` the checkpoint is selective: the A projection of every CoLA module in the
block runs as the custom op ``colafx::lowrank_in`` (``z = A·x``, the same ``F.linear``) and
:func:`colafx.passes.recompute.recompute_policy` keeps its rank-r output (``MUST_SAVE``) while
norms, SiLU, B projections, RoPE, attention and MLP products are recomputed in backward. Keeping
``z`` rather than ``σ(z)`` costs the same memory (r values per token and site) but lets the SiLU
backward use it directly, so the A projections are never run twice; keeping ``σ(z)`` would force
recomputing ``A·x`` for the SiLU derivative, i.e. the same work as full-block checkpointing. So
under CoLA-M every CoLA module runs ``colafx::lowrank_in`` + SiLU, also where it would otherwise use
the fused ``colafx::lowrank_act`` (on CUDA). Under ``torch.compile`` the same policy becomes
``node.meta["recompute"]`` tags on ``colafx::lowrank_in`` nodes. ``policy="full"`` checkpoints
whole blocks (only the block input is kept).

Blocks run without checkpointing when autograd is off (``torch.no_grad``, ``generate``). A
checkpointed block must be a pure function of its tensor inputs, so state that the block mutates in
forward is kept out of it. KV caches are recognised by what they do, not by the keyword that carries
them (``cache=``, ``past_key_values=``, ``layer_past=`` ... differ between models and releases): any
argument that is a ``transformers`` ``Cache`` or has a cache's ``update`` and ``get_seq_length``
methods. An empty one (what HF models create for a plain training call) is replaced by ``None`` and
``use_cache`` turned off, as Hugging Face gradient checkpointing does; a filled one makes the block run
without checkpointing, with a warning (a recompute would append to it a second time).
"""
from __future__ import annotations

import functools
import types
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

from colafx.kernels.lowrank import lowrank_in
from colafx.passes.projections import BLOCK_ROLES
from colafx.passes.recompute import find_blocks, recompute_policy
from colafx.transform.modules import CoLALinear

POLICIES = ("cola-m", "full")
_STATE = "_colafx_recompute"


@dataclass
class _BlockState:
    """What enable_recompute changed on one block, so disable_recompute can undo it."""

    policy: str
    own_forward: object | None  # an instance-level forward that was there before (e.g. accelerate hooks)
    a_projections: list[str] = field(default_factory=list)  # A projections switched to colafx::lowrank_in


def _a_projection_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """Instance forward of a CoLA module's A projection under CoLA-M (bias-free ``nn.Linear``); a
    plain linear when autograd is off (inference and export graphs never see the op)."""
    if not torch.is_grad_enabled():
        return F.linear(x, self.weight)
    return lowrank_in(x, self.weight)


def _sac_policy(ctx, func, *args, **kwargs):
    return recompute_policy(func)


def _sac_context():
    return create_selective_checkpoint_contexts(_sac_policy)


def decoder_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """The decoder blocks of a colaified model: ``{module name: module}``.

    Found from the module paths of the CoLA modules with attention/MLP roles (see
    :func:`colafx.passes.recompute.find_blocks`): e.g. ``model.layers.0`` ... of an HF Llama.

    Raises:
        ValueError: if the model has no CoLA modules, or no block module can be identified.
    """
    sites = [name for name, m in model.named_modules() if isinstance(m, CoLALinear)]
    if not sites:
        raise ValueError(f"{type(model).__name__} has no CoLA modules; call colafx.colaify(model) before "
                         "enable_recompute (CoLA-M checkpoints the blocks that hold CoLA modules)")
    in_blocks = [n for n in sites if model.get_submodule(n).role in BLOCK_ROLES] or sites
    chains = [[".".join(parts[:i]) for i in range(1, len(parts))] for parts in (n.split(".") for n in in_blocks)]
    names = find_blocks(chains, lambda name: type(model.get_submodule(name)))
    blocks = {name: model.get_submodule(name) for name in names}
    bad = [n for n, b in blocks.items() if isinstance(b, (nn.ModuleList, nn.ModuleDict))]
    if not blocks or bad:
        raise ValueError(f"cannot identify the decoder blocks of {type(model).__name__} from its CoLA "
                         f"modules {sites[:4]}...: expected them inside repeated block modules")
    return blocks


def enable_recompute(model: nn.Module, policy: str = "cola-m") -> nn.Module:
    """Turn on activation checkpointing per decoder block of a colaified model, in place.

    Args:
        policy: ``"cola-m"`` keeps only the rank-r bottleneck activations (``A·x``, or ``σ(A·x)`` of
            fused CoLA modules; plus the block input) and recomputes the rest; ``"full"`` keeps
            only the block input. Calling again
            with another policy replaces the previous one.

    Returns:
        the same ``model``.

    Raises:
        ValueError: for an unknown policy, a model without CoLA modules or identifiable blocks, or
            a model with Hugging Face activation (gradient) checkpointing on (CoLA-M replaces it:
            call ``model.activation_checkpointing_disable()`` first; before transformers 5.25,
            ``gradient_checkpointing_disable``).
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown recompute policy {policy!r}; choose one of {POLICIES}")
    blocks = decoder_blocks(model)
    if any(getattr(b, "gradient_checkpointing", False) for b in blocks.values()):
        raise ValueError("Hugging Face gradient checkpointing is enabled on this model; CoLA-M replaces it: "
                         f"call model.{_hf_checkpointing_disable()}() before enable_recompute")
    disable_recompute(model)
    for block in blocks.values():
        state = _BlockState(policy, block.__dict__.get("forward"))
        if policy == "cola-m":
            for name, m in block.named_modules():
                a = getattr(m, "cola_a", None)
                if isinstance(m, CoLALinear) and type(a) is nn.Linear and a.bias is None and "forward" not in vars(a):
                    a.forward = types.MethodType(_a_projection_forward, a)
                    state.a_projections.append(f"{name}.cola_a")
        block.__dict__[_STATE] = state
        block.forward = types.MethodType(_checkpointed_forward, block)
    return model


def disable_recompute(model: nn.Module) -> nn.Module:
    """Undo :func:`enable_recompute`: restore each block's forward and its CoLA modules' A projections.
    A model without recompute is returned unchanged. Returns the same ``model``."""
    for block in model.modules():
        state = block.__dict__.pop(_STATE, None)
        if state is None:
            continue
        if state.own_forward is None:
            del block.forward
        else:
            block.forward = state.own_forward
        for name in state.a_projections:
            del block.get_submodule(name).forward
    return model


def recompute_policy_of(model: nn.Module) -> str | None:
    """The recompute policy enabled on ``model`` (``"cola-m"`` / ``"full"``), or ``None``."""
    return next((m.__dict__[_STATE].policy for m in model.modules() if _STATE in m.__dict__), None)


def _hf_checkpointing_disable() -> str:
    """The name of the Hugging Face method that turns checkpointing off: transformers 5.25 renamed
    ``gradient_checkpointing_disable`` (deprecated, removed in v6) to ``activation_checkpointing_disable``."""
    from transformers import PreTrainedModel

    renamed = hasattr(PreTrainedModel, "activation_checkpointing_disable")
    return "activation_checkpointing_disable" if renamed else "gradient_checkpointing_disable"


def _checkpointed_forward(self: nn.Module, *args, **kwargs):
    state: _BlockState = self.__dict__[_STATE]
    forward = state.own_forward or functools.partial(type(self).forward, self)
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    if self.training and getattr(self, "gradient_checkpointing", False):
        raise RuntimeError("Hugging Face gradient checkpointing was enabled after colafx.enable_recompute; "
                           f"use one of them (model.{_hf_checkpointing_disable()}() on the model or "
                           "colafx.disable_recompute)")
    args, kwargs, filled = _drop_caches(args, kwargs)
    if filled:
        warnings.warn(f"{type(self).__name__} got a filled KV cache with autograd on: running it without "
                      "recompute (a recompute would write the cache twice)", stacklevel=2)
        return forward(*args, **kwargs)
    context_fn = _sac_context if state.policy == "cola-m" else None
    extra = {"context_fn": context_fn} if context_fn else {}
    return checkpoint(forward, *args, use_reentrant=False, **extra, **kwargs)


def is_cache(obj) -> bool:
    """True if ``obj`` behaves as a KV cache: a ``transformers`` ``Cache``, or any object with callable
    ``update`` and ``get_seq_length`` (the two methods attention layers use to write and size it)."""
    if isinstance(obj, (torch.Tensor, str, bytes, int, float, bool, type(None), tuple, list, dict)):
        return False
    try:
        from transformers.cache_utils import Cache
    except ImportError:  # pragma: no cover - transformers is a dependency
        Cache = ()
    if Cache and isinstance(obj, Cache):
        return True
    return callable(getattr(obj, "update", None)) and callable(getattr(obj, "get_seq_length", None))


def _drop_caches(args: tuple, kwargs: dict) -> tuple[tuple, dict, bool]:
    """Replace every empty cache among the arguments by ``None`` (and ``use_cache`` by ``False``).

    Returns the new ``(args, kwargs, filled)``; when a cache holds tokens, ``filled`` is True and the
    arguments come back unchanged, since the block must then run without checkpointing.
    """
    caches = [a for a in (*args, *kwargs.values()) if is_cache(a)]
    if not caches:
        return args, kwargs, False
    if any(int(c.get_seq_length()) != 0 for c in caches):
        return args, kwargs, True
    args = tuple(None if is_cache(a) else a for a in args)
    kwargs = {k: None if is_cache(v) else v for k, v in kwargs.items()}
    if kwargs.get("use_cache"):
        kwargs["use_cache"] = False
    return args, kwargs, False
