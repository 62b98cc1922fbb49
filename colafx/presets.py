"""LLaMA presets of the CoLA paper (GaLore's model sizes) plus tiny presets for tests.

``build(name)`` returns a Hugging Face ``LlamaForCausalLM`` with random weights; the paper's CoLA
rank and training recipe travel with each preset (``get(name).rank``, ``.lr``, ...).
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Preset:
    """One model size with the paper's CoLA rank and pre-training recipe."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    rank: int
    lr: float
    steps: int
    warmup: int
    num_kv_heads: int | None = None
    vocab_size: int = 32000
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0

    def hf_config(self, **overrides):
        """Return the ``transformers.LlamaConfig`` of this preset, with ``overrides`` applied."""
        from transformers import LlamaConfig

        kwargs = dict(
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads or self.num_heads,
            vocab_size=self.vocab_size,
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            tie_word_embeddings=False,
            hidden_act="silu",
            attention_bias=False,
            mlp_bias=False,
        )
        kwargs.update(overrides)
        return LlamaConfig(**kwargs)


_PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset("llama-60m", 512, 1376, 8, 8, rank=128, lr=6e-3, steps=10_000, warmup=2_000),
        Preset("llama-130m", 768, 2048, 12, 12, rank=256, lr=3e-3, steps=20_000, warmup=2_000),
        Preset("llama-350m", 1024, 2736, 24, 16, rank=256, lr=3e-3, steps=60_000, warmup=6_000),
        Preset("llama-1b", 2048, 5461, 24, 32, rank=512, lr=2e-3, steps=100_000, warmup=10_000),
        Preset("llama-7b", 4096, 11008, 32, 32, rank=1024, lr=1e-3, steps=150_000, warmup=15_000),
        # Test/demo sizes (not from the paper). llama-tiny uses grouped-query attention on purpose.
        Preset("llama-tiny", 64, 176, 2, 4, rank=16, lr=3e-3, steps=200, warmup=20,
               num_kv_heads=2, vocab_size=512, max_position_embeddings=512),
        Preset("llama-small", 256, 688, 4, 4, rank=64, lr=3e-3, steps=600, warmup=60,
               vocab_size=4096, max_position_embeddings=1024),
    ]
}


def names() -> list[str]:
    """Return the names of all presets."""
    return list(_PRESETS)


def get(name: str) -> Preset:
    """Return the preset called ``name``.

    Raises:
        ValueError: if no preset has that name (the message lists the valid names).
    """
    try:
        return _PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(_PRESETS)}") from None


def build(name: str, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
          seed: int | None = None, **overrides):
    """Build a randomly initialised ``LlamaForCausalLM`` for preset ``name``.

    ``device="meta"`` builds the model without allocating memory (enough to ``plan`` a 7B model).
    ``overrides`` are passed to ``LlamaConfig`` (e.g. ``vocab_size=...``, ``num_hidden_layers=...``).

    Raises:
        ValueError: for an unknown preset name.
    """
    from transformers import LlamaForCausalLM

    config = get(name).hf_config(**overrides)
    if seed is not None:
        torch.manual_seed(seed)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = LlamaForCausalLM(config)
    if dtype is not None:
        model = model.to(dtype)
    return model


def describe(name: str) -> dict:
    """Return the preset's fields as a plain dict (for logs and configs)."""
    return dataclasses.asdict(get(name))

