"""Quantized linears: Triton kernel (interpreter) and CPU path against qlinear_ref; SQNR vs fp32.

qlinear_ref accumulates the exact integer products in fp64, so fp32 outputs must agree to
REL_TOL (1e-5 of max|ref|), 16-bit outputs to one rounding of the output dtype.
SQNR thresholds (dB, Gaussian x and w, [64, 256] x [128, 256]) were set ~3 dB under the measured
minimum over 5 seeds (W8A8 40.0, W8A16 43.2, W8g32A8 41.0, W8g32A16 45.4, W4 per-channel 17.9,
W4g32 20.2).
"""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from colafx.kernels import qmatmul
from colafx.kernels.qmatmul import int4_linear, int8_gemm_cpu, int8_linear, qlinear_ref, qlinear_triton
from colafx.kernels.quant import dequantize_ref, quantize_ref, quantize_weight, unpack_int4
from colafx.kernels.zo import ZO_QMAX, zo_perturb_int_

from .conftest import REL_TOL, needs_triton, rel_err, sqnr_db

# (bits, K, group_size): K is not a multiple of any K-tile; int4 needs an even K
WEIGHTS = [(8, 67, None), (8, 96, 32), (4, 66, None), (4, 96, 32)]
N = 45
SQNR_MIN = {(8, None, 8): 37, (8, None, 16): 40, (8, 32, 8): 38, (8, 32, 16): 42,
            (4, None, 8): 15, (4, None, 16): 15, (4, 32, 8): 17, (4, 32, 16): 17}


def _case(m, k, bits, group_size, dtype=torch.float32, seed=0, bias=True):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(dtype)
    w = torch.randn(N, k, generator=gen) / k**0.5
    b = torch.randn(N, generator=gen) if bias else None
    return x, quantize_weight(w, bits, group_size), b


def _linear(x, qw, bias, act_bits):
    if qw.bits == 8:
        return int8_linear(x, qw.qweight, qw.scale, bias, act_bits)
    return int4_linear(x, qw.qweight, qw.scale, bias, qw.group_size, act_bits)


def _tol(dtype):
    return REL_TOL[dtype] if dtype == torch.float32 else 2 * REL_TOL[dtype]


@needs_triton
@pytest.mark.parametrize("act_bits", [8, 16])
@pytest.mark.parametrize("bits, k, group_size", WEIGHTS)
@pytest.mark.parametrize(
    "m, dtype", [(1, torch.float32), (129, torch.float32), (7, torch.bfloat16), (7, torch.float16)]
)
def test_triton_kernel_matches_ref(m, dtype, bits, k, group_size, act_bits):
    x, qw, b = _case(m, k, bits, group_size, dtype)
    out = qlinear_triton(x, qw.qweight, qw.scale, b, act_bits, bits)
    ref = qlinear_ref(x, qw.qweight, qw.scale, b, act_bits, bits)
    assert out.dtype == dtype and out.shape == (m, N)
    assert rel_err(out, ref) <= _tol(dtype)


@pytest.mark.parametrize("act_bits", [8, 16])
@pytest.mark.parametrize("bits, k, group_size", WEIGHTS)
@pytest.mark.parametrize(
    "m, dtype", [(1, torch.float32), (7, torch.float32), (129, torch.float32), (7, torch.bfloat16)]
)
def test_cpu_op_matches_ref(m, dtype, bits, k, group_size, act_bits):
    """The default CPU backend against the reference with its activation codes (7-bit on CPUs
    without VNNI / AMX)."""
    x, qw, b = _case(m, k, bits, group_size, dtype)
    ref = qlinear_ref(x, qw.qweight, qw.scale, b, act_bits, bits, act_qmax=qmatmul.cpu_act_qmax())
    for _ in range(3):  # first use (unpacked weight), then packed on the second, then cached
        out = _linear(x, qw, b, act_bits)
        assert out.dtype == dtype and out.shape == (m, N)
        assert rel_err(out, ref) <= _tol(dtype)


def _available_backends():
    names = ["int_mm"]
    if qmatmul._onednn_available():
        names += ["onednn", "onednn_a7"]
        if qmatmul._fbgemm_available():
            names.append("fbgemm_a7")
            if qmatmul._fbgemm_has_vnni():
                names.append("fbgemm")
    return names


@pytest.fixture(params=_available_backends())
def cpu_backend(request):
    """Each CPU int8 backend this torch build has, restored afterwards."""
    with qmatmul.use_cpu_int8_backend(request.param) as name:
        yield name


@pytest.mark.parametrize("bits, k, group_size", WEIGHTS)
@pytest.mark.parametrize("shape, dtype", [((1, -1), torch.float32), ((129, -1), torch.float32),
                                          ((1000, -1), torch.float32),  # > quant._SMALL elements
                                          ((2, 3, -1), torch.float32), ((7, -1), torch.bfloat16)])
def test_cpu_w_a8_matches_its_reference_on_every_backend(cpu_backend, shape, dtype, bits, k, group_size):
    """Every backend, odd K and N, one token / many / a 3-D batch, on the weight's first use,
    its packing use and cached: equal to the reference with the backend's activation codes."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(*shape[:-1], k, generator=gen).to(dtype)
    qw = quantize_weight(torch.randn(N, k, generator=gen) / k**0.5, bits, group_size)
    b = torch.randn(N, generator=gen)
    qmax = qmatmul.A7_QMAX if cpu_backend.endswith("_a7") else 127
    ref = qlinear_ref(x, qw.qweight, qw.scale, b, 8, bits, act_qmax=qmax)
    for _ in range(3):
        out = _linear(x, qw, b, 8)
        assert out.dtype == dtype and out.shape == (*shape[:-1], N)
        assert rel_err(out, ref) <= _tol(dtype)


@needs_triton
@pytest.mark.parametrize("bits", [8, 4])
def test_op_routed_through_triton_with_batched_input(force_triton, bits):
    x, qw, b = _case(10, 96, bits, 32)
    x3 = x.reshape(2, 5, 96)
    out = _linear(x3, qw, b, 8)
    assert out.shape == (2, 5, N)
    assert rel_err(out, qlinear_ref(x3, qw.qweight, qw.scale, b, 8, bits)) <= REL_TOL[torch.float32]


@needs_triton
def test_group_without_a_k_tile_falls_back_to_ref(force_triton):
    x, qw, b = _case(3, 18, 8, 6)
    with pytest.raises(ValueError):
        qlinear_triton(x, qw.qweight, qw.scale, b, 8, 8)
    out = _linear(x, qw, b, 8)
    assert rel_err(out, qlinear_ref(x, qw.qweight, qw.scale, b, 8, 8)) <= REL_TOL[torch.float32]


@pytest.mark.parametrize("act_bits", [8, 16])
@pytest.mark.parametrize("bits, group_size", [(8, None), (8, 32), (4, None), (4, 32)])
def test_sqnr_against_fp32_linear(exact_cpu_int8, bits, group_size, act_bits):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 256, generator=gen)
    w = torch.randn(128, 256, generator=gen) / 16
    qw = quantize_weight(w, bits, group_size)
    out = _linear(x, qw, None, act_bits)
    assert sqnr_db(out, F.linear(x, w)) > SQNR_MIN[(bits, group_size, act_bits)]


@pytest.mark.parametrize("backend", ["int_mm", "onednn"])
@pytest.mark.parametrize("m, k, n", [(1, 67, 45), (33, 64, 17), (129, 300, 45)])
def test_cpu_int8_gemm_backends_are_exact_at_the_extremes(backend, m, k, n):
    """±127 everywhere is where AVX2's 16-bit pair sums would saturate without the split."""
    if backend == "onednn" and not qmatmul._onednn_available():
        pytest.skip("no oneDNN in this torch build")
    gen = torch.Generator().manual_seed(m)
    qx = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=gen)
    qw = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
    qx[0] = 127
    qw[0] = 127
    qw[-1] = -127
    if m > 1:
        qx[1] = -127
    exact = qx.long() @ qw.long().T
    for cache_key in (None, qw, qw, qw):  # uncached, first sighting, second use (packed), cached
        got = int8_gemm_cpu(qx, qw, backend=backend, cache_key=cache_key)
        assert got.dtype == torch.float32
        assert torch.equal(got.double(), exact.double())


@pytest.mark.skipif(not qmatmul._onednn_available(), reason="torch build without oneDNN int8 ops")
@pytest.mark.parametrize("m, k, n", [(1, 67, 45), (129, 300, 45)])
def test_onednn_a7_gemm_is_exact_for_7_bit_codes_and_rejects_8_bit_ones(m, k, n):
    gen = torch.Generator().manual_seed(k)
    qx = torch.randint(-64, 64, (m, k), dtype=torch.int8, generator=gen)
    qw = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
    qx[0, :3], qw[0] = torch.tensor([-64, 63, -64], dtype=torch.int8), -127
    scale = torch.rand(n, generator=gen) + 0.5
    got = int8_gemm_cpu(qx, qw, backend="onednn_a7", w_scale=scale)
    torch.testing.assert_close(got.double(), (qx.long() @ qw.long().T).double() * scale.double(),
                               rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="-64, 63"):
        int8_gemm_cpu(torch.full_like(qx, 64), qw, backend="onednn_a7")


@pytest.mark.skipif(not qmatmul._onednn_available(), reason="torch build without oneDNN int8 ops")
@pytest.mark.parametrize("backend", ["onednn_a7", "fbgemm_a7"])
def test_7_bit_linear_matches_a_7_bit_activation_reference_and_loses_sqnr(backend):
    """The non-exact fast forms: per-token 7-bit codes (qmax 63); compared with their own
    reference, and their SQNR against fp32 is below the exact W8A8's (by ~6 dB: one bit)."""
    if backend == "fbgemm_a7" and not qmatmul._fbgemm_available():
        pytest.skip("torch build without FBGEMM")
    gen = torch.Generator().manual_seed(3)
    x, w = torch.randn(65, 96, generator=gen), torch.randn(45, 96, generator=gen) / 10
    qw = quantize_weight(w, 8)
    with qmatmul.use_cpu_int8_backend(backend):
        outs = [int8_linear(x, qw.qweight, qw.scale) for _ in range(3)]  # oneDNN, then FBGEMM-packed
    with qmatmul.use_cpu_int8_backend("int_mm"):
        exact = int8_linear(x, qw.qweight, qw.scale)
    qx, sx = quantize_ref(x, qmatmul.A7_QMAX)
    ref = (qx.double() * sx.double()) @ dequantize_ref(qw.qweight, qw.scale).double().T
    for out in outs:
        assert rel_err(out, ref) <= REL_TOL[torch.float32]
    assert sqnr_db(outs[-1], F.linear(x, w)) < sqnr_db(exact, F.linear(x, w)) - 3


@pytest.mark.skipif(not (qmatmul._onednn_available() and qmatmul._fbgemm_available()),
                    reason="torch build without oneDNN / FBGEMM int8 ops")
@pytest.mark.parametrize("backend", ["fbgemm_a7", "fbgemm"])
def test_fbgemm_packs_only_weights_used_twice_unchanged_and_follows_in_place_updates(backend):
    """A constant weight is FBGEMM-packed on its second use; a weight changed in place (QuZO)
    is never packed (no second copy), runs oneDNN / torch._int_mm, and its results follow every change."""
    if backend == "fbgemm" and not qmatmul._fbgemm_has_vnni():
        pytest.skip("exact 8-bit FBGEMM needs its AVX512-VNNI / AMX kernels")
    qmax = qmatmul.A7_QMAX if backend == "fbgemm_a7" else 127
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 64, generator=gen)
    const = quantize_weight(torch.randn(32, 64, generator=gen), 8, qmax=ZO_QMAX[8])
    moving = quantize_weight(torch.randn(32, 64, generator=gen), 8, qmax=ZO_QMAX[8])
    with qmatmul.use_cpu_int8_backend(backend):
        for _ in range(2):
            int8_linear(x, const.qweight, const.scale)
        assert qmatmul._current_pack(qmatmul._FBGEMM, const.qweight, (const.scale, None)) is not None
        for seed in range(3):
            int8_linear(x, moving.qweight, moving.scale)
            zo_perturb_int_(moving.qweight, moving.scale, seed=seed + 1, eps=0.05, sign=1, bits=8)
            out = int8_linear(x, moving.qweight, moving.scale)
            ref = qlinear_ref(x, moving.qweight, moving.scale, act_qmax=qmax)
            assert rel_err(out, ref) <= REL_TOL[torch.float32]
            assert qmatmul._current_pack(qmatmul._FBGEMM, moving.qweight, (moving.scale, None)) is None
        assert qmatmul._FBGEMM[id(moving.qweight)][3] is None


@pytest.mark.parametrize("path", ["fbgemm_a7", "onednn_a7", "aten_int4"])
def test_kept_packs_follow_changed_or_replaced_scales_and_zero_points(monkeypatch, path):
    """A pack kept for an unchanged weight bakes in its scales (FBGEMM, ATen's int4 kernel) and zero
    points (the int4 codes oneDNN / FBGEMM pack, ATen's int4 zeros): after the scales change in
    place, or the zero points are replaced by another tensor, the output follows them (the
    weight's own codes never change here)."""
    gen = torch.Generator().manual_seed(5)
    if path == "aten_int4":  # as on an AVX-512 CPU without bf16 dot products: bf16, 5 tokens
        monkeypatch.setattr(qmatmul, "_has_bf16_dot_instructions", lambda: False)
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
        x, group, act_bits, cache = torch.randn(5, 64, generator=gen).bfloat16(), 32, 16, qmatmul._INT4PACKED
    else:
        x, group, act_bits = torch.randn(5, 64, generator=gen), None, 8
        cache = qmatmul._FBGEMM if path.startswith("fbgemm") else qmatmul._PACKED
    if path.startswith("fbgemm") and not torch.backends.quantized.supported_engines.count("fbgemm"):
        pytest.skip("torch build without FBGEMM")
    qw = quantize_weight(torch.randn(48, 64, generator=gen), 4, group, symmetric=False)
    backend = "onednn_a7" if path == "aten_int4" else path
    act_qmax = qmatmul.A7_QMAX

    def run(scale, zero):
        with qmatmul.use_cpu_int8_backend(backend):
            return int4_linear(x, qw.qweight, scale, None, group, act_bits, w_zero=zero)

    def ref(scale, zero):
        return qlinear_ref(x, qw.qweight, scale, None, act_bits, 4, act_qmax=act_qmax, w_zero=zero)

    tol = _tol(torch.bfloat16) if path == "aten_int4" else REL_TOL[torch.float32]
    scale, zero = qw.scale, qw.zero
    for _ in range(3):  # kept from the first or second use
        out = run(scale, zero)
    assert cache[id(qw.qweight)][3] is not None
    assert rel_err(out, ref(scale, zero)) <= tol
    scale.mul_(1.5)
    out = run(scale, zero)
    assert rel_err(out, ref(scale, zero)) <= tol
    zero = (zero + 1).clamp_(-8, 7)  # another tensor
    for _ in range(3):
        out = run(scale, zero)
        assert rel_err(out, ref(scale, zero)) <= tol
    assert cache[id(qw.qweight)][3] is not None  # kept again for the new zero points


def test_cached_weight_follows_in_place_updates():
    """The CPU prepacked-weight cache must notice an in-place (ZO) change of qweight."""
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(5, 64, generator=gen), torch.randn(32, 64, generator=gen)
    qw = quantize_weight(w, 8, qmax=ZO_QMAX[8])
    for _ in range(3):  # the weight is packed on its second use
        before = int8_linear(x, qw.qweight, qw.scale)
    zo_perturb_int_(qw.qweight, qw.scale, seed=1, eps=0.05, sign=1, bits=8)
    after = int8_linear(x, qw.qweight, qw.scale)
    ref = qlinear_ref(x, qw.qweight, qw.scale, act_qmax=qmatmul.cpu_act_qmax())
    assert not torch.equal(before, after)
    assert rel_err(after, ref) <= REL_TOL[torch.float32]


@pytest.mark.skipif(not qmatmul._onednn_available(), reason="torch build without oneDNN int8 ops")
def test_onednn_cache_keeps_no_copy_of_weights_changed_in_place():
    """Constant weights stay prepacked; a weight changed in place (ZO) is never kept packed,
    so perturbed weights never hold a second copy in memory."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(-127, 128, (3, 64), dtype=torch.int8, generator=gen)
    const, changing = (torch.randint(-127, 128, (16, 64), dtype=torch.int8, generator=gen) for _ in range(2))
    for _ in range(2):
        for w in (const, changing):
            int8_gemm_cpu(x, w, backend="onednn", cache_key=w)
    changing.add_(1)
    got = int8_gemm_cpu(x, changing, backend="onednn", cache_key=changing)
    assert torch.equal(got.double(), (x.long() @ changing.long().T).double())
    assert qmatmul._PACKED[id(const)][3] is not None
    assert qmatmul._PACKED[id(changing)][1:4] == (None, None, None)  # marked changing: never packed
    changing.add_(-1)
    got = int8_gemm_cpu(x, changing, backend="onednn", cache_key=changing)
    assert torch.equal(got.double(), (x.long() @ changing.long().T).double())
    assert qmatmul._PACKED[id(changing)][1:4] == (None, None, None)


@pytest.mark.parametrize("bits", [8, 4])
def test_gradient_wrt_x_is_straight_through(bits):
    x, qw, b = _case(7, 64, bits, 32)
    x.requires_grad_()
    b.requires_grad_()
    g = torch.randn(7, N)
    _linear(x, qw, b, 8).backward(g)
    q = unpack_int4(qw.qweight) if bits == 4 else qw.qweight
    w_deq = (q.float().reshape(N, 2, 32) * qw.scale[..., None]).reshape(N, 64)
    torch.testing.assert_close(x.grad, g @ w_deq)
    torch.testing.assert_close(b.grad, g.sum(0))


def test_opcheck():
    x, qw8, b = _case(6, 32, 8, None)
    _, qw4, _ = _case(6, 32, 4, 16)
    x.requires_grad_()
    b.requires_grad_()
    for act_bits in (8, 16):
        torch.library.opcheck(torch.ops.colafx.int8_linear.default, (x, qw8.qweight, qw8.scale, b, act_bits))
        torch.library.opcheck(torch.ops.colafx.int4_linear.default, (x, qw4.qweight, qw4.scale, None, 16, act_bits))


def test_unknown_backend_from_the_environment_is_an_error_naming_the_variable(monkeypatch):
    monkeypatch.setattr(qmatmul, "_cpu_backend", "mkl")
    monkeypatch.setattr(qmatmul, "_resolved_backend", None)
    with pytest.raises(ValueError, match="COLAFX_CPU_INT8_BACKEND.*'mkl'"):
        qmatmul.cpu_int8_backend()


def test_backend_selection():
    with pytest.raises(ValueError):
        qmatmul.set_cpu_int8_backend("mkl")
    before = qmatmul.cpu_int8_backend()
    with qmatmul.use_cpu_int8_backend("int_mm") as name:
        assert name == qmatmul.cpu_int8_backend() == "int_mm"
    assert qmatmul.cpu_int8_backend() == before
    with qmatmul.use_cpu_int8_backend("auto") as name:
        assert name in ("int_mm", "onednn", "fbgemm", "onednn_a7", "fbgemm_a7")


@pytest.mark.parametrize("vnni, amx, fbgemm_isa", [(False, False, None), (True, False, None), (True, True, None),
                                                   (True, False, "AVX2"), (True, False, "avx512"),
                                                   (True, False, "AVX512_E1"), (True, True, "AVX2")])
def test_auto_backend_is_exact_only_with_int8_dot_instructions(monkeypatch, vnni, amx, fbgemm_isa):
    """AMX: "auto" picks oneDNN's prepacked s8 GEMM; AVX512-VNNI without AMX: FBGEMM's exact 8-bit
    GEMM (oneDNN's prepacked matmul runs its reference kernel there), unless FBGEMM_ENABLE_INSTRUCTIONS
    holds FBGEMM to a pre-VNNI ISA; neither: exactness costs a second GEMM, so the 7-bit-activation
    form (through FBGEMM where the build has it)."""
    if not qmatmul._onednn_available():
        pytest.skip("this torch build has no oneDNN quantized linear ops")
    monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda: vnni, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    if fbgemm_isa is None:
        monkeypatch.delenv("FBGEMM_ENABLE_INSTRUCTIONS", raising=False)
    else:
        monkeypatch.setenv("FBGEMM_ENABLE_INSTRUCTIONS", fbgemm_isa)
    fbgemm = qmatmul._fbgemm_available()
    fbgemm_vnni = vnni and fbgemm_isa in (None, "AVX512_E1")
    expected = "onednn" if amx else "fbgemm" if fbgemm and fbgemm_vnni else "onednn" if vnni and not fbgemm \
        else "fbgemm_a7" if fbgemm else "onednn_a7"
    with qmatmul.use_cpu_int8_backend("auto") as name:
        assert name == expected


@pytest.mark.parametrize("vnni, fbgemm_isa", [(False, None), (True, "AVX2"), (True, "AVX512_256")])
def test_exact_fbgemm_backend_is_refused_where_fbgemm_has_no_vnni(monkeypatch, vnni, fbgemm_isa):
    """FBGEMM's pre-VNNI kernels saturate 8-bit codes, so "fbgemm" is refused on a CPU without VNNI
    and where FBGEMM_ENABLE_INSTRUCTIONS holds FBGEMM to such a kernel, whether it is asked for in
    code or through COLAFX_CPU_INT8_BACKEND."""
    if not qmatmul._fbgemm_available():
        pytest.skip("this torch build has no FBGEMM quantized linear ops")
    monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda: vnni, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    if fbgemm_isa is None:
        monkeypatch.delenv("FBGEMM_ENABLE_INSTRUCTIONS", raising=False)
    else:
        monkeypatch.setenv("FBGEMM_ENABLE_INSTRUCTIONS", fbgemm_isa)
    with pytest.raises(ValueError, match="backend 'fbgemm' is exact only.*use 'fbgemm_a7'"):
        qmatmul.set_cpu_int8_backend("fbgemm")
    monkeypatch.setattr(qmatmul, "_cpu_backend", "fbgemm")
    monkeypatch.setattr(qmatmul, "_resolved_backend", None)
    with pytest.raises(ValueError, match="COLAFX_CPU_INT8_BACKEND 'fbgemm' is exact only"):
        qmatmul.cpu_int8_backend()


_HELD_TO_AVX2 = """
import torch
from colafx.kernels import int8_linear, qmatmul, quantize_weight
torch.manual_seed(0)
x = torch.randn(8, 256)
x[:, 3] *= 20  # large codes: a saturating int16 pair sum would show
qw = quantize_weight(torch.randn(64, 256) / 16, 8)
for _ in range(3):  # packed on the second use
    out = int8_linear(x, qw.qweight, qw.scale)
ref = qmatmul.qlinear_ref(x, qw.qweight, qw.scale, None, act_qmax=qmatmul.cpu_act_qmax())
print(qmatmul.cpu_int8_backend(), float(((out - ref).norm() / ref.norm())))
"""


def test_fbgemm_held_to_avx2_by_its_environment_variable_still_gives_exact_results():
    """FBGEMM reads FBGEMM_ENABLE_INSTRUCTIONS once, so a fresh process: with FBGEMM held to AVX2
    (on a VNNI CPU too), the default backend is the 7-bit one and the packed weight's output
    matches its reference (the exact 8-bit codes through that kernel were off by ~6%)."""
    if not qmatmul._fbgemm_available() or not qmatmul._onednn_available():
        pytest.skip("this torch build has no FBGEMM / oneDNN quantized linear ops")
    env = {**os.environ, "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2", "OMP_NUM_THREADS": "1"}
    env.pop("COLAFX_CPU_INT8_BACKEND", None)
    run = subprocess.run([sys.executable, "-c", _HELD_TO_AVX2], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    backend, err = run.stdout.split()
    assert backend == "fbgemm_a7" and float(err) < 1e-5


def test_every_backend_is_exact_on_the_largest_codes(cpu_backend):
    """All-max activation and weight codes (AVX2's 16-bit pair sums would saturate at 255·127·2):
    every backend gives the exact product."""
    k = 96
    qw = torch.full((16, k), 127, dtype=torch.int8)
    scale = torch.full((16, 1), 0.01)
    for sign in (1.0, -1.0):
        x = torch.full((4, k), sign)
        qmax = qmatmul.A7_QMAX if cpu_backend.endswith("_a7") else 127
        ref = qlinear_ref(x, qw, scale, act_qmax=qmax)
        for _ in range(3):  # first use, packing use, packed
            assert rel_err(int8_linear(x, qw, scale), ref) <= REL_TOL[torch.float32]


def _bad_calls():
    x = torch.randn(3, 8)
    q8 = torch.zeros(4, 8, dtype=torch.int8)
    q4 = torch.zeros(4, 4, dtype=torch.uint8)
    s = torch.ones(4, 1)
    return [
        (lambda: int8_linear(x, q8.float(), s), TypeError),
        (lambda: int8_linear(x, q4, s), TypeError),
        (lambda: int8_linear(x.int(), q8, s), TypeError),
        (lambda: int8_linear(x, q8, s.double()), TypeError),
        (lambda: int8_linear(torch.randn(3, 9), q8, s), ValueError),
        (lambda: int8_linear(x, q8, torch.ones(4, 3)), ValueError),
        (lambda: int8_linear(x, q8, torch.ones(5, 1)), ValueError),
        (lambda: int8_linear(x, q8, s, torch.zeros(5)), ValueError),
        (lambda: int8_linear(x, q8, s, act_bits=4), ValueError),
        (lambda: int4_linear(x, q8, s), TypeError),
        (lambda: int4_linear(x, q4, torch.ones(4, 2), group_size=None), ValueError),
        (lambda: int4_linear(x, q4, torch.ones(4, 2), group_size=3), ValueError),
        (lambda: int4_linear(torch.randn(3, 7), q4, s), ValueError),
    ]


@pytest.mark.parametrize("index", range(len(_bad_calls())))
def test_bad_inputs_raise(index):
    call, error = _bad_calls()[index]
    with pytest.raises(error):
        call()


@pytest.mark.parametrize("capability, bf16, amx, expected", [("AVX512", True, False, True), ("AVX512", False, True, True),
                                                         ("AVX512", False, False, False), ("AVX2", True, True, False)])
def test_bf16_dot_products_are_used_only_where_torch_runs_avx512(monkeypatch, capability, bf16, amx, expected):
    """AVX512-BF16 / AMX count only while torch dispatches to AVX-512: ATEN_CPU_CAPABILITY=avx2
    builds colafx's C++ ops for AVX2, and their kernels keep to it."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(qmatmul, "_BF16_DOT", {})  # the answer kept for this CPU
    assert qmatmul._has_bf16_dot_instructions() is expected


@pytest.mark.parametrize("k, group_size", [(96, 32), (192, 64), (96, None)])
def test_w4a16_bf16_without_bf16_dot_products_runs_atens_int4_kernel_and_follows_in_place_updates(
        monkeypatch, k, group_size):
    """As on an AVX-512 CPU without bf16 dot products, bf16 x with 5 tokens, N a multiple of 16 and
    a group length with a divisor in 32..256: ATen's int4 kernel runs (its repacked weight is kept);
    after an in-place change of the weight it is repacked per call."""
    monkeypatch.setattr(qmatmul, "_has_bf16_dot_instructions", lambda: False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(5, k, generator=gen).bfloat16()
    qw = quantize_weight(torch.randn(48, k, generator=gen) / k**0.5, 4, group_size, qmax=ZO_QMAX[4])
    out = int4_linear(x, qw.qweight, qw.scale, None, group_size, act_bits=16)
    assert qmatmul._current_pack(qmatmul._INT4PACKED, qw.qweight, (qw.scale, None)) is not None
    assert out.dtype == torch.bfloat16
    assert rel_err(out, qlinear_ref(x, qw.qweight, qw.scale, None, 16, 4)) <= _tol(torch.bfloat16)
    zo_perturb_int_(qw.qweight, qw.scale, seed=3, eps=0.5, sign=1, bits=4)
    before, out = out, int4_linear(x, qw.qweight, qw.scale, None, group_size, act_bits=16)
    assert not torch.equal(before, out)
    assert rel_err(out, qlinear_ref(x, qw.qweight, qw.scale, None, 16, 4)) <= _tol(torch.bfloat16)


def test_w4a16_fp16_with_many_tokens_computes_in_fp32_not_atens_slow_fp16_kernel(monkeypatch):
    calls = []
    aten = torch.ops.aten._weight_int4pack_mm_for_cpu
    monkeypatch.setattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", lambda *a: calls.append(1) or aten(*a))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 96, generator=gen).half()
    qw = quantize_weight(torch.randn(48, 96, generator=gen) / 96**0.5, 4, 32)
    out = int4_linear(x, qw.qweight, qw.scale, None, 32, act_bits=16)
    assert not calls and out.dtype == torch.float16
    assert rel_err(out, qlinear_ref(x, qw.qweight, qw.scale, None, 16, 4)) <= REL_TOL[torch.float16]


def test_packed_weight_cache_drops_the_entry_of_a_freed_weight():
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(-127, 128, (3, 64), dtype=torch.int8, generator=gen)
    w = torch.randint(-127, 128, (16, 64), dtype=torch.int8, generator=gen)
    for _ in range(2):
        int8_gemm_cpu(x, w, backend="onednn", cache_key=w)
    key = id(w)
    assert key in qmatmul._PACKED
    del w
    assert key not in qmatmul._PACKED


@pytest.mark.parametrize("bits, k, group_size", WEIGHTS)
def test_eager_call_without_dispatch_equals_the_custom_op(bits, k, group_size):
    """Eager no-grad CPU calls skip torch.ops dispatch: same result as the registered op."""
    x, qw, b = _case(7, k, bits, group_size)
    for _ in range(2):  # both calls below then find the weight in the same (packed) cache state
        _linear(x, qw, b, 8)
    for act_bits in (8, 16):
        if bits == 8:
            via_op = torch.ops.colafx.int8_linear(x, qw.qweight, qw.scale, b, act_bits)
        else:
            via_op = torch.ops.colafx.int4_linear(x, qw.qweight, qw.scale, b, group_size, act_bits)
        assert torch.equal(_linear(x, qw, b, act_bits), via_op)


@pytest.mark.skipif(not qmatmul._onednn_available(), reason="torch build without oneDNN int8 ops")
def test_onednn_split_gemm_without_vnni_packs_on_first_use_and_stays_exact(monkeypatch):
    """The AVX2 path of the exact "onednn" backend (codes split in two halves, weights packed on
    their first use, a changed weight packed per call and never kept), run on any x86 CPU."""
    monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    gen = torch.Generator().manual_seed(2)
    x = torch.randint(-127, 128, (5, 72), dtype=torch.int8, generator=gen)
    w = torch.randint(-127, 128, (24, 72), dtype=torch.int8, generator=gen)
    exact = (x.long() @ w.long().T).double()
    got = int8_gemm_cpu(x, w, backend="onednn", cache_key=w)
    assert qmatmul._PACKED[id(w)][3] is not None  # packed and kept on the first use
    assert torch.equal(got.double(), exact)
    w.add_(1)
    got = int8_gemm_cpu(x, w, backend="onednn", cache_key=w)
    assert torch.equal(got.double(), (x.long() @ w.long().T).double())
    assert qmatmul._PACKED[id(w)][1:4] == (None, None, None)


# ------------------------------------------------------------------ int4 with zero points (asymmetric)

ASYM = [(66, None), (96, 32)]  # (K, group_size)


def _asym_case(m, k, group_size, dtype=torch.float32, seed=0, n=N):
    """x, an asymmetric int4 weight (shifted, so its zero points differ from 0) and a bias."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(dtype)
    w = torch.randn(n, k, generator=gen) / k**0.5 + 0.05
    qw = quantize_weight(w, 4, group_size, symmetric=False)
    assert qw.zero.abs().sum() > 0
    return x, qw, torch.randn(n, generator=gen)


def _asym_ref(x, qw, b, act_bits, act_qmax=127):
    return qlinear_ref(x, qw.qweight, qw.scale, b, act_bits, 4, act_qmax=act_qmax, w_zero=qw.zero)


@needs_triton
@pytest.mark.parametrize("act_bits", [8, 16])
@pytest.mark.parametrize("k, group_size", ASYM)
@pytest.mark.parametrize("m, dtype", [(1, torch.float32), (129, torch.float32), (7, torch.bfloat16)])
def test_triton_kernel_with_zero_points_matches_ref(m, dtype, k, group_size, act_bits):
    x, qw, b = _asym_case(m, k, group_size, dtype)
    out = qlinear_triton(x, qw.qweight, qw.scale, b, act_bits, 4, qw.zero)
    assert out.dtype == dtype and out.shape == (m, N)
    assert rel_err(out, _asym_ref(x, qw, b, act_bits)) <= _tol(dtype)


@pytest.mark.parametrize("act_bits", [8, 16])
@pytest.mark.parametrize("k, group_size", ASYM)
@pytest.mark.parametrize("m, dtype", [(1, torch.float32), (7, torch.float32), (40, torch.float32),
                                      (129, torch.float32), (7, torch.bfloat16), (40, torch.bfloat16),
                                      (9, torch.float16), (40, torch.float16)])
def test_cpu_op_with_zero_points_matches_ref(m, dtype, k, group_size, act_bits):
    """Every CPU route of int4 (few-token kernel, dequantized GEMM, W4A8 GEMMs, first use / packed /
    cached) subtracts each group's zero point: equal to the reference."""
    x, qw, b = _asym_case(m, k, group_size, dtype)
    ref = _asym_ref(x, qw, b, act_bits, qmatmul.cpu_act_qmax())
    for _ in range(3):
        out = int4_linear(x, qw.qweight, qw.scale, b, group_size, act_bits, w_zero=qw.zero)
        assert out.dtype == dtype and out.shape == (m, N)
        assert rel_err(out, ref) <= _tol(dtype)


@pytest.mark.parametrize("k, group_size", ASYM)
@pytest.mark.parametrize("m", [1, 129])
def test_w4a8_with_zero_points_matches_its_reference_on_every_backend(cpu_backend, m, k, group_size):
    x, qw, b = _asym_case(m, k, group_size, seed=3)
    ref = _asym_ref(x, qw, b, 8, qmatmul.A7_QMAX if cpu_backend.endswith("_a7") else 127)
    for _ in range(3):
        assert rel_err(int4_linear(x, qw.qweight, qw.scale, b, group_size, 8, w_zero=qw.zero), ref) <= REL_TOL[torch.float32]


@pytest.mark.parametrize("group_size", [32, 64])
def test_atens_int4_kernel_takes_the_zero_points_as_its_float_zeros(group_size):
    x, qw, _ = _asym_case(9, 128, group_size, torch.bfloat16, n=48)  # ATen needs N % 16 == 0
    out = qmatmul._aten_int4_linear(x, qw.qweight, qw.scale, qw.zero)
    assert out is not None and out.dtype == torch.bfloat16
    assert rel_err(out, _asym_ref(x, qw, None, 16)) <= 2 * _tol(torch.bfloat16)  # zeros stored in bf16 too


def test_gradient_with_zero_points_is_straight_through():
    x, qw, b = _asym_case(7, 64, 32)
    x.requires_grad_()
    int4_linear(x, qw.qweight, qw.scale, b, 32, 8, w_zero=qw.zero).backward(g := torch.randn(7, N))
    codes = unpack_int4(qw.qweight).float().reshape(N, 2, 32) - qw.zero.float()[..., None]
    torch.testing.assert_close(x.grad, g @ (codes * qw.scale[..., None]).reshape(N, 64))


def test_opcheck_with_zero_points():
    x, qw, b = _asym_case(6, 32, 16)
    x.requires_grad_()
    for act_bits in (8, 16):
        torch.library.opcheck(torch.ops.colafx.int4_linear.default,
                              (x, qw.qweight, qw.scale, b, 16, act_bits, qw.zero))


def test_bad_zero_points_raise():
    x, qw, _ = _asym_case(3, 32, 16)
    with pytest.raises(TypeError, match="w_zero must be an int8 tensor"):
        int4_linear(x, qw.qweight, qw.scale, None, 16, w_zero=qw.zero.float())
    with pytest.raises(ValueError, match="w_zero must have w_scale's shape"):
        int4_linear(x, qw.qweight, qw.scale, None, 16, w_zero=qw.zero[:, :1])
