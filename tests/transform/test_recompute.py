"""CoLA-M in eager mode: same loss and gradients as without recompute, only the bottlenecks kept."""
import copy
import inspect
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import colafx
from colafx import presets
from colafx.transform.modules import CoLALinear
from colafx.transform.recompute import (decoder_blocks, disable_recompute, enable_recompute, is_cache,
                                       recompute_policy_of)
from tests.llama_plain import PlainLlama

# fp32, relative error per tensor (norm of the difference / norm of the reference), against the same
# model without recompute: the recompute replays the same kernels (CoLA-M's colafx::lowrank_in is the
# same F.linear, its backward the same two matmuls), so differences are rounding-level at most.
RTOL = 1e-6


def _set_fused(model, fused):
    for m in model.modules():
        if isinstance(m, CoLALinear):
            m.fused = fused
    return model


def _loss_and_grads(model, ids, seed=0):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # same dropout masks for every model
    out = model(input_ids=ids, labels=ids) if hasattr(model, "config") else model(ids)
    loss = out.loss if hasattr(out, "loss") else out[0].float().logsumexp(-1).mean() + out[1].pow(2).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(ref, got, rtol=RTOL):
    (loss_ref, g_ref), (loss, g) = ref, got
    assert torch.isfinite(loss_ref)
    assert abs(loss.item() - loss_ref.item()) <= rtol * abs(loss_ref.item())
    assert g.keys() == g_ref.keys() and len(g_ref) > 0
    for name in g_ref:
        err = (g[name] - g_ref[name]).norm() / g_ref[name].norm().clamp_min(1e-30)
        assert err <= rtol, f"{name}: relative gradient error {err:.2e}"


@pytest.fixture(scope="module")
def _cola_tiny_once():
    model = presets.build("llama-tiny", seed=0)
    return colafx.colaify(model, rank=16, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def cola_tiny(_cola_tiny_once):
    """A colaified llama-tiny (a fresh copy per test: colaify's capture runs once per module)."""
    return copy.deepcopy(_cola_tiny_once)


def _ids(vocab, batch=2, seq=32):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("policy, fused", [("cola-m", None), ("full", None), ("cola-m", True)])
@pytest.mark.parametrize("train", [True, False])
def test_hf_gradients_match(cola_tiny, policy, fused, train):
    """fused=True: CoLA modules on the fused op colafx::lowrank_act (the CUDA default) without
    recompute; under CoLA-M they switch to colafx::lowrank_in + SiLU (A·x kept, A never rerun), a
    different summation order, hence 1e-5 there."""
    cola_tiny.train(train)
    _set_fused(cola_tiny, fused)
    ids = _ids(cola_tiny.config.vocab_size)
    ref = _loss_and_grads(cola_tiny, ids)
    enable_recompute(cola_tiny, policy)
    _assert_same(ref, _loss_and_grads(cola_tiny, ids), rtol=1e-5 if fused else RTOL)
    if fused and policy == "cola-m":
        with _OpCounter() as counter:
            _loss_and_grads(cola_tiny, ids)
        assert counter.calls["colafx::lowrank_act"] == 0 and counter.calls["colafx::lowrank_in"] > 0


def test_hf_dropout_rng_replayed(cola_tiny):
    model = cola_tiny.train()
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.3
    ids = _ids(model.config.vocab_size)
    ref = _loss_and_grads(copy.deepcopy(model), ids)
    other_mask = _loss_and_grads(copy.deepcopy(model), ids, seed=1)
    assert abs(other_mask[0] - ref[0]) > 1e-4  # dropout is active: another seed changes the loss
    _assert_same(ref, _loss_and_grads(enable_recompute(model), ids))


@pytest.mark.parametrize("fused_projections", [False, True])
def test_plain_llama_with_dropout(fused_projections):
    torch.manual_seed(0)
    model = PlainLlama(fused=fused_projections, eager_attention=True, dropout=0.2)
    colafx.colaify(model, rank=8, example_inputs=(torch.zeros(1, 16, dtype=torch.long),))
    assert list(decoder_blocks(model)) == ["blocks.0", "blocks.1"]
    ids = _ids(97, seq=16)
    ref = _loss_and_grads(copy.deepcopy(model), ids)
    _assert_same(ref, _loss_and_grads(enable_recompute(model), ids))


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[func._schema.name] += 1
        return func(*args, **(kwargs or {}))


def test_bottleneck_kept_rest_recomputed(cola_tiny):
    """Attention and B projections run twice; the A projections once (never recomputed)."""
    ids = _ids(cola_tiny.config.vocab_size)
    sites = sum(isinstance(m, CoLALinear) for m in cola_tiny.modules())
    layers = cola_tiny.config.num_hidden_layers
    counts = {}
    for policy in (None, "full", "cola-m"):
        if policy:
            enable_recompute(cola_tiny, policy)
        with _OpCounter() as counter:
            _loss_and_grads(cola_tiny, ids)
        counts[policy] = counter.calls
    sdpa = "aten::_scaled_dot_product_flash_attention_for_cpu"
    assert counts[None][sdpa] == layers and counts["cola-m"][sdpa] == 2 * layers  # attention recomputed
    assert counts["cola-m"]["colafx::lowrank_in"] == sites and counts[None]["colafx::lowrank_in"] == 0
    mm = {policy: c["aten::mm"] + c["aten::addmm"] for policy, c in counts.items()}
    # Full checkpointing reruns A and B of every site (minus what early stop skips: the last B of a
    # block). CoLA-M reruns the same B projections but no A projection, and its forward A runs as
    # colafx::lowrank_in (no aten::mm): sites fewer matmuls twice over.
    assert mm["full"] - mm["cola-m"] == 2 * sites


def _bytes_kept_after_forward(model, ids):
    """Net bytes allocated by a forward (what stays alive for backward), from profiler events."""
    model.zero_grad(set_to_none=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = model(input_ids=ids, labels=ids).loss
    kept = sum(e.self_cpu_memory_usage for e in prof.events())
    loss.backward()
    return kept


def test_cola_m_keeps_exactly_the_bottleneck_outputs(cola_tiny):
    """CoLA-M minus full checkpointing = the 7 rank-r activations of every block, byte for byte."""
    ids = _ids(cola_tiny.config.vocab_size)
    kept = {}
    for policy in ("full", "cola-m"):
        enable_recompute(cola_tiny, policy)
        kept[policy] = _bytes_kept_after_forward(cola_tiny, ids)
    ranks = sum(m.rank for m in cola_tiny.modules() if isinstance(m, CoLALinear))
    assert kept["cola-m"] - kept["full"] == ranks * ids.numel() * 4
    disable_recompute(cola_tiny)
    assert _bytes_kept_after_forward(cola_tiny, ids) > 2 * kept["cola-m"]


def test_disable_restores_and_colaify_flag(tiny_model):  # colaify(recompute=True) on a dense model
    colafx.colaify(tiny_model, rank=16, recompute=True)
    layer = tiny_model.model.layers[0]
    assert recompute_policy_of(tiny_model) == "cola-m" and "forward" in vars(layer)
    assert "forward" in vars(layer.self_attn.q_proj.cola_a)  # A projection runs as colafx::lowrank_in
    enable_recompute(tiny_model, "full")  # switching policy
    assert recompute_policy_of(tiny_model) == "full" and "forward" not in vars(layer.self_attn.q_proj.cola_a)
    enable_recompute(tiny_model, "cola-m")
    disable_recompute(tiny_model)
    assert recompute_policy_of(tiny_model) is None and "forward" not in vars(layer)
    assert not any("forward" in vars(m.cola_a) for m in tiny_model.modules() if isinstance(m, CoLALinear))
    clone = copy.deepcopy(enable_recompute(tiny_model))  # the copy's blocks wrap the copy, not the original
    assert clone.model.layers[0].forward.__self__ is clone.model.layers[0]


def _cache_kwarg(model) -> str:
    """The keyword this transformers release takes a KV cache by (``cache`` in 5.24+)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def test_generate_and_filled_cache(cola_tiny):
    cola_tiny.eval()
    ids = _ids(cola_tiny.config.vocab_size, batch=1, seq=8)
    expected = cola_tiny.generate(ids, max_new_tokens=6, do_sample=False)
    enable_recompute(cola_tiny)
    assert torch.equal(cola_tiny.generate(ids, max_new_tokens=6, do_sample=False), expected)
    key = _cache_kwarg(cola_tiny)
    with torch.no_grad():
        out = cola_tiny(ids, use_cache=True)
        cache = getattr(out, key, None) or out.past_key_values
    assert is_cache(cache) and cache.get_seq_length() == 8
    ref = cola_tiny(expected[:, 8:9], **{key: copy.deepcopy(cache)}).logits
    with pytest.warns(UserWarning, match="filled KV cache"):
        got = cola_tiny(expected[:, 8:9], **{key: cache}).logits  # autograd on: no recompute
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    assert cache.get_seq_length() == 9  # written once, not twice


class _ToyCache:
    """Not a transformers class: a cache known only by its behaviour (update + get_seq_length)."""

    def __init__(self):
        self.keys = []

    def get_seq_length(self):
        return sum(k.shape[-2] for k in self.keys)

    def update(self, k):
        self.keys.append(k)
        return torch.cat(self.keys, dim=-2)


class _CacheBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = CoLALinear.from_linear(torch.nn.Linear(8, 8), 4, "silu", "cola", "q")
        self.mlp = CoLALinear.from_linear(torch.nn.Linear(8, 8), 4, "silu", "cola", "up")

    def forward(self, x, store=None, use_cache=False):  # the cache keyword is deliberately unusual
        h = self.attn(x)
        kv = store.update(h) if store is not None and use_cache else h  # keys so far (this call's if empty)
        h = h + kv.sum(-2, keepdim=True)  # a replay that appended again would sum them twice
        return x + self.mlp(h)


def test_cache_found_by_behaviour_not_keyword():
    torch.manual_seed(0)
    model = torch.nn.Sequential(_CacheBlock(), _CacheBlock())
    x = torch.randn(2, 5, 8, requires_grad=True)

    def run(m):
        out = x
        for block in m:
            out = block(out, store=_ToyCache(), use_cache=True)
        out.square().sum().backward()
        return [p.grad.clone() for p in m.parameters()]

    ref = run(copy.deepcopy(model))
    enable_recompute(model)
    got = run(model)  # an empty cache is dropped: without that the replay appends twice and fails
    for a, b in zip(ref, got):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    filled = _ToyCache()
    filled.update(torch.zeros(2, 3, 8))
    with pytest.warns(UserWarning, match="filled KV cache"):
        model[0](x, store=filled, use_cache=True)
    assert filled.get_seq_length() == 8


def test_bad_input(tiny_model, cola_tiny):
    with pytest.raises(ValueError, match="no CoLA modules"):
        enable_recompute(tiny_model)  # dense
    with pytest.raises(ValueError, match="unknown recompute policy"):
        enable_recompute(cola_tiny, "selective")
    # transformers 5.25 renamed gradient_checkpointing_* to activation_checkpointing_*
    renamed = hasattr(cola_tiny, "activation_checkpointing_enable")
    enable = cola_tiny.activation_checkpointing_enable if renamed else cola_tiny.gradient_checkpointing_enable
    disable = "activation_checkpointing_disable" if renamed else "gradient_checkpointing_disable"
    enable()
    with pytest.raises(ValueError, match=f"gradient checkpointing.*{disable}"):
        enable_recompute(cola_tiny)
    getattr(cola_tiny, disable)()
    enable_recompute(cola_tiny)
    enable()
    ids = _ids(cola_tiny.config.vocab_size)
    with pytest.raises(RuntimeError, match="gradient checkpointing"):
        cola_tiny.train()(input_ids=ids, labels=ids)


def test_llama_60m_gradients_match():
    """llama-60m widths (d 512, ff 1376, 8 heads, rank 128), cut to 2 of its 8 identical blocks so
    the default (CI) run stays fast; more blocks only repeat the same per-block recompute."""
    model = presets.build("llama-60m", seed=0, num_hidden_layers=2)
    colafx.colaify(model, rank=presets.get("llama-60m").rank, generator=torch.Generator().manual_seed(0))
    ids = _ids(model.config.vocab_size, batch=2, seq=64)
    ref = _loss_and_grads(model, ids)
    _assert_same(ref, _loss_and_grads(enable_recompute(model), ids))


def test_lowrank_in_op():
    """colafx::lowrank_in = F.linear without bias, forward and backward (fp32, 1e-6), and opcheck."""
    from colafx.kernels.lowrank import lowrank_in

    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lowrank_in, (x, w))
    torch.library.opcheck(torch.ops.colafx.lowrank_in.default, (x.float(), w.float()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lowrank_in(x.float(), w.float()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="does not fit"):
        lowrank_in(x, w.t())
