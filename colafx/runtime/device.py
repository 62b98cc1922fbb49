"""Where a run executes: device choice, host-to-device copies, synchronised timing, peak memory and
the environment a result was measured in. The one home for what differs between CUDA and the CPU.

``--device auto`` (every command's default) is ``cuda:LOCAL_RANK`` when CUDA is present, else the CPU.
"""
from __future__ import annotations

import os
import platform
import time
from contextlib import contextmanager

import torch

DEVICE_HELP = "auto (CUDA when present, else the CPU), cpu, cuda or cuda:N"


def resolve_device(spec: str | torch.device | None = "auto", local_rank: int | None = None) -> torch.device:
    """The ``torch.device`` for ``spec``: ``"auto"``/``None``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    Under ``torchrun`` (``local_rank`` given, or ``LOCAL_RANK`` set) ``"auto"`` and ``"cuda"`` mean
    ``cuda:LOCAL_RANK``.

    Raises:
        ValueError: an unknown spec, or CUDA asked for where none is available (one line that says
            which torch build this is).
    """
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = (spec or "auto").strip().lower()
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if spec == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise ValueError(f"--device {spec}: no CUDA device is available (torch {torch.__version__}, {build}); "
                             "use --device cpu or auto")
        index = local_rank if spec == "cuda" else int(spec.split(":", 1)[1])
        if index >= torch.cuda.device_count():
            raise ValueError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) are visible")
        return torch.device(f"cuda:{index}")
    raise ValueError(f"unknown device {spec!r}; use {DEVICE_HELP}")


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of ``model``'s first parameter or buffer (a DTensor's local shard under FSDP2); CPU
    for a model without tensors."""
    for t in model.parameters():
        return t.to_local().device if hasattr(t, "to_local") else t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a host tensor to ``device``: through pinned memory with ``non_blocking`` on CUDA, so the
    copy overlaps the previous step's kernels; a no-op when it is already there."""
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing to wait for on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def timed(device: torch.device, out: list):
    """Append the wall time of the block to ``out``, synchronising CUDA before and after so queued
    kernels are counted where they run."""
    synchronize(device)
    start = time.perf_counter()
    yield
    synchronize(device)
    out.append(time.perf_counter() - start)


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window (CUDA); the CPU is measured with the profiler instead."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> int | None:
    """``torch.cuda.max_memory_allocated`` since the last reset on CUDA; ``None`` on the CPU (use the
    profiler's ``self_cpu_memory_usage`` running sum there, as the benches do)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return None


def cpu_features() -> list[str]:
    """The SIMD features that decide the CPU kernels' speed: avx2, avx512f, avx512_vnni / avx_vnni,
    avx512_bf16, amx_tile, amx_int8 (from ``/proc/cpuinfo``; empty where it cannot be read)."""
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")
    flags = _cpuinfo().get("flags", "").split()
    return [w for w in wanted if w in flags]


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of ``/proc/cpuinfo`` (stripped), or {} where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            block = f.read().split("\n\n")[0]
    except OSError:
        return {}
    pairs = (line.split(":", 1) for line in block.splitlines() if ":" in line)
    return {key.strip(): value.strip() for key, value in pairs}


ISA_LIMIT_VARS = ("ATEN_CPU_CAPABILITY", "FBGEMM_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def isa_limits() -> dict[str, str]:
    """The environment variables set here that hold ATen, FBGEMM, oneDNN or MKL to an older
    instruction set than the CPU's (a run with them measures that ISA's kernels, not the CPU's)."""
    return {name: os.environ[name] for name in ISA_LIMIT_VARS if os.environ.get(name)}


def environment(device: torch.device, dtype: str | None = None) -> dict:
    """What a measurement ran on: device and its name, dtype, torch / triton / CUDA versions, and the
    CPU's kind and features. Recorded in ``metrics.jsonl`` and every bench JSON."""
    info = {"device": str(device), "dtype": dtype, "torch": torch.__version__, "cuda": torch.version.cuda,
            "cpu": platform.processor() or platform.machine(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_features": cpu_features(), "isa_limits": isa_limits(), "threads": torch.get_num_threads()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:  # pragma: no cover - triton is a dependency
        info["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device_name=props.name, device_memory_gib=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}")
    else:
        info["device_name"] = _cpu_model()
    return info


def _cpu_model() -> str:
    """The CPU's model name with its CPUID family and model (names such as "AMD EPYC" do not tell
    the generation apart: family 25 model 17 is a Zen 4, family 26 a Zen 5)."""
    fields = _cpuinfo()
    if not fields:
        return platform.processor() or "cpu"
    name = fields.get("model name", "cpu")
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name
