"""bench/sst2.py: the multi-seed table and plot from a recorded report (the runs themselves need SmolLM2)."""
import importlib.util
import sys
from argparse import Namespace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    # sst2.py imports zo_memory from its folder; the folder leaves sys.path again, so that its
    # scripts cannot shadow installed packages for the tests that run after this one
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        spec = importlib.util.spec_from_file_location("bench_sst2", ROOT / "bench" / "sst2.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return module


def test_table_reports_mean_std_over_seeds_and_memory_ratios(tmp_path, capsys):
    bench = _bench()
    runs = {"mezo-fp32": {"0": {"curve": [[0, 0.5], [40, 0.60]], "step_s": 2.0},
                          "1": {"curve": [[0, 0.5], [40, 0.70]], "step_s": 2.0}},
            "quzo-int4": {"0": {"curve": [[0, 0.5], [40, 0.55]], "step_s": 3.0},
                          "1": {"curve": [[0, 0.5], [40, 0.65]], "step_s": 3.0}}}
    report = {"zero_shot": 0.5, "total_seconds": 60, "runs": runs,
              "sweep": {"mezo-fp32": {"candidates": [{"lr": 1e-3, "eps": 1e-2, "heldout_acc": 0.6}],
                                      "chosen": {"lr": 1e-3, "eps": 1e-2}}},
              "memory": {"adamw-fp32": {"peak_mb": 1000.0}, "mezo-fp32": {"peak_mb": 500.0},
                         "quzo-int4": {"peak_mb": 200.0}}}
    args = Namespace(model="m", lora_rank=8, batch_size=16, k_shot=16, steps=40, seeds=[0, 1], n_dev=256)
    bench.print_tables(report, args)
    out = capsys.readouterr().out
    # mean ± sample std of the final accuracies; difference to MeZO's mean in points; peak vs AdamW fp32
    assert "| mezo-fp32 | 0.500 | 0.650 ± 0.071 | 0.600 0.700 | +15.0 | +0.0 | 500 | 0.500x | 2.00 |" in out
    assert "| quzo-int4 | 0.500 | 0.600 ± 0.071 | 0.550 0.650 | +10.0 | -5.0 | 200 | 0.200x | 3.00 |" in out
    assert "| mezo-fp32 | 0.001 / 0.01 -> 0.600 | 0.001 / 0.01 |" in out
    bench.plot(report, tmp_path / "sst2.png")
    assert (tmp_path / "sst2.png").stat().st_size > 5000


def test_resume_refuses_a_report_made_with_other_arguments(tmp_path):
    import json

    import pytest

    bench = _bench()
    args = bench.main.__globals__["argparse"].Namespace(
        model="smollm2", steps=40, eval_every=20, sweep_steps=20, n_heldout=128, batch_size=16, k_shot=16,
        n_dev=256, lora_rank=8, int4_group_size=64)
    assert bench.load_previous(tmp_path / "none.json", args) == {}
    path = tmp_path / "sst2.json"
    path.write_text(json.dumps({"args": {**vars(args), "steps": 100}, "runs": {"mezo-fp32": {}}}))
    with pytest.raises(SystemExit, match="other steps"):
        bench.load_previous(path, args)
    path.write_text(json.dumps({"args": vars(args), "runs": {"mezo-fp32": {"0": {}}}}))
    assert bench.load_previous(path, args)["runs"] == {"mezo-fp32": {"0": {}}}


def test_sweep_from_takes_the_chosen_hyper_parameters_and_refuses_what_it_lacks(tmp_path):
    import json

    import pytest

    bench = _bench()
    sweep = {"quzo-int4": {"candidates": [{"lr": 1e-3, "eps": 4e-2, "heldout_acc": 0.6}],
                           "chosen": {"lr": 1e-3, "eps": 4e-2}},
             "mezo-fp32": {"candidates": []}}  # a sweep cut short: nothing chosen
    path = tmp_path / "sst2.json"
    path.write_text(json.dumps({"args": {"sweep_steps": 40}, "sweep": sweep}))
    picked, steps = bench.sweep_from(path, ["quzo-int4"])
    assert picked == {"quzo-int4": sweep["quzo-int4"]} and steps == 40
    with pytest.raises(SystemExit, match="no chosen LR / eps for mezo-fp32"):
        bench.sweep_from(path, ["quzo-int4", "mezo-fp32"])
    with pytest.raises(SystemExit, match="cannot read a sweep"):
        bench.sweep_from(tmp_path / "missing.json", ["quzo-int4"])
