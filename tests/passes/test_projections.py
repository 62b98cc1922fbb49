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


BLOCK0 = {"wq": "q", "wk": "k", "wv": "v", "wo": "o", "w1": "gate", "w3": "up", "w2": "down"}


@pytest.mark.parametrize("attention", ["eager", "softcap", "einsum", "where", "flex"])
def test_attention_cores_written_differently(attention):
    """Soft-capped scores, einsum matmuls, where-masking and FlexAttention are all attention cores."""
    from tests.llama_plain import PlainLlama

    roles = roles_by_name(PlainLlama(attention=attention), (torch.zeros(1, 12, dtype=torch.long),))
    for i in range(2):
        assert {n.split(".")[-1]: r for n, r in roles.items() if n.startswith(f"blocks.{i}.")} == BLOCK0


@pytest.mark.parametrize("act", ["gelu_new", "relu2", "where"])
@pytest.mark.parametrize("gated", [True, False])
def test_activation_is_any_elementwise_function(act, gated):
    """gelu_new written out, relu(x)**2 and a where-built leaky ReLU are activations, gated or not."""
    roles = roles_by_name(PlainLlama(act=act, gated=gated), (torch.zeros(1, 12, dtype=torch.long),))
    expected = dict(BLOCK0) if gated else {**{k: v for k, v in BLOCK0.items() if k != "w3"}, "w1": "up"}
    for i in range(2):
        assert {n.split(".")[-1]: r for n, r in roles.items() if n.startswith(f"blocks.{i}.")} == expected


def test_affine_branch_is_not_an_activation():
    """w2(w1(x) * 2 * w3(x)) has no activation: no gate/up/down roles."""
    class Bilinear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w1, self.w3, self.w2 = torch.nn.Linear(8, 16), torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)

        def forward(self, x):
            return x + self.w2(self.w1(x) * 2.0 * self.w3(x))

    roles = roles_by_name(Bilinear(), (torch.randn(2, 8),))
    assert set(roles.values()) <= {"other", "lm_head"}


@pytest.mark.parametrize("kind,extra", [("Gemma2", {}), ("Phi", {}), ("Llama", {"attn_implementation": "flex_attention"})])
def test_hf_families_with_softcap_gelu_new_and_flex(kind, extra):
    model = _tiny_hf(kind, **extra)
    sites, _ = find_projections(capture(model, seq_len=16))
    counts = {}
    for s in sites:
        counts[s.role] = counts.get(s.role, 0) + 1
    mlp = {"up": 2, "down": 2} if kind == "Phi" else {"gate": 2, "up": 2, "down": 2}
    assert counts == {"q": 2, "k": 2, "v": 2, "o": 2, **mlp, "lm_head": 1}


def test_moe_router_and_stacked_experts():
    model = _tiny_hf("Mixtral", num_local_experts=4, num_experts_per_tok=2)
    sites, _ = find_projections(capture(model, seq_len=16))
    by_name = {s.name: s for s in sites}
    assert by_name["model.layers.0.mlp.gate"].role == "router"
    experts = by_name["model.layers.0.mlp.experts.gate_up_proj"]
    assert (experts.role, experts.count, experts.d_in, experts.d_out) == ("experts", 4, 64, 256)
    assert by_name["model.layers.1.mlp.experts.down_proj"].role == "experts"
    assert {s.role for s in sites if ".self_attn." in s.name} == {"q", "k", "v", "o"}


def test_einsum_attention_flops_counted():
    """Attention FLOPs are the same whether the core is written with matmul or einsum."""
    flops = {}
    for attention in ("eager", "einsum"):
        _, flops[attention] = find_projections(capture(PlainLlama(attention=attention),
                                                       (torch.zeros(1, 12, dtype=torch.long),)))
    assert flops["einsum"] == pytest.approx(flops["eager"]) and flops["eager"] > 0
