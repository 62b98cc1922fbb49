"""plan() and colaify(): ranks, parameter and FLOP accounting, matching rules, errors."""
import copy

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import colafx
from colafx import presets
from colafx.transform.modules import CoLALinear
from tests.llama_plain import PlainLlama

PAPER_PARAMS = {  # REFERENCE.md §1 (millions, 2 decimals): dense, CoLA at the paper rank
    "llama-60m": (58.07, 42.77), "llama-130m": (134.11, 94.00), "llama-350m": (367.97, 185.22),
    "llama-1b": (1339.08, 609.31), "llama-7b": (6738.42, 2820.94),
}


def closed_form(p):
    """Dense and CoLA parameter counts of a LLaMA preset (untied head, no bias)."""
    d, ff, r, L, V = p.hidden_size, p.intermediate_size, p.rank, p.num_layers, p.vocab_size
    kv = d * (p.num_kv_heads or p.num_heads) // p.num_heads
    dense_block = 2 * d * d + 2 * d * kv + 3 * d * ff + 2 * d
    cola_block = r * (d + d) * 2 + r * (d + kv) * 2 + 3 * r * (d + ff) + 2 * d
    shared = 2 * V * d + d
    return L * dense_block + shared, L * cola_block + shared


@pytest.mark.parametrize("name", list(PAPER_PARAMS))
def test_plan_matches_paper_and_closed_form(name):
    preset = presets.get(name)
    p = colafx.plan(presets.build(name, device="meta"), rank=preset.rank, seq_len=64)
    dense, cola = closed_form(preset)
    assert (p.params_before, p.params_after) == (dense, cola)
    assert (round(dense / 1e6, 2), round(cola / 1e6, 2)) == PAPER_PARAMS[name]
    assert len(p.targets) == 7 * preset.num_layers


def test_llama_350m_exact_counts():
    p = colafx.plan(presets.build("llama-350m", device="meta"), rank=256, seq_len=16)
    assert (p.params_before, p.params_after) == (367_969_280, 185_222_144)


def test_fractional_rank_is_quarter_of_d_model(tiny_model):
    p = colafx.plan(tiny_model)
    assert {s.rank for s in p.targets} == {16} and p.d_model == 64


def test_plan_flops_agree_with_flop_counter():
    # torch's FlopCounterMode does not count the CPU flash-attention kernel behind SDPA, so the
    # reference count uses eager attention; test_plan_flops_same_for_sdpa covers SDPA graphs.
    model = presets.build("llama-tiny", attn_implementation="eager", seed=0)
    seq, batch = 48, 2
    p = colafx.plan(model, rank=16, seq_len=seq)
    ids = torch.randint(0, 512, (batch, seq))

    def counted(m):
        with FlopCounterMode(display=False) as fc:
            m(input_ids=ids, use_cache=False)
        return fc.get_total_flops() / (batch * seq)

    assert counted(model) == pytest.approx(p.flops_before, rel=0.01)
    colafx.colaify(model, rank=16)
    assert counted(model) == pytest.approx(p.flops_after, rel=0.01)


def test_plan_flops_same_for_sdpa():
    eager = colafx.plan(presets.build("llama-tiny", attn_implementation="eager"), seq_len=40)
    sdpa = colafx.plan(presets.build("llama-tiny", attn_implementation="sdpa"), seq_len=40)
    assert (sdpa.flops_before, sdpa.flops_after) == (eager.flops_before, eager.flops_after)


def test_colaify_replaces_block_projections_only(tiny_model):
    colafx.colaify(tiny_model)
    cola = {n for n, m in tiny_model.named_modules() if isinstance(m, CoLALinear)}
    assert len(cola) == 14 and "lm_head" not in cola
    assert isinstance(tiny_model.lm_head, torch.nn.Linear)
    assert isinstance(tiny_model.model.embed_tokens, torch.nn.Embedding)


def test_cola_init_statistics():
    lin = torch.nn.Linear(256, 512)
    torch.manual_seed(0)
    m = CoLALinear.from_linear(lin, rank=64)
    expected = 1.0 / (64 ** 0.25 * (256 + 512) ** 0.25)
    for w in (m.cola_a.weight, m.cola_b.weight):
        assert w.std().item() == pytest.approx(expected, rel=0.05)
        assert abs(w.mean().item()) < 0.05 * expected
    assert m.cola_b.bias is not None and torch.all(m.cola_b.bias == 0)


def test_svd_init_is_exact_at_full_rank_with_identity(tiny_model):
    ids = torch.randint(0, 512, (2, 16))
    ref = tiny_model(ids).logits
    # rank 32 is full rank for k/v (64 -> 32); rank dict by role.
    colafx.colaify(tiny_model, rank={"k": 32, "v": 32}, act="identity", init="svd", roles=["k", "v"])
    torch.testing.assert_close(tiny_model(ids).logits, ref, rtol=1e-4, atol=1e-4)


def test_colaified_model_trains_and_generates(tiny_model):
    colafx.colaify(tiny_model)
    ids = torch.randint(0, 512, (2, 24))
    opt = torch.optim.AdamW(tiny_model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss = tiny_model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
    grads_ok = all(p.grad is None or torch.isfinite(p.grad).all() for p in tiny_model.parameters())
    assert grads_ok
    out = tiny_model.generate(ids[:1, :5], max_new_tokens=6, do_sample=False)
    assert out.shape == (1, 11)


@pytest.mark.parametrize("kind", ["Mistral", "Qwen2"])
def test_colaify_other_families_keeps_bias(kind):
    from tests.passes.test_projections import _tiny_hf

    model = _tiny_hf(kind)
    colafx.colaify(model)
    attn = model.model.layers[0].self_attn
    assert isinstance(attn.q_proj, CoLALinear)
    assert (attn.q_proj.cola_b.bias is not None) == (kind == "Qwen2")
    assert attn.o_proj.cola_b.bias is None
    ids = torch.randint(0, 128, (1, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 11)


@pytest.mark.parametrize("fused", [False, True])
def test_colaify_plain_llama(fused):
    model = PlainLlama(fused=fused)
    example = (torch.zeros(1, 12, dtype=torch.long),)
    colafx.colaify(model, rank=0.25, example_inputs=example)
    names = {n for n, m in model.named_modules() if isinstance(m, CoLALinear)}
    expected = {"wqkv", "wo", "w13", "w2"} if fused else {"wq", "wk", "wv", "wo", "w1", "w3", "w2"}
    assert {n.split(".")[-1] for n in names} == expected and len(names) == 2 * len(expected)
    assert isinstance(model.q_proj, torch.nn.Linear) and isinstance(model.out, torch.nn.Linear)
    logits, value = model(torch.randint(0, 97, (2, 10)))
    (logits.logsumexp(-1).mean() + value.mean()).backward()
    assert model.blocks[0].wo.cola_a.weight.grad is not None


def test_targets_and_exclude_follow_peft_rules(tiny_model):
    p = colafx.plan(tiny_model, targets=["q_proj", "v_proj"])
    assert {s.name.split(".")[-1] for s in p.targets} == {"q_proj", "v_proj"} and len(p.targets) == 4
    p = colafx.plan(tiny_model, targets=r"model\.layers\.0\..*")
    assert len(p.targets) == 7 and all(s.name.startswith("model.layers.0.") for s in p.targets)
    p = colafx.plan(tiny_model, exclude=["down_proj", "model.layers.1.self_attn.q_proj"])
    assert len(p.targets) == 14 - 2 - 1
    # regex is fullmatch: "q_proj" alone matches nothing as a string pattern
    with pytest.raises(ValueError, match="match none"):
        colafx.plan(tiny_model, targets="q_proj")


def test_rank_dict_by_role_regex_and_default(tiny_model):
    p = colafx.plan(tiny_model, rank={r"model\.layers\.1\.mlp\..*": 8, "down": 4, "default": 0.5})
    by = {s.name: s.rank for s in p.targets}
    assert by["model.layers.0.mlp.down_proj"] == 4
    assert by["model.layers.1.mlp.down_proj"] == 8  # regex wins over role
    assert by["model.layers.0.self_attn.q_proj"] == 32
    with pytest.raises(ValueError, match="no rank rule"):
        colafx.plan(tiny_model, rank={"q": 8})


@pytest.mark.parametrize("kwargs, message", [
    ({"rank": 0}, "positive"),
    ({"rank": -3}, "positive"),
    ({"rank": 1.5}, r"\(0, 1\]"),
    ({"rank": 40}, "exceeds min"),  # k/v are 64 -> 32
    ({"rank": "big"}, "rank must be"),
    ({"act": "tanh"}, "unknown act"),
    ({"init": "zeros"}, "unknown init"),
    ({"roles": ["qq"]}, "unknown roles"),
    ({"rank": {"nonsense_role": 4}}, "matches no selected module"),
    ({"exclude": r".*"}, "removes every"),
])
def test_bad_arguments_raise_and_leave_model_untouched(tiny_model, kwargs, message):
    before = copy.deepcopy(tiny_model.state_dict())
    with pytest.raises(ValueError, match=message):
        colafx.colaify(tiny_model, **kwargs)
    after = tiny_model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_already_colaified_is_refused(tiny_model):
    colafx.colaify(tiny_model)
    with pytest.raises(ValueError, match="already colaified"):
        colafx.colaify(tiny_model)


def test_model_without_projections_is_refused():
    class NoLinear(torch.nn.Module):
        def forward(self, x):
            return x.relu()

    with pytest.raises(ValueError, match="no dense projections"):
        colafx.plan(NoLinear(), example_inputs=(torch.randn(3),))


def test_non_transformer_needs_targets():
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 8))
    with pytest.raises(ValueError, match="no attention or MLP"):
        colafx.plan(mlp, example_inputs=(torch.randn(2, 8),))
    p = colafx.plan(mlp, example_inputs=(torch.randn(2, 8),), targets=["0"], rank=4)
    assert [s.name for s in p.targets] == ["0"]


def test_plan_table_lists_every_site(tiny_model):
    text = str(colafx.plan(tiny_model))
    assert "model.layers.1.mlp.down_proj" in text and "lm_head" in text and "dense" in text
    assert "parameters: 158,016 -> 103,232" in text


class _BlockWithExtra(torch.nn.Module):
    """A LLaMA-like block with one more linear that fits no attention/MLP pattern (a LayerScale-like
    mixing of the residual stream)."""

    def __init__(self, d=32):
        super().__init__()
        from tests.llama_plain import Block

        self.inner = Block(d, 64, 4)
        self.mix = torch.nn.Linear(d, d, bias=False)

    def forward(self, x):
        return self.inner(x) + self.mix(x) * x.mean(-1, keepdim=True)


class _ModelWithExtra(torch.nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.tok = torch.nn.Embedding(50, d)
        self.blocks = torch.nn.ModuleList(_BlockWithExtra(d) for _ in range(2))
        self.out = torch.nn.Linear(d, 50, bias=False)

    def forward(self, ids):
        h = self.tok(ids)
        for b in self.blocks:
            h = b(h)
        return self.out(h)


def test_projection_missed_inside_a_block_is_never_silent():
    model = _ModelWithExtra()
    inputs = (torch.zeros(1, 10, dtype=torch.long),)
    p = colafx.plan(model, rank=8, example_inputs=inputs)
    assert [s.name for s in p.missed] == ["blocks.0.mix", "blocks.1.mix"]
    assert "blocks.0.mix: inside decoder block blocks.0" in p.table()
    assert "WARNING: 2 projections" in p.summary()
    with pytest.raises(ValueError, match="strict: 2 projections .*blocks.0.mix"):
        colafx.colaify(copy.deepcopy(model), rank=8, example_inputs=inputs, strict=True)
    with pytest.warns(UserWarning, match="left 2 projections inside decoder blocks dense: .*blocks.1.mix"):
        colafx.colaify(model, rank=8, example_inputs=inputs)
    assert isinstance(model.blocks[0].inner.wq, CoLALinear) and type(model.blocks[0].mix) is torch.nn.Linear


def test_well_understood_model_has_no_missed_projections(tiny_model):
    p = colafx.plan(tiny_model, rank=8)
    assert p.missed == [] and "WARNING" not in p.table()


class _WithRopeBuffer(torch.nn.Module):
    """A non-HF model whose first graph input is a buffer (a RoPE cache) of 8 x 256."""

    def __init__(self):
        super().__init__()
        self.register_buffer("rope", torch.randn(8, 256))
        self.inner = PlainLlama(decoy=False)

    def forward(self, ids):
        return self.inner(ids) + self.rope[0, 0]


def test_plan_seq_len_comes_from_the_token_input():
    p = colafx.plan(_WithRopeBuffer(), rank=8, example_inputs=(torch.zeros(2, 32, dtype=torch.long),))
    assert p.seq_len == 32
    assert "(seq 32)" in p.summary()


def test_fractional_rank_is_capped_per_site_with_a_note():
    model = presets.build("llama-tiny")  # d 64, k/v 64 -> 32 (GQA)
    p = colafx.plan(model, rank=0.75)
    ranks = {s.name.split(".", 3)[-1]: s.rank for s in p.targets if ".layers.0." in s.name}
    assert ranks["self_attn.q_proj"] == 48 and ranks["self_attn.k_proj"] == 32 and ranks["self_attn.v_proj"] == 32
    assert "rank 48 (0.75 x d_model 64) capped to min(d_in, d_out) = 32" in p.table()
    with pytest.raises(ValueError, match="rank 48 .*k_proj.*exceeds min"):
        colafx.plan(model, rank=48)  # an explicit int is not capped
    p = colafx.plan(model, rank={"default": 0.75, "k": 16, "v": 16})
    assert {s.rank for s in p.targets if s.role in ("k", "v")} == {16}
