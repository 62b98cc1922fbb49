"""Lower graph patterns to colafx kernel ops.

* :class:`LowerBottlenecks`: a CoLA bottleneck ``linear(σ(linear(x, A)), B)`` with σ = SiLU, no bias on
  A and a rank r below both d_in and d_out — whether it comes from a colaified model or was written
  by hand — becomes ``linear(colafx::lowrank_act(x, A, "silu"), B)``. The op saves only ``x`` and
  ``A`` for backward and recomputes the pre-activation (the fused Triton kernel on CUDA). For CoLA-M
  (``keep_pre_activation``) it becomes ``linear(silu(colafx::lowrank_in(x, A)), B)`` instead.
* :class:`LowerQuantizedLinears`: ``linear(x, dequant(q, scale))`` with an int8 weight ``q`` [N, K]
  and a per-channel [N, 1] or per-group [N, G] scale — ``(q.float() * scale)``, or grouped as
  ``(q.float().reshape(N, G, -1) * scale[..., None]).reshape(N, K)`` — becomes
  ``colafx::int8_linear(x, q, scale, bias, act_bits)``. ``act_bits=16`` (default) keeps the
  graph's numerics (weight-only); ``act_bits=8`` also quantizes activations (W8A8).
  :class:`colafx.transform.quantize.QuantLinear` modules already call the op; they are counted.

Both work on torch-level graphs from Dynamo and on ATen graphs (``torch.export``, AOT).
Under autocast the new op's inputs are cast to the dtype the replaced nodes computed in.
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F

from colafx.passes.projections import _val, op_name

_LINEAR_TARGETS = (F.linear, torch._C._nn.linear, torch.ops.aten.linear.default)
_SILU_TARGETS = (F.silu, torch.ops.aten.silu.default)
_CASTS = {"to", "_to_copy", "float", "type", "type_as", "bfloat16", "half", "_convert_element_type"}
_RESHAPES = {"view", "reshape", "_unsafe_view", "unsqueeze", "contiguous"}
_QUANT_OPS = {"int8_linear", "int4_linear"}


def _linear_parts(node: fx.Node) -> tuple[fx.Node, fx.Node, object] | None:
    """(input, weight, bias) of a linear node, or None when ``node`` is not a linear."""
    if node.op != "call_function" or node.target not in _LINEAR_TARGETS:
        return None
    args = list(node.args) + [None] * (3 - len(node.args))
    x, weight, bias = args[0], node.kwargs.get("weight", args[1]), node.kwargs.get("bias", args[2])
    if not isinstance(x, fx.Node) or not isinstance(weight, fx.Node):
        return None
    return x, weight, bias


def _is_silu(node: fx.Node) -> bool:
    if node.op != "call_function" or node.target not in _SILU_TARGETS:
        return False
    return not node.kwargs.get("inplace", False) and not (len(node.args) > 1 and node.args[1])


def _cast_to(graph: fx.Graph, node: fx.Node, dtype: torch.dtype | None) -> fx.Node:
    """``node`` converted to ``dtype`` (inserted before the current insertion point) if it differs."""
    val = _val(node)
    if dtype is None or val is None or val.dtype == dtype:
        return node
    cast = graph.call_function(torch.ops.aten._to_copy.default, (node,), {"dtype": dtype})
    cast.meta["val"] = cast.meta["example_value"] = val.to(dtype)
    return cast


class LowerBottlenecks:
    """Lower CoLA bottlenecks linear → SiLU → linear to ``colafx::lowrank_act`` (see module doc).

    ``keep_pre_activation=True`` (what CoLA-M's recompute tagging needs) lowers only the A projection,
    to ``colafx::lowrank_in``, and keeps the SiLU: the partitioner then saves ``A·x`` and recomputes
    the SiLU, so neither the recompute nor the SiLU backward runs A again (the fused op would save
    ``σ(A·x)`` and recompute ``A·x`` for its backward).
    """

    name = "fuse_lowrank"

    def __init__(self, keep_pre_activation: bool = False):
        self.keep_pre_activation = keep_pre_activation

    def run(self, gm: fx.GraphModule) -> str:
        """Rewrite every bottleneck of ``gm`` in place; return a summary with the count."""
        import colafx.kernels.lowrank  # noqa: F401  (registers colafx::lowrank_act / lowrank_in)

        graph = gm.graph
        fused = 0
        for act in list(graph.nodes):
            match = self._match(act)
            if match is None:
                continue
            pre, x, weight = match
            if self.keep_pre_activation:
                dtype = _val(pre).dtype if _val(pre) is not None else None
                with graph.inserting_before(pre):
                    op = graph.call_function(torch.ops.colafx.lowrank_in.default,
                                             (_cast_to(graph, x, dtype), _cast_to(graph, weight, dtype)))
                op.meta.update(pre.meta)
                pre.replace_all_uses_with(op)
                graph.erase_node(pre)
                fused += 1
                continue
            dtype = _val(act).dtype if _val(act) is not None else None
            with graph.inserting_before(act):
                op = graph.call_function(torch.ops.colafx.lowrank_act.default,
                                         (_cast_to(graph, x, dtype), _cast_to(graph, weight, dtype), "silu"))
            op.meta.update(act.meta)
            act.replace_all_uses_with(op)
            graph.erase_node(act)
            graph.erase_node(pre)
            fused += 1
        graph.eliminate_dead_code()
        if not fused:
            return "found no CoLA bottleneck (linear -> SiLU -> linear, rank below d_in and d_out)"
        if self.keep_pre_activation:
            return f"lowered {fused} bottleneck A projections to colafx::lowrank_in (CoLA-M keeps A·x)"
        return f"fused {fused} bottlenecks into colafx::lowrank_act"

    @staticmethod
    def _match(act: fx.Node):
        """(pre-activation linear, x, A weight) when ``act`` is the SiLU of a CoLA bottleneck."""
        if not _is_silu(act) or not isinstance(act.args[0], fx.Node):
            return None
        pre = act.args[0]
        parts = _linear_parts(pre)
        if parts is None or parts[2] is not None or len(pre.users) != 1:
            return None
        x, weight, _ = parts
        consumers = [_linear_parts(user) for user in act.users]
        if not consumers or any(c is None or c[0] is not act or c[1] is act for c in consumers):
            return None
        w_val = _val(weight)
        if w_val is None or w_val.dim() != 2:
            return None
        rank, d_in = w_val.shape
        outs = [_val(c[1]) for c in consumers]
        if not rank < d_in or any(o is None or o.dim() != 2 or not rank < o.shape[0] for o in outs):
            return None
        return pre, x, weight


class LowerQuantizedLinears:
    """Lower ``linear(x, dequant(int8 q, scale))`` to ``colafx::int8_linear`` (see module doc)."""

    name = "quantized"

    def __init__(self, act_bits: int = 16):
        if act_bits not in (8, 16):
            raise ValueError(f"act_bits must be 8 or 16, got {act_bits!r}")
        self.act_bits = act_bits

    def run(self, gm: fx.GraphModule) -> str:
        """Rewrite every dequantize+linear pattern of ``gm`` in place; return a summary."""
        import colafx.kernels.qmatmul  # noqa: F401  (registers colafx::int8_linear)

        graph = gm.graph
        lowered = 0
        existing = sum(1 for n in graph.nodes if n.op == "call_function" and op_name(n) in _QUANT_OPS)
        for node in list(graph.nodes):
            parts = _linear_parts(node)
            found = _dequant_source(parts[1]) if parts is not None else None
            if found is None:
                continue
            x, _, bias = parts
            q, scale, n, groups = found
            out = _val(node)
            with graph.inserting_before(node):
                scale2d = graph.call_function(torch.ops.aten.reshape.default, (scale, [n, groups]))
                scale2d = graph.call_function(torch.ops.aten._to_copy.default, (scale2d,), {"dtype": torch.float32})
                x_in = _cast_to(graph, x, out.dtype if out is not None else None)
                op = graph.call_function(torch.ops.colafx.int8_linear.default,
                                         (x_in, q, scale2d, bias, self.act_bits))
            op.meta.update(node.meta)
            node.replace_all_uses_with(op)
            graph.erase_node(node)
            lowered += 1
        graph.eliminate_dead_code()
        if not lowered and not existing:
            return "found no quantized linear (int8 dequantize + linear, or colafx quantized ops)"
        already = f"; {existing} quantized linears already on colafx ops" if existing else ""
        return f"lowered {lowered} dequantize+linear patterns to colafx::int8_linear (act_bits={self.act_bits}){already}"


def _strip(node, names: set[str]):
    """Walk up through nodes whose op is in ``names`` (casts, reshapes) to their first input."""
    while isinstance(node, fx.Node) and node.op in ("call_function", "call_method") and op_name(node) in names:
        node = node.args[0]
    return node


def _dequant_source(weight: fx.Node):
    """(int8 node, scale node, N, groups) when ``weight`` = dequant(int8 [N, K], scale), else None."""
    w_val = _val(weight)
    if w_val is None or w_val.dim() != 2 or not w_val.dtype.is_floating_point:
        return None
    n, k = w_val.shape
    product = _strip(_strip(weight, _CASTS), _RESHAPES)
    if not isinstance(product, fx.Node) or product.op not in ("call_function", "call_method"):
        return None
    if op_name(product) != "mul" or len(product.args) != 2:
        return None
    for q_side, s_side in (product.args, product.args[::-1]):
        groups = _dequant_groups(q_side, s_side, n, k)
        if groups is not None:
            return _strip(_strip(_strip(q_side, _CASTS), _RESHAPES), _CASTS), s_side, n, groups
    return None


def _dequant_groups(q_side, s_side, n: int, k: int) -> int | None:
    """The number of scale groups when ``q_side * s_side`` dequantizes an int8 [N, K] per channel
    ([N, K] * [N, 1]) or per group of consecutive columns ([N, G, K/G] * [N, G, 1]); else None."""
    q_view, s_view = _val(q_side), _val(s_side)
    if q_view is None or s_view is None or not s_view.dtype.is_floating_point:
        return None
    q_val = _val(_strip(_strip(_strip(q_side, _CASTS), _RESHAPES), _CASTS))
    if q_val is None or q_val.dtype != torch.int8 or tuple(q_val.shape) != (n, k):
        return None
    q_shape, s_shape = tuple(q_view.shape), tuple(s_view.shape)
    if q_shape == (n, k) and s_shape == (n, 1):
        return 1
    if len(q_shape) == 3 and q_shape[0] == n and q_shape[1] * q_shape[2] == k and s_shape == (n, q_shape[1], 1):
        return q_shape[1]
    return None
