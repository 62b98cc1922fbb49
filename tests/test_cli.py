"""The colafx command line."""
import subprocess
import sys

from colafx.cli import main


def test_plan_350m_prints_totals(capsys):
    assert main(["plan", "--preset", "llama-350m", "--summary"]) == 0
    out = capsys.readouterr().out
    assert "367,969,280 -> 185,222,144" in out


def test_plan_table_rows(capsys):
    assert main(["plan", "--preset", "llama-tiny", "--rank", "8"]) == 0
    out = capsys.readouterr().out
    assert "model.layers.0.mlp.gate_proj" in out and " 8 " in out


def test_bad_rank_is_a_clear_error(capsys):
    assert main(["plan", "--preset", "llama-60m", "--rank", "600"]) == 1
    assert "exceeds min(d_in, d_out)" in capsys.readouterr().err


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "colafx.cli", "plan", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--rank" in out.stdout and "--seq-len" in out.stdout
