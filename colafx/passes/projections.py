"""Find the dense projections of a captured graph and classify their role from dataflow.

A *site* is a linear (or matmul) whose weight is a 2-D parameter. Its role comes only from how data
flows around it, never from module names:

* ``q`` / ``k`` / ``v`` (or a fused ``qkv``, ``kv`` ...): feeds the query / key / value operand of an
  attention core (``scaled_dot_product_attention``, or ``softmax(q·kᵀ)·v`` written out);
* ``o``: consumes the attention core's output;
* ``gate`` / ``up`` (or a fused ``gate_up``): the two branches of a gated activation
  ``act(gate(x)) * up(x)``; ``up`` also names the input of a plain ``down(act(up(x)))`` MLP;
* ``down``: consumes the MLP activation;
* ``router``: feeds a ``topk`` / ``max`` (through softmax / sigmoid / elementwise ops), or scores
  with one output: a mixture-of-experts router or gate, kept dense;
* ``lm_head``: its output reaches the graph output without passing another projection;
* ``experts``: stacked 3-D expert weights of a mixture-of-experts block (reported, kept dense);
* ``other``: anything else (left dense by default).

An *activation* is any elementwise function of one tensor (``silu``, ``gelu`` written out as
``0.5·x·(1 + tanh(…))``, ``relu(x)**2``, piecewise ``where`` …); an attention core is
``scaled_dot_product_attention``, ``flex_attention``, or a score matmul (``matmul`` / ``bmm`` /
``einsum``) followed, through any chain of elementwise ops (scaling, soft-capping, ``where`` /
``masked_fill`` masking, sinks), by a softmax whose output meets the values in a second matmul.

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
ALL_ROLES = BLOCK_ROLES + ("router", "lm_head", "experts", "other")

_LINEAR = {"linear"}
_MATMUL = {"matmul", "mm", "bmm", "addmm", "baddbmm", "einsum"}
_SDPA = {"scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
         "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
         "_scaled_dot_product_cudnn_attention", "_flash_attention_forward", "flex_attention"}
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
# Elementwise ops: an activation is any chain of these (and data movement) applied to one tensor.
_ELEMENTWISE = _ACTIVATIONS | {
    "add", "sub", "rsub", "mul", "div", "truediv", "floordiv", "pow", "neg", "exp", "exp2", "log",
    "log1p", "expm1", "sqrt", "rsqrt", "abs", "reciprocal", "square", "sign", "sin", "cos", "erf",
    "erfc", "where", "masked_fill", "clamp", "clamp_min", "clamp_max", "clip", "maximum", "minimum",
    "fmax", "fmin", "gt", "lt", "ge", "le", "eq", "ne", "logical_not", "logical_and", "logical_or",
    "hardtanh", "hardsigmoid", "logsigmoid", "softsign", "tanhshrink", "threshold", "gelu_tanh",
    "copy", "nan_to_num",
}
_NORMS = {"rms_norm", "layer_norm", "group_norm", "native_layer_norm", "native_group_norm", "_fused_rms_norm"}
_AFFINE = {"add", "sub", "rsub", "mul", "div", "truediv", "neg"}  # linear unless both sides vary
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
    count: int = 1  # matrices in the weight: > 1 for stacked 3-D expert weights ([experts, d_out, d_in])

    @property
    def flops_per_token(self) -> float:
        """Forward FLOPs per token (multiply-adds count 2; 0 for experts, whose routing is data-dependent)."""
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

    def _linears_below(self, start: fx.Node) -> set[fx.Node]:
        """Projection nodes reached walking down from ``start`` through data movement, elementwise
        ops and norms (a sub-norm may sit before ``down``), never through a residual ``add`` of two
        varying tensors, which leads into the next block."""
        def passes(node):
            return node not in self.linears and not _is_residual(node) and (
                op_name(node) in _DATA_MOVEMENT | _NORMS or _is_elementwise(node))

        return {node for node in _downstream(start, passes) if node in self.linears}

    def _branch_source(self, node):
        """If ``node`` is an elementwise function of one projection's output, return
        ``(projection, nonlinear, split_path)``, else ``None``.

        Walks up through data movement and elementwise ops; every leaf must be that one projection
        (reached through the same splits) or a constant. ``nonlinear`` is True when the walk passed
        an op that is not data movement or affine in it (``x * sigmoid(x)``, ``tanh``, ``x ** 2`` …).
        """
        sources, nonlinear, seen = set(), 0, set()
        stack = [(node, ())]
        while stack:
            cur, splits = stack.pop()
            if not isinstance(cur, fx.Node) or (cur, splits) in seen:
                continue
            seen.add((cur, splits))
            if len(seen) > 96:
                return None
            if cur in self.linears:
                sources.add((cur, splits))
                continue
            if _is_constant(cur):
                continue
            name = op_name(cur)
            elementwise = _is_elementwise(cur)
            if name in _SPLITS:
                splits = splits + ((name, _split_key(cur)),)
            elif name not in _DATA_MOVEMENT and not elementwise:
                return None
            varying = [a for a in cur.all_input_nodes if not _is_constant(a)]
            if name in _ACTIVATIONS or name in {"sigmoid", "tanh", "erf", "exp"}:
                nonlinear = 2  # a named activation
            elif elementwise and (name not in _AFFINE or len(varying) > 1):
                nonlinear = max(int(nonlinear), 1)  # other nonlinear math (clamp, x * x ...)
            if name in _SPLITS or name in _DATA_MOVEMENT:
                stack.append((cur.args[0], splits))
            else:
                stack.extend((a, splits) for a in cur.all_input_nodes)
        if len(sources) != 1:
            return None
        (lin, splits), = sources
        return lin, nonlinear, tuple(reversed(splits))

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

    def _is_activation_matmul(self, node) -> bool:
        return (isinstance(node, fx.Node) and op_name(node) in _MATMUL and node not in self.linears
                and _matmul_operands(node) is not None)

    def _softmax_core(self, softmax: fx.Node):
        """q·kᵀ → (any elementwise chain: scale, soft-cap, mask, sinks) → softmax → (casts,
        dropout, slices) → probs·v."""
        scores, seen, queue = None, set(), collections.deque([softmax.args[0]])
        while queue and len(seen) < 64:
            node = queue.popleft()
            if not isinstance(node, fx.Node) or node in seen:
                continue
            seen.add(node)
            if self._is_activation_matmul(node):
                scores = node
                break
            if op_name(node) in _DATA_MOVEMENT | {"cat"} or _is_elementwise(node):
                queue.extend(node.all_input_nodes)
        if scores is None:
            return None
        probs, seen, queue = None, set(), collections.deque((u, softmax) for u in softmax.users)
        while queue and len(seen) < 32:
            node, came_from = queue.popleft()
            if node in seen:
                continue
            seen.add(node)
            if self._is_activation_matmul(node):
                probs = (node, came_from)
                break
            if op_name(node) in _DATA_MOVEMENT or _is_elementwise(node):
                queue.extend((u, node) for u in node.users)
        if probs is None:
            return None
        node, came_from = probs
        a, b = _matmul_operands(node)
        v = b if a is came_from else a
        q, k = _matmul_operands(scores)
        return q, k, v, node

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
            self._classify_attention_output(out, roles)
        for node in self.graph.nodes:
            if op_name(node) == "mul":
                self._classify_gated(node, roles)
        for lin in self.linears:
            if lin not in roles:
                self._classify_plain_mlp(lin, roles)
        for lin in self.linears:
            if lin not in roles and self._is_router(lin):
                roles[lin] = "router"
        for lin in self.linears:
            if lin not in roles:
                roles[lin] = "lm_head" if self._reaches_output_only(lin) else "other"
        return roles

    def _classify_attention_output(self, out: fx.Node, roles: dict) -> None:
        """The projections below the core's output are ``o``; elementwise ops on the way may norm it
        (BitNet's sub-norm) or gate it (``o(attn · sigmoid(gate(x)))``): the gating projection is ``gate``."""
        def passes(node):  # DiffLlama also concatenates and subtracts two cores
            return node not in self.linears and (
                op_name(node) in _DATA_MOVEMENT | _NORMS | {"cat"} or _is_elementwise(node))

        for node in _downstream(out, passes):
            if node in self.linears:
                roles.setdefault(node, "o")
            elif op_name(node) == "mul":
                for arg in node.all_input_nodes:
                    source = self._branch_source(arg)
                    if source is not None and source[1] and source[0] not in roles:
                        roles[source[0]] = "gate"

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
            gate, up = (lin_a, lin_b) if act_a > act_b else (lin_b, lin_a)
            roles.setdefault(gate, "gate")
            roles.setdefault(up, "up")
        for lin in downs:
            roles.setdefault(lin, "down")

    def _classify_plain_mlp(self, down: fx.Node, roles: dict) -> None:
        """``down(act(up(x)))``: the input of ``down`` is a nonlinear elementwise function of one
        other projection's output."""
        x = down.args[1] if op_name(down) in {"addmm", "baddbmm"} else down.args[0]
        source = self._branch_source(x)
        if source is None or not source[1] or source[0] is down or source[0] in roles:
            return
        roles[source[0]] = "up"
        roles[down] = "down"

    def _is_router(self, lin: fx.Node) -> bool:
        """A projection whose scores pick experts: it reaches a ``topk`` through elementwise ops."""
        if self.linears[lin][2] == 1 and not self._reaches_output_only(lin):
            return True  # a one-output score (a shared expert's sigmoid gate)
        return _reaches(lin, lambda name: name in {"topk", "sort", "argsort", "argmax", "max"},
                        _DATA_MOVEMENT | _ELEMENTWISE | _SOFTMAX)

    def expert_stacks(self) -> list[Site]:
        """Stacked 3-D parameters (``[experts, d_out, d_in]``) that feed a matmul: the expert weights of
        a mixture-of-experts block, reported with role ``experts`` (kept dense)."""
        found = []
        for node in self.graph.nodes:
            name = self.param_name(node) if node.op == "placeholder" else None
            shape = _shape(node)
            if name is None or shape is None or len(shape) != 3 or not self._feeds_matmul(node):
                continue
            found.append(Site(name, name, "experts", shape[2], shape[1], False, 0.0, node.name, count=shape[0]))
        return found

    def _feeds_matmul(self, start: fx.Node) -> bool:
        return _reaches(start, lambda name: name in _LINEAR | _MATMUL or "grouped_mm" in name,
                        _DATA_MOVEMENT | {"index", "index_select", "getitem", "select"})

    def sites(self) -> list[Site]:
        """All projection sites, in graph order, one per weight parameter, then expert stacks."""
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
        return list(sites.values()) + self.expert_stacks()

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
            elif name == "einsum" and node not in self.linears:
                total += _einsum_flops(node)
            elif name in _MATMUL and name not in {"addmm", "baddbmm"} and node not in self.linears:
                a, b = _shape(node.args[0]), _shape(node.args[1])
                if a and b and len(a) >= 2 and len(b) >= 2:
                    batch = max(_numel(a[:-2]), _numel(b[:-2]))
                    total += 2.0 * batch * a[-2] * a[-1] * b[-1]
        return total / self.num_tokens


def _downstream(start: fx.Node, passes, limit: int = _MAX_WALK):
    """The nodes below ``start`` in breadth-first order, each once; the walk continues below a node
    only when ``passes(node)``."""
    seen, queue = set(), collections.deque(start.users)
    while queue and len(seen) < limit:
        node = queue.popleft()
        if node in seen:
            continue
        seen.add(node)
        yield node
        if passes(node):
            queue.extend(node.users)


def _reaches(start: fx.Node, is_target, through: set[str], limit: int = 32) -> bool:
    """True if walking down from ``start`` through ``through`` ops meets an op with ``is_target(name)``."""
    return any(is_target(op_name(n)) for n in _downstream(start, lambda n: op_name(n) in through, limit))


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


def _is_constant(node, depth: int = 0) -> bool:
    """A value that does not depend on the data: a Python scalar, a node with no tensor inputs that is
    not a graph input (``full``, ``scalar_tensor``, ``arange`` …), a graph input of at most one
    dimension (a lifted constant, a learnable scalar, a bias vector; token inputs are 2-D), or an op
    on constants only."""
    if not isinstance(node, fx.Node):
        return True
    if node.op == "placeholder":  # a lifted constant, a learnable scalar (xIELU's α) or a bias vector
        val = _val(node)
        return val is not None and val.dim() <= 1
    if node.op == "get_attr":
        return True
    if node.op != "call_function" or depth > 8:
        return False
    return all(_is_constant(a, depth + 1) for a in node.all_input_nodes)  # e.g. scale_param * 8.0


def _is_elementwise(node: fx.Node) -> bool:
    """An elementwise op (binary ``max`` / ``min`` of two tensors included, their reductions not)."""
    name = op_name(node)
    if name in {"max", "min"}:
        return len(node.args) >= 2 and isinstance(node.args[1], fx.Node)
    return name in _ELEMENTWISE


def _is_residual(node: fx.Node) -> bool:
    """An ``add`` / ``sub`` of two tensors that both vary (a residual connection, not a bias or an eps)."""
    return op_name(node) in {"add", "sub", "rsub"} and sum(not _is_constant(a) for a in node.all_input_nodes) > 1


def _matmul_operands(node: fx.Node):
    """The two tensor operands of a matmul-like node (``einsum`` with two operands included)."""
    name = op_name(node)
    if name == "einsum":
        rest = node.args[1:]
        if len(rest) == 1 and isinstance(rest[0], (list, tuple)):
            rest = rest[0]
        ops = [a for a in rest if isinstance(a, fx.Node)]
        return (ops[0], ops[1]) if len(ops) == 2 else None
    if name in {"addmm", "baddbmm"}:
        return (node.args[1], node.args[2]) if len(node.args) >= 3 else None
    if name in _MATMUL and len(node.args) >= 2:
        return node.args[0], node.args[1]
    return None


def _einsum_flops(node: fx.Node) -> float:
    """2 × the product of every index size of a two-operand einsum (0 if shapes are unknown)."""
    ops = _matmul_operands(node)
    equation = node.args[0] if isinstance(node.args[0], str) else None
    if ops is None or equation is None or "..." in equation:
        return 0.0
    inputs = equation.replace(" ", "").split("->")[0].split(",")
    sizes = {}
    for letters, operand in zip(inputs, ops):
        shape = _shape(operand)
        if shape is None or len(shape) != len(letters):
            return 0.0
        sizes.update(zip(letters, shape))
    return 2.0 * _numel(sizes.values())


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
