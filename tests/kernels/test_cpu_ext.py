"""The fused C++ W8A8 op (kernels/cpu_ext.py, csrc/w8a8_fbgemm.cpp) against the ATen path it
replaces: the same bits, its fallbacks, and a failed build that warns and keeps working."""
import shutil
import warnings

import pytest
import torch
import torch.nn.functional as F

from colafx.kernels import cpu_ext, qmatmul
from colafx.kernels.qmatmul import int4_linear, int8_linear, qlinear_ref
from colafx.kernels.quant import dequantize_weight, quantize_weight
from colafx.kernels.zo import ZO_QMAX, zo_perturb_int_, zo_update_

from .conftest import REL_TOL, rel_err

needs_fbgemm = pytest.mark.skipif(not qmatmul._fbgemm_available(), reason="torch build without FBGEMM")
needs_compiler = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler to build the op")
BACKENDS = ["fbgemm_a7"] + (["fbgemm"] if qmatmul._fbgemm_has_vnni() else [])
ZO_CASES = [(8, 45, 96, None), (8, 7, 100, 20), (4, 45, 96, None), (4, 9, 128, 32), (8, 1728, 576, None)]


def _packed_case(m, k, n, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=gen) * 3).to(dtype)
    qw = quantize_weight(torch.randn(n, k, generator=gen) / k**0.5, 8)
    return x, qw, torch.randn(n, generator=gen)


def _aten_path(monkeypatch, fn):
    with monkeypatch.context() as patch:
        patch.setattr(cpu_ext, "_EXT", False)
        return fn()


@needs_compiler
def test_ops_build_where_a_compiler_is():
    assert cpu_ext.extension() is not None


@needs_fbgemm
@needs_compiler
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("m, k, n, dtype", [(1, 40, 33, torch.float32), (3, 77, 48, torch.float32),
                                            (17, 576, 129, torch.float32), (130, 1000, 65, torch.float32),
                                            (300, 96, 40, torch.float32), (5, 23, 16, torch.bfloat16)])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_w8a8_is_bit_identical_to_the_aten_path(monkeypatch, backend, threads, m, k, n, dtype, bias):
    """Odd K (vector tails) and N, one token to many rows (beyond 128 rows: per-thread slices, the
    last one partial), bf16 input, 1 and 2 threads: the fused op runs (counted) and its output
    equals the ATen path's exactly."""
    x, qw, b = _packed_case(m, k, n, dtype=dtype)
    b = b if bias else None
    calls = []
    fused = cpu_ext.w8a8_linear
    monkeypatch.setattr(cpu_ext, "w8a8_linear", lambda *a: calls.append(1) or fused(*a))
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with qmatmul.use_cpu_int8_backend(backend):
            int8_linear(x, qw.qweight, qw.scale, b)  # first use: not packed yet
            assert not calls
            out = int8_linear(x, qw.qweight, qw.scale, b)  # packed: the fused op
            assert calls
            ref = _aten_path(monkeypatch, lambda: int8_linear(x, qw.qweight, qw.scale, b))
    finally:
        torch.set_num_threads(old_threads)
    assert out.dtype == dtype and torch.equal(out, ref)
    qmax = qmatmul.A7_QMAX if backend == "fbgemm_a7" else 127
    assert rel_err(out, qlinear_ref(x, qw.qweight, qw.scale, b, act_qmax=qmax)) <= 2 * REL_TOL[dtype]


INT_MM_BACKENDS = ["int_mm", "fbgemm"] + (["onednn"] if qmatmul._onednn_available() else [])


@needs_fbgemm
@needs_compiler
@pytest.mark.skipif(not qmatmul._has_int8_dot_instructions(),
                    reason="torch._int_mm is a slow loop without VNNI / AMX; no default backend runs it there")
@pytest.mark.parametrize("backend", INT_MM_BACKENDS)
@pytest.mark.parametrize("m, k, n, dtype", [(1, 40, 33, torch.float32), (17, 77, 48, torch.float32),
                                            (130, 200, 65, torch.float32), (5, 23, 16, torch.bfloat16)])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_int_mm_path_is_bit_identical_on_weights_changed_in_place(monkeypatch, backend, m, k, n, dtype, bias):
    """QuZO's weights change before every forward, so they are never packed and run
    torch._int_mm: the fused op runs there (counted) with the ATen path's exact output, call after call."""
    x, qw, b = _packed_case(m, k, n, dtype=dtype)
    b = b if bias else None
    calls = []
    fused = cpu_ext.w8a8_int_mm
    monkeypatch.setattr(cpu_ext, "w8a8_int_mm", lambda *a: calls.append(1) or fused(*a))
    with qmatmul.use_cpu_int8_backend(backend):
        for step in range(3):
            qw.qweight.add_(1 if step % 2 else -1)  # changed in place: never packed
            before = len(calls)
            out = int8_linear(x, qw.qweight, qw.scale, b)
            assert len(calls) == before + 1
            ref = _aten_path(monkeypatch, lambda: int8_linear(x, qw.qweight, qw.scale, b))
            assert out.dtype == dtype and torch.equal(out, ref), step
    assert rel_err(out, qlinear_ref(x, qw.qweight, qw.scale, b)) <= 2 * REL_TOL[dtype]


def _zo_steps(qweight, scale, bits):
    """Perturb +1, -2, +1 and two updates (with and without weight decay): the QuZO step's calls."""
    for seed, sign in ((3, 1), (3, -2), (3, 1), (4, 2)):
        zo_perturb_int_(qweight, scale, seed=seed, eps=0.37, sign=sign, bits=bits)
    for wd in (0.0, 0.1):
        zo_update_(qweight, seed=9, lr=0.3, grad_scalar=1.7, weight_decay=wd, w_scale=scale, bits=bits)


@needs_compiler
@pytest.mark.parametrize("bits, n, k, group_size", ZO_CASES)
def test_fused_zo_integer_steps_are_bit_identical_to_the_aten_path(monkeypatch, bits, n, k, group_size):
    """int8 / int4, per channel / per group (a group of 20: not a vector multiple), odd row counts:
    the C++ pass (counted) leaves the weight bit-identical to the ATen path's, step after step."""
    gen = torch.Generator().manual_seed(n)
    qw = quantize_weight(torch.randn(n, k, generator=gen), bits, group_size, qmax=ZO_QMAX[bits])
    fused, aten = qw.qweight.clone(), qw.qweight.clone()
    calls = []
    ext_step = cpu_ext.zo_int_rows
    monkeypatch.setattr(cpu_ext, "zo_int_rows", lambda *a, **kw: calls.append(1) or ext_step(*a, **kw))
    _zo_steps(fused, qw.scale, bits)
    assert len(calls) >= 6
    _aten_path(monkeypatch, lambda: _zo_steps(aten, qw.scale, bits))
    assert torch.equal(fused, aten) and not torch.equal(fused, qw.qweight)


DEQUANT_CASES = [(45, 96, None), (16, 96, 32), (33, 130, 26), (1728, 576, 32)]


def _check_dequant(n, k, group_size, dtype=torch.bfloat16, symmetric=True):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(k)) + (0 if symmetric else 0.5)
    qw = quantize_weight(w, 4, group_size, symmetric=symmetric)
    got = cpu_ext.dequant_int4(qw.qweight, qw.scale, dtype, qw.zero)
    assert got.dtype == dtype and torch.equal(got, dequantize_weight(qw).to(dtype)), (n, k, dtype)


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n, k, group_size", DEQUANT_CASES)
def test_int4_dequant_is_bit_identical_to_the_reference(n, k, group_size, dtype):
    """bf16 and fp32 weights; per channel, groups of 32 and of 26 (a vector tail in every group),
    many rows."""
    _check_dequant(n, k, group_size, dtype)


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n, k, group_size", DEQUANT_CASES)
def test_int4_dequant_with_zero_points_is_bit_identical_to_the_reference(n, k, group_size, dtype):
    _check_dequant(n, k, group_size, dtype, symmetric=False)


def test_int4_dequant_refuses_other_dtypes():
    qw = quantize_weight(torch.randn(4, 64), 4, 32)
    with pytest.raises(ValueError, match="bf16 or fp32 weights, not torch.float16"):
        cpu_ext.dequant_int4(qw.qweight, qw.scale, torch.float16)


@needs_compiler
@pytest.mark.parametrize("bf16_dot", [True, False])
@pytest.mark.parametrize("m", [32, 129])
@pytest.mark.parametrize("group_size", [None, 32])
def test_w4a16_from_32_tokens_runs_a_gemm_on_the_weight_dequantized_in_cpp(monkeypatch, bf16_dot, m, group_size):
    """bf16 x from 32 tokens: a bf16 weight and bf16 GEMM with bf16 dot products, an fp32 weight and
    fp32 GEMM without (not ATen's int4 kernel, ~1.7x slower there from 128 tokens); below 32
    tokens the few-token kernel."""
    if bf16_dot and not qmatmul._has_bf16_dot_instructions():
        pytest.skip("no AVX512-BF16 / AMX here")
    monkeypatch.setattr(qmatmul, "_has_bf16_dot_instructions", lambda: bf16_dot)
    gen = torch.Generator().manual_seed(m)
    x = torch.randn(m, 96, generator=gen).bfloat16()
    qw = quantize_weight(torch.randn(48, 96, generator=gen) / 96**0.5, 4, group_size)
    b = torch.randn(48, generator=gen)
    calls, aten_calls = [], []
    dequant, aten = cpu_ext.dequant_int4, torch.ops.aten._weight_int4pack_mm_for_cpu
    monkeypatch.setattr(cpu_ext, "dequant_int4", lambda *a: calls.append(a[2]) or dequant(*a))
    monkeypatch.setattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", lambda *a: aten_calls.append(1) or aten(*a))
    out = int4_linear(x, qw.qweight, qw.scale, b, group_size, act_bits=16)
    assert calls == [torch.bfloat16 if bf16_dot else torch.float32] and not aten_calls
    assert out.dtype == torch.bfloat16 and out.shape == (m, 48)
    assert rel_err(out, qlinear_ref(x, qw.qweight, qw.scale, b, 16, 4)) <= 2 * REL_TOL[torch.bfloat16]
    calls.clear()
    int4_linear(x[:31], qw.qweight, qw.scale, b, group_size, act_bits=16)  # the few-token kernel or ATen's
    assert not calls


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_w4a16_fp32_and_fp16_from_32_tokens_multiply_the_cpp_fp32_weight_with_the_reference_bits(monkeypatch, dtype):
    """fp32 / fp16 x beyond the few-token kernel: the C++ fp32 weight (bit-equal to dequantize_ref)
    and one fp32 GEMM, so the output equals F.linear on the reference weight exactly."""
    calls = []
    dequant = cpu_ext.dequant_int4
    monkeypatch.setattr(cpu_ext, "dequant_int4", lambda *a: calls.append(a[2]) or dequant(*a))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(40, 96, generator=gen).to(dtype)
    qw = quantize_weight(torch.randn(48, 96, generator=gen) / 96**0.5, 4, 32)
    out = int4_linear(x, qw.qweight, qw.scale, None, 32, act_bits=16)
    assert calls == [torch.float32] and out.dtype == dtype
    assert torch.equal(out, F.linear(x.float(), dequantize_weight(qw)).to(dtype))


W4A16_CASES = [(33, 64, 32), (48, 96, None), (100, 1024, 64), (7, 128, 128), (130, 576, 32)]
W4A16_TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}  # the sum in fp32, one rounding


def _w4a16_case(m, n, k, group_size, dtype, seed=0, symmetric=True):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=gen) * 2).to(dtype)
    w = torch.randn(n, k, generator=gen) / k**0.5 + (0 if symmetric else 0.05)
    qw = quantize_weight(w, 4, group_size, symmetric=symmetric)
    return x, qw, torch.randn(n, generator=gen)


def _w4a16_expected(x, qw, bias):
    """fp64 product with the weight the kernel multiplies: bf16-rounded on the bf16 dot-product path."""
    w = dequantize_weight(qw)
    if x.dtype == torch.bfloat16 and qmatmul._has_bf16_dot_instructions():  # patched to False: fp32 FMAs
        w = w.to(torch.bfloat16)
    out = x.double() @ w.double().t()
    return out if bias is None else out + bias.double()


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 3, 9, 31])
@pytest.mark.parametrize("n, k, group_size", W4A16_CASES)
@pytest.mark.parametrize("bias", [False, True])
def test_w4a16_few_token_kernel_matches_the_fp64_product(monkeypatch, dtype, m, n, k, group_size, bias):
    """Decode-sized W4A16 runs the C++ kernel (counted) for fp32 / bf16 / fp16 x, odd N, per channel
    and groups of 32..128, token counts that leave partial register blocks: its output is the fp64
    product of x and the dequantized weight up to the fp32 sum and one rounding to x's dtype."""
    if (dtype == torch.bfloat16 and m > 4 and not qmatmul._has_bf16_dot_instructions()
            and torch.backends.cpu.get_cpu_capability() == "AVX512"):
        pytest.skip("bf16 x beyond 4 tokens runs ATen's int4 kernel on AVX-512 CPUs without bf16 dot products")
    _check_w4a16_kernel(monkeypatch, dtype, m, n, k, group_size, bias)


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 9])
@pytest.mark.parametrize("n, k, group_size", W4A16_CASES)
def test_w4a16_few_token_kernel_with_zero_points_matches_the_fp64_product(monkeypatch, dtype, m, n, k, group_size):
    """Asymmetric int4: the kernel's per-group table holds (nibble - 8 - zero)·s."""
    if (dtype == torch.bfloat16 and m > 4 and not qmatmul._has_bf16_dot_instructions()
            and torch.backends.cpu.get_cpu_capability() == "AVX512"):
        pytest.skip("bf16 x beyond 4 tokens runs ATen's int4 kernel on AVX-512 CPUs without bf16 dot products")
    _check_w4a16_kernel(monkeypatch, dtype, m, n, k, group_size, True, symmetric=False)


@needs_compiler
@pytest.mark.parametrize("capability, m", [("AVX512", 1), ("AVX512", 4), ("AVX2", 1), ("AVX2", 9), ("AVX2", 31)])
@pytest.mark.parametrize("n, k, group_size", W4A16_CASES[:3])
def test_w4a16_few_token_kernel_without_bf16_dot_products_widens_bf16_x_to_fp32(monkeypatch, capability, m, n, k,
                                                                                group_size):
    """The path of CPUs without AVX512-BF16 (forced here): bf16 x up to 4 tokens on AVX-512 CPUs
    and below 32 on AVX2 ones (faster than ATen's AVX2 int4 kernel there), fp32 FMAs on the
    unrounded weight."""
    has_bf16_dot = qmatmul._has_bf16_dot_instructions()
    assert cpu_ext.extension() is not None  # built for this CPU before the capability is patched
    monkeypatch.setattr(qmatmul, "_has_bf16_dot_instructions", lambda: False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    out, x, qw, b = _check_w4a16_kernel(monkeypatch, torch.bfloat16, m, n, k, group_size, True)
    if has_bf16_dot:  # a different path here: other roundings
        assert not torch.equal(out, cpu_ext.w4a16_linear(x, qw.qweight, qw.scale, b, True))


def _check_w4a16_kernel(monkeypatch, dtype, m, n, k, group_size, bias, symmetric=True):
    x, qw, b = _w4a16_case(m, n, k, group_size, dtype, seed=m + n, symmetric=symmetric)
    b = b if bias else None
    calls = []
    kernel = cpu_ext.w4a16_linear
    monkeypatch.setattr(cpu_ext, "w4a16_linear", lambda *a: calls.append(1) or kernel(*a))
    out = int4_linear(x, qw.qweight, qw.scale, b, group_size, act_bits=16, w_zero=qw.zero)
    assert calls and out.dtype == dtype and out.shape == (m, n)
    assert rel_err(out, _w4a16_expected(x, qw, b)) <= W4A16_TOL[dtype]
    return out, x, qw, b


@needs_compiler
@pytest.mark.parametrize("threads", [1, 2])
def test_w4a16_few_token_kernel_keeps_leading_dims_and_splits_rows_over_threads(threads):
    x, qw, b = _w4a16_case(6, 200, 256, 64, torch.bfloat16, seed=threads)
    x3 = x.reshape(2, 3, 256)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = cpu_ext.w4a16_linear(x3, qw.qweight, qw.scale, b)
    finally:
        torch.set_num_threads(old_threads)
    assert out.shape == (2, 3, 200) and out.dtype == torch.bfloat16
    assert rel_err(out.reshape(6, 200), _w4a16_expected(x, qw, b)) <= W4A16_TOL[torch.bfloat16]


@needs_compiler
def test_w4a16_few_token_kernel_is_left_out_where_it_does_not_apply(monkeypatch):
    """32 tokens and more, groups that are not a multiple of 32 and fp64 x take the other paths."""
    calls = []
    kernel = cpu_ext.w4a16_linear
    monkeypatch.setattr(cpu_ext, "w4a16_linear", lambda *a: calls.append(1) or kernel(*a))
    for m, k, group_size, dtype in [(32, 64, 32, torch.float32), (3, 80, 20, torch.float32), (3, 64, 32, torch.float64)]:
        x, qw, b = _w4a16_case(m, 16, k, group_size, dtype)
        out = int4_linear(x, qw.qweight, qw.scale, b, group_size, act_bits=16)
        assert out.shape == (m, 16) and out.dtype == dtype
        assert rel_err(out, qlinear_ref(x, qw.qweight, qw.scale, b, 16, 4)) <= REL_TOL[torch.float32]
    assert not calls
    x, qw, b = _w4a16_case(3, 16, 80, 20, torch.float32)
    with pytest.raises(RuntimeError, match="multiples of 32"):
        kernel(x, qw.qweight, qw.scale, b)


@needs_fbgemm
@needs_compiler
@pytest.mark.parametrize("capability", ["AVX2", "DEFAULT"])
def test_builds_for_narrower_vector_units_are_bit_identical_too(monkeypatch, capability):
    """The AVX2 intrinsics and the plain-C++ loops (what an AVX2-only or non-AVX CPU compiles),
    built here by naming that capability: W8A8, the ZO steps and the int4 dequantization give the
    reference's bits; the W4A16 kernel's fp32 FMAs give the fp64 product up to fp32 rounding."""
    here = torch.backends.cpu.get_cpu_capability()
    if here == capability or (capability == "AVX2" and here != "AVX512"):
        pytest.skip(f"this CPU's own build ({here}) is the one the other tests check")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(cpu_ext, "_EXT", None)
    assert f"_{capability.lower()}_" in cpu_ext.extension().__name__
    for backend in BACKENDS:
        for m, k, n in [(1, 40, 33), (9, 77, 48), (33, 129, 16)]:
            x, qw, b = _packed_case(m, k, n, seed=m)
            with qmatmul.use_cpu_int8_backend(backend):
                for _ in range(2):
                    out = int8_linear(x, qw.qweight, qw.scale, b)
                assert qmatmul._current_pack(qmatmul._FBGEMM, qw.qweight, (qw.scale, None)) is not None
                ref = _aten_path(monkeypatch, lambda: int8_linear(x, qw.qweight, qw.scale, b))
            assert torch.equal(out, ref), (backend, m, k, n)
    for bits, n, k, group_size in ZO_CASES[:4]:
        qw = quantize_weight(torch.randn(n, k), bits, group_size, qmax=ZO_QMAX[bits])
        fused, aten = qw.qweight.clone(), qw.qweight.clone()
        _zo_steps(fused, qw.scale, bits)
        _aten_path(monkeypatch, lambda: _zo_steps(aten, qw.scale, bits))
        assert torch.equal(fused, aten), (bits, n, k, group_size)
    for symmetric in (True, False):  # without and with zero points
        for case in DEQUANT_CASES:
            for dtype in (torch.bfloat16, torch.float32):
                _check_dequant(*case, dtype, symmetric)
        for dtype in (torch.float32, torch.float16):  # the W4A16 kernel's fp32 FMAs, at this width
            # token counts that reach every block size of the AVX2 kernel (1-8 tokens a block)
            for m, n, k, group_size in [(1, 33, 64, 32), (2, 40, 64, 32), (3, 17, 128, 32), (4, 19, 64, 32),
                                        (6, 24, 64, None), (7, 24, 64, None), (9, 48, 96, None),
                                        (5, 130, 576, 64), (31, 20, 128, 32)]:
                x, qw, b = _w4a16_case(m, n, k, group_size, dtype, symmetric=symmetric)
                out = cpu_ext.w4a16_linear(x, qw.qweight, qw.scale, b, True, qw.zero)
                assert rel_err(out, _w4a16_expected(x, qw, b)) <= W4A16_TOL[dtype], (capability, dtype, m, n, k)


@needs_compiler
def test_build_without_fbgemm_keeps_the_int_mm_and_zo_ops(monkeypatch):
    """torch builds without FBGEMM (aarch64 wheels) compile the ops that do not need it."""
    monkeypatch.setattr(cpu_ext, "_has_fbgemm", lambda: False)
    monkeypatch.setattr(cpu_ext, "_EXT", None)
    ext = cpu_ext.extension()
    assert "_nofbgemm_" in ext.__name__ and not hasattr(ext, "w8a8_linear")
    bits, n, k, group_size = ZO_CASES[3]
    qw = quantize_weight(torch.randn(n, k), bits, group_size, qmax=ZO_QMAX[bits])
    fused, aten = qw.qweight.clone(), qw.qweight.clone()
    _zo_steps(fused, qw.scale, bits)
    _aten_path(monkeypatch, lambda: _zo_steps(aten, qw.scale, bits))
    assert torch.equal(fused, aten)
    x, w8, _ = _packed_case(5, 64, 32)
    out = cpu_ext.w8a8_int_mm(x, w8.qweight, w8.scale.reshape(-1), 127, None)
    assert rel_err(out, qlinear_ref(x, w8.qweight, w8.scale)) <= REL_TOL[torch.float32]


@needs_fbgemm
@needs_compiler
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
@pytest.mark.parametrize("m, row", [(4, 2), (300, 250)])  # 300 rows: the bad row in the last slice
def test_fused_w8a8_leaves_rows_with_inf_or_nan_to_the_aten_path(monkeypatch, bad, m, row):
    x, qw, b = _packed_case(m, 64, 32)
    x[row, 5] = bad
    with qmatmul.use_cpu_int8_backend(BACKENDS[-1]):
        for _ in range(2):  # packed on its second use
            int8_linear(x[:1], qw.qweight, qw.scale, b)
        packed = qmatmul._current_pack(qmatmul._FBGEMM, qw.qweight, (qw.scale, None))
        assert packed is not None
        assert cpu_ext.w8a8_linear(x, packed, 127, b) is None
        assert cpu_ext.w8a8_linear(x[:row].contiguous(), packed, 127, b) is not None  # the rows before it
        out = int8_linear(x, qw.qweight, qw.scale, b)
        ref = _aten_path(monkeypatch, lambda: int8_linear(x, qw.qweight, qw.scale, b))
    torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)


@needs_fbgemm
@needs_compiler
@pytest.mark.parametrize("layout", ["per_tensor", "zero_points"])
def test_fused_w8a8_returns_none_for_weights_packed_otherwise_than_symmetric_per_channel(layout):
    """The op takes the weight's zero points to be 0 and its scales per output channel (colafx packs
    so): a per-tensor pack or one with zero points is handed back (None), not computed wrongly."""
    x, qw, _ = _packed_case(3, 64, 32)
    w = qw.qweight.float() * qw.scale.reshape(-1, 1)
    if layout == "per_tensor":
        q = torch.quantize_per_tensor(w, float(qw.scale.max()) / 127, 0, torch.qint8)
    else:
        q = torch.quantize_per_channel(w, qw.scale.reshape(-1).double(), torch.full((32,), 3), 0, torch.qint8)
    old_engine = torch.backends.quantized.engine
    torch.backends.quantized.engine = "fbgemm"
    try:
        packed = torch.ops.quantized.linear_prepack(q, None)
    finally:
        torch.backends.quantized.engine = old_engine
    assert cpu_ext.w8a8_linear(x, packed, 127, None) is None


@needs_fbgemm
@needs_compiler
def test_fused_w8a8_rejects_a_feature_count_the_weight_does_not_have():
    x, qw, b = _packed_case(2, 64, 32)
    with qmatmul.use_cpu_int8_backend(BACKENDS[-1]):
        for _ in range(2):  # packed on its second use
            int8_linear(x[:1], qw.qweight, qw.scale, b)
        packed = qmatmul._current_pack(qmatmul._FBGEMM, qw.qweight, (qw.scale, None))
        with pytest.raises(RuntimeError, match="x has 63 features, the weight 64"):
            cpu_ext.w8a8_linear(x[:, :63].contiguous(), packed, 127, None)


@needs_fbgemm
def test_failed_build_warns_once_and_the_aten_path_gives_the_results(monkeypatch):
    from torch.utils import cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension: c++: command not found\nmore detail")

    monkeypatch.setattr(cpu_ext, "_EXT", None)
    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    x, qw, b = _packed_case(3, 64, 32)
    with qmatmul.use_cpu_int8_backend(BACKENDS[-1]):
        with pytest.warns(UserWarning, match=r"could not be built \(RuntimeError: Error building extension: "
                                             r"c\+\+: command not found\)"):
            out = int8_linear(x, qw.qweight, qw.scale, b)  # first use: the torch._int_mm route
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            again = int8_linear(x, qw.qweight, qw.scale, b)  # packed on its second use
            third = int8_linear(x, qw.qweight, qw.scale, b)
    qmax = qmatmul.A7_QMAX if BACKENDS[-1] == "fbgemm_a7" else 127
    assert torch.equal(out, again) and torch.equal(out, third)
    assert rel_err(out, qlinear_ref(x, qw.qweight, qw.scale, b, act_qmax=qmax)) <= REL_TOL[torch.float32]


def test_env_var_zero_skips_the_build(monkeypatch):
    from torch.utils import cpp_extension

    monkeypatch.setattr(cpu_ext, "_EXT", None)
    monkeypatch.setenv("COLAFX_CPU_EXT", "0")
    monkeypatch.setattr(cpp_extension, "load", lambda *a, **k: pytest.fail("built despite COLAFX_CPU_EXT=0"))
    assert cpu_ext.extension() is None


def test_build_finds_the_ninja_package_when_the_venv_is_not_on_path(monkeypatch):
    """``.venv/bin/python -m pytest`` without activating the venv: ninja's pip binary is put on
    PATH for the build only."""
    import ninja  # a dependency
    from torch.utils import cpp_extension

    seen = []
    monkeypatch.setattr(cpu_ext, "_EXT", None)
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(cpu_ext.shutil, "which", lambda name: None)
    monkeypatch.setattr(cpp_extension, "load", lambda *a, **k: seen.append(cpu_ext.os.environ["PATH"]) or "module")
    assert cpu_ext.extension() == "module"
    assert seen[0].split(cpu_ext.os.pathsep)[0] == ninja.BIN_DIR
    assert cpu_ext.os.environ["PATH"] == "/nonexistent"
