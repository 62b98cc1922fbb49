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


def test_rank_rules_on_the_command_line(capsys):
    from colafx.transform.colaify import parse_rank

    assert parse_rank(["0.5", "k=96", "v=96"]) == {"default": 0.5, "k": 96, "v": 96}
    assert parse_rank(["128"]) == 128
    assert main(["plan", "--preset", "llama-tiny", "--rank", "0.5", "--rank", "k=8", "--rank", "v=8"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if "model.layers.0." in line]
    assert {r[0].rsplit(".", 1)[-1]: r[3] for r in rows} == {
        "q_proj": "32", "k_proj": "8", "v_proj": "8", "o_proj": "32", "gate_proj": "32", "up_proj": "32",
        "down_proj": "32"}
    assert main(["plan", "--preset", "llama-tiny", "--rank", "k=x"]) == 1
    assert "rank must be an int, a float or ROLE=VALUE" in capsys.readouterr().err
