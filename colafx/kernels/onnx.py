"""ONNX translations of the colafx inference ops, for ``torch.onnx.export(..., dynamo=True)``.

``torch.onnx.export(model, args, dynamo=True, custom_translation_table=onnx_translation_table(ops=...))``

* ``colafx::lowrank_act``  → ``MatMul`` (+ ``x · Sigmoid(x)`` for SiLU).
* ``colafx::quantize_act_int8`` → per-token absmax in primitive ops (same numerics as the op).

Quantized linears, ``ops="contrib"`` (the default; onnxruntime's fused ``com.microsoft`` operators,
one node per linear):

* ``colafx::int8_linear`` and ``colafx::int4_linear`` → ``com.microsoft::MatMulNBits`` with
  bits 8 / 4 and the default zero point 2^(bits-1): the codes + 128 (int8) or the packed nibbles
  (int4, low nibble first — exactly :func:`colafx.kernels.quant.pack_int4`'s layout) as uint8
  [N, K / block_size, block_size · bits / 8], so no zero-point input. The block size is the group
  size, or for per-channel weights the largest power of two in [16, 128] dividing K with the
  channel scale repeated per block. ``act_bits=8`` sets ``accuracy_level=4``: onnxruntime quantizes
  A to int8 per block of K (symmetric) — close to, not identical with, the op's per-token
  quantization (finer, so not less accurate). ``act_bits=16``: A stays fp32 (same numbers as the
  op up to summation order). When the group size is not a power of two ≥ 16, or K has no such
  divisor, the standard translation below is used.

``ops="contrib-vnni"``: as "contrib", except per-channel W8A8 ``colafx::int8_linear`` → the op's
per-token quantization in primitive ops (codes + 128 as uint8, zero point 128) →
``com.microsoft::MatMulIntegerToFloat`` with the int8 weight [K, N] and its channel scales → ``Mul``
by the token scales: the op's integers exactly, through onnxruntime's u8·s8 GEMM (SmolLM2-135M on
an AVX512-VNNI CPU, ``bench/onnx_latency.py``: 128-token prefill 1.7x faster than "contrib", decode
1.3x slower, the per-token quantization being ~12 small nodes per linear). That GEMM needs int32
dot products (x86 VNNI / AMX, or ARM); on x86 CPUs with AVX2 only it sums pairs of products in
saturating int16 and the results are wrong, like onnxruntime's own QInt8 quantization there.

``ops="standard"`` (ai.onnx operators only, for runtimes other than onnxruntime):

* ``colafx::int8_linear`` (W8A8, default ``act_quant="per_token"``) → the op's own per-token
  symmetric int8 quantization written in primitive ops (``ReduceMax(Abs)``, ``Floor(x/s + 0.5)``,
  ``Clip``, ``Cast``) → ``MatMulInteger`` → ``Cast`` → ``Mul(scales)`` (+ bias), ~14 nodes. Both
  operands enter MatMulInteger as uint8 codes + 128 with zero point 128 (onnxruntime's uint8 ×
  uint8 kernel is exact everywhere; its uint8 × int8 kernel saturates on AVX2 CPUs without VNNI).
  It reproduces the torch op's integers exactly. ``act_quant="dynamic"`` uses
  ``DynamicQuantizeLinear`` instead (per-tensor asymmetric uint8: fewer nodes, different numerics).
  W8A16 and per-group W8A8 dequantize the weight in the graph and use ``MatMul`` (per-group W8A8
  then multiplies the fake-quantized activations: equal up to fp32 rounding).
* ``colafx::int4_linear`` → the weight unpacked (``BitwiseAnd`` / ``BitShift``) and dequantized in
  the graph, activations quantized per token as the op does, ``MatMul``; the exporter's optimizer
  may constant-fold the weight into a float initializer (same numbers, no size saving).

Inputs may be fp32 / fp16 / bf16; the graph computes in fp32 and casts back to x's type.
Training-only ops (``lowrank_act_dz``, the ZO ops) have no translation.
"""

from __future__ import annotations

import onnxscript
import torch
from onnxscript import FLOAT, INT8, UINT8
from onnxscript import opset18 as op
from onnxscript.values import Opset

__all__ = [
    "lowrank_act_onnx",
    "quantize_act_int8_onnx",
    "int8_linear_onnx",
    "int4_linear_onnx",
    "onnx_translation_table",
    "nbits_block_size",
    "ONNX_OPS",
]

_MSFT = Opset("com.microsoft", 1)
_FLOAT = 1  # onnx.TensorProto.FLOAT
_INT8 = 3  # onnx.TensorProto.INT8
_UINT8 = 2  # onnx.TensorProto.UINT8
_INT64 = 7  # onnx.TensorProto.INT64
_QMAX8 = 127.0
_SCALE_FLOOR = 1e-12


@onnxscript.script(_MSFT)
def _matmul_integer_to_float(A: UINT8[...], B: INT8[...], a_scale: FLOAT, b_scale: FLOAT[...],
                             a_zero_point: UINT8) -> FLOAT[...]:
    """com.microsoft::MatMulIntegerToFloat: (A - a_zero_point) · B · a_scale · b_scale[n] in fp32."""
    return _MSFT.MatMulIntegerToFloat(A, B, a_scale, b_scale, a_zero_point)


@onnxscript.script(_MSFT)
def _matmul_nbits(A: FLOAT[...], B: UINT8[...], scales: FLOAT[...], K: int, N: int, bits: int, block_size: int,
                  accuracy_level: int) -> FLOAT[...]:
    """com.microsoft::MatMulNBits, default zero point 2^(bits-1) (typed for the custom domain)."""
    return _MSFT.MatMulNBits(A, B, scales, K=K, N=N, bits=bits, block_size=block_size,
                             accuracy_level=accuracy_level)


@onnxscript.script(_MSFT)
def _matmul_nbits_zp(A: FLOAT[...], B: UINT8[...], scales: FLOAT[...], zero_points: UINT8[...], K: int, N: int,
                     bits: int, block_size: int, accuracy_level: int) -> FLOAT[...]:
    """com.microsoft::MatMulNBits with packed uint4 zero points (one per block)."""
    return _MSFT.MatMulNBits(A, B, scales, zero_points, K=K, N=N, bits=bits, block_size=block_size,
                             accuracy_level=accuracy_level)


def _const_ints(values):
    return op.Constant(value_ints=list(values))


def _scalar(value: float):
    return op.Constant(value_float=float(value))


def _per_token_int8(x, shifted: bool = False):
    """(q int8, scale fp32 [..., 1]) with the op's semantics: floor(x/s + 0.5), s = max(|x|)/127.

    ``shifted=True`` returns ``q + 128`` as uint8 instead (the same codes, zero point 128).
    """
    absmax = op.ReduceMax(op.Abs(x), _const_ints([-1]), keepdims=1)
    scale = op.Div(op.Max(absmax, _scalar(_SCALE_FLOOR)), _scalar(_QMAX8))
    rounded = op.Floor(op.Add(op.Div(x, scale), _scalar(0.5)))
    q = op.Clip(rounded, _scalar(-_QMAX8), _scalar(_QMAX8))
    if shifted:
        return op.Cast(op.Add(q, _scalar(128.0)), to=_UINT8), scale
    return op.Cast(q, to=_INT8), scale


def _dequantized_weight(q_float, w_scale, n: int, k: int, groups: int, w_zero=None):
    """[N, K] float weight from float codes [N, K], scales [N, G] and zero points [N, G] (or None)."""
    grouped = op.Reshape(q_float, _const_ints([n, groups, k // groups]))
    if w_zero is not None:
        grouped = op.Sub(grouped, op.Unsqueeze(op.Cast(w_zero, to=_FLOAT), _const_ints([-1])))
    scaled = op.Mul(grouped, op.Unsqueeze(w_scale, _const_ints([-1])))
    return op.Reshape(scaled, _const_ints([n, k]))


def _finish(out, x, bias):
    """Add the bias (fp32) and cast back to x's element type."""
    if bias is not None:
        out = op.Add(out, op.Cast(bias, to=_FLOAT))
    return op.CastLike(out, x)


def lowrank_act_onnx(x, weight, act: str = "silu"):
    """ONNX for ``colafx::lowrank_act``: ``z = x·Wᵀ``; SiLU as ``z · Sigmoid(z)``."""
    z = op.MatMul(x, op.Transpose(weight, perm=[1, 0]))
    return op.Mul(z, op.Sigmoid(z)) if act == "silu" else z


def quantize_act_int8_onnx(x, rounding: str = "nearest", seed: int = 0):
    """ONNX for ``colafx::quantize_act_int8`` (nearest rounding only; raises ValueError otherwise)."""
    if rounding != "nearest":
        raise ValueError("only nearest rounding can be exported to ONNX")
    q, scale = _per_token_int8(op.Cast(x, to=_FLOAT))
    return q, scale


def _int8_w8a8(xf, qweight, w_scale, act_quant: str):
    """Per-channel W8A8: integer MatMul and fp32 rescale."""
    w_t = op.Transpose(qweight, perm=[1, 0])
    w_row = op.Reshape(w_scale, _const_ints([1, -1]))
    # uint8 x uint8 (codes shifted by 128, zero point 128): onnxruntime's x86 uint8 x int8 kernel
    # accumulates pairs in saturating int16 (wrong on full-range codes) and its int8 x int8 path is
    # ~20x slower than fp32 MatMul on AVX2; uint8 x uint8 is exact and the fast one there.
    w_u8 = op.Cast(op.Add(op.Cast(w_t, to=_INT64), op.Constant(value_int=128)), to=_UINT8)
    zero_128 = op.Constant(value=_uint8_tensor(128))
    if act_quant == "dynamic":
        qx, sx, zx = op.DynamicQuantizeLinear(xf)
        acc = op.MatMulInteger(qx, w_u8, zx, zero_128)
    else:
        qx, sx = _per_token_int8(xf, shifted=True)
        acc = op.MatMulInteger(qx, w_u8, zero_128, zero_128)
    return op.Mul(op.Mul(op.Cast(acc, to=_FLOAT), sx), w_row)


def _int8_w8a8_vnni(xf, qweight, w_scale):
    """Per-channel W8A8 for VNNI / AMX / ARM CPUs: the op's per-token codes + 128 (uint8, zero
    point 128) × the int8 weight through MatMulIntegerToFloat (onnxruntime's u8·s8 GEMM, exact with
    int32 dot products; on x86 CPUs without VNNI it sums pairs in saturating int16), then the
    per-token scale."""
    qx, sx = _per_token_int8(xf, shifted=True)
    w_t = op.Transpose(qweight, perm=[1, 0])
    acc = _matmul_integer_to_float(qx, w_t, _scalar(1.0), op.Reshape(w_scale, _const_ints([-1])),
                                   op.Constant(value=_uint8_tensor(128)))
    return op.Mul(acc, sx)


def _make_int8_linear_onnx(act_quant: str, ops: str = "standard"):
    def int8_linear_onnx(x, qweight, w_scale, bias=None, act_bits: int = 8):
        """ONNX for ``colafx::int8_linear`` (see module docstring)."""
        n, k = qweight.shape
        groups = w_scale.shape[1]
        xf = op.Cast(x, to=_FLOAT)
        if ops == "contrib-vnni" and act_bits == 8 and groups == 1:
            return _finish(_int8_w8a8_vnni(xf, qweight, w_scale), x, bias)
        if ops.startswith("contrib") and nbits_block_size(k, None if groups == 1 else k // groups) is not None:
            codes = op.Cast(op.Add(op.Cast(qweight, to=_INT64), op.Constant(value_int=128)), to=_UINT8)
            return _finish(_nbits(xf, codes, w_scale, n, k, 8, None if groups == 1 else k // groups, act_bits),
                           x, bias)
        if act_bits == 8 and groups == 1:
            return _finish(_int8_w8a8(xf, qweight, w_scale, act_quant), x, bias)
        if act_bits == 8:
            qx, sx = _per_token_int8(xf)
            xf = op.Mul(op.Cast(qx, to=_FLOAT), sx)
        w = _dequantized_weight(op.Cast(qweight, to=_FLOAT), w_scale, n, k, groups)
        return _finish(op.MatMul(xf, op.Transpose(w, perm=[1, 0])), x, bias)

    return int8_linear_onnx


def _nbits(xf, codes, w_scale, n: int, k: int, bits: int, group_size, act_bits: int, w_zero=None):
    """com.microsoft::MatMulNBits on unsigned codes [N, K·bits/8] (zero point 2^(bits-1), or the
    int4 zero points ``w_zero`` [N, G] + 8) with scales [N, G]; per-channel scales and zero points
    are repeated per block. ``act_bits=8``: accuracy_level 4."""
    block = nbits_block_size(k, group_size)
    blocks = k // block
    packed = op.Reshape(codes, _const_ints([n, blocks, block * bits // 8]))
    groups = w_scale.shape[1]
    scales = w_scale if groups == blocks else op.Expand(w_scale, _const_ints([n, blocks]))
    attrs = dict(K=k, N=n, bits=bits, block_size=block, accuracy_level=4 if act_bits == 8 else 0)
    if w_zero is None:
        return _matmul_nbits(xf, packed, op.Reshape(scales, _const_ints([-1])), **attrs)
    return _matmul_nbits_zp(xf, packed, op.Reshape(scales, _const_ints([-1])),
                            _packed_zero_points(w_zero, n, groups, blocks), **attrs)


def _packed_zero_points(w_zero, n: int, groups: int, blocks: int):
    """MatMulNBits' uint4 zero points from int8 ``w_zero`` [N, G]: z + 8 per block, two blocks per
    byte (the even one in the low nibble), each row padded to whole bytes; flat [N · ceil(blocks / 2)]."""
    z = op.Cast(op.Add(op.Cast(w_zero, to=_INT64), op.Constant(value_int=8)), to=_UINT8)
    if groups != blocks:
        z = op.Expand(z, _const_ints([n, blocks]))
    if blocks % 2:
        z = op.Pad(z, _const_ints([0, 0, 0, 1]))
    pairs = op.Reshape(z, _const_ints([n, (blocks + 1) // 2, 2]))
    low = op.Squeeze(op.Slice(pairs, _const_ints([0]), _const_ints([1]), _const_ints([2])), _const_ints([2]))
    high = op.Squeeze(op.Slice(pairs, _const_ints([1]), _const_ints([2]), _const_ints([2])), _const_ints([2]))
    both = op.BitwiseOr(low, op.BitShift(high, op.Constant(value=_uint8_tensor(4)), direction="LEFT"))
    return op.Reshape(both, _const_ints([-1]))


int8_linear_onnx = _make_int8_linear_onnx("per_token")


def nbits_block_size(k: int, group_size) -> int | None:
    """MatMulNBits block size for K and ``group_size`` (None: per channel), or None if none fits.

    A group size must itself be a power of two ≥ 16; per channel uses the largest power of two in
    [16, 128] dividing K.
    """
    if group_size is not None:
        ok = group_size >= 16 and group_size & (group_size - 1) == 0
        return group_size if ok else None
    for block in (128, 64, 32, 16):
        if k % block == 0:
            return block
    return None


def _unpacked_int4(qweight, n: int, k: int):
    """Float codes [N, K] (values in [-8, 7]) from packed uint8 [N, K // 2], low nibble first."""
    low = op.BitwiseAnd(qweight, op.Constant(value=_uint8_tensor(15)))
    high = op.BitShift(qweight, op.Constant(value=_uint8_tensor(4)), direction="RIGHT")
    pairs = op.Concat(op.Unsqueeze(low, _const_ints([-1])), op.Unsqueeze(high, _const_ints([-1])), axis=-1)
    codes = op.Reshape(op.Cast(pairs, to=_FLOAT), _const_ints([n, k]))
    return op.Sub(codes, _scalar(8.0))


def _uint8_tensor(value: int):
    import onnx

    return onnx.helper.make_tensor("c", onnx.TensorProto.UINT8, [], [value])


def _make_int4_linear_onnx(ops: str = "contrib"):
    def int4_linear_onnx(x, qweight, w_scale, bias=None, group_size=None, act_bits: int = 8, w_zero=None):
        """ONNX for ``colafx::int4_linear``: MatMulNBits, or an in-graph dequantization."""
        n, half_k = qweight.shape
        k, groups = 2 * half_k, w_scale.shape[1]
        xf = op.Cast(x, to=_FLOAT)
        if ops.startswith("contrib") and nbits_block_size(k, group_size) is not None:
            return _finish(_nbits(xf, qweight, w_scale, n, k, 4, group_size, act_bits, w_zero), x, bias)
        if act_bits == 8:
            qx, sx = _per_token_int8(xf)
            xf = op.Mul(op.Cast(qx, to=_FLOAT), sx)
        w = _dequantized_weight(_unpacked_int4(qweight, n, k), w_scale, n, k, groups, w_zero)
        return _finish(op.MatMul(xf, op.Transpose(w, perm=[1, 0])), x, bias)

    return int4_linear_onnx


int4_linear_onnx = _make_int4_linear_onnx()


ONNX_OPS = ("contrib", "contrib-vnni", "standard")


def onnx_translation_table(act_quant: str = "per_token", ops: str = "contrib") -> dict:
    """Return ``{torch.ops.colafx.<op>.default: translation}`` for ``torch.onnx.export(dynamo=True)``.

    ``ops``: "contrib" maps the quantized linears onto onnxruntime's fused ``com.microsoft``
    ``MatMulNBits`` (int8 and int4; one node per linear) where the block rule allows;
    "contrib-vnni" writes per-channel W8A8 as exact per-token codes + ``MatMulIntegerToFloat``
    instead (for CPUs with VNNI / AMX; see the module docstring); "standard"
    uses only ai.onnx operators (int8: the op's exact per-token quantization + ``MatMulInteger``;
    int4: the weight unpacked and dequantized in the graph). ``act_quant`` picks the standard W8A8
    activation quantizer: "per_token" (exact op numerics) or "dynamic" (``DynamicQuantizeLinear``,
    per tensor). Importing :mod:`colafx.kernels` registers the ops.

    Raises:
        ValueError: an unknown ``act_quant`` or ``ops``.
    """
    if act_quant not in ("per_token", "dynamic"):
        raise ValueError(f"act_quant must be 'per_token' or 'dynamic', got {act_quant!r}")
    if ops not in ONNX_OPS:
        raise ValueError(f"ops must be one of {', '.join(ONNX_OPS)}, got {ops!r}")
    from . import lowrank, qmatmul, quant  # noqa: F401  (registers the custom ops)

    table = torch.ops.colafx
    return {
        table.lowrank_act.default: lowrank_act_onnx,
        table.quantize_act_int8.default: quantize_act_int8_onnx,
        table.int8_linear.default: _make_int8_linear_onnx(act_quant, ops),
        table.int4_linear.default: _make_int4_linear_onnx(ops),
    }


# com.microsoft GEMMs that fuse_shared_input_gemms merges: {(op_type, number of inputs): ({weight input:
# concatenation axis}, the weight input whose axis holds N)}; every other input must be shared.
# MatMulNBits' weight, scales and zero points hold whole rows of N, one after the other.
_MERGEABLE = {("MatMulNBits", 3): ({1: 0, 2: 0}, 1), ("MatMulNBits", 4): ({1: 0, 2: 0, 3: 0}, 1),
              ("MatMulIntegerToFloat", 5): ({1: 1, 3: 0}, 1)}


def fuse_shared_input_gemms(model) -> int:
    """Merge the ``com.microsoft::MatMulNBits`` nodes, and the ``MatMulIntegerToFloat`` nodes, that
    read the same input with the same attributes (q/k/v, gate/up) into one node over the
    concatenated weights, followed by a ``Split`` back into the original outputs: one activation
    quantization and one wider GEMM instead of several. Only nodes whose weights and weight scales
    are initializers, whose other inputs are the same tensors and that have no further inputs
    (g_idx, bias) are merged; MatMulNBits' zero points are concatenated like its scales. Edits the
    ``onnx.ModelProto`` in place (topological order is kept: the merged node takes the place of the
    group's first node).

    Returns:
        the number of nodes merged away.
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    groups: dict[tuple, list] = {}
    for node in graph.node:
        rule = _MERGEABLE.get((node.op_type, len(node.input)))
        if rule is None or node.domain != "com.microsoft":
            continue
        if not all(node.input[i] in inits for i in rule[0]):
            continue
        shared = tuple(name for i, name in enumerate(node.input) if i not in rule[0])
        attrs = tuple(sorted((a.name, onnx.helper.get_attribute_value(a)) for a in node.attribute if a.name != "N"))
        groups.setdefault((node.op_type, len(node.input), shared, attrs), []).append(node)
    removed = 0
    for (op_type, n_inputs, _, _), nodes in groups.items():
        if len(nodes) < 2:
            continue
        axes, n_input = _MERGEABLE[(op_type, n_inputs)]
        stem = f"{nodes[0].output[0]}_fused"
        inputs = list(nodes[0].input)
        for i, axis in axes.items():
            parts = [numpy_helper.to_array(inits[n.input[i]]) for n in nodes]
            if i == n_input:
                sizes = [part.shape[axis] for part in parts]
            inputs[i] = f"{stem}_{i}"
            graph.initializer.append(numpy_helper.from_array(np.concatenate(parts, axis=axis), inputs[i]))
        graph.initializer.append(numpy_helper.from_array(np.asarray(sizes, np.int64), f"{stem}_split"))
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
        if "N" in attrs:
            attrs["N"] = sum(sizes)
        fused = onnx.helper.make_node(op_type, inputs, [stem], domain="com.microsoft", name=stem, **attrs)
        split = onnx.helper.make_node("Split", [stem, f"{stem}_split"], [n.output[0] for n in nodes],
                                      axis=-1, name=f"{stem}_split")
        at = list(graph.node).index(nodes[0])
        for node in nodes:
            graph.node.remove(node)
        graph.node.insert(at, split)
        graph.node.insert(at, fused)
        removed += len(nodes) - 1
    used = {name for node in graph.node for name in node.input}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return removed


# the int4 weight's preparation: packed nibbles reshaped (same bytes), zero points packed
_INT4_FOLDED = ("Reshape", "Cast", "Add", "Expand", "Pad", "Slice", "Squeeze", "BitShift", "BitwiseOr")


def fold_quantized_weights(model) -> None:
    """Constant-fold the weight preparation of the quantized linears (int8 codes shifted to uint8,
    reshaped into MatMulNBits blocks or transposed for MatMulInteger; int4 nibbles reshaped into
    blocks) however large, so the file
    stores what the kernel reads and :func:`fuse_shared_input_gemms` finds initializers. The exporter's
    optimizer skips tensors above 8192 elements. ``model``: an ``onnx_ir.Model`` (edited in place).
    """
    from onnxscript.optimizer import fold_constants

    def should_fold(node):
        scope = node.metadata_props.get("pkg.torch.onnx.class_hierarchy", "")
        if "colafx.int8_linear" in scope and node.op_type in ("Cast", "Add", "Reshape", "Transpose"):
            return True
        if "colafx.int4_linear" in scope and node.op_type in _INT4_FOLDED:  # nibbles, zero points
            return True
        return None

    fold_constants(model, should_fold=should_fold)
