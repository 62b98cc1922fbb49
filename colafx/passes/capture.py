"""Capture a model as an ATen-level FX graph with ``torch.export`` (non-strict, no KV cache).

Hugging Face causal LMs get example inputs built from their config; any other ``nn.Module`` passes
``example_inputs``. Capture runs on fake tensors without autograd, so models on the ``meta`` device
work too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class Captured:
    """An exported graph plus the mapping from its parameter inputs to parameter names."""

    graph: torch.fx.Graph
    param_names: dict[str, str]  # placeholder node name -> parameter FQN
    num_tokens: int  # tokens in the example batch (FLOPs are reported per token)
    exported: torch.export.ExportedProgram
    seq_len: int = 1  # sequence length of the token input


def is_hf_causal_lm(model: nn.Module) -> bool:
    """True for a Hugging Face ``PreTrainedModel`` that has a config with ``vocab_size``."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(model, PreTrainedModel) and hasattr(model.config, "vocab_size")


def default_example_inputs(model: nn.Module, seq_len: int = 256, batch_size: int = 1):
    """Return ``(args, kwargs)`` example inputs for a Hugging Face causal LM.

    Raises:
        ValueError: if ``model`` is not a Hugging Face model (pass ``example_inputs`` instead).
    """
    if not is_hf_causal_lm(model):
        raise ValueError(
            f"{type(model).__name__} is not a Hugging Face causal LM, so colafx cannot build example "
            "inputs for it: pass example_inputs=(args...) or ((args...), {kwargs...})")
    max_pos = getattr(model.config, "max_position_embeddings", None) or seq_len
    seq_len = min(seq_len, max_pos)
    device = _model_device(model)
    ids = torch.zeros(batch_size, seq_len, dtype=torch.long, device=device)
    return (), {"input_ids": ids, "use_cache": False}


def normalize_example_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    """Turn ``example_inputs`` (a tensor, a tuple of args, a dict of kwargs or ``(args, kwargs)``)
    into ``(args, kwargs)``.

    Raises:
        TypeError: for anything else.
    """
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if (isinstance(example_inputs, tuple) and len(example_inputs) == 2
            and isinstance(example_inputs[0], tuple) and isinstance(example_inputs[1], dict)):
        return example_inputs[0], example_inputs[1]
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise TypeError(f"example_inputs must be a tensor, tuple, dict or (args, kwargs), "
                    f"got {type(example_inputs).__name__}")


def capture(model: nn.Module, example_inputs: Any = None, seq_len: int = 256) -> Captured:
    """Export ``model`` with ``torch.export`` (non-strict) and return its graph.

    Raises:
        ValueError: if example inputs are needed and missing, or if export fails (the message
            carries the exporter's error).
    """
    if example_inputs is None:
        args, kwargs = default_example_inputs(model, seq_len)
    else:
        args, kwargs = normalize_example_inputs(example_inputs)
    was_training = model.training
    model.eval()
    try:
        # Without autograd: discovery needs the forward only, and some attention kernels
        # (FlexAttention on the CPU) refuse to trace when a backward could be asked for.
        with torch.no_grad():
            exported = torch.export.export(model, args, kwargs=kwargs, strict=False)
    except Exception as err:  # export raises many exception types; keep the cause attached
        raise ValueError(f"could not capture {type(model).__name__} with torch.export: {err}") from err
    finally:
        model.train(was_training)
    sig = exported.graph_signature
    param_names = dict(sig.inputs_to_parameters)
    tokens = _token_input(args, kwargs)
    return Captured(exported.graph_module.graph, param_names, _count_tokens(tokens), exported, _seq_len(tokens))


def _token_input(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The tensor that carries the tokens: ``input_ids`` / ``inputs_embeds``, else the first tensor
    the caller passed (never a buffer of the model, such as a RoPE cache)."""
    first = kwargs.get("input_ids", kwargs.get("inputs_embeds"))
    if first is None:
        first = next((a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)), None)
    return first


def _count_tokens(first: torch.Tensor | None) -> int:
    if first is None:
        return 1
    if first.dim() >= 3:  # embeddings: [batch, seq, d]
        return int(first.shape[0] * first.shape[1])
    return int(first.numel())


def _seq_len(first: torch.Tensor | None) -> int:
    if first is None or first.dim() == 0:
        return 1
    return int(first.shape[1] if first.dim() >= 2 else first.shape[0])


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
