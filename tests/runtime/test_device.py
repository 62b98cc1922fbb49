"""--device: resolution, the clear error without CUDA, transfers, and what a run records."""
import pytest
import torch

from colafx.runtime.device import environment, model_device, resolve_device, timed, to_device

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")


def test_auto_is_cuda_when_present_else_cpu():
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == want and resolve_device(None).type == want
    assert resolve_device("cpu") == torch.device("cpu")


@no_cuda
@pytest.mark.parametrize("spec", ["cuda", "cuda:1"])
def test_cuda_without_cuda_is_one_clear_line(spec):
    with pytest.raises(ValueError, match=rf"--device {spec}: no CUDA device is available \(torch .*\)") as info:
        resolve_device(spec)
    assert "\n" not in str(info.value)


def test_unknown_device_is_refused():
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        resolve_device("tpu")


def test_transfers_and_model_device():
    t = torch.arange(6)
    assert to_device(t, torch.device("cpu")) is t
    model = torch.nn.Linear(3, 2)
    assert model_device(model) == torch.device("cpu")
    times = []
    with timed(torch.device("cpu"), times):
        torch.ones(10).sum()
    assert len(times) == 1 and times[0] >= 0


def test_environment_names_device_dtype_and_versions():
    env = environment(torch.device("cpu"), "fp32")
    assert env["device"] == "cpu" and env["dtype"] == "fp32" and env["torch"] == torch.__version__
    assert env["triton"] and env["cpu_capability"] and isinstance(env["cpu_features"], list)
    assert env["device_name"]


def test_environment_records_the_variables_that_hold_libraries_to_an_older_isa(monkeypatch):
    for name in ("ATEN_CPU_CAPABILITY", "FBGEMM_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS"):
        monkeypatch.delenv(name, raising=False)
    assert environment(torch.device("cpu"))["isa_limits"] == {}
    monkeypatch.setenv("FBGEMM_ENABLE_INSTRUCTIONS", "AVX2")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "")  # set but empty: no limit
    assert environment(torch.device("cpu"))["isa_limits"] == {"FBGEMM_ENABLE_INSTRUCTIONS": "AVX2"}
