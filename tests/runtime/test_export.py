"""ONNX export (colafx.export_onnx, colafx export) and onnxruntime generation (OnnxCausalLM).

Tolerances: fp32 graphs agree with PyTorch to 1e-4 (measured ~3e-7 on llama-tiny); fp16 graphs are
compared with the fp32 model at 2e-2 (fp16 has 11 significant bits); quantized graphs against the
PyTorch quantized model (see each test): the standard-opset int8 graph reproduces the op's integers
(1e-3), the default com.microsoft MatMulNBits int8 graph quantizes activations per block of K
instead of per token (3e-2 of the largest |logit|; measured 1.1e-2 on llama-tiny). Every export
is slow (~10-25 s), so each one is shared.
"""
import json

import numpy as np
import onnx
import pytest
import torch

import colafx
from colafx import presets
from colafx.cli import main
from colafx.runtime import export as export_module
from colafx.runtime.export import OnnxCausalLM, export_onnx, onnxruntime_u8s8_exact, quantize_for_export
from colafx.transform.quantize import QuantConfig, QuantLinear, quantize_, quantized_modules


def _ids(shape, vocab=512, seed=1):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float().numpy()


def _op_types(path):
    return {(n.domain or "ai.onnx", n.op_type) for n in onnx.load(str(path)).graph.node}


@pytest.fixture(scope="module")
def cola_export(tmp_path_factory):
    """A colaified llama-tiny checkpoint exported by ``colafx export`` (fp32, KV cache)."""
    folder = tmp_path_factory.mktemp("cola")
    model = colafx.colaify(presets.build("llama-tiny", seed=0), rank=16)
    colafx.save(model, folder / "ckpt")
    assert main(["export", "--model", str(folder / "ckpt"), "--out", str(folder / "model.onnx")]) == 0
    return colafx.load(folder / "ckpt").eval(), folder / "model.onnx"


def _cli_int8_export(folder, *flags):
    """A dense llama-tiny checkpoint exported by ``colafx export --quant int8 [flags]`` (quantized by
    the CLI), with the PyTorch model quantized the same way."""
    colafx.save(presets.build("llama-tiny", seed=0), folder / "ckpt")
    assert main(["export", "--model", str(folder / "ckpt"), "--out", str(folder / "model.onnx"),
                 "--quant", "int8", *flags]) == 0
    reference = quantize_for_export(colafx.load(folder / "ckpt"), "int8").eval()
    return reference, folder / "model.onnx"


@pytest.fixture(scope="module")
def int8_export(tmp_path_factory):
    """``colafx export --quant int8 --onnx-ops standard``: ai.onnx operators only."""
    return _cli_int8_export(tmp_path_factory.mktemp("int8"), "--onnx-ops", "standard")


@pytest.fixture(scope="module")
def int8_contrib_export(tmp_path_factory):
    """``colafx export --quant int8``: the default, com.microsoft MatMulNBits."""
    return _cli_int8_export(tmp_path_factory.mktemp("int8-contrib"))


def test_cli_export_is_a_checked_onnx_file_with_dynamic_axes_and_metadata(cola_export):
    _, path = cola_export
    onnx.checker.check_model(str(path))
    graph = onnx.load(str(path)).graph
    names = [i.name for i in graph.input]
    assert names[:4] == ["input_ids", "attention_mask", "past_key_0", "past_value_0"] and len(names) == 2 + 2 * 2
    ids_dims = graph.input[0].type.tensor_type.shape.dim
    mask_dims = graph.input[1].type.tensor_type.shape.dim
    past_dims = graph.input[2].type.tensor_type.shape.dim
    assert all(d.dim_param for d in ids_dims)  # batch and sequence are dynamic
    assert all(d.dim_param for d in mask_dims)  # batch and past + sequence
    assert past_dims[0].dim_param and past_dims[2].dim_param and past_dims[1].dim_value == 2
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["kv_cache"] and meta["quant"] is None and meta["hf_config"]["model_type"] == "llama"


def test_kv_cache_prefill_and_one_token_decode_match_pytorch(cola_export):
    model, path = cola_export
    lm = OnnxCausalLM(path)
    ids = _ids((2, 5))
    logits, present = lm.forward(ids)
    np.testing.assert_allclose(logits, _logits(model, ids), atol=1e-4, rtol=0)
    for step in range(3):
        token = _ids((2, 1), seed=10 + step)
        ids = torch.cat([ids, token], dim=1)
        logits, present = lm.forward(token, present)  # one token in, cache grows by one
        assert logits.shape == (2, 1, 512) and present[0].shape == (2, 2, ids.shape[1], 16)
        np.testing.assert_allclose(logits[:, 0], _logits(model, ids)[:, -1], atol=1e-4, rtol=0)


def test_greedy_generate_matches_pytorch_generate(cola_export):
    model, path = cola_export
    ids = _ids((2, 6))
    expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    got = OnnxCausalLM(path).generate(ids, max_new_tokens=12)
    assert isinstance(got, torch.Tensor) and torch.equal(got, expected)


def test_sampling_is_seeded_and_top_k_1_is_greedy(cola_export):
    _, path = cola_export
    lm = OnnxCausalLM(path)
    ids = _ids((1, 4)).numpy()
    greedy = lm.generate(ids, 8)
    assert isinstance(greedy, np.ndarray)
    np.testing.assert_array_equal(lm.generate(ids, 8, do_sample=True, top_k=1, eos_token_id=[]), greedy)
    a = lm.generate(ids, 8, do_sample=True, temperature=2.0, seed=3, eos_token_id=[])
    b = lm.generate(ids, 8, do_sample=True, temperature=2.0, seed=3, eos_token_id=[])
    c = lm.generate(ids, 8, do_sample=True, temperature=2.0, seed=4, eos_token_id=[])
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)  # 8 draws at temperature 2 over 512 tokens: equal by chance ~never
    with pytest.raises(ValueError, match="temperature"):
        lm.generate(ids, 4, do_sample=True, temperature=0.0)


def test_fused_cola_fp16_export_without_cache(tmp_path):
    model = colafx.colaify(presets.build("llama-tiny", seed=0), rank=16).eval()
    for m in model.modules():
        if hasattr(m, "fused"):
            m.fused = True  # the bottleneck runs as colafx::lowrank_act -> MatMul + Sigmoid
    path = export_onnx(model, tmp_path / "m.onnx", kv_cache=False, dtype="fp16")
    assert next(model.parameters()).dtype == torch.float32  # the caller's model is not cast
    assert [i.name for i in onnx.load(str(path)).graph.input] == ["input_ids", "attention_mask"]
    lm = OnnxCausalLM(path)
    ids = _ids((2, 7))
    logits, present = lm.forward(ids)
    assert present is None and logits.dtype == np.float16
    np.testing.assert_allclose(logits.astype(np.float32), _logits(model, ids), atol=2e-2, rtol=0)
    assert lm.generate(ids, 3).shape == (2, 10)  # without a cache every step re-runs the prefix


def test_left_padded_batch_generates_what_each_prompt_generates_alone(cola_export):
    model, path = cola_export
    lm = OnnxCausalLM(path)
    long, short = _ids((1, 7), seed=2), _ids((1, 3), seed=3)
    ids = torch.cat([long, torch.cat([torch.zeros(1, 4, dtype=torch.long), short], dim=1)])
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding: the short prompt ends where the long one does
    batch = lm.generate(ids, max_new_tokens=10, attention_mask=mask, eos_token_id=[])
    assert torch.equal(batch[0], lm.generate(long, max_new_tokens=10, eos_token_id=[])[0])
    assert torch.equal(batch[1, 4:], lm.generate(short, max_new_tokens=10, eos_token_id=[])[0])
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    assert torch.equal(batch, expected)  # and Hugging Face generate on the same padded batch agrees
    with pytest.raises(ValueError, match="left padding"):
        lm.generate(ids, 2, attention_mask=mask.flip(1))
    with pytest.raises(ValueError, match="attention_mask must have input_ids' shape"):
        lm.generate(ids, 2, attention_mask=mask[:, 1:])


def test_int8_default_export_is_matmulnbits_with_qkv_and_gate_up_merged_close_to_pytorch_int8(int8_contrib_export):
    model, path = int8_contrib_export
    graph = onnx.load(str(path)).graph
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits" and n.domain == "com.microsoft"]
    assert len(quantized_modules(model)) == 14 and not any(n.op_type == "MatMulInteger" for n in graph.node)
    # per layer: q|k|v (one node, N = 64 + 32 + 32), o, gate|up (N = 2 x 176), down
    assert sorted(a.i for n in nbits for a in n.attribute if a.name == "N") == [64, 64, 64, 64, 128, 128, 352, 352]
    inits = {t.name: t for t in graph.initializer}
    assert all(inits[n.input[1]].data_type == onnx.TensorProto.UINT8 for n in nbits)  # codes stored, not computed
    assert json.loads(path.with_suffix(".json").read_text())["onnx_ops"] == "contrib"
    ids = _ids((2, 9))
    got, expected = OnnxCausalLM(path).forward(ids)[0], _logits(model, ids)
    # onnxruntime quantizes activations per block of K (accuracy_level 4), the op per token
    assert np.abs(got - expected).max() <= 3e-2 * np.abs(expected).max()
    assert (got.argmax(-1) == expected.argmax(-1)).mean() >= 0.9


@pytest.fixture(scope="module")
def int8_vnni_export(tmp_path_factory):
    """``colafx export --quant int8 --onnx-ops contrib-vnni``: MatMulIntegerToFloat."""
    return _cli_int8_export(tmp_path_factory.mktemp("int8-vnni"), "--onnx-ops", "contrib-vnni")


@pytest.mark.skipif(not onnxruntime_u8s8_exact(), reason="onnxruntime's u8·s8 GEMM saturates on x86 without VNNI")
def test_int8_vnni_export_uses_merged_matmulintegertofloat_and_matches_pytorch_int8(exact_cpu_int8, int8_vnni_export):
    model, path = int8_vnni_export
    graph = onnx.load(str(path)).graph
    gemms = [n for n in graph.node if n.op_type == "MatMulIntegerToFloat" and n.domain == "com.microsoft"]
    assert len(quantized_modules(model)) == 14
    assert not any(n.op_type in ("MatMulNBits", "MatMulInteger") for n in graph.node)
    inits = {t.name: t for t in graph.initializer}
    assert all(inits[n.input[1]].data_type == onnx.TensorProto.INT8 for n in gemms)  # codes stored, not computed
    # per layer: q|k|v (one node, N = 64 + 32 + 32), o, gate|up (N = 2 x 176), down; weights [K, N]
    assert sorted(inits[n.input[1]].dims[1] for n in gemms) == [64, 64, 64, 64, 128, 128, 352, 352]
    lm = OnnxCausalLM(path)
    ids = _ids((2, 9))
    # the op's per-token codes and an exact integer GEMM: only fp32 rounding differs (as "standard")
    np.testing.assert_allclose(lm.forward(ids)[0], _logits(model, ids), atol=1e-3, rtol=0)
    expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    assert torch.equal(lm.generate(ids, 8), expected)


def test_int8_vnni_export_is_refused_on_a_cpu_whose_u8s8_gemm_overflows(int8_vnni_export, monkeypatch):
    _, path = int8_vnni_export
    monkeypatch.setattr(export_module, "onnxruntime_u8s8_exact", lambda: False)
    with pytest.raises(RuntimeError, match="contrib-vnni.*without VNNI"):
        OnnxCausalLM(path)


def test_int8_standard_export_uses_matmulinteger_and_matches_pytorch_int8(exact_cpu_int8, int8_export):
    model, path = int8_export
    ops = _op_types(path)
    assert ("ai.onnx", "MatMulInteger") in ops
    quantized = quantized_modules(model)
    initializers = onnx.load(str(path)).graph.initializer
    float_shapes = {tuple(t.dims) for t in initializers if t.data_type == onnx.TensorProto.FLOAT}
    # int8 codes, or the uint8 codes + 128 that the exporter may constant-fold for MatMulInteger
    int_count = sum(1 for t in initializers if t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
                    and len(t.dims) == 2)
    assert int_count >= len(quantized) == 14
    # no projection weight is stored as float (q/k/v/o/gate/up/down shapes, either orientation;
    # lm_head stays float)
    projection_shapes = {s for m in quantized.values()
                         for s in ((m.out_features, m.in_features), (m.in_features, m.out_features))}
    assert not float_shapes & projection_shapes
    lm = OnnxCausalLM(path)
    ids = _ids((2, 9))
    # The graph quantizes activations per token like the op and multiplies integers exactly; fp32
    # rounding differences can move an activation across a rounding boundary, so allow 1e-3.
    np.testing.assert_allclose(lm.forward(ids)[0], _logits(model, ids), atol=1e-3, rtol=0)
    expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    assert torch.equal(lm.generate(ids, 8), expected)


def test_int8_export_with_quantized_head_untied_from_a_tied_embedding(exact_cpu_int8, int8_export, tmp_path, capsys):
    """--quant-head: the logits head becomes one more MatMulInteger; a tied embedding stays float."""
    _, body_only_path = int8_export
    model = presets.build("llama-tiny", seed=0, tie_word_embeddings=True).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    quantize_for_export(model, "int8", head=True)
    assert isinstance(model.lm_head, QuantLinear) and not model.config.tie_word_embeddings
    assert model.model.embed_tokens.weight.dtype == torch.float32
    colafx.save(model, tmp_path / "ckpt")
    path = export_onnx(colafx.load(tmp_path / "ckpt"), tmp_path / "m.onnx", quant="int8", onnx_ops="standard")

    def matmul_integers(p):
        return sum(n.op_type == "MatMulInteger" for n in onnx.load(str(p)).graph.node)
    assert matmul_integers(path) == matmul_integers(body_only_path) + 1
    ids = _ids((2, 9))
    np.testing.assert_allclose(OnnxCausalLM(path).forward(ids)[0], _logits(model, ids), atol=1e-3, rtol=0)
    expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    assert torch.equal(OnnxCausalLM(path).generate(ids, 8), expected)
    assert main(["export", "--model", str(tmp_path / "ckpt"), "--out", str(tmp_path / "x.onnx"),
                 "--quant-head"]) == 1
    assert "--quant-head needs --quant" in capsys.readouterr().err
    colafx.save(quantize_for_export(presets.build("llama-tiny", seed=0), "int8"), tmp_path / "body-only")
    assert main(["export", "--model", str(tmp_path / "body-only"), "--out", str(tmp_path / "y.onnx"),
                 "--quant", "int8", "--quant-head"]) == 1
    assert "already quantized with a float logits head" in capsys.readouterr().err


def test_int4_export_uses_matmulnbits_and_matches_pytorch_int4(tmp_path):
    model = presets.build("llama-tiny", seed=0).eval()
    dense_bytes = sum(p.numel() * 4 for p in model.parameters())
    quantize_(model, QuantConfig(weight_bits=4, act_bits=16, group_size=16))
    path = export_onnx(model, tmp_path / "m.onnx", quant="int4")
    assert ("com.microsoft", "MatMulNBits") in _op_types(path)
    weights = sum(len(t.raw_data) for t in onnx.load(str(path)).graph.initializer)
    packed = sum(m.qweight.numel() + m.scale.numel() * 4 for m in quantized_modules(model).values())
    float_rest = sum(p.numel() * 4 for p in model.parameters())  # embeddings, norms, lm_head
    # the weights stored are packed nibbles + scales, not float projection weights (~5x packed)
    assert weights < float_rest + 1.5 * packed < dense_bytes
    ids = _ids((2, 9))
    # W4A16: MatMulNBits dequantizes blockwise in fp32 like the op; only summation order differs.
    np.testing.assert_allclose(OnnxCausalLM(path).forward(ids)[0], _logits(model, ids), atol=1e-4, rtol=0)


def test_quant_mode_must_match_how_the_model_was_prepared(int8_export, tiny_model, tmp_path):
    model, _ = int8_export
    with pytest.raises(ValueError, match="not quantized to int8: run colafx.quantize_"):
        export_onnx(tiny_model, tmp_path / "a.onnx", quant="int8")
    with pytest.raises(ValueError, match="quantized to int8 but quant='int4'"):
        export_onnx(model, tmp_path / "b.onnx", quant="int4")
    with pytest.raises(ValueError, match="unknown quant"):
        export_onnx(tiny_model, tmp_path / "c.onnx", quant="int3")
    with pytest.raises(ValueError, match="unknown dtype"):
        export_onnx(tiny_model, tmp_path / "d.onnx", dtype="bf16")
    with pytest.raises(ValueError, match="unknown onnx_ops"):
        export_onnx(tiny_model, tmp_path / "e.onnx", onnx_ops="fused")
    assert not list(tmp_path.iterdir())  # nothing written on error


def test_the_cli_offers_exactly_the_onnx_ops_the_translation_table_takes():
    # export.py keeps its own copy so that `colafx --help` does not import onnxscript
    from colafx.kernels.onnx import ONNX_OPS

    assert export_module.ONNX_OPS == ONNX_OPS


def test_unsupported_model_is_a_clear_error(tmp_path):
    from tests.llama_plain import PlainLlama

    with pytest.raises(ValueError, match="cannot export PlainLlama"):
        export_onnx(PlainLlama(vocab=64, d=32, ff=64, layers=1, heads=2), tmp_path / "m.onnx")


def test_missing_or_corrupt_files_are_clear_errors(cola_export, tmp_path, capsys):
    _, path = cola_export
    with pytest.raises(FileNotFoundError, match="does not exist"):
        OnnxCausalLM(tmp_path / "none.onnx")
    lone = tmp_path / "lone.onnx"
    lone.write_bytes(path.read_bytes())
    with pytest.raises(FileNotFoundError, match="lone.json is missing"):
        OnnxCausalLM(lone)
    lone.with_suffix(".json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        OnnxCausalLM(lone)
    assert main(["export", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "x.onnx")]) == 1
    assert "does not exist" in capsys.readouterr().err


@pytest.fixture(scope="module")
def smollm2_export(smollm2_path, tmp_path_factory):
    """SmolLM2-135M (dense fp32, KV cache) exported once with its tokenizer."""
    from colafx.runtime.models import load_model, load_tokenizer

    model, tokenizer = load_model("smollm2"), load_tokenizer("smollm2")
    path = export_onnx(model, tmp_path_factory.mktemp("smollm2") / "model.onnx", tokenizer=tokenizer)
    return model, tokenizer, path


def test_smollm2_greedy_generate_matches_pytorch(smollm2_export):
    model, tokenizer, path = smollm2_export
    lm = OnnxCausalLM(path)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
    got = lm.generate(ids, max_new_tokens=16)
    assert torch.equal(got, expected)
    assert "Paris" in lm.tokenizer().decode(got[0, ids.shape[1]:])  # the recorded tokenizer loads
    np.testing.assert_allclose(lm.forward(ids)[0], _logits(model, ids), atol=1e-3, rtol=0)


def test_smollm2_colaified_greedy_generate_matches_pytorch_and_file_shrinks(smollm2_export, tmp_path):
    from colafx.runtime.models import load_model

    _, tokenizer, dense_path = smollm2_export
    model = colafx.colaify(load_model("smollm2"), rank=0.25, init="svd").eval()  # rank d/4 = 144
    path = export_onnx(model, tmp_path / "cola.onnx")
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
    assert torch.equal(OnnxCausalLM(path).generate(ids, max_new_tokens=16), expected)
    # projections at rank d/4 hold ~0.41x the dense parameters; embeddings / lm_head are unchanged
    assert path.stat().st_size < 0.6 * dense_path.stat().st_size


def _zero_points_of(path):
    """{node name: uint8 zero points} of the MatMulNBits nodes that read zero points, and every node's op type."""
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    inits = {t.name: t for t in graph.initializer}
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    return {n.name: numpy_helper.to_array(inits[n.input[3]]) for n in nbits if len(n.input) > 3}, nbits


@pytest.mark.parametrize("onnx_ops, group_size", [("contrib", 16), ("standard", 16), ("contrib", None)])
def test_asymmetric_int4_w4a16_export_matches_pytorch(tmp_path, onnx_ops, group_size):
    """Zero points reach the graph: MatMulNBits' packed uint4 zero points (folded to initializers, q/k/v
    and gate/up still fused; per channel: repeated per block; an odd block count padded, as
    d_ff 176 / 16 = 11 blocks), or a subtraction in the in-graph dequantization; W4A16 logits equal
    PyTorch's up to summation order."""
    from colafx.kernels.onnx import nbits_block_size

    model = presets.build("llama-tiny", seed=0).eval()
    quantize_(model, QuantConfig(weight_bits=4, act_bits=16, group_size=group_size, symmetric=False),
              filter_fn=lambda m, n: True)
    assert any(bool(m.zero.any()) for m in quantized_modules(model).values())
    path = export_onnx(model, tmp_path / "m.onnx", quant="int4", onnx_ops=onnx_ops)
    zero_points, nbits = _zero_points_of(path)
    if onnx_ops == "contrib":
        assert len(nbits) == 9 and len(zero_points) == 9  # 2 layers x (qkv, o, gate/up, down) + head
        assert not {"BitShift", "BitwiseOr", "Pad"} & {op for _, op in _op_types(path)}
        head = zero_points[nbits[-1].name]
        blocks = 64 // nbits_block_size(64, group_size)
        z = np.repeat(model.lm_head.zero.numpy().astype(np.int16) + 8, blocks // model.lm_head.zero.shape[1], axis=1)
        z = np.pad(z, ((0, 0), (0, blocks % 2)))  # two blocks per byte, the even one in the low nibble
        assert np.array_equal(head, (z[:, 0::2] | (z[:, 1::2] << 4)).astype(np.uint8).reshape(-1))
    else:
        assert not nbits
    ids = _ids((2, 9))
    np.testing.assert_allclose(OnnxCausalLM(path).forward(ids)[0], _logits(model, ids), atol=1e-4, rtol=0)


def test_cli_asymmetric_int4_export_with_quantized_head(tmp_path, capsys):
    """``colafx export --quant int4 --quant-head --asymmetric``: the PyTorch model quantized the same
    way (onnxruntime's int4 grid) and the graph agree (MatMulNBits quantizes activations per block of
    K, the op per token: 3e-2 of the largest |logit|); the flag is refused where it would be ignored."""
    colafx.save(presets.build("llama-tiny", seed=0, intermediate_size=192), tmp_path / "ckpt")  # 32 | every d_in
    assert main(["export", "--model", str(tmp_path / "ckpt"), "--out", str(tmp_path / "m.onnx"),
                 "--quant", "int4", "--quant-head", "--asymmetric"]) == 0
    reference = quantize_for_export(colafx.load(tmp_path / "ckpt"), "int4", head=True, symmetric=False).eval()
    assert reference.lm_head.zero is not None
    zero_points, nbits = _zero_points_of(tmp_path / "m.onnx")
    assert len(zero_points) == len(nbits) == 9
    ids = _ids((2, 9))
    expected = _logits(reference, ids)
    np.testing.assert_allclose(OnnxCausalLM(tmp_path / "m.onnx").forward(ids)[0], expected,
                               atol=3e-2 * np.abs(expected).max(), rtol=0)
    assert main(["export", "--model", str(tmp_path / "ckpt"), "--out", str(tmp_path / "x.onnx"),
                 "--quant", "int8", "--asymmetric"]) == 1
    assert "--asymmetric needs --quant int4" in capsys.readouterr().err
    colafx.save(reference, tmp_path / "quantized")
    assert main(["export", "--model", str(tmp_path / "quantized"), "--out", str(tmp_path / "y.onnx"),
                 "--quant", "int4", "--asymmetric"]) == 1
    assert "already quantized" in capsys.readouterr().err
    with pytest.raises(ValueError, match="symmetric=False"):
        quantize_for_export(presets.build("llama-tiny", seed=0), "int8", symmetric=False)


def test_cli_group_size_sets_the_matmulnbits_block_and_is_refused_where_it_cannot_apply(tmp_path, capsys):
    """``--group-size 64``: every MatMulNBits has block_size 64 with one scale per 64 input columns, and
    the graph agrees with the PyTorch model quantized with 64-column groups; a group that is not a
    power of two, one that does not divide a linear's d_in (the error names it), int8, and an
    already-quantized checkpoint are refused with one line, the default 32 too when named."""
    import onnx

    colafx.save(presets.build("llama-tiny", seed=0, intermediate_size=192), tmp_path / "ckpt")  # 64 | every d_in
    assert main(["export", "--model", str(tmp_path / "ckpt"), "--out", str(tmp_path / "m.onnx"),
                 "--quant", "int4", "--quant-head", "--asymmetric", "--group-size", "64"]) == 0
    reference = quantize_for_export(colafx.load(tmp_path / "ckpt"), "int4", head=True, symmetric=False,
                                    group_size=64).eval()
    assert reference.model.layers[0].mlp.down_proj.scale.shape == (64, 192 // 64)
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    inits = {t.name: t for t in graph.initializer}
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 9
    for node in nbits:
        attrs = {a.name: a.i for a in node.attribute}
        assert attrs["block_size"] == 64
        assert int(np.prod(inits[node.input[2]].dims)) == attrs["N"] * attrs["K"] // 64
    ids = _ids((2, 9))
    expected = _logits(reference, ids)
    np.testing.assert_allclose(OnnxCausalLM(tmp_path / "m.onnx").forward(ids)[0], expected,
                               atol=3e-2 * np.abs(expected).max(), rtol=0)
    for extra, message in ((["--quant", "int4", "--group-size", "48"], "power of two >= 16"),
                           (["--quant", "int4", "--group-size", "128"], "does not divide d_in 64"),
                           (["--quant", "int8", "--group-size", "64"], "--group-size needs --quant int4"),
                           (["--quant", "int8", "--group-size", "32"], "--group-size needs --quant int4")):
        assert main(["export", "--model", str(tmp_path / "ckpt"), "--out", str(tmp_path / "x.onnx"), *extra]) == 1
        assert message in capsys.readouterr().err
    colafx.save(reference, tmp_path / "quantized")
    assert main(["export", "--model", str(tmp_path / "quantized"), "--out", str(tmp_path / "y.onnx"),
                 "--quant", "int4", "--group-size", "64"]) == 1
    assert "--group-size" in capsys.readouterr().err
    assert main(["export", "--model", str(tmp_path / "quantized"), "--out", str(tmp_path / "y.onnx"),
                 "--quant", "int4", "--group-size", "32"]) == 1  # an explicit default too: it would be ignored
    assert "--group-size" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists() and not (tmp_path / "y.onnx").exists()
    with pytest.raises(ValueError, match="group_size is for int4"):
        quantize_for_export(colafx.load(tmp_path / "ckpt"), "int8", group_size=32)


def test_cli_gptq_export_is_calibrated_on_the_given_text(tmp_path, capsys, docs, tokenizer_dir):
    """``--gptq TEXT``: the graph holds GPTQ weights (the PyTorch model quantized with the same
    calibration ids agrees with it), in the asymmetric int4 format; refused without --quant, for a
    checkpoint without a tokenizer, and for a missing file."""
    from transformers import AutoTokenizer

    from colafx.runtime.data import calibration_ids

    folder = tmp_path / "ckpt"
    colafx.save(presets.build("llama-tiny", seed=0, intermediate_size=192), folder)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.save_pretrained(folder / "tokenizer")
    (tmp_path / "calib.txt").write_text("\n\n".join(docs[:20]))
    assert main(["export", "--model", str(folder), "--out", str(tmp_path / "m.onnx"), "--quant", "int4",
                 "--asymmetric", "--gptq", str(tmp_path / "calib.txt"), "--calibration-tokens", "1024"]) == 0
    ids = calibration_ids(tmp_path / "calib.txt", tokenizer, 1024)
    assert ids.shape == (4, 256)
    reference = quantize_for_export(colafx.load(folder), "int4", symmetric=False, calibration=ids).eval()
    rtn = quantize_for_export(colafx.load(folder), "int4", symmetric=False)
    assert not torch.equal(reference.model.layers[0].mlp.up_proj.qweight, rtn.model.layers[0].mlp.up_proj.qweight)
    zero_points, nbits = _zero_points_of(tmp_path / "m.onnx")
    assert len(zero_points) == len(nbits) == 8  # the head stays fp32
    test_ids = _ids((2, 9))
    expected = _logits(reference, test_ids)
    np.testing.assert_allclose(OnnxCausalLM(tmp_path / "m.onnx").forward(test_ids)[0], expected,
                               atol=3e-2 * np.abs(expected).max(), rtol=0)
    assert main(["export", "--model", str(folder), "--out", str(tmp_path / "x.onnx"), "--gptq", "c.txt"]) == 1
    assert "--gptq needs --quant" in capsys.readouterr().err
    colafx.save(presets.build("llama-tiny", seed=0, intermediate_size=192), tmp_path / "bare")
    assert main(["export", "--model", str(tmp_path / "bare"), "--out", str(tmp_path / "y.onnx"), "--quant", "int4",
                 "--gptq", str(tmp_path / "calib.txt")]) == 1
    assert "has no tokenizer" in capsys.readouterr().err
    assert main(["export", "--model", str(folder), "--out", str(tmp_path / "z.onnx"), "--quant", "int4",
                 "--gptq", str(tmp_path / "missing.txt")]) == 1
    assert "missing.txt" in capsys.readouterr().err
    assert not (tmp_path / "z.onnx").exists()
