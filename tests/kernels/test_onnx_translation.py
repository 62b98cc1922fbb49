"""ONNX translations: tiny modules exported with torch.onnx.export(dynamo=True) run in onnxruntime.

Parity (max|Δ| / max|torch|): 1e-5 where the graph reproduces the op's arithmetic (lowrank_act,
per-token W8A8 through MatMulInteger or MatMulIntegerToFloat, W·A16 through MatMulNBits or in-graph dequantization);
3e-2 for W8A8 / W4A8 through MatMulNBits, whose accuracy_level=4 quantizes activations per block
of K (16..128) instead of per token (measured ≈ 5e-3).
"""
import contextlib
import io

import onnxruntime as ort
import pytest
import torch

from colafx.kernels import int4_linear, int8_linear, lowrank_act, quantize_weight
from colafx.kernels.onnx import nbits_block_size, onnx_translation_table
from colafx.runtime.export import onnxruntime_u8s8_exact

from .conftest import rel_err


class Block(torch.nn.Module):
    """x -> SiLU(x·Aᵀ)·A (low-rank bottleneck) -> quantized linear (+ bias)."""

    def __init__(self, k, n, bits, group_size, act_bits, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        qw = quantize_weight(torch.randn(n, k, generator=gen) / k**0.5, bits, group_size)
        self.register_buffer("qweight", qw.qweight)
        self.register_buffer("scale", qw.scale)
        self.a = torch.nn.Parameter(torch.randn(8, k, generator=gen) / k**0.5)
        self.bias = torch.nn.Parameter(torch.randn(n, generator=gen))
        self.bits, self.group_size, self.act_bits = bits, group_size, act_bits

    def forward(self, x):
        h = x + lowrank_act(x, self.a) @ self.a
        if self.bits == 8:
            return int8_linear(h, self.qweight, self.scale, self.bias, self.act_bits)
        return int4_linear(h, self.qweight, self.scale, self.bias, self.group_size, self.act_bits)


def _run_onnx(module, x, tmp_path, **table_kwargs):
    batch = torch.export.Dim("batch")
    with contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        program = torch.onnx.export(
            module, (x,), dynamo=True, dynamic_shapes=({0: batch},),
            custom_translation_table=onnx_translation_table(**table_kwargs),
        )
    path = tmp_path / "model.onnx"
    program.save(str(path))
    ops = {node.op_type for node in program.model_proto.graph.node}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return ops, lambda t: torch.from_numpy(session.run(None, {name: t.numpy()})[0])


@pytest.mark.parametrize(
    "k, bits, group_size, act_bits, onnx_ops, expect_op, tol",
    [
        (64, 8, None, 8, "standard", "MatMulInteger", 1e-5),
        (64, 8, None, 8, "contrib", "MatMulNBits", 3e-2),  # bits 8, per-block activations
        pytest.param(64, 8, None, 8, "contrib-vnni", "MatMulIntegerToFloat", 1e-5,  # the op's per-token codes
                     marks=pytest.mark.skipif(not onnxruntime_u8s8_exact(),
                                              reason="onnxruntime's u8·s8 GEMM saturates on x86 without VNNI")),
        (64, 8, 32, 8, "contrib-vnni", "MatMulNBits", 3e-2),  # per-group W8A8: as "contrib"
        (64, 8, 32, 16, "contrib", "MatMulNBits", 1e-5),  # W8A16 per group: exact dequant
        (64, 4, 32, 16, "contrib", "MatMulNBits", 1e-5),
        (64, 4, 32, 8, "contrib", "MatMulNBits", 3e-2),
        (64, 4, 32, 8, "standard", "MatMul", 1e-5),  # unpacked in the graph, per-token A8 exact
        (48, 4, None, 8, "contrib", "MatMulNBits", 3e-2),  # per channel: block 16, scale repeated
        (66, 4, None, 16, "contrib", "MatMul", 1e-5),  # K has no power-of-two block: in-graph dequant
    ],
)
def test_export_runs_in_onnxruntime_with_parity(exact_cpu_int8, tmp_path, k, bits, group_size, act_bits, onnx_ops, expect_op, tol):
    module = Block(k, 24, bits, group_size, act_bits).eval()
    ops, run = _run_onnx(module, torch.randn(2, 5, k), tmp_path, ops=onnx_ops)
    assert expect_op in ops and "Sigmoid" in ops
    if expect_op != "MatMulNBits":  # standard operators only (dequantization may be constant-folded)
        assert "MatMulNBits" not in ops
    for batch in (2, 3):  # dynamic batch
        x = torch.randn(batch, 5, k, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            assert rel_err(run(x), module(x)) <= tol


def test_dynamic_activation_quantization_option(tmp_path):
    module = Block(64, 24, 8, None, 8).eval()
    ops, run = _run_onnx(module, torch.randn(2, 5, 64), tmp_path, act_quant="dynamic", ops="standard")
    assert "DynamicQuantizeLinear" in ops
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        assert rel_err(run(x), module(x)) <= 5e-2  # per-tensor uint8 activations: coarser


def test_table_and_block_size_rules():
    table = onnx_translation_table()
    assert torch.ops.colafx.lowrank_act.default in table
    assert torch.ops.colafx.int8_linear.default in table
    assert torch.ops.colafx.int4_linear.default in table
    with pytest.raises(ValueError, match="act_quant"):
        onnx_translation_table(act_quant="per_block")
    with pytest.raises(ValueError, match="ops must be one of"):
        onnx_translation_table(ops="fused")
    assert nbits_block_size(4096, None) == 128
    assert nbits_block_size(48, None) == 16
    assert nbits_block_size(66, None) is None
    assert nbits_block_size(66, 6) is None
    assert nbits_block_size(64, 32) == 32
