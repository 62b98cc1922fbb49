"""Quantizers: Triton kernels (interpreter) and the CPU path against quantize_ref, bit for bit.

Stochastic rounding is checked for unbiasedness statistically: with n independent draws of the
same value v (on the grid, in units of the scale), |mean(q) − v| must stay below 4·σ/√n where
σ = 1/2 bounds the standard deviation of a {floor, ceil} rounding. The draws are seeded, so the
test is deterministic; the same check rejects nearest rounding (bias up to 1/2).
"""
import pytest
import torch

from colafx.kernels import quant
from colafx.kernels.quant import (
    QuantizedWeight,
    dequantize_weight,
    pack_int4,
    quantize_act_int8,
    quantize_ref,
    quantize_tokens,
    quantize_weight,
    triton_uniform_noise,
    uniform_noise,
    unpack_int4,
)

from .conftest import needs_triton

ACT_SHAPES = [(1, 67), (7, 67), (129, 45), (2, 3, 67)]
TRITON_ACT_SHAPES = [(1, 67), (7, 67), (2, 3, 67)]  # + (129, 45) once below: the interpreter is slow
WEIGHT_CASES = [  # (N, K, bits, group_size)
    (45, 67, 8, None), (7, 96, 8, 32), (45, 66, 4, None), (7, 96, 4, 32), (5, 18, 8, 3), (5, 18, 4, 6),
]


def _x(shape, seed=0, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ------------------------------------------------------------------ activations


@needs_triton
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize(
    "shape, dtype",
    [(s, d) for s in TRITON_ACT_SHAPES for d in (torch.float32, torch.bfloat16, torch.float16)]
    + [((129, 45), torch.float32)],
)
def test_triton_act_quant_matches_ref_bit_exact(force_triton, shape, dtype, rounding):
    x = _x(shape, dtype=dtype)
    q, scale = quantize_act_int8(x, rounding, seed=11)
    noise = triton_uniform_noise(11, x.numel()) if rounding == "stochastic" else None
    q_ref, scale_ref = quantize_ref(x, 127, noise=noise)
    assert q.dtype == torch.int8 and q.shape == x.shape
    assert scale.dtype == torch.float32 and scale.shape == (*x.shape[:-1], 1)
    torch.testing.assert_close(scale, scale_ref, rtol=0, atol=0)
    assert torch.equal(q, q_ref)


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("shape", ACT_SHAPES)
def test_cpu_act_quant_matches_ref_bit_exact(shape, rounding):
    x = _x(shape)
    q, scale = quantize_act_int8(x, rounding, seed=5)
    noise = uniform_noise(5, x.numel()) if rounding == "stochastic" else None
    q_ref, scale_ref = quantize_ref(x, 127, noise=noise)
    assert torch.equal(q, q_ref) and torch.equal(scale, scale_ref)


def test_act_quant_error_is_within_half_a_step():
    x = _x((33, 67))
    q, scale = quantize_act_int8(x)
    assert (q.float() * scale - x).abs().max() <= 0.5 * scale.max() * (1 + 1e-6)
    assert q.abs().max() == 127  # the absmax element maps to ±qmax


def test_zero_rows_give_zero_codes_and_finite_scale():
    x = torch.zeros(3, 10)
    x[1] = torch.linspace(-1, 1, 10)
    q, scale = quantize_act_int8(x)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert (q[0] == 0).all() and (q[2] == 0).all() and q[1].abs().max() == 127


# ------------------------------------------------------------------ weights


@needs_triton
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("n, k, bits, group_size", WEIGHT_CASES)
def test_triton_weight_quant_matches_ref(force_triton, n, k, bits, group_size, rounding):
    w = _x((n, k), seed=1)
    qw = quantize_weight(w, bits, group_size, rounding, seed=3)
    noise = triton_uniform_noise(3, w.numel()) if rounding == "stochastic" else None
    q_ref, scale_ref = quantize_ref(w, quant.QMAX[bits], group_size, noise)
    assert torch.equal(unpack_int4(qw.qweight) if bits == 4 else qw.qweight, q_ref)
    assert torch.equal(qw.scale, scale_ref)


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("n, k, bits, group_size", WEIGHT_CASES)
def test_cpu_weight_quant_layout_and_error(n, k, bits, group_size, rounding):
    w = _x((n, k), seed=1)
    qw = quantize_weight(w, bits, group_size, rounding, seed=3)
    groups = 1 if group_size is None else k // group_size
    assert isinstance(qw, QuantizedWeight) and qw.shape == (n, k) and qw.bits == bits
    assert qw.qweight.shape == ((n, k // 2) if bits == 4 else (n, k))
    assert qw.qweight.dtype == (torch.uint8 if bits == 4 else torch.int8)
    assert qw.scale.shape == (n, groups) and qw.scale.dtype == torch.float32
    step = qw.scale.repeat_interleave(k // groups, dim=1)
    bound = (0.5 if rounding == "nearest" else 1.0) * step * (1 + 1e-6)
    assert ((dequantize_weight(qw) - w).abs() <= bound).all()
    noise = uniform_noise(3, w.numel()) if rounding == "stochastic" else None
    q_ref, _ = quantize_ref(w, quant.QMAX[bits], group_size, noise)
    assert torch.equal(unpack_int4(qw.qweight) if bits == 4 else qw.qweight, q_ref)


@pytest.mark.parametrize("bits, qmax", [(8, 119), (4, 6), (8, 1)])
def test_qmax_reserves_head_room(bits, qmax):
    w = _x((16, 64))
    qw = quantize_weight(w, bits, qmax=qmax)
    q = unpack_int4(qw.qweight) if bits == 4 else qw.qweight
    assert q.abs().max() == qmax


# ------------------------------------------------------------------ stochastic rounding


def _rounding_bias(quantize, n=8000, fractions=(0.1, 0.5, 0.77)):
    """Max over v of |mean(q) − v| / (σ/√n) for n copies of each grid value v = 40 + fraction."""
    worst = 0.0
    for f in fractions:
        v = 40.0 + f
        row = torch.full((1, n), v / 127.0)
        row[0, 0] = 1.0  # absmax → scale = 1/127 exactly, so every other element sits at v
        q = quantize(row)[0, 1:].double()
        worst = max(worst, abs(q.mean().item() - v) / (0.5 / (n - 1) ** 0.5))
    return worst


def test_cpu_stochastic_rounding_is_unbiased_and_nearest_is_not():
    assert _rounding_bias(lambda r: quantize_act_int8(r, "stochastic", seed=9)[0]) < 4
    assert _rounding_bias(lambda r: quantize_act_int8(r, "nearest")[0]) > 20  # same check, biased rounding


@needs_triton
def test_triton_stochastic_rounding_is_unbiased(force_triton):
    assert _rounding_bias(lambda r: quantize_act_int8(r, "stochastic", seed=9)[0]) < 4


def test_stochastic_rounding_is_unbiased_across_seeds():
    """One weight, 400 seeds: the dequantized mean converges to the weight (element-wise)."""
    w = _x((4, 16), seed=2)
    seeds = range(400)
    mean = sum(dequantize_weight(quantize_weight(w, 4, rounding="stochastic", seed=s)) for s in seeds) / 400
    step = quantize_weight(w, 4).scale  # same scale for every seed (absmax does not depend on rounding)
    assert ((mean - w).abs() < 4 * 0.5 * step / 400**0.5).all()


@pytest.mark.parametrize("use_triton_path", [False, True])
def test_stochastic_rounding_is_deterministic_per_seed(monkeypatch, use_triton_path):
    if use_triton_path:
        if not quant.interpreting():
            pytest.skip("needs TRITON_INTERPRET=1")
        monkeypatch.setattr(quant, "FORCE_TRITON", True)
    x = _x((9, 67)) * 3
    a = quantize_act_int8(x, "stochastic", seed=1)[0]
    b = quantize_act_int8(x, "stochastic", seed=1)[0]
    c = quantize_act_int8(x, "stochastic", seed=2)[0]
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# ------------------------------------------------------------------ int4 packing


def test_pack_int4_layout_low_nibble_is_even_column():
    q = torch.tensor([[-8, 7, 0, -1]], dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8
    assert packed.tolist() == [[0x00 | (15 << 4), 8 | (7 << 4)]]


def test_pack_unpack_roundtrip_all_values():
    q = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 2)[:, torch.randperm(32)]
    assert torch.equal(unpack_int4(pack_int4(q)), q)


# ------------------------------------------------------------------ errors and opcheck


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(w=torch.randn(4, 7), bits=4), ValueError),  # odd K for int4
        (dict(w=torch.randn(4, 8), group_size=3), ValueError),  # group does not divide K
        (dict(w=torch.randn(4, 8), group_size=0), ValueError),
        (dict(w=torch.randn(4, 8), group_size=2.0), TypeError),
        (dict(w=torch.randn(4, 8), bits=3), ValueError),
        (dict(w=torch.randn(4, 8), rounding="up"), ValueError),
        (dict(w=torch.randn(4, 8), qmax=128), ValueError),
        (dict(w=torch.randn(4, 8), bits=4, qmax=8), ValueError),
        (dict(w=torch.randn(4, 8), seed=-1), ValueError),
        (dict(w=torch.randn(4, 8), seed=1.5), TypeError),
        (dict(w=torch.randn(4, 8).int()), TypeError),
        (dict(w=torch.randn(2, 4, 8)), ValueError),
    ],
)
def test_quantize_weight_rejects_bad_input(kwargs, error):
    with pytest.raises(error):
        quantize_weight(**kwargs)


def test_act_quant_and_packing_reject_bad_input():
    with pytest.raises(TypeError):
        quantize_act_int8(torch.ones(3, 4, dtype=torch.int32))
    with pytest.raises(ValueError):
        quantize_act_int8(torch.randn(3, 4), rounding="floor")
    with pytest.raises(TypeError):
        pack_int4(torch.zeros(2, 4, dtype=torch.int32))
    with pytest.raises(ValueError):
        pack_int4(torch.zeros(2, 3, dtype=torch.int8))
    with pytest.raises(TypeError):
        unpack_int4(torch.zeros(2, 3, dtype=torch.int8))


def test_opcheck():
    x = _x((3, 5, 16))
    torch.library.opcheck(torch.ops.colafx.quantize_act_int8.default, (x, "nearest", 0))
    torch.library.opcheck(torch.ops.colafx.quantize_act_int8.default, (x, "stochastic", 7))


def test_derive_seed_gives_distinct_in_range_streams():
    seeds = {quant.derive_seed(s, salt) for s in range(50) for salt in range(4)}
    assert len(seeds) == 200 and all(0 <= s < 2**31 for s in seeds)
    assert quant.derive_seed(3, 1) == quant.derive_seed(3, 1)


@pytest.mark.parametrize("qmax", [127, 63])
@pytest.mark.parametrize("rows, cols", [(3, 67), (300, 300)])  # below and above quant._SMALL elements
def test_quantize_tokens_is_bit_identical_to_quantize_ref_including_ties_and_zero_rows(qmax, rows, cols):
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, cols, generator=gen) * 3
    x[0] = 0.0  # all-zero row: scale floor
    x[1, :4] = torch.tensor([qmax, 0.5, -0.5, 2.5])  # row absmax qmax -> scale 1: exact ties
    q, scale = quantize_tokens(x, qmax)
    q_ref, scale_ref = quantize_ref(x, qmax)
    assert torch.equal(q, q_ref) and torch.equal(scale, scale_ref)
    assert q[1, :4].tolist() == [qmax, 1, 0, 3]  # ties round up


@pytest.mark.parametrize("kind", ["normal", "uniform"])
def test_cpu_stream_any_range_equals_the_slice_of_the_whole(kind):
    whole = quant.cpu_noise(kind, 12, 1000)
    for lo, hi in [(0, 1), (5, 37), (16, 32), (333, 1000), (999, 1000)]:
        assert torch.equal(quant.cpu_range(kind, 12, lo, hi), whole[lo:hi])
    assert not torch.equal(quant.cpu_noise(kind, 13, 1000), whole)
    if kind == "uniform":  # the 2^16-point grid on [0, 1)
        assert whole.min() >= 0 and whole.max() < 1 and torch.equal(whole * 2**16, (whole * 2**16).floor())


# ------------------------------------------------------------------ asymmetric int4


@pytest.mark.parametrize("n, k, group_size", [(40, 96, 32), (7, 64, None), (5, 128, 16)])  # its block sizes: 16..256
def test_asymmetric_int4_gives_onnxruntimes_matmulnbits_quantizer_bits(n, k, group_size):
    """symmetric=False is onnxruntime's MatMulNBitsQuantizer grid, bit for bit: its C++ quantizer
    (``quantize_matmul_4bits``, asymmetric) gives the same scales, codes and uint4 zero points (z + 8)."""
    import numpy as np
    from onnxruntime.capi import _pybind_state as ort_state  # onnxruntime and numpy are dependencies: no skip

    assert hasattr(ort_state, "quantize_matmul_4bits"), "onnxruntime renamed its int4 quantizer: update this test"
    w = _x((n, k), seed=4) * 0.05 + 0.02  # shifted: zero points away from 0
    block = k if group_size is None else group_size
    blocks = k // block
    packed = np.zeros((n, blocks, block // 2), dtype=np.uint8)
    scales = np.zeros(n * blocks, dtype=np.float32)
    zeros = np.zeros(n * ((blocks + 1) // 2), dtype=np.uint8)
    ort_state.quantize_matmul_4bits(packed, np.ascontiguousarray(w.numpy().T), scales, zeros, block, n, k, False)
    qw = quantize_weight(w, 4, group_size, symmetric=False)
    ort_codes = torch.from_numpy(np.stack([packed & 0xF, packed >> 4], -1).reshape(n, k).astype(np.int8)) - 8
    z = zeros.reshape(n, -1)
    ort_zero = torch.from_numpy(np.stack([z & 0xF, z >> 4], -1).reshape(n, -1)[:, :blocks].astype(np.int8)) - 8
    assert torch.equal(qw.scale, torch.from_numpy(scales).reshape(n, blocks))
    assert torch.equal(qw.zero, ort_zero) and qw.zero.dtype == torch.int8
    assert torch.equal(unpack_int4(qw.qweight), ort_codes)
    assert len(set(qw.zero.flatten().tolist())) > 1


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_asymmetric_int4_error_is_within_a_step_and_beats_symmetric_on_shifted_groups(rounding):
    w = _x((64, 128), seed=2) * 0.05 + 0.03
    qw = quantize_weight(w, 4, 32, rounding, seed=1, symmetric=False)
    assert qw.zero.shape == qw.scale.shape == (64, 4)
    assert int(qw.zero.min()) >= -8 and int(qw.zero.max()) <= 7
    step = qw.scale.repeat_interleave(32, dim=1)
    bound = (0.5 if rounding == "nearest" else 1.0) * step * (1 + 1e-6)
    deq = dequantize_weight(qw)
    assert ((deq - w).abs() <= bound).all()
    sym = dequantize_weight(quantize_weight(w, 4, 32, rounding, seed=1))
    err_asym, err_sym = (deq - w).pow(2).sum(), (sym - w).pow(2).sum()
    assert err_asym < 0.6 * err_sym  # 16 levels over the group's range instead of 15 over ±absmax


def test_asymmetric_is_int4_only_with_the_full_code_range():
    with pytest.raises(ValueError, match="symmetric=False is for int4"):
        quantize_weight(torch.randn(4, 8), 8, symmetric=False)
    with pytest.raises(ValueError, match="symmetric=False is for int4"):
        quantize_weight(torch.randn(4, 8), 4, qmax=6, symmetric=False)
