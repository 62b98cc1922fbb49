"""colafx::lowrank_act — Triton kernels (interpreter) and the CPU path against lowrank_act_ref.

Tolerance: max|Δ| / max|ref| ≤ REL_TOL[dtype] (fp32 1e-5, fp16 4e-3, bf16 3e-2) for outputs;
gradients (sums over up to 129 rows) get 4x that.
"""
import functools

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from colafx.kernels import lowrank
from colafx.kernels.lowrank import (
    lowrank_act,
    lowrank_act_backward_triton,
    lowrank_act_ref,
    lowrank_act_triton,
)

from .conftest import REL_TOL, needs_triton, rel_err

SHAPES = [(1, 67, 45), (7, 67, 45), (129, 40, 17)]  # (M, d_in, r): nothing a multiple of a tile
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ACTS = ["silu", "identity"]


def _inputs(m, k, n, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(dtype)
    w = (torch.randn(n, k, generator=gen) / k**0.5).to(dtype)
    g = torch.randn(m, n, generator=gen).to(dtype)
    return x, w, g


def _ref_grads(x, w, g, act):
    xr = x.detach().float().requires_grad_()
    wr = w.detach().float().requires_grad_()
    out = lowrank_act_ref(xr, wr, act)
    out.backward(g.float())
    return out, xr.grad, wr.grad


@needs_triton
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_forward_and_backward_match_ref(shape, dtype, act):
    x, w, g = _inputs(*shape, dtype)
    ref, ref_gx, ref_gw = _ref_grads(x, w, g, act)
    out = lowrank_act_triton(x, w, act)
    grad_x, grad_w = lowrank_act_backward_triton(g, x, w, act)
    assert out.dtype == dtype and out.shape == ref.shape
    assert rel_err(out, ref) <= REL_TOL[dtype]
    assert rel_err(grad_x, ref_gx) <= 4 * REL_TOL[dtype]
    assert rel_err(grad_w, ref_gw) <= 4 * REL_TOL[dtype]


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_op_cpu_path_matches_ref(shape, dtype, act):
    x, w, g = _inputs(*shape, dtype)
    ref, ref_gx, ref_gw = _ref_grads(x, w, g, act)
    x.requires_grad_()
    w.requires_grad_()
    out = lowrank_act(x, w, act)
    out.backward(g)
    assert rel_err(out, ref) <= REL_TOL[dtype]
    assert rel_err(x.grad, ref_gx) <= 4 * REL_TOL[dtype]
    assert rel_err(w.grad, ref_gw) <= 4 * REL_TOL[dtype]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_op_routed_through_triton_with_batched_input(force_triton, dtype):
    """The custom op + autograd formula + dz op, all on the Triton path, for x [B, T, d_in]."""
    x, w, g = _inputs(10, 33, 20, dtype)
    x3, g3 = x.reshape(2, 5, 33), g.reshape(2, 5, 20)
    ref, ref_gx, ref_gw = _ref_grads(x3, w, g3, "silu")
    x3.requires_grad_()
    w.requires_grad_()
    out = lowrank_act(x3, w)
    out.backward(g3)
    assert out.shape == (2, 5, 20)
    assert rel_err(out, ref) <= REL_TOL[dtype]
    assert rel_err(x3.grad, ref_gx) <= 4 * REL_TOL[dtype]
    assert rel_err(w.grad, ref_gw) <= 4 * REL_TOL[dtype]


def test_backward_keeps_only_inputs():
    """Autograd saves exactly (x, weight): no pre-activation or output is kept."""
    x = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(3, 8, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        lowrank_act(x, w).sum().backward()
    assert len(saved) == 2
    assert {t.data_ptr() for t in saved} == {x.data_ptr(), w.data_ptr()}


def test_only_requested_grads_are_computed():
    x = torch.randn(4, 8)
    w = torch.randn(3, 8, requires_grad=True)
    lowrank_act(x, w).sum().backward()
    assert x.grad is None and w.grad is not None


def test_opcheck():
    x = torch.randn(3, 5, 16, requires_grad=True)
    w = torch.randn(8, 16, requires_grad=True)
    torch.library.opcheck(torch.ops.colafx.lowrank_act.default, (x, w, "silu"))
    torch.library.opcheck(torch.ops.colafx.lowrank_act.default, (x, w, "identity"))
    g = torch.randn(3, 5, 8)
    torch.library.opcheck(torch.ops.colafx.lowrank_act_dz.default, (g, x.detach(), w.detach(), "silu"))


def test_torch_compile_fullgraph_matches_eager():
    x = torch.randn(6, 16, requires_grad=True)
    w = torch.randn(8, 16, requires_grad=True)
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm)

    backend = aot_autograd(fw_compiler=record, bw_compiler=record)

    def f(x, w):
        return (lowrank_act(x, w) * 2).sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, backend=backend, fullgraph=True)
    got = torch.autograd.grad(compiled(x, w), (x, w))
    want = torch.autograd.grad(f(x, w), (x, w))
    forward, backward = graphs
    assert any(n.target == torch.ops.colafx.lowrank_act.default for n in forward.graph.nodes)
    assert any(n.target == torch.ops.colafx.lowrank_act_dz.default for n in backward.graph.nodes)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_torch_export_keeps_the_op():
    class Bottleneck(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Parameter(torch.randn(8, 16))

        def forward(self, x):
            return lowrank_act(x, self.a)

    module, x = Bottleneck(), torch.randn(2, 3, 16)
    ep = torch.export.export(module, (x,))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert targets == [torch.ops.colafx.lowrank_act.default]
    torch.testing.assert_close(ep.module()(x), module(x))


class _CountOp(TorchDispatchMode):
    def __init__(self, op):
        super().__init__()
        self.op, self.calls = op, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += func == self.op
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("save_op", [True, False])
def test_selective_checkpoint_policy_sees_and_saves_the_op(save_op):
    """MUST_SAVE on the op: it runs once (no recompute); PREFER_RECOMPUTE: it runs twice."""
    op = torch.ops.colafx.lowrank_act.default
    seen = []

    def policy(ctx, func, *args, **kwargs):
        seen.append(func)
        if func == op and save_op:
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    def block(x, w):
        return (lowrank_act(x, w) @ w).sin()

    x = torch.randn(5, 16, requires_grad=True)
    w = torch.randn(8, 16, requires_grad=True)
    context = functools.partial(create_selective_checkpoint_contexts, policy)
    with _CountOp(op) as counter:
        out = checkpoint(block, x, w, use_reentrant=False, context_fn=context)
        grads = torch.autograd.grad(out.sum(), (x, w))
    assert op in seen
    assert counter.calls == (1 if save_op else 2)
    for a, b in zip(grads, torch.autograd.grad(block(x, w).sum(), (x, w))):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "args, error",
    [
        ((torch.randn(2, 4).int(), torch.randn(3, 4).int()), TypeError),
        ((torch.randn(2, 4), torch.randn(3, 4, dtype=torch.float64)), TypeError),
        ((torch.randn(2, 4), torch.randn(3, 4).half()), TypeError),
        ((torch.randn(2, 5), torch.randn(3, 4)), ValueError),
        ((torch.randn(2, 4), torch.randn(4)), ValueError),
        ((torch.randn(2, 4), torch.randn(3, 4), "gelu"), ValueError),
    ],
)
def test_bad_inputs_raise(args, error):
    with pytest.raises(error):
        lowrank_act(*args)


def test_identity_is_a_plain_projection():
    x, w, _ = _inputs(7, 67, 45, torch.float32)
    torch.testing.assert_close(lowrank_act(x, w, "identity"), x @ w.T)
    assert lowrank.ACTIVATIONS == ("silu", "identity")
