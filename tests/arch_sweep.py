"""Tiny random builds of the decoder-only ``*ForCausalLM`` classes that the installed transformers
ships, and the roles their decoder-layer projections should get: the architecture sweep's helpers.

The expected roles come from module *names* (a test oracle only: colafx itself never reads names).
"""
from __future__ import annotations

import inspect
import re

import torch
from torch import nn

# Small sizes under every common spelling; a config ignores the keys it does not know.
TINY = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, vocab_size=128, max_position_embeddings=128, moe_intermediate_size=32,
    shared_expert_intermediate_size=32, num_local_experts=4, num_experts=4, n_routed_experts=4,
    num_experts_per_tok=2, n_shared_experts=1, n_group=1, topk_group=1, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8,
    qk_nope_head_dim=8, v_head_dim=16, first_k_dense_replace=1, sliding_window=64, n_embd=64, n_layer=2,
    n_head=4, n_positions=128, d_model=64, ffn_dim=128, tie_word_embeddings=False, pad_token_id=0,
    bos_token_id=1, eos_token_id=2, use_cache=True,
)

MAX_PARAMS = 5_000_000

# name of a Linear (last path component) -> role; "o|down" picks by the enclosing attention/MLP module.
NAME_ROLES = {
    "q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "query": "q", "key": "k", "value": "v",
    "out_proj": "o", "qkv_proj": "qkv", "query_key_value": "qkv", "Wqkv": "qkv", "c_attn": "qkv", "wqkv": "qkv",
    "gate_proj": "gate", "up_proj": "up", "down_proj": "down", "gate_up_proj": "gate_up", "fc1": "up",
    "fc2": "down", "c_fc": "up", "fc_in": "up", "fc_out": "down", "dense_h_to_4h": "up", "dense_4h_to_h": "down",
    "w1": "gate", "w3": "up", "w2": "down", "dense": "o|down", "c_proj": "o|down",
}
FUSED = {"qkv": {"qkv", "q", "k", "v", "kv", "qk", "qv"}, "gate_up": {"gate_up", "gate", "up"}}


def causal_lm_classes() -> list[tuple[str, str]]:
    """``(model_type, class name)`` for every causal-LM class of the installed transformers."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items())


def build_tiny(model_type: str, class_name: str) -> nn.Module:
    """A tiny random ``class_name`` in fp32 eval mode (raises whatever the config or class raises)."""
    import transformers
    from transformers import CONFIG_MAPPING

    config_class = CONFIG_MAPPING[model_type]
    sizes = dict(TINY)
    names = set(inspect.signature(config_class.__init__).parameters) | set(getattr(config_class, "__dataclass_fields__", {}))
    if "qk_rope_head_dim" in names:  # multi-head latent attention: RoPE runs on qk_rope_head_dim
        sizes["head_dim"] = sizes["qk_rope_head_dim"]
    if "rotary_dim" in names:
        sizes["rotary_dim"] = 8
    config = config_class(**sizes)
    if getattr(config, "is_encoder_decoder", False):
        raise TypeError("encoder-decoder")
    cls = getattr(transformers, class_name)
    config._attn_implementation = "sdpa" if cls._supports_sdpa else "eager"
    with torch.device("meta"):  # count first: a config that ignores the tiny sizes may be huge
        size = sum(p.numel() for p in cls(config).parameters())
    if size > MAX_PARAMS:
        raise TooLarge(f"{size / 1e6:.0f}M parameters with the tiny sizes (its config uses other size keys)")
    torch.manual_seed(0)
    model = cls(config).float().eval()
    if hasattr(model, "set_default_language"):  # X-MOD's language adapters
        model.set_default_language(next(iter(config.languages)))
    return model


class TooLarge(ValueError):
    """The class cannot be built tiny from the common size keys."""


def decoder_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The repeated decoder layers: the children of the largest ModuleList whose items hold Linears."""
    best = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) >= 2:
            items = [(f"{name}.{i}", m) for i, m in enumerate(module)]
            if all(any(isinstance(x, nn.Linear) for x in m.modules()) for _, m in items) and len(items) > len(best):
                best = items
    return best


def expected_sites(model: nn.Module) -> dict[str, str | None]:
    """``{linear FQN: expected role or None (any attention/MLP role)}`` for the Linears inside the decoder
    layers, routers (a Linear to as many outputs as there are experts, under an MoE module) excluded."""
    n_experts = {getattr(model.config, k, None) for k in ("num_local_experts", "num_experts", "n_routed_experts")}
    out = {}
    for layer_name, layer in decoder_layers(model):
        for name, m in layer.named_modules():
            if not isinstance(m, nn.Linear):
                continue
            full = f"{layer_name}.{name}"
            leaf = name.rsplit(".", 1)[-1]
            if (m.out_features in n_experts or m.out_features == 1) and re.search(r"gate|router|wg", name):
                continue
            role = NAME_ROLES.get(leaf)
            if role == "o|down":
                role = "o" if re.search(r"attn|attention", name) else "down" if re.search(r"mlp|ffn|feed", name) else None
            out[full] = role
    return out


def role_ok(expected: str | None, got: str) -> bool:
    from colafx.passes.projections import BLOCK_ROLES

    if got not in BLOCK_ROLES:
        return False
    return expected is None or got == expected or got in FUSED.get(expected, ()) or expected in FUSED.get(got, ())
