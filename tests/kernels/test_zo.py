"""ZO perturbation / update: bit-exact integer restore, determinism, references, statistics.

Each test runs on the CPU path and on the Triton path (interpreter). The references are fed the
exact random numbers each path uses (``normal_noise`` / ``uniform_noise`` on the CPU,
``triton_normal_noise`` / ``triton_uniform_noise`` for Triton), so integer results must match
bit for bit and float results to fp32 rounding (rtol 1e-6).
"""
import pytest
import torch

from colafx.kernels import quant, zo
from colafx.kernels.quant import derive_seed, quantize_weight, unpack_int4
from colafx.kernels.zo import (
    HEADROOM,
    ZO_QMAX,
    zo_perturb_,
    zo_perturb_int_,
    zo_perturb_int_ref,
    zo_perturb_ref,
    zo_update_,
    zo_update_int_ref,
    zo_update_ref,
)

INT_CASES = [(8, None), (8, 16), (4, None), (4, 16)]  # (bits, group_size)
SHAPE = (9, 48)  # N odd, K not a multiple of the 1024-element block


@pytest.fixture(params=["cpu", "triton"])
def path(request, monkeypatch):
    """Which implementation the ops use; yields (normal stream, uniform stream) for references."""
    if request.param == "triton":
        if not quant.interpreting():
            pytest.skip("needs TRITON_INTERPRET=1")
        monkeypatch.setattr(quant, "FORCE_TRITON", True)
        return zo.triton_normal_noise, quant.triton_uniform_noise
    return zo.normal_noise, quant.uniform_noise


def _weight(shape=SHAPE, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _int_weight(bits, group_size, seed=0):
    return quantize_weight(_weight(seed=seed), bits, group_size, qmax=ZO_QMAX[bits])


def _values(q, bits):
    return unpack_int4(q) if bits == 4 else q


# ------------------------------------------------------------------ float weights


def test_float_perturb_restores_and_matches_ref(path):
    normal, _ = path
    w = _weight()
    w0 = w.clone()
    zo_perturb_(w, 7, 1e-3)
    torch.testing.assert_close(w, zo_perturb_ref(w0, normal(7, w.numel()), 1e-3), rtol=1e-6, atol=1e-7)
    assert not torch.equal(w, w0)
    zo_perturb_(w, 7, -2e-3)
    zo_perturb_(w, 7, 1e-3)
    torch.testing.assert_close(w, w0, rtol=0, atol=4 * torch.finfo(torch.float32).eps * w0.abs().max())


def test_float_noise_is_standard_normal_and_seeded(path):
    n = 8192
    w = torch.zeros(n)
    zo_perturb_(w, 3, 1.0)
    assert abs(w.mean()) < 4 / n**0.5 and abs(w.std() - 1) < 4 / (2 * n) ** 0.5
    again, other = torch.zeros(n), torch.zeros(n)
    zo_perturb_(again, 3, 1.0)
    zo_perturb_(other, 4, 1.0)
    assert torch.equal(w, again) and not torch.equal(w, other)


def test_float_update_matches_ref(path):
    normal, _ = path
    w = _weight()
    w0 = w.clone()
    zo_update_(w, 5, lr=1e-2, grad_scalar=3.0, weight_decay=0.1)
    want = zo_update_ref(w0, normal(5, w.numel()), 1e-2, 3.0, 0.1)
    torch.testing.assert_close(w, want, rtol=1e-6, atol=1e-7)


def test_bf16_weights_are_perturbed_in_fp32_and_rounded(path):
    """Exact on the CPU; within one bf16 ulp on Triton (the interpreter truncates fp32 → bf16)."""
    normal, _ = path
    w = _weight().bfloat16()
    w0 = w.clone()
    zo_perturb_(w, 2, 0.1)
    want = zo_perturb_ref(w0, normal(2, w.numel()), 0.1)
    if normal is zo.normal_noise:
        assert torch.equal(w, want)
    else:
        torch.testing.assert_close(w.float(), want.float(), rtol=2**-7, atol=0)


# ------------------------------------------------------------------ integer weights


@pytest.mark.parametrize("bits, group_size", INT_CASES)
def test_int_perturb_restore_is_bit_exact_even_at_the_head_room_limit(path, bits, group_size):
    qw = _int_weight(bits, group_size)
    q = _values(qw.qweight, bits).clone()
    limit = ZO_QMAX[bits]
    q[0, :8] = torch.tensor([limit, -limit] * 4, dtype=torch.int8)  # weights at ±(qmax − H)
    qweight = quant.pack_int4(q) if bits == 4 else q.clone()
    original = qweight.clone()
    eps = 50.0 * float(qw.scale.max())  # large: many |d| clamp at H
    zo_perturb_int_(qweight, qw.scale, 11, eps, +1, bits, check=True)
    d = _values(qweight, bits).int() - q.int()
    assert d.abs().max() == HEADROOM[bits]  # the limit is actually reached
    assert _values(qweight, bits).int().abs().max() <= quant.QMAX[bits]
    zo_perturb_int_(qweight, qw.scale, 11, eps, -2, bits)
    zo_perturb_int_(qweight, qw.scale, 11, eps, +1, bits)
    assert torch.equal(qweight, original)


@pytest.mark.parametrize("bits, group_size", INT_CASES)
def test_int_perturb_matches_ref_and_is_deterministic(path, bits, group_size):
    normal, uniform = path
    qw = _int_weight(bits, group_size)
    eps = 0.7 * float(qw.scale.mean())
    n = SHAPE[0] * SHAPE[1]
    want = zo_perturb_int_ref(qw.qweight, qw.scale, normal(3, n), uniform(99, n), eps, -1, bits)
    got = [qw.qweight.clone() for _ in range(3)]
    for q, seed in zip(got, (3, 3, 4)):
        zo_perturb_int_(q, qw.scale, seed, eps, -1, bits, rounding_seed=99)
    assert torch.equal(got[0], want)
    assert torch.equal(got[0], got[1])  # same seeds: same d
    assert not torch.equal(got[0], got[2])  # other u seed: other d
    assert not torch.equal(got[0], qw.qweight)


def test_int_perturb_default_rounding_stream_is_derived_from_seed(path):
    qw = _int_weight(8, None)
    a, b = qw.qweight.clone(), qw.qweight.clone()
    eps = float(qw.scale.mean())
    zo_perturb_int_(a, qw.scale, 3, eps, 1, 8)
    zo_perturb_int_(b, qw.scale, 3, eps, 1, 8, rounding_seed=derive_seed(3, 1))
    assert torch.equal(a, b)


@pytest.mark.parametrize("bits, group_size", INT_CASES)
def test_int_update_matches_ref_and_stays_in_range(path, bits, group_size):
    normal, uniform = path
    qw = _int_weight(bits, group_size)
    n = SHAPE[0] * SHAPE[1]
    for same_rounding, stream in ((False, derive_seed(99, 2)), (True, 99)):
        q = qw.qweight.clone()
        lr, g = 1.0, 40.0 * float(qw.scale.mean())  # big steps: some hit the clamp
        zo_update_(q, 3, lr, g, 0.05, w_scale=qw.scale, bits=bits, rounding_seed=99,
                   same_rounding=same_rounding)
        want = zo_update_int_ref(qw.qweight, qw.scale, normal(3, n), uniform(stream, n), lr, g, 0.05, bits)
        assert torch.equal(q, want)
        values = _values(q, bits)
        assert values.abs().max() == ZO_QMAX[bits]


def test_update_rounding_is_independent_of_perturbation_rounding_unless_same(path):
    """u₂ re-rounds the same u with fresh draws (uncorrelated residuals, same mean);
    same_rounding=True re-uses u₁'s draws (identical residuals when the values coincide)."""
    w = torch.full((32, 256), 0.0)
    w[:, 0] = 1.0  # scale = 1/119 per row; every other weight is 0
    qw = quantize_weight(w, 8, qmax=ZO_QMAX[8])
    s = float(qw.scale[0, 0])
    step = 0.37 * s  # perturbation ε·u/s and update lr·g·u/s equal: 0.37·u
    normal, _ = path
    u = normal(5, w.numel()).view(w.shape)[:, 1:].double()
    residuals = {}
    for name, same in (("perturb", None), ("independent", False), ("same", True)):
        q = qw.qweight.clone()
        if same is None:
            zo_perturb_int_(q, qw.scale, 5, step, 1, 8, rounding_seed=21)
            moved = q.double()[:, 1:]
        else:
            zo_update_(q, 5, 1.0, step, w_scale=qw.scale, bits=8, rounding_seed=21, same_rounding=same)
            moved = -q.double()[:, 1:]
        residuals[name] = (moved - 0.37 * u).flatten()
    n = residuals["perturb"].numel()
    for r in residuals.values():  # unbiased: E[SR(v)] = v
        assert abs(r.mean()) < 4 * 0.5 / n**0.5
    corr = torch.corrcoef(torch.stack((residuals["perturb"], residuals["independent"])))[0, 1]
    assert abs(corr) < 4 / n**0.5
    assert torch.equal(residuals["perturb"], residuals["same"])


def test_cpu_chunking_is_seamless(monkeypatch):
    """Small chunks: generator and row-block boundaries fall inside rows; refs still match."""
    monkeypatch.setattr(quant, "CPU_CHUNK", 100)
    monkeypatch.setattr(zo, "CPU_CHUNK", 100)
    qw = _int_weight(4, None)
    n = SHAPE[0] * SHAPE[1]
    eps = float(qw.scale.mean())
    q = qw.qweight.clone()
    zo_perturb_int_(q, qw.scale, 8, eps, 1, 4, rounding_seed=2)
    want = zo_perturb_int_ref(qw.qweight, qw.scale, zo.normal_noise(8, n), quant.uniform_noise(2, n), eps, 1, 4)
    assert torch.equal(q, want)
    w = _weight()
    w0 = w.clone()
    zo_perturb_(w, 8, 1.0)
    torch.testing.assert_close(w, zo_perturb_ref(w0, zo.normal_noise(8, n), 1.0))


# ------------------------------------------------------------------ validation and opcheck


def test_check_rejects_weights_without_head_room():
    qw = quantize_weight(_weight(), 8)  # full range: 127 > 119
    with pytest.raises(ValueError, match="head"):
        zo_perturb_int_(qw.qweight.clone(), qw.scale, 1, 1e-3, 1, 8, check=True)


def test_without_head_room_values_saturate_instead_of_wrapping():
    q = torch.full((1, 32), 127, dtype=torch.int8)
    scale = torch.full((1, 1), 1.0)
    zo_perturb_int_(q, scale, 1, 100.0, 1, 8)
    assert q.min() >= 119 and q.max() == 127  # no wrap-around to negative values


def _bad_calls():
    qw = _int_weight(8, None)
    q4 = _int_weight(4, None)
    return [
        (lambda: zo_perturb_(torch.zeros(4, dtype=torch.int8), 1, 0.1), TypeError),
        (lambda: zo_perturb_(torch.zeros(4, 4).t(), 1, 0.1), ValueError),
        (lambda: zo_perturb_(torch.zeros(4), -1, 0.1), ValueError),
        (lambda: zo_perturb_(torch.zeros(4), 1, "x"), TypeError),
        (lambda: zo_perturb_int_(qw.qweight, qw.scale, 1, 0.1, 3, 8), ValueError),
        (lambda: zo_perturb_int_(qw.qweight, qw.scale, 1, 0.1, 1, 4), TypeError),
        (lambda: zo_perturb_int_(q4.qweight, q4.scale, 1, 0.1, 1, 8), TypeError),
        (lambda: zo_perturb_int_(qw.qweight, qw.scale, 1, 0.1, 1, 5), ValueError),
        (lambda: zo_perturb_int_(qw.qweight, qw.scale.double(), 1, 0.1, 1, 8), TypeError),
        (lambda: zo_perturb_int_(qw.qweight, torch.ones(9, 5), 1, 0.1, 1, 8), ValueError),
        (lambda: zo_update_(qw.qweight, 1, 0.1, 1.0), TypeError),
        (lambda: zo_update_(qw.qweight, 1, 0.1, 1.0, w_scale=qw.scale, bits=8, rounding_seed=-3), ValueError),
    ]


@pytest.mark.parametrize("index", range(len(_bad_calls())))
def test_bad_inputs_raise(index):
    call, error = _bad_calls()[index]
    with pytest.raises(error):
        call()


def test_opcheck():
    qw = _int_weight(8, 16)
    q4 = _int_weight(4, None)
    ops = torch.ops.colafx
    torch.library.opcheck(ops.zo_perturb_.default, (_weight(), 1, 0.01))
    torch.library.opcheck(ops.zo_update_.default, (_weight(), 1, 0.01, 2.0, 0.1))
    torch.library.opcheck(ops.zo_perturb_int_.default, (qw.qweight.clone(), qw.scale, 1, 0.05, 1, 8, 5))
    torch.library.opcheck(ops.zo_perturb_int_.default, (q4.qweight.clone(), q4.scale, 1, 0.05, -2, 4, 5))
    torch.library.opcheck(ops.zo_update_int_.default, (qw.qweight.clone(), qw.scale, 1, 0.5, 2.0, 0.0, 8, 5))
