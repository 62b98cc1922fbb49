"""Presets: the paper's shapes, a tiny test preset, meta-device builds, clear errors."""
import pytest
import torch

from colafx import presets


def test_paper_shapes():
    p = presets.get("llama-350m")
    cfg = presets.build("llama-350m", device="meta").config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (1024, 2736, 24, 16)
    assert cfg.vocab_size == 32000 and cfg.tie_word_embeddings is False and cfg.rms_norm_eps == 1e-6
    assert (p.rank, p.lr, p.steps, p.warmup) == (256, 3e-3, 60_000, 6_000)


def test_meta_build_allocates_nothing():
    model = presets.build("llama-7b", device="meta")
    assert all(t.is_meta for t in model.parameters())


def test_tiny_preset_and_overrides():
    model = presets.build("llama-tiny", vocab_size=100, num_hidden_layers=1)
    assert model.config.vocab_size == 100 and len(model.model.layers) == 1
    assert model.config.hidden_size <= 128


def test_seed_makes_builds_identical():
    a, b = presets.build("llama-tiny", seed=3), presets.build("llama-tiny", seed=3)
    assert torch.equal(a.lm_head.weight, b.lm_head.weight)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'llama-3b'.*llama-60m"):
        presets.build("llama-3b")
