"""Find the dense projections of a captured graph and classify their role from dataflow.

A *site* is a linear (or matmul) whose weight is a 2-D parameter. Its role comes only from how data
flows around it, never from module names:

* ``q`` / ``k`` / ``v`` (or a fused ``qkv``, ``kv`` ...): feeds the query / key / value operand of an
  attention core (``scaled_dot_product_attention``, or ``softmax(q·kᵀ)·v`` written out);
* ``o``: consumes the attention core's output;
* ``gate`` / ``up`` (or a fused ``gate_up``): the two branches of a gated activation
  ``act(gate(x)) * up(x)``; ``up`` also names the input of a plain ``down(act(up(x)))`` MLP;
* ``down``: consumes the MLP activation;
* ``lm_head``: its output reaches the graph output without passing another projection;
* ``other``: anything else (left dense by default).

Works on ATen graphs from ``torch.export`` and on torch-level graphs from Dynamo.
"""
from __future__ import annotations

import collections
import re
from dataclasses import dataclass, field

import torch
import torch.fx as fx

ATTN_INPUT_ROLES = ("q", "k", "v", "qk", "qv", "kv", "qkv")
ATTN_ROLES = ATTN_INPUT_ROLES + ("o",)
MLP_ROLES = ("gate", "up", "gate_up", "down")
BLOCK_ROLES = ATTN_ROLES + MLP_ROLES
ALL_ROLES = BLOCK_ROLES + ("lm_head", "other")

_LINEAR = {"linear"}
_MATMUL = {"matmul", "mm", "bmm", "addmm", "einsum"}
_SDPA = {"scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
         "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
         "_scaled_dot_product_cudnn_attention", "_flash_attention_forward"}
_SOFTMAX = {"softmax", "_softmax", "_safe_softmax", "log_softmax"}
_ACTIVATIONS = {"silu", "gelu", "relu", "sigmoid", "tanh", "mish", "softplus", "elu", "leaky_relu",
                "hardswish", "relu6", "selu", "celu"}
# Ops that move or re-type data without mixing in other activations.
_DATA_MOVEMENT = {
    "view", "reshape", "_unsafe_view", "transpose", "permute", "t", "unsqueeze", "squeeze", "expand",
    "contiguous", "clone", "alias", "to", "_to_copy", "type_as", "float", "half", "bfloat16", "slice",
    "select", "split", "split_with_sizes", "chunk", "unbind", "getitem", "narrow", "dropout",
    "native_dropout", "feature_dropout", "flatten", "unflatten", "detach", "lift_fresh_copy",
    "repeat_interleave", "_reshape_alias", "as_strided", "movedim", "expand_as", "view_as",
}
_SPLITS = {"split", "split_with_sizes", "chunk", "unbind", "getitem", "slice", "narrow", "select"}
_MAX_WALK = 400  # bound on the nodes one dataflow walk may visit


@dataclass
class Site:
    """One dense projection found in a graph."""

    name: str  # FQN of the module that owns the weight ("model.layers.0.self_attn.q_proj")
    param: str  # FQN of the weight parameter
    role: str
    d_in: int
    d_out: int
    bias: bool
    rows_per_token: float = 1.0  # how many rows per input token go through this projection
    node: str = field(default="", repr=False)  # FX node name, for debugging

    @property
    def flops_per_token(self) -> float:
        """Forward FLOPs per token (multiply-adds count 2)."""
        return 2.0 * self.d_in * self.d_out * self.rows_per_token


def op_name(node: fx.Node) -> str:
    """Canonical short name of the operation a node runs ("linear", "view", "silu", ...)."""
    if node.op == "call_method":
        return str(node.target).rstrip("_")
    if node.op != "call_function":
        return node.op
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        name = target.overloadpacket.__name__
    elif isinstance(target, torch._ops.OpOverloadPacket):
        name = target.__name__
    else:
        name = getattr(target, "__name__", str(target))
    if name.endswith("_") and not name.startswith("_"):
        name = name[:-1]  # in-place variants behave the same for dataflow
    return name


def _val(node) -> torch.Tensor | None:
    if not isinstance(node, fx.Node):
        return None
    val = node.meta.get("val", node.meta.get("example_value"))
    return val if isinstance(val, torch.Tensor) else None


def _shape(node) -> tuple[int, ...] | None:
    val = _val(node)
    if val is None:
        return None
    try:
        return tuple(int(s) for s in val.shape)
    except (TypeError, RuntimeError):  # symbolic sizes
        return None


class Discovery:
    """Finds and classifies the projection sites of one FX graph.

    ``param_name(node)`` returns the parameter FQN a node stands for, or ``None``.
    """

    def __init__(self, graph: fx.Graph, param_name, num_tokens: int):
        self.graph = graph
        self.param_name = param_name
        self.num_tokens = max(int(num_tokens), 1)
        self.linears: dict[fx.Node, tuple[str, int, int, bool]] = {}
        for node in graph.nodes:
            info = self._as_linear(node)
            if info is not None:
                self.linears[node] = info

    # -- site detection -------------------------------------------------------------------------
    def _weight_param(self, node) -> tuple[str, bool] | None:
        """(param FQN, transposed?) if ``node`` is a 2-D parameter, possibly behind a transpose."""
        transposed = False
        while isinstance(node, fx.Node) and op_name(node) in {"t", "transpose", "permute"}:
            transposed = not transposed
            node = node.args[0]
        if not isinstance(node, fx.Node):
            return None
        name = self.param_name(node)
        shape = _shape(node)
        if name is None or shape is None or len(shape) != 2:
            return None
        return name, transposed

    def _as_linear(self, node: fx.Node):
        name = op_name(node)
        if name in _LINEAR and len(node.args) >= 2:
            found = self._weight_param(node.args[1])
            if found is None or found[1]:
                return None
            d_out, d_in = _shape(_strip_transpose(node.args[1]))
            bias = (len(node.args) > 2 and node.args[2] is not None) or node.kwargs.get("bias") is not None
            return found[0], d_in, d_out, bool(bias)
        if name in _MATMUL and name != "einsum":
            x_arg, w_arg, bias = (node.args[1], node.args[2], True) if name == "addmm" else (
                node.args[0], node.args[1], False)
            if self._weight_param(x_arg) is not None:
                return None
            found = self._weight_param(w_arg)
            if found is None:
                return None
            rows, cols = _shape(_strip_transpose(w_arg))
            # x @ W uses W as [d_in, d_out]; x @ W.t() uses W as [d_out, d_in].
            d_in, d_out = (cols, rows) if found[1] else (rows, cols)
            return found[0], d_in, d_out, bias
        return None

    # -- dataflow walks ---------------------------------------------------------------------------
    def _linears_above(self, start) -> set[fx.Node]:
        """Projection nodes reached walking up from ``start``, stopping at each projection."""
        found, seen, queue = set(), set(), collections.deque([start])
        while queue and len(seen) < _MAX_WALK:
            node = queue.popleft()
            if not isinstance(node, fx.Node) or node in seen:
                continue
            seen.add(node)
            if node in self.linears:
                found.add(node)
                continue
            if op_name(node) in _SDPA | _SOFTMAX:
                continue
            queue.extend(node.all_input_nodes)
        return found

    def _linears_below(self, start: fx.Node, through=_DATA_MOVEMENT) -> set[fx.Node]:
        """Projection nodes reached walking down from ``start`` through ``through`` ops only."""
        found, seen, queue = set(), set(), collections.deque(start.users)
        while queue and len(seen) < _MAX_WALK:
            node = queue.popleft()
            if node in seen:
                continue
            seen.add(node)
            if node in self.linears:
                found.add(node)
            elif op_name(node) in through:
                queue.extend(node.users)
        return found

    def _branch_source(self, node):
        """Walk up a gated-MLP branch through data movement and activations.

        Returns ``(projection, went_through_activation, split_path)`` or ``None``.
        """
        act, splits = False, []
        for _ in range(64):
            if not isinstance(node, fx.Node):
                return None
            if node in self.linears:
                return node, act, tuple(splits)
            name = op_name(node)
            if name in _ACTIVATIONS:
                act = True
            elif name == "mul" and _is_sigmoid_gate(node):  # x * sigmoid(x) written out
                act = True
                node = next(a for a in node.args if isinstance(a, fx.Node) and op_name(a) != "sigmoid")
                continue
            elif name in _SPLITS:
                splits.append((op_name(node), _split_key(node)))
            elif name not in _DATA_MOVEMENT:
                return None
            node = node.args[0] if node.args else None
        return None

    def _reaches_output_only(self, start: fx.Node) -> bool:
        seen, queue, reached = set(), collections.deque(start.users), False
        while queue:
            node = queue.popleft()
            if node in seen:
                continue
            seen.add(node)
            if len(seen) > _MAX_WALK or node in self.linears:
                return False
            if node.op == "output":
                reached = True
                continue
            queue.extend(node.users)
        return reached

    # -- classification ---------------------------------------------------------------------------
    def attention_cores(self) -> list[tuple[fx.Node, fx.Node, fx.Node, fx.Node]]:
        """(q operand, k operand, v operand, output node) for each attention core."""
        cores = []
        for node in self.graph.nodes:
            name = op_name(node)
            if name in _SDPA and len(node.args) >= 3:
                out = node
                if name != "scaled_dot_product_attention":  # returns a tuple: output is item 0
                    out = next((u for u in node.users if op_name(u) == "getitem" and u.args[1] == 0), node)
                cores.append((node.args[0], node.args[1], node.args[2], out))
            elif name in _SOFTMAX:
                core = self._softmax_core(node)
                if core is not None:
                    cores.append(core)
        return cores

    def _softmax_core(self, softmax: fx.Node):
        scores = softmax.args[0]
        for _ in range(16):  # walk up through scaling, masking and casts to q·kᵀ
            if not isinstance(scores, fx.Node):
                return None
            if op_name(scores) in _MATMUL and scores not in self.linears:
                break
            if op_name(scores) not in _DATA_MOVEMENT | {"mul", "div", "add", "sub", "masked_fill", "where"}:
                return None
            scores = scores.args[0]
        else:
            return None
        probs, queue = None, collections.deque(softmax.users)
        for _ in range(16):
            if not queue:
                break
            node = queue.popleft()
            if op_name(node) in _MATMUL and node not in self.linears:
                probs = node
                break
            if op_name(node) in _DATA_MOVEMENT:
                queue.extend(node.users)
        if probs is None:
            return None
        return scores.args[0], scores.args[1], probs.args[1], probs

    def classify(self) -> dict[fx.Node, str]:
        """Map every projection node to its role."""
        roles: dict[fx.Node, str] = {}
        for q, k, v, out in self.attention_cores():
            feeds = collections.defaultdict(str)
            for letter, operand in (("q", q), ("k", k), ("v", v)):
                for lin in self._linears_above(operand):
                    feeds[lin] += letter
            for lin, letters in feeds.items():
                roles.setdefault(lin, "".join(sorted(set(letters), key="qkv".index)))
            for lin in self._linears_below(out):
                roles.setdefault(lin, "o")
        for node in self.graph.nodes:
            if op_name(node) == "mul" and not _is_sigmoid_gate(node):
                self._classify_gated(node, roles)
        for node in self.graph.nodes:
            if op_name(node) in _ACTIVATIONS:
                self._classify_plain_mlp(node, roles)
        for lin in self.linears:
            if lin not in roles:
                roles[lin] = "lm_head" if self._reaches_output_only(lin) else "other"
        return roles

    def _classify_gated(self, mul: fx.Node, roles: dict) -> None:
        operands = [a for a in mul.args if isinstance(a, fx.Node)]
        if len(operands) != 2:
            return
        branches = [self._branch_source(a) for a in operands]
        if None in branches:
            return
        (lin_a, act_a, split_a), (lin_b, act_b, split_b) = branches
        if act_a == act_b:
            return
        downs = self._linears_below(mul)
        if not downs:
            return
        if lin_a is lin_b:
            if split_a == split_b:
                return
            roles.setdefault(lin_a, "gate_up")
        else:
            gate, up = (lin_a, lin_b) if act_a else (lin_b, lin_a)
            roles.setdefault(gate, "gate")
            roles.setdefault(up, "up")
        for lin in downs:
            roles.setdefault(lin, "down")

    def _classify_plain_mlp(self, act: fx.Node, roles: dict) -> None:
        source = self._branch_source(act)
        if source is None or source[0] in roles:
            return
        downs = self._linears_below(act)
        if downs and not any(roles.get(d, "down") != "down" for d in downs):
            roles[source[0]] = "up"
            for lin in downs:
                roles.setdefault(lin, "down")

    def sites(self) -> list[Site]:
        """All projection sites, in graph order, one per weight parameter."""
        roles = self.classify()
        sites: dict[str, Site] = {}
        for node, (param, d_in, d_out, bias) in self.linears.items():
            out_shape = _shape(node)
            rows = (_numel(out_shape) / d_out / self.num_tokens) if out_shape else 1.0
            if param in sites:  # one weight used twice: count its FLOPs, keep the first role
                sites[param].rows_per_token += rows
                continue
            module_name = _owning_linear(node) or (param.rsplit(".", 1)[0] if "." in param else "")
            sites[param] = Site(module_name, param, roles[node], d_in, d_out, bias, rows, node.name)
        return list(sites.values())

    def other_matmul_flops(self) -> float:
        """Forward FLOPs per token of matmuls between activations (attention scores and mixing)."""
        total = 0.0
        for node in self.graph.nodes:
            name = op_name(node)
            if name in _SDPA and len(node.args) >= 3:
                q, k, v = (_shape(a) for a in node.args[:3])
                if q and k and v:
                    batch_heads = _numel(q[:-2])
                    total += 2.0 * batch_heads * q[-2] * k[-2] * (q[-1] + v[-1])
            elif name in _MATMUL and name not in {"addmm", "einsum"} and node not in self.linears:
                a, b = _shape(node.args[0]), _shape(node.args[1])
                if a and b and len(a) >= 2 and len(b) >= 2:
                    batch = max(_numel(a[:-2]), _numel(b[:-2]))
                    total += 2.0 * batch * a[-2] * a[-1] * b[-1]
        return total / self.num_tokens


def _owning_linear(node: fx.Node) -> str | None:
    """FQN of the ``nn.Linear`` that ran this node, from ``nn_module_stack`` (None if not a Linear)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    path, kind = list(stack.values())[-1]
    kind = getattr(kind, "__name__", str(kind))
    if kind.endswith("Linear") and re.fullmatch(r"[\w.]+", str(path)):
        return str(path)
    return None


def _strip_transpose(node):
    while isinstance(node, fx.Node) and op_name(node) in {"t", "transpose", "permute"}:
        node = node.args[0]
    return node


def _is_sigmoid_gate(node: fx.Node) -> bool:
    args = [a for a in node.args if isinstance(a, fx.Node)]
    if len(args) != 2:
        return False
    a, b = args
    return (op_name(b) == "sigmoid" and b.args[0] is a) or (op_name(a) == "sigmoid" and a.args[0] is b)


def _split_key(node: fx.Node):
    return tuple(a if not isinstance(a, fx.Node) else "" for a in node.args[1:]) + tuple(
        sorted((k, str(v)) for k, v in node.kwargs.items()))


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def find_projections(captured) -> tuple[list[Site], float]:
    """Return the projection sites of a captured model and its other matmul FLOPs per token.

    ``captured`` is a :class:`colafx.passes.capture.Captured`.
    """
    discovery = Discovery(captured.graph, lambda n: captured.param_names.get(n.name), captured.num_tokens)
    return discovery.sites(), discovery.other_matmul_flops()
