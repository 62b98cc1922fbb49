"""quantize_ / QuantConfig / QuantLinear: accuracy against fp32, storage size, save/load, errors."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import colafx
from colafx.transform.quantize import QuantConfig, QuantLinear, quantize_, quantized_modules, sqnr_db


def _ids(vocab=512, shape=(2, 24)):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("bits,act_bits,group,min_db", [(8, 8, None, 30.0), (8, 16, None, 30.0),
                                                         (4, 8, 16, 14.0), (4, 16, 16, 14.0)])
def test_logits_stay_close_to_fp32(tiny_model, bits, act_bits, group, min_db):
    # Measured on llama-tiny: W8A8 41 dB, W8A16 43 dB, W4(g16) 20 dB; thresholds leave margin.
    ids = _ids()
    with torch.no_grad():
        ref = tiny_model(input_ids=ids).logits
        colafx.quantize_(tiny_model, colafx.QuantConfig(weight_bits=bits, act_bits=act_bits, group_size=group))
        out = tiny_model(input_ids=ids).logits
    assert sqnr_db(ref, out) > min_db


def test_weight_only_module_matches_dequantized_linear():
    lin = nn.Linear(48, 20, bias=True)
    q = QuantLinear.from_linear(lin, QuantConfig(weight_bits=4, act_bits=16, group_size=16))
    x = torch.randn(3, 5, 48)
    expected = F.linear(x, q.dequantized_weight(), lin.bias)
    torch.testing.assert_close(q(x), expected, rtol=1e-5, atol=1e-5)
    # and the dequantized weight is the nearest-rounded one: error at most half a step per group
    step = q.scale.repeat_interleave(16, dim=1)
    assert ((q.dequantized_weight() - lin.weight).abs() <= step / 2 + 1e-6).all()


@pytest.mark.parametrize("bits, act_bits, group", [(8, 8, None), (4, 16, 16)])
def test_a_model_cast_to_bf16_or_fp16_keeps_its_scales_fp32_and_its_quantized_weights(bits, act_bits, group):
    """``.to(bf16)`` / ``.half()`` cast the bias and leave the scales fp32, bit for bit, so the
    quantized weights are not rounded; the bf16 module then equals the fp32 one up to bf16
    rounding of x and the output, and ``.float()`` gives back the same quantized weight."""
    lin = nn.Linear(64, 24, bias=True)
    q = QuantLinear.from_linear(lin, QuantConfig(weight_bits=bits, act_bits=act_bits, group_size=group))
    scale, weight = q.scale.clone(), q.dequantized_weight()
    x = torch.randn(5, 64).bfloat16()
    expected = q(x.float())
    for cast, dtype in ((lambda m: m.to(torch.bfloat16), torch.bfloat16), (lambda m: m.half(), torch.float16)):
        cast(q)
        assert q.scale.dtype == torch.float32 and torch.equal(q.scale, scale) and q.bias.dtype == dtype
        assert torch.equal(q.dequantized_weight(), weight)
    q.to(torch.bfloat16)
    torch.testing.assert_close(q(x).float(), expected, rtol=0.05, atol=0.05 * expected.abs().max().item())
    q.float()  # the bias went through bf16 (as nn.Linear's would); the quantized weight did not
    assert torch.equal(q.scale, scale) and torch.equal(q.dequantized_weight(), weight)
    torch.testing.assert_close(q(x.float()), expected, rtol=0, atol=lin.bias.abs().max().item() * 2**-8)


def test_storage_is_small(tiny_model):
    fp32 = {n: m.weight.numel() * 4 for n, m in tiny_model.named_modules()
            if type(m) is nn.Linear and n != "lm_head"}
    for bits, group, limit in [(8, None, 0.30), (4, None, 0.17), (4, 32, 0.17)]:
        model = colafx.presets.build("llama-tiny", seed=0)
        filt = (lambda m, n: m.in_features % 32 == 0 and n != "lm_head") if group else None
        quantize_(model, QuantConfig(weight_bits=bits, group_size=group), filter_fn=filt)
        mods = quantized_modules(model)
        qbytes = sum(t.numel() * t.element_size() for m in mods.values() for t in m.state_dict().values())
        ratio = qbytes / sum(fp32[n] for n in mods)
        assert ratio <= limit, (bits, group, ratio)


def test_default_filter_keeps_head_dense_and_filter_fn_selects(tiny_model):
    quantize_(tiny_model, QuantConfig(), filter_fn=lambda m, fqn: fqn.endswith("q_proj"))
    names = set(quantized_modules(tiny_model))
    assert names == {f"model.layers.{i}.self_attn.q_proj" for i in range(2)}
    model = colafx.presets.build("llama-tiny", seed=0)
    quantize_(model)
    assert type(model.lm_head) is nn.Linear and len(quantized_modules(model)) == 14


def test_zo_headroom_limits_codes(tiny_model):
    from colafx.kernels.quant import unpack_int4

    for bits, limit in [(8, 119), (4, 6)]:
        model = colafx.presets.build("llama-tiny", seed=0)
        quantize_(model, QuantConfig(weight_bits=bits, zo_headroom=True))
        for m in quantized_modules(model).values():
            q = unpack_int4(m.qweight) if bits == 4 else m.qweight
            assert int(q.abs().max()) == limit  # absmax maps exactly onto qmax - H


def test_cola_factors_are_quantized(tiny_model):
    ids = _ids()
    colafx.colaify(tiny_model, rank=16)
    with torch.no_grad():
        ref = tiny_model(input_ids=ids).logits
        quantize_(tiny_model, QuantConfig(weight_bits=8))
        out = tiny_model(input_ids=ids).logits
    names = quantized_modules(tiny_model)
    assert "model.layers.0.mlp.down_proj.cola_a" in names and "model.layers.1.self_attn.o_proj.cola_b" in names
    assert sqnr_db(ref, out) > 25.0


def test_save_load_roundtrip(tiny_model, tmp_path):
    ids = _ids()
    quantize_(tiny_model, QuantConfig(weight_bits=4, act_bits=8, group_size=16, zo_headroom=True))
    colafx.save(tiny_model, tmp_path)
    loaded = colafx.load(tmp_path)
    assert torch.equal(loaded(input_ids=ids).logits, tiny_model(input_ids=ids).logits)
    m = loaded.model.layers[0].mlp.up_proj
    assert isinstance(m, QuantLinear) and m.qweight.dtype == torch.uint8 and m.qmax == 6


def test_bad_input_is_a_clear_error(tiny_model):
    with pytest.raises(ValueError, match="weight_bits"):
        QuantConfig(weight_bits=3)
    with pytest.raises(ValueError, match="act_bits"):
        QuantConfig(act_bits=4)
    with pytest.raises(ValueError, match="rounding"):
        QuantConfig(rounding="up")
    with pytest.raises(ValueError, match="does not divide"):
        quantize_(tiny_model, QuantConfig(group_size=48))
    assert not quantized_modules(tiny_model)  # validated before anything changed
    with pytest.raises(ValueError, match="no nn.Linear"):
        quantize_(tiny_model, filter_fn=lambda m, n: False)
    with pytest.raises(ValueError, match="even d_in"):
        quantize_(nn.Sequential(nn.Linear(7, 4)), QuantConfig(weight_bits=4), filter_fn=lambda m, n: True)
    quantize_(tiny_model)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_(tiny_model)


def test_asymmetric_int4_modules_keep_zero_points_run_them_and_round_trip(tiny_model, tmp_path):
    """QuantConfig(symmetric=False): every QuantLinear holds int8 zero points per group, runs them
    (output = x · dequantized weightᵀ), has weights closer to fp32 than symmetric int4 (a finer step:
    range / 15 instead of 2·absmax / 14), and save / load keeps them."""
    ids = _ids()
    dense = {n: m.weight.detach().clone() for n, m in tiny_model.named_modules() if type(m) is nn.Linear}
    sym = colafx.presets.build("llama-tiny", seed=0)
    quantize_(sym, QuantConfig(weight_bits=4, act_bits=16, group_size=16))
    quantize_(tiny_model, QuantConfig(weight_bits=4, act_bits=16, group_size=16, symmetric=False))
    with torch.no_grad():
        out = tiny_model(input_ids=ids).logits
    mods = quantized_modules(tiny_model)
    assert all(m.zero is not None and m.zero.dtype == torch.int8 and m.zero.shape == m.scale.shape
               for m in mods.values())
    assert any(bool(m.zero.any()) for m in mods.values())
    up = tiny_model.model.layers[0].mlp.up_proj
    x = torch.randn(3, up.in_features)
    torch.testing.assert_close(up(x), F.linear(x, up.dequantized_weight()), rtol=1e-5, atol=1e-5)
    for name, m in mods.items():
        assert sqnr_db(dense[name], m.dequantized_weight()) > sqnr_db(dense[name], quantized_modules(sym)[name].dequantized_weight())
    colafx.save(tiny_model, tmp_path)
    loaded = colafx.load(tmp_path)
    assert torch.equal(loaded.model.layers[0].mlp.up_proj.zero, up.zero)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, out)


def test_asymmetric_needs_int4_without_zo_headroom():
    with pytest.raises(ValueError, match="symmetric=False"):
        QuantConfig(weight_bits=8, symmetric=False)
    with pytest.raises(ValueError, match="symmetric=False"):
        QuantConfig(weight_bits=4, zo_headroom=True, symmetric=False)
    with pytest.raises(ValueError, match="zero points are for int4"):
        QuantLinear(8, 4, bits=8, zero_point=True)
