"""bench/data.py at tiny sizes: the data bench runs end to end (corpora, prepare, loader timing,
table, JSON), so it cannot rot."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_data_bench_smoke_run_writes_every_row(tmp_path, data_dir):
    from pydoc_data.topics import topics

    from colafx.runtime import data as D

    if not (data_dir / "wikitext-2" / "train.txt").is_file():
        pytest.skip(f"WikiText-2 is not under {data_dir}")
    D.train_tokenizer([topics[k] for k in sorted(topics)[:40]], 512).save_pretrained(tmp_path / "tok")
    cmd = [sys.executable, str(ROOT / "bench" / "data.py"), "--sizes-mb", "0.05", "0.1", "0.2", "--workers", "1",
           "--no-peer", "--preset", "llama-tiny", "--steps", "1", "--tokenizer", str(tmp_path / "tok"),
           "--data", str(data_dir), "--out", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "data.json").read_text())
    assert [(r["size_mb"], r["workers"], r["tool"]) for r in result["prepare"]] == [
        (0.05, 1, "colafx prepare"), (0.1, 1, "colafx prepare"), (0.2, 1, "colafx prepare")]
    sizes = [r["bytes"] for r in result["prepare"]]
    assert sizes == sorted(sizes) and abs(sizes[-1] - 200_000) < 5_000       # corpora of the asked sizes
    assert all(r["tokens"] > 0 and r["tokens_per_s"] > 0 and r["peak_rss_largest_mb"] > 0 for r in result["prepare"])
    assert [r["what"] for r in result["loader"]] == ["colafx PreparedCorpus.batch", "nanoGPT get_batch (memmap)",
                                                     "llama-tiny CoLA step"]
    assert set(result["targets"]) == {"rss_large_over_middle", "loader_share_of_step",
                                      "throughput_ratio_most_over_fewest_workers"}
    assert out.stdout.startswith("CPU features:") and "| corpus | tool | workers |" in out.stdout


def test_data_bench_help_names_the_sizes_flag():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "data.py"), "--help"], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert out.returncode == 0 and "--sizes-mb" in out.stdout
