"""bench/gpu.py --dry-run: the GPU validation script runs end to end on the CPU, so it cannot rot."""
import json

import pytest
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_bench_dry_run_covers_every_section(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--dry-run", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_dry_run.json").read_text())
    assert result["dry_run"] and result["environment"]["device"] == "cpu"
    assert result["a"] and all(r["ok"] for r in result["a"])
    assert {r["kernel"] for r in result["a"]} == {"lowrank_act fwd+bwd", "W8A8 linear", "W4A8 linear", "W4A16 linear"}
    assert {r["op"] for r in result["b"]} >= {"F.linear", "W8A8", "W4A8", "W4A16", "lowrank_act fused", "silu(x @ A.T)"}
    assert {r["variant"] for r in result["c"]} == {"dense", "CoLA", "CoLA-M", "compiled CoLA"}
    assert all(r["tokens_per_s"] > 0 for r in result["c"])
    assert [r["method"] for r in result["d"]] == ["quzo-int8", "mezo-bf16"]
    assert "(c) pre-training" in out.stdout


def test_gpu_bench_without_cuda_says_so_in_one_line(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the no-CUDA message cannot be shown")
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--sections", "a", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1].startswith("bench/gpu.py: --device cuda: no CUDA device is available")
