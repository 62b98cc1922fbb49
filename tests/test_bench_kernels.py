"""bench/cpu_qmatmul.py at a tiny size: the kernel bench runs end to end (so it cannot rot) and
reports, next to each median ratio against a peer, the spread of that ratio over the repeats."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_cpu_qmatmul", ROOT / "bench" / "cpu_qmatmul.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ratio_range_is_the_lowest_and_highest_ratio_of_one_repeat():
    assert _bench().ratio_range([2.0, 3.0, 4.0], [1.0, 2.0, 1.0]) == [1.5, 4.0]


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
def test_kernel_bench_writes_medians_and_ratio_spreads(tmp_path, capsys):
    bench = _bench()
    assert bench.main(["--dims", "64", "--tokens", "1", "3", "--repeats", "3", "--min-time", "0.001",
                       "--int4-max-tokens", "1", "--sqnr-tokens", "8", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "kernels.json").read_text())
    rows = {r["tokens"]: r for r in record["cpu"]}
    assert set(rows) == {1, 3} and (tmp_path / "kernels.png").stat().st_size > 0
    for r in rows.values():
        low, high = r["vs_fbgemm_range"]
        assert 0 < low <= high
        assert all(len(f) == 3 and min(f) >= 0 for f in r["page_faults_per_call"].values())  # one per repeat
    assert "w4a16_speedup_range" in rows[1] and "w4a16_ms" not in rows[3]  # int4 timed up to --int4-max-tokens
    out = capsys.readouterr().out
    assert "lowest and highest ratio of one repeat" in out and "x (" in out and "Page faults per call" in out
