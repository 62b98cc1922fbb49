"""Triton kernels behind ``torch.library`` custom ops (``torch.ops.colafx.*``).

One module per op family, each with Triton kernels (CUDA; CPU tensors under
``TRITON_INTERPRET=1``), a fast PyTorch CPU path, custom ops with fake impls, and a pure-PyTorch
reference (``*_ref``):

* :mod:`.lowrank` — ``lowrank_act``: fused ``σ(x·Wᵀ)`` with a recomputing backward (CoLA / CoLA-M)
* :mod:`.quant` — int8 per-token activations, int8 / int4 weights, nearest / stochastic rounding
* :mod:`.qmatmul` — W8A8 / W8A16 / W4A8 / W4A16 linears with fused dequantization
* :mod:`.cpu_ext` — C++ CPU ops built on first use: fused per-token W8A8 linears, QuZO's integer steps
* :mod:`.zo` — in-place seeded ZO perturbation / update for float and integer weights (QuZO)
* :mod:`.onnx` — ONNX translations of the inference ops (``onnx_translation_table``)
"""

from .lowrank import lowrank_act, lowrank_act_ref
from .qmatmul import (
    cpu_int8_backend,
    int4_linear,
    int8_linear,
    qlinear_ref,
    set_cpu_int8_backend,
    use_cpu_int8_backend,
)
from .quant import (
    QuantizedWeight,
    dequantize_weight,
    pack_int4,
    quantize_act_int8,
    quantize_weight,
    unpack_int4,
)
from .zo import HEADROOM, ZO_QMAX, zo_perturb_, zo_perturb_int_, zo_update_


def onnx_translation_table(**options) -> dict:
    """Return ``{torch.ops.colafx.<op>.default: onnxscript function}`` for ``torch.onnx.export``;
    ``options`` (``ops=``, ``act_quant=``) as :func:`colafx.kernels.onnx.onnx_translation_table`.

    Imports onnxscript lazily. Raises ImportError if onnxscript is not installed, ValueError for
    an unknown option value.
    """
    from .onnx import onnx_translation_table as table

    return table(**options)


__all__ = [
    "lowrank_act",
    "lowrank_act_ref",
    "int8_linear",
    "int4_linear",
    "qlinear_ref",
    "set_cpu_int8_backend",
    "cpu_int8_backend",
    "use_cpu_int8_backend",
    "QuantizedWeight",
    "quantize_act_int8",
    "quantize_weight",
    "dequantize_weight",
    "pack_int4",
    "unpack_int4",
    "zo_perturb_",
    "zo_perturb_int_",
    "zo_update_",
    "HEADROOM",
    "ZO_QMAX",
    "onnx_translation_table",
]
