"""The ONNX attention pass (colafx.passes.onnx_attention) on real exports of each supported family.

Each export is checked twice: its graph (every layer's Attention reads the past cache and writes
the present one itself, with 3-D q / k / v and grouped kv heads, and no Concat / Expand / Transpose
is left around it) and its numbers (prefill and three one-token decode steps in onnxruntime equal
the PyTorch model to 1e-4, the fp32 tolerance of tests/runtime/test_export.py; left-padded and
sliding-window masks included). Exports without a cache are checked the same way (3-D grouped
heads, no repeat; prefill equal to PyTorch).
"""
import numpy as np
import onnx
import pytest
import torch
from onnx import helper

from colafx.passes.onnx_attention import fuse_attention_cache
from colafx.runtime.export import OnnxCausalLM, export_onnx


def _tiny(model_type: str):
    import transformers

    config_class = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
                    "qwen2": transformers.Qwen2Config}[model_type]
    config = config_class(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=64,
                          sliding_window=4 if model_type == "mistral" else None, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # Qwen2's q/k/v biases start at zero: give them values to carry
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(0, 0.5)
    return model


@pytest.fixture(scope="module", params=["llama", "mistral", "qwen2"])
def family_export(request, tmp_path_factory):
    model = _tiny(request.param)
    path = export_onnx(model, tmp_path_factory.mktemp(request.param) / "model.onnx")
    return model, path


def _attrs(node):
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def test_each_layer_attention_reads_and_writes_its_cache_with_3d_grouped_heads(family_export):
    model, path = family_export
    graph = onnx.load(str(path)).graph
    attention = [n for n in graph.node if n.op_type == "Attention"]
    assert len(attention) == model.config.num_hidden_layers
    for i, node in enumerate(attention):
        assert list(node.input[4:]) == [f"past_key_{i}", f"past_value_{i}"]
        assert list(node.output[1:]) == [f"present_key_{i}", f"present_value_{i}"]
        attrs = _attrs(node)
        assert (attrs["q_num_heads"], attrs["kv_num_heads"]) == (4, 2)
    past = {v.name for v in graph.input if v.name.startswith("past_")}
    readers = {n.op_type for n in graph.node for name in n.input if name in past}
    assert readers <= {"Attention", "Shape"}  # no Concat of the cache left (Shape: the mask's past length)
    ops = [n.op_type for n in graph.node]
    assert "Expand" not in ops[ops.index("Attention"):]  # no head repeat (the mask's Expand comes first)
    assert "Transpose" not in ops


def test_prefill_and_decode_match_pytorch(family_export):
    model, path = family_export
    lm = OnnxCausalLM(path)
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # the second prompt is left-padded
    logits, present = lm.forward(ids, attention_mask=mask)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits.numpy()
    np.testing.assert_allclose(logits[0], expected[0], atol=1e-4, rtol=0)
    np.testing.assert_allclose(logits[1, 2:], expected[1, 2:], atol=1e-4, rtol=0)
    for step in range(3):  # past the mistral window of 4
        token = torch.randint(0, 128, (2, 1), generator=torch.Generator().manual_seed(10 + step))
        ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
        logits, present = lm.forward(token, present, attention_mask=mask)
        assert present[0].shape == (2, 2, ids.shape[1], 16)
        with torch.no_grad():
            expected = model(input_ids=ids, attention_mask=mask).logits[:, -1].numpy()
        np.testing.assert_allclose(logits[:, 0], expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
def test_export_without_cache_reads_grouped_heads_in_3d_and_matches_pytorch(tmp_path, model_type):
    """kv_cache=False: each Attention takes 3-D q / k / v with grouped kv heads (no head repeat,
    no Transpose left), and the logits of a left-padded batch equal PyTorch's."""
    model = _tiny(model_type)
    path = export_onnx(model, tmp_path / "model.onnx", kv_cache=False)
    graph = onnx.load(str(path)).graph
    attention = [n for n in graph.node if n.op_type == "Attention"]
    assert len(attention) == model.config.num_hidden_layers
    for node in attention:
        assert len(node.input) == 4 and len(node.output) == 1
        assert (_attrs(node)["q_num_heads"], _attrs(node)["kv_num_heads"]) == (4, 2)
    ops = [n.op_type for n in graph.node]
    assert "Expand" not in ops[ops.index("Attention"):] and "Transpose" not in ops
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    logits, present = OnnxCausalLM(path).forward(ids, attention_mask=mask)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits.numpy()
    assert present is None
    np.testing.assert_allclose(logits[0], expected[0], atol=1e-4, rtol=0)
    np.testing.assert_allclose(logits[1, 3:], expected[1, 3:], atol=1e-4, rtol=0)


def test_opset_20_export_has_no_attention_op_and_still_matches(tmp_path):
    model = _tiny("llama")
    path = export_onnx(model, tmp_path / "model.onnx", opset=20)
    graph = onnx.load(str(path)).graph
    ops = {n.op_type for n in graph.node}
    assert "Attention" not in ops and "Concat" in ops  # the pass found nothing to fuse
    ids = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(2))
    logits, _ = OnnxCausalLM(path).forward(ids)
    with torch.no_grad():
        np.testing.assert_allclose(logits, model(input_ids=ids).logits.numpy(), atol=1e-4, rtol=0)


def _cache_graph(extra_reader: bool):
    """One Attention whose key / value are Concat(past, new) graph outputs, as the exporter writes
    it; with ``extra_reader`` the key cache is also read by an Identity."""
    f = onnx.TensorProto.FLOAT
    names = ["q", "k", "v", "past_key", "past_value"]
    inputs = [helper.make_tensor_value_info(n, f, None) for n in names]
    nodes = [helper.make_node("Concat", ["past_key", "k"], ["present_key"], axis=2),
             helper.make_node("Concat", ["past_value", "v"], ["present_value"], axis=2),
             helper.make_node("Attention", ["q", "present_key", "present_value"], ["y"])]
    outputs = ["y", "present_key", "present_value"]
    if extra_reader:
        nodes.append(helper.make_node("Identity", ["present_key"], ["seen"]))
        outputs.append("seen")
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info(n, f, None) for n in outputs])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])


def test_a_cache_read_by_another_node_is_left_unfused():
    model = _cache_graph(extra_reader=True)
    assert fuse_attention_cache(model) == 0
    assert [n.op_type for n in model.graph.node] == ["Concat", "Concat", "Attention", "Identity"]
    model = _cache_graph(extra_reader=False)
    assert fuse_attention_cache(model) == 1
    (node,) = model.graph.node
    assert list(node.input) == ["q", "k", "v", "", "past_key", "past_value"]
    assert list(node.output) == ["y", "present_key", "present_value"]


def test_without_a_cache_the_head_repeat_goes_and_a_repeat_read_elsewhere_stays():
    """No Concat: Unsqueeze -> Expand -> Reshape (the grouped-head repeat) is dropped from k and v; a
    repeat that another node also reads is kept, and the node is not counted."""
    f = onnx.TensorProto.FLOAT

    def graph(extra_reader):
        nodes, outputs = [], ["y"]
        for t in ("k", "v"):
            nodes += [helper.make_node("Unsqueeze", [t, "axes"], [f"{t}_u"]),
                      helper.make_node("Expand", [f"{t}_u", "shape5"], [f"{t}_e"]),
                      helper.make_node("Reshape", [f"{t}_e", "shape4"], [f"{t}_r"])]
        nodes.append(helper.make_node("Attention", ["q", "k_r", "v_r"], ["y"]))
        if extra_reader:
            nodes.append(helper.make_node("Identity", ["k_r"], ["seen"]))
            outputs.append("seen")
        inits = [helper.make_tensor("axes", onnx.TensorProto.INT64, [1], [2]),
                 helper.make_tensor("shape5", onnx.TensorProto.INT64, [5], [1, 2, 2, 3, 8]),
                 helper.make_tensor("shape4", onnx.TensorProto.INT64, [4], [1, 4, 3, 8])]
        g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, f, None) for n in "qkv"],
                              [helper.make_tensor_value_info(n, f, None) for n in outputs], inits)
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 23)])

    model = graph(extra_reader=False)
    assert fuse_attention_cache(model) == 1
    (node,) = model.graph.node
    assert list(node.input) == ["q", "k", "v"] and not model.graph.initializer
    model = graph(extra_reader=True)
    assert fuse_attention_cache(model) == 0
    assert [n.op_type for n in model.graph.node].count("Expand") == 2


def test_an_onnxruntime_without_opset_23_is_a_clear_error(family_export, monkeypatch):
    import onnxruntime

    _, path = family_export

    def old_runtime(*args, **kwargs):
        raise onnxruntime.capi.onnxruntime_pybind11_state.NotImplemented(
            "[ONNXRuntimeError] : 9 : NOT_IMPLEMENTED : Could not find an implementation for Attention(23)")

    monkeypatch.setattr(onnxruntime, "InferenceSession", old_runtime)
    with pytest.raises(RuntimeError, match=r"ONNX opset 23\): .*Attention\(23\); upgrade onnxruntime, "
                                           r"or export again with --opset 20"):
        OnnxCausalLM(path)
