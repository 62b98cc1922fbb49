"""The fused C++ W8A8 op (kernels/cpu_w8a8.py, csrc/w8a8_fbgemm.cpp) against the ATen path it
replaces: the same bits, its fallbacks, and a failed build that warns and keeps working."""
import shutil
import warnings

import pytest
import torch

from colafx.kernels import cpu_w8a8, qmatmul
from colafx.kernels.qmatmul import int8_linear, qlinear_ref
from colafx.kernels.quant import quantize_weight

from .conftest import REL_TOL, rel_err

pytestmark = pytest.mark.skipif(not qmatmul._fbgemm_available(), reason="torch build without FBGEMM")
needs_compiler = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler to build the op")
BACKENDS = ["fbgemm_a7"] + (["fbgemm"] if qmatmul._has_int8_dot_instructions() else [])


def _packed_case(m, k, n, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=gen) * 3).to(dtype)
    qw = quantize_weight(torch.randn(n, k, generator=gen) / k**0.5, 8)
    return x, qw, torch.randn(n, generator=gen)


def _aten_path(monkeypatch, fn):
    with monkeypatch.context() as patch:
        patch.setattr(cpu_w8a8, "_EXT", False)
        return fn()


@needs_compiler
def test_fused_op_builds_where_a_compiler_is():
    assert cpu_w8a8.extension() is not None


@needs_compiler
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("m, k, n, dtype", [(1, 40, 33, torch.float32), (3, 77, 48, torch.float32),
                                            (17, 576, 129, torch.float32), (130, 1000, 65, torch.float32),
                                            (5, 23, 16, torch.bfloat16)])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_w8a8_is_bit_identical_to_the_aten_path(monkeypatch, backend, threads, m, k, n, dtype, bias):
    """Odd K (vector tails) and N, one token to many rows, bf16 input, 1 and 2 threads: the fused
    op runs (counted) and its output equals the ATen path's exactly."""
    x, qw, b = _packed_case(m, k, n, dtype=dtype)
    b = b if bias else None
    calls = []
    fused = cpu_w8a8.w8a8_linear
    monkeypatch.setattr(cpu_w8a8, "w8a8_linear", lambda *a: calls.append(1) or fused(*a))
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


@needs_compiler
@pytest.mark.parametrize("capability", ["AVX2", "DEFAULT"])
def test_builds_for_narrower_vector_units_are_bit_identical_too(monkeypatch, capability):
    """The AVX2 intrinsics and the plain-C++ loops (what an AVX2-only or non-AVX CPU compiles),
    built here by naming that capability: the same bits as the ATen path on odd shapes."""
    here = torch.backends.cpu.get_cpu_capability()
    if here == capability or (capability == "AVX2" and here != "AVX512"):
        pytest.skip(f"this CPU's own build ({here}) is the one the other tests check")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(cpu_w8a8, "_EXT", None)
    assert f"_{capability.lower()}_" in cpu_w8a8.extension().__name__
    for backend in BACKENDS:
        for m, k, n in [(1, 40, 33), (9, 77, 48), (33, 129, 16)]:
            x, qw, b = _packed_case(m, k, n, seed=m)
            with qmatmul.use_cpu_int8_backend(backend):
                for _ in range(2):
                    out = int8_linear(x, qw.qweight, qw.scale, b)
                assert qmatmul._current_pack(qmatmul._FBGEMM, qw.qweight) is not None
                ref = _aten_path(monkeypatch, lambda: int8_linear(x, qw.qweight, qw.scale, b))
            assert torch.equal(out, ref), (backend, m, k, n)


@needs_compiler
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_fused_w8a8_leaves_rows_with_inf_or_nan_to_the_aten_path(monkeypatch, bad):
    x, qw, b = _packed_case(4, 64, 32)
    x[2, 5] = bad
    with qmatmul.use_cpu_int8_backend(BACKENDS[-1]):
        for _ in range(2):  # packed on its second use
            int8_linear(x[:1], qw.qweight, qw.scale, b)
        packed = qmatmul._current_pack(qmatmul._FBGEMM, qw.qweight)
        assert packed is not None
        assert cpu_w8a8.w8a8_linear(x, packed, 127, b) is None
        assert cpu_w8a8.w8a8_linear(x[:2], packed, 127, b) is not None
        out = int8_linear(x, qw.qweight, qw.scale, b)
        ref = _aten_path(monkeypatch, lambda: int8_linear(x, qw.qweight, qw.scale, b))
    torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)


@needs_compiler
def test_fused_w8a8_rejects_a_feature_count_the_weight_does_not_have():
    x, qw, b = _packed_case(2, 64, 32)
    with qmatmul.use_cpu_int8_backend(BACKENDS[-1]):
        for _ in range(2):  # packed on its second use
            int8_linear(x[:1], qw.qweight, qw.scale, b)
        packed = qmatmul._current_pack(qmatmul._FBGEMM, qw.qweight)
        with pytest.raises(RuntimeError, match="x has 63 features, the packed weight 64"):
            cpu_w8a8.w8a8_linear(x[:, :63].contiguous(), packed, 127, None)


def test_failed_build_warns_once_and_the_aten_path_gives_the_results(monkeypatch):
    from torch.utils import cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension: c++: command not found\nmore detail")

    monkeypatch.setattr(cpu_w8a8, "_EXT", None)
    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    x, qw, b = _packed_case(3, 64, 32)
    with qmatmul.use_cpu_int8_backend(BACKENDS[-1]):
        int8_linear(x, qw.qweight, qw.scale, b)
        with pytest.warns(UserWarning, match=r"could not be built \(RuntimeError: Error building extension: "
                                             r"c\+\+: command not found\)"):
            out = int8_linear(x, qw.qweight, qw.scale, b)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            again = int8_linear(x, qw.qweight, qw.scale, b)
    qmax = qmatmul.A7_QMAX if BACKENDS[-1] == "fbgemm_a7" else 127
    assert torch.equal(out, again)
    assert rel_err(out, qlinear_ref(x, qw.qweight, qw.scale, b, act_qmax=qmax)) <= REL_TOL[torch.float32]


def test_env_var_zero_skips_the_build(monkeypatch):
    from torch.utils import cpp_extension

    monkeypatch.setattr(cpu_w8a8, "_EXT", None)
    monkeypatch.setenv("COLAFX_CPU_EXT", "0")
    monkeypatch.setattr(cpp_extension, "load", lambda *a, **k: pytest.fail("built despite COLAFX_CPU_EXT=0"))
    assert cpu_w8a8.extension() is None


def test_build_finds_the_ninja_package_when_the_venv_is_not_on_path(monkeypatch):
    """``.venv/bin/python -m pytest`` without activating the venv: ninja's pip binary is put on
    PATH for the build only."""
    ninja = pytest.importorskip("ninja")
    from torch.utils import cpp_extension

    seen = []
    monkeypatch.setattr(cpu_w8a8, "_EXT", None)
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(cpu_w8a8.shutil, "which", lambda name: None)
    monkeypatch.setattr(cpp_extension, "load", lambda *a, **k: seen.append(cpu_w8a8.os.environ["PATH"]) or "module")
    assert cpu_w8a8.extension() == "module"
    assert seen[0].split(cpu_w8a8.os.pathsep)[0] == ninja.BIN_DIR
    assert cpu_w8a8.os.environ["PATH"] == "/nonexistent"
