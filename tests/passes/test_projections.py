"""Discovery of dense projections and their roles, by dataflow only."""
import pytest
import torch

from colafx.passes.capture import capture
from colafx.passes.projections import find_projections
from tests.llama_plain import PlainLlama

EXPECTED_SEPARATE = {"q", "k", "v", "o", "gate", "up", "down"}


def roles_by_name(model, example_inputs=None, seq_len=16):
    sites, _ = find_projections(capture(model, example_inputs, seq_len))
    return {s.name: s.role for s in sites}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_hf_llama_roles(attn):
    from colafx import presets

    roles = roles_by_name(presets.build("llama-tiny", attn_implementation=attn))
    for i in range(2):
        for proj, role in [("self_attn.q_proj", "q"), ("self_attn.k_proj", "k"), ("self_attn.v_proj", "v"),
                           ("self_attn.o_proj", "o"), ("mlp.gate_proj", "gate"), ("mlp.up_proj", "up"),
                           ("mlp.down_proj", "down")]:
            assert roles[f"model.layers.{i}.{proj}"] == role
    assert roles["lm_head"] == "lm_head"
    assert len(roles) == 15


def _tiny_hf(kind, **extra):
    import transformers

    cfg_cls = getattr(transformers, f"{kind}Config")
    cfg = cfg_cls(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, **extra)
    torch.manual_seed(0)
    return getattr(transformers, f"{kind}ForCausalLM")(cfg)


@pytest.mark.parametrize("kind", ["Mistral", "Qwen2"])
def test_other_hf_families(kind):
    model = _tiny_hf(kind)
    sites, _ = find_projections(capture(model, seq_len=16))
    by_role = {}
    for s in sites:
        by_role.setdefault(s.role, []).append(s)
    assert {r: len(v) for r, v in by_role.items()} == {
        "q": 2, "k": 2, "v": 2, "o": 2, "gate": 2, "up": 2, "down": 2, "lm_head": 1}
    if kind == "Qwen2":  # Qwen2 keeps a bias on q/k/v only
        assert all(s.bias for s in by_role["q"] + by_role["k"] + by_role["v"])
        assert not any(s.bias for s in by_role["o"] + by_role["down"])


@pytest.mark.parametrize("eager", [False, True])
def test_plain_llama_unusual_names(eager):
    model = PlainLlama(eager_attention=eager)
    roles = roles_by_name(model, (torch.zeros(1, 12, dtype=torch.long),))
    for i in range(2):
        got = {n.split(".")[-1]: r for n, r in roles.items() if n.startswith(f"blocks.{i}.")}
        assert got == {"wq": "q", "wk": "k", "wv": "v", "wo": "o", "w1": "gate", "w3": "up", "w2": "down"}
    assert roles["out"] == "lm_head"
    # The decoy named q_proj is a value head on the final hidden state: not part of any block.
    assert roles["q_proj"] == "lm_head"


def test_plain_llama_fused_projections():
    model = PlainLlama(fused=True)
    roles = roles_by_name(model, (torch.zeros(1, 12, dtype=torch.long),))
    for i in range(2):
        assert roles[f"blocks.{i}.wqkv"] == "qkv"
        assert roles[f"blocks.{i}.w13"] == "gate_up"
        assert roles[f"blocks.{i}.wo"] == "o"
        assert roles[f"blocks.{i}.w2"] == "down"


def test_plain_mlp_without_gate():
    class Mlp(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.head = torch.nn.Linear(8, 32), torch.nn.Linear(32, 8), torch.nn.Linear(8, 3)

        def forward(self, x):
            return self.head(x + self.b(torch.nn.functional.gelu(self.a(x))))

    roles = roles_by_name(Mlp(), (torch.randn(2, 8),))
    assert roles == {"a": "up", "b": "down", "head": "lm_head"}


def test_site_shapes_and_params():
    from colafx import presets

    sites, other = find_projections(capture(presets.build("llama-tiny"), seq_len=16))
    k = next(s for s in sites if s.name == "model.layers.0.self_attn.k_proj")
    assert (k.d_in, k.d_out, k.bias, k.param) == (64, 32, False, "model.layers.0.self_attn.k_proj.weight")
    # attention FLOPs per token: layers * 2 * heads * seq * (d_q + d_v)
    assert other == pytest.approx(2 * 2 * 4 * 16 * (16 + 16))


def test_tied_head_maps_to_its_linear():
    from colafx import presets

    model = presets.build("llama-tiny", tie_word_embeddings=True)
    roles = roles_by_name(model)
    assert roles.get("lm_head") == "lm_head"


def test_capture_needs_inputs_for_plain_models():
    with pytest.raises(ValueError, match="example_inputs"):
        capture(PlainLlama())
