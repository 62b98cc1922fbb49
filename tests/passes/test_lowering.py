"""Bottleneck and quantized-linear lowering on Dynamo (torch-level) and export (ATen) graphs.

Tolerances: fp32 rewrites compute the same ATen math, compared at 1e-6 abs; bf16 autocast at 2e-2;
W8A8 (activation quantization) at 3 % of the output range.
"""
import torch
import torch.nn.functional as F
from torch import nn

from colafx.kernels.quant import quantize_weight
from colafx.passes.lowering import LowerBottlenecks, LowerQuantizedLinears


def lowered(module, graph_pass, *inputs):
    """Compile ``module`` with a backend that applies ``graph_pass`` to the Dynamo graph and runs it
    as is (autograd through the rewritten graph). Returns (compiled module, graph, pass summary)."""
    seen = {}

    def backend(gm, example_inputs):
        seen["summary"] = graph_pass.run(gm)
        gm.recompile()
        seen["gm"] = gm
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(module, backend=backend, fullgraph=True)
    compiled(*inputs)
    return compiled, seen["gm"], seen["summary"]


def ops(gm) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


class Bottleneck(nn.Module):
    """A hand-written CoLA bottleneck B·silu(A·x) + bias, then a residual use of x."""

    def __init__(self, d=32, r=8, d_out=24, a_bias=False):
        super().__init__()
        self.a, self.b = nn.Linear(d, r, bias=a_bias), nn.Linear(r, d_out)

    def forward(self, x):
        return self.b(F.silu(self.a(x))) + x[..., :1]


def test_hand_written_bottleneck_lowers_and_matches_forward_backward():
    torch.manual_seed(0)
    module = Bottleneck()
    x = torch.randn(3, 5, 32, requires_grad=True)
    compiled, gm, summary = lowered(module, LowerBottlenecks(), x.detach())
    assert summary == "fused 1 bottlenecks into colafx::lowrank_act"
    assert "colafx.lowrank_act.default" in ops(gm) and not any("silu" in o for o in ops(gm))

    x_ref = x.detach().clone().requires_grad_()
    ref = module(x_ref)
    ref.square().sum().backward()
    grads_ref = [p.grad.clone() for p in module.parameters()]
    module.zero_grad()
    out = compiled(x)
    out.square().sum().backward()
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-6, rtol=0)
    for p, g in zip(module.parameters(), grads_ref):
        torch.testing.assert_close(p.grad, g, atol=1e-5, rtol=0)


def test_non_bottlenecks_are_left_alone():
    torch.manual_seed(0)
    cases = {
        "dense MLP (r > d_in)": Bottleneck(d=16, r=64, d_out=16),
        "bias on A": Bottleneck(a_bias=True),
    }

    class SharedPreActivation(Bottleneck):
        def forward(self, x):
            z = self.a(x)
            return self.b(F.silu(z)) + z.sum(-1, keepdim=True)

    cases["pre-activation used twice"] = SharedPreActivation()
    for what, module in cases.items():
        d = module.a.in_features
        _, gm, summary = lowered(module, LowerBottlenecks(), torch.randn(2, d))
        assert summary.startswith("found no CoLA bottleneck"), what
        assert "colafx.lowrank_act.default" not in ops(gm), what


def test_bottleneck_under_bf16_autocast_casts_inputs():
    torch.manual_seed(0)
    module = Bottleneck()
    x = torch.randn(4, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        compiled, gm, summary = lowered(module, LowerBottlenecks(), x)
        ref = module(x)
        out = compiled(x)
    assert summary.startswith("fused 1")
    op = next(n for n in gm.graph.nodes if n.target == torch.ops.colafx.lowrank_act.default)
    assert [a.meta["example_value"].dtype for a in op.args[:2]] == [torch.bfloat16] * 2
    assert out.dtype == ref.dtype
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


def test_bottleneck_on_exported_aten_graph():
    torch.manual_seed(0)
    module = Bottleneck()
    x = torch.randn(2, 7, 32)
    ep = torch.export.export(module, (x,), strict=False)
    gm = ep.module()
    summary = LowerBottlenecks().run(gm)
    gm.recompile()
    assert summary.startswith("fused 1")
    torch.testing.assert_close(gm(x), module(x), atol=1e-6, rtol=0)


class DequantLinear(nn.Module):
    """Weight-only int8 linear written out by hand: per-channel or per-group dequantization."""

    def __init__(self, d_in=64, d_out=48, group_size=None):
        super().__init__()
        qw = quantize_weight(torch.randn(d_out, d_in), bits=8, group_size=group_size)
        self.register_buffer("q", qw.qweight)
        self.register_buffer("scale", qw.scale)
        self.bias = nn.Parameter(torch.randn(d_out))
        self.group_size = group_size

    def forward(self, x):
        if self.group_size is None:
            w = self.q.float() * self.scale
        else:
            n, k = self.q.shape
            w = (self.q.float().reshape(n, -1, self.group_size) * self.scale[..., None]).reshape(n, k)
        return F.linear(x, w, self.bias)


def test_dequantize_linear_lowers_to_int8_linear():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 64)
    for group_size in (None, 16):
        module = DequantLinear(group_size=group_size)
        compiled, gm, summary = lowered(module, LowerQuantizedLinears(act_bits=16), x)
        assert summary.startswith("lowered 1 dequantize+linear"), (group_size, summary)
        assert "colafx.int8_linear.default" in ops(gm)
        torch.testing.assert_close(compiled(x), module(x), atol=1e-5, rtol=1e-5)


def test_w8a8_lowering_is_close_and_int8_weights_only_match():
    torch.manual_seed(0)
    module = DequantLinear()
    x = torch.randn(8, 64)
    compiled, _, summary = lowered(module, LowerQuantizedLinears(act_bits=8), x)
    assert summary.endswith("(act_bits=8)")
    ref = module(x)
    err = (compiled(x) - ref).abs().max()
    assert err <= 0.03 * ref.abs().max(), err


def test_float_weights_and_existing_quant_ops_are_not_lowered():
    from colafx.transform.quantize import QuantConfig, quantize_

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))
    _, _, summary = lowered(model, LowerQuantizedLinears(), torch.randn(2, 32))
    assert summary.startswith("found no quantized linear")
    quantize_(model, QuantConfig(weight_bits=8, act_bits=8), filter_fn=lambda m, name: name == "0")
    _, _, summary = lowered(model, LowerQuantizedLinears(), torch.randn(2, 32))
    assert summary.startswith("lowered 0") and "1 quantized linears already on colafx ops" in summary
